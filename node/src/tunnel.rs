//! The node's WireGuard tunnel slot: empty until the first snapshot, rebound when the overlay
//! settings change, shared by whatever sends or receives through it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use kakuremichi_proto::{OverlayConfig, PeerStatus, WgPublicKey};
use kakuremichi_tunnel::{Incoming, QuicSettings, Tunnel, TunnelConfig, TunnelError};
use tokio::task::AbortHandle;

use crate::relay::{Fallback, FallbackSettings};

/// How often binding a fixed UDP port is retried while the previous tunnel's socket closes.
const BIND_ATTEMPTS: u32 = 20;
/// The pause between those attempts.
const BIND_RETRY: Duration = Duration::from_millis(100);

/// The node's tunnel, once bound: cheap to clone, every clone sees the same tunnel.
#[derive(Clone)]
pub struct NodeTunnel {
    slot: Arc<RwLock<Option<Tunnel>>>,
    private_key: [u8; 32],
    listen: SocketAddr,
    dials: bool,
    quic: QuicSettings,
    fallback: Option<FallbackSettings>,
    fallback_task: Arc<Mutex<Option<AbortHandle>>>,
}

impl std::fmt::Debug for NodeTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTunnel")
            .field("listen", &self.listen)
            .field("private_key", &"***")
            .field("bound", &self.current().is_some())
            .finish()
    }
}

impl NodeTunnel {
    /// An empty slot for a tunnel with this WireGuard key, bound to `listen` (port 0: ephemeral).
    /// `dials`: this node keeps a QUIC connection to every peer (agents); otherwise it waits for
    /// its peers to dial (gateways).
    pub fn new(private_key: [u8; 32], listen: SocketAddr, dials: bool, quic: QuicSettings) -> Self {
        Self {
            slot: Arc::new(RwLock::new(None)),
            private_key,
            listen,
            dials,
            quic,
            fallback: None,
            fallback_task: Arc::default(),
        }
    }

    /// The same slot, carrying WireGuard over a WebSocket on the gateways' HTTPS port when UDP
    /// to a gateway gets no answer (agents; see [`crate::relay`]).
    pub fn with_fallback(mut self, fallback: Option<FallbackSettings>) -> Self {
        self.fallback = fallback;
        self
    }

    fn stop_fallback(&self) {
        if let Some(task) = self
            .fallback_task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
    }

    /// The tunnel, once bound.
    pub fn current(&self) -> Option<Tunnel> {
        self.slot.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Shuts down the running tunnel (if any) and binds a new one with these overlay settings;
    /// returns its inbound streams. A fixed listen port is retried for a moment, since the old
    /// socket may take a moment to close.
    pub async fn bind(&self, overlay: &OverlayConfig) -> Result<Incoming, TunnelError> {
        let old = self.slot.write().unwrap_or_else(|e| e.into_inner()).take();
        self.stop_fallback();
        if let Some(old) = old {
            tracing::info!("overlay settings changed: restarting the tunnel");
            old.shutdown();
        }
        let config = TunnelConfig {
            private_key: self.private_key,
            overlay_address: overlay.address,
            mtu: overlay.mtu,
            listen: self.listen,
            dials: self.dials,
            quic: self.quic.clone(),
        };
        let mut attempt = 0;
        let (tunnel, incoming) = loop {
            match Tunnel::bind(config.clone()).await {
                Ok(t) => break t,
                Err(TunnelError::Bind { .. })
                    if attempt < BIND_ATTEMPTS && self.listen.port() != 0 =>
                {
                    attempt += 1;
                    tokio::time::sleep(BIND_RETRY).await;
                }
                Err(e) => return Err(e),
            }
        };
        tracing::info!(
            listen = %tunnel.local_addr(),
            overlay = %overlay.address,
            "WireGuard tunnel bound"
        );
        if let Some(settings) = self.fallback {
            let task = tokio::spawn(Fallback::run(tunnel.clone(), settings));
            *self.fallback_task.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(task.abort_handle());
        }
        *self.slot.write().unwrap_or_else(|e| e.into_inner()) = Some(tunnel);
        Ok(incoming)
    }

    /// The WireGuard peers' counters, for the status report (empty before the tunnel is bound).
    pub fn peer_statuses(&self) -> Vec<PeerStatus> {
        self.current()
            .map(|t| t.peer_stats())
            .unwrap_or_default()
            .into_iter()
            .map(|s| PeerStatus {
                public_key: WgPublicKey(s.public_key),
                endpoint: s.endpoint.map(|e| e.to_string()),
                last_handshake_age_ms: s
                    .last_handshake
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                tx_bytes: s.tx_bytes,
                rx_bytes: s.rx_bytes,
            })
            .collect()
    }

    /// Stops the tunnel, if bound.
    pub fn shutdown(&self) {
        self.stop_fallback();
        if let Some(t) = self.current() {
            t.shutdown();
        }
    }
}
