//! The UI's roles page: the built-in roles and the organization's own, each with the
//! permissions it gives; custom roles made, changed (a change applies at the next request of
//! everyone holding the role) and deleted after a confirmation.

use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use super::{act, api, api_failure, redirect, render, Caller, Fields, Posted, St};
use crate::api::PERMISSIONS;
use crate::AppState;

/// Every permission as a checkbox, ticked when `chosen` holds it.
pub(super) fn permission_choices(chosen: &[String]) -> Vec<Value> {
    PERMISSIONS
        .iter()
        .map(|p| json!({ "name": p, "checked": chosen.iter().any(|c| c == p) }))
        .collect()
}

/// `GET /ui/roles`.
pub(crate) async fn roles(State(state): St, caller: Caller) -> Response {
    roles_page(
        &state,
        &caller,
        StatusCode::OK,
        &Fields(Vec::new()),
        None,
        None,
    )
    .await
}

/// The list and the form that makes a role, or (`editing`) the form that changes one.
async fn roles_page(
    state: &AppState,
    caller: &Caller,
    status: StatusCode,
    form: &Fields,
    error: Option<String>,
    editing: Option<Value>,
) -> Response {
    let list = api(state, caller, Method::GET, "/roles", None).await;
    if !list.status.is_success() {
        return api_failure(caller, "/ui/roles", &list);
    }
    let (chosen, description) = match (&editing, form.0.is_empty()) {
        (Some(role), true) => (
            role["permissions"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            role["description"].as_str().unwrap_or("").to_owned(),
        ),
        _ => (form.all("permission"), form.one("description").to_owned()),
    };
    let title = match &editing {
        Some(r) => format!("Role {}", r["name"].as_str().unwrap_or("")),
        None => "Roles".to_owned(),
    };
    render(
        caller,
        status,
        "/ui/roles",
        "roles.html",
        &title,
        minijinja::context! {
            rows => list.body,
            editing,
            permissions => permission_choices(&chosen),
            description,
            form_name => form.one("name"),
            error,
            can_write => caller.may("role:write"),
        },
    )
}

/// `POST /ui/roles`: a custom role.
pub(crate) async fn create_role(
    State(state): St,
    caller: Caller,
    Posted(form): Posted,
) -> Response {
    let role = json!({
        "name": form.one("name").trim(),
        "description": form.one("description").trim(),
        "permissions": form.all("permission"),
    });
    let a = api(&state, &caller, Method::POST, "/roles", Some(role)).await;
    if a.status.is_success() {
        return redirect("/ui/roles");
    }
    if a.status.is_client_error() && a.status != StatusCode::FORBIDDEN {
        return roles_page(
            &state,
            &caller,
            StatusCode::BAD_REQUEST,
            &form,
            Some(a.error()),
            None,
        )
        .await;
    }
    api_failure(&caller, "/ui/roles", &a)
}

/// `GET /ui/roles/{name}`: a role's form.
pub(crate) async fn role(State(state): St, caller: Caller, Path(name): Path<String>) -> Response {
    let a = api(&state, &caller, Method::GET, &role_path(&name), None).await;
    if !a.status.is_success() {
        return api_failure(&caller, "/ui/roles", &a);
    }
    roles_page(
        &state,
        &caller,
        StatusCode::OK,
        &Fields(Vec::new()),
        None,
        Some(a.body),
    )
    .await
}

/// `/roles/{name}` with the name encoded for a path.
fn role_path(name: &str) -> String {
    format!(
        "/roles/{}",
        url::form_urlencoded::byte_serialize(name.as_bytes()).collect::<String>()
    )
}

/// `POST /ui/roles/{name}`: its description and permissions.
pub(crate) async fn update_role(
    State(state): St,
    caller: Caller,
    Path(name): Path<String>,
    Posted(form): Posted,
) -> Response {
    let change = json!({
        "description": form.one("description").trim(),
        "permissions": form.all("permission"),
    });
    let a = api(
        &state,
        &caller,
        Method::PATCH,
        &role_path(&name),
        Some(change),
    )
    .await;
    if a.status.is_success() {
        return redirect("/ui/roles");
    }
    if a.status.is_client_error() && a.status != StatusCode::FORBIDDEN {
        let current = api(&state, &caller, Method::GET, &role_path(&name), None).await;
        return roles_page(
            &state,
            &caller,
            StatusCode::BAD_REQUEST,
            &form,
            Some(a.error()),
            Some(current.body),
        )
        .await;
    }
    api_failure(&caller, "/ui/roles", &a)
}

/// `GET /ui/roles/{name}/delete`: the confirmation.
pub(crate) async fn confirm_delete_role(caller: Caller, Path(name): Path<String>) -> Response {
    render(
        &caller,
        StatusCode::OK,
        "/ui/roles",
        "confirm.html",
        &format!("Delete the role {name}?"),
        minijinja::context! {
            what => "role",
            name,
            action => format!("/ui/roles/{}/delete", role_path(&name).trim_start_matches("/roles/")),
            back => "/ui/roles",
            note => "Users holding it lose what it gives at their next request.",
            also => Vec::<String>::new(),
        },
    )
}

/// `POST /ui/roles/{name}/delete`.
pub(crate) async fn delete_role(
    State(state): St,
    caller: Caller,
    Path(name): Path<String>,
    _: Posted,
) -> Response {
    act(
        &state,
        &caller,
        (Method::DELETE, &role_path(&name), None),
        "/ui/roles",
        "/ui/roles",
    )
    .await
}
