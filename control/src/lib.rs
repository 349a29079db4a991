//! kakuremichi's control service: the REST API for admins, the WebSocket hub that pushes config
//! snapshots to gateways and agents and records their status, the sqlx store (SQLite by default,
//! PostgreSQL by URL), admin API keys, enrollment and overlay address allocation.
//!
//! Control is the control plane only. It must never be on the data path: no user traffic passes
//! through it, and gateways and agents keep serving from their last applied config while it is
//! down. Secrets (admin keys, enrollment tokens, credentials) are stored as argon2id hashes, shown
//! once, and never logged.

pub mod api;
pub mod config;
pub mod error;
pub mod hub;
pub mod metrics;
pub mod overlay;
pub mod secrets;
pub mod store;
pub mod validate;
mod web;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use kakuremichi_proto::Secret;
use sha2::{Digest, Sha256};
use tokio::sync::{watch, RwLock};

pub use crate::error::ApiError;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

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
}

impl Default for HubTiming {
    fn default() -> Self {
        Self {
            hello_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
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
    /// Session timers.
    pub timing: HubTiming,
    /// SHA-256 of admin keys already verified with argon2, so argon2 is paid once per key.
    verified_keys: Arc<RwLock<HashSet<[u8; 32]>>>,
    shutdown: Arc<watch::Sender<bool>>,
}

impl AppState {
    /// State around a store, with default timers.
    pub fn new(store: Store) -> Self {
        let (shutdown, _) = watch::channel(false);
        Self {
            store,
            hub: Arc::default(),
            metrics: Arc::default(),
            timing: HubTiming::default(),
            verified_keys: Arc::default(),
            shutdown: Arc::new(shutdown),
        }
    }

    /// Asks every node session to close (for graceful shutdown).
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Resolves when [`AppState::shutdown`] was called.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Whether `key` is a valid admin key (cached after the first argon2 verification).
    pub async fn check_admin_key(&self, key: &Secret) -> Result<bool, StoreError> {
        let digest: [u8; 32] = Sha256::digest(key.expose().as_bytes()).into();
        if self.verified_keys.read().await.contains(&digest) {
            return Ok(true);
        }
        let ok = self.store.verify_admin_key(key).await?;
        if ok {
            self.verified_keys.write().await.insert(digest);
        }
        Ok(ok)
    }
}

/// The whole HTTP application: `/api/v1`, `/healthz`, `/metrics` and the admin page at `/`.
pub fn app(state: AppState) -> Router {
    Router::new()
        .nest("/api/v1", api::router(state.clone()))
        .route("/", get(web::index))
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
        .with_state(state)
}
