//! What sites and gateways share in the API: the view with live status, and the handlers.

use std::net::Ipv4Addr;

use axum::extract::State;
use axum::http::StatusCode;
use kakuremichi_proto::{NodeKind, PeerStatus, Secret, TargetStatus, WgPublicKey};
use serde::Serialize;
use uuid::Uuid;

use super::{ApiJson, ApiPath};
use crate::store::Node;
use crate::{ApiError, AppState};

/// A site or gateway as the API shows it.
#[derive(Debug, Serialize)]
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
    /// Last message from the node (unix ms).
    pub last_seen_at: Option<i64>,
    /// Config version last applied by the node.
    pub applied_version: Option<u64>,
    /// Software version from the node's hello.
    pub software_version: Option<String>,
    /// Freshest WireGuard handshake among the peers of the latest status (unix ms).
    pub last_handshake_at: Option<i64>,
    /// When the latest status arrived (unix ms).
    pub status_at: Option<i64>,
    /// Peers of the latest status.
    pub peers: Vec<PeerStatus>,
    /// Sites only: target reachability of the latest status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub targets: Option<Vec<TargetStatus>>,
    /// Creation time (unix ms).
    pub created_at: i64,
    /// The one-time enrollment token, only in the answer that created it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enrollment_token: Option<Secret>,
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
        let (peers, targets) = match status {
            Some(s) => (s.peers, s.targets),
            None => (Vec::new(), Vec::new()),
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
            created_at: node.created_at,
            enrollment_token: None,
        }
    }
}

/// Answer of `POST .../enrollment-token`.
#[derive(Debug, Serialize)]
pub struct TokenView {
    /// The new one-time enrollment token.
    pub enrollment_token: Secret,
}

fn view(state: &AppState, node: Node) -> NodeView {
    let online = state.hub.is_online(node.id);
    NodeView::new(node, online)
}

pub(crate) async fn create(
    state: &AppState,
    kind: NodeKind,
    name: &str,
    endpoint: Option<&str>,
) -> Result<(StatusCode, ApiJson<NodeView>), ApiError> {
    let (node, token) = state.store.create_node(kind, name, endpoint).await?;
    tracing::info!(node_id = %node.id, %kind, "node created");
    let mut v = view(state, node);
    v.enrollment_token = Some(token);
    Ok((StatusCode::CREATED, ApiJson(v)))
}

pub(crate) async fn list(
    state: &AppState,
    kind: NodeKind,
) -> Result<ApiJson<Vec<NodeView>>, ApiError> {
    let nodes = state.store.list_nodes(kind).await?;
    Ok(ApiJson(nodes.into_iter().map(|n| view(state, n)).collect()))
}

pub(crate) async fn get(
    state: &AppState,
    kind: NodeKind,
    id: Uuid,
) -> Result<ApiJson<NodeView>, ApiError> {
    let node = state.store.get_node(kind, id).await?;
    Ok(ApiJson(view(state, node)))
}

pub(crate) async fn update(
    state: &AppState,
    kind: NodeKind,
    id: Uuid,
    name: Option<&str>,
    endpoint: Option<&str>,
) -> Result<ApiJson<NodeView>, ApiError> {
    let node = state.store.update_node(kind, id, name, endpoint).await?;
    Ok(ApiJson(view(state, node)))
}

pub(crate) async fn delete(
    state: &AppState,
    kind: NodeKind,
    id: Uuid,
) -> Result<StatusCode, ApiError> {
    state.store.delete_node(kind, id).await?;
    tracing::info!(node_id = %id, %kind, "node deleted");
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn regenerate_token(
    State(state): State<AppState>,
    kind: NodeKind,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiJson<TokenView>, ApiError> {
    let token = state.store.regenerate_enrollment_token(kind, id).await?;
    Ok(ApiJson(TokenView {
        enrollment_token: token,
    }))
}
