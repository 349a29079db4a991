//! The UI's certificates page: every certificate control keeps for the gateways (ordered by ACME
//! or uploaded) with its names, state, expiry and the last error; an ACME order by names, an
//! upload of a chain and key (the key never shown again), a renewal now, and deletion after a
//! confirmation.

use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{act, api, api_failure, redirect, render, Caller, Fields, Posted, St};
use crate::AppState;

/// Days left under which a certificate is shown as expiring.
const WARN_DAYS: i64 = 21;

/// `GET /ui/certificates`.
pub(crate) async fn certificates(State(state): St, caller: Caller) -> Response {
    page(&state, &caller, StatusCode::OK, &Fields(Vec::new()), None).await
}

async fn page(
    state: &AppState,
    caller: &Caller,
    status: StatusCode,
    form: &Fields,
    error: Option<(&'static str, String)>,
) -> Response {
    let list = api(state, caller, Method::GET, "/certificates", None).await;
    if !list.status.is_success() {
        return api_failure(caller, "/ui/certificates", &list);
    }
    let now = crate::store::now_ms();
    let rows: Vec<Value> = list
        .body
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|c| {
            let mut c = c.clone();
            // The chain is public but long: the page shows the facts, not the PEM.
            if let Some(o) = c.as_object_mut() {
                o.remove("chain_pem");
            }
            let left = c["not_after"]
                .as_str()
                .and_then(crate::times::parse_time_ms)
                .map(|t| (t - now).div_euclid(86_400_000));
            c["days_left"] = left.into();
            c["expiring"] = left.is_some_and(|d| d < WARN_DAYS).into();
            c
        })
        .collect();
    let (form_kind, message) = error.unzip();
    render(
        caller,
        status,
        "/ui/certificates",
        "certificates.html",
        "Certificates",
        minijinja::context! {
            rows,
            error => message,
            error_in => form_kind,
            names => form.one("names"),
            challenge => form.one("challenge"),
            chain_pem => form.one("chain_pem"),
            can_write => caller.may("certificate:write"),
        },
    )
}

/// `POST /ui/certificates`: `kind=acme` with `names` and `challenge`, or `kind=upload` with
/// `chain_pem` and `key_pem`.
pub(crate) async fn create(State(state): St, caller: Caller, Posted(form): Posted) -> Response {
    let (kind, cert) = if form.one("kind") == "upload" {
        (
            "upload",
            json!({ "chain_pem": form.one("chain_pem"), "key_pem": form.one("key_pem") }),
        )
    } else {
        let names: Vec<&str> = form
            .one("names")
            .split([',', ' ', '\n'])
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect();
        let mut c = json!({ "names": names });
        if !form.one("challenge").is_empty() {
            c["challenge"] = form.one("challenge").into();
        }
        ("acme", c)
    };
    let a = api(&state, &caller, Method::POST, "/certificates", Some(cert)).await;
    if a.status.is_success() {
        return redirect("/ui/certificates");
    }
    if a.status.is_client_error() && a.status != StatusCode::FORBIDDEN {
        return page(
            &state,
            &caller,
            StatusCode::BAD_REQUEST,
            &form,
            Some((kind, a.error())),
        )
        .await;
    }
    api_failure(&caller, "/ui/certificates", &a)
}

/// `POST /ui/certificates/{id}/renew`: an ACME order now.
pub(crate) async fn renew(
    State(state): St,
    caller: Caller,
    Path(id): Path<Uuid>,
    _: Posted,
) -> Response {
    act(
        &state,
        &caller,
        (Method::POST, &format!("/certificates/{id}/renew"), None),
        "/ui/certificates",
        "/ui/certificates",
    )
    .await
}

/// `GET /ui/certificates/{id}/delete`: the confirmation.
pub(crate) async fn confirm_delete(
    State(state): St,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Response {
    let a = api(
        &state,
        &caller,
        Method::GET,
        &format!("/certificates/{id}"),
        None,
    )
    .await;
    if !a.status.is_success() {
        return api_failure(&caller, "/ui/certificates", &a);
    }
    let names = a.body["names"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    render(
        &caller,
        StatusCode::OK,
        "/ui/certificates",
        "confirm.html",
        &format!("Delete the certificate for {names}?"),
        minijinja::context! {
            what => "certificate for",
            name => names,
            action => format!("/ui/certificates/{id}/delete"),
            back => "/ui/certificates",
            note => "Gateways stop serving it; a resource's hostname gets a new order when it needs one.",
            also => Vec::<String>::new(),
        },
    )
}

super::confirmed_delete!(
    /// `POST /ui/certificates/{id}/delete`.
    delete,
    "/certificates",
    "/ui/certificates"
);
