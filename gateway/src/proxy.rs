//! The HTTP/1.1 reverse proxy: hyper on both sides, streaming bodies, clear error pages.
//!
//! Requests go to their upstream as HTTP/1.1 on streams (QUIC streams through the tunnel in
//! production), one request at a time per stream; a stream whose response was read to its end is
//! kept for the next request to the same backend ([`crate::idle`]). Every stream names its
//! resource and the agent ends the streams of a target that changes, so a kept one cannot keep
//! reaching an old target. The agent keeps the kernel-TCP connections to targets.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tracing::Instrument as _;

use std::sync::atomic::{AtomicBool, Ordering};

use kakuremichi_proto::identity::{GATEWAY_AUTH_PREFIX, JWKS_PATH};

use crate::auth::{self, EdgeIdentity, TokenCache};
use crate::balance::{BackendPool, Lease};
use crate::body::{Guarded, Trip, Tripped};
use crate::idle::{GiveBack, IdleStreams};
use crate::metrics::Metrics;
use crate::routing::{request_host, Dial, RouteTable, RouteTarget};

mod sessions;
pub use sessions::{SessionAccessBook, SessionsTable};

/// Body of every response the proxy sends.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// An error of a request body from any client protocol.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Body of every request the proxy forwards: HTTP/1.1 and HTTP/2 bodies (hyper's) and HTTP/3
/// bodies alike.
pub type RequestBody = UnsyncBoxBody<Bytes, BoxError>;

/// Why sending a request upstream failed.
#[derive(Debug, thiserror::Error)]
enum SendFailure {
    /// The upstream connection failed.
    #[error("{0}")]
    Upstream(hyper::Error),
    /// A fresh stream, after a kept one was found closed, could not be opened.
    #[error("{0}")]
    Open(ProxyError),
}

/// A byte stream to an upstream (a tunnel stream in production, TCP in some tests).
pub trait UpstreamStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The stream's QUIC datagrams, which UDP flows use (`None` where the stream has none).
    fn datagrams(&self) -> Option<kakuremichi_tunnel::StreamDatagrams> {
        None
    }
}

impl UpstreamStream for kakuremichi_tunnel::TunnelStream {
    fn datagrams(&self) -> Option<kakuremichi_tunnel::StreamDatagrams> {
        Some(kakuremichi_tunnel::TunnelStream::datagrams(self))
    }
}

/// A boxed upstream stream.
pub type UpstreamIo = Box<dyn UpstreamStream>;

/// Opens streams to targets.
pub trait Upstream: Send + Sync + 'static {
    /// Opens a stream for one request to `target`. `AddrNotAvailable` means "too many streams
    /// to that agent right now"; every other error means "the agent is not there".
    fn connect<'a>(
        &'a self,
        target: &'a Dial,
    ) -> Pin<Box<dyn Future<Output = io::Result<UpstreamIo>> + Send + 'a>>;
}

/// Proxy timeouts.
#[derive(Debug, Clone, Copy)]
pub struct ProxyTimeouts {
    /// Opening the upstream stream and the HTTP handshake.
    pub connect: Duration,
    /// From sending the request until the response head arrives (a resource may say otherwise).
    pub response: Duration,
    /// The longest silence inside a client's request body (a resource may say otherwise).
    pub body: Duration,
}

impl Default for ProxyTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            response: Duration::from_secs(60),
            body: Duration::from_secs(60),
        }
    }
}

/// Why the proxy answered with an error page instead of the site's response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The request had no usable `Host`.
    #[error("the request has no Host header")]
    MissingHost,
    /// No resource is published at this hostname.
    #[error("no resource is published at {0}")]
    UnknownHost(String),
    /// The agent is offline, has no handshake, or its target refused or reset the connection.
    #[error("the site that serves {0} is offline or its target refused the connection")]
    Offline(String),
    /// The site did not answer within the upstream timeout.
    #[error("the site that serves {0} did not answer in time")]
    Timeout(String),
    /// The agent has as many requests in flight as it accepts; retry shortly.
    #[error("the site that serves {0} is busy; try again shortly")]
    Busy(String),
    /// The request body is larger than the resource allows.
    #[error("the request body is larger than {0} bytes, the most this site accepts")]
    BodyTooLarge(u64),
    /// The client stopped sending its request body.
    #[error("the request body stopped arriving")]
    BodyTimeout,
}

impl ProxyError {
    /// The status code of the error page.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::MissingHost => StatusCode::BAD_REQUEST,
            ProxyError::UnknownHost(_) => StatusCode::NOT_FOUND,
            ProxyError::Offline(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// The error page: text/plain, or a small HTML page when the client accepts HTML.
    pub fn response(&self, accept: Option<&HeaderValue>) -> Response<ProxyBody> {
        let message = self.to_string();
        let wants_html = accept
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/html"));
        let (content_type, body) = if wants_html {
            let escaped = crate::auth::html_escape(&message);
            let status = self.status();
            (
                "text/html; charset=utf-8",
                format!(
                    "<!doctype html><html><head><meta charset=\"utf-8\"><title>{} {}</title></head>\
                     <body><h1>{} {}</h1><p>{escaped}</p><hr><p>kakuremichi gateway</p></body></html>\n",
                    status.as_u16(),
                    status.canonical_reason().unwrap_or(""),
                    status.as_u16(),
                    status.canonical_reason().unwrap_or(""),
                ),
            )
        } else {
            ("text/plain; charset=utf-8", format!("{message}\n"))
        };
        let mut response = Response::new(full(body));
        *response.status_mut() = self.status();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

fn full(s: String) -> ProxyBody {
    Full::new(Bytes::from(s))
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// A body of at most `max` bytes (empty when larger or broken).
async fn read_small_body(mut body: RequestBody, max: usize) -> Bytes {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Bytes::new();
        };
        if let Some(d) = frame.data_ref() {
            if out.len() + d.len() > max {
                return Bytes::new();
            }
            out.extend_from_slice(d);
        }
    }
    out.freeze()
}

fn empty_request_body() -> RequestBody {
    Empty::new()
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

fn empty() -> ProxyBody {
    Empty::new()
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) never forwarded by a proxy.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// Removes hop-by-hop headers, including those named in `Connection`, and `Upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// The protocol a request asks to upgrade to (`Connection: upgrade` + `Upgrade: x`).
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if connection_upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// How the gateway tells the target who the client is.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding<'a> {
    /// `http` or `https`: the scheme the client used on this listener.
    pub proto: &'static str,
    /// Proxies in front of the gateway whose `X-Forwarded-*` headers are believed.
    pub trusted_proxies: &'a [IpNet],
}

const CLIENT_ADDRESS_HEADERS: [&str; 5] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
    "forwarded",
];

fn trusted(ip: IpAddr, proxies: &[IpNet]) -> bool {
    proxies.iter().any(|n| n.contains(&ip))
}

/// Rewrites request headers for the upstream: strips hop-by-hop headers and sets the client's
/// address itself. The gateway is the edge: from an ordinary client, every `X-Forwarded-*`,
/// `X-Real-IP` and `Forwarded` header is dropped and replaced with what the gateway saw
/// (`X-Forwarded-For: <client>`, `X-Real-IP: <client>`, `X-Forwarded-Proto: http|https`,
/// `X-Forwarded-Host: <Host>`). From a trusted proxy, its `X-Forwarded-For` is kept and the proxy
/// appended, `X-Real-IP` is the right-most address that is not a trusted proxy, and its
/// `X-Forwarded-Proto` (only `http` or `https`) and `X-Forwarded-Host` are kept. `Forwarded` is
/// never passed on. `Host` stays as the client sent it (from the absolute-form URI if used).
pub fn rewrite_request_headers(
    headers: &mut HeaderMap,
    client_ip: IpAddr,
    original_host: &HeaderValue,
    upgrade: Option<&HeaderValue>,
    forwarding: &Forwarding<'_>,
) {
    strip_hop_by_hop(headers);
    // Room for what is added below and by sign-in (the assertion and four identity headers),
    // in one allocation rather than a growth per insert.
    headers.reserve(10);
    let from_proxy = trusted(client_ip, forwarding.trusted_proxies);
    let mut chain: Vec<String> = Vec::new();
    let mut proto = forwarding.proto;
    let mut forwarded_host = original_host.clone();
    if from_proxy {
        chain = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect();
        match headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
        {
            Some(p) if p.eq_ignore_ascii_case("https") => proto = "https",
            Some(p) if p.eq_ignore_ascii_case("http") => proto = "http",
            _ => {}
        }
        if let Some(h) = headers.get("x-forwarded-host") {
            forwarded_host = h.clone();
        }
    }
    for name in CLIENT_ADDRESS_HEADERS {
        headers.remove(name);
    }
    chain.push(client_ip.to_string());
    let real_ip = chain
        .iter()
        .rev()
        .find(|a| {
            a.parse::<IpAddr>()
                .is_ok_and(|ip| !trusted(ip, forwarding.trusted_proxies))
        })
        .cloned()
        .unwrap_or_else(|| client_ip.to_string());
    if let Ok(v) = HeaderValue::from_str(&chain.join(", ")) {
        headers.insert("x-forwarded-for", v);
    }
    if let Ok(v) = HeaderValue::from_str(&real_ip) {
        headers.insert("x-real-ip", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    headers.insert("x-forwarded-host", forwarded_host);
    headers.insert(header::HOST, original_host.clone());
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol.clone());
    }
}

/// The server span of a request, in its extensions while traces are exported.
#[derive(Debug, Clone)]
struct RequestSpan(tracing::Span);

/// The reverse proxy: routes, upstream and metrics.
pub struct Proxy {
    routes: Arc<RwLock<Arc<RouteTable>>>,
    upstream: Arc<dyn Upstream>,
    /// Changed live by a config reload.
    timeouts: RwLock<ProxyTimeouts>,
    metrics: Arc<Metrics>,
    /// Changed live by a config reload.
    trusted_proxies: RwLock<Arc<Vec<IpNet>>>,
    https_port: Option<u16>,
    pool: Arc<BackendPool>,
    idle: Arc<IdleStreams>,
    identity: RwLock<Option<Arc<EdgeIdentity>>>,
    tokens: TokenCache,
    refusals: auth::Refusals,
    control_up: AtomicBool,
    sessions: RwLock<Option<Arc<SessionsTable>>>,
    session_accesses: SessionAccessBook,
    control_http: reqwest::Client,
    /// The tunnel relays (the UDP-blocked fallback) attach to.
    relay_tunnel: std::sync::OnceLock<kakuremichi_node::NodeTunnel>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("timeouts", &self.timeouts())
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// A proxy reading routes from `routes` (swapped by the gateway on each snapshot).
    pub fn new(
        routes: Arc<RwLock<Arc<RouteTable>>>,
        upstream: Arc<dyn Upstream>,
        timeouts: ProxyTimeouts,
        metrics: Arc<Metrics>,
        trusted_proxies: Vec<IpNet>,
        https_port: Option<u16>,
        pool: Arc<BackendPool>,
    ) -> Self {
        Self {
            routes,
            upstream,
            timeouts: RwLock::new(timeouts),
            metrics,
            trusted_proxies: RwLock::new(Arc::new(trusted_proxies)),
            https_port,
            pool,
            idle: Arc::default(),
            identity: RwLock::new(None),
            tokens: TokenCache::default(),
            refusals: auth::Refusals::default(),
            control_up: AtomicBool::new(false),
            sessions: RwLock::new(None),
            session_accesses: SessionAccessBook::default(),
            control_http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default(),
            relay_tunnel: std::sync::OnceLock::new(),
        }
    }

    /// Takes WireGuard relays (the agents' UDP-blocked fallback) at
    /// [`crate::relay::RELAY_PATH`] on the HTTPS listener, for `tunnel`.
    pub fn serve_relays(&self, tunnel: kakuremichi_node::NodeTunnel) {
        let _ = self.relay_tunnel.set(tunnel);
    }

    /// The timeouts in force.
    pub fn timeouts(&self) -> ProxyTimeouts {
        *self.timeouts.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the timeouts (a config reload); requests already waiting keep theirs.
    pub fn set_timeouts(&self, timeouts: ProxyTimeouts) {
        *self.timeouts.write().unwrap_or_else(|e| e.into_inner()) = timeouts;
    }

    /// Replaces the proxies whose forwarded headers are believed (a config reload).
    pub fn set_trusted_proxies(&self, proxies: Vec<IpNet>) {
        *self
            .trusted_proxies
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(proxies);
    }

    /// Sets what the gateway knows about identity (from each snapshot).
    pub fn set_identity(&self, identity: Option<&kakuremichi_proto::identity::GatewayIdentity>) {
        *self.identity.write().unwrap_or_else(|e| e.into_inner()) =
            identity.map(|g| Arc::new(EdgeIdentity::new(g)));
    }

    /// Tells the proxy whether control is reachable: without it, a browser that has no session
    /// gets a clear page instead of a redirect to a sign-in page that cannot answer.
    pub fn set_control_up(&self, up: bool) {
        self.control_up.store(up, Ordering::Relaxed);
    }

    fn identity(&self) -> Option<Arc<EdgeIdentity>> {
        self.identity
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The gateway's own sign-in paths and the access check of a resource that needs sign-in.
    /// `Err`: the gateway's answer instead of the app's.
    async fn authorize(
        &self,
        req: &mut Request<RequestBody>,
        host: &str,
        proto: &'static str,
        target: &RouteTarget,
        client: SocketAddr,
    ) -> Result<(), Response<ProxyBody>> {
        auth::strip_identity_headers(req.headers_mut());
        let path = req.uri().path();
        let mcp = target.access.as_ref().is_some_and(|a| a.mcp);
        let own = path.starts_with(GATEWAY_AUTH_PREFIX)
            || path == JWKS_PATH
            || (mcp && path.starts_with(auth::RESOURCE_METADATA_PATH));
        if !own && target.access.is_none() {
            return Ok(());
        }
        let identity = self.identity();
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| host.to_owned());
        let path_and_query = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let method = req.method().clone();
        let ask = auth::Ask {
            host,
            authority: &authority,
            proto,
            method: &method,
            path_and_query: &path_and_query,
            now: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            control_up: self.control_up.load(Ordering::Relaxed),
            client: client.ip(),
            resource: target.resource_id,
            mcp,
        };
        if own {
            let form = if method == http::Method::POST {
                // A sign-out form: a few hundred bytes at most.
                let body = std::mem::replace(req.body_mut(), empty_request_body());
                Some(read_small_body(body, 4096).await)
            } else {
                None
            };
            if let Some(r) = auth::endpoint(
                identity.as_deref(),
                &self.tokens,
                req.headers(),
                &ask,
                form.as_deref(),
            ) {
                self.note_refusal(&r, host, client, ask.now);
                return Err(
                    (*r).map(|b| Full::new(b).map_err(|never| match never {}).boxed_unsync())
                );
            }
        }
        let Some(policy) = &target.access else {
            return Ok(());
        };
        auth::check(
            identity.as_deref(),
            &self.tokens,
            policy,
            req.headers_mut(),
            &ask,
        )
        .map(|_| ())
        .map_err(|r| {
            self.note_refusal(&r, host, client, ask.now);
            (*r).map(|b| Full::new(b).map_err(|never| match never {}).boxed_unsync())
        })
    }

    /// Counts a refusal marked on an answer, for control's audit log.
    fn note_refusal(&self, r: &auth::AuthResponse, host: &str, client: SocketAddr, now_secs: i64) {
        if let Some(refused) = r.extensions().get::<auth::Refused>() {
            self.refusals
                .record(host, Some(client.ip()), refused, now_secs * 1000);
        }
    }

    /// Refusals since the last status report.
    pub fn refusals(&self) -> &auth::Refusals {
        &self.refusals
    }

    /// Closes the kept upstream connections that are idle too long or closed by their agent.
    pub fn sweep_idle(&self) {
        self.idle.sweep(Instant::now());
    }

    /// Kept upstream connections, idle now.
    pub fn idle_upstreams(&self) -> usize {
        self.idle.len()
    }

    /// The redirect of a plain-HTTP request to HTTPS, for a resource that asks for it and a
    /// gateway that serves HTTPS.
    fn https_redirect(&self, host: &str, uri: &http::Uri) -> Option<Response<ProxyBody>> {
        let port = self.https_port?;
        let authority = if port == 443 {
            host.to_owned()
        } else {
            format!("{host}:{port}")
        };
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let location = HeaderValue::from_str(&format!("https://{authority}{path}")).ok()?;
        let mut response = Response::new(full(format!(
            "this site is served over HTTPS: {}\n",
            location.to_str().unwrap_or_default()
        )));
        *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
        response.headers_mut().insert(header::LOCATION, location);
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        Some(response)
    }

    /// The metrics requests are counted in.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// The route table (shared with the gateway, which swaps it on every snapshot).
    pub fn routes(&self) -> Arc<RwLock<Arc<RouteTable>>> {
        Arc::clone(&self.routes)
    }

    fn route(&self, host: &str) -> Option<Arc<RouteTarget>> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .lookup(host)
    }

    /// Handles one request from `client` on the plain-HTTP listener.
    pub async fn handle(&self, req: Request<Incoming>, client: SocketAddr) -> Response<ProxyBody> {
        self.handle_as(req, client, "http").await
    }

    /// Handles one request from `client` that arrived over `proto` (`http` or `https`).
    pub async fn handle_as(
        &self,
        req: Request<Incoming>,
        client: SocketAddr,
        proto: &'static str,
    ) -> Response<ProxyBody> {
        let req = req.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync());
        self.handle_boxed(req, client, proto).await
    }

    /// Handles one request with a boxed body (what HTTP/3 hands over). With traces exported,
    /// the request is a server span ([`Proxy::request_span`]) whose context the forwarded
    /// request carries (`traceparent`).
    pub async fn handle_boxed(
        &self,
        mut req: Request<RequestBody>,
        client: SocketAddr,
        proto: &'static str,
    ) -> Response<ProxyBody> {
        if !kakuremichi_telemetry::enabled() {
            return self.serve(req, client, proto).await;
        }
        let span = self.request_span(&req, client, proto);
        req.extensions_mut().insert(RequestSpan(span.clone()));
        let response = self
            .serve(req, client, proto)
            .instrument(span.clone())
            .await;
        let status = response.status();
        span.record("http.response.status_code", status.as_u16());
        if status.is_server_error() {
            span.record("otel.status_code", "error");
        }
        response
    }

    /// The server span of one request (OpenTelemetry's HTTP conventions). A trusted proxy's
    /// `traceparent` is continued; any other client's starts a new trace linked to it, so the
    /// internet cannot choose trace ids or join its requests to another trace.
    fn request_span(
        &self,
        req: &Request<RequestBody>,
        client: SocketAddr,
        proto: &'static str,
    ) -> tracing::Span {
        let method = req.method().as_str();
        let span = tracing::info_span!(
            "request",
            otel.name = method,
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            http.request.method = method,
            url.path = req.uri().path(),
            url.scheme = if proto == "http" { "http" } else { "https" },
            server.address = request_host(req.uri(), req.headers()).as_deref().unwrap_or(""),
            client.address = %client.ip(),
            network.protocol.version = ?req.version(),
            http.response.status_code = tracing::field::Empty,
            kakuremichi.resource.id = tracing::field::Empty,
        );
        let proxies = Arc::clone(
            &self
                .trusted_proxies
                .read()
                .unwrap_or_else(|e| e.into_inner()),
        );
        if trusted(client.ip(), &proxies) {
            kakuremichi_telemetry::continue_from(&span, req.headers());
        } else {
            kakuremichi_telemetry::link_to(&span, req.headers());
        }
        span
    }

    async fn serve(
        &self,
        req: Request<RequestBody>,
        client: SocketAddr,
        proto: &'static str,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let accept = req.headers().get(header::ACCEPT).cloned();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        if crate::relay::is_relay_request(&req) && self.relay_tunnel.get().is_some() {
            let response = crate::relay::accept(
                req,
                self.relay_tunnel.get(),
                client,
                proto == "https",
                |why| full(why.to_owned()),
            );
            tracing::debug!(%client, status = response.status().as_u16(), "relay request");
            return response;
        }
        if let Some(token) = path.strip_prefix("/.well-known/acme-challenge/") {
            let answer = self
                .routes
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .acme_http01(token)
                .map(str::to_owned);
            if let Some(answer) = answer {
                tracing::info!(%client, "answered an HTTP-01 validation request");
                self.metrics.record_request(200);
                return Response::builder()
                    .status(StatusCode::OK)
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .body(full(answer))
                    .unwrap_or_else(|_| Response::new(full(String::new())));
            }
        }
        let host = request_host(req.uri(), req.headers());
        if let Some(table) = host.as_deref().and_then(|h| self.sessions_for(h)) {
            let response = self.handle_sessions(req, client, proto, table).await;
            self.metrics.record_request(response.status().as_u16());
            tracing::debug!(%client, %method, %path, status = response.status().as_u16(), "sessions request");
            return response;
        }
        let (response, resource) = match host {
            None => (ProxyError::MissingHost.response(accept.as_ref()), None),
            Some(host) => match self.route(&host) {
                None => (
                    ProxyError::UnknownHost(host).response(accept.as_ref()),
                    None,
                ),
                Some(target) => {
                    if let Some(RequestSpan(s)) = req.extensions().get::<RequestSpan>() {
                        s.record(
                            "kakuremichi.resource.id",
                            tracing::field::display(target.resource_id),
                        );
                    }
                    let span = tracing::debug_span!(
                        "request",
                        resource_id = %target.resource_id,
                        %host
                    );
                    let counters = self.metrics.resource(target.resource_id);
                    if proto == "http" && target.redirect_https {
                        if let Some(r) = self.https_redirect(&host, req.uri()) {
                            counters.record(r.status().as_u16(), started.elapsed());
                            self.metrics.record_request(r.status().as_u16());
                            return r;
                        }
                    }
                    let mut req = req;
                    if let Err(r) = self
                        .authorize(&mut req, &host, proto, &target, client)
                        .await
                    {
                        counters.record(r.status().as_u16(), started.elapsed());
                        self.metrics.record_request(r.status().as_u16());
                        return r;
                    }
                    let max_body = target.limits.max_request_body_bytes;
                    if let Some(max) = max_body {
                        if req.body().size_hint().lower() > max {
                            let e = ProxyError::BodyTooLarge(max);
                            self.metrics.record_refused_request("body_too_large");
                            let r = e.response(accept.as_ref());
                            counters.record(r.status().as_u16(), started.elapsed());
                            self.metrics.record_request(r.status().as_u16());
                            return r;
                        }
                    }
                    let bytes_in = Arc::clone(&counters);
                    let idle = target.idle_timeout_or(self.timeouts().body);
                    let (head, body) = req.into_parts();
                    let (guarded, tripped) = Guarded::new(body, max_body, Some(idle));
                    let req = Request::from_parts(head, guarded.boxed_unsync());
                    let req = req.map(|b| {
                        b.map_frame(move |f| {
                            if let Some(d) = f.data_ref() {
                                bytes_in.bytes_in.fetch_add(
                                    d.len() as u64,
                                    std::sync::atomic::Ordering::Relaxed,
                                );
                            }
                            f
                        })
                        .boxed_unsync()
                    });
                    let result = self
                        .forward(req, client, proto, &host, &target, &tripped)
                        .instrument(span)
                        .await;
                    let result = result.map_err(|e| match tripped.get() {
                        Some(Trip::TooLarge) => {
                            self.metrics.record_refused_request("body_too_large");
                            ProxyError::BodyTooLarge(max_body.unwrap_or_default())
                        }
                        Some(Trip::Idle) => {
                            self.metrics.record_refused_request("body_timeout");
                            ProxyError::BodyTimeout
                        }
                        None => e,
                    });
                    let mut response = match result {
                        Ok(r) => match target.limits.idle_timeout_ms {
                            // The resource's idle timeout holds the response body too.
                            Some(ms) => r.map(|b| {
                                Guarded::new(b, None, Some(Duration::from_millis(u64::from(ms))))
                                    .0
                                    .boxed_unsync()
                            }),
                            None => r,
                        },
                        Err(e) => e.response(accept.as_ref()),
                    };
                    if let (Some(age), "https") = (target.hsts_max_age, proto) {
                        if let Ok(v) = HeaderValue::from_str(&format!("max-age={age}")) {
                            response
                                .headers_mut()
                                .insert(header::STRICT_TRANSPORT_SECURITY, v);
                        }
                    }
                    counters.record(response.status().as_u16(), started.elapsed());
                    let bytes_out = Arc::clone(&counters);
                    let response = response.map(|b| {
                        b.map_frame(move |f| {
                            if let Some(d) = f.data_ref() {
                                bytes_out.bytes_out.fetch_add(
                                    d.len() as u64,
                                    std::sync::atomic::Ordering::Relaxed,
                                );
                            }
                            f
                        })
                        .boxed_unsync()
                    });
                    (response, Some(target.resource_id))
                }
            },
        };
        let status = response.status();
        self.metrics.record_request(status.as_u16());
        tracing::debug!(
            %client,
            %method,
            %path,
            status = status.as_u16(),
            resource_id = ?resource,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "request"
        );
        response
    }

    /// A fresh stream to the target with an HTTP/1.1 client connection on it.
    async fn connect(
        &self,
        target: &Dial,
        host: &str,
    ) -> Result<SendRequest<RequestBody>, ProxyError> {
        let attempt = async {
            let io = self.upstream.connect(target).await?;
            let (sender, conn) = hyper::client::conn::http1::Builder::new()
                .handshake::<_, RequestBody>(TokioIo::new(io))
                .await
                .map_err(io::Error::other)?;
            // The connection outlives this request (it is kept for the next ones): it must
            // not hold the request's exported span open.
            let span = if kakuremichi_telemetry::enabled() {
                tracing::Span::none()
            } else {
                tracing::Span::current()
            };
            tokio::spawn(
                async move {
                    if let Err(error) = conn.with_upgrades().await {
                        tracing::debug!(%error, "upstream stream ended");
                    }
                }
                .instrument(span),
            );
            Ok::<_, io::Error>(sender)
        };
        match tokio::time::timeout(self.timeouts().connect, attempt).await {
            Ok(Ok(sender)) => Ok(sender),
            Ok(Err(e)) if e.kind() == io::ErrorKind::AddrNotAvailable => {
                tracing::debug!(error = %e, "agent busy");
                Err(ProxyError::Busy(host.to_owned()))
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, %host, "opening the upstream stream failed");
                Err(ProxyError::Offline(host.to_owned()))
            }
            Err(_) => Err(ProxyError::Timeout(host.to_owned())),
        }
    }

    async fn forward(
        &self,
        mut req: Request<RequestBody>,
        client: SocketAddr,
        proto: &'static str,
        host: &str,
        target: &RouteTarget,
        body_state: &Tripped,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        // A WebSocket over HTTP/2 (RFC 8441: CONNECT with `:protocol websocket`) goes to the
        // target as the HTTP/1.1 upgrade it understands (RFC 6455), and its 101 back as 200.
        let extended_connect = is_websocket_connect(&req);
        if extended_connect {
            websocket_connect_to_upgrade(&mut req);
        }
        let upgrade = upgrade_protocol(req.headers());
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));

        // Origin-form towards the upstream; Host as the client named it.
        let original_host = match req.uri().authority() {
            Some(a) => HeaderValue::from_str(a.as_str()).ok(),
            None => req.headers().get(header::HOST).cloned(),
        }
        .ok_or(ProxyError::MissingHost)?;
        let path_and_query = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        *req.uri_mut() = path_and_query
            .parse()
            .map_err(|_| ProxyError::MissingHost)?;
        *req.version_mut() = http::Version::HTTP_11;
        let sticky = target
            .sticky
            .then(|| sticky_backend(req.headers(), target))
            .flatten();
        let trusted_proxies = Arc::clone(
            &self
                .trusted_proxies
                .read()
                .unwrap_or_else(|e| e.into_inner()),
        );
        rewrite_request_headers(
            req.headers_mut(),
            client.ip(),
            &original_host,
            upgrade.as_ref(),
            &Forwarding {
                proto,
                trusted_proxies: &trusted_proxies,
            },
        );
        // The agent's span is a child of this request's (traces exported only).
        if let Some(RequestSpan(span)) = req.extensions().get::<RequestSpan>().cloned() {
            kakuremichi_telemetry::inject(&span, req.headers_mut());
        }

        // A request with no body can be sent again; one with a body only while it is unread.
        let replayable = req.body().is_end_stream() && client_upgrade.is_none();
        let idempotent = matches!(
            *req.method(),
            http::Method::GET
                | http::Method::HEAD
                | http::Method::OPTIONS
                | http::Method::TRACE
                | http::Method::PUT
                | http::Method::DELETE
        );
        let (parts, body) = req.into_parts();
        let mut body = Some(body);
        let mut tried: Vec<SocketAddrV4> = Vec::new();
        let mut last_error = ProxyError::Offline(host.to_owned());
        loop {
            let Some(lease) = self.pool.pick(target, sticky, &tried) else {
                return Err(last_error);
            };
            tried.push(lease.backend);
            let more = tried.len() < target.backends.len();
            let attempt_body = match body.take() {
                Some(b) => b,
                None if replayable => Empty::new().map_err(|n| match n {}).boxed_unsync(),
                None => return Err(last_error),
            };
            let request_with = |body: RequestBody| {
                let mut r = Request::new(body);
                *r.method_mut() = parts.method.clone();
                *r.uri_mut() = parts.uri.clone();
                *r.version_mut() = parts.version;
                *r.headers_mut() = parts.headers.clone();
                r
            };
            let attempt = request_with(attempt_body);
            let dial = target.dial(lease.backend);
            let kept = self.idle.take(&dial, Instant::now());
            let reused = kept.is_some();
            let fresh = match kept {
                Some(s) => Ok(s),
                None => self.connect(&dial, host).await,
            };
            let mut sender = match fresh {
                Ok(s) => s,
                Err(e @ ProxyError::Timeout(_)) | Err(e @ ProxyError::Offline(_)) if more => {
                    // Nothing was sent: any request may go elsewhere, its body unread.
                    body = Some(attempt.into_body());
                    tracing::debug!(backend = %lease.backend, error = %e, "retrying on another target");
                    last_error = e;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let retry_ok = more && replayable;
            let response_timeout = target
                .limits
                .response_timeout_ms
                .map_or(self.timeouts().response, |ms| {
                    Duration::from_millis(u64::from(ms))
                });
            // The response timeout counts from when the whole request is sent: a long upload
            // is not a slow target, and a stalled one is the body timeout's (408).
            let late = async {
                body_state.ended().await;
                tokio::time::sleep(response_timeout).await;
            };
            let send = async {
                if !reused {
                    return sender
                        .send_request(attempt)
                        .await
                        .map_err(SendFailure::Upstream);
                }
                // A kept connection that the agent closed meanwhile (its target changed, or the
                // stream was lost) gives the request back unsent, or fails it before any answer:
                // the request goes once more on a fresh stream to the same backend, if it was
                // not sent or can be sent again.
                let again = match sender.try_send_request(attempt).await {
                    Ok(response) => return Ok(response),
                    Err(mut e) => {
                        let unsent = e.take_message();
                        if !self.pool.usable(lease.backend) {
                            // The agent is gone (its health stream fell silent): a fresh
                            // stream would only wait for it too.
                            return Err(SendFailure::Upstream(e.into_error()));
                        }
                        match unsent {
                            Some(unsent) => unsent,
                            None if replayable && idempotent => {
                                request_with(Empty::new().map_err(|n| match n {}).boxed_unsync())
                            }
                            None => return Err(SendFailure::Upstream(e.into_error())),
                        }
                    }
                };
                tracing::debug!(backend = %lease.backend, "kept upstream connection closed: a fresh stream");
                sender = self.connect(&dial, host).await.map_err(SendFailure::Open)?;
                sender
                    .send_request(again)
                    .await
                    .map_err(SendFailure::Upstream)
            };
            let response = tokio::select! {
                r = send => match r {
                    Ok(response) => response,
                    Err(error) => {
                        tracing::warn!(%error, %host, backend = %lease.backend, "upstream request failed");
                        last_error = ProxyError::Offline(host.to_owned());
                        if retry_ok && idempotent {
                            continue;
                        }
                        return Err(last_error);
                    }
                },
                () = late => return Err(ProxyError::Timeout(host.to_owned())),
                () = self.pool.until_unusable(lease.backend), if retry_ok && idempotent => {
                    tracing::info!(backend = %lease.backend, "target went down before answering: retrying elsewhere");
                    last_error = ProxyError::Offline(host.to_owned());
                    continue;
                }
            };

            if response
                .headers()
                .contains_key(kakuremichi_proto::AGENT_ERROR_HEADER)
            {
                // The agent could not reach the target, so the request never got there.
                last_error = ProxyError::Offline(host.to_owned());
                if retry_ok {
                    continue;
                }
                return Err(last_error);
            }
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                if let Some(client_upgrade) = client_upgrade {
                    let mut switched = self.switch_protocols(response, client_upgrade, lease);
                    if extended_connect {
                        *switched.status_mut() = StatusCode::OK;
                        switched.headers_mut().remove("sec-websocket-accept");
                    }
                    return Ok(switched);
                }
            }

            // The connection is kept for the next request once the body has been read to its
            // end; a request that asked to upgrade leaves it to close with the body.
            let (mut parts, body) = response.into_parts();
            let body = match client_upgrade {
                None => GiveBack::new(body, sender, dial, Arc::clone(&self.idle)),
                Some(_) => GiveBack::closing(body),
            };
            strip_hop_by_hop(&mut parts.headers);
            if target.sticky && sticky != Some(lease.backend) {
                let secure = if proto == "https" { "; Secure" } else { "" };
                let cookie = format!(
                    "{STICKY_COOKIE}={}; Path=/; HttpOnly; SameSite=Lax{secure}",
                    backend_token(target.resource_id, lease.backend)
                );
                if let Ok(v) = HeaderValue::from_str(&cookie) {
                    parts.headers.append(header::SET_COOKIE, v);
                }
            }
            // The lease counts the request as outstanding until its body is done.
            let body = body
                .map_frame(move |f| {
                    let _held = &lease;
                    f
                })
                .map_err(|e| Box::new(e) as BoxError)
                .boxed_unsync();
            return Ok(Response::from_parts(parts, body));
        }
    }

    fn switch_protocols(
        &self,
        mut response: Response<Incoming>,
        client_upgrade: hyper::upgrade::OnUpgrade,
        lease: Lease,
    ) -> Response<ProxyBody> {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(
            async move {
                let _lease = lease;
                let (client, upstream) = match tokio::join!(client_upgrade, upstream_upgrade) {
                    (Ok(c), Ok(u)) => (c, u),
                    (c, u) => {
                        tracing::debug!(
                            client_ok = c.is_ok(),
                            upstream_ok = u.is_ok(),
                            "upgrade failed"
                        );
                        return;
                    }
                };
                let mut client = TokioIo::new(client);
                let mut upstream = TokioIo::new(upstream);
                match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                    Ok((up, down)) => tracing::debug!(up, down, "upgraded connection closed"),
                    Err(error) => tracing::debug!(%error, "upgraded connection ended"),
                }
            }
            .in_current_span(),
        );
        let (parts, _body) = response.into_parts();
        Response::from_parts(parts, empty())
    }
}

/// Whether `req` opens a WebSocket over HTTP/2 (RFC 8441 extended CONNECT).
fn is_websocket_connect<B>(req: &Request<B>) -> bool {
    req.method() == http::Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// Turns an RFC 8441 WebSocket CONNECT into the RFC 6455 `GET` + `Upgrade: websocket` a target
/// expects: HTTP/2 clients send no `Sec-WebSocket-Key` (nothing checks it end to end), so the
/// gateway makes one. `Sec-WebSocket-Version`, `-Protocol` and `-Extensions` pass as sent.
fn websocket_connect_to_upgrade<B>(req: &mut Request<B>) {
    *req.method_mut() = http::Method::GET;
    let headers = req.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if !headers.contains_key(header::SEC_WEBSOCKET_KEY) {
        use base64::Engine as _;
        let key = base64::engine::general_purpose::STANDARD.encode(uuid::Uuid::new_v4().as_bytes());
        if let Ok(v) = HeaderValue::from_str(&key) {
            headers.insert(header::SEC_WEBSOCKET_KEY, v);
        }
    }
    headers
        .entry(header::SEC_WEBSOCKET_VERSION)
        .or_insert(HeaderValue::from_static("13"));
}

/// The cookie that keeps a client on one target of a sticky resource.
pub const STICKY_COOKIE: &str = "kakuremichi_target";

/// The opaque, stable name of a backend in the sticky cookie: FNV-1a of the resource and the
/// backend, so that every gateway names it alike and the overlay address is not shown.
pub fn backend_token(resource: uuid::Uuid, backend: SocketAddrV4) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = resource
        .as_bytes()
        .iter()
        .copied()
        .chain(backend.ip().octets())
        .chain(backend.port().to_be_bytes());
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The backend a request's sticky cookie names, if it is one of the route's.
fn sticky_backend(headers: &HeaderMap, target: &RouteTarget) -> Option<SocketAddrV4> {
    let token = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == STICKY_COOKIE)
        .map(|(_, v)| v.trim())?;
    target
        .backends
        .iter()
        .copied()
        .find(|b| backend_token(target.resource_id, *b) == token)
}

/// Resolves once `shutdown` is true (or its sender is gone).
pub async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await.map(|_| ());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("content-length", HeaderValue::from_static("5"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str().to_owned()).collect();
        names.sort();
        assert_eq!(names, vec!["content-length", "x-kept"]);
    }

    const PLAIN: Forwarding<'static> = Forwarding {
        proto: "http",
        trusted_proxies: &[],
    };

    fn spoofed() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("Demo.localhost:8080"));
        h.append("x-forwarded-for", HeaderValue::from_static("203.0.113.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("198.51.100.7"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
        h.insert("x-real-ip", HeaderValue::from_static("10.0.0.1"));
        h.insert("forwarded", HeaderValue::from_static("for=10.0.0.2"));
        h.insert("connection", HeaderValue::from_static("close"));
        h
    }

    #[test]
    fn a_clients_own_forwarded_headers_are_replaced() {
        let mut h = spoofed();
        let host = HeaderValue::from_static("Demo.localhost:8080");
        rewrite_request_headers(&mut h, "192.0.2.9".parse().unwrap(), &host, None, &PLAIN);
        assert_eq!(h["x-forwarded-for"], "192.0.2.9");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-real-ip"], "192.0.2.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "Demo.localhost:8080");
        assert_eq!(h["host"], "Demo.localhost:8080");
        assert!(h.get("forwarded").is_none());
        assert!(h.get("connection").is_none());
    }

    #[test]
    fn a_trusted_proxy_is_believed_within_reason() {
        let proxies: Vec<IpNet> = vec![
            "192.0.2.0/24".parse().unwrap(),
            "198.51.100.7/32".parse().unwrap(),
        ];
        let fwd = Forwarding {
            proto: "http",
            trusted_proxies: &proxies,
        };
        let mut h = spoofed();
        let host = HeaderValue::from_static("Demo.localhost:8080");
        rewrite_request_headers(&mut h, "192.0.2.9".parse().unwrap(), &host, None, &fwd);
        assert_eq!(h["x-forwarded-for"], "203.0.113.1, 198.51.100.7, 192.0.2.9");
        // The right-most address that is not one of our proxies.
        assert_eq!(h["x-real-ip"], "203.0.113.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "evil.example");
        assert!(h.get("forwarded").is_none());
        // Only http or https is believed as a scheme.
        let mut h = spoofed();
        h.insert("x-forwarded-proto", HeaderValue::from_static("javascript"));
        rewrite_request_headers(&mut h, "192.0.2.9".parse().unwrap(), &host, None, &fwd);
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn upgrade_requests_keep_upgrade_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        let proto = upgrade_protocol(&h);
        assert_eq!(proto.as_ref().unwrap(), "websocket");
        let host = HeaderValue::from_static("a");
        rewrite_request_headers(
            &mut h,
            "::1".parse().unwrap(),
            &host,
            proto.as_ref(),
            &PLAIN,
        );
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["x-forwarded-for"], "::1");
        let mut plain = HeaderMap::new();
        plain.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(upgrade_protocol(&plain).is_none());
    }

    #[tokio::test]
    async fn error_pages_map_to_statuses() {
        let cases = [
            (
                ProxyError::MissingHost,
                400,
                "the request has no Host header",
            ),
            (
                ProxyError::UnknownHost("x.example".into()),
                404,
                "no resource is published at x.example",
            ),
            (
                ProxyError::Offline("x.example".into()),
                502,
                "the site that serves x.example is offline or its target refused the connection",
            ),
            (
                ProxyError::Timeout("x.example".into()),
                504,
                "the site that serves x.example did not answer in time",
            ),
            (
                ProxyError::Busy("x.example".into()),
                503,
                "the site that serves x.example is busy; try again shortly",
            ),
        ];
        for (error, status, message) in cases {
            let response = error.response(None);
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(
                response.headers()["content-type"],
                "text/plain; charset=utf-8"
            );
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, format!("{message}\n"));
        }
        let html = ProxyError::UnknownHost("<b>".into()).response(Some(&HeaderValue::from_static(
            "text/html,application/xhtml+xml",
        )));
        assert_eq!(html.headers()["content-type"], "text/html; charset=utf-8");
        let body = html.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(body.contains("404 Not Found"));
        assert!(body.contains("no resource is published at &lt;b&gt;"));
    }
}

#[cfg(test)]
mod kept_connection_tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use kakuremichi_proto::Route;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

    use super::*;

    impl UpstreamStream for DuplexStream {}

    /// Upstream streams as in-memory pipes, each served by a scripted HTTP/1.1 server: the first
    /// answers one request and then closes on the next one unanswered (as an agent does when the
    /// target changes under a kept stream); later ones answer every request.
    #[derive(Default)]
    struct Scripted {
        opened: AtomicUsize,
    }

    async fn read_head(io: &mut DuplexStream) -> bool {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match io.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return false,
            }
        }
        true
    }

    async fn answer(io: &mut DuplexStream, body: &str) {
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        io.write_all(response.as_bytes()).await.unwrap();
    }

    impl Upstream for Scripted {
        fn connect<'a>(
            &'a self,
            _target: &'a Dial,
        ) -> Pin<Box<dyn Future<Output = io::Result<UpstreamIo>> + Send + 'a>> {
            Box::pin(async move {
                let n = self.opened.fetch_add(1, Ordering::SeqCst);
                let (client, mut server) = tokio::io::duplex(64 * 1024);
                tokio::spawn(async move {
                    if n == 0 {
                        if read_head(&mut server).await {
                            answer(&mut server, "kept").await;
                        }
                        // The next request is read and never answered: the stream ends.
                        read_head(&mut server).await;
                        return;
                    }
                    while read_head(&mut server).await {
                        answer(&mut server, "fresh").await;
                    }
                });
                Ok(Box::new(client) as UpstreamIo)
            })
        }
    }

    fn proxy(upstream: Arc<Scripted>) -> Proxy {
        let route = Route::http(
            uuid::Uuid::from_u128(7),
            "demo.localhost",
            uuid::Uuid::from_u128(2),
            std::net::Ipv4Addr::new(100, 64, 0, 2),
            10000,
        );
        let routes = Arc::new(RwLock::new(Arc::new(RouteTable::from_routes(&[route]))));
        Proxy::new(
            routes,
            upstream,
            ProxyTimeouts::default(),
            Arc::default(),
            Vec::new(),
            None,
            Arc::default(),
        )
    }

    async fn get(proxy: &Proxy, method: http::Method) -> (u16, Bytes) {
        let req = Request::builder()
            .method(method)
            .uri("/")
            .header(header::HOST, "demo.localhost")
            .body(Empty::new().map_err(|n| match n {}).boxed_unsync())
            .unwrap();
        let client: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let response = proxy.handle_boxed(req, client, "http").await;
        let status = response.status().as_u16();
        (
            status,
            response.into_body().collect().await.unwrap().to_bytes(),
        )
    }

    #[tokio::test]
    async fn a_request_on_a_kept_connection_that_closes_unanswered_goes_on_a_fresh_stream() {
        let upstream = Arc::new(Scripted::default());
        let proxy = proxy(Arc::clone(&upstream));
        assert_eq!(get(&proxy, http::Method::GET).await, (200, "kept".into()));
        // The first stream is kept once its body has been read...
        tokio::task::yield_now().await;
        assert_eq!(proxy.idle_upstreams(), 1);
        // ...and reused: it takes the request and closes unanswered; the request is sent again
        // on a fresh stream (idempotent, no body), and the client never sees the failure.
        assert_eq!(get(&proxy, http::Method::GET).await, (200, "fresh".into()));
        assert_eq!(upstream.opened.load(Ordering::SeqCst), 2);
        // The fresh stream is kept and serves the next requests alone.
        for _ in 0..5 {
            assert_eq!(get(&proxy, http::Method::GET).await, (200, "fresh".into()));
        }
        assert_eq!(upstream.opened.load(Ordering::SeqCst), 2);
        assert_eq!(proxy.idle_upstreams(), 1);
    }

    #[tokio::test]
    async fn a_post_sent_on_a_kept_connection_that_closes_is_not_sent_twice() {
        let upstream = Arc::new(Scripted::default());
        let proxy = proxy(Arc::clone(&upstream));
        assert_eq!(get(&proxy, http::Method::GET).await, (200, "kept".into()));
        tokio::task::yield_now().await;
        // A POST reached the upstream before the stream ended: it may have had its effect, so
        // it is not repeated; the client gets the gateway's 502.
        let (status, _) = get(&proxy, http::Method::POST).await;
        assert_eq!(status, 502);
        assert_eq!(upstream.opened.load(Ordering::SeqCst), 1);
    }
}
