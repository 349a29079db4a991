//! UDP resources: a socket on every gateway per resource (`public_port`). Each client address is
//! one flow: one tunnel stream (kind UDP) to the resource's agent, which names the resource and
//! lives as long as the flow, and the flow's datagrams; answers go back to that address. A flow
//! with no datagram either way for [`FLOW_IDLE`] is closed, as NAT devices and Cloudflare
//! Spectrum do.
//!
//! Datagrams ride QUIC datagrams tied to the flow's stream (as HTTP/3 datagrams are, RFC 9297):
//! a packet lost inside the tunnel loses that datagram, as the Internet would, and never holds
//! up the ones behind it. Only the first datagram of a flow (so it cannot overtake the stream's
//! opening) and datagrams too large for one QUIC datagram (over about 1,350 bytes) ride the
//! stream itself, length-prefixed ([`kakuremichi_proto::frame_datagram`]): reliable and in
//! order, as IP fragments would not be. A flow's queue towards the tunnel is bounded
//! ([`FLOW_QUEUE`]); when it is full, new datagrams are dropped, as a congested UDP path would. New flows are admitted against the same
//! per-client and global caps as TCP connections. [`UdpRoutes::apply`] follows snapshots without
//! a restart, like [`crate::tcp::TcpRoutes`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use kakuremichi_proto::{frame_datagram, Route, RouteProtocol, StreamKind, MAX_DATAGRAM};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tracing::Instrument as _;

use crate::balance::Dialer;
use crate::listener::{Admission, ListenerLimits};
use crate::metrics::Metrics;
use crate::ports::{until_backend_gone, PortHandles, PortTable};
use crate::proxy::stopping;
use crate::routing::RouteTarget;

/// A flow with no datagram either way for this long is closed.
pub const FLOW_IDLE: Duration = Duration::from_secs(60);
/// Datagrams queued per flow towards the tunnel at most.
pub const FLOW_QUEUE: usize = 256;

/// The UDP sockets of one gateway.
pub struct UdpRoutes {
    listen_ip: IpAddr,
    upstream: Arc<Dialer>,
    admission: Arc<Admission>,
    metrics: Arc<Metrics>,
    ports: PortTable,
}

impl std::fmt::Debug for UdpRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpRoutes")
            .field("listen_ip", &self.listen_ip)
            .finish_non_exhaustive()
    }
}

impl UdpRoutes {
    /// No sockets yet; ports are bound on `listen_ip`.
    pub fn new(
        listen_ip: IpAddr,
        upstream: Arc<Dialer>,
        limits: &ListenerLimits,
        metrics: Arc<Metrics>,
    ) -> UdpRoutes {
        UdpRoutes {
            listen_ip,
            upstream,
            admission: Admission::new(limits),
            metrics,
            ports: PortTable::default(),
        }
    }

    /// The ports bound now, with their local addresses.
    pub async fn listening(&self) -> Vec<(u16, SocketAddr)> {
        self.ports.listening().await
    }

    /// Makes the sockets match the UDP routes of a snapshot.
    pub async fn apply(&self, routes: &[Route]) {
        let wanted: HashMap<u16, Arc<RouteTarget>> = routes
            .iter()
            .filter(|r| r.protocol == RouteProtocol::Udp)
            .filter_map(|r| {
                Some((
                    r.public_port?,
                    Arc::new(RouteTarget::from_route(r, StreamKind::Udp)),
                ))
            })
            .collect();
        self.ports
            .apply("udp", wanted, |port, target, handles| {
                let addr = SocketAddr::new(self.listen_ip, port);
                let socket = match bind_udp(addr) {
                    Ok(s) => Arc::new(s),
                    Err(error) => {
                        tracing::error!(%addr, %error, resource_id = %target.resource_id, "cannot bind a UDP resource's port");
                        return None;
                    }
                };
                let local = socket.local_addr().unwrap_or(addr);
                tracing::info!(%local, resource_id = %target.resource_id, "listening for a UDP resource");
                tokio::spawn(
                    receive(
                        socket,
                        handles,
                        Arc::clone(&self.upstream),
                        Arc::clone(&self.admission),
                        Arc::clone(&self.metrics),
                    )
                    .instrument(tracing::info_span!("udp", port, resource_id = %target.resource_id)),
                );
                Some(local)
            })
            .await;
    }

    /// Closes every socket and flow.
    pub async fn stop(&self) {
        self.ports.stop().await;
    }
}

fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// Reads datagrams from the public socket and hands each to its client's flow (made on first use).
async fn receive(
    socket: Arc<UdpSocket>,
    handles: PortHandles,
    upstream: Arc<Dialer>,
    admission: Arc<Admission>,
    metrics: Arc<Metrics>,
) {
    let PortHandles {
        target: targets,
        mut stopped,
    } = handles;
    let mut flows: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, peer) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(error) => {
                    // ICMP errors for earlier answers surface here on some systems; keep going.
                    tracing::debug!(%error, "receiving a UDP datagram failed");
                    continue;
                }
            },
            _ = stopping(&mut stopped) => return,
        };
        let datagram = buf[..n].to_vec();
        if let Some(tx) = flows.get(&peer) {
            match tx.try_send(datagram) {
                Ok(()) => continue,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    metrics.record_refused_connection("udp_flow_queue_full");
                    continue;
                }
                Err(mpsc::error::TrySendError::Closed(d)) => {
                    flows.remove(&peer);
                    // A new flow below, with this datagram.
                    new_flow(
                        &mut flows, peer, d, &socket, &targets, &upstream, &admission, &metrics,
                        &stopped,
                    );
                    continue;
                }
            }
        }
        flows.retain(|_, tx| !tx.is_closed());
        new_flow(
            &mut flows, peer, datagram, &socket, &targets, &upstream, &admission, &metrics,
            &stopped,
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn new_flow(
    flows: &mut HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    peer: SocketAddr,
    first: Vec<u8>,
    socket: &Arc<UdpSocket>,
    targets: &watch::Receiver<Arc<RouteTarget>>,
    upstream: &Arc<Dialer>,
    admission: &Arc<Admission>,
    metrics: &Arc<Metrics>,
    stopped: &watch::Receiver<bool>,
) {
    let admitted = match admission.admit(peer.ip()) {
        Ok(a) => a,
        Err(refusal) => {
            metrics.record_refused_connection(refusal.label());
            return;
        }
    };
    let (tx, rx) = mpsc::channel(FLOW_QUEUE);
    if tx.try_send(first).is_err() {
        return;
    }
    flows.insert(peer, tx);
    let socket = Arc::clone(socket);
    let upstream = Arc::clone(upstream);
    let target = Arc::clone(&targets.borrow());
    let counters = metrics.resource(target.resource_id);
    let metrics = Arc::clone(metrics);
    let targets = targets.clone();
    let stopped = stopped.clone();
    tokio::spawn(
        async move {
            let _admitted = admitted;
            counters.open_flows.fetch_add(1, Ordering::Relaxed);
            flow(
                socket, peer, target, targets, upstream, rx, &counters, metrics, stopped,
            )
            .await;
            counters.open_flows.fetch_sub(1, Ordering::Relaxed);
        }
        .in_current_span(),
    );
}

/// One client's flow: its datagrams to the agent, the agent's back to the client.
///
/// A datagram rides a QUIC datagram tied to the flow's stream when it fits one, so a lost
/// packet inside the tunnel loses that datagram only and holds nothing up; the first datagram
/// of a flow (which must not overtake the stream's opening) and any too large for one ride the
/// stream, framed. The stream-to-client half runs in its own task, since a framed read must not
/// be cancelled.
#[allow(clippy::too_many_arguments)]
async fn flow(
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
    target: Arc<RouteTarget>,
    targets: watch::Receiver<Arc<RouteTarget>>,
    upstream: Arc<Dialer>,
    mut rx: mpsc::Receiver<Vec<u8>>,
    counters: &Arc<crate::metrics::ResourceCounters>,
    metrics: Arc<Metrics>,
    mut stopped: watch::Receiver<bool>,
) {
    let (stream, lease) = match upstream.open(&target).await {
        Ok(s) => s,
        Err(error) => {
            tracing::debug!(%peer, %error, "cannot open a tunnel stream: UDP flow dropped");
            return;
        }
    };
    let datagrams = stream.datagrams();
    let (mut from_agent, mut to_agent) = tokio::io::split(stream);
    let flow_idle = target.idle_timeout_or(FLOW_IDLE);
    let gone = until_backend_gone(targets, lease.backend);
    tokio::pin!(gone);
    let last = Arc::new(std::sync::Mutex::new(tokio::time::Instant::now()));
    let touch = |last: &std::sync::Mutex<tokio::time::Instant>| {
        *last.lock().unwrap_or_else(|e| e.into_inner()) = tokio::time::Instant::now();
    };
    let mut answers = {
        let last = Arc::clone(&last);
        let counters = Arc::clone(counters);
        let metrics = Arc::clone(&metrics);
        let socket = Arc::clone(&socket);
        tokio::spawn(async move {
            let mut len = [0u8; 2];
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                if from_agent.read_exact(&mut len).await.is_err() {
                    return;
                }
                let n = usize::from(u16::from_be_bytes(len));
                if n > MAX_DATAGRAM || from_agent.read_exact(&mut buf[..n]).await.is_err() {
                    return;
                }
                touch(&last);
                counters.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                metrics.record_udp_datagram(false, false);
                if let Err(error) = socket.send_to(&buf[..n], peer).await {
                    tracing::debug!(%peer, %error, "cannot answer a UDP client");
                }
            }
        })
    };
    let mut first = true;
    loop {
        let idle_at = *last.lock().unwrap_or_else(|e| e.into_inner()) + flow_idle;
        tokio::select! {
            d = rx.recv() => {
                let Some(d) = d else { break };
                touch(&last);
                counters.bytes_in.fetch_add(d.len() as u64, Ordering::Relaxed);
                let sent = match &datagrams {
                    Some(q) if !first && q.max_size().is_some_and(|max| d.len() <= max) => {
                        q.send(&d)
                    }
                    _ => Err(kakuremichi_tunnel::DatagramError::TooLarge),
                };
                first = false;
                match sent {
                    Ok(()) => metrics.record_udp_datagram(true, true),
                    Err(kakuremichi_tunnel::DatagramError::Stream(_)) => {
                        tracing::debug!(%peer, "tunnel stream closed: UDP flow ended");
                        break;
                    }
                    Err(_) => {
                        let Some(frame) = frame_datagram(&d) else { continue };
                        metrics.record_udp_datagram(true, false);
                        if to_agent.write_all(&frame).await.is_err() {
                            tracing::debug!(%peer, "tunnel stream closed: UDP flow ended");
                            break;
                        }
                    }
                }
            }
            d = next_datagram(datagrams.as_ref()) => {
                let Ok(d) = d else {
                    tracing::debug!(%peer, "tunnel stream closed: UDP flow ended");
                    break;
                };
                touch(&last);
                counters.bytes_out.fetch_add(d.len() as u64, Ordering::Relaxed);
                metrics.record_udp_datagram(false, true);
                if let Err(error) = socket.send_to(&d, peer).await {
                    tracing::debug!(%peer, %error, "cannot answer a UDP client");
                }
            }
            _ = &mut answers => {
                tracing::debug!(%peer, "agent ended the UDP flow");
                break;
            }
            () = tokio::time::sleep_until(idle_at) => {
                if *last.lock().unwrap_or_else(|e| e.into_inner()) + flow_idle <= tokio::time::Instant::now() {
                    tracing::debug!(%peer, "UDP flow idle: closed");
                    break;
                }
            }
            () = &mut gone => {
                tracing::debug!(%peer, backend = %lease.backend, "target removed from the resource: UDP flow closed");
                break;
            }
            _ = stopping(&mut stopped) => break,
        }
    }
    answers.abort();
    let _ = to_agent.shutdown().await;
}

/// The next QUIC datagram of the flow's stream; never, for a stream without datagrams. Safe to
/// cancel: a datagram is taken only when this returns it.
async fn next_datagram(
    datagrams: Option<&kakuremichi_tunnel::StreamDatagrams>,
) -> std::io::Result<bytes::Bytes> {
    match datagrams {
        Some(d) => d.recv().await,
        None => std::future::pending().await,
    }
}
