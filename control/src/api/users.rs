//! `/users`: people who sign in to reach protected resources; `/users/{id}/sign-out` ends every
//! session of a user at once; `/signing-keys` shows and rotates the keys that sign their tokens.

use crate::api::doc::ApiRouter;
use crate::api::doc::{get, post};
use axum::extract::State;
use axum::http::StatusCode;
use kakuremichi_proto::Secret;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{invalid, valid_opt, ApiJson, ApiPath, Org};
use crate::store::{NewUser, User, UserPatch};
use crate::{secrets, validate, ApiError, AppState};

/// Body of `POST /users`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    /// E-mail address (lower-cased, unique).
    pub email: String,
    /// Display name; defaults to the e-mail address.
    pub name: Option<String>,
    /// Password (10 to 1024 characters); absent: the user signs in by SSO only.
    pub password: Option<Secret>,
    /// Roles; default `["member"]`.
    pub roles: Option<Vec<String>>,
}

/// Body of `PATCH /users/{id}`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUser {
    /// New name.
    pub name: Option<String>,
    /// New roles (ends the user's sessions: tokens carry roles).
    pub roles: Option<Vec<String>>,
    /// Disable (ends every session at once) or enable.
    pub disabled: Option<bool>,
    /// New password.
    pub password: Option<Secret>,
    /// `true` clears a lockout after wrong passwords.
    #[serde(default)]
    pub unlock: bool,
}

/// A user as the API shows it.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct UserView {
    /// Id.
    pub id: Uuid,
    /// E-mail address.
    pub email: String,
    /// Display name.
    pub name: String,
    /// Roles.
    pub roles: Vec<String>,
    /// Disabled.
    pub disabled: bool,
    /// Locked until (unix ms), after too many wrong passwords.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(serialize_with = "crate::times::opt_ms")]
    #[schemars(with = "Option<crate::times::DateTime>")]
    pub locked_until: Option<i64>,
    /// Whether the user has a password.
    pub has_password: bool,
    /// Whether the user has a TOTP second factor.
    pub has_totp: bool,
    /// Creation time.
    #[serde(serialize_with = "crate::times::ms")]
    #[schemars(with = "crate::times::DateTime")]
    pub created_at: i64,
}

impl From<User> for UserView {
    fn from(u: User) -> Self {
        let now = crate::store::now_ms();
        UserView {
            id: u.id,
            email: u.email,
            name: u.name,
            roles: u.roles,
            disabled: u.disabled,
            locked_until: u.locked_until.filter(|t| *t > now),
            has_password: u.has_password,
            has_totp: u.has_totp,
            created_at: u.created_at,
        }
    }
}

/// A signing key as the API shows it.
#[derive(Debug, Serialize)]
pub struct KeyView {
    /// Key id.
    pub kid: String,
    /// Public key (base64url).
    pub x: String,
    /// Created.
    #[serde(serialize_with = "crate::times::ms")]
    pub created_at: i64,
    /// Retired (unix ms): it verifies tokens until they expire, and signs no more.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(serialize_with = "crate::times::opt_ms")]
    pub retired_at: Option<i64>,
}

/// The users router.
pub fn router() -> ApiRouter<AppState> {
    ApiRouter::new()
        .route(
            "/users",
            get(list)
                .summary("the organization's users")
                .paged()
                .returns::<Vec<UserView>>(200)
                .post(create)
                .body::<CreateUser>()
                .returns::<UserView>(201),
        )
        .route(
            "/users/{id}",
            get(one)
                .returns::<UserView>(200)
                .patch(update)
                .body::<UpdateUser>()
                .returns::<UserView>(200)
                .delete(remove),
        )
        .route("/users/{id}/sign-out", post(sign_out_everywhere))
        .route("/users/{id}/totp", post(add_totp).delete(remove_totp))
        .route("/signing-keys", get(keys))
        .route("/signing-keys/rotate", post(rotate))
}

/// Validated role names, each once, each a role that exists (built in or custom in `org`).
pub(crate) async fn roles(
    state: &AppState,
    org: Org,
    list: Vec<String>,
) -> Result<Vec<String>, ApiError> {
    if list.len() > 64 {
        return Err(invalid("a user has at most 64 roles".into()));
    }
    let mut out = Vec::with_capacity(list.len());
    for r in list {
        let r = validate::role(&r).map_err(|e| invalid(format!("roles: {e}")))?;
        if !state.store.role_exists(org.0, &r).await? {
            return Err(invalid(format!(
                "roles: there is no role {r:?}; see GET /api/v1/roles"
            )));
        }
        if !out.contains(&r) {
            out.push(r);
        }
    }
    Ok(out)
}

async fn hash(password: Option<Secret>) -> Result<Option<String>, ApiError> {
    let Some(p) = password else { return Ok(None) };
    validate::password(p.expose()).map_err(invalid)?;
    secrets::hash_password(&p)
        .await
        .map(Some)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// The member `id` of `org`, whose account only `org` may change (its password, second factor,
/// lockout, name, or whether it is disabled): a user who also belongs to another organization
/// is changed there by no one but themselves.
async fn own_account(state: &AppState, org: Org, id: Uuid) -> Result<User, ApiError> {
    let user = state.store.get_member(org.0, id).await?;
    let elsewhere = state
        .store
        .memberships_of(id)
        .await?
        .iter()
        .any(|(o, _)| o.id != org.0);
    if elsewhere {
        return Err(ApiError::Forbidden(
            "this user also belongs to another organization: only their roles here can change, \
             or their membership be removed"
                .into(),
        ));
    }
    Ok(user)
}

async fn create(
    State(state): State<AppState>,
    org: Org,
    ApiJson(body): ApiJson<CreateUser>,
) -> Result<(StatusCode, ApiJson<UserView>), ApiError> {
    let email = validate::email(&body.email).map_err(invalid)?;
    let name = match body.name.as_deref() {
        Some(n) => validate::name(n).map_err(invalid)?,
        None => email.clone(),
    };
    let roles = roles(
        &state,
        org,
        body.roles.unwrap_or_else(|| vec!["member".into()]),
    )
    .await?;
    let password_hash = hash(body.password).await?;
    let u = state
        .store
        .create_user(
            org.0,
            &NewUser {
                email,
                name,
                password_hash,
                roles,
            },
        )
        .await?;
    tracing::info!(user_id = %u.id, "user created");
    Ok((StatusCode::CREATED, ApiJson(u.into())))
}

async fn list(
    State(state): State<AppState>,
    org: Org,
    paged: super::page::Paged,
) -> Result<axum::response::Response, ApiError> {
    let all = state.store.list_users(org.0).await?;
    let views: Vec<UserView> = all.into_iter().map(Into::into).collect();
    paged.page(views)
}

async fn one(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiJson<UserView>, ApiError> {
    Ok(ApiJson(state.store.get_member(org.0, id).await?.into()))
}

async fn update(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<UpdateUser>,
) -> Result<ApiJson<UserView>, ApiError> {
    let account =
        body.name.is_some() || body.disabled.is_some() || body.password.is_some() || body.unlock;
    if account {
        own_account(&state, org, id).await?;
    }
    let patch = UserPatch {
        name: valid_opt(body.name.as_deref(), validate::name)?,
        roles: match body.roles {
            Some(r) => Some(roles(&state, org, r).await?),
            None => None,
        },
        disabled: body.disabled,
        password_hash: hash(body.password).await?,
        unlock: body.unlock,
    };
    let u = state.store.update_user(org.0, id, &patch).await?;
    tracing::info!(user_id = %u.id, disabled = u.disabled, unlocked = patch.unlock, "user changed");
    Ok(ApiJson(u.into()))
}

async fn remove(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    state.store.delete_user(org.0, id).await?;
    tracing::info!(user_id = %id, "user deleted");
    Ok(StatusCode::NO_CONTENT)
}

async fn sign_out_everywhere(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    state.store.get_member(org.0, id).await?;
    state.store.revoke_user_sessions(id).await?;
    tracing::info!(user_id = %id, "user signed out everywhere");
    Ok(StatusCode::NO_CONTENT)
}

async fn keys(State(state): State<AppState>) -> Result<ApiJson<Vec<KeyView>>, ApiError> {
    let keys = state
        .store
        .published_keys(state.store.session_life_ms())
        .await?;
    Ok(ApiJson(
        keys.into_iter()
            .map(|k| KeyView {
                kid: k.kid,
                x: k.x,
                created_at: k.created_at,
                retired_at: k.retired_at,
            })
            .collect(),
    ))
}

async fn rotate(
    State(state): State<AppState>,
    org: Org,
) -> Result<ApiJson<Vec<KeyView>>, ApiError> {
    if !org.is_default() {
        return Err(ApiError::Forbidden(
            "the signing keys are the instance's: only the default organization rotates them"
                .into(),
        ));
    }
    let kid = state.store.rotate_signing_key().await?;
    tracing::info!(%kid, "signing key rotated");
    keys(State(state)).await
}

/// A new TOTP secret, shown once.
#[derive(Debug, Serialize)]
pub struct TotpView {
    /// The secret, base32 (what authenticator apps take by hand).
    pub secret: String,
    /// The `otpauth://` URL (what a QR code carries).
    pub otpauth_url: String,
}

async fn add_totp(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<(StatusCode, ApiJson<TotpView>), ApiError> {
    use rand::RngCore as _;
    let user = own_account(&state, org, id).await?;
    let mut raw = vec![0u8; 20];
    rand::thread_rng().fill_bytes(&mut raw);
    state.store.set_totp(id, &raw).await?;
    let secret = match totp_rs::Secret::Raw(raw).to_encoded() {
        totp_rs::Secret::Encoded(s) => s,
        totp_rs::Secret::Raw(_) => return Err(ApiError::Internal("cannot encode a secret".into())),
    };
    let label: String =
        url::form_urlencoded::byte_serialize(format!("kakuremichi:{}", user.email).as_bytes())
            .collect();
    tracing::info!(user_id = %id, "TOTP second factor added");
    Ok((
        StatusCode::CREATED,
        ApiJson(TotpView {
            otpauth_url: format!(
                "otpauth://totp/{label}?secret={secret}&issuer=kakuremichi&algorithm=SHA1&digits=6&period=30"
            ),
            secret,
        }),
    ))
}

async fn remove_totp(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    own_account(&state, org, id).await?;
    state.store.clear_totp(id).await?;
    tracing::info!(user_id = %id, "TOTP second factor removed");
    Ok(StatusCode::NO_CONTENT)
}
