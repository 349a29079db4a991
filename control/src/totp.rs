//! Self-service TOTP enrolment on control's account page: a signed-in user adds an authenticator
//! app (RFC 6238: SHA-1, 6 digits, 30 s) by proving a first code. The new secret travels in the
//! confirmation form sealed with control's secrets key (user, expiry), so no server state is kept
//! and any replica can finish it; it is stored only once a code from it works, and that code's
//! step is used up.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::header::SET_COOKIE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::{Form, Router};
use serde::Deserialize;

use crate::auth::{
    audit, csrf_ok, csrf_token, current_session, error_page, escape, page, totp_step,
};
use crate::store::{now_ms, User};
use crate::AppState;

/// Purpose the pending secret is sealed under.
const PURPOSE: &str = "totp-enrolment";
/// How long the confirmation form stays good.
const LIFE_MS: i64 = 10 * 60 * 1000;

/// The account page's routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/account/totp", post(start))
        .route("/account/totp/confirm", post(confirm))
        .route("/account/totp/remove", post(remove))
}

/// The account page's part: a button to add an authenticator app, or a form to remove the one
/// the user has (proved with their password or a current code).
pub fn enrol_button(user: &User, csrf: &str) -> String {
    if user.has_totp {
        return format!(
            "<h2>Authenticator app</h2><form method=\"post\" action=\"/account/totp/remove\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <p><label>Your password <input type=\"password\" name=\"password\" \
             autocomplete=\"current-password\"></label> or <label>a current code \
             <input name=\"code\" inputmode=\"numeric\" autocomplete=\"one-time-code\">\
             </label></p><button type=\"submit\">Remove the authenticator app</button></form>\
             <p>Sites that require a second factor will then need a passkey, or the app added \
             again.</p>",
            escape(csrf)
        );
    }
    format!(
        "<h2>Authenticator app</h2><form method=\"post\" action=\"/account/totp\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <button type=\"submit\">Add an authenticator app</button></form>",
        escape(csrf)
    )
}

#[derive(Deserialize)]
struct StartForm {
    #[serde(default)]
    csrf: String,
}

#[derive(Deserialize)]
struct RemoveForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    code: String,
}

#[derive(Deserialize)]
struct ConfirmForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    pending: String,
    #[serde(default)]
    code: String,
}

#[derive(serde::Serialize, Deserialize)]
struct Pending {
    user: uuid::Uuid,
    exp: i64,
    /// The secret, base32.
    secret: String,
}

fn confirm_page(csrf: &str, sealed: &str, secret: &str, url: &str, error: Option<&str>) -> String {
    let error = error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(e)))
        .unwrap_or_default();
    format!(
        "{error}<p>Add this key to your authenticator app (or open the link on the phone that \
         holds it), then type the code it shows.</p>\
         <p>Key: <code id=\"totp-secret\">{}</code></p>\
         <p><a id=\"totp-url\" href=\"{}\">Open in an authenticator app</a></p>\
         <form method=\"post\" action=\"/account/totp/confirm\">\
         <label>Code <input name=\"code\" inputmode=\"numeric\" autocomplete=\"one-time-code\" \
         pattern=\"[0-9]{{6}}\" required autofocus></label>\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <input type=\"hidden\" name=\"pending\" value=\"{}\">\
         <button type=\"submit\">Add</button></form>",
        escape(secret),
        escape(url),
        escape(csrf),
        escape(sealed)
    )
}

fn otpauth_url(email: &str, secret: &str) -> String {
    let label: String =
        url::form_urlencoded::byte_serialize(format!("kakuremichi:{email}").as_bytes()).collect();
    format!(
        "otpauth://totp/{label}?secret={secret}&issuer=kakuremichi&algorithm=SHA1&digits=6&period=30"
    )
}

fn unavailable() -> Response {
    error_page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Authenticator app",
        "this is unavailable right now; try again shortly",
    )
}

/// The signed-in user of a form post with a good CSRF token, or the page that says why not.
async fn signed_in(state: &AppState, headers: &HeaderMap, csrf: &str) -> Result<User, Response> {
    if !csrf_ok(headers, csrf) {
        return Err(error_page(
            StatusCode::FORBIDDEN,
            "Authenticator app",
            "this form expired; open your account page again",
        ));
    }
    match current_session(state, headers).await {
        Some((_, user)) => Ok(user),
        None => Err(error_page(
            StatusCode::UNAUTHORIZED,
            "Authenticator app",
            "you are not signed in here: sign in, then open your account page",
        )),
    }
}

async fn start(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<StartForm>,
) -> Response {
    use rand::RngCore as _;
    let user = match signed_in(&state, &headers, &form.csrf).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    if user.has_totp {
        return error_page(
            StatusCode::CONFLICT,
            "Authenticator app",
            "you have an authenticator app already; an administrator can remove it",
        );
    }
    let mut raw = vec![0u8; 20];
    rand::thread_rng().fill_bytes(&mut raw);
    let totp_rs::Secret::Encoded(secret) = totp_rs::Secret::Raw(raw).to_encoded() else {
        return unavailable();
    };
    let pending = Pending {
        user: user.id,
        exp: now_ms() + LIFE_MS,
        secret: secret.clone(),
    };
    let Ok(json) = serde_json::to_vec(&pending) else {
        return unavailable();
    };
    let sealed = match state.store.seal_blob(PURPOSE, &json) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot seal a TOTP enrolment");
            return unavailable();
        }
    };
    let (csrf, set) = csrf_token(&state, &headers);
    let mut r = page(
        StatusCode::OK,
        "Add an authenticator app",
        &confirm_page(
            &csrf,
            &sealed,
            &secret,
            &otpauth_url(&user.email, &secret),
            None,
        ),
    );
    if let Some(c) = set {
        r.headers_mut().append(SET_COOKIE, c);
    }
    r
}

async fn confirm(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<ConfirmForm>,
) -> Response {
    let user = match signed_in(&state, &headers, &form.csrf).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let pending = state
        .store
        .open_blob(PURPOSE, &form.pending)
        .ok()
        .and_then(|b| serde_json::from_slice::<Pending>(&b).ok())
        .filter(|p| p.exp > now_ms() && p.user == user.id);
    let Some(pending) = pending else {
        tracing::warn!(user_id = %user.id, "a TOTP enrolment expired or was tampered with");
        return error_page(
            StatusCode::BAD_REQUEST,
            "Authenticator app",
            "this form took too long or was changed: start again from your account page",
        );
    };
    let Ok(secret) = totp_rs::Secret::Encoded(pending.secret.clone()).to_bytes() else {
        return unavailable();
    };
    let Some(step) = totp_step(&secret, &form.code, (now_ms() / 1000) as u64) else {
        let (csrf, _) = csrf_token(&state, &headers);
        return page(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Add an authenticator app",
            &confirm_page(
                &csrf,
                &form.pending,
                &pending.secret,
                &otpauth_url(&user.email, &pending.secret),
                Some("that code is not valid: check the app's clock and type the current code"),
            ),
        );
    };
    let stored = async {
        state.store.set_totp(user.id, &secret).await?;
        state.store.take_totp_step(user.id, step).await
    };
    if let Err(e) = stored.await {
        tracing::error!(error = %e, "cannot store a TOTP secret");
        return unavailable();
    }
    tracing::info!(user_id = %user.id, "TOTP second factor added by its user");
    audit(
        &state,
        &peer,
        "totp_added",
        format!("user:{}", user.id),
        &user.email,
        "ok",
        None,
    )
    .await;
    page(
        StatusCode::OK,
        "Authenticator app added",
        "<p>From your next sign-in, control asks for a code after your password. Sites that \
         require a second factor let you in once you sign in again with it.</p>\
         <p><a href=\"/auth/sign-out\">Sign out</a> · <a href=\"/account\">Your account</a></p>",
    )
}

/// Removes the signed-in user's authenticator app, once they prove it is them again: their
/// password (rate limited as sign-ins are) or a current code from the app (used up).
async fn remove(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<RemoveForm>,
) -> Response {
    let user = match signed_in(&state, &headers, &form.csrf).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    if !user.has_totp {
        return error_page(
            StatusCode::CONFLICT,
            "Authenticator app",
            "you have no authenticator app to remove",
        );
    }
    if state.take_sign_in(peer.ip()).await.is_err() {
        return error_page(
            StatusCode::TOO_MANY_REQUESTS,
            "Authenticator app",
            "too many attempts from your address; try again in a minute",
        );
    }
    let proved = if !form.password.is_empty() {
        match state.store.user_by_email(&user.email).await {
            Ok(Some((found, Some(hash)))) if found.id == user.id => {
                crate::secrets::verify_argon2(&hash, &kakuremichi_proto::Secret::new(form.password))
                    .await
            }
            Ok(_) => false,
            Err(e) => {
                tracing::error!(error = %e, "cannot read a password hash");
                return unavailable();
            }
        }
    } else {
        match state.store.totp_secret(user.id).await {
            Ok(Some(secret)) => match totp_step(&secret, &form.code, (now_ms() / 1000) as u64) {
                Some(step) => state
                    .store
                    .take_totp_step(user.id, step)
                    .await
                    .unwrap_or(false),
                None => false,
            },
            Ok(None) => false,
            Err(e) => {
                tracing::error!(error = %e, "cannot read a TOTP secret");
                return unavailable();
            }
        }
    };
    if !proved {
        tracing::warn!(user_id = %user.id, "TOTP removal refused: wrong password or code");
        audit(
            &state,
            &peer,
            "totp_removed",
            format!("user:{}", user.id),
            &user.email,
            "denied",
            Some("wrong password or code"),
        )
        .await;
        return error_page(
            StatusCode::FORBIDDEN,
            "Authenticator app",
            "that password or code is not right: the authenticator app stays",
        );
    }
    if let Err(e) = state.store.clear_totp(user.id).await {
        tracing::error!(error = %e, "cannot remove a TOTP secret");
        return unavailable();
    }
    tracing::info!(user_id = %user.id, "TOTP second factor removed by its user");
    audit(
        &state,
        &peer,
        "totp_removed",
        format!("user:{}", user.id),
        &user.email,
        "ok",
        None,
    )
    .await;
    page(
        StatusCode::OK,
        "Authenticator app removed",
        "<p>Control no longer asks for a code when you sign in.</p>\
         <p><a href=\"/account\">Your account</a></p>",
    )
}
