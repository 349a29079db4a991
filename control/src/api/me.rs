//! `/me`: what a signed-in user (a personal API key, or the console acting for them) does for
//! themself, whatever their roles: see their account, make and revoke their own API keys in
//! the organization the request acts in, change their password. A key that belongs to no user
//! (the admin key, a service token) has no "me".

use crate::api::doc::ApiRouter;
use crate::api::doc::{delete, get, post};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Extension;
use kakuremichi_proto::Secret;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::keys::CreatedKey;
use super::{invalid, ApiJson, ApiPath, Org};
use crate::store::{now_ms, ApiKey, StoreError, UserPatch};
use crate::{secrets, validate, ApiError, AppState};

/// The caller's account.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Me {
    /// Id.
    pub id: Uuid,
    /// E-mail address.
    pub email: String,
    /// Display name.
    pub name: String,
    /// Roles in the organization the request acts in.
    pub roles: Vec<String>,
    /// What those roles give.
    pub permissions: Vec<String>,
    /// Whether they sign in with a password.
    pub has_password: bool,
    /// Whether they have a TOTP second factor.
    pub has_totp: bool,
}

/// Body of `POST /me/api-keys`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateMyKey {
    /// Display name.
    pub name: String,
    /// Days until it expires (1 to 3650); absent: never.
    pub expires_in_days: Option<u32>,
}

/// Body of `POST /me/password`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePassword {
    /// The password now (absent for a user who has none yet, who signs in by single sign-on).
    pub current_password: Option<Secret>,
    /// The new one (10 to 1024 characters).
    pub new_password: Secret,
}

/// The `/me` router.
pub fn router() -> ApiRouter<AppState> {
    ApiRouter::new()
        .route(
            "/me",
            get(me)
                .summary("the caller's own account (a personal key or a signed-in user)")
                .returns::<Me>(200),
        )
        .route(
            "/me/api-keys",
            get(my_keys)
                .summary("the caller's own API keys in this organization")
                .returns::<Vec<ApiKey>>(200)
                .post(create_my_key)
                .summary(
                    "a personal key: it acts with the caller's roles at each request, never more; \\
                     its secret is shown once",
                )
                .body::<CreateMyKey>()
                .returns::<CreatedKey>(201),
        )
        .route("/me/api-keys/{id}", delete(revoke_my_key))
        .route(
            "/me/password",
            post(change_password)
                .summary("changes the caller's password (the current one first)")
                .body::<ChangePassword>(),
        )
}

/// The user behind the key, or a clear refusal.
fn user_of(key: &ApiKey) -> Result<Uuid, ApiError> {
    key.user_id.ok_or_else(|| {
        ApiError::BadRequest(
            "this key belongs to no user (an admin key or a service token): /me is for a \
             personal key or a signed-in user"
                .into(),
        )
    })
}

async fn me(
    State(state): State<AppState>,
    Extension(key): Extension<ApiKey>,
    org: Org,
) -> Result<ApiJson<Me>, ApiError> {
    let id = user_of(&key)?;
    let user = state.store.get_user(id).await?;
    let roles = state
        .store
        .member_roles(org.0, id)
        .await?
        .unwrap_or_default();
    let permissions = state.store.permissions_of(org.0, &roles).await?;
    Ok(ApiJson(Me {
        id,
        email: user.email,
        name: user.name,
        roles,
        permissions: permissions.into_iter().collect(),
        has_password: user.has_password,
        has_totp: user.has_totp,
    }))
}

async fn mine(state: &AppState, org: Org, user: Uuid) -> Result<Vec<ApiKey>, ApiError> {
    Ok(state
        .store
        .list_api_keys(org.0)
        .await?
        .into_iter()
        .filter(|k| k.user_id == Some(user))
        .collect())
}

async fn my_keys(
    State(state): State<AppState>,
    Extension(key): Extension<ApiKey>,
    org: Org,
) -> Result<ApiJson<Vec<ApiKey>>, ApiError> {
    Ok(ApiJson(mine(&state, org, user_of(&key)?).await?))
}

/// Keys a user may hold in one organization at most.
pub const MAX_MY_KEYS: usize = 50;

async fn create_my_key(
    State(state): State<AppState>,
    Extension(key): Extension<ApiKey>,
    org: Org,
    ApiJson(body): ApiJson<CreateMyKey>,
) -> Result<(StatusCode, ApiJson<CreatedKey>), ApiError> {
    let user = user_of(&key)?;
    let name = validate::name(&body.name).map_err(invalid)?;
    if mine(&state, org, user).await?.len() >= MAX_MY_KEYS {
        return Err(ApiError::Conflict(format!(
            "you hold {MAX_MY_KEYS} keys here already: revoke one first"
        )));
    }
    let expires_at = match body.expires_in_days {
        None => None,
        Some(d) if (1..=3650).contains(&d) => Some(now_ms() + i64::from(d) * 86_400_000),
        Some(_) => return Err(invalid("expires_in_days must be from 1 to 3650".into())),
    };
    // What the user's roles give now; each request is still checked against their roles then.
    let roles = state
        .store
        .member_roles(org.0, user)
        .await?
        .unwrap_or_default();
    let scopes: Vec<String> = state
        .store
        .permissions_of(org.0, &roles)
        .await?
        .into_iter()
        .collect();
    let (key, secret) = state
        .store
        .create_api_key(org.0, &name, &scopes, expires_at, Some(user))
        .await?;
    tracing::info!(key_id = %key.id, user_id = %user, "personal API key created");
    Ok((StatusCode::CREATED, ApiJson(CreatedKey { key, secret })))
}

async fn revoke_my_key(
    State(state): State<AppState>,
    Extension(key): Extension<ApiKey>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let user = user_of(&key)?;
    if !mine(&state, org, user).await?.iter().any(|k| k.id == id) {
        return Err(ApiError::NotFound("API key not found".into()));
    }
    state.store.revoke_api_key(org.0, id).await?;
    tracing::info!(key_id = %id, user_id = %user, "personal API key revoked by its user");
    Ok(StatusCode::NO_CONTENT)
}

async fn change_password(
    State(state): State<AppState>,
    Extension(key): Extension<ApiKey>,
    org: Org,
    ApiJson(body): ApiJson<ChangePassword>,
) -> Result<StatusCode, ApiError> {
    let user = user_of(&key)?;
    let found = state.store.get_user(user).await?;
    let (_, hash) = state
        .store
        .user_by_email(&found.email)
        .await?
        .ok_or(StoreError::NotFound("user"))?;
    if let Some(hash) = hash {
        let Some(current) = body.current_password else {
            return Err(invalid(
                "current_password: give the password you have now".into(),
            ));
        };
        if !secrets::verify_argon2(&hash, &current).await {
            // Wrong guesses count toward the lockout, as at sign-in.
            state
                .store
                .record_failed_sign_in(
                    user,
                    crate::identity::LOCKOUT_AFTER,
                    crate::identity::LOCKOUT_FOR.as_millis() as i64,
                )
                .await?;
            tracing::warn!(user_id = %user, "password change refused: wrong current password");
            return Err(ApiError::Forbidden(
                "current_password: that is not your password".into(),
            ));
        }
    }
    validate::password(body.new_password.expose())
        .map_err(|e| invalid(format!("new_password: {e}")))?;
    let hashed = secrets::hash_password(&body.new_password)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    state
        .store
        .update_user(
            org.0,
            user,
            &UserPatch {
                password_hash: Some(hashed),
                ..UserPatch::default()
            },
        )
        .await?;
    tracing::info!(user_id = %user, "password changed by its user");
    Ok(StatusCode::NO_CONTENT)
}
