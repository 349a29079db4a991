//! Passkeys (WebAuthn, by webauthn-rs): a signed-in user adds one on `/account`; afterwards the
//! sign-in page's "Sign in with a passkey" button signs them in with it instead of a password.
//! A passkey with user verification (required here) is two factors in one: something held and a
//! PIN or biometric, so no password or TOTP code is asked.
//!
//! The relying party is control's public URL, whose host must be a name (`localhost` counts),
//! not an IP address: browsers refuse WebAuthn on IP addresses. Ceremony state stays in the store
//! (every replica shares it) and is taken exactly once, so no answer can be replayed. The
//! browser side is `/auth/passkey.js`, served by control (pages allow only `script-src 'self'`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;
use webauthn_rs::prelude::{
    Passkey, PasskeyAuthentication, PasskeyRegistration, PublicKeyCredential,
    RegisterPublicKeyCredential, Url, Webauthn, WebauthnBuilder,
};

use crate::auth::{
    audit, check_return, csrf_ok, current_session, finish, sign_in_refused, ReturnQuery,
};
use crate::store::now_ms;
use crate::AppState;

/// How long a ceremony may take.
const CEREMONY_MS: i64 = 5 * 60 * 1000;
const REGISTER: &str = "register";
const AUTHENTICATE: &str = "authenticate";

/// The relying party for control's public URL; `None` (passkeys off, with the reason logged)
/// when its host is an IP address or the URL is not one a browser accepts.
pub fn relying_party(public_url: &str) -> Option<Arc<Webauthn>> {
    let url = Url::parse(public_url).ok()?;
    let Some(host) = url.domain().map(str::to_owned) else {
        tracing::info!(
            public_url,
            "passkeys are off: browsers allow them only on a host name (e.g. http://localhost:3000 \
             or https://control.example.com), not an IP address; set --public-url"
        );
        return None;
    };
    match WebauthnBuilder::new(&host, &url).and_then(|b| b.rp_name("kakuremichi").build()) {
        Ok(w) => Some(Arc::new(w)),
        Err(e) => {
            tracing::warn!(public_url, error = %e, "passkeys are off");
            None
        }
    }
}

/// The passkey routes (under `/auth`, where the CSRF cookie is sent).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/auth/passkey.js", get(script))
        .route("/auth/passkeys/register/options", post(register_options))
        .route("/auth/passkeys/register", post(register))
        .route("/auth/passkeys/sign-in/options", post(sign_in_options))
        .route("/auth/passkeys/sign-in", post(sign_in))
}

const SCRIPT: &str = include_str!("passkey.js");

async fn script() -> Response {
    let mut r = SCRIPT.into_response();
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

fn json_error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

fn off() -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        "passkeys are not available on this control (its public URL has no host name)",
    )
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "{what}");
    json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "passkeys are unavailable right now; try again shortly",
    )
}

/// The relying party, for a script's request whose CSRF header (`X-CSRF-Token`) matches the
/// page's cookie; otherwise the JSON answer that says why not.
fn ready(state: &AppState, headers: &HeaderMap) -> Result<Arc<Webauthn>, Box<Response>> {
    let Some(wa) = state.passkeys.clone() else {
        return Err(Box::new(off()));
    };
    let sent = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !csrf_ok(headers, sent) {
        return Err(Box::new(json_error(
            StatusCode::FORBIDDEN,
            "this page expired; reload it and try again",
        )));
    }
    Ok(wa)
}

fn cred_id_text(pk: &Passkey) -> String {
    serde_json::to_value(pk.cred_id())
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

async fn register_options(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let wa = match ready(&state, &headers) {
        Ok(wa) => wa,
        Err(r) => return *r,
    };
    let Some((_, user)) = current_session(&state, &headers).await else {
        return json_error(StatusCode::UNAUTHORIZED, "sign in first");
    };
    let existing = match state.store.passkeys_of(user.id).await {
        Ok(p) => p,
        Err(e) => return unavailable("cannot read passkeys", e),
    };
    let exclude = existing
        .iter()
        .filter_map(|(_, j)| serde_json::from_str::<Passkey>(j).ok())
        .map(|p| p.cred_id().clone())
        .collect::<Vec<_>>();
    let (ccr, reg) =
        match wa.start_passkey_registration(user.id, &user.email, &user.name, Some(exclude)) {
            Ok(x) => x,
            Err(e) => return unavailable("cannot start a passkey registration", e),
        };
    let saved = match serde_json::to_string(&reg) {
        Ok(s) => s,
        Err(e) => return unavailable("cannot keep a passkey registration", e),
    };
    let id = match state
        .store
        .put_challenge(user.id, REGISTER, &saved, CEREMONY_MS)
        .await
    {
        Ok(id) => id,
        Err(e) => return unavailable("cannot keep a passkey registration", e),
    };
    Json(json!({ "challenge_id": id, "options": ccr })).into_response()
}

#[derive(Deserialize)]
struct RegisterBody {
    challenge_id: Uuid,
    #[serde(default)]
    name: String,
    credential: RegisterPublicKeyCredential,
}

async fn register(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Json<RegisterBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let wa = match ready(&state, &headers) {
        Ok(wa) => wa,
        Err(r) => return *r,
    };
    let Some((_, user)) = current_session(&state, &headers).await else {
        return json_error(StatusCode::UNAUTHORIZED, "sign in first");
    };
    let Ok(Json(body)) = body else {
        return json_error(StatusCode::BAD_REQUEST, "that is not a passkey answer");
    };
    let taken = match state
        .store
        .take_challenge(body.challenge_id, REGISTER)
        .await
    {
        Ok(t) => t,
        Err(e) => return unavailable("cannot read a passkey registration", e),
    };
    let Some(reg) = taken
        .filter(|(u, _)| *u == user.id)
        .and_then(|(_, s)| serde_json::from_str::<PasskeyRegistration>(&s).ok())
    else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "this passkey request expired or was used; try again",
        );
    };
    let pk = match wa.finish_passkey_registration(&body.credential, &reg) {
        Ok(pk) => pk,
        Err(e) => {
            tracing::warn!(user_id = %user.id, error = %e, "passkey registration refused");
            audit(
                &state,
                &peer,
                "passkey_added",
                format!("user:{}", user.id),
                &user.email,
                "denied",
                Some(&e.to_string()),
            )
            .await;
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("the browser's passkey answer was refused ({e})"),
            );
        }
    };
    let name = match crate::validate::name(&body.name) {
        Ok(n) => n,
        Err(_) => format!("passkey added {}", now_ms() / 1000),
    };
    let stored = match serde_json::to_string(&pk) {
        Ok(s) => s,
        Err(e) => return unavailable("cannot encode a passkey", e),
    };
    match state
        .store
        .add_passkey(user.id, &name, &cred_id_text(&pk), &stored)
        .await
    {
        Ok(id) => {
            tracing::info!(user_id = %user.id, passkey_id = %id, "passkey added");
            audit(
                &state,
                &peer,
                "passkey_added",
                format!("user:{}", user.id),
                &user.email,
                "ok",
                Some(&name),
            )
            .await;
            (StatusCode::CREATED, Json(json!({ "id": id, "name": name }))).into_response()
        }
        Err(crate::store::StoreError::Conflict(m)) => json_error(StatusCode::CONFLICT, &m),
        Err(e) => unavailable("cannot store a passkey", e),
    }
}

#[derive(Deserialize)]
struct SignInOptionsBody {
    #[serde(default)]
    email: String,
}

async fn sign_in_options(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Json<SignInOptionsBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let wa = match ready(&state, &headers) {
        Ok(wa) => wa,
        Err(r) => return *r,
    };
    if let Err(wait) = state.take_sign_in(peer.ip()).await {
        return json_error(
            StatusCode::TOO_MANY_REQUESTS,
            &format!(
                "too many sign-in attempts from your address; wait {} s",
                wait.as_secs().max(1)
            ),
        );
    }
    let Ok(Json(body)) = body else {
        return json_error(StatusCode::BAD_REQUEST, "send {\"email\": ...}");
    };
    let email = body.email.trim().to_ascii_lowercase();
    let no_passkey = || {
        json_error(
            StatusCode::BAD_REQUEST,
            "no passkey is registered for this e-mail address: sign in with your password, \
             then add one on your account page",
        )
    };
    let user = match state.store.user_by_email(&email).await {
        Ok(Some((u, _))) => u,
        Ok(None) => return no_passkey(),
        Err(e) => return unavailable("cannot read a user", e),
    };
    let keys: Vec<Passkey> = match state.store.passkeys_of(user.id).await {
        Ok(p) => p
            .iter()
            .filter_map(|(_, j)| serde_json::from_str(j).ok())
            .collect(),
        Err(e) => return unavailable("cannot read passkeys", e),
    };
    if keys.is_empty() {
        return no_passkey();
    }
    let (rcr, auth) = match wa.start_passkey_authentication(&keys) {
        Ok(x) => x,
        Err(e) => return unavailable("cannot start a passkey sign-in", e),
    };
    let s = match serde_json::to_string(&auth) {
        Ok(s) => s,
        Err(e) => return unavailable("cannot keep a passkey sign-in", e),
    };
    match state
        .store
        .put_challenge(user.id, AUTHENTICATE, &s, CEREMONY_MS)
        .await
    {
        Ok(id) => Json(json!({ "challenge_id": id, "options": rcr })).into_response(),
        Err(e) => unavailable("cannot keep a passkey sign-in", e),
    }
}

/// The form the script posts once the authenticator has answered.
#[derive(Deserialize)]
struct SignInForm {
    #[serde(default)]
    challenge_id: String,
    #[serde(default)]
    credential: String,
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    rd: Option<String>,
    #[serde(default)]
    n: Option<String>,
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
    let Some(wa) = state.passkeys.clone() else {
        return sign_in_refused(
            &state,
            &headers,
            &q,
            StatusCode::NOT_FOUND,
            "passkeys are not available here",
        )
        .await;
    };
    if !csrf_ok(&headers, &form.csrf) {
        return sign_in_refused(
            &state,
            &headers,
            &q,
            StatusCode::FORBIDDEN,
            "this form expired; please sign in again",
        )
        .await;
    }
    let Ok(id) = Uuid::parse_str(&form.challenge_id) else {
        return refused(
            &state,
            &peer,
            &headers,
            &q,
            "no challenge".into(),
            String::new(),
        )
        .await;
    };
    let Ok(cred) = serde_json::from_str::<PublicKeyCredential>(&form.credential) else {
        return refused(
            &state,
            &peer,
            &headers,
            &q,
            "malformed answer".into(),
            String::new(),
        )
        .await;
    };
    let taken = match state.store.take_challenge(id, AUTHENTICATE).await {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot read a passkey sign-in");
            return sign_in_refused(
                &state,
                &headers,
                &q,
                StatusCode::SERVICE_UNAVAILABLE,
                "sign-in is unavailable right now; try again shortly",
            )
            .await;
        }
    };
    let Some((user_id, auth)) =
        taken.and_then(|(u, s)| Some((u, serde_json::from_str::<PasskeyAuthentication>(&s).ok()?)))
    else {
        return refused(
            &state,
            &peer,
            &headers,
            &q,
            "expired, unknown or used challenge".into(),
            String::new(),
        )
        .await;
    };
    let user = match state.store.get_user(user_id).await {
        Ok(u) => u,
        Err(_) => {
            return refused(
                &state,
                &peer,
                &headers,
                &q,
                "user gone".into(),
                String::new(),
            )
            .await
        }
    };
    let result = match wa.finish_passkey_authentication(&cred, &auth) {
        Ok(r) => r,
        Err(e) => {
            return refused(
                &state,
                &peer,
                &headers,
                &q,
                e.to_string(),
                user.email.clone(),
            )
            .await
        }
    };
    if user.disabled {
        return refused(
            &state,
            &peer,
            &headers,
            &q,
            "user disabled".into(),
            user.email.clone(),
        )
        .await;
    }
    if user.locked_until.is_some_and(|t| t > now_ms()) {
        return refused(
            &state,
            &peer,
            &headers,
            &q,
            "account locked".into(),
            user.email.clone(),
        )
        .await;
    }
    // The passkey's new counter (a clone of the authenticator would fall behind).
    if let Ok(keys) = state.store.passkeys_of(user.id).await {
        for (pid, j) in keys {
            let Ok(mut pk) = serde_json::from_str::<Passkey>(&j) else {
                continue;
            };
            if pk.cred_id() == result.cred_id() {
                pk.update_credential(&result);
                if let Ok(s) = serde_json::to_string(&pk) {
                    if let Err(e) = state.store.passkey_used(pid, &s).await {
                        tracing::warn!(error = %e, "cannot record a passkey's use");
                    }
                }
            }
        }
    }
    let ret = match check_return(&state, &q).await {
        Ok(r) => r,
        Err(m) => {
            return crate::auth::error_page(StatusCode::BAD_REQUEST, "Cannot sign in", &m);
        }
    };
    finish(&state, &peer, &headers, &user, &["passkey"], None, ret).await
}

/// A refused passkey sign-in: logged, audited, and the sign-in page again.
async fn refused(
    state: &AppState,
    peer: &SocketAddr,
    headers: &HeaderMap,
    q: &ReturnQuery,
    why: String,
    email: String,
) -> Response {
    tracing::warn!(client = %peer.ip(), reason = %why, "passkey sign-in refused");
    audit(
        state,
        peer,
        "sign_in",
        "anonymous".into(),
        &email,
        "denied",
        Some(&format!("passkey: {why}")),
    )
    .await;
    sign_in_refused(
        state,
        headers,
        q,
        StatusCode::UNAUTHORIZED,
        "the passkey sign-in did not succeed; try again, or use your password",
    )
    .await
}
