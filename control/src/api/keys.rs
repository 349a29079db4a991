//! `/api-keys`: API keys scoped to permissions (`resource:read`, `resource:write`, ...), with an
//! expiry and the last time used, shown once, revocable with immediate effect. Accepted by the
//! API as `Authorization: Bearer <key>` or `X-API-Key: <key>`.

use crate::api::doc::ApiRouter;
use crate::api::doc::{delete, get};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Extension;
use kakuremichi_proto::Secret;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{allows, invalid, ApiJson, ApiPath, Org, PERMISSIONS};
use crate::store::{now_ms, ApiKey, StoreError};
use crate::{validate, ApiError, AppState};

/// Body of `POST /api-keys`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// Display name.
    pub name: String,
    /// Permissions (see [`PERMISSIONS`]); at most those of the key that creates it.
    pub scopes: Vec<String>,
    /// Days until it expires (1 to 3650); absent: never.
    pub expires_in_days: Option<u32>,
    /// A personal key for this user (needs `user:write` to name another user than the
    /// caller's own); absent: the caller's user, or an organization service key. A personal key
    /// holds only what its user's roles give, at every request.
    pub user_id: Option<Uuid>,
    /// The organization the key acts in; absent: the caller's. Only a personal key may name
    /// another organization, one its user is a member of (a user reaches each of their
    /// organizations with a key made this way).
    pub org_id: Option<Uuid>,
    /// An organization service key, owned by no user, for machines (CI, webhooks' senders,
    /// other services): it holds its scopes until it expires or is revoked, whoever made it.
    /// Not with `user_id` or `org_id`.
    #[serde(default)]
    pub service: bool,
}

/// A new key: its fields and the secret, shown once.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct CreatedKey {
    /// The key's fields.
    #[serde(flatten)]
    pub key: ApiKey,
    /// The secret: `kmk_<id>_<random>`.
    pub secret: Secret,
}

/// The API keys router.
pub fn router() -> ApiRouter<AppState> {
    ApiRouter::new()
        .route(
            "/api-keys",
            get(list)
                .summary("the organization's keys")
                .paged()
                .returns::<Vec<crate::store::ApiKey>>(200)
                .post(create)
                .summary("a new key; its secret is shown once")
                .body::<CreateKey>()
                .returns::<CreatedKey>(201),
        )
        .route("/api-keys/{id}", delete(revoke))
}

async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<ApiKey>,
    org: Org,
    ApiJson(body): ApiJson<CreateKey>,
) -> Result<(StatusCode, ApiJson<CreatedKey>), ApiError> {
    let name = validate::name(&body.name).map_err(invalid)?;
    if body.scopes.is_empty() {
        return Err(invalid("scopes: give at least one permission".into()));
    }
    if body.service && (body.user_id.is_some() || body.org_id.is_some()) {
        return Err(invalid(
            "service: a service key belongs to the caller's organization and to no user; \
             leave out user_id and org_id"
                .into(),
        ));
    }
    let key_org = body.org_id.unwrap_or(org.0);
    let cross = key_org != org.0;
    let owner = match body.user_id {
        None if body.service => None,
        None => caller.user_id,
        Some(u) if Some(u) == caller.user_id => Some(u),
        Some(u) => {
            if !allows(caller.scopes.as_deref(), "user:write") {
                return Err(ApiError::Forbidden(
                    "a key for another user needs the user:write permission".into(),
                ));
            }
            if !cross {
                state
                    .store
                    .get_member(org.0, u)
                    .await
                    .map_err(|e| match e {
                        StoreError::NotFound(_) => invalid(format!("user_id: no user {u}")),
                        other => other.into(),
                    })?;
            }
            Some(u)
        }
    };
    // A key acting in another organization: only a personal key, for a member there, made by
    // the user themself or by the instance's admins; it may hold what the user's roles there
    // give (and holds no more at each request).
    let limit = if cross {
        let not_yours = || {
            invalid(format!(
                "org_id: a key can act only in its user's own organizations, and {key_org} is \
                 not one"
            ))
        };
        let Some(u) = owner else {
            return Err(not_yours());
        };
        if owner != caller.user_id && !org.is_default() {
            return Err(not_yours());
        }
        let Some(roles) = state.store.member_roles(key_org, u).await? else {
            return Err(not_yours());
        };
        Some(state.store.permissions_of(key_org, &roles).await?)
    } else {
        None
    };
    let mut scopes: Vec<String> = Vec::new();
    for s in body.scopes {
        if !PERMISSIONS.contains(&s.as_str()) {
            return Err(invalid(format!(
                "scopes: {s:?} is not a permission; known: {}",
                PERMISSIONS.join(", ")
            )));
        }
        let held = match &limit {
            Some(perms) => perms.contains(&s),
            None => allows(caller.scopes.as_deref(), &s),
        };
        if !held {
            return Err(ApiError::Forbidden(if cross {
                format!("the user's roles in that organization do not give {s}")
            } else {
                format!("a key cannot give more than it has: this key lacks {s}")
            }));
        }
        if !scopes.contains(&s) {
            scopes.push(s);
        }
    }
    let expires_at = match body.expires_in_days {
        None => None,
        Some(d) if (1..=3650).contains(&d) => Some(now_ms() + i64::from(d) * 86_400_000),
        Some(_) => return Err(invalid("expires_in_days must be from 1 to 3650".into())),
    };
    let (key, secret) = state
        .store
        .create_api_key(key_org, &name, &scopes, expires_at, owner)
        .await?;
    tracing::info!(key_id = %key.id, org_id = %key_org, "API key created");
    Ok((StatusCode::CREATED, ApiJson(CreatedKey { key, secret })))
}

async fn list(
    State(state): State<AppState>,
    org: Org,
    paged: super::page::Paged,
) -> Result<axum::response::Response, ApiError> {
    paged.page(state.store.list_api_keys(org.0).await?)
}

async fn revoke(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let keys = state.store.list_api_keys(org.0).await?;
    let Some(key) = keys.iter().find(|k| k.id == id) else {
        return Err(ApiError::NotFound("API key not found".into()));
    };
    if key.scopes.is_none() && keys.iter().filter(|k| k.scopes.is_none()).count() == 1 {
        return Err(ApiError::Conflict(
            "this is the last admin key: revoking it would lock every admin out".into(),
        ));
    }
    state.store.revoke_api_key(org.0, id).await?;
    tracing::info!(key_id = %id, "API key revoked");
    Ok(StatusCode::NO_CONTENT)
}
