//! What sites and gateways share in the API: the view with live status, the handlers and the
//! router; [`NodeApi`] holds what differs.

use std::net::Ipv4Addr;

use crate::api::doc::ApiRouter;
use crate::api::doc::{get, post};
use axum::extract::State;
use axum::http::StatusCode;
use kakuremichi_proto::{NodeKind, PeerStatus, Secret, TargetStatus, WgPublicKey};
use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

use super::{ApiJson, ApiPath, Org};
use crate::store::Node;
use crate::{ApiError, AppState};

/// A site or gateway as the API shows it.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct NodeView {
    /// Id (also the node id on the control channel).
    pub id: Uuid,
    /// Display name.
    pub name: String,
    /// Overlay address.
    pub overlay_address: Ipv4Addr,
    /// Gateways only: the `host:port` agents dial.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// WireGuard public key, once enrolled.
    pub public_key: Option<WgPublicKey>,
    /// Holds a credential and a public key.
    pub enrolled: bool,
    /// Has an open control session now.
    pub online: bool,
    /// Last message from the node.
    #[serde(serialize_with = "crate::times::opt_ms")]
    #[schemars(with = "Option<crate::times::DateTime>")]
    pub last_seen_at: Option<i64>,
    /// Config version last applied by the node.
    pub applied_version: Option<u64>,
    /// Software version from the node's hello.
    pub software_version: Option<String>,
    /// Freshest WireGuard handshake among the peers of the latest status.
    #[serde(serialize_with = "crate::times::opt_ms")]
    #[schemars(with = "Option<crate::times::DateTime>")]
    pub last_handshake_at: Option<i64>,
    /// When the latest status arrived.
    #[serde(serialize_with = "crate::times::opt_ms")]
    #[schemars(with = "Option<crate::times::DateTime>")]
    pub status_at: Option<i64>,
    /// Peers of the latest status.
    pub peers: Vec<PeerStatus>,
    /// Sites only: target reachability of the latest status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub targets: Option<Vec<TargetStatus>>,
    /// Sites only: the labels its agent runs sessions with (`--session-label`).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub session_labels: std::collections::BTreeMap<String, String>,
    /// Creation time.
    #[serde(serialize_with = "crate::times::ms")]
    #[schemars(with = "crate::times::DateTime")]
    pub created_at: i64,
    /// The one-time enrollment token, only in the answer that created it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enrollment_token: Option<Secret>,
    /// Sites only, beside the token: the one-line install that enrolls a host with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub install_command: Option<String>,
}

impl NodeView {
    /// The view of a stored node.
    pub fn new(node: Node, online: bool) -> Self {
        let enrolled = node.enrolled();
        let status = node.last_status;
        let last_handshake_at = status.as_ref().and_then(|s| {
            let freshest = s
                .peers
                .iter()
                .filter_map(|p| p.last_handshake_age_ms)
                .min()?;
            let at = node.last_status_at?;
            Some(at.saturating_sub(i64::try_from(freshest).unwrap_or(i64::MAX)))
        });
        let (peers, targets, session_labels) = match status {
            Some(s) => (s.peers, s.targets, s.session_labels),
            None => (Vec::new(), Vec::new(), Default::default()),
        };
        Self {
            id: node.id,
            name: node.name,
            overlay_address: node.overlay_address,
            endpoint: node.endpoint,
            public_key: node.public_key,
            enrolled,
            online,
            last_seen_at: node.last_seen_at,
            applied_version: node.applied_version,
            software_version: node.software_version,
            last_handshake_at,
            status_at: node.last_status_at,
            peers,
            targets: (node.kind == NodeKind::Agent).then_some(targets),
            session_labels,
            created_at: node.created_at,
            enrollment_token: None,
            install_command: None,
        }
    }
}

/// Answer of `POST .../enrollment-token`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct TokenView {
    /// The new one-time enrollment token.
    pub enrollment_token: Secret,
    /// Sites only: the one-line install that enrolls a host with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub install_command: Option<String>,
}

/// The one-line install for a site's new token (`None` for a gateway).
fn install_command(
    state: &AppState,
    headers: &axum::http::HeaderMap,
    kind: NodeKind,
    token: &Secret,
) -> Option<String> {
    (kind == NodeKind::Agent).then(|| {
        crate::install::command(&crate::install::control_url(state, headers), token.expose())
    })
}

/// What sets the sites and gateways routers apart: the node kind, the path, and the bodies of
/// `POST` and `PATCH` with their validation. Everything else is shared by [`router`].
pub trait NodeApi: 'static {
    /// The kind of node served.
    const KIND: NodeKind;
    /// The collection path, e.g. `/sites`.
    const PATH: &'static str;
    /// Body of `POST {PATH}`.
    type Create: DeserializeOwned + schemars::JsonSchema + Send + 'static;
    /// Body of `PATCH {PATH}/{id}`.
    type Update: DeserializeOwned + schemars::JsonSchema + Send + 'static;
    /// The validated name and endpoint of a create body; a bad value is a 400.
    fn create_fields(body: Self::Create) -> Result<(String, Option<String>), ApiError>;
    /// The validated new name and endpoint of an update body (`None` keeps the field).
    fn update_fields(body: Self::Update) -> Result<(Option<String>, Option<String>), ApiError>;
}

/// The router of one node kind: list, create, get, update, delete, regenerate the token (which
/// revokes the current credential), revoke.
pub fn router<N: NodeApi>() -> ApiRouter<AppState> {
    let path = N::PATH;
    ApiRouter::new()
        .route(
            path,
            get(list::<N>)
                .summary("the list")
                .paged()
                .returns::<Vec<NodeView>>(200)
                .post(create::<N>)
                .summary("creates one, with its one-time enrollment token")
                .body::<N::Create>()
                .returns::<NodeView>(201),
        )
        .route(
            &format!("{path}/{{id}}"),
            get(one::<N>)
                .returns::<NodeView>(200)
                .patch(update::<N>)
                .body::<N::Update>()
                .returns::<NodeView>(200)
                .delete(remove::<N>),
        )
        .route(
            &format!("{path}/{{id}}/enrollment-token"),
            post(regenerate_token::<N>)
                .summary("a new one-time token; the old credential is revoked")
                .returns::<TokenView>(200),
        )
        .route(
            &format!("{path}/{{id}}/revoke"),
            post(revoke::<N>)
                .summary("no credential, no key, no token; its session ends")
                .returns::<NodeView>(200),
        )
}

fn view(state: &AppState, node: Node) -> NodeView {
    let online = state.hub.is_online(node.id);
    NodeView::new(fresh(state, node), online)
}

/// The node with its activity not flushed to the store yet (newer than the row): last seen,
/// versions, latest status report.
pub(crate) fn fresh(state: &AppState, mut node: Node) -> Node {
    if let Some(a) = state.activity.peek(node.kind, node.id) {
        node.last_seen_at = node.last_seen_at.max(a.seen_at);
        node.applied_version = a.applied_version.or(node.applied_version);
        node.software_version = a.software_version.or(node.software_version);
        if let Some((json, at)) = a.status {
            if let Ok(report) = serde_json::from_str(&json) {
                node.last_status = Some(report);
                node.last_status_at = Some(at);
            }
        }
    }
    node
}

/// The node, if it belongs to `org`; another organization's is "not found" as well.
async fn owned(state: &AppState, org: Org, kind: NodeKind, id: Uuid) -> Result<Node, ApiError> {
    let node = state.store.get_node(kind, id).await?;
    let what = match kind {
        NodeKind::Agent => "site",
        NodeKind::Gateway => "gateway",
    };
    org.owns(node.org_id, what)?;
    Ok(node)
}

async fn create<N: NodeApi>(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    org: Org,
    ApiJson(body): ApiJson<N::Create>,
) -> Result<(StatusCode, ApiJson<NodeView>), ApiError> {
    let kind = N::KIND;
    let (name, endpoint) = N::create_fields(body)?;
    let (node, token) = state
        .store
        .create_node(kind, org.0, &name, endpoint.as_deref())
        .await?;
    tracing::info!(node_id = %node.id, %kind, "node created");
    let mut v = view(&state, node);
    v.install_command = install_command(&state, &headers, kind, &token);
    v.enrollment_token = Some(token);
    Ok((StatusCode::CREATED, ApiJson(v)))
}

async fn list<N: NodeApi>(
    State(state): State<AppState>,
    org: Org,
    paged: super::page::Paged,
) -> Result<axum::response::Response, ApiError> {
    let nodes = state.store.list_nodes(N::KIND).await?;
    let views: Vec<NodeView> = nodes
        .into_iter()
        .filter(|n| n.org_id == org.0)
        .map(|n| view(&state, n))
        .collect();
    paged.page(views)
}

async fn one<N: NodeApi>(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiJson<NodeView>, ApiError> {
    let node = owned(&state, org, N::KIND, id).await?;
    Ok(ApiJson(view(&state, node)))
}

async fn update<N: NodeApi>(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<N::Update>,
) -> Result<ApiJson<NodeView>, ApiError> {
    owned(&state, org, N::KIND, id).await?;
    let (name, endpoint) = N::update_fields(body)?;
    let node = state
        .store
        .update_node(N::KIND, id, name.as_deref(), endpoint.as_deref())
        .await?;
    Ok(ApiJson(view(&state, node)))
}

async fn remove<N: NodeApi>(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let kind = N::KIND;
    owned(&state, org, kind, id).await?;
    state.store.delete_node(kind, id).await?;
    tracing::info!(node_id = %id, %kind, "node deleted");
    Ok(StatusCode::NO_CONTENT)
}

async fn regenerate_token<N: NodeApi>(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiJson<TokenView>, ApiError> {
    owned(&state, org, N::KIND, id).await?;
    let token = state.store.regenerate_enrollment_token(N::KIND, id).await?;
    tracing::info!(node_id = %id, kind = %N::KIND, "enrollment token regenerated; credential revoked");
    Ok(ApiJson(TokenView {
        install_command: install_command(&state, &headers, N::KIND, &token),
        enrollment_token: token,
    }))
}

async fn revoke<N: NodeApi>(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiJson<NodeView>, ApiError> {
    let kind = N::KIND;
    owned(&state, org, kind, id).await?;
    state.store.revoke_node(kind, id).await?;
    tracing::info!(node_id = %id, %kind, "node revoked");
    let node = state.store.get_node(kind, id).await?;
    Ok(ApiJson(view(&state, node)))
}
