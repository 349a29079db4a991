//! The agent runtime: holds the tunnel and the port -> target map, applies snapshots and forwards
//! accepted overlay flows to their targets.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use kakuremichi_node::{AppliedConfig, NodeHooks, NodeTunnel};
use kakuremichi_proto::{ConfigSnapshot, NodeKind, PeerConfig, StatusReport, Target, TargetStatus};
use kakuremichi_tunnel::{Incoming, PeerSpec, Tunnel, TunnelStream};
use tokio::net::TcpStream;
use uuid::Uuid;

use crate::apply::plan;

/// How long dialing a target may take.
pub const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long resolving a gateway's endpoint may take before the last good answer is used.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Copy buffer per direction.
pub const COPY_BUFFER: usize = 256 * 1024;

/// What the agent needs besides snapshots.
#[derive(Clone)]
pub struct AgentOptions {
    /// Where `config.json` lives.
    pub data_dir: PathBuf,
    /// The WireGuard UDP bind address (port 0: ephemeral).
    pub wg_listen: SocketAddr,
    /// The node's WireGuard private key.
    pub private_key: [u8; 32],
}

impl std::fmt::Debug for AgentOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentOptions")
            .field("data_dir", &self.data_dir)
            .field("wg_listen", &self.wg_listen)
            .field("private_key", &"***")
            .finish()
    }
}

pub use kakuremichi_node::ApplyError;

struct Inner {
    options: AgentOptions,
    tunnel: NodeTunnel,
    targets: RwLock<Arc<HashMap<u16, Target>>>,
    config: AppliedConfig,
    resolved: Mutex<HashMap<String, SocketAddr>>,
    target_status: Mutex<HashMap<Uuid, TargetStatus>>,
}

/// The agent: cheap to clone.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// An agent with no config yet.
    pub fn new(options: AgentOptions) -> Self {
        let tunnel = NodeTunnel::new(options.private_key, options.wg_listen);
        let config = AppliedConfig::new(&options.data_dir, NodeKind::Agent);
        Self {
            inner: Arc::new(Inner {
                options,
                tunnel,
                targets: RwLock::new(Arc::new(HashMap::new())),
                config,
                resolved: Mutex::new(HashMap::new()),
                target_status: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The tunnel, once bound.
    pub fn tunnel(&self) -> Option<Tunnel> {
        self.inner.tunnel.current()
    }

    /// The applied config version (0 before any).
    pub fn applied_version(&self) -> u64 {
        self.inner.config.version()
    }

    /// The cached snapshot from a previous run, if any and if it is for an agent.
    pub fn cached_config(&self) -> Option<ConfigSnapshot> {
        self.inner.config.cached()
    }

    /// Applies a snapshot: binds the tunnel if needed, resolves gateway endpoints, sets peers and
    /// listen ports, swaps the target map, and when `persist` writes the cache.
    pub async fn apply(&self, snapshot: ConfigSnapshot, persist: bool) -> Result<(), ApplyError> {
        let applying = self.inner.config.begin(&snapshot).await?;
        let changes = plan(applying.running(), &snapshot);
        tracing::debug!(version = snapshot.version, ?changes, "applying config");
        if changes.rebind_tunnel || self.tunnel().is_none() {
            let incoming = self.inner.tunnel.bind(&snapshot.overlay).await?;
            tokio::spawn(self.clone().accept_loop(incoming));
        }
        let mut specs = Vec::with_capacity(snapshot.peers.len());
        for peer in &snapshot.peers {
            specs.push(PeerSpec {
                public_key: peer.public_key.0,
                allowed_ip: peer.overlay_address,
                endpoint: self.resolve_endpoint(peer).await,
                persistent_keepalive: peer.persistent_keepalive,
            });
        }
        let targets: HashMap<u16, Target> = snapshot
            .targets
            .iter()
            .map(|t| (t.port, t.clone()))
            .collect();
        let mut ports: Vec<u16> = targets.keys().copied().collect();
        ports.sort_unstable();
        // Swap the map before opening ports, so an accepted flow always finds its target.
        *self
            .inner
            .targets
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(targets);
        if let Some(tunnel) = self.tunnel() {
            tunnel.set_peers(specs);
            tunnel.set_listen_ports(ports);
        }
        self.inner
            .target_status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, st| {
                snapshot
                    .targets
                    .iter()
                    .any(|t| t.resource_id == *id && t.target == st.target)
            });
        if !changes.is_empty() {
            tracing::info!(
                version = snapshot.version,
                targets = snapshot.targets.len(),
                gateways = snapshot.peers.len(),
                "agent config applied"
            );
        }
        applying.commit(snapshot, persist);
        Ok(())
    }

    /// Resolves a gateway's `host:port`, preferring the address family of the WireGuard socket;
    /// on failure the last good answer is used.
    async fn resolve_endpoint(&self, peer: &PeerConfig) -> Option<SocketAddr> {
        let endpoint = peer.endpoint.as_deref()?.trim().to_owned();
        if let Ok(addr) = endpoint.parse::<SocketAddr>() {
            return Some(addr);
        }
        let want_v4 = self.inner.options.wg_listen.is_ipv4();
        let looked_up =
            tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(endpoint.clone())).await;
        let fresh = match looked_up {
            Ok(Ok(addrs)) => {
                let addrs: Vec<SocketAddr> = addrs.collect();
                addrs
                    .iter()
                    .find(|a| a.is_ipv4() == want_v4)
                    .or(addrs.first())
                    .copied()
            }
            Ok(Err(error)) => {
                tracing::warn!(gateway = %peer.name, %endpoint, %error, "cannot resolve the gateway endpoint");
                None
            }
            Err(_) => {
                tracing::warn!(gateway = %peer.name, %endpoint, "resolving the gateway endpoint timed out");
                None
            }
        };
        let mut resolved = self
            .inner
            .resolved
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match fresh {
            Some(addr) => {
                resolved.insert(endpoint, addr);
                Some(addr)
            }
            None => resolved.get(&endpoint).copied(),
        }
    }

    async fn accept_loop(self, mut incoming: Incoming) {
        while let Some(stream) = incoming.accept().await {
            tokio::spawn(self.clone().forward(stream));
        }
        tracing::debug!("tunnel closed: accept loop ends");
    }

    /// Forwards one overlay flow to its target, or resets it.
    async fn forward(self, mut stream: TunnelStream) {
        let port = stream.local_addr().port();
        let peer = stream.peer_addr();
        let target = self
            .inner
            .targets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&port)
            .cloned();
        let Some(target) = target else {
            tracing::debug!(port, %peer, "flow to an unconfigured port: reset");
            stream.abort();
            return;
        };
        let dialed = tokio::time::timeout(
            TARGET_CONNECT_TIMEOUT,
            TcpStream::connect(target.target.as_str()),
        )
        .await;
        let mut tcp = match dialed {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                self.record(&target, Some(e.to_string()));
                tracing::debug!(port, target = %target.target, error = %e, "target refused: reset");
                refuse(stream).await;
                return;
            }
            Err(_) => {
                self.record(&target, Some("connecting timed out".into()));
                tracing::debug!(port, target = %target.target, "target timed out: reset");
                refuse(stream).await;
                return;
            }
        };
        let _ = tcp.set_nodelay(true);
        self.record(&target, None);
        tracing::debug!(port, %peer, target = %target.target, resource_id = %target.resource_id, "flow forwarded");
        match tokio::io::copy_bidirectional_with_sizes(
            &mut stream,
            &mut tcp,
            COPY_BUFFER,
            COPY_BUFFER,
        )
        .await
        {
            Ok((to_target, from_target)) => {
                tracing::debug!(port, to_target, from_target, "flow closed")
            }
            Err(error) => tracing::debug!(port, %error, "flow ended with an error"),
        }
    }

    fn record(&self, target: &Target, error: Option<String>) {
        let mut status = self
            .inner
            .target_status
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        status.insert(
            target.resource_id,
            TargetStatus {
                resource_id: target.resource_id,
                target: target.target.clone(),
                reachable: error.is_none(),
                error,
            },
        );
    }

    /// The status report: applied version, gateway peers, target health.
    pub fn status(&self) -> StatusReport {
        let mut targets: Vec<TargetStatus> = self
            .inner
            .target_status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        targets.sort_by_key(|t| t.resource_id);
        StatusReport {
            applied_version: self.applied_version(),
            peers: self.inner.tunnel.peer_statuses(),
            targets,
        }
    }

    /// Stops the tunnel.
    pub fn shutdown(&self) {
        self.inner.tunnel.shutdown();
    }
}

/// Refuses an accepted flow so the gateway answers 502 at once.
///
/// The contract is `TunnelStream::abort` (RST), but the current tunnel drops an aborted socket
/// before smoltcp emits its RST, so the gateway would wait for its response timeout. A graceful
/// close (FIN before any response) is seen by the gateway as "closed before the response", which
/// it maps to the same 502. Switch back to `abort()` once the tunnel sends the RST.
async fn refuse(stream: TunnelStream) {
    stream.abort();
}

impl NodeHooks for Agent {
    async fn apply(&self, snapshot: ConfigSnapshot) -> Result<(), String> {
        Agent::apply(self, snapshot, true)
            .await
            .map_err(|e| e.to_string())
    }

    fn status(&self) -> StatusReport {
        Agent::status(self)
    }
}
