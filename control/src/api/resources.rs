//! `/resources`: public hostnames forwarded to private targets through a site.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{invalid, valid_opt, ApiJson, ApiPath};
use crate::store::{NewResource, Resource, ResourcePatch};
use crate::{validate, ApiError, AppState};

/// Body of `POST /resources`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateResource {
    /// Display name; defaults to the hostname.
    pub name: Option<String>,
    /// Public hostname (lower-cased).
    pub hostname: String,
    /// The site whose agent reaches the target.
    pub site_id: Uuid,
    /// Private target, `host:port`.
    pub target: String,
}

/// Body of `PATCH /resources/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateResource {
    /// New name.
    pub name: Option<String>,
    /// New hostname.
    pub hostname: Option<String>,
    /// New site (the resource gets a new overlay port there).
    pub site_id: Option<Uuid>,
    /// New target.
    pub target: Option<String>,
}

/// A resource as the API shows it.
#[derive(Debug, Serialize)]
pub struct ResourceView {
    /// Id.
    pub id: Uuid,
    /// Display name.
    pub name: String,
    /// Public hostname.
    pub hostname: String,
    /// The site.
    pub site_id: Uuid,
    /// Private target.
    pub target: String,
    /// Port on the site's overlay address leading to the target.
    pub overlay_port: u16,
    /// Creation time (unix ms).
    pub created_at: i64,
}

impl From<Resource> for ResourceView {
    fn from(r: Resource) -> Self {
        Self {
            id: r.id,
            name: r.name,
            hostname: r.hostname,
            site_id: r.site_id,
            target: r.target,
            overlay_port: r.overlay_port,
            created_at: r.created_at,
        }
    }
}

/// The resources router.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/resources", get(list).post(create))
        .route("/resources/{id}", get(one).patch(update).delete(remove))
}

async fn create(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CreateResource>,
) -> Result<(StatusCode, ApiJson<ResourceView>), ApiError> {
    let hostname = validate::hostname(&body.hostname).map_err(invalid)?;
    let name = match body.name.as_deref() {
        Some(n) => validate::name(n).map_err(invalid)?,
        None => validate::name(&hostname).map_err(invalid)?,
    };
    let target = validate::host_port(&body.target, "target").map_err(invalid)?;
    let r = state
        .store
        .create_resource(&NewResource {
            name,
            hostname,
            site_id: body.site_id,
            target,
        })
        .await?;
    tracing::info!(resource_id = %r.id, site_id = %r.site_id, "resource created");
    Ok((StatusCode::CREATED, ApiJson(r.into())))
}

async fn list(State(state): State<AppState>) -> Result<ApiJson<Vec<ResourceView>>, ApiError> {
    let all = state.store.list_resources().await?;
    Ok(ApiJson(all.into_iter().map(Into::into).collect()))
}

async fn one(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiJson<ResourceView>, ApiError> {
    Ok(ApiJson(state.store.get_resource(id).await?.into()))
}

async fn update(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<UpdateResource>,
) -> Result<ApiJson<ResourceView>, ApiError> {
    let patch = ResourcePatch {
        name: valid_opt(body.name.as_deref(), validate::name)?,
        hostname: valid_opt(body.hostname.as_deref(), validate::hostname)?,
        site_id: body.site_id,
        target: valid_opt(body.target.as_deref(), |t| validate::host_port(t, "target"))?,
    };
    Ok(ApiJson(
        state.store.update_resource(id, &patch).await?.into(),
    ))
}

async fn remove(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    state.store.delete_resource(id).await?;
    Ok(StatusCode::NO_CONTENT)
}
