//! The node WebSocket hub at `GET /api/v1/nodes/connect`.
//!
//! A session: the first frame must be a [`NodeMessage::Hello`] within the hello timeout; control
//! checks the protocol version and the credential, answers [`ControlMessage::Welcome`] and a full
//! [`ConfigSnapshot`], then waits on the store's config-version signal. On every new version the
//! session recomputes the node's snapshot and sends it only if it differs from the last one sent.
//! Applied versions, status reports and liveness are recorded in the store; online state is the
//! set of open sessions in this process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use kakuremichi_proto::{
    check_protocol_version, ConfigSnapshot, ControlMessage, NodeKind, NodeMessage, RefuseReason,
    PROTOCOL_VERSION,
};
use tokio::time::{sleep_until, timeout, Instant};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::{ApiError, AppState, MAX_BODY_BYTES};

/// Close code for refused sessions (policy violation).
const CLOSE_POLICY: u16 = 1008;
/// Close code when control shuts down.
const CLOSE_GOING_AWAY: u16 = 1001;

/// The open sessions, by node id.
#[derive(Debug, Default)]
pub struct Hub {
    sessions: Mutex<HashMap<Uuid, (NodeKind, u64)>>,
    next_generation: AtomicU64,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, (NodeKind, u64)>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, id: Uuid, kind: NodeKind) -> u64 {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, (kind, generation));
        generation
    }

    fn unregister(&self, id: Uuid, generation: u64) {
        let mut sessions = self.lock();
        if sessions.get(&id).is_some_and(|(_, g)| *g == generation) {
            sessions.remove(&id);
        }
    }

    /// Whether the node has an open session.
    pub fn is_online(&self, id: Uuid) -> bool {
        self.lock().contains_key(&id)
    }

    /// How many nodes of a kind have an open session.
    pub fn online_count(&self, kind: NodeKind) -> usize {
        self.lock().values().filter(|(k, _)| *k == kind).count()
    }
}

/// Upgrades `GET /api/v1/nodes/connect` to a node session.
pub async fn connect(
    State(state): State<AppState>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match ws {
        Ok(ws) => ws
            .max_message_size(MAX_BODY_BYTES)
            .on_upgrade(move |socket| session(state, socket))
            .into_response(),
        Err(e) => ApiError::BadRequest(format!(
            "this path expects a WebSocket upgrade: {}",
            e.body_text()
        ))
        .into_response(),
    }
}

fn text(msg: &ControlMessage) -> Option<Message> {
    match serde_json::to_string(msg) {
        Ok(s) => Some(Message::Text(s.into())),
        Err(e) => {
            tracing::error!(error = %e, "cannot serialize a control message");
            None
        }
    }
}

async fn send(socket: &mut WebSocket, msg: &ControlMessage) -> bool {
    match text(msg) {
        Some(m) => socket.send(m).await.is_ok(),
        None => false,
    }
}

async fn refuse(mut socket: WebSocket, reason: RefuseReason, message: String) {
    tracing::info!(?reason, %message, "node refused");
    let _ = send(&mut socket, &ControlMessage::Refused { reason, message }).await;
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: CLOSE_POLICY,
            reason: Utf8Bytes::from_static("refused"),
        })))
        .await;
}

async fn session(state: AppState, mut socket: WebSocket) {
    let first = match timeout(state.timing.hello_timeout, socket.recv()).await {
        Err(_) => {
            return refuse(
                socket,
                RefuseReason::BadHello,
                "no hello within the timeout".into(),
            )
            .await
        }
        Ok(None) | Ok(Some(Err(_))) => return,
        Ok(Some(Ok(m))) => m,
    };
    let Message::Text(first) = first else {
        return refuse(
            socket,
            RefuseReason::BadHello,
            "the first message must be a JSON hello text frame".into(),
        )
        .await;
    };
    let hello = match serde_json::from_str::<NodeMessage>(first.as_str()) {
        Ok(h @ NodeMessage::Hello { .. }) => h,
        Ok(_) => {
            return refuse(
                socket,
                RefuseReason::BadHello,
                "the first message must be a hello".into(),
            )
            .await
        }
        Err(e) => {
            return refuse(
                socket,
                RefuseReason::BadHello,
                format!("invalid hello: {e}"),
            )
            .await
        }
    };
    let NodeMessage::Hello {
        protocol_version,
        kind,
        node_id,
        credential,
        public_key,
        software_version,
        applied_version,
    } = hello
    else {
        return;
    };
    if let Err(e) = check_protocol_version(protocol_version) {
        return refuse(
            socket,
            RefuseReason::UnsupportedProtocolVersion,
            e.to_string(),
        )
        .await;
    }
    let span = tracing::info_span!("node", %node_id, %kind);
    async move {
        match state
            .store
            .authenticate_node(kind, node_id, &credential)
            .await
        {
            Ok(_) => {}
            Err(crate::store::StoreError::BadSecret) => {
                return refuse(
                    socket,
                    RefuseReason::BadCredential,
                    format!("unknown {kind} or wrong credential"),
                )
                .await
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot check a node credential");
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
        }
        if let Err(e) = state
            .store
            .record_hello(
                kind,
                node_id,
                &public_key,
                &software_version,
                applied_version,
            )
            .await
        {
            tracing::error!(error = %e, "cannot record a hello");
        }
        let generation = state.hub.register(node_id, kind);
        tracing::info!(%software_version, "node connected");
        run(&state, &mut socket, kind, node_id).await;
        state.hub.unregister(node_id, generation);
        if let Err(e) = state.store.record_seen(kind, node_id).await {
            tracing::warn!(error = %e, "cannot record last seen");
        }
        tracing::info!("node disconnected");
    }
    .instrument(span)
    .await;
}

/// Whether two snapshots differ in anything but their version.
fn same_content(a: &ConfigSnapshot, b: &ConfigSnapshot) -> bool {
    a.node_id == b.node_id
        && a.kind == b.kind
        && a.overlay == b.overlay
        && a.peers == b.peers
        && a.routes == b.routes
        && a.targets == b.targets
}

enum Push {
    Sent,
    Unchanged,
    Gone,
    Failed,
}

async fn push_snapshot(
    state: &AppState,
    socket: &mut WebSocket,
    kind: NodeKind,
    id: Uuid,
    last: &mut Option<ConfigSnapshot>,
) -> Push {
    let snap = match state.store.snapshot(kind, id).await {
        Ok(Some(s)) => s,
        Ok(None) => return Push::Gone,
        Err(e) => {
            tracing::error!(error = %e, "cannot compute a snapshot");
            return Push::Unchanged;
        }
    };
    if last.as_ref().is_some_and(|l| same_content(l, &snap)) {
        return Push::Unchanged;
    }
    let version = snap.version;
    if !send(socket, &ControlMessage::Config(snap.clone())).await {
        return Push::Failed;
    }
    tracing::debug!(version, "snapshot sent");
    *last = Some(snap);
    Push::Sent
}

async fn run(state: &AppState, socket: &mut WebSocket, kind: NodeKind, id: Uuid) {
    // Subscribe before the first snapshot so that no change is missed.
    let mut versions = state.store.subscribe();
    versions.borrow_and_update();
    let mut shutdown = state.shutdown_signal();
    if !send(
        socket,
        &ControlMessage::Welcome {
            protocol_version: PROTOCOL_VERSION,
            node_id: id,
        },
    )
    .await
    {
        return;
    }
    let mut last = None;
    match push_snapshot(state, socket, kind, id, &mut last).await {
        Push::Sent | Push::Unchanged => {}
        Push::Gone | Push::Failed => return,
    }
    let mut ping = tokio::time::interval_at(
        Instant::now() + state.timing.ping_interval,
        state.timing.ping_interval,
    );
    let mut nonce = 0u64;
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            msg = socket.recv() => {
                let msg = match msg {
                    None | Some(Err(_)) => return,
                    Some(Ok(m)) => m,
                };
                last_heard = Instant::now();
                match msg {
                    Message::Text(t) => {
                        if !handle(state, socket, kind, id, t.as_str()).await {
                            return;
                        }
                    }
                    Message::Close(_) => return,
                    Message::Binary(_) => tracing::warn!("ignoring a binary frame"),
                    Message::Ping(_) | Message::Pong(_) => {}
                }
            }
            changed = versions.changed() => {
                if changed.is_err() {
                    return;
                }
                versions.borrow_and_update();
                match push_snapshot(state, socket, kind, id, &mut last).await {
                    Push::Sent | Push::Unchanged => {}
                    Push::Failed => return,
                    Push::Gone => {
                        let _ = send(socket, &ControlMessage::Refused {
                            reason: RefuseReason::BadCredential,
                            message: format!("this {kind} was deleted"),
                        }).await;
                        let _ = socket.send(Message::Close(Some(CloseFrame {
                            code: CLOSE_POLICY,
                            reason: Utf8Bytes::from_static("deleted"),
                        }))).await;
                        return;
                    }
                }
            }
            _ = ping.tick() => {
                nonce = nonce.wrapping_add(1);
                if !send(socket, &ControlMessage::Ping { nonce }).await {
                    return;
                }
            }
            _ = sleep_until(last_heard + state.timing.idle_timeout) => {
                tracing::warn!("nothing heard from the node; dropping the session");
                return;
            }
            _ = shutdown.changed() => {
                let _ = socket.send(Message::Close(Some(CloseFrame {
                    code: CLOSE_GOING_AWAY,
                    reason: Utf8Bytes::from_static("control is shutting down"),
                }))).await;
                return;
            }
        }
    }
}

/// Handles one text frame after the hello; `false` ends the session.
async fn handle(
    state: &AppState,
    socket: &mut WebSocket,
    kind: NodeKind,
    id: Uuid,
    t: &str,
) -> bool {
    let msg = match serde_json::from_str::<NodeMessage>(t) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring an invalid message");
            return true;
        }
    };
    let recorded = match msg {
        NodeMessage::Hello { .. } => {
            tracing::warn!("ignoring a second hello");
            Ok(())
        }
        NodeMessage::Applied { version } => {
            tracing::debug!(version, "node applied config");
            state.store.record_applied(kind, id, version).await
        }
        NodeMessage::Status(report) => state.store.record_status(kind, id, &report).await,
        NodeMessage::Ping { nonce } => {
            return send(socket, &ControlMessage::Pong { nonce }).await;
        }
        NodeMessage::Pong { .. } => Ok(()),
    };
    if let Err(e) = recorded {
        tracing::error!(error = %e, "cannot record a node message");
    }
    true
}
