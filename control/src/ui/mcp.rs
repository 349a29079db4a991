//! The UI's MCP page: the resources that are MCP servers (their clients sign in with OAuth at
//! control, RFC 9728 and the MCP authorization spec) and the grants those clients hold (which
//! client, for whom, to what), each revocable after a confirmation.

use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use serde_json::Value;
use uuid::Uuid;

use super::{api, api_failure, render, Caller, St};

/// `GET /ui/mcp`.
pub(crate) async fn mcp(State(state): St, caller: Caller) -> Response {
    let (resources, grants) = tokio::join!(
        api(&state, &caller, Method::GET, "/resources", None),
        api(
            &state,
            &caller,
            Method::GET,
            "/resources/oauth-grants",
            None
        ),
    );
    if !resources.status.is_success() {
        return api_failure(&caller, "/ui/mcp", &resources);
    }
    if !grants.status.is_success() {
        return api_failure(&caller, "/ui/mcp", &grants);
    }
    let servers: Vec<&Value> = resources
        .body
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|r| r.pointer("/access/mcp") == Some(&Value::Bool(true)))
        .collect();
    render(
        &caller,
        StatusCode::OK,
        "/ui/mcp",
        "mcp.html",
        "MCP servers and their clients",
        minijinja::context! {
            servers,
            grants => grants.body,
            can_write => caller.may("resource:write"),
        },
    )
}

/// `GET /ui/mcp/grants/{id}/revoke`: the confirmation.
pub(crate) async fn confirm_revoke(
    State(state): St,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Response {
    let grants = api(
        &state,
        &caller,
        Method::GET,
        "/resources/oauth-grants",
        None,
    )
    .await;
    if !grants.status.is_success() {
        return api_failure(&caller, "/ui/mcp", &grants);
    }
    let id_text = id.to_string();
    let Some(g) = grants
        .body
        .as_array()
        .and_then(|l| l.iter().find(|g| g["id"].as_str() == Some(&id_text)))
    else {
        return super::message(
            StatusCode::NOT_FOUND,
            "Not found",
            "This grant does not exist, or was revoked already.",
        );
    };
    let name = format!(
        "{} for {} to {}",
        g["client_name"].as_str().unwrap_or("?"),
        g["user_email"].as_str().unwrap_or("?"),
        g["resource"].as_str().unwrap_or("?"),
    );
    render(
        &caller,
        StatusCode::OK,
        "/ui/mcp",
        "confirm.html",
        "Revoke this client's access?",
        minijinja::context! {
            what => "access of",
            verb => "Revoke",
            name,
            action => format!("/ui/mcp/grants/{id}/revoke"),
            back => "/ui/mcp",
            note => "Its tokens are refused at every gateway within seconds; the client must ask its user again.",
            also => Vec::<String>::new(),
        },
    )
}

super::confirmed_delete!(
    /// `POST /ui/mcp/grants/{id}/revoke`.
    revoke,
    "/resources/oauth-grants",
    "/ui/mcp"
);
