//! `/sites`: agents' identities. Deleting a site deletes its resources.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use kakuremichi_proto::NodeKind;
use serde::Deserialize;
use uuid::Uuid;

use super::nodes::{self, NodeView, TokenView};
use super::{invalid, ApiJson, ApiPath};
use crate::{validate, ApiError, AppState};

const KIND: NodeKind = NodeKind::Agent;

/// Body of `POST /sites`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSite {
    /// Display name, unique.
    pub name: String,
}

/// Body of `PATCH /sites/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateSite {
    /// New name.
    pub name: Option<String>,
}

/// The sites router.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/sites", get(list).post(create))
        .route("/sites/{id}", get(one).patch(update).delete(remove))
        .route("/sites/{id}/enrollment-token", post(regenerate))
}

async fn create(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CreateSite>,
) -> Result<(StatusCode, ApiJson<NodeView>), ApiError> {
    let name = validate::name(&body.name).map_err(invalid)?;
    nodes::create(&state, KIND, &name, None).await
}

async fn list(State(state): State<AppState>) -> Result<ApiJson<Vec<NodeView>>, ApiError> {
    nodes::list(&state, KIND).await
}

async fn one(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiJson<NodeView>, ApiError> {
    nodes::get(&state, KIND, id).await
}

async fn update(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<UpdateSite>,
) -> Result<ApiJson<NodeView>, ApiError> {
    let name = body
        .name
        .as_deref()
        .map(validate::name)
        .transpose()
        .map_err(invalid)?;
    nodes::update(&state, KIND, id, name.as_deref(), None).await
}

async fn remove(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    nodes::delete(&state, KIND, id).await
}

async fn regenerate(
    state: State<AppState>,
    id: ApiPath<Uuid>,
) -> Result<ApiJson<TokenView>, ApiError> {
    nodes::regenerate_token(state, KIND, id).await
}
