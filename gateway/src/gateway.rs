//! The gateway runtime: holds the tunnel, the route table and the endpoint memory, and applies
//! snapshots (from the control channel or the disk cache).

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use kakuremichi_node::{AppliedConfig, NodeHooks, NodeTunnel};
use kakuremichi_proto::{ConfigSnapshot, NodeKind, StatusReport, StreamHeader, WgPublicKey};
use kakuremichi_tunnel::{Incoming, Tunnel};

use crate::apply::{peer_specs, plan, EndpointHints};
use crate::balance::{BackendPool, Dialer, HealthWatchers};
use crate::metrics::{Metrics, PeerSample};
use crate::proxy::{Proxy, ProxyTimeouts, Upstream, UpstreamIo};
use crate::routing::{Dial, RouteTable};
use crate::tcp::TcpRoutes;

/// What the gateway needs besides snapshots.
#[derive(Clone)]
pub struct GatewayOptions {
    /// Where `config.json` and `peers.json` live.
    pub data_dir: PathBuf,
    /// The WireGuard UDP listen address.
    pub wg_listen: SocketAddr,
    /// The node's WireGuard private key.
    pub private_key: [u8; 32],
    /// Proxy timeouts.
    pub timeouts: ProxyTimeouts,
    /// QUIC windows and limits inside the tunnel.
    pub quic: kakuremichi_tunnel::QuicSettings,
    /// Proxies in front of the gateway whose `X-Forwarded-*` headers are believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The address TCP resources' public ports are bound on.
    pub tcp_listen_ip: std::net::IpAddr,
    /// Connection caps, shared by the TCP listeners (the HTTP listeners take theirs when served).
    pub limits: crate::listener::ListenerLimits,
    /// The HTTPS port, if HTTPS is served: where resources that ask for it are redirected.
    pub https_port: Option<u16>,
}

impl std::fmt::Debug for GatewayOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayOptions")
            .field("data_dir", &self.data_dir)
            .field("wg_listen", &self.wg_listen)
            .field("private_key", &"***")
            .field("timeouts", &self.timeouts)
            .field("quic", &self.quic)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("tcp_listen_ip", &self.tcp_listen_ip)
            .field("limits", &self.limits)
            .finish()
    }
}

pub use kakuremichi_node::ApplyError;

struct TunnelUpstream {
    tunnel: NodeTunnel,
}

impl Upstream for TunnelUpstream {
    /// A QUIC stream to the agent, opened with the header that names the resource.
    fn connect<'a>(
        &'a self,
        target: &'a Dial,
    ) -> Pin<Box<dyn std::future::Future<Output = io::Result<UpstreamIo>> + Send + 'a>> {
        Box::pin(async move {
            use tokio::io::AsyncWriteExt as _;
            let tunnel = self
                .tunnel
                .current()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "no tunnel yet"))?;
            let mut stream = tunnel.connect(*target.addr.ip()).await?;
            let header = StreamHeader {
                kind: target.kind,
                port: target.addr.port(),
                resource_id: target.resource_id,
            };
            stream.write_all(&header.encode()).await?;
            Ok(Box::new(stream) as UpstreamIo)
        })
    }
}

struct Inner {
    options: GatewayOptions,
    tunnel: NodeTunnel,
    routes: Arc<RwLock<Arc<RouteTable>>>,
    config: AppliedConfig,
    configured_peers: Mutex<BTreeSet<WgPublicKey>>,
    hints: Mutex<EndpointHints>,
    metrics: Arc<Metrics>,
    proxy: Arc<Proxy>,
    tcp: TcpRoutes,
    udp: crate::udp::UdpRoutes,
    managed_certs: Arc<crate::tls::ManagedCerts>,
    pool: Arc<BackendPool>,
    health: HealthWatchers,
}

/// The gateway: cheap to clone, shared by the proxy, the control channel and background tasks.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway with no config yet (it answers 404 until the first snapshot), with the endpoint
    /// memory loaded from the data dir.
    pub fn new(options: GatewayOptions) -> Self {
        let tunnel = NodeTunnel::new(
            options.private_key,
            options.wg_listen,
            false,
            options.quic.clone(),
        );
        let routes = Arc::new(RwLock::new(Arc::new(RouteTable::default())));
        let metrics = Arc::new(Metrics::default());
        let upstream: Arc<dyn Upstream> = Arc::new(TunnelUpstream {
            tunnel: tunnel.clone(),
        });
        let pool = Arc::new(BackendPool::default());
        metrics.set_pool(Arc::clone(&pool));
        let dialer = Arc::new(Dialer::new(Arc::clone(&upstream), Arc::clone(&pool)));
        let health = HealthWatchers::new(Arc::clone(&pool), Arc::clone(&upstream));
        let udp = crate::udp::UdpRoutes::new(
            options.tcp_listen_ip,
            Arc::clone(&dialer),
            &options.limits,
            Arc::clone(&metrics),
        );
        let tcp = TcpRoutes::new(
            options.tcp_listen_ip,
            dialer,
            &options.limits,
            Arc::clone(&metrics),
        );
        let proxy = Arc::new(Proxy::new(
            Arc::clone(&routes),
            upstream,
            options.timeouts,
            Arc::clone(&metrics),
            options.trusted_proxies.clone(),
            options.https_port,
            Arc::clone(&pool),
        ));
        proxy.serve_relays(tunnel.clone());
        let hints = EndpointHints::load(&options.data_dir);
        let config = AppliedConfig::new(&options.data_dir, NodeKind::Gateway);
        Self {
            inner: Arc::new(Inner {
                options,
                tunnel,
                routes,
                config,
                configured_peers: Mutex::new(BTreeSet::new()),
                hints: Mutex::new(hints),
                metrics,
                proxy,
                tcp,
                udp,
                managed_certs: Arc::default(),
                pool,
                health,
            }),
        }
    }

    /// The reverse proxy serving this gateway's routes.
    pub fn proxy(&self) -> Arc<Proxy> {
        Arc::clone(&self.inner.proxy)
    }

    /// Certificates and TLS-ALPN-01 answers from control (for the HTTPS certificate resolver).
    pub fn managed_certs(&self) -> Arc<crate::tls::ManagedCerts> {
        Arc::clone(&self.inner.managed_certs)
    }

    /// Which backends take traffic (fed by the agents' health streams).
    pub fn backends(&self) -> Arc<BackendPool> {
        Arc::clone(&self.inner.pool)
    }

    /// The metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.inner.metrics)
    }

    /// The tunnel, once bound.
    pub fn tunnel(&self) -> Option<Tunnel> {
        self.inner.tunnel.current()
    }

    /// The applied config version (0 before any).
    pub fn applied_version(&self) -> u64 {
        self.inner.config.version()
    }

    /// The cached snapshot from a previous run, if any and if it is for a gateway.
    pub fn cached_config(&self) -> Option<ConfigSnapshot> {
        self.inner.config.cached()
    }

    /// Applies a snapshot: binds the tunnel if needed, sets peers, swaps routes, and when
    /// `persist` writes the cache. Existing connections of unchanged routes are untouched.
    pub async fn apply(&self, snapshot: ConfigSnapshot, persist: bool) -> Result<(), ApplyError> {
        let kakuremichi_node::Apply {
            applying, incoming, ..
        } = kakuremichi_node::begin_apply(&self.inner.config, &self.inner.tunnel, &snapshot)
            .await?;
        let changes = plan(applying.running(), &snapshot);
        tracing::debug!(version = snapshot.version, ?changes, "applying config");
        if let Some(incoming) = incoming {
            tokio::spawn(refuse_all(incoming));
        }
        let configured: BTreeSet<WgPublicKey> =
            snapshot.peers.iter().map(|p| p.public_key).collect();
        let specs = {
            let mut hints = self.inner.hints.lock().unwrap_or_else(|e| e.into_inner());
            hints.merge([], &configured);
            peer_specs(&snapshot.peers, &hints)
        };
        if let Some(tunnel) = self.tunnel() {
            tunnel.set_peers(specs);
        }
        *self
            .inner
            .configured_peers
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = configured;
        self.inner
            .managed_certs
            .apply(&snapshot.certificates, &snapshot.acme_challenges);
        self.inner
            .metrics
            .set_certificate_expiry(self.inner.managed_certs.expiry());
        let table =
            RouteTable::from_routes(&snapshot.routes).with_acme_http01(&snapshot.acme_challenges);
        self.inner.metrics.set_routes(table.len());
        self.inner.proxy.set_identity(snapshot.identity.as_deref());
        self.inner
            .proxy
            .set_sessions(snapshot.sessions_endpoint.as_deref());
        *self.inner.routes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
        let agents: std::collections::HashSet<std::net::Ipv4Addr> = snapshot
            .routes
            .iter()
            .flat_map(|r| {
                std::iter::once(r.overlay_address)
                    .chain(r.more_backends.iter().map(|b| b.overlay_address))
            })
            .collect();
        self.inner.health.apply(&agents);
        self.inner.metrics.set_backends(
            snapshot
                .routes
                .iter()
                .flat_map(|r| {
                    std::iter::once(std::net::SocketAddrV4::new(r.overlay_address, r.port))
                        .chain(
                            r.more_backends
                                .iter()
                                .map(|b| std::net::SocketAddrV4::new(b.overlay_address, b.port)),
                        )
                        .map(move |b| (r.resource_id, b))
                })
                .collect(),
        );
        self.inner.tcp.apply(&snapshot.routes).await;
        self.inner.udp.apply(&snapshot.routes).await;
        if !changes.is_empty() {
            tracing::info!(
                version = snapshot.version,
                routes = snapshot.routes.len(),
                peers = snapshot.peers.len(),
                "gateway config applied"
            );
        }
        applying.commit(snapshot, persist);
        Ok(())
    }

    /// The status report: applied version and peer counters.
    pub fn status(&self) -> StatusReport {
        StatusReport {
            session_accesses: self.inner.proxy.session_accesses().take(),
            session_labels: Default::default(),
            traffic: self.inner.metrics.traffic_since_last(),
            sessions: Vec::new(),
            applied_version: self.applied_version(),
            peers: self.inner.tunnel.peer_statuses(),
            targets: Vec::new(),
            refusals: self.inner.proxy.refusals().take(),
        }
    }

    /// Samples peer stats once: refreshes metrics and remembers learned endpoints (saved to
    /// `peers.json` when they change).
    pub fn remember_endpoints(&self) {
        let Some(tunnel) = self.tunnel() else { return };
        let stats = tunnel.peer_stats();
        self.inner.metrics.set_peers(
            stats
                .iter()
                .map(|s| PeerSample {
                    public_key: WgPublicKey(s.public_key).to_base64(),
                    tx_bytes: s.tx_bytes,
                    rx_bytes: s.rx_bytes,
                    handshake_age_secs: s.last_handshake.map(|d| d.as_secs()),
                })
                .collect(),
        );
        let configured = self
            .inner
            .configured_peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let observed = stats
            .iter()
            .filter_map(|s| s.endpoint.map(|e| (WgPublicKey(s.public_key), e)));
        let mut hints = self.inner.hints.lock().unwrap_or_else(|e| e.into_inner());
        if hints.merge(observed, &configured) {
            tracing::debug!("peer endpoints changed; saving them");
            if let Err(error) = hints.save(&self.inner.options.data_dir) {
                tracing::warn!(%error, "could not save peer endpoints");
            }
        }
    }

    /// Runs [`Gateway::remember_endpoints`] every `every`, forever, and closes the kept upstream
    /// connections that have been idle too long.
    pub async fn run_endpoint_memory(self, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.remember_endpoints();
            self.inner.proxy.sweep_idle();
        }
    }

    /// The public ports of TCP resources listened on now, with their local addresses.
    pub async fn tcp_listening(&self) -> Vec<(u16, std::net::SocketAddr)> {
        self.inner.tcp.listening().await
    }

    /// The public ports of UDP resources bound now, with their local addresses.
    pub async fn udp_listening(&self) -> Vec<(u16, std::net::SocketAddr)> {
        self.inner.udp.listening().await
    }

    /// Closes the TCP and UDP resources' listeners and connections.
    pub async fn stop_tcp(&self) {
        self.inner.tcp.stop().await;
        self.inner.udp.stop().await;
    }

    /// Stops the tunnel.
    pub fn shutdown(&self) {
        self.inner.health.stop();
        self.inner.tunnel.shutdown();
    }
}

/// The gateway accepts no streams from agents: refuses anything that arrives.
async fn refuse_all(mut incoming: Incoming) {
    while let Some(stream) = incoming.accept().await {
        stream.abort();
    }
}

impl NodeHooks for Gateway {
    async fn apply(&self, snapshot: ConfigSnapshot) -> Result<(), String> {
        Gateway::apply(self, snapshot, true)
            .await
            .map_err(|e| e.to_string())
    }

    fn status(&self) -> StatusReport {
        Gateway::status(self)
    }

    fn undelivered(&self, report: StatusReport) {
        self.inner.metrics.traffic_undelivered(&report.traffic);
        self.inner.proxy.refusals().restore(report.refusals);
        self.inner
            .proxy
            .session_accesses()
            .restore(report.session_accesses);
    }
}
