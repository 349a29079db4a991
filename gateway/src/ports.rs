//! The public ports of TCP and UDP resources: which port serves which resource, kept in step
//! with every snapshot without dropping what still works.
//!
//! [`PortTable::apply`] reconciles the running ports with a snapshot's:
//! - a new port is started (bound, its accept or receive loop spawned);
//! - a port no snapshot names any more, or that now belongs to another resource, is stopped with
//!   its connections or flows;
//! - a port whose resource changed in any other way (targets added or removed, balancing, limits,
//!   PROXY protocol) keeps its socket and its open connections: the new [`RouteTarget`] is handed
//!   to the running loop through a `watch`, new connections use it, and only the connections whose
//!   target was removed are closed ([`until_backend_gone`]).
//!
//! A port that cannot be bound (in use) is logged and tried again on the next snapshot.

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;

use tokio::sync::{watch, Mutex};

use crate::routing::RouteTarget;

/// A running port.
struct Port {
    target: watch::Sender<Arc<RouteTarget>>,
    stop: watch::Sender<bool>,
    local: SocketAddr,
}

/// What a started port's loop receives: its current target and its stop switch.
#[derive(Debug)]
pub struct PortHandles {
    /// The port's current target, replaced in place when the resource changes.
    pub target: watch::Receiver<Arc<RouteTarget>>,
    /// Turns true when the port is closed.
    pub stopped: watch::Receiver<bool>,
}

/// The running public ports of one kind (TCP or UDP).
#[derive(Default)]
pub struct PortTable {
    running: Mutex<HashMap<u16, Port>>,
}

impl std::fmt::Debug for PortTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortTable").finish_non_exhaustive()
    }
}

/// How one running port compares with the snapshot's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortChange {
    /// Same resource, same everything.
    Same,
    /// Same resource, changed: updated in place.
    Updated,
    /// Gone, or another resource's now: stopped.
    Stopped,
}

/// Compares a running port's target with the wanted one.
pub fn compare(running: &RouteTarget, wanted: Option<&RouteTarget>) -> PortChange {
    match wanted {
        Some(w) if w == running => PortChange::Same,
        Some(w) if w.resource_id == running.resource_id => PortChange::Updated,
        _ => PortChange::Stopped,
    }
}

impl PortTable {
    /// The ports running now, with their local addresses.
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

    /// Makes the running ports match `wanted` (see the module documentation). `start` binds a new
    /// port and spawns its loop, returning the bound address (or `None`, logged, if it could not).
    pub async fn apply(
        &self,
        kind: &'static str,
        wanted: HashMap<u16, Arc<RouteTarget>>,
        mut start: impl FnMut(u16, &Arc<RouteTarget>, PortHandles) -> Option<SocketAddr>,
    ) {
        let mut running = self.running.lock().await;
        running.retain(|port, r| {
            let current = Arc::clone(&r.target.borrow());
            match compare(&current, wanted.get(port).map(|t| &**t)) {
                PortChange::Same => true,
                PortChange::Updated => {
                    if let Some(t) = wanted.get(port) {
                        tracing::info!(port, kind, resource_id = %t.resource_id, "resource changed: updated in place");
                        r.target.send_replace(Arc::clone(t));
                    }
                    true
                }
                PortChange::Stopped => {
                    tracing::info!(port, kind, resource_id = %current.resource_id, "closing a public port");
                    r.stop.send_replace(true);
                    false
                }
            }
        });
        for (port, target) in wanted {
            if running.contains_key(&port) {
                continue;
            }
            let (target_tx, target_rx) = watch::channel(Arc::clone(&target));
            let (stop, stopped) = watch::channel(false);
            let handles = PortHandles {
                target: target_rx,
                stopped,
            };
            if let Some(local) = start(port, &target, handles) {
                running.insert(
                    port,
                    Port {
                        target: target_tx,
                        stop,
                        local,
                    },
                );
            }
        }
    }

    /// Stops every port and its connections.
    pub async fn stop(&self) {
        for (_, r) in self.running.lock().await.drain() {
            r.stop.send_replace(true);
        }
    }
}

/// Resolves once the port's target no longer has `backend` (the connection's target was
/// removed from the resource); never while it has.
pub async fn until_backend_gone(
    mut target: watch::Receiver<Arc<RouteTarget>>,
    backend: SocketAddrV4,
) {
    loop {
        if target.changed().await.is_err() {
            // The port is gone: its stop switch ends the connection.
            return std::future::pending().await;
        }
        if !target.borrow().backends.contains(&backend) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kakuremichi_proto::{Route, RouteProtocol, StreamKind};

    fn target(resource: u128, ports: &[u16]) -> Arc<RouteTarget> {
        let route = Route {
            resource_id: uuid::Uuid::from_u128(resource),
            hostname: String::new(),
            protocol: RouteProtocol::Tcp,
            site_id: uuid::Uuid::from_u128(9),
            overlay_address: std::net::Ipv4Addr::new(100, 64, 0, 2),
            port: ports[0],
            public_port: Some(20000),
            redirect_https: false,
            hsts_max_age: None,
            more_backends: ports[1..]
                .iter()
                .map(|p| kakuremichi_proto::Backend {
                    site_id: uuid::Uuid::from_u128(9),
                    overlay_address: std::net::Ipv4Addr::new(100, 64, 0, 2),
                    port: *p,
                    proxy_protocol: false,
                })
                .collect(),
            balance: Default::default(),
            sticky: false,
            limits: Default::default(),
            proxy_protocol: false,
            access: None,
        };
        Arc::new(RouteTarget::from_route(&route, StreamKind::Tcp))
    }

    #[test]
    fn a_changed_resource_is_updated_in_place_and_a_new_owner_restarts_the_port() {
        let a = target(1, &[10000]);
        assert_eq!(compare(&a, Some(&target(1, &[10000]))), PortChange::Same);
        assert_eq!(
            compare(&a, Some(&target(1, &[10000, 10001]))),
            PortChange::Updated
        );
        assert_eq!(compare(&a, Some(&target(2, &[10000]))), PortChange::Stopped);
        assert_eq!(compare(&a, None), PortChange::Stopped);
    }

    #[tokio::test]
    async fn apply_keeps_updates_and_stops_ports_and_connections_learn_of_removed_targets() {
        let table = PortTable::default();
        let started = std::sync::Mutex::new(Vec::new());
        let handles = std::sync::Mutex::new(Vec::new());
        let start = |port: u16, _t: &Arc<RouteTarget>, h: PortHandles| {
            started.lock().unwrap().push(port);
            handles.lock().unwrap().push(h);
            Some(SocketAddr::from(([127, 0, 0, 1], port)))
        };
        table
            .apply(
                "tcp",
                HashMap::from([(20000, target(1, &[10000, 10001]))]),
                &start,
            )
            .await;
        let h = handles.lock().unwrap().pop().unwrap();
        let on_first = tokio::spawn(until_backend_gone(
            h.target.clone(),
            "100.64.0.2:10000".parse().unwrap(),
        ));
        let on_second = tokio::spawn(until_backend_gone(
            h.target.clone(),
            "100.64.0.2:10001".parse().unwrap(),
        ));
        // A target is removed: the port stays, the connection on it learns, the other does not.
        table
            .apply("tcp", HashMap::from([(20000, target(1, &[10001]))]), &start)
            .await;
        assert_eq!(*started.lock().unwrap(), [20000], "not restarted");
        assert!(!*h.stopped.borrow());
        tokio::time::timeout(std::time::Duration::from_secs(5), on_first)
            .await
            .expect("the removed target's connection is told")
            .unwrap();
        tokio::task::yield_now().await;
        assert!(!on_second.is_finished());
        assert_eq!(h.target.borrow().backends.len(), 1);
        // The port goes to another resource: stopped, and started afresh.
        table
            .apply("tcp", HashMap::from([(20000, target(2, &[10005]))]), &start)
            .await;
        assert!(*h.stopped.borrow());
        assert_eq!(*started.lock().unwrap(), [20000, 20000]);
        assert_eq!(table.listening().await.len(), 1);
        table.stop().await;
        assert!(table.listening().await.is_empty());
        on_second.abort();
    }
}
