//! Control as the OAuth 2.1 authorization server of MCP servers published as resources (any HTTP
//! resource whose policy says `mcp: true`), per the MCP authorization specification (revision
//! 2025-11-25):
//!
//! - RFC 8414 metadata at `/.well-known/oauth-authorization-server`;
//! - dynamic client registration (RFC 7591) at `/oauth/register`, public clients only, and client
//!   ID metadata documents (an `https` URL as `client_id`, fetched by [`crate::client_metadata`]);
//! - `/oauth/authorize`: the signed-in user (sign-in first, then back here) consents for one
//!   resource (RFC 8707 `resource`, the MCP server's URL); PKCE S256 only; redirect URIs match the
//!   registered ones exactly, a loopback one on any port (RFC 8252 §7.3); the answer carries `iss`
//!   (RFC 9207);
//! - `/oauth/token`: the code once (a replay revokes what it issued), the PKCE verifier, the same
//!   redirect URI and resource; access tokens are EdDSA JWTs (`typ` `at+jwt`) whose audience is the
//!   resource, signed with the session-token keys gateways already hold, so a gateway checks them
//!   locally; refresh tokens rotate on every use, and a reused one revokes the grant.
//!
//! Errors before a redirect URI is known good are pages, never redirects; after, they go back to
//! the client as `error=` (RFC 6749 §4.1.2.1). The token endpoint answers JSON errors.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::header::{CACHE_CONTROL, LOCATION, PRAGMA};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::Engine as _;
use kakuremichi_proto::identity::SessionClaims;
use kakuremichi_proto::Secret;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use uuid::Uuid;

use crate::auth::{
    csrf_ok, csrf_token, current_session, error_page, escape, page, roles_for, NEXT_COOKIE,
};
use crate::client_metadata;
use crate::identity::mint_as;
use crate::store::{now_ms, GrantRefusal, OAuthClient, OAuthCode, OAuthGrant, Resource};
use crate::{secrets, AppState};

/// How long an access token lives, in seconds.
pub const ACCESS_TOKEN_LIFE_SECS: i64 = 3600;
/// How long a refresh token lives.
pub const REFRESH_TOKEN_LIFE_MS: i64 = 30 * 86_400_000;
/// How long a code lives.
pub const CODE_LIFE_MS: i64 = 60_000;
/// The scope MCP servers' tokens carry when the client asks for none.
pub const DEFAULT_SCOPE: &str = "mcp";
/// What an access token says in `amr`.
pub const OAUTH_AMR: &str = "oauth";
/// Redirect URIs a client may register at most.
pub const MAX_REDIRECT_URIS: usize = 10;

/// The claims of an access token: a session token's (with `scope`), and the client (RFC 9068).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessClaims {
    /// Issuer, user, audience (the resource URL), times, grant (`sid`), identity, `amr`, scope.
    #[serde(flatten)]
    pub base: SessionClaims,
    /// The client.
    pub client_id: String,
}

/// The authorization server routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/.well-known/oauth-authorization-server", get(metadata))
        .route("/oauth/register", post(register))
        .route(
            "/oauth/authorize",
            get(authorize_page).post(authorize_decide),
        )
        .route("/oauth/token", post(token))
}

/// Whether a PKCE verifier (RFC 7636 §4.1: 43 to 128 unreserved characters) hashes to the S256
/// `challenge`.
pub fn pkce_matches(verifier: &str, challenge: &str) -> bool {
    let shaped = (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
    let hashed = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(Sha256::digest(verifier.as_bytes()));
    shaped && bool::from(hashed.as_bytes().ct_eq(challenge.as_bytes()))
}

fn loopback(u: &url::Url) -> bool {
    u.scheme() == "http"
        && match u.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(d)) => d == "localhost",
            None => false,
        }
}

/// Whether a redirect URI may be registered: an absolute `https` URL, or `http` on a loopback
/// host, without a fragment or user info.
pub fn check_redirect_uri(uri: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("redirect URI {uri:?} {why}"));
    let Ok(u) = url::Url::parse(uri) else {
        return bad("is not an absolute URL");
    };
    if u.fragment().is_some() || !u.username().is_empty() || u.password().is_some() {
        return bad("has a fragment or user info");
    }
    if uri.len() > 2000 {
        return bad("is longer than 2000 characters");
    }
    if u.scheme() == "https" || loopback(&u) {
        return Ok(());
    }
    bad("must use https, or http on a loopback address (127.0.0.1, [::1], localhost)")
}

/// Whether `given` is one of `registered`: exactly, or a loopback one that differs only in its
/// port (RFC 8252 §7.3).
pub fn redirect_matches(registered: &[String], given: &str) -> bool {
    if registered.iter().any(|r| r == given) {
        return true;
    }
    let Ok(g) = url::Url::parse(given) else {
        return false;
    };
    loopback(&g)
        && registered.iter().any(|r| {
            url::Url::parse(r).is_ok_and(|mut r| {
                loopback(&r) && {
                    let _ = r.set_port(g.port());
                    r.as_str() == g.as_str()
                }
            })
        })
}

/// The MCP resource a resource indicator names: an `http(s)` URL without fragment on the
/// hostname of a resource whose policy says `mcp`.
fn mcp_resource<'a>(resources: &'a [Resource], indicator: &str) -> Option<&'a Resource> {
    let u = url::Url::parse(indicator).ok()?;
    if !matches!(u.scheme(), "http" | "https") || u.fragment().is_some() || indicator.len() > 2000 {
        return None;
    }
    let host = u.host_str()?.to_ascii_lowercase();
    resources
        .iter()
        .find(|r| r.hostname == host && r.access.as_ref().is_some_and(|a| a.mcp))
}

fn issuer(state: &AppState) -> &str {
    state.store.public_url()
}

async fn metadata(State(state): State<AppState>) -> Response {
    let iss = issuer(&state);
    let mut r = Json(json!({
        "issuer": iss,
        "authorization_endpoint": format!("{iss}/oauth/authorize"),
        "token_endpoint": format!("{iss}/oauth/token"),
        "registration_endpoint": format!("{iss}/oauth/register"),
        "jwks_uri": format!("{iss}{}", kakuremichi_proto::identity::JWKS_PATH),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["none"],
        "scopes_supported": [DEFAULT_SCOPE],
        "authorization_response_iss_parameter_supported": true,
        "client_id_metadata_document_supported": state.client_metadata.enabled(),
    }))
    .into_response();
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("max-age=300"));
    r
}

/// An OAuth error answer (JSON, RFC 6749 §5.2).
fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let mut r = (
        status,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response();
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Body of `POST /oauth/register` (RFC 7591 §2; other metadata is ignored, as §3.1 allows).
#[derive(Debug, Deserialize)]
struct Registration {
    #[serde(default)]
    redirect_uris: Vec<String>,
    #[serde(default)]
    client_name: Option<String>,
    #[serde(default)]
    grant_types: Option<Vec<String>>,
    #[serde(default)]
    response_types: Option<Vec<String>>,
}

async fn register(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Json<Registration>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let bad = |error: &str, d: String| oauth_error(StatusCode::BAD_REQUEST, error, &d);
    let Json(reg) = match body {
        Ok(b) => b,
        Err(e) => return bad("invalid_client_metadata", e.body_text()),
    };
    if state.take_sign_in(peer.ip()).await.is_err() {
        return oauth_error(
            StatusCode::TOO_MANY_REQUESTS,
            "temporarily_unavailable",
            "too many registrations from this address; try again in a minute",
        );
    }
    if reg.redirect_uris.is_empty() || reg.redirect_uris.len() > MAX_REDIRECT_URIS {
        return bad(
            "invalid_redirect_uri",
            format!("redirect_uris needs 1 to {MAX_REDIRECT_URIS} URIs"),
        );
    }
    for u in &reg.redirect_uris {
        if let Err(e) = check_redirect_uri(u) {
            return bad("invalid_redirect_uri", e);
        }
    }
    if reg.grant_types.as_ref().is_some_and(|g| {
        g.iter()
            .any(|g| g != "authorization_code" && g != "refresh_token")
    }) {
        return bad(
            "invalid_client_metadata",
            "grant_types may hold authorization_code and refresh_token only".into(),
        );
    }
    if reg
        .response_types
        .as_ref()
        .is_some_and(|r| r.iter().any(|r| r != "code"))
    {
        return bad(
            "invalid_client_metadata",
            "response_types may hold code only".into(),
        );
    }
    let name = reg
        .client_name
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .unwrap_or("an MCP client");
    let name: String = name.chars().filter(|c| !c.is_control()).take(100).collect();
    let client = match state
        .store
        .create_oauth_client(&name, &reg.redirect_uris)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot register an OAuth client");
            return oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "registration is unavailable right now",
            );
        }
    };
    tracing::info!(client_id = %client.id, client = %peer.ip(), "OAuth client registered");
    let mut r = (
        StatusCode::CREATED,
        Json(json!({
            "client_id": client.id.to_string(),
            "client_id_issued_at": client.created_at / 1000,
            "client_name": client.name,
            "redirect_uris": client.redirect_uris,
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
        })),
    )
        .into_response();
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The parameters of an authorization request (also the consent form's hidden fields).
#[derive(Debug, Default, Deserialize)]
struct AuthorizeParams {
    #[serde(default)]
    response_type: Option<String>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    redirect_uri: Option<String>,
    #[serde(default)]
    code_challenge: Option<String>,
    #[serde(default)]
    code_challenge_method: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    resource: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    /// Consent form only.
    #[serde(default)]
    csrf: Option<String>,
    /// Consent form only: `allow` or `deny`.
    #[serde(default)]
    decision: Option<String>,
}

/// A checked authorization request.
struct Checked {
    client: OAuthClient,
    redirect_uri: String,
    challenge: String,
    state: Option<String>,
    resource: String,
    org: Uuid,
    host: String,
    scope: String,
}

/// `redirect_uri` with `params` (and `iss`) added to its query.
fn back_to_client(redirect_uri: &str, iss: &str, params: &[(&str, &str)]) -> Response {
    let Ok(mut u) = url::Url::parse(redirect_uri) else {
        return error_page(
            StatusCode::BAD_REQUEST,
            "Authorization failed",
            "the redirect URI is not valid",
        );
    };
    {
        let mut q = u.query_pairs_mut();
        for (k, v) in params {
            q.append_pair(k, v);
        }
        q.append_pair("iss", iss);
    }
    let mut r = StatusCode::FOUND.into_response();
    if let Ok(v) = HeaderValue::from_str(u.as_str()) {
        r.headers_mut().insert(LOCATION, v);
    }
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Checks an authorization request: client and redirect URI first (failures are pages: the
/// browser is never sent to an unchecked URI), then the rest (failures go back to the client).
async fn check_request(state: &AppState, p: &AuthorizeParams) -> Result<Checked, Response> {
    let page_error = |msg: &str| error_page(StatusCode::BAD_REQUEST, "Authorization failed", msg);
    let unavailable = |e: crate::store::StoreError| {
        tracing::error!(error = %e, "cannot read an OAuth client");
        error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Authorization failed",
            "authorization is unavailable right now; try again shortly",
        )
    };
    let client = match p.client_id.as_deref() {
        Some(url) if client_metadata::is_url(url) => {
            // A client ID metadata document: fetched (or cached), checked, and remembered.
            let doc = match state.client_metadata.get(url).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::info!(client_id = %url, error = %e, "OAuth client metadata refused");
                    return Err(page_error(&e.to_string()));
                }
            };
            match state
                .store
                .upsert_metadata_client(&doc.client_id, &doc.client_name, &doc.redirect_uris)
                .await
            {
                Ok(c) => c,
                Err(e) => return Err(unavailable(e)),
            }
        }
        Some(id) => {
            let Ok(id) = Uuid::try_parse(id) else {
                return Err(page_error(
                    "this application is not registered here (client_id)",
                ));
            };
            match state.store.oauth_client(id).await {
                Ok(Some(c)) if c.metadata_url.is_none() => c,
                Ok(_) => {
                    return Err(page_error(
                        "this application is not registered here (client_id)",
                    ))
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
        None => {
            return Err(page_error(
                "the application did not say who it is (client_id)",
            ))
        }
    };
    let redirect_uri = match p.redirect_uri.as_deref() {
        Some(r) if redirect_matches(&client.redirect_uris, r) => r.to_owned(),
        None if client.redirect_uris.len() == 1 => client.redirect_uris[0].clone(),
        _ => {
            return Err(page_error(
                "the application asked to return to an address it did not register \
                 (redirect_uri); nothing was sent to it",
            ))
        }
    };
    let iss = issuer(state).to_owned();
    let st = p.state.clone();
    let fail = |error: &str, description: &str| {
        let mut params = vec![("error", error), ("error_description", description)];
        if let Some(s) = st.as_deref() {
            params.push(("state", s));
        }
        back_to_client(&redirect_uri, &iss, &params)
    };
    if p.response_type.as_deref() != Some("code") {
        return Err(fail(
            "unsupported_response_type",
            "only response_type=code is supported",
        ));
    }
    let challenge = p.code_challenge.clone().unwrap_or_default();
    if p.code_challenge_method.as_deref() != Some("S256")
        || challenge.len() != 43
        || !challenge
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(fail(
            "invalid_request",
            "PKCE is required: code_challenge (43 characters) with code_challenge_method=S256",
        ));
    }
    let world = match state.world().await {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot read resources for an authorization");
            return Err(fail("temporarily_unavailable", "try again shortly"));
        }
    };
    let Some(resource) = p.resource.as_deref() else {
        return Err(fail(
            "invalid_target",
            "resource is required: the URL of the MCP server (RFC 8707)",
        ));
    };
    let Some(r) = mcp_resource(&world.resources, resource) else {
        return Err(fail(
            "invalid_target",
            "resource is not an MCP server published here",
        ));
    };
    let scope = p
        .scope
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_SCOPE);
    if scope.len() > 200
        || scope
            .chars()
            .any(|c| c.is_control() || c == '"' || c == '\\')
    {
        return Err(fail("invalid_scope", "scope is not valid"));
    }
    Ok(Checked {
        client,
        redirect_uri,
        challenge,
        state: p.state.clone(),
        resource: resource.to_owned(),
        org: r.org_id,
        host: r.hostname.clone(),
        scope: scope.to_owned(),
    })
}

/// The signed-in user the request is for, and whether the resource's policy allows them;
/// `Err`: the page to show instead (sign in first, or not allowed).
async fn user_for(
    state: &AppState,
    headers: &HeaderMap,
    c: &Checked,
    raw_query: &str,
) -> Result<(crate::store::Session, crate::store::User, Vec<String>), Response> {
    let Some((session, user)) = current_session(state, headers).await else {
        // Sign in first; the sign-in sends the browser back here.
        let next = format!("/oauth/authorize?{raw_query}");
        let mut r = StatusCode::SEE_OTHER.into_response();
        r.headers_mut()
            .insert(LOCATION, HeaderValue::from_static("/auth/sign-in"));
        let cookie = format!(
            "{NEXT_COOKIE}={}; Path=/; Max-Age=600; HttpOnly; SameSite=Lax{}",
            url::form_urlencoded::byte_serialize(next.as_bytes()).collect::<String>(),
            crate::auth::secure(state)
        );
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            r.headers_mut().append(axum::http::header::SET_COOKIE, v);
        }
        return Err(r);
    };
    let roles = roles_for(state, &session, &user, c.org, &c.host).await?;
    let world = state.world().await.map_err(|e| {
        tracing::error!(error = %e, "cannot read resources for an authorization");
        error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Authorization failed",
            "authorization is unavailable right now; try again shortly",
        )
    })?;
    let allowed = mcp_resource(&world.resources, &c.resource)
        .and_then(|r| r.access.as_ref())
        .is_some_and(|a| a.allows(&user.email, &roles));
    if !allowed {
        return Err(error_page(
            StatusCode::FORBIDDEN,
            "Access denied",
            &format!(
                "{} may not use {}. Ask an administrator for access.",
                user.email, c.resource
            ),
        ));
    }
    Ok((session, user, roles))
}

async fn authorize_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Query(p): Query<AuthorizeParams>,
) -> Response {
    let c = match check_request(&state, &p).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let (_, user, _) = match user_for(&state, &headers, &c, uri.query().unwrap_or("")).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let (csrf, set) = csrf_token(&state, &headers);
    let hidden: String = [
        ("response_type", p.response_type.as_deref()),
        ("client_id", p.client_id.as_deref()),
        ("redirect_uri", Some(c.redirect_uri.as_str())),
        ("code_challenge", p.code_challenge.as_deref()),
        ("code_challenge_method", p.code_challenge_method.as_deref()),
        ("state", p.state.as_deref()),
        ("resource", p.resource.as_deref()),
        ("scope", Some(c.scope.as_str())),
        ("csrf", Some(csrf.as_str())),
    ]
    .iter()
    .filter_map(|(k, v)| {
        v.map(|v| {
            format!(
                "<input type=\"hidden\" name=\"{k}\" value=\"{}\">",
                escape(v)
            )
        })
    })
    .collect();
    let back = url::Url::parse(&c.redirect_uri).ok();
    let back_host = back
        .as_ref()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default();
    // Who vouches for the name: a published document's site, or nobody (it registered itself).
    let vouched = match c.client.metadata_url.as_deref() {
        Some(u) => format!(
            "<p>This application's description is published by <b>{}</b>.</p>",
            escape(
                url::Url::parse(u)
                    .ok()
                    .and_then(|u| u.host_str().map(str::to_owned))
                    .as_deref()
                    .unwrap_or(u)
            )
        ),
        None => "<p>This application registered itself: its name is its own claim.</p>".into(),
    };
    let local = if back.as_ref().is_some_and(loopback) {
        "<p>It returns to a program on this computer (a loopback address): allow it only if you          just started one.</p>"
    } else {
        ""
    };
    let mut r = page(
        StatusCode::OK,
        "Allow access?",
        &format!(
            "<p><b>{}</b> asks to use <b>{}</b> as {} (scope <code>{}</code>).</p>\
             <p>It will get a token for that server only, and returns to <b>{}</b>.</p>\
             {vouched}{local}<form method=\"post\" action=\"/oauth/authorize\">{hidden}\
             <button type=\"submit\" name=\"decision\" value=\"allow\">Allow</button> \
             <button type=\"submit\" name=\"decision\" value=\"deny\">Deny</button></form>",
            escape(&c.client.name),
            escape(&c.resource),
            escape(&user.email),
            escape(&c.scope),
            escape(&back_host),
        ),
    );
    if let Some(v) = set {
        r.headers_mut().append(axum::http::header::SET_COOKIE, v);
    }
    r
}

fn random_secret() -> String {
    use rand::RngCore as _;
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

async fn authorize_decide(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(p): Form<AuthorizeParams>,
) -> Response {
    if !csrf_ok(&headers, p.csrf.as_deref().unwrap_or("")) {
        return error_page(
            StatusCode::FORBIDDEN,
            "Authorization failed",
            "this form expired; start again from the application",
        );
    }
    let c = match check_request(&state, &p).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let (_, user, _) = match user_for(&state, &headers, &c, "").await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let iss = issuer(&state).to_owned();
    let mut params: Vec<(&str, &str)> = Vec::new();
    if let Some(s) = c.state.as_deref() {
        params.push(("state", s));
    }
    if p.decision.as_deref() != Some("allow") {
        tracing::info!(user_id = %user.id, client_id = %c.client.id, "OAuth access denied by the user");
        params.push(("error", "access_denied"));
        params.push(("error_description", "the user denied access"));
        return back_to_client(&c.redirect_uri, &iss, &params);
    }
    let code = random_secret();
    let stored = OAuthCode {
        grant: OAuthGrant {
            grant_id: Uuid::new_v4(),
            client_id: c.client.id,
            user_id: user.id,
            org_id: c.org,
            resource: c.resource.clone(),
            scope: c.scope.clone(),
        },
        redirect_uri: c.redirect_uri.clone(),
        challenge: c.challenge.clone(),
    };
    if let Err(e) = state
        .store
        .create_oauth_code(
            &secrets::digest(&Secret::new(code.clone())),
            &stored,
            now_ms() + CODE_LIFE_MS,
        )
        .await
    {
        tracing::error!(error = %e, "cannot record an authorization code");
        return error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Authorization failed",
            "authorization is unavailable right now; try again shortly",
        );
    }
    tracing::info!(user_id = %user.id, client_id = %c.client.id, resource = %c.resource, client = %peer.ip(), "OAuth access allowed");
    params.push(("code", &code));
    back_to_client(&c.redirect_uri, &iss, &params)
}

/// Body of `POST /oauth/token`.
#[derive(Debug, Default, Deserialize)]
struct TokenForm {
    #[serde(default)]
    grant_type: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    code_verifier: Option<String>,
    #[serde(default)]
    redirect_uri: Option<String>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    resource: Option<String>,
}

async fn token(
    State(state): State<AppState>,
    form: Result<Form<TokenForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let bad = |error: &str, d: &str| oauth_error(StatusCode::BAD_REQUEST, error, d);
    let Ok(Form(f)) = form else {
        return bad(
            "invalid_request",
            "the body must be application/x-www-form-urlencoded",
        );
    };
    let unknown_client = || {
        oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client_id is missing or unknown",
        )
    };
    // A metadata document's URL names the client control remembered at the authorization (no
    // fetch here: the code or refresh token is bound to that client).
    let client = match f.client_id.as_deref() {
        Some(url) if client_metadata::is_url(url) => {
            match state.store.oauth_client_by_url(url).await {
                Ok(Some(c)) => c,
                Ok(None) => return unknown_client(),
                Err(e) => return store_unavailable(e),
            }
        }
        Some(id) => match Uuid::try_parse(id) {
            Ok(id) => match state.store.oauth_client(id).await {
                Ok(Some(c)) if c.metadata_url.is_none() => c,
                Ok(_) => return unknown_client(),
                Err(e) => return store_unavailable(e),
            },
            Err(_) => return unknown_client(),
        },
        None => return unknown_client(),
    };
    let client_id = client.id;
    let now = now_ms();
    let taken = match f.grant_type.as_deref() {
        Some("authorization_code") => {
            let (Some(code), Some(verifier)) = (f.code.as_deref(), f.code_verifier.as_deref())
            else {
                return bad("invalid_request", "code and code_verifier are required");
            };
            match state
                .store
                .take_oauth_code(&secrets::digest(&Secret::new(code)), now)
                .await
            {
                Ok(Ok(c)) => {
                    if c.grant.client_id != client_id {
                        return bad("invalid_grant", "the code was issued to another client");
                    }
                    if f.redirect_uri.as_deref() != Some(c.redirect_uri.as_str()) {
                        return bad(
                            "invalid_grant",
                            "redirect_uri differs from the authorization request's",
                        );
                    }
                    if !pkce_matches(verifier, &c.challenge) {
                        return bad(
                            "invalid_grant",
                            "code_verifier does not match the code_challenge",
                        );
                    }
                    Ok(c.grant)
                }
                Ok(Err(why)) => Err(why),
                Err(e) => return store_unavailable(e),
            }
        }
        Some("refresh_token") => {
            let Some(rt) = f.refresh_token.as_deref() else {
                return bad("invalid_request", "refresh_token is required");
            };
            match state
                .store
                .take_refresh_token(&secrets::digest(&Secret::new(rt)), now)
                .await
            {
                Ok(Ok(g)) if g.client_id != client_id => {
                    return bad("invalid_grant", "the token was issued to another client")
                }
                Ok(Ok(g)) => Ok(g),
                Ok(Err(why)) => Err(why),
                Err(e) => return store_unavailable(e),
            }
        }
        _ => {
            return bad(
                "unsupported_grant_type",
                "grant_type must be authorization_code or refresh_token",
            )
        }
    };
    let grant = match taken {
        Ok(g) => g,
        Err(GrantRefusal::Unknown) => return bad("invalid_grant", "unknown code or token"),
        Err(why) => return bad("invalid_grant", &why.to_string()),
    };
    if f.resource.as_deref().is_some_and(|r| r != grant.resource) {
        return bad("invalid_target", "resource differs from the one authorized");
    }
    issue(&state, &grant, &client.client_id(), now).await
}

fn store_unavailable(e: crate::store::StoreError) -> Response {
    tracing::error!(error = %e, "cannot read a code or refresh token");
    oauth_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "temporarily_unavailable",
        "tokens cannot be issued right now",
    )
}

/// Mints an access token and the next refresh token of `grant`.
async fn issue(state: &AppState, grant: &OAuthGrant, client_id: &str, now: i64) -> Response {
    let unavailable = || {
        oauth_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "tokens cannot be issued right now",
        )
    };
    let user = match state.store.get_user(grant.user_id).await {
        Ok(u) if !u.disabled => u,
        Ok(_) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "the user is disabled",
            )
        }
        Err(crate::store::StoreError::NotFound(_)) => {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "the user is gone")
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read a user for a token");
            return unavailable();
        }
    };
    let roles = match state.store.member_roles(grant.org_id, user.id).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "the user is no longer a member of the resource's organization",
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read roles for a token");
            return unavailable();
        }
    };
    let signer = match state.store.signer().await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the signing key");
            return unavailable();
        }
    };
    let life = ACCESS_TOKEN_LIFE_SECS
        .min(state.store.session_life_ms() / 1000)
        .max(1);
    let claims = AccessClaims {
        base: SessionClaims {
            iss: issuer(state).to_owned(),
            sub: user.id.to_string(),
            aud: grant.resource.clone(),
            iat: now / 1000,
            exp: now / 1000 + life,
            sid: grant.grant_id.to_string(),
            email: user.email.clone(),
            name: user.name.clone(),
            roles,
            nonce: String::new(),
            amr: vec![OAUTH_AMR.to_owned()],
            scope: grant.scope.clone(),
        },
        client_id: client_id.to_owned(),
    };
    let access = match mint_as(&signer, &claims, "at+jwt") {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot sign an access token");
            return unavailable();
        }
    };
    let refresh = random_secret();
    if let Err(e) = state
        .store
        .create_refresh_token(
            &secrets::digest(&Secret::new(refresh.clone())),
            grant,
            now + REFRESH_TOKEN_LIFE_MS,
        )
        .await
    {
        tracing::error!(error = %e, "cannot record a refresh token");
        return unavailable();
    }
    tracing::info!(user_id = %user.id, client_id = %grant.client_id, grant = %grant.grant_id, "OAuth tokens issued");
    let mut r = Json(json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": life,
        "refresh_token": refresh,
        "scope": grant.scope,
    }))
    .into_response();
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.headers_mut()
        .insert(PRAGMA, HeaderValue::from_static("no-cache"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_s256_matches_only_its_verifier() {
        // RFC 7636 appendix B.
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
        assert!(pkce_matches(verifier, challenge));
        assert!(!pkce_matches(&format!("{verifier}x"), challenge));
        assert!(!pkce_matches(
            verifier,
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cN"
        ));
        assert!(!pkce_matches("short", challenge));
        assert!(!pkce_matches(&format!("{}=", &verifier[..43]), challenge));
    }

    #[test]
    fn redirect_uris_match_exactly_or_on_another_loopback_port() {
        let reg = vec![
            "http://127.0.0.1:3000/callback".to_owned(),
            "http://localhost/cb".to_owned(),
            "https://app.example.com/oauth/callback".to_owned(),
        ];
        assert!(redirect_matches(&reg, "http://127.0.0.1:3000/callback"));
        assert!(redirect_matches(&reg, "http://127.0.0.1:49152/callback"));
        assert!(redirect_matches(&reg, "http://localhost:8080/cb"));
        assert!(redirect_matches(
            &reg,
            "https://app.example.com/oauth/callback"
        ));
        for bad in [
            "http://127.0.0.1:3000/callbacks",
            "http://127.0.0.1:3000/Callback",
            "https://app.example.com/oauth/callbacK",
            "https://app.example.com:444/oauth/callback",
            "https://app.example.com/oauth/callback?x=1",
            "http://127.0.0.2:3000/callback",
            "https://evil.example/oauth/callback",
        ] {
            assert!(!redirect_matches(&reg, bad), "{bad}");
        }
        assert!(check_redirect_uri("https://app.example.com/cb").is_ok());
        assert!(check_redirect_uri("http://[::1]:9/cb").is_ok());
        for bad in [
            "http://app.example.com/cb",
            "https://app.example.com/cb#x",
            "https://user@app.example.com/cb",
            "/relative",
            "javascript:alert(1)",
        ] {
            assert!(check_redirect_uri(bad).is_err(), "{bad}");
        }
    }
}
