//! kakuremichi's control service: the REST API for admins, the WebSocket hub that pushes config
//! snapshots to gateways and agents and records their status, the sqlx store (SQLite by default,
//! PostgreSQL by URL), admin API keys, enrollment and overlay address allocation.
//!
//! Control is the control plane only. It must never be on the data path: no user traffic passes
//! through it, and gateways and agents keep serving from their last applied config while it is
//! down. Secrets (admin keys, enrollment tokens, credentials) are random 238-bit strings stored as
//! SHA-256 digests ([`secrets`]), shown once, and never logged.
//!
//! At fleet scale: snapshots are built in memory from one [`world::World`] per config version,
//! node activity is coalesced ([`activity`]) and flushed once a second, handshakes are admitted a
//! bounded number at a time (the rest are told `busy` with a retry delay), and the listener caps
//! its connections and header-read time ([`serve`]).

pub mod acme;
pub mod activity;
pub mod api;
pub mod auth;
pub mod certs;
pub mod client_metadata;
pub mod config;
pub mod dns;
pub mod error;
pub mod hub;
pub mod identity;
pub mod install;
pub mod metrics;
pub mod oauth;
pub mod overlay;
pub mod passkeys;
pub mod replicas;
pub mod roles;
pub mod seal;
pub mod secrets;
pub mod serve;
pub mod sessions;
pub mod sso;
pub mod store;
pub mod times;
pub mod totp;
pub mod traffic;
pub mod ui;
pub mod validate;
pub mod visitors;
pub mod world;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use kakuremichi_proto::Secret;
use tokio::sync::{watch, Mutex, Semaphore};

use crate::activity::Activity;
pub use crate::error::ApiError;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use crate::world::World;

/// The largest request body the API accepts.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// Timers of node sessions.
#[derive(Debug, Clone, Copy)]
pub struct HubTiming {
    /// How long a new socket may take to send its hello.
    pub hello_timeout: Duration,
    /// How often control pings a node.
    pub ping_interval: Duration,
    /// A session with nothing heard for this long is dropped.
    pub idle_timeout: Duration,
    /// Handshakes (credential check, key, welcome, first snapshot) in progress at most.
    pub max_handshakes: usize,
    /// How long a hello waits for a handshake slot before it is answered `busy`.
    pub handshake_wait: Duration,
    /// The `retry_after_ms` of a `busy` answer.
    pub busy_retry: Duration,
    /// How often coalesced node activity is written to the store.
    pub flush_interval: Duration,
}

impl Default for HubTiming {
    fn default() -> Self {
        Self {
            hello_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
            max_handshakes: 64,
            handshake_wait: Duration::from_secs(2),
            busy_retry: Duration::from_secs(1),
            flush_interval: Duration::from_secs(1),
        }
    }
}

/// Everything the handlers share. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The store.
    pub store: Store,
    /// Connected node sessions.
    pub hub: Arc<Hub>,
    /// Request counters.
    pub metrics: Arc<Metrics>,
    /// Session timers and limits.
    pub timing: HubTiming,
    /// Node activity not yet written to the store.
    pub activity: Arc<Activity>,
    /// Requests per minute per resource, from gateways' reports (the console's graphs).
    pub traffic: Arc<crate::traffic::Traffic>,
    /// Handshake slots.
    handshakes: Arc<Semaphore>,
    /// The world of the newest config version seen, shared by all sessions.
    world: Arc<Mutex<Option<Arc<World>>>>,
    shutdown: Arc<watch::Sender<bool>>,
    /// ACME settings, when control orders certificates.
    pub acme: Option<Arc<crate::acme::AcmeSettings>>,
    /// The sign-in rate limit per client address.
    pub sign_in: Arc<crate::identity::SignInLimits>,
    /// Identity providers' HTTP client and discovery cache.
    pub sso: Arc<crate::sso::SsoClients>,
    /// The WebAuthn relying party, when control's public URL allows passkeys.
    pub passkeys: Option<Arc<webauthn_rs::Webauthn>>,
    /// Passwords, PINs and e-mailed codes of resources: limits and the mail relay.
    pub visitors: Arc<crate::visitors::Visitors>,
    /// MCP clients' metadata documents: the fetcher and its cache.
    pub client_metadata: Arc<crate::client_metadata::ClientMetadata>,
    /// Agent sessions' changes, for the status stream and long polls.
    pub session_events: Arc<crate::sessions::SessionEvents>,
    /// How often the sessions status stream sends a heartbeat.
    pub session_heartbeat: Duration,
    /// The folder of the agent binaries `install.sh` fetches (`None`: the folder of control's
    /// own executable).
    pub release_dir: Option<Arc<std::path::PathBuf>>,
    /// Whether control's public URL was set (else the install script names the origin it was
    /// fetched from).
    pub public_url_set: bool,
    /// This process as one of control's replicas (whether it runs the singleton work).
    pub replica: Arc<crate::replicas::Replica>,
}

impl AppState {
    /// State around a store, with default timers; in a tokio runtime, also starts the task that
    /// flushes node activity every [`HubTiming::flush_interval`] until shutdown.
    pub fn new(store: Store) -> Self {
        Self::with_timing(store, HubTiming::default())
    }

    /// State around a store with these timers and limits.
    pub fn with_timing(store: Store, timing: HubTiming) -> Self {
        let (shutdown, _) = watch::channel(false);
        let passkeys = crate::passkeys::relying_party(store.public_url());
        let state = Self {
            store,
            hub: Arc::default(),
            metrics: Arc::default(),
            timing,
            activity: Arc::default(),
            traffic: Arc::default(),
            handshakes: Arc::new(Semaphore::new(timing.max_handshakes.max(1))),
            world: Arc::default(),
            shutdown: Arc::new(shutdown),
            acme: None,
            sign_in: Arc::default(),
            sso: Arc::default(),
            passkeys,
            visitors: Arc::default(),
            client_metadata: Arc::default(),
            session_events: Arc::default(),
            session_heartbeat: crate::sessions::HEARTBEAT,
            release_dir: None,
            public_url_set: false,
            replica: Arc::default(),
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(state.clone().flush_until_shutdown());
        }
        state
    }

    async fn flush_until_shutdown(self) {
        let mut tick = tokio::time::interval(self.timing.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = self.shutdown_signal();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = self.flush_activity().await {
                        tracing::warn!(error = %e, "cannot record node activity; will retry");
                    }
                }
                () = until_set(&mut shutdown) => return,
            }
        }
    }

    /// Writes pending node activity now (also the last step before closing the store).
    pub async fn flush_activity(&self) -> Result<usize, StoreError> {
        let batch = self.activity.take();
        let n = batch.len();
        if let Err(e) = self.store.record_activity(&batch).await {
            self.activity.restore(batch);
            return Err(e);
        }
        Ok(n)
    }

    /// Asks every node session to close (for graceful shutdown).
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Resolves when [`AppState::shutdown`] was called.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Whether shutdown has begun.
    pub fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// The handshake slots ([`HubTiming::max_handshakes`]); a hello that finds none free within
    /// [`HubTiming::handshake_wait`] is answered `busy`.
    pub fn handshakes(&self) -> &Arc<Semaphore> {
        &self.handshakes
    }

    /// The world at the newest published config version or later: loaded by the first caller
    /// that needs it, shared by the rest.
    pub async fn world(&self) -> Result<Arc<World>, StoreError> {
        let want = *self.store.subscribe().borrow();
        let mut cached = self.world.lock().await;
        if let Some(w) = cached.as_ref().filter(|w| w.version >= want) {
            return Ok(w.clone());
        }
        let w = Arc::new(self.store.load_world().await?);
        *cached = Some(w.clone());
        Ok(w)
    }

    /// Tells this replica's listeners (status streams, long polls) that an agent session
    /// changed, and the other replicas', which load it from the store
    /// ([`crate::replicas::follow_changes`]).
    pub async fn session_changed(&self, s: crate::store::AgentSession) {
        let payload = format!("{}:{}:{}", self.replica.id, s.org_id, s.id);
        self.session_events.publish(s);
        if let Err(e) = self
            .store
            .notify(crate::replicas::SESSIONS_CHANNEL, &payload)
            .await
        {
            tracing::warn!(error = %e, "cannot tell the other replicas of an agent session's change");
        }
    }

    /// Adds a line to the audit log (a failure to write is logged, never fatal).
    pub async fn audit(&self, entry: crate::store::AuditEntry) {
        if let Err(e) = self.store.record_audit(&entry).await {
            tracing::error!(error = %e, action = %entry.action, "cannot write the audit log");
        }
    }

    /// One sign-in attempt from `ip`: counted in the store's bucket for that address (shared by
    /// every replica), or in this process's own when the store cannot answer. `Err(wait)` when
    /// the address has no attempt left.
    pub async fn take_sign_in(&self, ip: std::net::IpAddr) -> Result<(), std::time::Duration> {
        let per_minute = self.sign_in.per_minute();
        match self
            .store
            .take_sign_in(&ip.to_string(), per_minute, crate::store::now_ms())
            .await
        {
            Ok(None) => Ok(()),
            Ok(Some(ms)) => Err(std::time::Duration::from_millis(ms.max(1) as u64)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot count a sign-in attempt in the store; counting here");
                self.sign_in.take(ip, std::time::Instant::now())
            }
        }
    }

    /// Whether `key` is a valid admin key.
    pub async fn check_admin_key(&self, key: &Secret) -> Result<bool, StoreError> {
        self.store.verify_admin_key(key).await
    }
}

/// Resolves once the flag behind `rx` is `true` (never if its sender is gone while it is false).
pub async fn until_set(rx: &mut watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The whole HTTP application: `/api/v1`, `/healthz`, `/metrics` and the admin page at `/`.
pub fn app(state: AppState) -> Router {
    Router::new()
        .nest("/api/v1", api::router(state.clone()))
        .merge(auth::router())
        .merge(sso::router())
        .merge(passkeys::router())
        .merge(totp::router())
        .merge(visitors::router())
        .merge(oauth::router())
        .merge(install::router())
        .merge(ui::router())
        .route("/", get(ui::index))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics::render))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::count_requests,
        ))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .layer(axum::middleware::from_fn(trace_requests))
        .with_state(state)
}

/// With traces exported (`--otlp-endpoint`), every request is a server span. A client's
/// `traceparent` is linked, not continued: whoever reaches control does not choose its trace
/// ids.
async fn trace_requests(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if !kakuremichi_telemetry::enabled() {
        return next.run(req).await;
    }
    let method = req.method().as_str().to_owned();
    let span = tracing::info_span!(
        "request",
        otel.name = method.as_str(),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = method.as_str(),
        url.path = req.uri().path(),
        http.response.status_code = tracing::field::Empty,
    );
    kakuremichi_telemetry::link_to(&span, req.headers());
    let response = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    if response.status().is_server_error() {
        span.record("otel.status_code", "error");
    }
    response
}
