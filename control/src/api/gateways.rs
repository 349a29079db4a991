//! `/gateways`: public gateways, with the endpoint agents dial.

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

const KIND: NodeKind = NodeKind::Gateway;

/// Body of `POST /gateways`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateGateway {
    /// Display name, unique.
    pub name: String,
    /// The public `host:port` agents dial (the gateway's WireGuard UDP port).
    pub endpoint: String,
}

/// Body of `PATCH /gateways/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateGateway {
    /// New name.
    pub name: Option<String>,
    /// New endpoint.
    pub endpoint: Option<String>,
}

/// The gateways router.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/gateways", get(list).post(create))
        .route("/gateways/{id}", get(one).patch(update).delete(remove))
        .route("/gateways/{id}/enrollment-token", post(regenerate))
}

async fn create(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CreateGateway>,
) -> Result<(StatusCode, ApiJson<NodeView>), ApiError> {
    let name = validate::name(&body.name).map_err(invalid)?;
    let endpoint = validate::host_port(&body.endpoint, "endpoint").map_err(invalid)?;
    nodes::create(&state, KIND, &name, Some(&endpoint)).await
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
    ApiJson(body): ApiJson<UpdateGateway>,
) -> Result<ApiJson<NodeView>, ApiError> {
    let name = body
        .name
        .as_deref()
        .map(validate::name)
        .transpose()
        .map_err(invalid)?;
    let endpoint = body
        .endpoint
        .as_deref()
        .map(|e| validate::host_port(e, "endpoint"))
        .transpose()
        .map_err(invalid)?;
    nodes::update(&state, KIND, id, name.as_deref(), endpoint.as_deref()).await
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
