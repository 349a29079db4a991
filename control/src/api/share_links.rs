//! `/resources/{id}/share-links`: secret links that let whoever opens them into one protected
//! resource without an account, with an expiry, an optional number of uses, and revocation that
//! ends the sessions they opened.

use crate::api::doc::ApiRouter;
use crate::api::doc::{delete, get};
use axum::extract::State;
use axum::http::StatusCode;
use kakuremichi_proto::identity::GATEWAY_AUTH_PREFIX;
use kakuremichi_proto::Secret;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{invalid, ApiJson, ApiPath, Org};
use crate::store::{now_ms, ShareLink};
use crate::{validate, ApiError, AppState};

/// The longest a share link may live: a year.
pub const MAX_LIFE_SECS: u32 = 365 * 86_400;

/// Body of `POST /resources/{id}/share-links`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateLink {
    /// Display name (default `share link`).
    pub name: Option<String>,
    /// Seconds until it expires (1 to a year; default 7 days). Sessions it opens end then too.
    pub expires_in_seconds: Option<u32>,
    /// How many times it may be opened (1 to 1,000,000); absent: until it expires.
    pub max_uses: Option<u32>,
}

/// A new link: its fields, its secret and the path to open on the resource's hostname (shown
/// once).
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct CreatedLink {
    /// The link's fields.
    #[serde(flatten)]
    pub link: ShareLink,
    /// `/.kakuremichi/auth/share/<secret>`, to open on the resource's hostname.
    pub path: Secret,
    /// The secret alone.
    pub secret: Secret,
}

/// The share links router.
pub fn router() -> ApiRouter<AppState> {
    ApiRouter::new()
        .route(
            "/resources/{id}/share-links",
            get(list)
                .summary("a resource's share links")
                .returns::<Vec<ShareLink>>(200)
                .post(create)
                .summary("a link that lets whoever opens it in; its secret is shown once")
                .body::<CreateLink>()
                .returns::<CreatedLink>(201),
        )
        .route("/resources/{id}/share-links/{link_id}", delete(revoke))
}

/// The resource, when it is `org`'s and needs sign-in (a public one needs no link).
async fn protected(state: &AppState, org: Org, id: Uuid) -> Result<(), ApiError> {
    let r = state.store.get_resource(id).await?;
    org.owns(r.org_id, "resource")?;
    if r.access.is_none() {
        return Err(invalid(
            "this resource is public: give it an access policy before sharing links to it".into(),
        ));
    }
    Ok(())
}

async fn create(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<CreateLink>,
) -> Result<(StatusCode, ApiJson<CreatedLink>), ApiError> {
    protected(&state, org, id).await?;
    let name = match &body.name {
        Some(n) => validate::name(n).map_err(invalid)?,
        None => "share link".to_owned(),
    };
    let secs = body.expires_in_seconds.unwrap_or(7 * 86_400);
    if !(1..=MAX_LIFE_SECS).contains(&secs) {
        return Err(invalid(format!(
            "expires_in_seconds must be from 1 to {MAX_LIFE_SECS}"
        )));
    }
    if body.max_uses.is_some_and(|m| !(1..=1_000_000).contains(&m)) {
        return Err(invalid("max_uses must be from 1 to 1000000".into()));
    }
    let (link, secret) = state
        .store
        .create_share_link(
            org.0,
            id,
            &name,
            now_ms() + i64::from(secs) * 1000,
            body.max_uses.map(i64::from),
        )
        .await?;
    tracing::info!(share_link = %link.id, resource_id = %id, "share link created");
    let path = Secret::new(format!("{GATEWAY_AUTH_PREFIX}share/{}", secret.expose()));
    Ok((
        StatusCode::CREATED,
        ApiJson(CreatedLink { link, path, secret }),
    ))
}

async fn list(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiJson<Vec<ShareLink>>, ApiError> {
    let r = state.store.get_resource(id).await?;
    org.owns(r.org_id, "resource")?;
    Ok(ApiJson(state.store.list_share_links(org.0, id).await?))
}

async fn revoke(
    State(state): State<AppState>,
    org: Org,
    ApiPath((id, link)): ApiPath<(Uuid, Uuid)>,
) -> Result<StatusCode, ApiError> {
    state.store.revoke_share_link(org.0, id, link).await?;
    tracing::info!(share_link = %link, resource_id = %id, "share link revoked");
    Ok(StatusCode::NO_CONTENT)
}
