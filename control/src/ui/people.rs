//! The UI's users page (list, invite with a password and roles, disable, enable, sign out
//! everywhere) and a resource's access form (public, or signed-in users with roles and e-mail
//! domains). Forms with repeated fields (`role=a&role=b`) are read as pairs.

use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{api, api_failure, redirect, render, role_choices, Caller, Fields, Posted, St};
use crate::AppState;

/// `GET /ui/users`.
pub(crate) async fn users(State(state): St, caller: Caller) -> Response {
    users_page(&state, &caller, StatusCode::OK, &Fields(Vec::new()), None).await
}

async fn users_page(
    state: &AppState,
    caller: &Caller,
    status: StatusCode,
    form: &Fields,
    error: Option<String>,
) -> Response {
    let (users, roles) = tokio::join!(
        api(state, caller, Method::GET, "/users", None),
        api(state, caller, Method::GET, "/roles", None),
    );
    if !users.status.is_success() {
        return api_failure(caller, "/ui/users", &users);
    }
    let roles = role_choices(&roles.body, &form.all("role"));
    render(
        caller,
        status,
        "/ui/users",
        "users.html",
        "Users",
        minijinja::context! {
            rows => users.body,
            roles,
            form_email => form.one("email"),
            form_name => form.one("name"),
            error,
            can_write => caller.may("user:write"),
            me => caller.web.user,
        },
    )
}

/// `POST /ui/users`: a user with a password and roles.
pub(crate) async fn create_user(
    State(state): St,
    caller: Caller,
    Posted(form): Posted,
) -> Response {
    let mut user = json!({ "email": form.one("email").trim(), "roles": form.all("role") });
    if !form.one("name").trim().is_empty() {
        user["name"] = form.one("name").trim().into();
    }
    if !form.one("password").is_empty() {
        user["password"] = form.one("password").into();
    }
    let a = api(&state, &caller, Method::POST, "/users", Some(user)).await;
    if a.status == StatusCode::CREATED {
        return redirect("/ui/users");
    }
    if a.status.is_client_error() && a.status != StatusCode::FORBIDDEN {
        return users_page(
            &state,
            &caller,
            StatusCode::BAD_REQUEST,
            &form,
            Some(a.error()),
        )
        .await;
    }
    api_failure(&caller, "/ui/users", &a)
}

/// `POST /ui/users/{id}/state`: `disabled=true` disables (their sessions and tokens stop
/// working at every gateway within seconds), `false` enables; `sign_out=1` ends every session.
pub(crate) async fn user_state(
    State(state): St,
    caller: Caller,
    Path(id): Path<Uuid>,
    Posted(form): Posted,
) -> Response {
    let a = if form.one("sign_out") == "1" {
        api(
            &state,
            &caller,
            Method::POST,
            &format!("/users/{id}/sign-out"),
            None,
        )
        .await
    } else {
        let disabled = form.one("disabled") == "true";
        api(
            &state,
            &caller,
            Method::PATCH,
            &format!("/users/{id}"),
            Some(json!({ "disabled": disabled })),
        )
        .await
    };
    if !a.status.is_success() {
        return api_failure(&caller, "/ui/users", &a);
    }
    redirect("/ui/users")
}

/// `POST /ui/resources/{id}/access`: `mode=public` (anyone), or `mode=sign-in` with optional
/// `role`s and `email_domains` (comma-separated); the rest of the resource's access (rules, API
/// keys, service keys...) is kept.
pub(crate) async fn resource_access(
    State(state): St,
    caller: Caller,
    Path(id): Path<Uuid>,
    Posted(form): Posted,
) -> Response {
    let path = format!("/resources/{id}");
    let access = if form.one("mode") == "public" {
        Value::Null
    } else {
        let current = api(&state, &caller, Method::GET, &path, None).await;
        if !current.status.is_success() {
            return api_failure(&caller, "/ui/resources", &current);
        }
        let mut access = match current.body.get("access") {
            Some(a @ Value::Object(_)) => a.clone(),
            _ => json!({}),
        };
        access["roles"] = form.all("role").into();
        access["email_domains"] = form
            .one("email_domains")
            .split([',', ' '])
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .collect::<Vec<_>>()
            .into();
        for flag in ["mcp", "api_keys"] {
            if form.one(flag) == "on" {
                access[flag] = true.into();
            } else if let Some(o) = access.as_object_mut() {
                o.remove(flag);
            }
        }
        access
    };
    let mut change = json!({ "access": access });
    if form.0.iter().any(|(k, _)| k == "policy") {
        change["policy_id"] = match form.one("policy") {
            "" => Value::Null,
            p => match p.parse::<Uuid>() {
                Ok(id) => id.to_string().into(),
                Err(_) => {
                    return super::message(
                        StatusCode::BAD_REQUEST,
                        "Unknown policy",
                        "The form named a policy that is not one. Reload the page.",
                    )
                }
            },
        };
    }
    let a = api(&state, &caller, Method::PATCH, &path, Some(change)).await;
    if !a.status.is_success() {
        return api_failure(&caller, "/ui/resources", &a);
    }
    redirect(&format!("/ui/resources/{id}"))
}

/// `GET /ui/providers`: single sign-on providers, and the form that adds one.
pub(crate) async fn providers(State(state): St, caller: Caller) -> Response {
    providers_page(&state, &caller, StatusCode::OK, &Fields(Vec::new()), None).await
}

async fn providers_page(
    state: &AppState,
    caller: &Caller,
    status: StatusCode,
    form: &Fields,
    error: Option<String>,
) -> Response {
    let (list, roles) = tokio::join!(
        api(state, caller, Method::GET, "/identity-providers", None),
        api(state, caller, Method::GET, "/roles", None),
    );
    if !list.status.is_success() {
        return api_failure(caller, "/ui/providers", &list);
    }
    let roles = role_choices(&roles.body, &form.all("default_role"));
    let control = crate::install::control_url(state, &caller.headers);
    let field = |k: &str| form.one(k).to_owned();
    render(
        caller,
        status,
        "/ui/providers",
        "providers.html",
        "Single sign-on",
        minijinja::context! {
            rows => list.body,
            roles,
            callback => format!("{control}/auth/sso/"),
            error,
            can_write => caller.may("identity_provider:write"),
            kind => if form.one("kind").is_empty() { "oidc".to_owned() } else { field("kind") },
            form_name => field("name"),
            display_name => field("display_name"),
            issuer => field("issuer"),
            client_id => field("client_id"),
            scopes => field("scopes"),
            role_claim => field("role_claim"),
            role_map => field("role_map"),
            auto_provision => form.0.is_empty() || form.one("auto_provision") == "on",
        },
    )
}

/// `role_map` as typed: one `group = role, role` per line.
fn role_map(text: &str) -> Result<serde_json::Map<String, Value>, String> {
    let mut map = serde_json::Map::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let Some((group, roles)) = line.split_once('=') else {
            return Err(format!(
                "role map, line {}: write `group = role, role`",
                n + 1
            ));
        };
        let roles: Vec<Value> = roles
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(Value::from)
            .collect();
        map.insert(group.trim().to_owned(), roles.into());
    }
    Ok(map)
}

/// `POST /ui/providers`.
pub(crate) async fn create_provider(
    State(state): St,
    caller: Caller,
    Posted(form): Posted,
) -> Response {
    let again = |message: String| {
        let (state, caller, form) = (&state, &caller, &form);
        async move { providers_page(state, caller, StatusCode::BAD_REQUEST, form, Some(message)).await }
    };
    let map = match role_map(form.one("role_map")) {
        Ok(m) => m,
        Err(m) => return again(m).await,
    };
    let mut p = json!({
        "name": form.one("name").trim(),
        "kind": form.one("kind"),
        "client_id": form.one("client_id").trim(),
        "client_secret": form.one("client_secret"),
        "role_map": map,
        "default_roles": form.all("default_role"),
        "auto_provision": form.one("auto_provision") == "on",
    });
    for k in ["display_name", "issuer", "role_claim"] {
        if !form.one(k).trim().is_empty() {
            p[k] = form.one(k).trim().into();
        }
    }
    let scopes: Vec<&str> = form.one("scopes").split_whitespace().collect();
    if !scopes.is_empty() {
        p["scopes"] = scopes.into();
    }
    let a = api(
        &state,
        &caller,
        Method::POST,
        "/identity-providers",
        Some(p),
    )
    .await;
    if a.status == StatusCode::CREATED {
        return redirect("/ui/providers");
    }
    if a.status.is_client_error() && a.status != StatusCode::FORBIDDEN {
        return again(a.error()).await;
    }
    api_failure(&caller, "/ui/providers", &a)
}

/// `GET /ui/providers/{id}/delete`.
pub(crate) async fn confirm_delete_provider(
    State(state): St,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Response {
    let a = api(
        &state,
        &caller,
        Method::GET,
        &format!("/identity-providers/{id}"),
        None,
    )
    .await;
    if !a.status.is_success() {
        return api_failure(&caller, "/ui/providers", &a);
    }
    let name = a.body.get("name").and_then(Value::as_str).unwrap_or("");
    render(
        &caller,
        StatusCode::OK,
        "/ui/providers",
        "confirm.html",
        &format!("Delete the provider {name}?"),
        minijinja::context! {
            what => "provider",
            name,
            action => format!("/ui/providers/{id}/delete"),
            back => "/ui/providers",
            also => Vec::<String>::new(),
        },
    )
}

super::confirmed_delete!(
    /// `POST /ui/providers/{id}/delete`: users who signed in with it keep their accounts.
    delete_provider,
    "/identity-providers",
    "/ui/providers"
);
