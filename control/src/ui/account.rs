//! The console's account page for the signed-in user, whatever their roles: who they are and
//! what their roles give here, their password, their own API keys (made with a name and an
//! expiry, the secret shown once; revoked after a confirmation), and a link to control's
//! second-factor page (TOTP, passkeys) and to signing out everywhere.

use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{api, api_failure, render, Caller, Posted, St};
use crate::AppState;

/// What the page says after a form: a key just made, or which form failed and why.
#[derive(Debug, Default)]
struct Notice {
    created: Option<Value>,
    error_in: Option<&'static str>,
    error: Option<String>,
    saved: bool,
}

/// `GET /ui/account`.
pub(crate) async fn account(State(state): St, caller: Caller) -> Response {
    page(&state, &caller, StatusCode::OK, Notice::default()).await
}

async fn page(state: &AppState, caller: &Caller, status: StatusCode, n: Notice) -> Response {
    let (me, keys) = tokio::join!(
        api(state, caller, Method::GET, "/me", None),
        api(state, caller, Method::GET, "/me/api-keys", None),
    );
    if !me.status.is_success() {
        return api_failure(caller, "/ui/account", &me);
    }
    render(
        caller,
        status,
        "/ui/account",
        "account.html",
        "Your account",
        minijinja::context! {
            me => me.body,
            keys => keys.body,
            created => n.created,
            error_in => n.error_in,
            error => n.error,
            saved => n.saved,
        },
    )
}

/// `POST /ui/account/keys`.
pub(crate) async fn create_key(State(state): St, caller: Caller, Posted(form): Posted) -> Response {
    let mut key = json!({ "name": form.one("name").trim() });
    let days = form.one("expires_in_days").trim();
    if !days.is_empty() {
        let Ok(d) = days.parse::<u32>() else {
            let n = Notice {
                error_in: Some("key"),
                error: Some(format!("expires in: {days:?} is not a number of days")),
                ..Notice::default()
            };
            return page(&state, &caller, StatusCode::BAD_REQUEST, n).await;
        };
        key["expires_in_days"] = d.into();
    }
    let a = api(&state, &caller, Method::POST, "/me/api-keys", Some(key)).await;
    let n = if a.status == StatusCode::CREATED {
        Notice {
            created: Some(a.body),
            ..Notice::default()
        }
    } else {
        Notice {
            error_in: Some("key"),
            error: Some(a.error()),
            ..Notice::default()
        }
    };
    let status = if n.created.is_some() {
        StatusCode::CREATED
    } else {
        a.status
    };
    page(&state, &caller, status, n).await
}

/// `GET /ui/account/keys/{id}/revoke`: the confirmation.
pub(crate) async fn confirm_revoke_key(caller: Caller, Path(id): Path<Uuid>) -> Response {
    render(
        &caller,
        StatusCode::OK,
        "/ui/account",
        "confirm.html",
        "Revoke your API key?",
        minijinja::context! {
            what => "API key",
            verb => "Revoke",
            name => id.to_string(),
            action => format!("/ui/account/keys/{id}/revoke"),
            back => "/ui/account",
            note => "Whatever uses it is refused from the next request on.",
            also => Vec::<String>::new(),
        },
    )
}

super::confirmed_delete!(
    /// `POST /ui/account/keys/{id}/revoke`.
    revoke_key,
    "/me/api-keys",
    "/ui/account"
);

/// `POST /ui/account/password`.
pub(crate) async fn password(State(state): St, caller: Caller, Posted(form): Posted) -> Response {
    if form.one("new_password") != form.one("repeat_password") {
        let n = Notice {
            error_in: Some("password"),
            error: Some("the new password and its repetition differ".into()),
            ..Notice::default()
        };
        return page(&state, &caller, StatusCode::BAD_REQUEST, n).await;
    }
    let mut body = json!({ "new_password": form.one("new_password") });
    if !form.one("current_password").is_empty() {
        body["current_password"] = form.one("current_password").into();
    }
    let a = api(&state, &caller, Method::POST, "/me/password", Some(body)).await;
    let n = if a.status.is_success() {
        Notice {
            saved: true,
            ..Notice::default()
        }
    } else {
        Notice {
            error_in: Some("password"),
            error: Some(a.error()),
            ..Notice::default()
        }
    };
    let status = if n.saved { StatusCode::OK } else { a.status };
    page(&state, &caller, status, n).await
}
