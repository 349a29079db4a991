//! The UI's agent sessions page: the sessions the signed-in user may see (their own and their
//! teams'), their status live (the API's status stream, passed through as Server-Sent Events),
//! a link that opens each at the gateways' sessions hostname, read-only share links made and
//! revoked, and sessions stopped after a confirmation.

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use uuid::Uuid;

use super::{api, api_failure, api_response, redirect, render, Caller, Posted, St};
use crate::AppState;

/// The sessions of one search (`scope=user` or `team`).
async fn search(state: &AppState, caller: &Caller, scope: &str) -> Result<Vec<Value>, Response> {
    let a = api(
        state,
        caller,
        Method::GET,
        &format!("/sessions/search?scope={scope}"),
        None,
    )
    .await;
    if !a.status.is_success() {
        return Err(api_failure(caller, "/ui/sessions", &a));
    }
    Ok(a.body
        .get("sessions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default())
}

/// `GET /ui/sessions`.
pub(crate) async fn sessions(State(state): St, caller: Caller) -> Response {
    sessions_page(&state, &caller, None).await
}

/// The page; `shared` is a session whose share link was just made (its URL is shown).
async fn sessions_page(state: &AppState, caller: &Caller, shared: Option<Value>) -> Response {
    let (mine, teams) = tokio::join!(search(state, caller, "user"), search(state, caller, "team"));
    let (mut rows, teams) = match (mine, teams) {
        (Ok(m), Ok(t)) => (m, t),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    rows.extend(teams);
    rows.sort_by(|a, b| {
        b["started_at"]
            .as_str()
            .cmp(&a["started_at"].as_str())
            .then_with(|| a["session_id"].as_str().cmp(&b["session_id"].as_str()))
    });
    let names: HashMap<String, String> = match super::site_names(state, caller).await {
        Ok(n) => n.into_iter().collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the config snapshot for site names");
            HashMap::new()
        }
    };
    let host = state.store.sessions_host();
    for r in &mut rows {
        let site = r["site_id"].as_str().unwrap_or("").to_owned();
        r["site"] = names.get(&site).cloned().unwrap_or(site).into();
        let ended = matches!(r["status"].as_str(), Some("stopped" | "failed"));
        r["ended"] = ended.into();
        if let (Some(h), Some(id), false) = (host, r["session_id"].as_str(), ended) {
            r["open_url"] = format!("https://{h}/{id}/").into();
        }
    }
    let live: Vec<&str> = rows
        .iter()
        .filter(|r| r["ended"] != true)
        .filter_map(|r| r["session_id"].as_str())
        .collect();
    let shared = shared.map(|mut s| {
        if let (Some(h), Some(path)) = (host, s["share_url"].as_str()) {
            s["url"] = format!("https://{h}{path}").into();
        }
        s
    });
    render(
        caller,
        StatusCode::OK,
        "/ui/sessions",
        "sessions.html",
        "Agent sessions",
        minijinja::context! {
            live_sessions => !live.is_empty(),
            rows,
            shared,
            sessions_host => host,
            can_delete => caller.may("session:delete"),
        },
    )
}

/// `GET /ui/sessions/events`: the API's status stream (agentapi-proxy's `session_id`, `status`,
/// `timestamp` events), as the user sees it.
pub(crate) async fn events(State(state): St, caller: Caller) -> Response {
    match api_response(
        &state,
        &caller,
        Method::GET,
        "/sessions/sessions/status/stream",
        None,
    )
    .await
    {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => r.status().into_response(),
        Err(a) => a.status.into_response(),
    }
}

/// `POST /ui/sessions/{id}/share`: `revoke=1` ends the share link; otherwise a read-only link
/// (anyone holding it may look, without signing in, until it is revoked).
pub(crate) async fn share(
    State(state): St,
    caller: Caller,
    Path(id): Path<Uuid>,
    Posted(form): Posted,
) -> Response {
    let path = format!("/sessions/sessions/{id}/share");
    if form.one("revoke") == "1" {
        let a = api(&state, &caller, Method::DELETE, &path, None).await;
        if !a.status.is_success() {
            return api_failure(&caller, "/ui/sessions", &a);
        }
        return redirect("/ui/sessions");
    }
    let a = api(&state, &caller, Method::POST, &path, None).await;
    if !a.status.is_success() {
        return api_failure(&caller, "/ui/sessions", &a);
    }
    sessions_page(&state, &caller, Some(a.body)).await
}

/// `GET /ui/sessions/{id}/stop`: the confirmation.
pub(crate) async fn confirm_stop(caller: Caller, Path(id): Path<Uuid>) -> Response {
    render(
        &caller,
        StatusCode::OK,
        "/ui/sessions",
        "confirm.html",
        "Stop this agent session?",
        minijinja::context! {
            what => "session",
            verb => "Stop",
            name => id.to_string(),
            action => format!("/ui/sessions/{id}/stop"),
            back => "/ui/sessions",
            note => "Its process is ended (SIGTERM, then SIGKILL) and its share link stops working.",
            also => Vec::<String>::new(),
        },
    )
}

super::confirmed_delete!(
    /// `POST /ui/sessions/{id}/stop`.
    stop,
    "/sessions/sessions",
    "/ui/sessions"
);
