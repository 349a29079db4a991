//! A resource's share links, from its page: made with a name, a lifetime and a number of uses
//! (the link shown once, on the page that made it), and revoked after a confirmation (which
//! ends the sessions it opened).

use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use serde_json::json;
use uuid::Uuid;

use super::pages::{resource_page, ShareNotice};
use super::{act, api, api_failure, render, Caller, Posted, St};

/// `POST /ui/resources/{id}/share-links`.
pub(crate) async fn create(
    State(state): St,
    caller: Caller,
    Path(id): Path<Uuid>,
    Posted(form): Posted,
) -> Response {
    let refused = |error: String| {
        let (state, caller) = (&state, &caller);
        async move {
            let notice = ShareNotice {
                created: None,
                error: Some(error),
            };
            resource_page(state, caller, id, StatusCode::BAD_REQUEST, notice).await
        }
    };
    let mut link = json!({});
    if !form.one("name").trim().is_empty() {
        link["name"] = form.one("name").trim().into();
    }
    let hours = form.one("expires_in_hours").trim();
    if !hours.is_empty() {
        match hours.parse::<u32>() {
            Ok(h) => link["expires_in_seconds"] = h.saturating_mul(3600).into(),
            Err(_) => {
                return refused(format!(
                    "expires in: {hours:?} is not a number of hours; leave it empty for 7 days"
                ))
                .await
            }
        }
    }
    let uses = form.one("max_uses").trim();
    if !uses.is_empty() {
        match uses.parse::<u32>() {
            Ok(n) => link["max_uses"] = n.into(),
            Err(_) => {
                return refused(format!(
                    "uses: {uses:?} is not a whole number; leave it empty for no limit"
                ))
                .await
            }
        }
    }
    let path = format!("/resources/{id}/share-links");
    let a = api(&state, &caller, Method::POST, &path, Some(link)).await;
    if a.status == StatusCode::CREATED {
        let notice = ShareNotice {
            created: Some(a.body),
            error: None,
        };
        return resource_page(&state, &caller, id, StatusCode::CREATED, notice).await;
    }
    if a.status.is_client_error() && a.status != StatusCode::FORBIDDEN {
        return refused(a.error()).await;
    }
    api_failure(&caller, "/ui/resources", &a)
}

/// `GET /ui/resources/{id}/share-links/{link}/revoke`: the confirmation.
pub(crate) async fn confirm_revoke(
    caller: Caller,
    Path((id, link)): Path<(Uuid, Uuid)>,
) -> Response {
    render(
        &caller,
        StatusCode::OK,
        "/ui/resources",
        "confirm.html",
        "Revoke this share link?",
        minijinja::context! {
            what => "share link",
            verb => "Revoke",
            name => link.to_string(),
            action => format!("/ui/resources/{id}/share-links/{link}/revoke"),
            back => format!("/ui/resources/{id}"),
            note => "It opens nothing more, and the sessions it opened end within seconds.",
            also => Vec::<String>::new(),
        },
    )
}

/// `POST /ui/resources/{id}/share-links/{link}/revoke`.
pub(crate) async fn revoke(
    State(state): St,
    caller: Caller,
    Path((id, link)): Path<(Uuid, Uuid)>,
    _: Posted,
) -> Response {
    act(
        &state,
        &caller,
        (
            Method::DELETE,
            &format!("/resources/{id}/share-links/{link}"),
            None,
        ),
        "/ui/resources",
        &format!("/ui/resources/{id}"),
    )
    .await
}
