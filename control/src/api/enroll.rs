//! `POST /enroll`: a node trades its one-time enrollment token for a credential.

use crate::api::doc::post;
use crate::api::doc::ApiRouter;
use axum::extract::State;
use kakuremichi_proto::{check_protocol_version, EnrollRequest, EnrollResponse};

use super::ApiJson;
use crate::{ApiError, AppState};

/// The enrollment router (no admin key: the token is the credential).
pub fn router() -> ApiRouter<AppState> {
    ApiRouter::new().route("/enroll", post(enroll))
}

async fn enroll(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<EnrollRequest>,
) -> Result<ApiJson<EnrollResponse>, ApiError> {
    check_protocol_version(req.protocol_version)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let resp = state
        .store
        .enroll(req.kind, &req.token, &req.public_key)
        .await?;
    tracing::info!(node_id = %resp.node_id, kind = %resp.kind, "node enrolled");
    Ok(ApiJson(resp))
}
