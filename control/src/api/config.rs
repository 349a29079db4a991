//! `GET /config/version`.

use crate::api::doc::get;
use crate::api::doc::ApiRouter;
use axum::extract::State;
use serde::Serialize;

use super::ApiJson;
use crate::{ApiError, AppState};

/// Answer of `GET /config/version`.
#[derive(Debug, Serialize)]
pub struct VersionView {
    /// The current config version.
    pub version: u64,
}

/// The config router.
pub fn router() -> ApiRouter<AppState> {
    ApiRouter::new().route("/config/version", get(version))
}

async fn version(State(state): State<AppState>) -> Result<ApiJson<VersionView>, ApiError> {
    Ok(ApiJson(VersionView {
        version: state.store.config_version().await?,
    }))
}
