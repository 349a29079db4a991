//! `/roles`: the built-in roles and custom ones, each a named set of permissions. A user's
//! permissions are the union of their roles'; a custom role's change applies at the next request.

use crate::api::doc::get;
use crate::api::doc::ApiRouter;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::{invalid, ApiJson, ApiPath, Org, PERMISSIONS};
use crate::store::{CustomRole, BUILT_IN_ROLES};
use crate::{validate, ApiError, AppState};

/// Body of `POST /roles`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRole {
    /// Name (`a-z 0-9 _ - : .`), not a built-in one.
    pub name: String,
    /// What it is for.
    #[serde(default)]
    pub description: String,
    /// Permissions it gives.
    pub permissions: Vec<String>,
}

/// Body of `PATCH /roles/{name}`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateRole {
    /// New description.
    pub description: Option<String>,
    /// New permissions.
    pub permissions: Option<Vec<String>>,
}

/// A role as the API shows it.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct RoleView {
    /// Name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Permissions it gives.
    pub permissions: Vec<String>,
    /// Built in (cannot change).
    pub built_in: bool,
}

/// The roles router.
pub fn router() -> ApiRouter<AppState> {
    ApiRouter::new()
        .route(
            "/roles",
            get(list)
                .summary("the built-in roles and the organization's own")
                .returns::<Vec<RoleView>>(200)
                .post(create)
                .body::<CreateRole>()
                .returns::<RoleView>(201),
        )
        .route(
            "/roles/{name}",
            get(one)
                .returns::<RoleView>(200)
                .patch(update)
                .summary("a custom role's description or permissions")
                .body::<UpdateRole>()
                .returns::<RoleView>(200)
                .delete(remove),
        )
}

fn built_in_view(name: &str) -> Option<RoleView> {
    let perms = crate::roles::built_in(name)?;
    let description = match name {
        "owner" => "runs this control: every permission",
        "admin" => "every permission",
        "member" => "reads the fleet; starts and uses agent sessions",
        _ => "reads the fleet",
    };
    Some(RoleView {
        name: name.to_owned(),
        description: description.to_owned(),
        permissions: perms.iter().map(|p| (*p).to_owned()).collect(),
        built_in: true,
    })
}

impl From<CustomRole> for RoleView {
    fn from(r: CustomRole) -> Self {
        RoleView {
            name: r.name,
            description: r.description,
            permissions: r.permissions,
            built_in: false,
        }
    }
}

fn permissions(list: Vec<String>) -> Result<Vec<String>, ApiError> {
    let mut out: Vec<String> = Vec::new();
    for p in list {
        if !PERMISSIONS.contains(&p.as_str()) {
            return Err(invalid(format!(
                "permissions: {p:?} is not a permission; known: {}",
                PERMISSIONS.join(", ")
            )));
        }
        if !out.contains(&p) {
            out.push(p);
        }
    }
    Ok(out)
}

fn description(d: &str) -> Result<String, ApiError> {
    let d = d.trim();
    if d.chars().count() > 256 || d.chars().any(char::is_control) {
        return Err(invalid(
            "description: at most 256 characters, no control characters".into(),
        ));
    }
    Ok(d.to_owned())
}

fn not_built_in(name: &str) -> Result<(), ApiError> {
    if BUILT_IN_ROLES.contains(&name) {
        return Err(ApiError::Conflict(format!(
            "{name} is a built-in role and cannot change"
        )));
    }
    Ok(())
}

async fn list(State(state): State<AppState>, org: Org) -> Result<ApiJson<Vec<RoleView>>, ApiError> {
    let mut all: Vec<RoleView> = BUILT_IN_ROLES
        .iter()
        .filter_map(|r| built_in_view(r))
        .collect();
    all.extend(
        state
            .store
            .list_roles(org.0)
            .await?
            .into_iter()
            .map(Into::into),
    );
    Ok(ApiJson(all))
}

async fn one(
    State(state): State<AppState>,
    org: Org,
    ApiPath(name): ApiPath<String>,
) -> Result<ApiJson<RoleView>, ApiError> {
    if let Some(v) = built_in_view(&name) {
        return Ok(ApiJson(v));
    }
    Ok(ApiJson(state.store.role(org.0, &name).await?.into()))
}

async fn create(
    State(state): State<AppState>,
    org: Org,
    ApiJson(body): ApiJson<CreateRole>,
) -> Result<(StatusCode, ApiJson<RoleView>), ApiError> {
    let name = validate::role(&body.name).map_err(|e| invalid(format!("name: {e}")))?;
    not_built_in(&name)?;
    let role = state
        .store
        .create_role(
            org.0,
            &CustomRole {
                name,
                description: description(&body.description)?,
                permissions: permissions(body.permissions)?,
                created_at: 0,
            },
        )
        .await?;
    tracing::info!(role = %role.name, "role created");
    Ok((StatusCode::CREATED, ApiJson(role.into())))
}

async fn update(
    State(state): State<AppState>,
    org: Org,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<UpdateRole>,
) -> Result<ApiJson<RoleView>, ApiError> {
    not_built_in(&name)?;
    let d = body.description.as_deref().map(description).transpose()?;
    let p = body.permissions.map(permissions).transpose()?;
    let role = state
        .store
        .update_role(org.0, &name, d.as_deref(), p.as_deref())
        .await?;
    tracing::info!(role = %role.name, "role changed");
    Ok(ApiJson(role.into()))
}

async fn remove(
    State(state): State<AppState>,
    org: Org,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    not_built_in(&name)?;
    state.store.delete_role(org.0, &name).await?;
    tracing::info!(role = %name, "role deleted");
    Ok(StatusCode::NO_CONTENT)
}
