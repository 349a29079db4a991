//! The admin web UI under `/ui`: pages rendered on the server from minijinja templates embedded
//! from `web/templates`, one stylesheet and one small script (no inline script or style: the
//! pages' CSP forbids both), and Server-Sent Events for what changes live (who is online).
//!
//! Every page reads and changes through the REST API, called in process as the signed-in user
//! in the organization they chose ([`WebCaller`]): what a page may do is what the user's roles
//! give, validation and audit are the API's own, and the UI cannot drift from the API.

mod account;
mod certificates;
mod gateways;
mod keys;
mod mcp;
mod pages;
mod people;
mod policies;
mod resource_form;
mod roles;
mod sessions;
mod share;

use std::collections::BTreeSet;
use std::sync::LazyLock;

use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, LOCATION, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::auth::{cookie_value, csrf_token, current_session, NEXT_COOKIE};
use crate::AppState;

/// The cookie holding the organization chosen in the switcher.
const ORG_COOKIE: &str = "kakuremichi_org";

/// The UI's Content-Security-Policy: scripts and styles only from control's own files.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
    base-uri 'none'";

const CSS: &str = include_str!("../../../web/app.css");
const JS: &str = include_str!("../../../web/app.js");
const ICON: &str = include_str!("../../../web/icon.svg");

static TEMPLATES: LazyLock<minijinja::Environment<'static>> = LazyLock::new(|| {
    let mut env = minijinja::Environment::new();
    env.add_filter("when", when);
    // HTML-escape text as the rest of control does (minijinja's own escapes `/` too, which
    // only makes paths and commands longer).
    env.set_formatter(|out, state, value| match value.as_str() {
        Some(s) if !value.is_safe() && state.auto_escape() == minijinja::AutoEscape::Html => out
            .write_str(&crate::auth::escape(s))
            .map_err(|e| minijinja::Error::new(minijinja::ErrorKind::WriteFailure, e.to_string())),
        _ => minijinja::escape_formatter(out, state, value),
    });
    for (name, source) in [
        (
            "layout.html",
            include_str!("../../../web/templates/layout.html"),
        ),
        (
            "dashboard.html",
            include_str!("../../../web/templates/dashboard.html"),
        ),
        (
            "nodes.html",
            include_str!("../../../web/templates/nodes.html"),
        ),
        (
            "site.html",
            include_str!("../../../web/templates/site.html"),
        ),
        (
            "resources.html",
            include_str!("../../../web/templates/resources.html"),
        ),
        (
            "resource.html",
            include_str!("../../../web/templates/resource.html"),
        ),
        (
            "resource_new.html",
            include_str!("../../../web/templates/resource_new.html"),
        ),
        (
            "audit.html",
            include_str!("../../../web/templates/audit.html"),
        ),
        (
            "users.html",
            include_str!("../../../web/templates/users.html"),
        ),
        (
            "providers.html",
            include_str!("../../../web/templates/providers.html"),
        ),
        (
            "keys.html",
            include_str!("../../../web/templates/keys.html"),
        ),
        (
            "policies.html",
            include_str!("../../../web/templates/policies.html"),
        ),
        (
            "policy.html",
            include_str!("../../../web/templates/policy.html"),
        ),
        (
            "roles.html",
            include_str!("../../../web/templates/roles.html"),
        ),
        (
            "sessions.html",
            include_str!("../../../web/templates/sessions.html"),
        ),
        (
            "certificates.html",
            include_str!("../../../web/templates/certificates.html"),
        ),
        ("mcp.html", include_str!("../../../web/templates/mcp.html")),
        (
            "account.html",
            include_str!("../../../web/templates/account.html"),
        ),
        (
            "gateway.html",
            include_str!("../../../web/templates/gateway.html"),
        ),
        (
            "confirm.html",
            include_str!("../../../web/templates/confirm.html"),
        ),
        (
            "message.html",
            include_str!("../../../web/templates/message.html"),
        ),
    ] {
        if let Err(e) = env.add_template(name, source) {
            // Templates are part of the binary; a broken one is a build mistake the tests catch.
            tracing::error!(template = name, error = %e, "a UI template does not parse");
            #[cfg(test)]
            panic!("{name}: {e:#}");
        }
    }
    env
});

/// A time as the API writes it (`2026-05-02T12:00:00.000Z`) for people: `2026-05-02 12:00:00
/// UTC`; `-` for none.
fn when(v: minijinja::Value) -> String {
    match v.as_str() {
        Some(t) if t.len() >= 19 => format!("{} {} UTC", &t[..10], &t[11..19]),
        Some(t) => t.to_owned(),
        None => "-".to_owned(),
    }
}

/// The router of `/ui`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/ui", get(pages::dashboard))
        .route("/ui/events", get(pages::events))
        .route("/ui/org", post(pages::switch_org))
        .route("/ui/sites", get(pages::sites).post(pages::create_site))
        .route("/ui/sites/{id}", get(pages::site))
        .route("/ui/sites/{id}/token", post(pages::site_token))
        .route(
            "/ui/sites/{id}/delete",
            get(pages::confirm_delete_site).post(pages::delete_site),
        )
        .route("/ui/gateways", get(pages::gateways).post(gateways::create))
        .route("/ui/gateways/{id}", get(gateways::gateway))
        .route("/ui/gateways/{id}/token", post(gateways::token))
        .route(
            "/ui/gateways/{id}/revoke",
            get(gateways::confirm_revoke_gateway).post(gateways::revoke_gateway),
        )
        .route(
            "/ui/sites/{id}/revoke",
            get(gateways::confirm_revoke_site).post(gateways::revoke_site),
        )
        .route(
            "/ui/gateways/{id}/delete",
            get(gateways::confirm_delete).post(gateways::delete),
        )
        .route(
            "/ui/resources",
            get(pages::resources).post(resource_form::create_resource),
        )
        .route("/ui/resources/new", get(resource_form::new_resource))
        .route("/ui/resources/{id}", get(pages::resource))
        .route(
            "/ui/resources/{id}/delete",
            get(pages::confirm_delete_resource).post(pages::delete_resource),
        )
        .route("/ui/audit", get(pages::audit))
        .route("/ui/users", get(people::users).post(people::create_user))
        .route("/ui/users/{id}/state", post(people::user_state))
        .route("/ui/resources/{id}/access", post(people::resource_access))
        .route("/ui/resources/{id}/share-links", post(share::create))
        .route(
            "/ui/resources/{id}/share-links/{link}/revoke",
            get(share::confirm_revoke).post(share::revoke),
        )
        .route(
            "/ui/providers",
            get(people::providers).post(people::create_provider),
        )
        .route(
            "/ui/providers/{id}/delete",
            get(people::confirm_delete_provider).post(people::delete_provider),
        )
        .route("/ui/keys", get(keys::keys).post(keys::create_key))
        .route(
            "/ui/keys/{id}/revoke",
            get(keys::confirm_revoke_key).post(keys::revoke_key),
        )
        .route(
            "/ui/policies",
            get(policies::policies).post(policies::create_policy),
        )
        .route(
            "/ui/policies/{id}",
            get(policies::policy).post(policies::update_policy),
        )
        .route(
            "/ui/policies/{id}/delete",
            get(policies::confirm_delete_policy).post(policies::delete_policy),
        )
        .route("/ui/roles", get(roles::roles).post(roles::create_role))
        .route(
            "/ui/roles/{name}",
            get(roles::role).post(roles::update_role),
        )
        .route(
            "/ui/roles/{name}/delete",
            get(roles::confirm_delete_role).post(roles::delete_role),
        )
        .route(
            "/ui/certificates",
            get(certificates::certificates).post(certificates::create),
        )
        .route("/ui/certificates/{id}/renew", post(certificates::renew))
        .route(
            "/ui/certificates/{id}/delete",
            get(certificates::confirm_delete).post(certificates::delete),
        )
        .route("/ui/account", get(account::account))
        .route("/ui/account/password", post(account::password))
        .route("/ui/account/keys", post(account::create_key))
        .route(
            "/ui/account/keys/{id}/revoke",
            get(account::confirm_revoke_key).post(account::revoke_key),
        )
        .route("/ui/mcp", get(mcp::mcp))
        .route(
            "/ui/mcp/grants/{id}/revoke",
            get(mcp::confirm_revoke).post(mcp::revoke),
        )
        .route("/ui/sessions", get(sessions::sessions))
        .route("/ui/sessions/events", get(sessions::events))
        .route("/ui/sessions/{id}/share", post(sessions::share))
        .route(
            "/ui/sessions/{id}/stop",
            get(sessions::confirm_stop).post(sessions::stop),
        )
        .layer(axum::middleware::from_fn(headers))
        .route("/ui/app.css", get(css))
        .route("/ui/app.js", get(js))
        .route("/ui/icon.svg", get(icon))
        .route("/favicon.ico", get(icon))
}

/// `/`: the UI.
pub(crate) async fn index() -> Response {
    redirect("/ui")
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", CSS)
}

async fn js() -> Response {
    asset("text/javascript; charset=utf-8", JS)
}

async fn icon() -> Response {
    asset("image/svg+xml", ICON)
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (CONTENT_TYPE, kind),
            (CACHE_CONTROL, "public, max-age=300"),
            (axum::http::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// Security headers on every page: the CSP, no caching, no sniffing, no framing.
async fn headers(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        axum::http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        axum::http::header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    r
}

/// The identity the UI's in-process API calls carry: a signed-in user's session in an
/// organization. Only the UI inserts it (an extension, never read from the wire).
#[derive(Debug, Clone, Copy)]
pub struct WebCaller {
    /// The user.
    pub user: Uuid,
    /// The web session.
    pub session: Uuid,
    /// The organization acted in.
    pub org: Uuid,
}

/// An organization the user belongs to.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct OrgChoice {
    id: Uuid,
    name: String,
    current: bool,
}

/// The signed-in user of a page, in the organization they chose, with what their roles give.
#[derive(Debug)]
pub(crate) struct Caller {
    pub web: WebCaller,
    pub email: String,
    pub orgs: Vec<OrgChoice>,
    pub permissions: BTreeSet<String>,
    pub csrf: String,
    pub set_csrf: Option<HeaderValue>,
    /// The request's headers (Host names control in install commands).
    pub headers: HeaderMap,
    pub peer: Option<axum::extract::ConnectInfo<std::net::SocketAddr>>,
}

impl Caller {
    /// Whether the user's roles give `permission` here.
    pub fn may(&self, permission: &str) -> bool {
        self.permissions.contains(permission)
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Response> {
        let headers = parts.headers.clone();
        let Some((session, user)) = current_session(state, &headers).await else {
            return Err(sign_in_first(state, parts).await);
        };
        let memberships = match state.store.memberships_of(user.id).await {
            Ok(m) => m,
            Err(e) => return Err(unavailable(&e)),
        };
        let wanted = cookie_value(&headers, ORG_COOKIE).and_then(|v| v.parse::<Uuid>().ok());
        let usable: Vec<_> = memberships
            .into_iter()
            .filter(|(o, _)| session.org_id.is_none_or(|s| s == o.id))
            .collect();
        let Some(chosen) = wanted
            .and_then(|w| usable.iter().find(|(o, _)| o.id == w))
            .or_else(|| usable.first())
            .map(|(o, roles)| (o.id, roles.clone()))
        else {
            return Err(message(
                StatusCode::FORBIDDEN,
                "No organization",
                "You are signed in, but you belong to no organization here. Ask an owner to add you.",
            ));
        };
        let permissions = match state.store.permissions_of(chosen.0, &chosen.1).await {
            Ok(p) => p,
            Err(e) => return Err(unavailable(&e)),
        };
        let (csrf, set_csrf) = csrf_token(state, &headers);
        Ok(Caller {
            web: WebCaller {
                user: user.id,
                session: session.id,
                org: chosen.0,
            },
            email: user.email,
            orgs: usable
                .iter()
                .map(|(o, _)| OrgChoice {
                    id: o.id,
                    name: o.name.clone(),
                    current: o.id == chosen.0,
                })
                .collect(),
            permissions,
            csrf,
            set_csrf,
            headers,
            peer: parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .cloned(),
        })
    }
}

/// Where a browser with no session goes: set-up while there is no user, else sign-in, coming
/// back here afterwards.
async fn sign_in_first(state: &AppState, parts: &axum::http::request::Parts) -> Response {
    if matches!(state.store.count_users().await, Ok(0)) {
        return redirect("/setup");
    }
    let back = parts
        .uri
        .path_and_query()
        .map_or("/ui", |p| p.as_str())
        .to_owned();
    let mut r = redirect("/auth/sign-in");
    if parts.method == Method::GET && back.starts_with("/ui") {
        let v: String = url::form_urlencoded::byte_serialize(back.as_bytes()).collect();
        if let Ok(c) = HeaderValue::from_str(&format!(
            "{NEXT_COOKIE}={v}; Path=/; Max-Age=600; HttpOnly; SameSite=Lax{}",
            crate::auth::secure(state)
        )) {
            r.headers_mut().append(SET_COOKIE, c);
        }
    }
    r
}

pub(crate) fn unavailable(e: &dyn std::fmt::Display) -> Response {
    tracing::error!(error = %e, "the web UI cannot read the store");
    message(
        StatusCode::SERVICE_UNAVAILABLE,
        "Try again shortly",
        "Control cannot read its store right now.",
    )
}

/// A 303 to `to`.
pub(crate) fn redirect(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(LOCATION, v);
    }
    r
}

/// A page with a title and one message, outside the signed-in layout.
pub(crate) fn message(status: StatusCode, title: &str, text: &str) -> Response {
    render_page(
        status,
        "message.html",
        minijinja::context! { title, text, bare => true },
    )
}

fn render_page(status: StatusCode, template: &str, ctx: minijinja::Value) -> Response {
    match TEMPLATES.get_template(template).and_then(|t| t.render(ctx)) {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => {
            tracing::error!(template, error = %e, "cannot render a UI page");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Html("<!doctype html><title>Error</title><p>This page cannot be shown.</p>"),
            )
                .into_response()
        }
    }
}

/// One navigation entry.
#[derive(Serialize)]
struct Nav {
    href: &'static str,
    label: &'static str,
    current: bool,
}

/// The navigation: every section the user's roles let them read.
const SECTIONS: [(&str, &str, &str); 13] = [
    ("/ui", "Dashboard", ""),
    ("/ui/sites", "Sites", "site:read"),
    ("/ui/gateways", "Gateways", "gateway:read"),
    ("/ui/resources", "Resources", "resource:read"),
    ("/ui/policies", "Access policies", "resource:read"),
    ("/ui/users", "Users", "user:read"),
    ("/ui/roles", "Roles", "role:read"),
    ("/ui/providers", "Single sign-on", "identity_provider:read"),
    ("/ui/certificates", "Certificates", "certificate:read"),
    ("/ui/mcp", "MCP", "resource:read"),
    ("/ui/sessions", "Agent sessions", "session:list"),
    ("/ui/keys", "API keys", "api_key:read"),
    ("/ui/audit", "Audit log", "audit:read"),
];

/// Renders `template` inside the signed-in layout; `page` is the page's own context.
pub(crate) fn render(
    caller: &Caller,
    status: StatusCode,
    section: &str,
    template: &str,
    title: &str,
    page: minijinja::Value,
) -> Response {
    let nav: Vec<Nav> = SECTIONS
        .iter()
        .filter(|(_, _, p)| p.is_empty() || caller.may(p))
        .map(|(href, label, _)| Nav {
            href,
            label,
            current: *href == section,
        })
        .collect();
    let ctx = minijinja::context! {
        title,
        nav,
        email => &caller.email,
        orgs => &caller.orgs,
        csrf => &caller.csrf,
        ..page
    };
    let mut r = render_page(status, template, ctx);
    if let Some(c) = caller.set_csrf.clone() {
        r.headers_mut().append(SET_COOKIE, c);
    }
    r
}

/// An answer of the API.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Answer {
    /// The error message of a failed call.
    pub fn error(&self) -> String {
        self.body
            .pointer("/error/message")
            .and_then(Value::as_str)
            .map_or_else(
                || format!("control answered {}", self.status),
                str::to_owned,
            )
    }

    /// The `rel="next"` cursor of a list.
    pub fn next_cursor(&self) -> Option<String> {
        let link = self.headers.get("link")?.to_str().ok()?;
        let url = link.split(';').next()?.trim().trim_matches(['<', '>']);
        url::Url::parse(&format!("http://x{url}"))
            .ok()?
            .query_pairs()
            .find(|(k, _)| k == "cursor")
            .map(|(_, v)| v.into_owned())
    }

    /// `X-Total-Count`.
    pub fn total(&self) -> Option<u64> {
        self.headers
            .get("x-total-count")?
            .to_str()
            .ok()?
            .parse()
            .ok()
    }
}

/// Calls `/api/v1{path}` in process as the caller.
pub(crate) async fn api(
    state: &AppState,
    caller: &Caller,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Answer {
    let res = match api_response(state, caller, method, path, body).await {
        Ok(r) => r,
        Err(a) => return a,
    };
    let (parts, body) = res.into_parts();
    let bytes = match axum::body::to_bytes(body, crate::MAX_BODY_BYTES * 64).await {
        Ok(b) => b,
        Err(_) => return failed("cannot read the answer"),
    };
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        },
    }
}

/// Calls `/api/v1{path}` in process as the caller; the answer as it comes (a stream stays one).
pub(crate) async fn api_response(
    state: &AppState,
    caller: &Caller,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<Response, Answer> {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("/api/v1{path}"));
    if let Some(host) = caller.headers.get(axum::http::header::HOST) {
        req = req.header(axum::http::header::HOST, host);
    }
    if let Some(proto) = caller.headers.get("x-forwarded-proto") {
        req = req.header("x-forwarded-proto", proto);
    }
    let body = match body {
        Some(b) => {
            req = req.header(CONTENT_TYPE, "application/json");
            Body::from(b.to_string())
        }
        None => Body::empty(),
    };
    let Ok(mut req) = req.body(body) else {
        return Err(failed("cannot build the request"));
    };
    req.extensions_mut().insert(caller.web);
    if let Some(peer) = caller.peer {
        req.extensions_mut().insert(peer);
    }
    let app = Router::new()
        .nest("/api/v1", crate::api::router(state.clone()))
        .fallback(crate::api::not_found)
        .with_state(state.clone());
    match tower::ServiceExt::oneshot(app, req).await {
        Ok(r) => Ok(r),
        Err(e) => match e {},
    }
}

fn failed(why: &str) -> Answer {
    Answer {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        headers: HeaderMap::new(),
        body: serde_json::json!({ "error": { "message": why } }),
    }
}

/// The page for an API answer that is not a success the page expected.
pub(crate) fn api_failure(caller: &Caller, section: &str, a: &Answer) -> Response {
    let status = if a.status.is_success() {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        a.status
    };
    let title = match status {
        StatusCode::NOT_FOUND => "Not found",
        StatusCode::FORBIDDEN => "Not allowed",
        _ => "Something went wrong",
    };
    render(
        caller,
        status,
        section,
        "message.html",
        title,
        minijinja::context! { text => a.error() },
    )
}

/// The refusal of a posted form without this browser's CSRF token (`None`: it has it).
pub(crate) fn csrf_refusal(headers: &HeaderMap, sent: &str) -> Option<Response> {
    if crate::auth::csrf_ok(headers, sent) {
        None
    } else {
        Some(message(
            StatusCode::FORBIDDEN,
            "This form expired",
            "The form was sent without this browser's security token (CSRF). Go back, reload the page and send it again.",
        ))
    }
}

/// A posted form that carries this browser's CSRF token (else the request is refused with
/// the page that says so); its fields.
pub(crate) struct Posted(pub Fields);

impl<S: Send + Sync> axum::extract::FromRequest<S> for Posted {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let headers = req.headers().clone();
        let body = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let form = Fields::parse(&body);
        match csrf_refusal(&headers, form.one("csrf")) {
            Some(r) => Err(r),
            None => Ok(Posted(form)),
        }
    }
}

/// Carries out a form's action through the API: a redirect to `then` when it worked, else the
/// page saying why (in `section`).
pub(crate) async fn act(
    state: &AppState,
    caller: &Caller,
    (method, path, body): (Method, &str, Option<Value>),
    section: &str,
    then: &str,
) -> Response {
    let a = api(state, caller, method, path, body).await;
    if a.status.is_success() {
        redirect(then)
    } else {
        api_failure(caller, section, &a)
    }
}

/// A handler for the confirmed form of a deletion (or revocation): `DELETE /api/v1<api>/<id>`
/// as the signed-in user, then back to `back` (or the page saying why not).
macro_rules! confirmed_delete {
    ($(#[$doc:meta])* $name:ident, $api:literal, $back:literal) => {
        $(#[$doc])*
        pub(crate) async fn $name(
            axum::extract::State(state): super::St,
            caller: super::Caller,
            axum::extract::Path(id): axum::extract::Path<uuid::Uuid>,
            _: super::Posted,
        ) -> axum::response::Response {
            let path = format!(concat!($api, "/{}"), id);
            super::act(
                &state,
                &caller,
                (axum::http::Method::DELETE, &path, None),
                $back,
                $back,
            )
            .await
        }
    };
}
pub(crate) use confirmed_delete;

/// A posted form's fields in order, repeated ones kept.
pub(crate) struct Fields(pub Vec<(String, String)>);

impl Fields {
    pub fn parse(body: &[u8]) -> Self {
        Fields(
            url::form_urlencoded::parse(body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    pub fn one(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }

    /// Every value of `name` in order, empty ones kept (rows of a table, field by field).
    pub fn each(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    }

    pub fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, v)| k == name && !v.trim().is_empty())
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    }
}

/// The names of the caller's organization's sites by id, from the config snapshot control
/// keeps (not a list of every site per page).
pub(crate) async fn site_names(
    state: &AppState,
    caller: &Caller,
) -> Result<Vec<(String, String)>, crate::store::StoreError> {
    Ok(state
        .world()
        .await?
        .sites
        .iter()
        .filter(|s| s.org_id == caller.web.org)
        .map(|s| (s.id.to_string(), s.name.clone()))
        .collect())
}

/// The organization's roles (a `/roles` answer) as checkboxes: name, description, and whether
/// `chosen` holds it.
pub(crate) fn role_choices(roles: &Value, chosen: &[String]) -> Vec<Value> {
    roles
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|r| {
            let name = r.get("name")?.as_str()?;
            Some(serde_json::json!({
                "name": name,
                "description": r.get("description").cloned().unwrap_or(Value::Null),
                "checked": chosen.iter().any(|c| c == name),
            }))
        })
        .collect()
}

/// The `State` extractor, re-exported for the pages.
pub(crate) type St = State<AppState>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_parses_and_the_layout_renders_bare() {
        for name in TEMPLATES
            .templates()
            .map(|(n, _)| n.to_owned())
            .collect::<Vec<_>>()
        {
            assert!(TEMPLATES.get_template(&name).is_ok(), "{name}");
            // A page's markup outside its blocks would land above the layout.
            let source = TEMPLATES.get_template(&name).unwrap().source().to_owned();
            assert!(
                name == "layout.html" || source.starts_with("{% extends \"layout.html\" %}"),
                "{name} does not start with the layout"
            );
            if name != "layout.html" {
                let outside = source
                    .split("{% block content %}")
                    .next()
                    .unwrap_or("")
                    .trim_start_matches("{% extends \"layout.html\" %}")
                    .trim();
                assert!(
                    outside.is_empty(),
                    "{name}: {outside:?} lies outside its block"
                );
            }
        }
        assert_eq!(
            TEMPLATES.templates().count(),
            21,
            "a template failed to parse"
        );
        let r = message(StatusCode::OK, "T", "<b>x</b>");
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[test]
    fn times_read_as_utc_and_none_as_a_dash() {
        assert_eq!(
            when(minijinja::Value::from("2026-05-02T12:00:00.000Z")),
            "2026-05-02 12:00:00 UTC"
        );
        assert_eq!(when(minijinja::Value::from(())), "-");
    }
}
