//! Raw TCP resources: a listener on every gateway per resource (`public_port`), each accepted
//! connection one tunnel stream (kind TCP) to the resource's agent, copied both ways.
//!
//! [`TcpRoutes::apply`] makes the listeners match a snapshot without a restart: new ports are
//! bound, removed ones closed (with their connections), and a port whose target moved is rebound.
//! A port that cannot be bound (in use) is logged and retried on the next snapshot. Connections
//! are admitted against the same per-client and global caps as HTTP.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use kakuremichi_proto::{Route, RouteProtocol, StreamKind};
use tokio::net::TcpListener;
use tokio::sync::{watch, Mutex};
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
use crate::proxy::stopping;
use crate::routing::RouteTarget;

struct Running {
    target: Arc<RouteTarget>,
    stop: watch::Sender<bool>,
    local: SocketAddr,
}

/// The TCP listeners of one gateway.
pub struct TcpRoutes {
    listen_ip: IpAddr,
    upstream: Arc<Dialer>,
    admission: Arc<Admission>,
    metrics: Arc<Metrics>,
    running: Mutex<HashMap<u16, Running>>,
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
            running: Mutex::new(HashMap::new()),
        }
    }

    /// The ports listened on now, with their local addresses.
    pub async fn listening(&self) -> Vec<(u16, SocketAddr)> {
        let mut v: Vec<_> = self
            .running
            .lock()
            .await
            .iter()
            .map(|(p, r)| (*p, r.local))
            .collect();
        v.sort();
        v
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
        let mut running = self.running.lock().await;
        running.retain(|port, r| {
            let keep = wanted.get(port) == Some(&r.target);
            if !keep {
                tracing::info!(port, resource_id = %r.target.resource_id, "closing a TCP listener");
                r.stop.send_replace(true);
            }
            keep
        });
        for (port, target) in wanted {
            if running.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::new(self.listen_ip, port);
            let listener = match crate::listener::bind_listener(addr) {
                Ok(l) => l,
                Err(error) => {
                    tracing::error!(%addr, %error, resource_id = %target.resource_id, "cannot listen for a TCP resource");
                    continue;
                }
            };
            let local = listener.local_addr().unwrap_or(addr);
            let (stop, stopped) = watch::channel(false);
            tracing::info!(%local, resource_id = %target.resource_id, "listening for a TCP resource");
            tokio::spawn(
                accept(
                    listener,
                    Arc::clone(&target),
                    Arc::clone(&self.upstream),
                    Arc::clone(&self.admission),
                    Arc::clone(&self.metrics),
                    stopped,
                )
                .instrument(tracing::info_span!("tcp", port, resource_id = %target.resource_id)),
            );
            running.insert(
                port,
                Running {
                    target,
                    stop,
                    local,
                },
            );
        }
    }

    /// Closes every listener and connection.
    pub async fn stop(&self) {
        for (_, r) in self.running.lock().await.drain() {
            r.stop.send_replace(true);
        }
    }
}

async fn accept(
    listener: TcpListener,
    target: Arc<RouteTarget>,
    upstream: Arc<Dialer>,
    admission: Arc<Admission>,
    metrics: Arc<Metrics>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let (mut client, peer) = tokio::select! {
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
        let counters = metrics.resource(target.resource_id);
        let upstream = Arc::clone(&upstream);
        let target = Arc::clone(&target);
        let mut stopped = stopped.clone();
        tokio::spawn(
            async move {
                let _admitted = admitted;
                counters.open_flows.fetch_add(1, Ordering::Relaxed);
                let _open = scopeguard(Arc::clone(&counters));
                let (mut stream, _lease) = match upstream.open(&target).await {
                    Ok(s) => s,
                    Err(error) => {
                        tracing::debug!(%peer, %error, "cannot open a tunnel stream: closing");
                        return;
                    }
                };
                tokio::select! {
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
