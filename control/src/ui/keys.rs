//! The UI's API keys page: the organization's keys (personal ones and service tokens for
//! machines) with what they may do, when they expire and were last used; a new key's secret is
//! shown once, on the page that made it; revoking one takes effect at once.

use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{api, api_failure, render, Caller, Fields, Posted, St};
use crate::AppState;

/// `GET /ui/keys`.
pub(crate) async fn keys(State(state): St, caller: Caller) -> Response {
    keys_page(
        &state,
        &caller,
        StatusCode::OK,
        &Fields(Vec::new()),
        None,
        None,
    )
    .await
}

async fn keys_page(
    state: &AppState,
    caller: &Caller,
    status: StatusCode,
    form: &Fields,
    error: Option<String>,
    created: Option<Value>,
) -> Response {
    let (list, users) = tokio::join!(
        api(state, caller, Method::GET, "/api-keys?limit=1000", None),
        async {
            if caller.may("user:read") {
                Some(api(state, caller, Method::GET, "/users?limit=1000", None).await)
            } else {
                None
            }
        }
    );
    if !list.status.is_success() {
        return api_failure(caller, "/ui/keys", &list);
    }
    let email_of = |id: &str| -> Option<String> {
        users.as_ref()?.body.as_array()?.iter().find_map(|u| {
            (u.get("id")?.as_str()? == id).then(|| u.get("email")?.as_str().map(str::to_owned))?
        })
    };
    let rows: Vec<Value> = list
        .body
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|k| {
            let mut k = k.clone();
            let owner = match (k.get("user_id").and_then(Value::as_str), k.get("scopes")) {
                (_, Some(Value::Null) | None) => "admin key (every permission)".to_owned(),
                (Some(u), _) => {
                    let who = email_of(u).unwrap_or_else(|| u.to_owned());
                    if u == caller.web.user.to_string() {
                        format!("personal: {who} (you)")
                    } else {
                        format!("personal: {who}")
                    }
                }
                (None, _) => "service token".to_owned(),
            };
            k["owner"] = owner.into();
            k
        })
        .collect();
    let scopes = super::roles::permission_choices(&form.all("scope"));
    render(
        caller,
        status,
        "/ui/keys",
        "keys.html",
        "API keys",
        minijinja::context! {
            rows,
            scopes,
            created,
            error,
            can_write => caller.may("api_key:write"),
            form_name => form.one("name"),
            service => form.one("kind") == "service",
            expires => form.one("expires_in_days"),
        },
    )
}

/// `POST /ui/keys`: a personal key (acting with the signed-in user's roles, never more) or a
/// service token; the page that answers shows the secret, once.
pub(crate) async fn create_key(State(state): St, caller: Caller, Posted(form): Posted) -> Response {
    let again = |message: String| {
        let (state, caller, form) = (&state, &caller, &form);
        async move {
            keys_page(
                state,
                caller,
                StatusCode::BAD_REQUEST,
                form,
                Some(message),
                None,
            )
            .await
        }
    };
    let mut key = json!({
        "name": form.one("name").trim(),
        "scopes": form.all("scope"),
        "service": form.one("kind") == "service",
    });
    let days = form.one("expires_in_days").trim();
    if !days.is_empty() {
        match days.parse::<u32>() {
            Ok(d) => key["expires_in_days"] = d.into(),
            Err(_) => {
                return again(format!(
                    "expires in: {days:?} is not a number of days (1 to 3650); leave it empty for a key that does not expire"
                ))
                .await
            }
        }
    }
    let a = api(&state, &caller, Method::POST, "/api-keys", Some(key)).await;
    if a.status == StatusCode::CREATED {
        return keys_page(
            &state,
            &caller,
            StatusCode::CREATED,
            &Fields(Vec::new()),
            None,
            Some(a.body),
        )
        .await;
    }
    if a.status.is_client_error() {
        return again(a.error()).await;
    }
    api_failure(&caller, "/ui/keys", &a)
}

/// `GET /ui/keys/{id}/revoke`: the confirmation.
pub(crate) async fn confirm_revoke_key(
    State(state): St,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Response {
    let a = api(&state, &caller, Method::GET, "/api-keys?limit=1000", None).await;
    if !a.status.is_success() {
        return api_failure(&caller, "/ui/keys", &a);
    }
    let id_text = id.to_string();
    let Some(key) = a
        .body
        .as_array()
        .and_then(|l| l.iter().find(|k| k["id"].as_str() == Some(&id_text)))
    else {
        return super::message(
            StatusCode::NOT_FOUND,
            "Not found",
            "This API key does not exist (any more).",
        );
    };
    let name = key["name"].as_str().unwrap_or("");
    render(
        &caller,
        StatusCode::OK,
        "/ui/keys",
        "confirm.html",
        &format!("Revoke the API key {name}?"),
        minijinja::context! {
            what => "API key",
            verb => "Revoke",
            name,
            action => format!("/ui/keys/{id}/revoke"),
            back => "/ui/keys",
            note => "Whatever uses it is refused from the next request on.",
            also => Vec::<String>::new(),
        },
    )
}

super::confirmed_delete!(
    /// `POST /ui/keys/{id}/revoke`.
    revoke_key,
    "/api-keys",
    "/ui/keys"
);
