//! The UI's gateway pages: a gateway made with its name and public WireGuard endpoint, then its
//! page with how to run it (the token shown only then: a systemd recipe, a container), its
//! state live (online, last handshake, version), a new token, and deletion after a
//! confirmation; and the revocation of a site or a gateway (its credential ends at once, it
//! stays listed, a new token brings it back), after a confirmation.

use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};
use uuid::Uuid;

use super::pages::snippets::{self, Program};
use super::{api, api_failure, render, Caller, Posted, St};
use crate::AppState;

/// `POST /ui/gateways`.
pub(crate) async fn create(State(state): St, caller: Caller, Posted(form): Posted) -> Response {
    let mut body = json!({ "name": form.one("name").trim() });
    if !form.one("endpoint").trim().is_empty() {
        body["endpoint"] = form.one("endpoint").trim().into();
    }
    let a = api(&state, &caller, Method::POST, "/gateways", Some(body)).await;
    if a.status == StatusCode::CREATED {
        return view(&state, &caller, StatusCode::CREATED, &a.body);
    }
    if a.status.is_client_error() && a.status != StatusCode::FORBIDDEN {
        return super::pages::gateways_page(
            &state,
            &caller,
            StatusCode::BAD_REQUEST,
            (form.one("name"), form.one("endpoint")),
            Some(a.error()),
        )
        .await;
    }
    api_failure(&caller, "/ui/gateways", &a)
}

/// `GET /ui/gateways/{id}`.
pub(crate) async fn gateway(State(state): St, caller: Caller, Path(id): Path<Uuid>) -> Response {
    let a = api(
        &state,
        &caller,
        Method::GET,
        &format!("/gateways/{id}"),
        None,
    )
    .await;
    if !a.status.is_success() {
        return api_failure(&caller, "/ui/gateways", &a);
    }
    view(&state, &caller, StatusCode::OK, &a.body)
}

/// `POST /ui/gateways/{id}/token`: a new token (the old credential stops working).
pub(crate) async fn token(
    State(state): St,
    caller: Caller,
    Path(id): Path<Uuid>,
    _: Posted,
) -> Response {
    let path = format!("/gateways/{id}");
    let t = api(
        &state,
        &caller,
        Method::POST,
        &format!("{path}/enrollment-token"),
        None,
    )
    .await;
    if !t.status.is_success() {
        return api_failure(&caller, "/ui/gateways", &t);
    }
    let a = api(&state, &caller, Method::GET, &path, None).await;
    if !a.status.is_success() {
        return api_failure(&caller, "/ui/gateways", &a);
    }
    let mut g = a.body;
    if let Some(t) = t.body.get("enrollment_token") {
        g["enrollment_token"] = t.clone();
    }
    view(&state, &caller, StatusCode::OK, &g)
}

fn view(state: &AppState, caller: &Caller, status: StatusCode, g: &Value) -> Response {
    let token = g["enrollment_token"].as_str();
    let control = crate::install::control_url(state, &caller.headers);
    let run = token.map(|t| {
        format!(
            "kakuremichi-gateway --control {control} --token {t} \\\n  --data-dir /var/lib/kakuremichi-gateway{}",
            if control.starts_with("http://") {
                " --allow-insecure-control"
            } else {
                ""
            }
        )
    });
    render(
        caller,
        status,
        "/ui/gateways",
        "gateway.html",
        g["name"].as_str().unwrap_or("gateway"),
        minijinja::context! {
            gateway => g,
            wg_port => g["endpoint"]
                .as_str()
                .and_then(|e| e.rsplit(':').next())
                .unwrap_or("51820"),
            run,
            systemd => token.map(|t| snippets::systemd(&control, t, Program::Gateway)),
            container => token.map(|t| snippets::container(&control, t, Program::Gateway)),
            can_write => caller.may("gateway:write"),
            live => g["id"].as_str().unwrap_or(""),
        },
    )
}

/// `GET /ui/gateways/{id}/delete`: the confirmation.
pub(crate) async fn confirm_delete(
    State(state): St,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Response {
    let a = api(
        &state,
        &caller,
        Method::GET,
        &format!("/gateways/{id}"),
        None,
    )
    .await;
    if !a.status.is_success() {
        return api_failure(&caller, "/ui/gateways", &a);
    }
    let name = a.body["name"].as_str().unwrap_or("");
    render(
        &caller,
        StatusCode::OK,
        "/ui/gateways",
        "confirm.html",
        &format!("Delete gateway {name}?"),
        minijinja::context! {
            what => "gateway",
            name,
            action => format!("/ui/gateways/{id}/delete"),
            back => format!("/ui/gateways/{id}"),
            note => "It is refused from then on; agents stop sending it traffic and clients reach the other gateways.",
            also => Vec::<String>::new(),
        },
    )
}

super::confirmed_delete!(
    /// `POST /ui/gateways/{id}/delete`.
    delete,
    "/gateways",
    "/ui/gateways"
);

/// A revocation's confirmation for a site or a gateway (`kind`: `sites` or `gateways`).
async fn confirm_revoke(state: &AppState, caller: &Caller, kind: &str, id: Uuid) -> Response {
    let back = format!("/ui/{kind}/{id}");
    let a = api(state, caller, Method::GET, &format!("/{kind}/{id}"), None).await;
    if !a.status.is_success() {
        return api_failure(caller, &format!("/ui/{kind}"), &a);
    }
    let what = if kind == "sites" { "site" } else { "gateway" };
    let name = a.body["name"].as_str().unwrap_or("");
    render(
        caller,
        StatusCode::OK,
        &format!("/ui/{kind}"),
        "confirm.html",
        &format!("Revoke {what} {name}?"),
        minijinja::context! {
            what,
            verb => "Revoke",
            name,
            action => format!("{back}/revoke"),
            back,
            note => "Its credential, key and token stop working and its connection ends at once; it stays listed, and a new token brings it back.",
            also => Vec::<String>::new(),
        },
    )
}

/// `GET /ui/sites/{id}/revoke`.
pub(crate) async fn confirm_revoke_site(
    State(state): St,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Response {
    confirm_revoke(&state, &caller, "sites", id).await
}

/// `GET /ui/gateways/{id}/revoke`.
pub(crate) async fn confirm_revoke_gateway(
    State(state): St,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Response {
    confirm_revoke(&state, &caller, "gateways", id).await
}

async fn revoke(state: &AppState, caller: &Caller, kind: &str, id: Uuid) -> Response {
    let back = format!("/ui/{kind}/{id}");
    super::act(
        state,
        caller,
        (Method::POST, &format!("/{kind}/{id}/revoke"), None),
        &format!("/ui/{kind}"),
        &back,
    )
    .await
}

/// `POST /ui/sites/{id}/revoke`.
pub(crate) async fn revoke_site(
    State(state): St,
    caller: Caller,
    Path(id): Path<Uuid>,
    _: Posted,
) -> Response {
    revoke(&state, &caller, "sites", id).await
}

/// `POST /ui/gateways/{id}/revoke`.
pub(crate) async fn revoke_gateway(
    State(state): St,
    caller: Caller,
    Path(id): Path<Uuid>,
    _: Posted,
) -> Response {
    revoke(&state, &caller, "gateways", id).await
}
