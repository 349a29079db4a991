//! `/policies`: access policies reusable across resources. A resource follows one with
//! `policy_id` and lays its own `access` fields over it; changing a policy changes every
//! resource that follows it with one config push. Permissions: `resource:read` and
//! `resource:write`.

use crate::api::doc::get;
use crate::api::doc::ApiRouter;
use axum::extract::State;
use axum::http::StatusCode;
use kakuremichi_proto::identity::AccessPolicy;
use kakuremichi_proto::RouteProtocol;
use serde::Deserialize;
use uuid::Uuid;

use super::resources::check_access;
use super::{invalid, ApiJson, ApiPath, Org};
use crate::store::Policy;
use crate::{validate, ApiError, AppState};

/// Body of `POST /policies`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePolicy {
    /// Name, unique in the organization.
    pub name: String,
    /// Who may reach the resources that follow it.
    pub access: AccessPolicy,
}

/// Body of `PATCH /policies/{id}`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchPolicy {
    /// New name.
    pub name: Option<String>,
    /// New access, replacing the old one whole.
    pub access: Option<AccessPolicy>,
}

/// The policies router.
pub fn router() -> ApiRouter<AppState> {
    ApiRouter::new()
        .route(
            "/policies",
            get(list)
                .summary("named access policies")
                .paged()
                .returns::<Vec<Policy>>(200)
                .post(create)
                .body::<CreatePolicy>()
                .returns::<Policy>(201),
        )
        .route(
            "/policies/{id}",
            get(one)
                .returns::<Policy>(200)
                .patch(update)
                .body::<PatchPolicy>()
                .returns::<Policy>(200)
                .delete(remove),
        )
}

async fn create(
    State(state): State<AppState>,
    org: Org,
    ApiJson(body): ApiJson<CreatePolicy>,
) -> Result<(StatusCode, ApiJson<Policy>), ApiError> {
    let name = validate::name(&body.name).map_err(invalid)?;
    let access = check_access(body.access, RouteProtocol::Http)?;
    let p = state.store.create_policy(org.0, &name, &access).await?;
    tracing::info!(policy_id = %p.id, "access policy created");
    Ok((StatusCode::CREATED, ApiJson(p)))
}

async fn list(
    State(state): State<AppState>,
    org: Org,
    paged: super::page::Paged,
) -> Result<axum::response::Response, ApiError> {
    paged.page(state.store.list_policies(org.0).await?)
}

async fn one(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiJson<Policy>, ApiError> {
    Ok(ApiJson(state.store.get_policy(org.0, id).await?))
}

async fn update(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<PatchPolicy>,
) -> Result<ApiJson<Policy>, ApiError> {
    let name = body
        .name
        .as_deref()
        .map(validate::name)
        .transpose()
        .map_err(invalid)?;
    let access = body
        .access
        .map(|a| check_access(a, RouteProtocol::Http))
        .transpose()?;
    let p = state
        .store
        .update_policy(org.0, id, name.as_deref(), access.as_ref())
        .await?;
    tracing::info!(policy_id = %id, "access policy changed");
    Ok(ApiJson(p))
}

async fn remove(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    state.store.delete_policy(org.0, id).await?;
    tracing::info!(policy_id = %id, "access policy deleted");
    Ok(StatusCode::NO_CONTENT)
}
