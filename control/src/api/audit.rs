//! `/audit`: the audit log (sign-ins, refusals, every change through the API), newest first,
//! filtered by `action` (exact, or a prefix ending in `*`), `actor`, `outcome`, `since` (RFC 3339, or unix ms)
//! and `limit` (default 100, at most 1000).

use crate::api::doc::get;
use crate::api::doc::ApiRouter;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};

use super::{ApiJson, Org};
use crate::store::{AuditEntry, AuditFilter};
use crate::{ApiError, AppState};

/// The audit router.
pub fn router() -> ApiRouter<AppState> {
    ApiRouter::new().route("/audit", get(list))
}

async fn list(
    State(state): State<AppState>,
    org: Org,
    filter: Result<Query<AuditFilter>, QueryRejection>,
) -> Result<ApiJson<Vec<AuditEntry>>, ApiError> {
    let Query(filter) =
        filter.map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))?;
    Ok(ApiJson(state.store.list_audit(org.0, &filter).await?))
}
