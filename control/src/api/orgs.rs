//! `/orgs`: organizations (tenants). An API key acts in one organization and sees only it; the
//! default organization (the instance's own) also lists every organization, creates new ones
//! (answering with the new organization's admin key, shown once), adds existing accounts to
//! them (`/orgs/{id}/members`), and deletes empty ones.

use crate::api::doc::ApiRouter;
use crate::api::doc::{get, post};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Extension;
use kakuremichi_proto::Secret;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::users::UserView;
use super::{invalid, ApiJson, ApiPath, Org};
use crate::store::{ApiKey, Organization};
use crate::{validate, ApiError, AppState};

/// Body of `POST /orgs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateOrg {
    /// Display name, unique.
    pub name: String,
}

/// Body of `PATCH /orgs/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateOrg {
    /// New name.
    pub name: Option<String>,
    /// Members reach this organization's resources only after signing in with a second factor
    /// (TOTP or a passkey).
    pub require_second_factor: Option<bool>,
}

/// A new organization and its admin key, shown once.
#[derive(Debug, Serialize)]
pub struct CreatedOrg {
    /// The organization.
    #[serde(flatten)]
    pub org: Organization,
    /// An API key with every permission in it (`kma_...`); the caller's user, if any, is its
    /// owner and holds the key.
    pub admin_key: Secret,
}

/// The organizations router.
pub fn router() -> ApiRouter<AppState> {
    ApiRouter::new()
        .route("/orgs", get(list).post(create))
        .route("/orgs/{id}", get(one).patch(update).delete(remove))
        .route("/orgs/{id}/members", post(add_member))
}

/// Body of `POST /orgs/{id}/members`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddMember {
    /// The e-mail address of an existing account.
    pub email: String,
    /// Roles in the organization (default: member; built in, or custom there).
    pub roles: Option<Vec<String>>,
}

/// Makes an existing account a member of an organization. Only the default organization may:
/// an organization's admins create accounts of their own (`POST /users`), but adding someone
/// else's account would let them reach into another organization's people.
async fn add_member(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<AddMember>,
) -> Result<(StatusCode, ApiJson<UserView>), ApiError> {
    instance_only(org, "add existing accounts to organizations")?;
    state.store.get_org(id).await?;
    let email = validate::email(&body.email).map_err(invalid)?;
    let roles = super::users::roles(
        &state,
        Org(id),
        body.roles.unwrap_or_else(|| vec!["member".into()]),
    )
    .await?;
    let Some((user, _)) = state.store.user_by_email(&email).await? else {
        return Err(ApiError::NotFound(
            "no account has this e-mail address".into(),
        ));
    };
    state.store.add_member(id, user.id, &roles).await?;
    tracing::info!(user_id = %user.id, org_id = %id, "member added");
    Ok((
        StatusCode::CREATED,
        ApiJson(state.store.get_member(id, user.id).await?.into()),
    ))
}

fn instance_only(org: Org, what: &str) -> Result<(), ApiError> {
    if org.is_default() {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "only the default organization's keys can {what}"
        )))
    }
}

async fn list(
    State(state): State<AppState>,
    org: Org,
) -> Result<ApiJson<Vec<Organization>>, ApiError> {
    if org.is_default() {
        return Ok(ApiJson(state.store.list_orgs().await?));
    }
    Ok(ApiJson(vec![state.store.get_org(org.0).await?]))
}

async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<ApiKey>,
    org: Org,
    ApiJson(body): ApiJson<CreateOrg>,
) -> Result<(StatusCode, ApiJson<CreatedOrg>), ApiError> {
    instance_only(org, "create organizations")?;
    let name = validate::name(&body.name).map_err(invalid)?;
    let (created, admin_key) = state.store.create_org(&name, caller.user_id).await?;
    tracing::info!(org_id = %created.id, "organization created");
    Ok((
        StatusCode::CREATED,
        ApiJson(CreatedOrg {
            org: created,
            admin_key,
        }),
    ))
}

async fn one(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiJson<Organization>, ApiError> {
    if !org.is_default() {
        org.owns(id, "organization")?;
    }
    Ok(ApiJson(state.store.get_org(id).await?))
}

async fn update(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<UpdateOrg>,
) -> Result<ApiJson<Organization>, ApiError> {
    org.owns(id, "organization")?;
    let name = body
        .name
        .as_deref()
        .map(validate::name)
        .transpose()
        .map_err(invalid)?;
    let updated = state
        .store
        .update_org(id, name.as_deref(), body.require_second_factor)
        .await?;
    tracing::info!(org_id = %id, require_second_factor = updated.require_second_factor, "organization changed");
    Ok(ApiJson(updated))
}

async fn remove(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    instance_only(org, "delete organizations")?;
    if org.0 == id {
        return Err(invalid("the default organization cannot be deleted".into()));
    }
    state.store.delete_org(id).await?;
    tracing::info!(org_id = %id, "organization deleted");
    Ok(StatusCode::NO_CONTENT)
}
