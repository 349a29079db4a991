//! The REST API under `/api/v1`: one `router()` per resource module, admin auth, JSON extractors
//! whose rejections go through [`ApiError`].

pub mod audit;
pub mod certificates;
pub mod config;
pub mod doc;
pub mod enroll;
pub mod gateways;
pub mod idempotency;
pub mod keys;
pub mod me;
pub mod nodes;
pub mod orgs;
pub mod page;
pub mod passcodes;
pub mod policies;
pub mod providers;
pub mod resources;
pub mod roles;
pub mod share_links;
pub mod sites;
pub mod users;

use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use kakuremichi_proto::{Secret, NODE_WS_PATH};

use crate::{ApiError, AppState};

/// A JSON body; malformed JSON, a wrong content type, unknown fields and oversized bodies become
/// [`ApiError`]s (400 or 413 with a JSON body), never axum's default 422 or plain text.
#[derive(Debug, Clone, Copy, Default, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

impl<T: serde::Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// The organization the caller acts in: its API key's. Everything the API shows or changes is
/// this organization's; another organization's things are "not found".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Org(pub uuid::Uuid);

impl Org {
    /// `Ok` when `owner` is this organization; otherwise the same 404 as a missing `what`.
    pub fn owns(self, owner: uuid::Uuid, what: impl std::fmt::Display) -> Result<(), ApiError> {
        if owner == self.0 {
            Ok(())
        } else {
            Err(ApiError::NotFound(format!("{what} not found")))
        }
    }

    /// Whether this is the default organization (the instance's own).
    pub fn is_default(self) -> bool {
        self.0 == crate::store::DEFAULT_ORG
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Org {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<crate::store::ApiKey>()
            .map(|k| Org(k.org_id))
            .ok_or_else(|| ApiError::Unauthorized("missing API key".into()))
    }
}

/// A path parameter whose rejection is an [`ApiError`].
#[derive(Debug, Clone, Copy, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// Every route under `/api/v1` that needs an API key, and every one open to anyone.
fn routes() -> (doc::ApiRouter<AppState>, doc::ApiRouter<AppState>) {
    let ws_path = NODE_WS_PATH.strip_prefix("/api/v1").unwrap_or(NODE_WS_PATH);
    let authenticated = doc::ApiRouter::new()
        .merge(sites::router())
        .merge(gateways::router())
        .merge(resources::router())
        .merge(policies::router())
        .merge(share_links::router())
        .merge(passcodes::router())
        .merge(certificates::router())
        .merge(config::router())
        .merge(users::router())
        .merge(audit::router())
        .merge(keys::router())
        .merge(me::router())
        .merge(providers::router())
        .merge(roles::router())
        .merge(orgs::router())
        .merge(crate::sessions::router());
    let public = doc::ApiRouter::new()
        .merge(enroll::router())
        .merge(crate::sessions::public_router())
        .route(
            ws_path,
            doc::get(crate::hub::connect)
                .summary("the WebSocket of a gateway or an agent (its node credentials)"),
        )
        .route(
            "/openapi.json",
            doc::get(openapi_json).summary("this API's OpenAPI 3.1 description"),
        )
        .public();
    (authenticated, public)
}

/// The OpenAPI 3.1 document of `/api/v1`, built from [`routes`].
pub fn openapi() -> serde_json::Value {
    let (authenticated, public) = routes();
    let (_, mut docs) = authenticated.into_parts();
    docs.extend(public.into_parts().1);
    doc::openapi(&docs)
}

async fn openapi_json() -> Response {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let body = DOC.get_or_init(|| openapi().to_string());
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.as_str(),
    )
        .into_response()
}

/// The `/api/v1` router. Everything but `/enroll`, `/sessions/health`, `/openapi.json` and
/// `/nodes/connect` needs an API key.
pub fn router(state: AppState) -> Router<AppState> {
    let (authenticated, public) = routes();
    authenticated
        .into_parts()
        .0
        // Inside the key check: replays are per API key.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            idempotency::idempotency,
        ))
        .route_layer(axum::middleware::from_fn_with_state(state, require_admin))
        .merge(public.into_parts().0)
}

/// Every permission a scoped API key may hold: `<thing>:read` for `GET`, `<thing>:write` for the
/// rest, per first path segment.
pub const PERMISSIONS: &[&str] = &[
    "site:read",
    "site:write",
    "gateway:read",
    "gateway:write",
    "resource:read",
    "resource:write",
    "resource:access",
    "certificate:read",
    "certificate:write",
    "user:read",
    "user:write",
    "api_key:read",
    "api_key:write",
    "signing_key:read",
    "signing_key:write",
    "audit:read",
    "config:read",
    "identity_provider:read",
    "identity_provider:write",
    "role:read",
    "role:write",
    "session:create",
    "session:list",
    "session:access",
    "session:delete",
    "org:read",
    "org:write",
];

/// The permission a request under `/api/v1` needs (`path` without the prefix); empty for
/// `/me`, which any user's own key may use.
pub fn permission(method: &axum::http::Method, path: &str) -> String {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    if first == "sessions" {
        let rest = path
            .trim_start_matches('/')
            .strip_prefix("sessions")
            .unwrap_or("");
        return crate::sessions::permission(method, rest).to_owned();
    }
    if first == "me" {
        // One's own account: any user's key may, whatever their roles.
        return String::new();
    }
    let thing = match first {
        "sites" => "site",
        "gateways" => "gateway",
        "resources" | "policies" => "resource",
        "certificates" => "certificate",
        "users" => "user",
        "orgs" => "org",
        "api-keys" => "api_key",
        "signing-keys" => "signing_key",
        "audit" => "audit",
        "config" => "config",
        "identity-providers" => "identity_provider",
        "roles" => "role",
        other => other,
    };
    let verb = if matches!(*method, axum::http::Method::GET | axum::http::Method::HEAD) {
        "read"
    } else {
        "write"
    };
    format!("{thing}:{verb}")
}

/// Whether a key with `scopes` (`None`: all) holds `permission`.
pub fn allows(scopes: Option<&[String]>, permission: &str) -> bool {
    scopes.is_none_or(|s| s.iter().any(|p| p == permission))
}

async fn require_admin(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    // The web UI calls the API in process for its signed-in user (an extension: never sent by
    // a client).
    let web = req.extensions().get::<crate::ui::WebCaller>().copied();
    let (mut found, actor) = match web {
        Some(w) => (
            crate::store::ApiKey {
                id: w.session,
                name: "web session".into(),
                scopes: None,
                org_id: w.org,
                user_id: Some(w.user),
                created_at: crate::store::now_ms(),
                expires_at: None,
                last_used_at: None,
            },
            format!("user:{} web-session:{}", w.user, w.session),
        ),
        None => {
            let found = api_key(&state, req.headers()).await?;
            let actor = match (found.scopes.is_none(), found.user_id) {
                (true, _) => format!("admin-key:{}", found.id),
                (false, Some(user)) => format!("user:{user} api-key:{}", found.id),
                (false, None) => format!("api-key:{}", found.id),
            };
            (found, actor)
        }
    };
    // A personal key holds what both it and its user's roles in its organization give, as of
    // now.
    if let Some(user) = found.user_id {
        let user = match state.store.get_user(user).await {
            Ok(u) if !u.disabled => u,
            Ok(_) | Err(crate::store::StoreError::NotFound(_)) => {
                return Err(ApiError::Unauthorized(
                    "this API key's user is disabled or deleted".into(),
                ))
            }
            Err(e) => return Err(e.into()),
        };
        let Some(roles) = state.store.member_roles(found.org_id, user.id).await? else {
            return Err(ApiError::Unauthorized(
                "this API key's user is no longer a member of its organization".into(),
            ));
        };
        let mine = state.store.permissions_of(found.org_id, &roles).await?;
        found.scopes = Some(match found.scopes.take() {
            None => mine.into_iter().collect(),
            Some(s) => s.into_iter().filter(|p| mine.contains(p)).collect(),
        });
    }
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let needed = permission(&method, &path);
    if !needed.is_empty() && !allows(found.scopes.as_deref(), &needed) {
        tracing::warn!(key_id = %found.id, permission = %needed, "API key lacks a permission");
        return Err(ApiError::Forbidden(format!(
            "this API key does not have the {needed} permission{}",
            if found.user_id.is_some() {
                " (a personal key holds only what its user's roles give)"
            } else {
                ""
            }
        )));
    }
    let client = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    let org = found.org_id;
    req.extensions_mut().insert(found);
    let response = next.run(req).await;
    // Every change through the API is audited, with who made it and how it ended.
    if !matches!(method, axum::http::Method::GET | axum::http::Method::HEAD) {
        state
            .audit(crate::store::AuditEntry {
                at: crate::store::now_ms(),
                actor,
                action: format!("{method} /api/v1{path}"),
                target: None,
                outcome: response.status().as_u16().to_string(),
                client,
                detail: None,
                org_id: Some(org),
            })
            .await;
    }
    Ok(response)
}

/// The API key a request carries, checked.
async fn api_key(
    state: &AppState,
    headers: &axum::http::HeaderMap,
) -> Result<crate::store::ApiKey, ApiError> {
    let key = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| {
            ApiError::Unauthorized(
                "missing API key: send Authorization: Bearer <key> or X-API-Key: <key>".into(),
            )
        })?;
    let key = Secret::new(key);
    let Some(found) = state.store.check_api_key(&key).await? else {
        return Err(ApiError::Unauthorized(
            "invalid, expired or revoked API key".into(),
        ));
    };
    Ok(found)
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Turns a validation message into a 400.
pub(crate) fn invalid(msg: String) -> ApiError {
    ApiError::BadRequest(msg)
}

/// Validates an optional field of a `PATCH` body; `None` stays `None`, a bad value is a 400.
pub(crate) fn valid_opt(
    value: Option<&str>,
    check: impl FnOnce(&str) -> Result<String, String>,
) -> Result<Option<String>, ApiError> {
    value.map(check).transpose().map_err(invalid)
}
