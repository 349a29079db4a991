//! The node WebSocket hub at `GET /api/v1/nodes/connect`.
//!
//! A session: the first frame must be a [`NodeMessage::Hello`] within the hello timeout, counted
//! from when control starts on the socket. The hello then waits (briefly) for one of a bounded
//! number of handshake slots, or is answered [`RefuseReason::Busy`] with a retry delay; in its slot
//! control checks the protocol version, the credential (a digest lookup) and the public key (one
//! key, one node), answers [`ControlMessage::Welcome`] and a full [`ConfigSnapshot`], and frees the
//! slot. Then the session waits on the store's config-version signal: on every new version it
//! takes the shared [`crate::world::World`] and sends its snapshot if it differs from the last one
//! sent, or refuses the node if it was deleted or its credential revoked. One live session per
//! node: a newer one replaces the older ([`RefuseReason::Replaced`]). Activity (applied versions,
//! status, last seen) is coalesced in [`crate::activity::Activity`]; online state is the set of
//! open sessions in this process, joined with those other control replicas hold
//! ([`crate::replicas`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use kakuremichi_proto::{
    check_protocol_version, ConfigSnapshot, ControlMessage, NodeKind, NodeMessage, RefuseReason,
    PROTOCOL_VERSION,
};
use tokio::sync::Notify;
use tokio::time::{sleep_until, timeout, Instant};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::serve::ConnectionSlot;
use crate::store::{now_ms, StoreError};
use crate::{ApiError, AppState, MAX_BODY_BYTES};

/// Refusals a gateway's status report may add to the audit log at most.
const MAX_REFUSALS_PER_REPORT: usize = 300;

/// Close code for refused sessions (policy violation).
const CLOSE_POLICY: u16 = 1008;
/// Close code when control shuts down.
const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code when control is busy (try again later).
const CLOSE_TRY_AGAIN: u16 = 1013;

struct Entry {
    kind: NodeKind,
    generation: u64,
    replaced: Arc<Notify>,
}

/// The open sessions, by node id, and how many session tasks are alive.
#[derive(Default)]
pub struct Hub {
    sessions: Mutex<HashMap<Uuid, Entry>>,
    /// Bumped whenever a node comes online or goes offline (the web UI's live status).
    changes: Changes,
    next_generation: AtomicU64,
    live: AtomicUsize,
    idle: Notify,
    /// Nodes whose sessions other control replicas hold (from the store, every second).
    remote: Mutex<HashMap<Uuid, NodeKind>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("sessions", &self.lock().len())
            .field("live", &self.live.load(Ordering::Relaxed))
            .finish()
    }
}

/// A counter bumped on every change of who is online; watchers wait on it.
struct Changes(tokio::sync::watch::Sender<u64>);

impl Default for Changes {
    fn default() -> Self {
        Self(tokio::sync::watch::Sender::new(0))
    }
}

/// Counts a live session task; see [`Hub::wait_idle`].
struct LiveGuard(Arc<Hub>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Entry>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live_guard(self: &Arc<Self>) -> LiveGuard {
        self.live.fetch_add(1, Ordering::AcqRel);
        LiveGuard(self.clone())
    }

    /// Registers a welcomed session; an older session of the same node is told to go.
    fn register(&self, id: Uuid, kind: NodeKind) -> (u64, Arc<Notify>) {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let replaced = Arc::new(Notify::new());
        let old = self.lock().insert(
            id,
            Entry {
                kind,
                generation,
                replaced: replaced.clone(),
            },
        );
        if let Some(old) = old {
            // notify_one keeps the wake-up even if the old session is not waiting right now.
            old.replaced.notify_one();
        }
        self.changes.0.send_modify(|n| *n += 1);
        (generation, replaced)
    }

    fn unregister(&self, id: Uuid, generation: u64) {
        let mut sessions = self.lock();
        if sessions
            .get(&id)
            .is_some_and(|e| e.generation == generation)
        {
            sessions.remove(&id);
            drop(sessions);
            self.changes.0.send_modify(|n| *n += 1);
        }
    }

    /// A receiver that sees a change whenever a node comes online or goes offline.
    pub fn watch_online(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.0.subscribe()
    }

    fn remote(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, NodeKind>> {
        self.remote.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the node has an open session, here or on another control replica.
    pub fn is_online(&self, id: Uuid) -> bool {
        self.lock().contains_key(&id) || self.remote().contains_key(&id)
    }

    /// How many nodes of a kind have an open session, here or on another control replica.
    pub fn online_count(&self, kind: NodeKind) -> usize {
        let local = self.local_nodes();
        let remote = self
            .remote()
            .iter()
            .filter(|(id, k)| **k == kind && !local.contains_key(id))
            .count();
        local.values().filter(|k| **k == kind).count() + remote
    }

    /// How many nodes of a kind have an open session with this replica.
    pub fn connected_here(&self, kind: NodeKind) -> usize {
        self.lock().values().filter(|e| e.kind == kind).count()
    }

    /// The nodes whose sessions this replica holds.
    pub fn local_nodes(&self) -> HashMap<Uuid, NodeKind> {
        self.lock().iter().map(|(id, e)| (*id, e.kind)).collect()
    }

    /// Replaces the nodes other replicas hold; watchers of [`Hub::watch_online`] hear of a
    /// change.
    pub fn set_remote(&self, nodes: HashMap<Uuid, NodeKind>) {
        let mut remote = self.remote();
        if *remote != nodes {
            *remote = nodes;
            drop(remote);
            self.changes.0.send_modify(|n| *n += 1);
        }
    }

    /// Session tasks alive (welcomed or still in their handshake).
    pub fn live_sessions(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Waits until no session task is alive, or `limit` passed; returns how many are left.
    pub async fn wait_idle(&self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            let notified = self.idle.notified();
            if self.live_sessions() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.live_sessions();
            }
        }
    }
}

/// Upgrades `GET /api/v1/nodes/connect` to a node session. Frames are bounded like API bodies,
/// and buffers start small (a thousand idle sessions must not hold 128 KiB each).
pub async fn connect(
    State(state): State<AppState>,
    slot: Option<Extension<ConnectionSlot>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match ws {
        Ok(ws) => ws
            .max_message_size(MAX_BODY_BYTES)
            .max_frame_size(MAX_BODY_BYTES)
            .read_buffer_size(4 * 1024)
            .write_buffer_size(0)
            .on_upgrade(move |socket| async move {
                let _slot = slot;
                session(state, socket).await;
            })
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

async fn refuse(socket: &mut WebSocket, reason: RefuseReason, message: String) {
    tracing::info!(?reason, %message, "node refused");
    refuse_quietly(socket, reason, message, None).await;
}

async fn refuse_quietly(
    socket: &mut WebSocket,
    reason: RefuseReason,
    message: String,
    retry_after: Option<Duration>,
) {
    let retry_after_ms = retry_after.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let _ = send(
        socket,
        &ControlMessage::Refused {
            reason,
            message,
            retry_after_ms,
        },
    )
    .await;
    let (code, why) = match reason {
        RefuseReason::Busy => (CLOSE_TRY_AGAIN, "busy"),
        RefuseReason::Replaced => (CLOSE_POLICY, "replaced"),
        _ => (CLOSE_POLICY, "refused"),
    };
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(why),
        })))
        .await;
}

async fn busy(state: &AppState, socket: &mut WebSocket, why: &str) {
    tracing::debug!(why, "node told to come back later");
    refuse_quietly(
        socket,
        RefuseReason::Busy,
        format!("control is busy ({why}); retry later"),
        Some(state.timing.busy_retry),
    )
    .await;
}

async fn session(state: AppState, mut socket: WebSocket) {
    let _live = state.hub.live_guard();
    let first = match timeout(state.timing.hello_timeout, socket.recv()).await {
        Err(_) => {
            return refuse(
                &mut socket,
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
            &mut socket,
            RefuseReason::BadHello,
            "the first message must be a JSON hello text frame".into(),
        )
        .await;
    };
    let hello = match serde_json::from_str::<NodeMessage>(first.as_str()) {
        Ok(h @ NodeMessage::Hello { .. }) => h,
        Ok(_) => {
            return refuse(
                &mut socket,
                RefuseReason::BadHello,
                "the first message must be a hello".into(),
            )
            .await
        }
        Err(e) => {
            return refuse(
                &mut socket,
                RefuseReason::BadHello,
                format!("invalid hello: {e}"),
            )
            .await
        }
    };
    drop(first);
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
            &mut socket,
            RefuseReason::UnsupportedProtocolVersion,
            e.to_string(),
        )
        .await;
    }
    let span = tracing::info_span!("node", %node_id, %kind);
    async move {
        if state.shutting_down() {
            return busy(&state, &mut socket, "shutting down").await;
        }
        let permit = match timeout(
            state.timing.handshake_wait,
            state.handshakes().clone().acquire_owned(),
        )
        .await
        {
            Ok(Ok(p)) => p,
            Ok(Err(_)) | Err(_) => {
                return busy(&state, &mut socket, "too many handshakes in progress").await
            }
        };
        let credential_hash = match state
            .store
            .authenticate_node(kind, node_id, &credential)
            .await
        {
            Ok(h) => h,
            Err(StoreError::BadSecret) => {
                // Not logged at info: a crowd of wrong hellos must not flood the log.
                tracing::debug!("wrong credential");
                return refuse_quietly(
                    &mut socket,
                    RefuseReason::BadCredential,
                    format!("unknown {kind} or wrong credential"),
                    None,
                )
                .await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot check a node credential");
                return busy(&state, &mut socket, "store unavailable").await;
            }
        };
        match state.store.claim_key(kind, node_id, &public_key).await {
            Ok(()) => {}
            Err(StoreError::KeyInUse) => {
                return refuse(
                    &mut socket,
                    RefuseReason::KeyInUse,
                    format!(
                        "the WireGuard public key {public_key} belongs to another node; each \
                         node needs its own key"
                    ),
                )
                .await
            }
            Err(StoreError::NotFound(_)) => {
                return refuse(
                    &mut socket,
                    RefuseReason::BadCredential,
                    format!("this {kind} was deleted"),
                )
                .await
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot record a node's public key");
                return busy(&state, &mut socket, "store unavailable").await;
            }
        }
        state
            .activity
            .hello(kind, node_id, &software_version, applied_version, now_ms());
        let (generation, replaced) = state.hub.register(node_id, kind);
        tracing::info!(%software_version, "node connected");
        let me = Me {
            kind,
            id: node_id,
            credential_hash,
        };
        run(&state, &mut socket, &me, permit, &replaced).await;
        state.hub.unregister(node_id, generation);
        state.activity.seen(kind, node_id, now_ms());
        tracing::info!("node disconnected");
    }
    .instrument(span)
    .await;
}

/// The node a session serves.
struct Me {
    kind: NodeKind,
    id: Uuid,
    /// The credential digest the node authenticated with; a world with another one means the
    /// credential was revoked or replaced.
    credential_hash: String,
}

/// Whether two snapshots differ in anything but their version.
fn same_content(a: &ConfigSnapshot, b: &ConfigSnapshot) -> bool {
    // Every field by name, so that a new one cannot be forgotten here.
    let ConfigSnapshot {
        version: _,
        node_id,
        kind,
        overlay,
        peers,
        routes,
        targets,
        certificates,
        acme_challenges,
        identity,
        sessions,
        sessions_endpoint,
    } = a;
    *node_id == b.node_id
        && *kind == b.kind
        && *overlay == b.overlay
        && *peers == b.peers
        && *routes == b.routes
        && *targets == b.targets
        && *certificates == b.certificates
        && *acme_challenges == b.acme_challenges
        && *identity == b.identity
        && *sessions == b.sessions
        && *sessions_endpoint == b.sessions_endpoint
}

enum Push {
    Sent,
    Unchanged,
    Refused(String),
    Failed,
}

async fn push_snapshot(
    state: &AppState,
    socket: &mut WebSocket,
    me: &Me,
    last: &mut Option<ConfigSnapshot>,
) -> Push {
    let world = match state.world().await {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot load the config");
            return Push::Unchanged;
        }
    };
    let kind = me.kind;
    match world.node(kind, me.id) {
        None => return Push::Refused(format!("this {kind} was deleted")),
        Some(n) if n.credential_hash.as_deref() != Some(me.credential_hash.as_str()) => {
            return Push::Refused(format!(
                "this {kind}'s credential was revoked or replaced; enroll it again with a new token"
            ))
        }
        Some(_) => {}
    }
    let Some(snap) = world.snapshot(kind, me.id) else {
        return Push::Refused(format!("this {kind} was deleted"));
    };
    drop(world);
    if last.as_ref().is_some_and(|l| same_content(l, &snap)) {
        return Push::Unchanged;
    }
    let version = snap.version;
    let msg = ControlMessage::Config(snap);
    if !send(socket, &msg).await {
        return Push::Failed;
    }
    state.metrics.snapshot_sent(me.kind);
    tracing::debug!(version, "snapshot sent");
    if let ControlMessage::Config(snap) = msg {
        *last = Some(snap);
    }
    Push::Sent
}

async fn run(
    state: &AppState,
    socket: &mut WebSocket,
    me: &Me,
    permit: tokio::sync::OwnedSemaphorePermit,
    replaced: &Notify,
) {
    let (kind, id) = (me.kind, me.id);
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
    match push_snapshot(state, socket, me, &mut last).await {
        Push::Sent | Push::Unchanged => {}
        Push::Refused(m) => return refuse(socket, RefuseReason::BadCredential, m).await,
        Push::Failed => return,
    }
    // The handshake is over: its slot goes to the next node.
    drop(permit);
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
                    Message::Close(frame) => {
                        tracing::info!(
                            code = frame.as_ref().map(|f| f.code),
                            reason = frame.as_ref().map(|f| f.reason.as_str()).unwrap_or(""),
                            "node closed its session"
                        );
                        return;
                    }
                    Message::Binary(_) => tracing::warn!("ignoring a binary frame"),
                    Message::Ping(_) | Message::Pong(_) => state.activity.seen(kind, id, now_ms()),
                }
            }
            changed = versions.changed() => {
                if changed.is_err() {
                    return;
                }
                versions.borrow_and_update();
                match push_snapshot(state, socket, me, &mut last).await {
                    Push::Sent | Push::Unchanged => {}
                    Push::Failed => return,
                    Push::Refused(m) => return refuse(socket, RefuseReason::BadCredential, m).await,
                }
            }
            () = replaced.notified() => {
                return refuse(
                    socket,
                    RefuseReason::Replaced,
                    format!("a newer session of this {kind} took over"),
                )
                .await;
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
            () = crate::until_set(&mut shutdown) => {
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
    let now = now_ms();
    match msg {
        NodeMessage::Hello { .. } => {
            tracing::warn!("ignoring a second hello");
        }
        NodeMessage::Applied { version } => {
            tracing::debug!(version, "node applied config");
            state.activity.applied(kind, id, version, now);
        }
        NodeMessage::Status(mut report) => {
            // A gateway's refusals go to the audit log, not into the stored status.
            let refusals = std::mem::take(&mut report.refusals);
            if kind == NodeKind::Gateway && !refusals.is_empty() {
                // Each line goes to the organization of the resource refused (a shared gateway
                // serves several), else the gateway's own.
                let world = state.world().await.ok();
                let org_of = |host: &str| {
                    let w = world.as_ref()?;
                    w.resources
                        .iter()
                        .find(|res| res.hostname == host)
                        .map(|res| res.org_id)
                        .or_else(|| w.node(NodeKind::Gateway, id).map(|g| g.org_id))
                };
                for r in refusals.into_iter().take(MAX_REFUSALS_PER_REPORT) {
                    let detail = match &r.user {
                        Some(u) => format!("{u}: {}", r.reason),
                        None => r.reason.clone(),
                    };
                    let org_id = org_of(&r.host);
                    state
                        .audit(crate::store::AuditEntry {
                            org_id,
                            at: r.at_ms,
                            actor: format!("gateway:{id}"),
                            action: "access".into(),
                            target: Some(r.host),
                            outcome: if r.count > 1 {
                                format!("denied x{}", r.count)
                            } else {
                                "denied".into()
                            },
                            client: r.client,
                            detail: Some(detail),
                        })
                        .await;
                }
            }
            // Request counts go to the console's graphs, not into the stored status.
            let traffic = std::mem::take(&mut report.traffic);
            if kind == NodeKind::Gateway {
                state.traffic.record(&traffic, now);
            }
            let accesses = std::mem::take(&mut report.session_accesses);
            if kind == NodeKind::Gateway && !accesses.is_empty() {
                crate::sessions::audit_accesses(state, id, accesses).await;
            }
            if kind == NodeKind::Agent && !report.sessions.is_empty() {
                crate::sessions::on_report(state, id, &report.sessions).await;
            }
            match serde_json::to_string(&report) {
                Ok(json) => state
                    .activity
                    .status(kind, id, json, report.applied_version, now),
                Err(e) => tracing::warn!(error = %e, "cannot encode a status report"),
            }
        }
        NodeMessage::Ping { nonce } => {
            state.activity.seen(kind, id, now);
            return send(socket, &ControlMessage::Pong { nonce }).await;
        }
        NodeMessage::Pong { .. } => state.activity.seen(kind, id, now),
    }
    true
}
