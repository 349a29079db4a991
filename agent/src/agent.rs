//! The agent runtime: holds the tunnel and the port -> target map, applies snapshots and forwards
//! the streams gateways open to their targets.
//!
//! Every stream starts with a [`StreamHeader`] naming a resource and its overlay port; a stream
//! whose header does not match a configured target exactly is reset before anything is dialed.
//! HTTP streams (the gateway keeps each for request after request) are piped byte for byte to a
//! kernel TCP connection to their target ([`crate::pipe`]), or, with traces exported, parsed
//! and forwarded over a keep-alive pool to carry the agent's span; TCP streams are copied both
//! ways. A flow ends (its stream reset)
//! as soon as a snapshot removes its resource or changes its target.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming as Body;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kakuremichi_node::{AppliedConfig, NodeHooks, NodeTunnel};
use kakuremichi_proto::{
    ConfigSnapshot, NodeKind, PeerConfig, SessionPhase, SessionSpec, SessionState, StatusReport,
    StreamHeader, StreamKind, Target, TargetStatus, AGENT_ERROR_HEADER,
};
use kakuremichi_tunnel::{Incoming, PeerSpec, Tunnel, TunnelStream};
use tokio::io::AsyncReadExt as _;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::Instrument as _;

use crate::apply::plan;
use crate::health::HealthChecks;
use crate::http1;
use crate::metrics::{CountedBody, CountedIo, Metrics, Refusal, ResourceCounters};
use crate::pipe::{self, Outcome, PipeHooks};
use crate::sessions::{SessionHost, StartRequest};
use uuid::Uuid;

/// How long dialing a target may take.
pub const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long resolving a gateway's endpoint may take before the last good answer is used.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Copy buffer per direction of a TCP flow.
pub const COPY_BUFFER: usize = 64 * 1024;
/// How long a gateway may take to send a stream's header.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle keep-alive connections kept per HTTP target.
pub const POOL_MAX_IDLE: usize = 256;
/// How long an idle pooled connection to a target is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The port -> target map, replaced as a whole by every snapshot.
type Targets = Arc<HashMap<u16, Target>>;
/// Responses the agent sends back to the gateway.
type AgentBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// What the agent needs besides snapshots.
#[derive(Clone)]
pub struct AgentOptions {
    /// Where `config.json` lives.
    pub data_dir: PathBuf,
    /// The WireGuard UDP bind address (port 0: ephemeral).
    pub wg_listen: SocketAddr,
    /// The node's WireGuard private key.
    pub private_key: [u8; 32],
    /// QUIC windows and limits inside the tunnel.
    pub quic: kakuremichi_tunnel::QuicSettings,
    /// How agent sessions run (`None`: this agent runs none).
    pub sessions: Option<crate::sessions::HostConfig>,
    /// The UDP-blocked fallback (`None`: off).
    pub fallback: Option<kakuremichi_node::relay::FallbackSettings>,
}

impl std::fmt::Debug for AgentOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentOptions")
            .field("data_dir", &self.data_dir)
            .field("wg_listen", &self.wg_listen)
            .field("private_key", &"***")
            .field("quic", &self.quic)
            .field("sessions", &self.sessions)
            .field("fallback", &self.fallback)
            .finish()
    }
}

pub use kakuremichi_node::ApplyError;

struct Inner {
    options: AgentOptions,
    tunnel: NodeTunnel,
    targets: watch::Sender<Targets>,
    /// The gateways' overlay addresses: the only peers streams are taken from.
    gateways: Mutex<HashSet<Ipv4Addr>>,
    http: Client<HttpConnector, CountedBody<Body>>,
    config: AppliedConfig,
    metrics: Arc<Metrics>,
    resolved: Mutex<HashMap<String, SocketAddr>>,
    /// Overlay port -> the last outcome of a flow to its target.
    target_status: Mutex<HashMap<u16, TargetStatus>>,
    health: Arc<HealthChecks>,
    /// The session host, made when control first asks for a session.
    sessions: std::sync::OnceLock<SessionHost>,
    /// Sessions started (or refused) here that control still lists: none is started twice.
    sessions_seen: Mutex<HashSet<Uuid>>,
    /// Sessions the host refused to start, and why (reported as failed).
    sessions_refused: Mutex<HashMap<Uuid, String>>,
    /// Woken when a session changes, so that control hears of it at once.
    status_wake: Arc<tokio::sync::Notify>,
    /// Set on SIGTERM: new streams are refused while the ones in flight finish.
    draining: std::sync::atomic::AtomicBool,
    /// Streams being forwarded now.
    in_flight: watch::Sender<usize>,
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
        let tunnel = NodeTunnel::new(
            options.private_key,
            options.wg_listen,
            true,
            options.quic.clone(),
        )
        .with_fallback(options.fallback);
        let config = AppliedConfig::new(&options.data_dir, NodeKind::Agent);
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(TARGET_CONNECT_TIMEOUT));
        let http = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(POOL_MAX_IDLE)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            // Without a timer the pool never looks at its idle connections: they would stay
            // open (and their buffers allocated) until the next request to that target.
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        Self {
            inner: Arc::new(Inner {
                options,
                tunnel,
                targets: watch::Sender::new(Arc::new(HashMap::new())),
                gateways: Mutex::new(HashSet::new()),
                http,
                config,
                metrics: Arc::default(),
                resolved: Mutex::new(HashMap::new()),
                target_status: Mutex::new(HashMap::new()),
                health: Arc::new(HealthChecks::default()),
                sessions: std::sync::OnceLock::new(),
                sessions_seen: Mutex::new(HashSet::new()),
                sessions_refused: Mutex::new(HashMap::new()),
                status_wake: Arc::new(tokio::sync::Notify::new()),
                draining: std::sync::atomic::AtomicBool::new(false),
                in_flight: watch::Sender::new(0),
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

    /// Applies a snapshot: binds the tunnel if needed, resolves gateway endpoints, sets peers,
    /// swaps the target map (which ends flows whose target changed), and when `persist` writes
    /// the cache.
    pub async fn apply(&self, snapshot: ConfigSnapshot, persist: bool) -> Result<(), ApplyError> {
        let kakuremichi_node::Apply {
            applying, incoming, ..
        } = kakuremichi_node::begin_apply(&self.inner.config, &self.inner.tunnel, &snapshot)
            .await?;
        let changes = plan(applying.running(), &snapshot);
        tracing::debug!(version = snapshot.version, ?changes, "applying config");
        if let Some(incoming) = incoming {
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
        self.inner.metrics.set_gateways(
            snapshot
                .peers
                .iter()
                .map(|p| (p.public_key.to_string(), p.name.clone())),
        );
        self.inner
            .metrics
            .retain_resources(&snapshot.targets.iter().map(|t| t.resource_id).collect());
        // Flows watch the map: those whose target is gone or changed end now.
        self.inner.targets.send_replace(Arc::new(targets));
        *self
            .inner
            .gateways
            .lock()
            .unwrap_or_else(|e| e.into_inner()) =
            snapshot.peers.iter().map(|p| p.overlay_address).collect();
        if let Some(tunnel) = self.tunnel() {
            tunnel.set_peers(specs);
        }
        self.inner
            .target_status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|port, st| {
                snapshot
                    .targets
                    .iter()
                    .any(|t| t.port == *port && t.target == st.target)
            });
        self.inner.health.reconcile(&snapshot.targets);
        self.reconcile_sessions(&snapshot.sessions).await;
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
            if self
                .inner
                .draining
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                // Shutting down: the gateway answers this request from elsewhere or says so.
                stream.abort();
                continue;
            }
            let span = tracing::debug_span!("stream", gateway = %stream.peer());
            let in_flight = InFlight::new(&self.inner.in_flight);
            let agent = self.clone();
            tokio::spawn(
                async move {
                    agent.forward(stream).await;
                    drop(in_flight);
                }
                .instrument(span),
            );
        }
        tracing::debug!("tunnel closed: accept loop ends");
    }

    /// Reads a stream's header, checks it against the config, and forwards the stream to its
    /// target until it ends or the target changes; anything that does not match is reset.
    async fn forward(self, mut stream: TunnelStream) {
        let known_gateway = self
            .inner
            .gateways
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&stream.peer());
        if !known_gateway {
            tracing::debug!("stream from a peer that is not a configured gateway: reset");
            self.inner.metrics.refused(Refusal::UnknownPeer);
            stream.abort();
            return;
        }
        let mut raw = [0u8; StreamHeader::LEN];
        let header = match tokio::time::timeout(HEADER_TIMEOUT, stream.read_exact(&mut raw)).await {
            Ok(Ok(_)) => StreamHeader::decode(&raw),
            Ok(Err(error)) => {
                tracing::debug!(%error, "stream ended before its header");
                return;
            }
            Err(_) => {
                tracing::debug!("no stream header in time: reset");
                self.inner.metrics.refused(Refusal::HeaderTimeout);
                stream.abort();
                return;
            }
        };
        let header = match header {
            Ok(h) => h,
            Err(error) => {
                tracing::debug!(%error, "bad stream header: reset");
                self.inner.metrics.refused(Refusal::BadHeader);
                stream.abort();
                return;
            }
        };
        if header.kind == StreamKind::Health {
            let _open = self.inner.metrics.accepted(header.kind);
            self.inner.health.serve_stream(stream).await;
            return;
        }
        if header.kind == StreamKind::Session {
            let _open = self.inner.metrics.accepted(header.kind);
            self.serve_session(stream, header.resource_id).await;
            return;
        }
        let mut targets = self.inner.targets.subscribe();
        let target = targets.borrow_and_update().get(&header.port).cloned();
        let Some(target) = target.filter(|t| t.resource_id == header.resource_id) else {
            tracing::debug!(
                port = header.port,
                resource_id = %header.resource_id,
                "stream for a resource this agent does not serve there: reset"
            );
            self.inner.metrics.refused(Refusal::UnknownResource);
            stream.abort();
            return;
        };
        let _open = self.inner.metrics.accepted(header.kind);
        let span = tracing::debug_span!("flow", resource_id = %target.resource_id, target = %target.target);
        let flow = async {
            match header.kind {
                // With traces exported, each request is parsed to carry the agent's span.
                StreamKind::Http if kakuremichi_telemetry::enabled() => {
                    self.serve_http(stream, &target).await;
                }
                StreamKind::Http => self.pipe_http(stream, &target).await,
                StreamKind::Tcp => self.copy_tcp(stream, &target).await,
                StreamKind::Udp => self.relay_udp(stream, &target).await,
                StreamKind::Health | StreamKind::Session => {}
            }
        }
        .instrument(span);
        tokio::select! {
            () = flow => {}
            () = target_changed(&mut targets, &target) => {
                tracing::debug!(resource_id = %target.resource_id, "target changed: flow ended");
            }
        }
    }

    /// Serves an HTTP exchange with an agent session's server: on its loopback port while it
    /// is starting or active, with `Host` its own (agentapi accepts only local names); a
    /// session this agent does not run gets a 404 the gateway passes on.
    async fn serve_session(&self, stream: TunnelStream, id: Uuid) {
        let port = self.inner.sessions.get().and_then(|h| {
            h.views()
                .into_iter()
                .find(|v| {
                    v.id == id && matches!(v.phase, SessionPhase::Starting | SessionPhase::Active)
                })
                .map(|v| v.port)
        });
        let span = tracing::debug_span!("session", session_id = %id);
        let target = port.map(|port| Target {
            resource_id: id,
            port: 0,
            target: format!("127.0.0.1:{port}"),
            health_check: None,
            hostname: format!("localhost:{port}"),
        });
        let service = hyper::service::service_fn(|mut req: Request<Body>| {
            let target = target.clone();
            async move {
                let Some(target) = target else {
                    return Ok::<_, Infallible>(agent_error(
                        StatusCode::NOT_FOUND,
                        "Session not found",
                    ));
                };
                if req.uri().path() == SESSION_LOG_PATH && req.method() == http::Method::GET {
                    return Ok(self.session_log(id).await);
                }
                if let Ok(v) = http::HeaderValue::from_str(&target.hostname) {
                    req.headers_mut().insert(header::HOST, v);
                }
                Ok(self.proxy_to_target(req, &target).await)
            }
        });
        let served = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades()
            .instrument(span)
            .await;
        if let Err(error) = served {
            tracing::debug!(%error, "session stream ended with an error");
        }
    }

    /// The last 64 KiB of a session's output (`session.log` in its folder).
    async fn session_log(&self, id: Uuid) -> Response<AgentBody> {
        let Some(config) = &self.inner.options.sessions else {
            return agent_error(StatusCode::NOT_FOUND, "Session not found");
        };
        let path = config.work_dir.join(id.to_string()).join("session.log");
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                tracing::warn!(session_id = %id, error = %e, "cannot read a session's log");
                return agent_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot read the session's log",
                );
            }
        };
        let tail = bytes[bytes.len().saturating_sub(64 * 1024)..].to_vec();
        let mut r = Response::new(
            Full::new(Bytes::from(tail))
                .map_err(|never: Infallible| match never {})
                .boxed_unsync(),
        );
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    }

    /// Serves the HTTP exchange on the stream, forwarding it over the target's keep-alive pool.
    async fn serve_http(&self, stream: TunnelStream, target: &Target) {
        let service = hyper::service::service_fn(|req: Request<Body>| async move {
            Ok::<_, Infallible>(self.proxy_to_target(req, target).await)
        });
        let served = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades()
            .await;
        if let Err(error) = served {
            tracing::debug!(%error, "HTTP stream ended with an error");
        }
    }

    /// Pipes the HTTP exchanges on the stream to connections to the target, byte for byte
    /// ([`crate::pipe`]).
    async fn pipe_http(&self, mut stream: TunnelStream, target: &Target) {
        let counters = self.inner.metrics.resource(target.resource_id);
        let hooks = PipeCounters {
            agent: self,
            target,
            counters: &counters,
        };
        let dial = || async {
            let tcp = tokio::time::timeout(
                TARGET_CONNECT_TIMEOUT,
                TcpStream::connect(target.target.as_str()),
            )
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting timed out")
            })??;
            let _ = tcp.set_nodelay(true);
            Ok(CountedIo::new(tcp, Arc::clone(&counters)))
        };
        match pipe::pipe(&mut stream, dial, &hooks).await {
            Outcome::Done => tracing::trace!("HTTP stream closed"),
            Outcome::Cut => {
                tracing::debug!("the target closed in the middle of an exchange: reset");
                stream.abort();
            }
            Outcome::Failed(error) => {
                tracing::debug!(%error, "HTTP stream failed: reset");
                stream.abort();
            }
        }
    }

    /// The counters of a target's resource (`None` for an agent session's server: session ids
    /// would make labels without bound).
    fn counters(&self, target: &Target) -> Option<Arc<ResourceCounters>> {
        (target.port != 0).then(|| self.inner.metrics.resource(target.resource_id))
    }

    /// Forwards one request to the target and counts it (status class, time to the response
    /// head, body bytes both ways).
    async fn proxy_to_target(&self, req: Request<Body>, target: &Target) -> Response<AgentBody> {
        let counters = self.counters(target);
        let response = self.exchange(req, target, counters.as_ref()).await;
        if let Some(c) = &counters {
            c.record_request(response.status().as_u16());
        }
        response
    }

    async fn exchange(
        &self,
        req: Request<Body>,
        target: &Target,
        counters: Option<&Arc<ResourceCounters>>,
    ) -> Response<AgentBody> {
        let mut req = req.map(|b| CountedBody::new(b, counters.cloned(), true));
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let uri = match format!("http://{}{}", target.target, path).parse::<http::Uri>() {
            Ok(uri) => uri,
            Err(_) => return agent_error(StatusCode::BAD_REQUEST, "the request URI is not valid"),
        };
        *req.uri_mut() = uri;
        let upgrading = req.headers().contains_key(header::UPGRADE);
        let gateway_upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));
        let sent = std::time::Instant::now();
        let span = forward_span(&mut req, target);
        let result = self.inner.http.request(req).instrument(span.clone()).await;
        let _entered = span.enter();
        match &result {
            Ok(response) => {
                span.record("http.response.status_code", response.status().as_u16());
            }
            Err(_) => {
                span.record("otel.status_code", "error");
            }
        }
        match result {
            Ok(mut response) => {
                if let Some(c) = counters {
                    c.record_response_time(sent.elapsed());
                }
                self.record(target, None);
                if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(gateway_upgrade) = gateway_upgrade {
                        let target_upgrade = hyper::upgrade::on(&mut response);
                        tokio::spawn(
                            join_upgrades(gateway_upgrade, target_upgrade, counters.cloned())
                                .in_current_span(),
                        );
                    }
                }
                response.map(|b| CountedBody::new(b, counters.cloned(), false).boxed_unsync())
            }
            Err(error) => {
                if let Some(c) = counters.filter(|_| error.is_connect()) {
                    c.record_dial_failure();
                }
                let message = if error.is_connect() {
                    "the target refused the connection"
                } else {
                    "the target closed the connection before answering"
                };
                self.record(target, Some(format!("{message}: {error}")));
                tracing::warn!(%error, "target request failed");
                agent_error(StatusCode::BAD_GATEWAY, message)
            }
        }
    }

    /// Copies a raw TCP flow both ways.
    async fn copy_tcp(&self, mut stream: TunnelStream, target: &Target) {
        let dialed = tokio::time::timeout(
            TARGET_CONNECT_TIMEOUT,
            TcpStream::connect(target.target.as_str()),
        )
        .await;
        let counters = self.inner.metrics.resource(target.resource_id);
        let tcp = match dialed {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                counters.record_dial_failure();
                self.record(target, Some(e.to_string()));
                tracing::debug!(error = %e, "target refused: reset");
                stream.abort();
                return;
            }
            Err(_) => {
                counters.record_dial_failure();
                self.record(target, Some("connecting timed out".into()));
                tracing::debug!("target timed out: reset");
                stream.abort();
                return;
            }
        };
        let _ = tcp.set_nodelay(true);
        self.record(target, None);
        let mut tcp = CountedIo::new(tcp, counters);
        match tokio::io::copy_bidirectional_with_sizes(
            &mut stream,
            &mut tcp,
            COPY_BUFFER,
            COPY_BUFFER,
        )
        .await
        {
            Ok((to_target, from_target)) => tracing::debug!(to_target, from_target, "flow closed"),
            Err(error) => tracing::debug!(%error, "flow ended with an error"),
        }
    }

    /// Relays one UDP flow: datagrams from the gateway (QUIC datagrams tied to the stream, or
    /// length-prefixed on the stream) to a socket connected to the target, and its answers back
    /// the same two ways. The flow ends when the gateway closes the stream (its idle
    /// timeout) or the target is unreachable (ICMP).
    async fn relay_udp(&self, stream: TunnelStream, target: &Target) {
        use std::sync::atomic::Ordering::Relaxed;
        let counters = self.inner.metrics.resource(target.resource_id);
        let resolved = match tokio::net::lookup_host(target.target.as_str()).await {
            Ok(mut addrs) => addrs.next(),
            Err(e) => {
                counters.record_dial_failure();
                self.record(target, Some(e.to_string()));
                stream.abort();
                return;
            }
        };
        let Some(addr) = resolved else {
            counters.record_dial_failure();
            self.record(target, Some("the target name has no address".into()));
            stream.abort();
            return;
        };
        let bind: std::net::SocketAddr = if addr.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = match tokio::net::UdpSocket::bind(bind).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open a UDP socket for a flow");
                stream.abort();
                return;
            }
        };
        if let Err(e) = socket.connect(addr).await {
            counters.record_dial_failure();
            self.record(target, Some(e.to_string()));
            stream.abort();
            return;
        }
        self.record(target, None);
        let datagrams = stream.datagrams();
        let (mut from_gateway, mut to_gateway) = tokio::io::split(stream);
        let socket = std::sync::Arc::new(socket);
        let sender = std::sync::Arc::clone(&socket);
        let sent = Arc::clone(&counters);
        // Gateway to target, framed on the stream: a framed read must not be cancelled, so it has
        // its own task.
        let mut forward = tokio::spawn(async move {
            let mut len = [0u8; 2];
            let mut buf = vec![0u8; kakuremichi_proto::MAX_DATAGRAM];
            loop {
                if from_gateway.read_exact(&mut len).await.is_err() {
                    return;
                }
                let n = usize::from(u16::from_be_bytes(len));
                if n > buf.len() || from_gateway.read_exact(&mut buf[..n]).await.is_err() {
                    return;
                }
                match sender.send(&buf[..n]).await {
                    Ok(n) => {
                        sent.bytes_to_target.fetch_add(n as u64, Relaxed);
                    }
                    Err(error) => tracing::debug!(%error, "cannot send a datagram to the target"),
                }
            }
        });
        let mut buf = vec![0u8; kakuremichi_proto::MAX_DATAGRAM];
        loop {
            tokio::select! {
                r = socket.recv(&mut buf) => match r {
                    Ok(n) => {
                        counters.bytes_from_target.fetch_add(n as u64, Relaxed);
                        // A QUIC datagram when it fits one (lost, not resent, if the tunnel loses
                        // it), the stream otherwise.
                        let d = &buf[..n];
                        if datagrams.max_size().is_some_and(|max| n <= max) {
                            match datagrams.send(d) {
                                Ok(()) => continue,
                                Err(kakuremichi_tunnel::DatagramError::Stream(_)) => break,
                                Err(_) => {}
                            }
                        }
                        let Some(frame) = kakuremichi_proto::frame_datagram(d) else {
                            continue;
                        };
                        if to_gateway.write_all(&frame).await.is_err() {
                            break;
                        }
                    }
                    Err(error) => {
                        // Connection refused (ICMP) from the target: report, keep the flow.
                        self.record(target, Some(error.to_string()));
                    }
                },
                d = datagrams.recv() => match d {
                    Ok(d) => match socket.send(&d).await {
                        Ok(n) => {
                            counters.bytes_to_target.fetch_add(n as u64, Relaxed);
                        }
                        Err(error) => {
                            tracing::debug!(%error, "cannot send a datagram to the target");
                        }
                    },
                    Err(_) => break,
                },
                _ = &mut forward => break,
            }
        }
        forward.abort();
        let _ = to_gateway.shutdown().await;
        tracing::debug!("UDP flow closed");
    }

    fn record(&self, target: &Target, error: Option<String>) {
        if target.port == 0 {
            // An agent session: its state goes in the sessions part of the report.
            return;
        }
        let mut status = self
            .inner
            .target_status
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        status.insert(
            target.port,
            TargetStatus {
                resource_id: target.resource_id,
                target: target.target.clone(),
                reachable: error.is_none(),
                error,
            },
        );
    }

    /// The Prometheus text of the agent's metrics; `control_connected`: whether the control
    /// channel is up.
    pub fn render_metrics(&self, control_connected: bool) -> String {
        let status = self.status();
        self.inner.metrics.render(&crate::metrics::Sample {
            peers: status.peers,
            targets: status.targets,
            sessions: status.sessions.iter().map(|s| s.phase).collect(),
            applied_version: status.applied_version,
            control_connected,
        })
    }

    /// The status report: applied version, gateway peers, target health (the health check's
    /// verdict where there is one, else the outcome of the last flow).
    pub fn status(&self) -> StatusReport {
        let mut by_port = self
            .inner
            .target_status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for t in self.inner.targets.borrow().values() {
            if !self.inner.health.checked(t.port) {
                continue;
            }
            let error = self.inner.health.failing(t.port);
            by_port.insert(
                t.port,
                TargetStatus {
                    resource_id: t.resource_id,
                    target: t.target.clone(),
                    reachable: error.is_none(),
                    error,
                },
            );
        }
        let mut targets: Vec<TargetStatus> = by_port.into_values().collect();
        targets.sort_by(|a, b| (a.resource_id, &a.target).cmp(&(b.resource_id, &b.target)));
        StatusReport {
            session_accesses: Vec::new(),
            session_labels: self.session_labels(),
            traffic: Vec::new(),
            sessions: self.session_states(),
            applied_version: self.applied_version(),
            peers: self.inner.tunnel.peer_statuses(),
            targets,
            refusals: Vec::new(),
        }
    }

    /// Starts the sessions control lists that this agent has not run yet, and ends those it
    /// no longer lists.
    async fn reconcile_sessions(&self, wanted: &[SessionSpec]) {
        let Some(config) = &self.inner.options.sessions else {
            let mut refused = self
                .inner
                .sessions_refused
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let ids: HashSet<Uuid> = wanted.iter().map(|s| s.id).collect();
            refused.retain(|id, _| ids.contains(id));
            let mut new = 0;
            for s in wanted {
                if let std::collections::hash_map::Entry::Vacant(e) = refused.entry(s.id) {
                    e.insert(
                        "this agent runs no sessions (start it with --session-command)".into(),
                    );
                    new += 1;
                }
            }
            if new > 0 {
                tracing::warn!(
                    sessions = new,
                    "control lists sessions, but this agent runs none"
                );
                self.inner.status_wake.notify_one();
            }
            return;
        };
        // Started at the first config even when it lists no session: the host first ends what an
        // earlier run left (orphaned process groups, folders of ended sessions).
        let host = self.inner.sessions.get_or_init(|| {
            let host = SessionHost::spawn(config.clone());
            let mut changes = host.changes();
            let wake = Arc::clone(&self.inner.status_wake);
            tokio::spawn(async move {
                use tokio::sync::broadcast::error::RecvError;
                loop {
                    match changes.recv().await {
                        Ok(_) | Err(RecvError::Lagged(_)) => wake.notify_one(),
                        Err(RecvError::Closed) => return,
                    }
                }
            });
            host
        });
        let ids: HashSet<Uuid> = wanted.iter().map(|s| s.id).collect();
        // Sessions the host knows, ended ones too: none of them starts again.
        let mut known = HashSet::new();
        for s in host.list().await {
            known.insert(s.view.id);
            if !s.view.phase.ended() && !ids.contains(&s.view.id) {
                let _ = host.stop(s.view.id).await;
            }
        }
        let new: Vec<&SessionSpec> = {
            let mut seen = self
                .inner
                .sessions_seen
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            seen.retain(|id| ids.contains(id));
            wanted
                .iter()
                .filter(|s| !known.contains(&s.id) && seen.insert(s.id))
                .collect()
        };
        self.inner
            .sessions_refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| ids.contains(id));
        for spec in new {
            let req = StartRequest {
                id: spec.id,
                role: spec.role.clone(),
                env: spec
                    .env
                    .iter()
                    .map(|(k, v)| (k.clone(), v.expose().to_owned()))
                    .collect(),
                ttl: spec.ttl_secs.map(Duration::from_secs),
                initial_message: spec.initial_message.clone(),
                oneshot: spec.oneshot,
            };
            if let Err(e) = host.start(req).await {
                tracing::warn!(session = %spec.id, error = %e, "cannot start a session");
                self.inner
                    .sessions_refused
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(spec.id, e.to_string());
                self.inner.status_wake.notify_one();
            }
        }
    }

    /// The labels this agent runs sessions with (none when it runs no sessions).
    fn session_labels(&self) -> std::collections::BTreeMap<String, String> {
        self.inner
            .options
            .sessions
            .as_ref()
            .map(|c| c.labels.clone())
            .unwrap_or_default()
    }

    /// This agent's sessions, for the status report.
    fn session_states(&self) -> Vec<SessionState> {
        let mut out: Vec<SessionState> = self
            .inner
            .sessions
            .get()
            .map(|h| h.views())
            .unwrap_or_default()
            .into_iter()
            .map(|v| SessionState {
                id: v.id,
                phase: v.phase,
                port: v.port,
                reason: v.reason,
                agent_status: v.agent_status,
            })
            .collect();
        let refused = self
            .inner
            .sessions_refused
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        out.extend(refused.iter().map(|(id, why)| SessionState {
            id: *id,
            phase: SessionPhase::Failed,
            port: 0,
            reason: Some(why.clone()),
            agent_status: None,
        }));
        out
    }

    /// The session host, once control has asked for a session.
    pub fn session_host(&self) -> Option<&SessionHost> {
        self.inner.sessions.get()
    }

    /// Refuses new streams from now on and waits until the streams in flight end, for at most
    /// `grace`; returns how many were still open then (and are cut when the agent stops).
    pub async fn drain(&self, grace: Duration) -> usize {
        self.inner
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut open = self.inner.in_flight.subscribe();
        let _ = tokio::time::timeout(grace, open.wait_for(|n| *n == 0)).await;
        let left = *open.borrow();
        drop(open);
        left
    }

    /// Streams being forwarded now.
    pub fn streams_in_flight(&self) -> usize {
        *self.inner.in_flight.borrow()
    }

    /// Ends every session (SIGTERM, SIGKILL after the grace period) and waits for them.
    pub async fn stop_sessions(&self) {
        if let Some(host) = self.inner.sessions.get() {
            host.shutdown().await;
        }
    }

    /// Stops the tunnel.
    pub fn shutdown(&self) {
        self.inner.health.stop();
        self.inner.tunnel.shutdown();
    }
}

/// One stream counted in flight until dropped.
struct InFlight(watch::Sender<usize>);

impl InFlight {
    fn new(count: &watch::Sender<usize>) -> InFlight {
        count.send_modify(|n| *n += 1);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Resolves when the map no longer has `mine` at its port (removed or re-targeted).
async fn target_changed(targets: &mut watch::Receiver<Targets>, mine: &Target) {
    loop {
        if targets.changed().await.is_err() {
            // The agent is gone: its flows end with the runtime.
            return std::future::pending().await;
        }
        if targets.borrow_and_update().get(&mine.port) != Some(mine) {
            return;
        }
    }
}

/// With traces exported, the span of one request forwarded to its target: a child of the
/// gateway's span (the `traceparent` it sent: the gateway is a configured peer, authenticated by
/// the tunnel), and the parent the app sees in the `traceparent` it gets. Without, a disabled
/// span and the request as it came.
fn forward_span<B>(req: &mut Request<B>, target: &Target) -> tracing::Span {
    if !kakuremichi_telemetry::enabled() {
        return tracing::Span::none();
    }
    let method = req.method().as_str();
    let span = tracing::info_span!(
        "forward",
        otel.name = method,
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        http.request.method = method,
        url.path = req.uri().path(),
        server.address = target.target.as_str(),
        http.response.status_code = tracing::field::Empty,
        kakuremichi.resource.id = %target.resource_id,
    );
    kakuremichi_telemetry::continue_from(&span, req.headers());
    kakuremichi_telemetry::inject(&span, req.headers_mut());
    span
}

/// Joins an upgraded exchange (WebSocket and the like) between the gateway's stream and the
/// target's connection.
async fn join_upgrades(
    gateway: hyper::upgrade::OnUpgrade,
    target: hyper::upgrade::OnUpgrade,
    counters: Option<Arc<ResourceCounters>>,
) {
    let (gateway, target) = match tokio::join!(gateway, target) {
        (Ok(g), Ok(t)) => (g, t),
        (g, t) => {
            tracing::debug!(
                gateway_ok = g.is_ok(),
                target_ok = t.is_ok(),
                "upgrade failed"
            );
            return;
        }
    };
    let mut gateway = TokioIo::new(gateway);
    let mut target = TokioIo::new(target);
    match tokio::io::copy_bidirectional(&mut gateway, &mut target).await {
        Ok((up, down)) => {
            if let Some(c) = counters {
                c.bytes_to_target
                    .fetch_add(up, std::sync::atomic::Ordering::Relaxed);
                c.bytes_from_target
                    .fetch_add(down, std::sync::atomic::Ordering::Relaxed);
            }
            tracing::debug!(up, down, "upgraded connection closed");
        }
        Err(error) => tracing::debug!(%error, "upgraded connection ended"),
    }
}

/// An error answered by the agent itself, marked so that the gateway answers with its own page.
/// The path, inside a session's routes, of its output (the agent answers it, not the session).
pub const SESSION_LOG_PATH: &str = "/.kakuremichi/log";

fn agent_error(status: StatusCode, message: &str) -> Response<AgentBody> {
    let body = Full::new(Bytes::from(format!("{message}\n")))
        .map_err(|never: Infallible| match never {})
        .boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
        .headers_mut()
        .insert(AGENT_ERROR_HEADER, HeaderValue::from_static("1"));
    response
}

/// What a pipe reports, counted for its target.
struct PipeCounters<'a> {
    agent: &'a Agent,
    target: &'a Target,
    counters: &'a Arc<ResourceCounters>,
}

impl PipeHooks for PipeCounters<'_> {
    fn dialed(&self, result: Result<(), &std::io::Error>) {
        match result {
            Ok(()) => self.agent.record(self.target, None),
            Err(error) => {
                // Answered with the agent's own 502.
                self.counters.record_dial_failure();
                self.counters.record_request(502);
                tracing::warn!(%error, "target request failed: the target refused the connection");
                self.agent.record(
                    self.target,
                    Some(format!("the target refused the connection: {error}")),
                );
            }
        }
    }

    fn response(&self, response: http1::Response) {
        self.counters.record_request(response.status);
        self.counters.record_response_time(response.waited);
    }
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

    fn status_wake(&self) -> Option<Arc<tokio::sync::Notify>> {
        Some(Arc::clone(&self.inner.status_wake))
    }
}
