//! Control's sign-in pages (plain server-rendered HTML) and the JWKS.
//!
//! A gateway sends a browser that has no session for a protected hostname here, to
//! `/auth/sign-in?rd=<the URL it asked for>&n=<SHA-256 of the gateway's nonce cookie>`. Once the
//! user has signed in (or already had a session at control), control signs a session token for
//! that hostname, bound to `n`, and sends the browser to the gateway's callback on the resource's
//! own hostname. Forms carry a CSRF token matched against a `SameSite=Strict` cookie.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::header::{CACHE_CONTROL, COOKIE, LOCATION, RETRY_AFTER, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Form, Json, Router};
use base64::Engine as _;
use kakuremichi_proto::identity::{SessionClaims, GATEWAY_AUTH_PREFIX, JWKS_PATH, SHARE_LINK_AMR};
use kakuremichi_proto::Secret;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq as _;

use crate::identity::{cookie, mint, LOCKOUT_AFTER, LOCKOUT_FOR};
use crate::store::{now_ms, AuditEntry, Session, User};
use crate::{secrets, AppState};

/// Control's own session cookie.
pub const CONTROL_COOKIE: &str = "kakuremichi_control";
const CSRF_COOKIE: &str = "kakuremichi_csrf";

/// An argon2id hash of a random password, verified when the e-mail address is unknown so that
/// an unknown address costs as long as a wrong password.
static DUMMY_HASH: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();

async fn dummy_hash() -> &'static str {
    DUMMY_HASH
        .get_or_init(|| async {
            secrets::hash_password(&Secret::new(random_token()))
                .await
                .unwrap_or_default()
        })
        .await
}

/// The sign-in pages and the JWKS.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/auth/sign-in", get(sign_in_page).post(sign_in))
        .route("/auth/sign-in/totp", axum::routing::post(sign_in_totp))
        .route("/auth/sign-out", get(sign_out_page).post(sign_out))
        .route("/setup", get(setup_page).post(setup))
        .route("/account", get(account_page))
        .route(
            "/account/sign-out-everywhere",
            axum::routing::post(sign_out_everywhere),
        )
        .route(JWKS_PATH, get(jwks))
        .route("/auth/share", get(open_share_link))
}

/// `GET /auth/share?t=&rd=&n=`: the gateway sends a browser here with a share link's secret;
/// a live link counts one use and the browser goes back with a session token for the link
/// (`sub` and `sid` = the link's id, `amr: ["share_link"]`, ending when the link expires).
#[derive(Deserialize)]
struct ShareQuery {
    t: Option<String>,
    rd: Option<String>,
    n: Option<String>,
}

async fn open_share_link(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(q): Query<ShareQuery>,
) -> Response {
    let refused = |status: StatusCode, msg: &str| error_page(status, "Share link refused", msg);
    let ret = match check_return(
        &state,
        &ReturnQuery {
            rd: q.rd.clone(),
            n: q.n.clone(),
        },
    )
    .await
    {
        Ok(Some(r)) => r,
        Ok(None) => return refused(StatusCode::BAD_REQUEST, "this share link is incomplete"),
        Err(msg) => return refused(StatusCode::BAD_REQUEST, &msg),
    };
    let Some(t) = q.t.filter(|t| t.len() < 200) else {
        return refused(StatusCode::BAD_REQUEST, "this share link is incomplete");
    };
    let now = now_ms();
    let link = match state
        .store
        .redeem_share_link(&Secret::new(t), &ret.host, now)
        .await
    {
        Ok(Ok(link)) => link,
        Ok(Err(why)) => {
            tracing::warn!(client = %peer.ip(), host = %ret.host, reason = %why, "share link refused");
            audit(
                &state,
                &peer,
                "share_link",
                "anonymous".into(),
                &ret.host,
                "denied",
                Some(&why.to_string()),
            )
            .await;
            return refused(
                StatusCode::FORBIDDEN,
                &format!("{why}. Ask whoever sent it for a new one."),
            );
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot open a share link");
            return refused(
                StatusCode::SERVICE_UNAVAILABLE,
                "share links cannot be opened right now; try again shortly",
            );
        }
    };
    let claims = SessionClaims {
        iss: state.store.public_url().to_owned(),
        sub: link.id.to_string(),
        aud: ret.host.clone(),
        iat: now / 1000,
        exp: link.expires_at.min(now + state.store.session_life_ms()) / 1000,
        sid: link.id.to_string(),
        email: String::new(),
        name: link.name.clone(),
        roles: Vec::new(),
        nonce: ret.nonce.clone(),
        amr: vec![SHARE_LINK_AMR.to_owned()],
        scope: String::new(),
    };
    let token = match sign(&state, &claims, "Share link refused").await {
        Ok(t) => t,
        Err(page) => return page,
    };
    tracing::info!(client = %peer.ip(), share_link = %link.id, host = %ret.host, uses = link.uses, "share link opened");
    audit(
        &state,
        &peer,
        "share_link",
        format!("share-link:{}", link.id),
        &ret.host,
        "ok",
        None,
    )
    .await;
    to_callback(&ret, &token)
}

/// Where to send the browser after sign-in: a protected resource, validated.
pub(crate) struct Return {
    /// `scheme://host[:port]`.
    origin: String,
    /// The resource hostname.
    pub(crate) host: String,
    /// Path and query to return to.
    path: String,
    /// The nonce hash the token is bound to.
    pub(crate) nonce: String,
    /// The organization the resource belongs to.
    pub(crate) org: uuid::Uuid,
    /// The resource.
    pub(crate) resource: uuid::Uuid,
    /// Its access policy.
    pub(crate) access: kakuremichi_proto::identity::AccessPolicy,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct ReturnQuery {
    pub(crate) rd: Option<String>,
    pub(crate) n: Option<String>,
}

#[derive(Deserialize)]
struct SignInForm {
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    rd: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    csrf: String,
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

pub(crate) fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

pub(crate) fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"color-scheme\" content=\"light dark\">\
         <title>{t} - kakuremichi</title><link rel=\"icon\" href=\"/ui/icon.svg\" type=\"image/svg+xml\">\
         <link rel=\"stylesheet\" href=\"/ui/app.css\"></head>\
         <body><main class=\"narrow\" id=\"main\"><h1>{t}</h1>{body}\
         <hr><p><small>kakuremichi</small></p></main></body></html>\n",
        t = escape(title)
    );
    let mut r = (status, Html(html)).into_response();
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.headers_mut().insert(
        "content-security-policy",
        HeaderValue::from_static("default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self'; img-src 'self' data:; form-action 'self' http: https:; frame-ancestors 'none'"),
    );
    r
}

pub(crate) fn error_page(status: StatusCode, title: &str, message: &str) -> Response {
    page(
        status,
        title,
        &format!("<p class=\"error\">{}</p>", escape(message)),
    )
}

pub(crate) fn secure(state: &AppState) -> &'static str {
    if state.store.public_url().starts_with("https://") {
        "; Secure"
    } else {
        ""
    }
}

fn random_token() -> String {
    use rand::RngCore as _;
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// The CSRF token of this browser, and the cookie to set when it has none yet.
pub(crate) fn csrf_token(state: &AppState, headers: &HeaderMap) -> (String, Option<HeaderValue>) {
    if let Some(t) = cookie_value(headers, CSRF_COOKIE).filter(|t| t.len() == 43) {
        return (t.to_owned(), None);
    }
    let t = random_token();
    let c = format!(
        "{CSRF_COOKIE}={t}; Path=/; HttpOnly; SameSite=Strict{}",
        secure(state)
    );
    (t, HeaderValue::from_str(&c).ok())
}

pub(crate) fn csrf_ok(headers: &HeaderMap, sent: &str) -> bool {
    match cookie_value(headers, CSRF_COOKIE) {
        Some(c) if c.len() == 43 => bool::from(c.as_bytes().ct_eq(sent.as_bytes())),
        _ => false,
    }
}

pub(crate) fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|h| cookie(h, name))
}

/// Checks where a browser wants to go back to: an http(s) URL on the hostname of a resource
/// that needs sign-in (never anywhere else: no open redirect), and the nonce hash it carries.
pub(crate) async fn check_return(
    state: &AppState,
    q: &ReturnQuery,
) -> Result<Option<Return>, String> {
    let (Some(rd), Some(n)) = (q.rd.as_deref(), q.n.as_deref()) else {
        if q.rd.is_some() || q.n.is_some() {
            return Err(
                "this sign-in link is incomplete: go back to the site and try again".into(),
            );
        }
        return Ok(None);
    };
    let bad = || "this sign-in link is not valid: go back to the site and try again".to_owned();
    if n.len() != 43
        || !n
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(bad());
    }
    let url = url::Url::parse(rd).map_err(|_| bad())?;
    if !matches!(url.scheme(), "http" | "https") || !url.username().is_empty() {
        return Err(bad());
    }
    let host = url.host_str().ok_or_else(bad)?.to_ascii_lowercase();
    let world = state.world().await.map_err(|e| {
        tracing::error!(error = %e, "cannot read resources for a sign-in");
        "sign-in is unavailable right now; try again shortly".to_owned()
    })?;
    let Some((org, resource, access)) = world.resources.iter().find_map(|r| {
        let a = r.access.as_ref().filter(|_| r.hostname == host)?;
        Some((r.org_id, r.id, a.clone()))
    }) else {
        return Err(format!(
            "{host} is not a site that needs sign-in here: go back to the site and try again"
        ));
    };
    let origin = match url.port() {
        Some(p) => format!("{}://{host}:{p}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    };
    let mut path = url.path().to_owned();
    if path.starts_with(GATEWAY_AUTH_PREFIX) || !path.starts_with('/') || path.starts_with("//") {
        path = "/".into();
    }
    if let Some(q) = url.query() {
        path.push('?');
        path.push_str(q);
    }
    Ok(Some(Return {
        origin,
        host,
        path,
        nonce: n.to_owned(),
        org,
        resource,
        access,
    }))
}

/// Whether the session may be granted a token for `ret`'s organization, and the user's roles
/// there: the user must be a member; a session begun through another organization's own
/// identity provider vouches only for that one; an organization may require a second factor.
pub(crate) async fn roles_for(
    state: &AppState,
    session: &Session,
    user: &User,
    org: uuid::Uuid,
    host: &str,
) -> Result<Vec<String>, Response> {
    let unavailable = |e: crate::store::StoreError| {
        tracing::error!(error = %e, "cannot read an organization for a sign-in");
        error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Sign-in failed",
            "sign-in is unavailable right now; try again shortly",
        )
    };
    let refuse = |why: &str, msg: String| {
        tracing::info!(user_id = %user.id, host = %host, reason = why, "no grant for a resource");
        error_page(StatusCode::FORBIDDEN, "Access denied", &msg)
    };
    let roles = match state.store.member_roles(org, user.id).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            return Err(refuse(
                "not a member",
                format!(
                    "You are signed in as {}, who is not a member of the organization that runs \
                     {}. Ask its administrator for access.",
                    user.email, host
                ),
            ))
        }
        Err(e) => return Err(unavailable(e)),
    };
    if session.org_id.is_some_and(|o| o != org) {
        return Err(refuse(
            "provider of another organization",
            format!(
                "You signed in through another organization's identity provider, which vouches \
                 for you only there. To reach {}, sign out and sign in with your password, a \
                 passkey, or a provider of its organization.",
                host
            ),
        ));
    }
    let org = state.store.get_org(org).await.map_err(unavailable)?;
    let second = session.amr.iter().any(|m| m == "otp" || m == "passkey");
    if org.require_second_factor && !second {
        return Err(refuse(
            "second factor required",
            format!(
                "{} requires a second factor. Sign out, then sign in with a passkey or with \
                 your password and an authenticator code (set them up on your account page).",
                host
            ),
        ));
    }
    Ok(roles)
}

/// The redirect to the gateway's callback with a token for `ret`.
async fn grant(state: &AppState, session: &Session, user: &User, ret: &Return) -> Response {
    let roles = match roles_for(state, session, user, ret.org, &ret.host).await {
        Ok(r) => r,
        Err(page) => return page,
    };
    let now = now_ms() / 1000;
    let claims = SessionClaims {
        iss: state.store.public_url().to_owned(),
        sub: user.id.to_string(),
        aud: ret.host.clone(),
        iat: now,
        exp: session.expires_at / 1000,
        sid: session.id.to_string(),
        email: user.email.clone(),
        name: user.name.clone(),
        roles,
        nonce: ret.nonce.clone(),
        amr: session.amr.clone(),
        scope: String::new(),
    };
    let token = match sign(state, &claims, "Sign-in failed").await {
        Ok(t) => t,
        Err(page) => return page,
    };
    tracing::info!(user_id = %user.id, session_id = %session.id, host = %ret.host, "granted a resource session");
    to_callback(ret, &token)
}

/// A session token for `claims`, signed with the current key; `Err`: a page titled `title`
/// saying control cannot sign now.
pub(crate) async fn sign(
    state: &AppState,
    claims: &SessionClaims,
    title: &str,
) -> Result<String, Response> {
    let unavailable = |what: &str, e: &dyn std::fmt::Display| {
        tracing::error!(error = %e, "cannot {what}");
        error_page(
            StatusCode::INTERNAL_SERVER_ERROR,
            title,
            "control cannot sign tokens right now; try again shortly",
        )
    };
    let signer = state
        .store
        .signer()
        .await
        .map_err(|e| unavailable("read the signing key", &e))?;
    mint(&signer, claims).map_err(|e| unavailable("sign a session token", &e))
}

/// The redirect to the gateway's callback on `ret`'s hostname with `token`.
pub(crate) fn to_callback(ret: &Return, token: &str) -> Response {
    let location = format!(
        "{}{}callback?token={}&rd={}",
        ret.origin,
        GATEWAY_AUTH_PREFIX,
        token,
        url::form_urlencoded::byte_serialize(ret.path.as_bytes()).collect::<String>()
    );
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(LOCATION, v);
    }
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The control session this browser holds, if it is live.
pub(crate) async fn current_session(
    state: &AppState,
    headers: &HeaderMap,
) -> Option<(Session, User)> {
    let c = cookie_value(headers, CONTROL_COOKIE)?;
    match state.store.session_by_cookie(&Secret::new(c)).await {
        Ok(found) => found,
        Err(e) => {
            tracing::error!(error = %e, "cannot read a session");
            None
        }
    }
}

fn sign_in_form(csrf: &str, q: &ReturnQuery, email: &str, error: Option<&str>) -> String {
    let hidden = |name: &str, v: &Option<String>| match v {
        Some(v) => format!(
            "<input type=\"hidden\" name=\"{name}\" value=\"{}\">",
            escape(v)
        ),
        None => String::new(),
    };
    let error = error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(e)))
        .unwrap_or_default();
    format!(
        "{error}<form method=\"post\" action=\"/auth/sign-in\">\
         <label>E-mail <input name=\"email\" type=\"email\" autocomplete=\"username\" required \
         value=\"{}\"></label>\
         <label>Password <input name=\"password\" type=\"password\" \
         autocomplete=\"current-password\" required></label>\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">{}{}\
         <button type=\"submit\">Sign in</button></form>",
        escape(email),
        escape(csrf),
        hidden("rd", &q.rd),
        hidden("n", &q.n),
    )
}

/// Records a sign-in event.
pub(crate) async fn audit(
    state: &AppState,
    peer: &SocketAddr,
    action: &str,
    actor: String,
    target: &str,
    outcome: &str,
    detail: Option<&str>,
) {
    state
        .audit(AuditEntry {
            at: now_ms(),
            actor,
            action: action.to_owned(),
            target: Some(target.to_owned()),
            outcome: outcome.to_owned(),
            client: Some(peer.ip().to_string()),
            detail: detail.map(str::to_owned),
            org_id: None,
        })
        .await;
}

async fn sign_in_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<ReturnQuery>,
) -> Response {
    let ret = match check_return(&state, &q).await {
        Ok(r) => r,
        Err(m) => return error_page(StatusCode::BAD_REQUEST, "Cannot sign in", &m),
    };
    if let Some((session, user)) = current_session(&state, &headers).await {
        return match ret {
            Some(ret) => grant(&state, &session, &user, &ret).await,
            None => signed_in_page(&headers, &user),
        };
    }
    sign_in_again(&state, &headers, &q, "", StatusCode::OK, None).await
}

/// The cookie holding where to go after a sign-in that came from no resource (an OAuth
/// authorization request that needs a signed-in user).
pub(crate) const NEXT_COOKIE: &str = "kakuremichi_next";

/// "You are signed in", for a sign-in that came from no resource; or, when the browser was
/// sent to sign in by an authorization request ([`NEXT_COOKIE`]), back to that request.
fn signed_in_page(headers: &HeaderMap, user: &User) -> Response {
    let next = cookie_value(headers, NEXT_COOKIE)
        .and_then(|v| {
            url::form_urlencoded::parse(format!("v={v}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
        })
        .filter(|n| {
            (n.starts_with("/oauth/authorize?")
                || n == "/ui"
                || n.starts_with("/ui/")
                || n.starts_with("/ui?"))
                && !n.contains(['\r', '\n'])
        });
    if let Some(next) = next {
        let mut r = StatusCode::SEE_OTHER.into_response();
        if let Ok(v) = HeaderValue::from_str(&next) {
            r.headers_mut().insert(LOCATION, v);
        }
        r.headers_mut().append(
            SET_COOKIE,
            HeaderValue::from_static(
                "kakuremichi_next=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax",
            ),
        );
        return r;
    }
    page(
        StatusCode::OK,
        "Signed in",
        &format!(
            "<p>You are signed in as {}.</p><p><a href=\"/ui\">Admin console</a> · \
             <a href=\"/account\">Your account</a> · <a href=\"/auth/sign-out\">Sign out</a></p>",
            escape(&user.email)
        ),
    )
}

/// The sign-in page (password form, passkey button, single sign-on links), with an error.
pub(crate) async fn sign_in_refused(
    state: &AppState,
    headers: &HeaderMap,
    q: &ReturnQuery,
    status: StatusCode,
    message: &str,
) -> Response {
    sign_in_again(state, headers, q, "", status, Some(message)).await
}

async fn sign_in_again(
    state: &AppState,
    headers: &HeaderMap,
    q: &ReturnQuery,
    email: &str,
    status: StatusCode,
    error: Option<&str>,
) -> Response {
    let (csrf, set) = csrf_token(state, headers);
    let sso = crate::sso::buttons(state, q).await;
    let passkey = if state.passkeys.is_some() {
        "<p><button type=\"button\" id=\"passkey-sign-in\">Sign in with a passkey</button> \
         <span id=\"passkey-status\" role=\"status\"></span></p>\
         <script src=\"/auth/passkey.js\"></script>"
    } else {
        ""
    };
    let visitors = crate::visitors::forms(state, q, &csrf).await;
    let mut r = page(
        status,
        "Sign in",
        &format!(
            "{visitors}{}{passkey}{sso}",
            sign_in_form(&csrf, q, email, error)
        ),
    );
    if let Some(c) = set {
        r.headers_mut().append(SET_COOKIE, c);
    }
    r
}

async fn sign_in(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<SignInForm>,
) -> Response {
    let q = ReturnQuery {
        rd: form.rd.clone(),
        n: form.n.clone(),
    };
    if !csrf_ok(&headers, &form.csrf) {
        tracing::warn!(client = %peer.ip(), "sign-in refused: CSRF token missing or wrong");
        let email = form.email.trim().to_ascii_lowercase();
        audit(
            &state,
            &peer,
            "sign_in",
            "anonymous".into(),
            &email,
            "denied",
            Some("form token missing or wrong"),
        )
        .await;
        let (csrf, set) = csrf_token(&state, &headers);
        let mut r = page(
            StatusCode::FORBIDDEN,
            "Sign in",
            &sign_in_form(
                &csrf,
                &q,
                &form.email,
                Some("this form expired; please sign in again"),
            ),
        );
        if let Some(c) = set {
            r.headers_mut().append(SET_COOKIE, c);
        }
        return r;
    }
    let csrf = form.csrf.clone();
    let again = |status: StatusCode, message: &str| {
        page(
            status,
            "Sign in",
            &sign_in_form(&csrf, &q, &form.email, Some(message)),
        )
    };
    if let Err(wait) = state.take_sign_in(peer.ip()).await {
        tracing::warn!(client = %peer.ip(), "sign-in refused: too many attempts from this address");
        let email = form.email.trim().to_ascii_lowercase();
        audit(
            &state,
            &peer,
            "sign_in",
            "anonymous".into(),
            &email,
            "denied",
            Some("rate limited"),
        )
        .await;
        let secs = wait.as_secs().max(1);
        let mut r = again(
            StatusCode::TOO_MANY_REQUESTS,
            &format!("too many sign-in attempts from your address; try again in {secs} s"),
        );
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            r.headers_mut().insert(RETRY_AFTER, v);
        }
        return r;
    }
    let ret = match check_return(&state, &q).await {
        Ok(r) => r,
        Err(m) => return error_page(StatusCode::BAD_REQUEST, "Cannot sign in", &m),
    };
    let found = match state.store.user_by_email(form.email.trim()).await {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(error = %e, "cannot read a user");
            return again(
                StatusCode::SERVICE_UNAVAILABLE,
                "sign-in is unavailable right now; try again shortly",
            );
        }
    };
    let password = Secret::new(form.password.clone());
    let wrong = "wrong e-mail address or password";
    let Some((user, Some(hash))) = found else {
        let _ = secrets::verify_argon2(dummy_hash().await, &password).await;
        tracing::warn!(client = %peer.ip(), "sign-in failed: unknown account");
        let email = form.email.trim().to_ascii_lowercase();
        audit(
            &state,
            &peer,
            "sign_in",
            "anonymous".into(),
            &email,
            "denied",
            Some("unknown account"),
        )
        .await;
        return again(StatusCode::UNAUTHORIZED, wrong);
    };
    if user.disabled {
        tracing::warn!(client = %peer.ip(), user_id = %user.id, "sign-in refused: user disabled");
        audit(
            &state,
            &peer,
            "sign_in",
            "anonymous".into(),
            &user.email,
            "denied",
            Some("disabled"),
        )
        .await;
        return again(
            StatusCode::FORBIDDEN,
            "this account is disabled; ask an administrator",
        );
    }
    let now = now_ms();
    if let Some(until) = user.locked_until.filter(|u| *u > now) {
        tracing::warn!(client = %peer.ip(), user_id = %user.id, "sign-in refused: account locked");
        audit(
            &state,
            &peer,
            "sign_in",
            "anonymous".into(),
            &user.email,
            "denied",
            Some("locked"),
        )
        .await;
        return again(
            StatusCode::FORBIDDEN,
            &format!(
                "this account is locked after too many wrong passwords; try again in {} min or \
                 ask an administrator to unlock it",
                (until - now + 59_999) / 60_000
            ),
        );
    }
    if !secrets::verify_argon2(&hash, &password).await {
        let locked = state
            .store
            .record_failed_sign_in(user.id, LOCKOUT_AFTER, LOCKOUT_FOR.as_millis() as i64)
            .await;
        tracing::warn!(client = %peer.ip(), user_id = %user.id, "sign-in failed: wrong password");
        audit(
            &state,
            &peer,
            "sign_in",
            "anonymous".into(),
            &user.email,
            "denied",
            Some("wrong password"),
        )
        .await;
        return match locked {
            Ok(Some(_)) => {
                tracing::warn!(user_id = %user.id, "account locked after too many wrong passwords");
                audit(
                    &state,
                    &peer,
                    "account_locked",
                    format!("user:{}", user.id),
                    &user.email,
                    "ok",
                    None,
                )
                .await;
                again(
                    StatusCode::FORBIDDEN,
                    &format!(
                        "this account is locked after too many wrong passwords; try again in {} \
                         min or ask an administrator to unlock it",
                        LOCKOUT_FOR.as_secs() / 60
                    ),
                )
            }
            _ => again(StatusCode::UNAUTHORIZED, wrong),
        };
    }
    // A second factor, if the user has one: the password step is sealed into the form, so that
    // any control replica can finish it.
    match state.store.totp_secret(user.id).await {
        Ok(Some(_)) => {
            let pending = serde_json::json!({
                "user": user.id, "exp": now_ms() + PENDING_LIFE_MS, "rd": q.rd, "n": q.n,
            });
            return match state
                .store
                .seal_blob(PENDING_PURPOSE, pending.to_string().as_bytes())
            {
                Ok(sealed) => page(StatusCode::OK, "Sign in", &totp_form(&csrf, &sealed, None)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot seal a pending sign-in");
                    again(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "sign-in is unavailable right now; try again shortly",
                    )
                }
            };
        }
        Ok(None) => {}
        Err(e) => {
            tracing::error!(error = %e, "cannot read a second factor");
            return again(
                StatusCode::SERVICE_UNAVAILABLE,
                "sign-in is unavailable right now; try again shortly",
            );
        }
    }
    finish(&state, &peer, &headers, &user, &["pwd"], None, ret).await
}

/// How long the second step of a sign-in may take.
const PENDING_LIFE_MS: i64 = 5 * 60 * 1000;
const PENDING_PURPOSE: &str = "pending-sign-in";

fn totp_form(csrf: &str, pending: &str, error: Option<&str>) -> String {
    let error = error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(e)))
        .unwrap_or_default();
    format!(
        "{error}<form method=\"post\" action=\"/auth/sign-in/totp\">\
         <label>Code from your authenticator app <input name=\"code\" inputmode=\"numeric\" \
         autocomplete=\"one-time-code\" pattern=\"[0-9]{{6}}\" required autofocus></label>\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <input type=\"hidden\" name=\"pending\" value=\"{}\">\
         <button type=\"submit\">Verify</button></form>",
        escape(csrf),
        escape(pending)
    )
}

#[derive(Deserialize)]
struct TotpForm {
    #[serde(default)]
    code: String,
    #[serde(default)]
    pending: String,
    #[serde(default)]
    csrf: String,
}

#[derive(Deserialize)]
struct Pending {
    user: uuid::Uuid,
    exp: i64,
    rd: Option<String>,
    n: Option<String>,
}

/// The step of a TOTP code that matches `code` within one step of `now` (unix seconds).
pub(crate) fn totp_step(secret: &[u8], code: &str, now: u64) -> Option<i64> {
    let totp = totp_rs::TOTP::new(totp_rs::Algorithm::SHA1, 6, 1, 30, secret.to_vec()).ok()?;
    let code = code.trim();
    let step = now / 30;
    [step.saturating_sub(1), step, step + 1]
        .into_iter()
        .find(|s| bool::from(totp.generate(s * 30).as_bytes().ct_eq(code.as_bytes())))
        .map(|s| s as i64)
}

async fn sign_in_totp(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<TotpForm>,
) -> Response {
    if !csrf_ok(&headers, &form.csrf) {
        audit(
            &state,
            &peer,
            "sign_in",
            "anonymous".into(),
            "",
            "denied",
            Some("form token missing or wrong"),
        )
        .await;
        return error_page(
            StatusCode::FORBIDDEN,
            "Sign in",
            "this form expired; please sign in again",
        );
    }
    if let Err(wait) = state.take_sign_in(peer.ip()).await {
        let mut r = page(
            StatusCode::TOO_MANY_REQUESTS,
            "Sign in",
            &totp_form(
                &form.csrf,
                &form.pending,
                Some(&format!(
                    "too many sign-in attempts from your address; try again in {} s",
                    wait.as_secs().max(1)
                )),
            ),
        );
        if let Ok(v) = HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
            r.headers_mut().insert(RETRY_AFTER, v);
        }
        return r;
    }
    let expired = || {
        error_page(
            StatusCode::BAD_REQUEST,
            "Sign in",
            "this sign-in took too long or was changed; please sign in again",
        )
    };
    let Some(pending) = state
        .store
        .open_blob(PENDING_PURPOSE, &form.pending)
        .ok()
        .and_then(|b| serde_json::from_slice::<Pending>(&b).ok())
        .filter(|p| p.exp > now_ms())
    else {
        audit(
            &state,
            &peer,
            "sign_in",
            "anonymous".into(),
            "",
            "denied",
            Some("second step expired or tampered with"),
        )
        .await;
        return expired();
    };
    let user = match state.store.get_user(pending.user).await {
        Ok(u) => u,
        Err(_) => return expired(),
    };
    let now = now_ms();
    if user.disabled || user.locked_until.is_some_and(|u| u > now) {
        audit(
            &state,
            &peer,
            "sign_in",
            "anonymous".into(),
            &user.email,
            "denied",
            Some("locked or disabled"),
        )
        .await;
        return error_page(
            StatusCode::FORBIDDEN,
            "Sign in",
            "this account is locked or disabled; try again later or ask an administrator",
        );
    }
    let secret = match state.store.totp_secret(user.id).await {
        Ok(Some(s)) => s,
        _ => return expired(),
    };
    let step = totp_step(&secret, &form.code, (now / 1000) as u64);
    let fresh = match step {
        Some(step) => state
            .store
            .take_totp_step(user.id, step)
            .await
            .unwrap_or(false),
        None => false,
    };
    if !fresh {
        let why = if step.is_some() {
            "TOTP code used before"
        } else {
            "wrong TOTP code"
        };
        tracing::warn!(client = %peer.ip(), user_id = %user.id, reason = why, "sign-in failed");
        audit(
            &state,
            &peer,
            "sign_in",
            "anonymous".into(),
            &user.email,
            "denied",
            Some(why),
        )
        .await;
        if let Ok(Some(_)) = state
            .store
            .record_failed_sign_in(user.id, LOCKOUT_AFTER, LOCKOUT_FOR.as_millis() as i64)
            .await
        {
            audit(
                &state,
                &peer,
                "account_locked",
                "anonymous".into(),
                &user.email,
                "ok",
                None,
            )
            .await;
        }
        return page(
            StatusCode::UNAUTHORIZED,
            "Sign in",
            &totp_form(
                &form.csrf,
                &form.pending,
                Some("that code is not valid; enter the current one"),
            ),
        );
    }
    let q = ReturnQuery {
        rd: pending.rd,
        n: pending.n,
    };
    let ret = match check_return(&state, &q).await {
        Ok(r) => r,
        Err(m) => return error_page(StatusCode::BAD_REQUEST, "Cannot sign in", &m),
    };
    finish(&state, &peer, &headers, &user, &["pwd", "otp"], None, ret).await
}

/// Starts a session for a user who proved who they are, sets control's cookie, and sends the
/// browser on (to the resource it came from, or to a "signed in" page).
pub(crate) async fn finish(
    state: &AppState,
    peer: &SocketAddr,
    headers: &HeaderMap,
    user: &User,
    amr: &[&str],
    scope: Option<uuid::Uuid>,
    ret: Option<Return>,
) -> Response {
    // A new session at every sign-in; the one this browser had, if any, ends.
    if let Some((old, _)) = current_session(state, headers).await {
        if let Err(e) = state.store.revoke_session(old.id).await {
            tracing::warn!(error = %e, "cannot end the previous session");
        }
    }
    let amr: Vec<String> = amr.iter().map(|s| (*s).to_owned()).collect();
    let (session, cookie) = match state
        .store
        .create_session(user.id, state.store.session_life_ms(), &amr, scope)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot start a session");
            return error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Sign in",
                "sign-in is unavailable right now; try again shortly",
            );
        }
    };
    tracing::info!(client = %peer.ip(), user_id = %user.id, session_id = %session.id, "signed in");
    audit(
        state,
        peer,
        "sign_in",
        format!("user:{}", user.id),
        &user.email,
        "ok",
        Some(&amr.join("+")),
    )
    .await;
    let set = format!(
        "{CONTROL_COOKIE}={}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{}",
        cookie.expose(),
        state.store.session_life_ms() / 1000,
        secure(state)
    );
    let mut r = match ret {
        Some(ret) => grant(state, &session, user, &ret).await,
        None => signed_in_page(headers, user),
    };
    if let Ok(v) = HeaderValue::from_str(&set) {
        r.headers_mut().append(SET_COOKIE, v);
    }
    r
}

async fn sign_out_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let (csrf, set) = csrf_token(&state, &headers);
    let mut r = page(
        StatusCode::OK,
        "Sign out",
        &format!(
            "<form method=\"post\" action=\"/auth/sign-out\"><input type=\"hidden\" name=\"csrf\" \
             value=\"{}\"><button type=\"submit\">Sign out</button></form>",
            escape(&csrf)
        ),
    );
    if let Some(c) = set {
        r.headers_mut().append(SET_COOKIE, c);
    }
    r
}

async fn sign_out(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if !csrf_ok(&headers, &form.csrf) {
        return error_page(
            StatusCode::FORBIDDEN,
            "Sign out",
            "this form expired; open the sign-out page again",
        );
    }
    if let Some((session, user)) = current_session(&state, &headers).await {
        if let Err(e) = state.store.revoke_session(session.id).await {
            tracing::error!(error = %e, "cannot end a session");
            return error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Sign out",
                "signing out is unavailable right now; try again shortly",
            );
        }
        tracing::info!(user_id = %user.id, session_id = %session.id, "signed out");
        audit(
            &state,
            &peer,
            "sign_out",
            format!("user:{}", user.id),
            &user.email,
            "ok",
            None,
        )
        .await;
    }
    let mut r = page(
        StatusCode::OK,
        "Signed out",
        "<p>You are signed out here and on every site you reached through this sign-in.</p>",
    );
    let clear = format!(
        "{CONTROL_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax{}",
        secure(&state)
    );
    if let Ok(v) = HeaderValue::from_str(&clear) {
        r.headers_mut().append(SET_COOKIE, v);
    }
    r
}

/// `GET /.well-known/kakuremichi/jwks.json`: the keys that verify session tokens and assertions.
async fn jwks(State(state): State<AppState>) -> Response {
    match state
        .store
        .published_keys(state.store.session_life_ms())
        .await
    {
        Ok(keys) => {
            let keys: Vec<_> = keys
                .iter()
                .map(|k| {
                    json!({"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig",
                           "kid": k.kid, "x": k.x})
                })
                .collect();
            let mut r = Json(json!({ "keys": keys })).into_response();
            r.headers_mut()
                .insert(CACHE_CONTROL, HeaderValue::from_static("max-age=300"));
            r
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read the signing keys");
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
    }
}

#[derive(Deserialize)]
struct SetupForm {
    #[serde(default)]
    admin_key: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrf: String,
}

fn setup_form(csrf: &str, email: &str, name: &str, error: Option<&str>) -> String {
    let error = error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(e)))
        .unwrap_or_default();
    format!(
        "{error}<p>Create the owner: the first user, who may do everything. The admin key control \
         printed at its first start (also in its data folder, <code>admin-key</code>) proves you \
         run this control; it becomes the owner's first key.</p>\
         <form method=\"post\" action=\"/setup\">\
         <label>Admin key <input name=\"admin_key\" type=\"password\" autocomplete=\"off\" required></label>\
         <label>Your e-mail <input name=\"email\" type=\"email\" autocomplete=\"username\" required value=\"{}\"></label>\
         <label>Your name <input name=\"name\" value=\"{}\"></label>\
         <label>Password (at least 10 characters) <input name=\"password\" type=\"password\" \
         autocomplete=\"new-password\" minlength=\"10\" required></label>\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <button type=\"submit\">Create the owner</button></form>",
        escape(email),
        escape(name),
        escape(csrf)
    )
}

fn set_up_already() -> Response {
    page(
        StatusCode::CONFLICT,
        "Set up already",
        "<p>This control has its owner. <a href=\"/auth/sign-in\">Sign in</a>.</p>",
    )
}

/// `GET /setup`: the first-run page that creates the owner, while no user exists.
async fn setup_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    match state.store.count_users().await {
        Ok(0) => {}
        Ok(_) => return set_up_already(),
        Err(e) => {
            tracing::error!(error = %e, "cannot count users");
            return error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Set up",
                "try again shortly",
            );
        }
    }
    let (csrf, set) = csrf_token(&state, &headers);
    let mut r = page(
        StatusCode::OK,
        "Set up kakuremichi",
        &setup_form(&csrf, "", "", None),
    );
    if let Some(c) = set {
        r.headers_mut().append(SET_COOKIE, c);
    }
    // The owner lands in the admin console once set up.
    if let Ok(c) = HeaderValue::from_str(&format!(
        "{NEXT_COOKIE}=%2Fui; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax{}",
        secure(&state)
    )) {
        r.headers_mut().append(SET_COOKIE, c);
    }
    r
}

async fn setup(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<SetupForm>,
) -> Response {
    let again = |status: StatusCode, message: &str| {
        page(
            status,
            "Set up kakuremichi",
            &setup_form(&form.csrf, &form.email, &form.name, Some(message)),
        )
    };
    if !csrf_ok(&headers, &form.csrf) {
        return error_page(
            StatusCode::FORBIDDEN,
            "Set up",
            "this form expired; open /setup again",
        );
    }
    if let Err(wait) = state.take_sign_in(peer.ip()).await {
        return again(
            StatusCode::TOO_MANY_REQUESTS,
            &format!(
                "too many attempts from your address; try again in {} s",
                wait.as_secs().max(1)
            ),
        );
    }
    if !matches!(state.store.count_users().await, Ok(0)) {
        return set_up_already();
    }
    let key = Secret::new(form.admin_key.trim());
    let key_id = secrets::embedded_id(secrets::ADMIN_KEY_PREFIX, &key);
    let valid = match key_id {
        Some(_) => state.check_admin_key(&key).await.unwrap_or(false),
        None => false,
    };
    let Some(key_id) = key_id.filter(|_| valid) else {
        tracing::warn!(client = %peer.ip(), "set-up refused: wrong admin key");
        audit(
            &state,
            &peer,
            "setup",
            "anonymous".into(),
            "",
            "denied",
            Some("wrong admin key"),
        )
        .await;
        return again(
            StatusCode::UNAUTHORIZED,
            "that is not this control's admin key",
        );
    };
    let email = match crate::validate::email(&form.email) {
        Ok(e) => e,
        Err(m) => return again(StatusCode::BAD_REQUEST, &m),
    };
    let name = match form.name.trim() {
        "" => email.clone(),
        n => match crate::validate::name(n) {
            Ok(n) => n,
            Err(m) => return again(StatusCode::BAD_REQUEST, &m),
        },
    };
    if let Err(m) = crate::validate::password(&form.password) {
        return again(StatusCode::BAD_REQUEST, &m);
    }
    let hash = match secrets::hash_password(&Secret::new(form.password.clone())).await {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "cannot hash a password");
            return again(StatusCode::SERVICE_UNAVAILABLE, "try again shortly");
        }
    };
    let owner = match state
        .store
        .create_owner(
            &crate::store::NewUser {
                email,
                name,
                password_hash: Some(hash),
                roles: vec!["owner".into()],
            },
            key_id,
        )
        .await
    {
        Ok(u) => u,
        Err(crate::store::StoreError::Conflict(_)) => return set_up_already(),
        Err(e) => {
            tracing::error!(error = %e, "cannot create the owner");
            return again(StatusCode::SERVICE_UNAVAILABLE, "try again shortly");
        }
    };
    tracing::info!(user_id = %owner.id, "owner created at set-up");
    audit(
        &state,
        &peer,
        "setup",
        format!("user:{}", owner.id),
        &owner.email,
        "ok",
        None,
    )
    .await;
    finish(&state, &peer, &headers, &owner, &["pwd"], None, None).await
}

/// `GET /account`: who is signed in here, how, and a button that ends every session.
async fn account_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let Some((session, user)) = current_session(&state, &headers).await else {
        let mut r = StatusCode::SEE_OTHER.into_response();
        r.headers_mut()
            .insert(LOCATION, HeaderValue::from_static("/auth/sign-in"));
        return r;
    };
    let (csrf, set) = csrf_token(&state, &headers);
    let orgs: String = state
        .store
        .memberships_of(user.id)
        .await
        .unwrap_or_default()
        .iter()
        .map(|(o, roles)| {
            format!(
                "<li>{}: {}{}</li>",
                escape(&o.name),
                escape(&roles.join(", ")),
                if o.require_second_factor {
                    " (requires a second factor)"
                } else {
                    ""
                }
            )
        })
        .collect();
    let passkeys = if state.passkeys.is_some() {
        let list = state.store.list_passkeys(user.id).await.unwrap_or_default();
        let items: String = list
            .iter()
            .map(|p| format!("<li>{}</li>", escape(&p.name)))
            .collect();
        format!(
            "<h2>Passkeys</h2><ul id=\"passkeys\">{items}</ul>\
             <label>Name <input id=\"passkey-name\" value=\"this device\"></label>\
             <p><button type=\"button\" id=\"add-passkey\">Add a passkey</button> \
             <span id=\"passkey-status\" role=\"status\"></span></p>\
             <script src=\"/auth/passkey.js\"></script>"
        )
    } else {
        String::new()
    };
    let mut r = page(
        StatusCode::OK,
        "Your account",
        &format!(
            "<p>{} ({})</p><h2>Organizations and roles</h2><ul>{}</ul><p>Second factor: {}</p>\
             <p>This session: signed in with {}, ends in {} h.</p>\
             <form method=\"post\" action=\"/account/sign-out-everywhere\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <button type=\"submit\">Sign out everywhere</button></form>\
             <p><a href=\"/auth/sign-out\">Sign out here</a></p>{}{}",
            escape(&user.name),
            escape(&user.email),
            orgs,
            if user.has_totp {
                "authenticator app (TOTP)"
            } else {
                "none"
            },
            escape(&session.amr.join(" + ")),
            ((session.expires_at - now_ms()) / 3_600_000).max(0),
            escape(&csrf),
            crate::totp::enrol_button(&user, &csrf),
            passkeys,
        ),
    );
    if let Some(c) = set {
        r.headers_mut().append(SET_COOKIE, c);
    }
    r
}

/// Ends every session of the signed-in user, here and at every gateway.
async fn sign_out_everywhere(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if !csrf_ok(&headers, &form.csrf) {
        return error_page(
            StatusCode::FORBIDDEN,
            "Sign out everywhere",
            "this form expired; open your account page again",
        );
    }
    let Some((_, user)) = current_session(&state, &headers).await else {
        return error_page(
            StatusCode::UNAUTHORIZED,
            "Sign out everywhere",
            "you are not signed in here",
        );
    };
    if let Err(e) = state.store.revoke_user_sessions(user.id).await {
        tracing::error!(error = %e, "cannot end a user's sessions");
        return error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Sign out everywhere",
            "this is unavailable right now; try again shortly",
        );
    }
    tracing::info!(user_id = %user.id, "signed out everywhere");
    audit(
        &state,
        &peer,
        "sign_out_everywhere",
        format!("user:{}", user.id),
        &user.email,
        "ok",
        None,
    )
    .await;
    let mut r = page(
        StatusCode::OK,
        "Signed out everywhere",
        "<p>Every session of yours has ended: here, on every site, on every device.</p>",
    );
    let clear = format!(
        "{CONTROL_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax{}",
        secure(&state)
    );
    if let Ok(v) = HeaderValue::from_str(&clear) {
        r.headers_mut().append(SET_COOKIE, v);
    }
    r
}
