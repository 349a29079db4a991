//! Raw TCP resources: a listener on every gateway per resource (`public_port`), each accepted
//! connection one tunnel stream (kind TCP) to the resource's agent, copied both ways.
//!
//! [`TcpRoutes::apply`] makes the listeners match a snapshot without a restart
//! ([`crate::ports`]): new ports are bound, removed ones closed with their connections, and a
//! changed resource is updated in place, closing only the connections to targets it lost.
//! Connections are admitted against the same per-client and global caps as HTTP.
//!
//! A target that asks for it gets a PROXY protocol v2 header (HAProxy's binary format, built
//! with the `ppp` crate) with the client's address and the gateway port it reached, before the
//! client's first byte. The agent needs nothing for it: the header is part of the stream.
//! A connection with no byte either way for the resource's `idle_timeout_ms` is closed (none by
//! default: databases hold idle connections for hours).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::time::Instant;

use kakuremichi_proto::{Route, RouteProtocol, StreamKind};
use tokio::net::TcpListener;
use tracing::Instrument as _;

use std::sync::atomic::Ordering;

use crate::metrics::ResourceCounters;

/// Decrements a resource's open-flow gauge when dropped.
struct OpenFlow(Arc<ResourceCounters>);

impl Drop for OpenFlow {
    fn drop(&mut self) {
        self.0.open_flows.fetch_sub(1, Ordering::Relaxed);
    }
}

fn scopeguard(c: Arc<ResourceCounters>) -> OpenFlow {
    OpenFlow(c)
}

use crate::balance::Dialer;
use crate::listener::{Admission, ListenerLimits};
use crate::metrics::Metrics;
use crate::ports::{until_backend_gone, PortHandles, PortTable};
use crate::proxy::stopping;
use crate::routing::RouteTarget;

/// The TCP listeners of one gateway.
pub struct TcpRoutes {
    listen_ip: IpAddr,
    upstream: Arc<Dialer>,
    admission: Arc<Admission>,
    metrics: Arc<Metrics>,
    ports: PortTable,
}

impl std::fmt::Debug for TcpRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpRoutes")
            .field("listen_ip", &self.listen_ip)
            .finish_non_exhaustive()
    }
}

impl TcpRoutes {
    /// No listeners yet; ports are bound on `listen_ip`.
    pub fn new(
        listen_ip: IpAddr,
        upstream: Arc<Dialer>,
        limits: &ListenerLimits,
        metrics: Arc<Metrics>,
    ) -> TcpRoutes {
        TcpRoutes {
            listen_ip,
            upstream,
            admission: Admission::new(limits),
            metrics,
            ports: PortTable::default(),
        }
    }

    /// The ports listened on now, with their local addresses.
    pub async fn listening(&self) -> Vec<(u16, SocketAddr)> {
        self.ports.listening().await
    }

    /// Makes the listeners match the TCP routes of a snapshot.
    pub async fn apply(&self, routes: &[Route]) {
        let wanted: HashMap<u16, Arc<RouteTarget>> = routes
            .iter()
            .filter(|r| r.protocol == RouteProtocol::Tcp)
            .filter_map(|r| {
                Some((
                    r.public_port?,
                    Arc::new(RouteTarget::from_route(r, StreamKind::Tcp)),
                ))
            })
            .collect();
        self.ports
            .apply("tcp", wanted, |port, target, handles| {
                let addr = SocketAddr::new(self.listen_ip, port);
                let listener = match crate::listener::bind_listener(addr) {
                    Ok(l) => l,
                    Err(error) => {
                        tracing::error!(%addr, %error, resource_id = %target.resource_id, "cannot listen for a TCP resource");
                        return None;
                    }
                };
                let local = listener.local_addr().unwrap_or(addr);
                tracing::info!(%local, resource_id = %target.resource_id, "listening for a TCP resource");
                tokio::spawn(
                    accept(
                        listener,
                        handles,
                        Arc::clone(&self.upstream),
                        Arc::clone(&self.admission),
                        Arc::clone(&self.metrics),
                    )
                    .instrument(tracing::info_span!("tcp", port, resource_id = %target.resource_id)),
                );
                Some(local)
            })
            .await;
    }

    /// Closes every listener and connection.
    pub async fn stop(&self) {
        self.ports.stop().await;
    }
}

async fn accept(
    listener: TcpListener,
    handles: PortHandles,
    upstream: Arc<Dialer>,
    admission: Arc<Admission>,
    metrics: Arc<Metrics>,
) {
    let PortHandles {
        target: targets,
        mut stopped,
    } = handles;
    loop {
        let (client, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%error, "accepting a TCP connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopping(&mut stopped) => return,
        };
        let admitted = match admission.admit(peer.ip()) {
            Ok(a) => a,
            Err(refusal) => {
                metrics.record_refused_connection(refusal.label());
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let local = client.local_addr();
        let target = Arc::clone(&targets.borrow());
        let counters = metrics.resource(target.resource_id);
        let upstream = Arc::clone(&upstream);
        let targets = targets.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(
            async move {
                let _admitted = admitted;
                counters.open_flows.fetch_add(1, Ordering::Relaxed);
                let _open = scopeguard(Arc::clone(&counters));
                let (mut stream, lease) = match upstream.open(&target).await {
                    Ok(s) => s,
                    Err(error) => {
                        tracing::debug!(%peer, %error, "cannot open a tunnel stream: closing");
                        return;
                    }
                };
                if target.wants_proxy_protocol(lease.backend) {
                    let header = match local.map(|l| proxy_header(peer, l)) {
                        Ok(Ok(h)) => h,
                        Ok(Err(error)) | Err(error) => {
                            tracing::warn!(%peer, %error, "cannot make a PROXY protocol header: closing");
                            return;
                        }
                    };
                    if let Err(error) = stream.write_all(&header).await {
                        tracing::debug!(%peer, %error, "tunnel stream closed before the PROXY header");
                        return;
                    }
                }
                let (mut client, last) = Watched::new(client);
                let idle = target.limits.idle_timeout_ms.map(|ms| Duration::from_millis(u64::from(ms)));
                tokio::select! {
                    () = until_idle(&last, idle) => {
                        tracing::debug!(%peer, "TCP flow idle: closed");
                    }
                    () = until_backend_gone(targets, lease.backend) => {
                        tracing::debug!(%peer, backend = %lease.backend, "target removed from the resource: TCP flow closed");
                    }
                    r = tokio::io::copy_bidirectional(&mut client, &mut stream) => match r {
                        Ok((up, down)) => {
                            counters.bytes_in.fetch_add(up, Ordering::Relaxed);
                            counters.bytes_out.fetch_add(down, Ordering::Relaxed);
                            tracing::debug!(%peer, up, down, "TCP flow closed")
                        }
                        Err(error) => tracing::debug!(%peer, %error, "TCP flow ended"),
                    },
                    _ = stopping(&mut stopped) => {
                        tracing::debug!(%peer, "resource removed or moved: TCP flow closed");
                    }
                }
            }
            .in_current_span(),
        );
    }
}

/// The PROXY protocol v2 header for a TCP connection from `client` to the gateway's `local`
/// address. An IPv4 address mapped into IPv6 is sent as IPv4; a mixed pair as IPv6.
pub fn proxy_header(client: SocketAddr, local: SocketAddr) -> std::io::Result<Vec<u8>> {
    fn canonical(a: SocketAddr) -> SocketAddr {
        match a {
            SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
                None => a,
            },
            v4 => v4,
        }
    }
    fn v6(a: SocketAddr) -> SocketAddr {
        match a {
            SocketAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
            v6 => v6,
        }
    }
    let (mut src, mut dst) = (canonical(client), canonical(local));
    if src.is_ipv4() != dst.is_ipv4() {
        (src, dst) = (v6(src), v6(dst));
    }
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (src, dst),
    )
    .build()
}

/// The time of a connection's last byte either way, in milliseconds since it was accepted.
struct LastActivity {
    since: Instant,
    ms: AtomicU64,
}

impl LastActivity {
    fn touch(&self) {
        let ms = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.ms.store(ms, Ordering::Relaxed);
    }

    fn at(&self) -> Instant {
        self.since + Duration::from_millis(self.ms.load(Ordering::Relaxed))
    }
}

/// A client connection that records when it last moved a byte.
struct Watched<T> {
    io: T,
    last: Arc<LastActivity>,
}

impl<T> Watched<T> {
    fn new(io: T) -> (Self, Arc<LastActivity>) {
        let last = Arc::new(LastActivity {
            since: Instant::now(),
            ms: AtomicU64::new(0),
        });
        (
            Watched {
                io,
                last: Arc::clone(&last),
            },
            last,
        )
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.last.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.last.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Resolves once the connection has moved no byte for `idle` (never, without one).
async fn until_idle(last: &LastActivity, idle: Option<Duration>) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    loop {
        let at = last.at() + idle;
        if at <= Instant::now() {
            return;
        }
        tokio::time::sleep_until(at).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_headers_name_the_client_and_the_gateway_port() {
        let client: SocketAddr = "192.0.2.7:51000".parse().unwrap();
        let local: SocketAddr = "198.51.100.1:20000".parse().unwrap();
        let h = proxy_header(client, local).unwrap();
        let parsed = ppp::v2::Header::try_from(&h[..]).unwrap();
        assert_eq!(parsed.command, ppp::v2::Command::Proxy);
        assert_eq!(parsed.protocol, ppp::v2::Protocol::Stream);
        assert_eq!(
            parsed.addresses,
            ppp::v2::Addresses::IPv4(ppp::v2::IPv4::new(
                [192, 0, 2, 7],
                [198, 51, 100, 1],
                51000,
                20000
            ))
        );
        // A v4 client on a dual-stack socket is sent as v4; a v6 client with a v4 listener as v6.
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:51000".parse().unwrap();
        assert_eq!(proxy_header(mapped, local).unwrap(), h);
        let v6: SocketAddr = "[2001:db8::7]:51000".parse().unwrap();
        let parsed6 = proxy_header(v6, local).unwrap();
        let parsed6 = ppp::v2::Header::try_from(&parsed6[..]).unwrap();
        assert!(matches!(parsed6.addresses, ppp::v2::Addresses::IPv6(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_is_counted_from_the_last_byte() {
        let (a, mut b) = tokio::io::duplex(64);
        let (mut watched, last) = Watched::new(a);
        let idle = Some(Duration::from_secs(2));
        let started = Instant::now();
        let writer = tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                b.write_all(b"x").await.unwrap();
            }
            b
        });
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            loop {
                if tokio::io::AsyncReadExt::read(&mut watched, &mut buf)
                    .await
                    .unwrap_or(0)
                    == 0
                {
                    return;
                }
            }
        });
        until_idle(&last, idle).await;
        assert_eq!(started.elapsed(), Duration::from_millis(4500 + 2000));
        let _b = writer.await.unwrap();
        reader.abort();
        // With no timeout it never fires.
        let never = tokio::time::timeout(Duration::from_secs(3600), until_idle(&last, None)).await;
        assert!(never.is_err());
    }
}
