//! The public listener: what stands between the internet and the proxy.
//!
//! Every connection is admitted against a global cap and a per-client cap (an IPv4 address, or an
//! IPv6 /64, since one host holds a whole /64); a connection over either cap is closed at once and
//! counted. hyper reads request heads with a timer: a client has [`ListenerLimits::header_read_timeout`]
//! to send a complete head, which also bounds how long an idle keep-alive connection is kept (the
//! timer runs whenever hyper waits for a head), so slowloris connections are closed instead of
//! held. Heads larger than [`ListenerLimits::max_header_bytes`] are answered 431.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;
use crate::proxy::{stopping, Proxy};

/// Limits of the public listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Time to send a whole request head, and the longest idle time between keep-alive requests.
    pub header_read_timeout: Duration,
    /// Open client connections at most.
    pub max_connections: usize,
    /// Open connections from one client (IPv4 address or IPv6 /64) at most.
    pub max_connections_per_client: usize,
    /// Largest request head, in bytes (at least 8 KiB).
    pub max_header_bytes: usize,
    /// QUIC (HTTP/3) handshakes in progress at most; past half of it, a client must prove its
    /// address with a stateless Retry before its handshake starts.
    pub max_quic_handshakes: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(20),
            max_connections: 20_000,
            max_connections_per_client: 512,
            max_header_bytes: 64 * 1024,
            max_quic_handshakes: 512,
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener is at [`ListenerLimits::max_connections`].
    Global,
    /// The client is at [`ListenerLimits::max_connections_per_client`].
    PerClient,
}

impl Refusal {
    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Global => "global_limit",
            Refusal::PerClient => "per_client_limit",
        }
    }
}

/// How many connections may wait in the kernel for `accept` on a public listener. A burst of
/// thousands of new clients (a reconnect storm, a page of many assets, a load test) overflows
/// the 1,024 that `TcpListener::bind` asks for, and the kernel then drops SYNs and completed
/// handshakes, which clients see as second-long stalls or resets. The kernel caps the value at
/// `net.core.somaxconn`.
pub const LISTEN_BACKLOG: u32 = 65_535;

/// Binds a TCP listener with address reuse and a deep accept queue ([`LISTEN_BACKLOG`]).
pub fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The key a client's connections are counted under: the IPv4 address, or the IPv6 /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Admits connections against the global and per-client caps.
#[derive(Debug)]
pub struct Admission {
    global: Arc<Semaphore>,
    per_client: Mutex<HashMap<IpAddr, usize>>,
    max_per_client: usize,
}

/// An admitted connection; its slots are freed on drop.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    key: IpAddr,
    _global: OwnedSemaphorePermit,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut map = self
            .admission
            .per_client
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

impl Admission {
    /// Caps from `limits`.
    pub fn new(limits: &ListenerLimits) -> Arc<Admission> {
        Arc::new(Admission {
            global: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            per_client: Mutex::new(HashMap::new()),
            max_per_client: limits.max_connections_per_client.max(1),
        })
    }

    /// Admits a connection from `ip`, or says which cap it hit.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Refusal> {
        let global = self
            .global
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Global)?;
        let key = client_key(ip);
        let mut map = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(key).or_default();
        if *n >= self.max_per_client {
            return Err(Refusal::PerClient);
        }
        *n += 1;
        drop(map);
        Ok(Admitted {
            admission: Arc::clone(self),
            key,
            _global: global,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.per_client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum()
    }
}

/// Serves the proxy on `listener` with the default [`ListenerLimits`]; see [`serve_http_with`].
pub async fn serve_http(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    serve_http_with(listener, proxy, ListenerLimits::default(), shutdown, drain).await;
}

/// Serves the proxy on `listener` within `limits` until `shutdown` turns true, then lets in-flight
/// requests finish (for at most `drain`).
pub async fn serve_http_with(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    limits: ListenerLimits,
    shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let live = LiveSettings::fixed(limits, drain);
    accept_loop(listener, proxy, live, None, shutdown).await;
}

/// Like [`serve_http_with`], with TLS: HTTP/1.1 and HTTP/2 (by ALPN) over rustls. The TLS
/// handshake must finish within the header-read timeout. With `alt_svc`, every response carries
/// that `Alt-Svc` header (to advertise HTTP/3).
pub async fn serve_https_with(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    limits: ListenerLimits,
    tls: Arc<rustls::ServerConfig>,
    alt_svc: Option<http::HeaderValue>,
    shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let live = LiveSettings::fixed(limits, drain);
    accept_loop(listener, proxy, live, Some((tls, alt_svc)), shutdown).await;
}

/// What a listener reads again for every connection, so that a config reload changes it: its
/// limits (the header-read timeout and the largest head; the connection caps are fixed when it
/// starts) and how long it drains.
#[derive(Debug, Clone)]
pub struct LiveSettings {
    /// The limits.
    pub limits: watch::Receiver<ListenerLimits>,
    /// The grace period in-flight requests have once `shutdown` turns true.
    pub drain: watch::Receiver<Duration>,
}

impl LiveSettings {
    /// Settings that never change.
    pub fn fixed(limits: ListenerLimits, drain: Duration) -> LiveSettings {
        LiveSettings {
            limits: watch::channel(limits).1,
            drain: watch::channel(drain).1,
        }
    }
}

/// [`serve_http_with`] with settings a reload can change.
pub async fn serve_http_live(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    live: LiveSettings,
    shutdown: watch::Receiver<bool>,
) {
    accept_loop(listener, proxy, live, None, shutdown).await;
}

/// [`serve_https_with`] with settings a reload can change.
pub async fn serve_https_live(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    live: LiveSettings,
    tls: Arc<rustls::ServerConfig>,
    alt_svc: Option<http::HeaderValue>,
    shutdown: watch::Receiver<bool>,
) {
    accept_loop(listener, proxy, live, Some((tls, alt_svc)), shutdown).await;
}

/// Accepts until `shutdown`, then closes the listening socket at once (new connections are
/// refused, so clients and load balancers move to another gateway rather than wait in a backlog
/// nobody reads), asks every connection to finish (idle keep-alive connections close now, the
/// others after their request in flight) and waits for them for at most the drain period.
async fn accept_loop(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    live: LiveSettings,
    tls: Option<(Arc<rustls::ServerConfig>, Option<http::HeaderValue>)>,
    mut shutdown: watch::Receiver<bool>,
) {
    let admission = Admission::new(&live.limits.borrow());
    let metrics: Arc<Metrics> = proxy.metrics();
    let acceptor = tls.map(|(config, alt_svc)| (tokio_rustls::TlsAcceptor::from(config), alt_svc));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stopping(&mut shutdown) => break,
        };
        let (stream, client) = match accepted {
            Ok(a) => a,
            Err(error) => {
                tracing::warn!(%error, "accepting a client connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admitted = match admission.admit(client.ip()) {
            Ok(a) => a,
            Err(refusal) => {
                metrics.record_refused_connection(refusal.label());
                tracing::debug!(%client, reason = refusal.label(), "connection refused");
                drop(stream);
                continue;
            }
        };
        metrics.set_open_connections(admission.open());
        let _ = stream.set_nodelay(true);
        let limits = *live.limits.borrow();
        let proxy = Arc::clone(&proxy);
        let mut shutdown = shutdown.clone();
        let done = done_tx.clone();
        let admission = Arc::clone(&admission);
        let metrics = Arc::clone(&metrics);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _done = done;
            match acceptor {
                None => serve_plain(stream, client, proxy, &limits, &mut shutdown).await,
                Some((acceptor, alt_svc)) => {
                    let handshake =
                        tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream))
                            .await;
                    match handshake {
                        Ok(Ok(tls))
                            if tls.get_ref().1.alpn_protocol()
                                == Some(crate::tls::ACME_TLS_ALPN) =>
                        {
                            // A TLS-ALPN-01 validation: the handshake was the answer (RFC 8737).
                            let mut tls = tls;
                            let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
                        }
                        Ok(Ok(tls)) => {
                            serve_tls(tls, client, proxy, alt_svc, &limits, &mut shutdown).await;
                        }
                        Ok(Err(error)) => {
                            metrics.record_refused_connection("tls_handshake");
                            tracing::debug!(%client, %error, "TLS handshake failed");
                        }
                        Err(_) => {
                            metrics.record_refused_connection("tls_handshake_timeout");
                            tracing::debug!(%client, "TLS handshake timed out");
                        }
                    }
                }
            }
            drop(admitted);
            metrics.set_open_connections(admission.open());
        });
    }
    // Refuse new connections from now on; what waits in the backlog is reset too.
    drop(listener);
    drop(done_tx);
    let drain = *live.drain.borrow();
    let open = admission.open();
    if tokio::time::timeout(drain, done_rx.recv()).await.is_err() {
        tracing::warn!(
            open = admission.open(),
            grace = ?drain,
            "connections still open at the end of the shutdown grace period are cut"
        );
    } else if open > 0 {
        tracing::info!(connections = open, "in-flight requests finished");
    }
}

fn http1_builder(limits: &ListenerLimits) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
}

/// Serves HTTP/1.1 on `io` until it ends or `shutdown` (then gracefully).
async fn serve_http1<I>(
    io: I,
    client: SocketAddr,
    proxy: Arc<Proxy>,
    proto: &'static str,
    alt_svc: Option<http::HeaderValue>,
    limits: &ListenerLimits,
    shutdown: &mut watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let proxy = Arc::clone(&proxy);
        let alt_svc = alt_svc.clone();
        async move {
            let mut response = proxy.handle_as(req, client, proto).await;
            if let Some(v) = alt_svc {
                response.headers_mut().insert(http::header::ALT_SVC, v);
            }
            Ok::<_, Infallible>(response)
        }
    });
    let conn = http1_builder(limits)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stopping(shutdown) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%client, %error, proto, "HTTP/1.1 connection ended with an error");
    }
}

async fn serve_plain(
    stream: tokio::net::TcpStream,
    client: SocketAddr,
    proxy: Arc<Proxy>,
    limits: &ListenerLimits,
    shutdown: &mut watch::Receiver<bool>,
) {
    serve_http1(stream, client, proxy, "http", None, limits, shutdown).await;
}

/// HTTP/2: at most this many streams at once per connection.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 250;
/// HTTP/2 rapid-reset protection: streams reset by the client before the proxy answered, at
/// most this many pending; more and the connection is closed (CVE-2023-44487).
pub const H2_MAX_PENDING_RESETS: usize = 20;

/// HTTP/2 or HTTP/1.1 over TLS, as ALPN chose.
async fn serve_tls(
    stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    client: SocketAddr,
    proxy: Arc<Proxy>,
    alt_svc: Option<http::HeaderValue>,
    limits: &ListenerLimits,
    shutdown: &mut watch::Receiver<bool>,
) {
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    if !h2 {
        return serve_http1(stream, client, proxy, "https", alt_svc, limits, shutdown).await;
    }
    let service = hyper::service::service_fn(move |req| {
        let proxy = Arc::clone(&proxy);
        let alt_svc = alt_svc.clone();
        async move {
            let mut response = proxy.handle_as(req, client, "https").await;
            if let Some(v) = alt_svc {
                response.headers_mut().insert(http::header::ALT_SVC, v);
            }
            Ok::<_, Infallible>(response)
        }
    });
    let mut builder =
        hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        // WebSockets over HTTP/2 (RFC 8441).
        .enable_connect_protocol()
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stopping(shutdown) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%client, %error, "HTTP/2 connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1,500 clients connect at once to a listener that has not accepted yet: each is queued by
    /// the kernel, none is dropped (with `TcpListener::bind`'s 1,024 the rest wait for SYN
    /// retransmits, seconds).
    #[tokio::test]
    async fn a_burst_of_connections_waits_in_the_accept_queue() {
        let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(4096);
        assert!(somaxconn >= 1500, "net.core.somaxconn is {somaxconn}");
        let listener = bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let clients = tokio::task::spawn_blocking(move || {
            (0..1500)
                .map(|i| {
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                        .map_err(|e| format!("client {i}: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .unwrap();
        let clients = clients.unwrap();
        assert_eq!(clients.len(), 1500);
        drop(listener);
    }

    #[test]
    fn per_client_and_global_caps() {
        let a = Admission::new(&ListenerLimits {
            max_connections: 3,
            max_connections_per_client: 2,
            ..Default::default()
        });
        let ip1: IpAddr = "192.0.2.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let ip2: IpAddr = "192.0.2.2".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let c1 = a.admit(ip1).expect("first");
        let _c2 = a.admit(ip1).expect("second");
        assert_eq!(a.admit(ip1).err(), Some(Refusal::PerClient));
        let _c3 = a.admit(ip2).expect("another client");
        assert_eq!(a.admit(ip2).err(), Some(Refusal::Global));
        assert_eq!(a.open(), 3);
        drop(c1);
        assert_eq!(a.open(), 2);
        let _c4 = a.admit(ip1).expect("a freed slot is reused");
    }

    #[test]
    fn ipv6_clients_count_per_64_and_mapped_v4_as_v4() {
        let k = |s: &str| client_key(s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0])));
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_eq!(k("::ffff:192.0.2.7"), k("192.0.2.7"));
    }
}
