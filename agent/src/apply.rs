//! Pure functions behind applying a snapshot on the agent.

use std::collections::BTreeMap;

use kakuremichi_node::plan::{diff, PeerChanges};
use kakuremichi_proto::{ConfigSnapshot, Target};

/// What a new snapshot changes compared to the running one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// The tunnel and its gateways.
    pub peers: PeerChanges,
    /// Overlay ports opened.
    pub ports_added: Vec<u16>,
    /// Overlay ports closed.
    pub ports_removed: Vec<u16>,
    /// Overlay ports whose target changed.
    pub ports_changed: Vec<u16>,
}

impl Changes {
    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

/// Compares the running snapshot (if any) with a new one.
pub fn plan(old: Option<&ConfigSnapshot>, new: &ConfigSnapshot) -> Changes {
    let targets = |s: &ConfigSnapshot| -> BTreeMap<u16, Target> {
        s.targets.iter().map(|t| (t.port, t.clone())).collect()
    };
    let (ports_added, ports_removed, ports_changed) =
        diff(&old.map(targets).unwrap_or_default(), &targets(new));
    Changes {
        peers: PeerChanges::plan(old, new),
        ports_added,
        ports_removed,
        ports_changed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kakuremichi_proto::{NodeKind, OverlayConfig, PeerConfig, WgPublicKey};
    use std::net::Ipv4Addr;
    use uuid::Uuid;

    fn target(port: u16, to: &str) -> Target {
        Target {
            resource_id: Uuid::from_u128(port as u128),
            port,
            target: to.into(),
            health_check: None,
            hostname: String::new(),
        }
    }

    fn gw(k: u8, endpoint: &str) -> PeerConfig {
        PeerConfig {
            node_id: Uuid::from_u128(k as u128),
            kind: NodeKind::Gateway,
            name: "edge".into(),
            public_key: WgPublicKey([k; 32]),
            overlay_address: Ipv4Addr::new(100, 64, 0, k),
            endpoint: Some(endpoint.into()),
            persistent_keepalive: Some(25),
        }
    }

    fn snap(peers: Vec<PeerConfig>, targets: Vec<Target>) -> ConfigSnapshot {
        ConfigSnapshot {
            sessions: Vec::new(),
            sessions_endpoint: None,
            version: 1,
            node_id: Uuid::from_u128(9),
            kind: NodeKind::Agent,
            overlay: OverlayConfig {
                address: Ipv4Addr::new(100, 64, 0, 9),
                prefix_len: 10,
                mtu: 1420,
            },
            peers,
            routes: vec![],
            targets,
            certificates: vec![],
            acme_challenges: vec![],
            identity: None,
        }
    }

    #[test]
    fn plans_target_and_peer_changes() {
        let old = snap(
            vec![gw(1, "a:1")],
            vec![target(10000, "127.0.0.1:80"), target(10001, "db:5432")],
        );
        let new = snap(
            vec![gw(1, "a:2")],
            vec![
                target(10000, "127.0.0.1:80"),
                target(10001, "db:5433"),
                target(10002, "x:1"),
            ],
        );
        let c = plan(Some(&old), &new);
        assert!(!c.peers.rebind_tunnel);
        assert_eq!(c.peers.peers_changed, vec![WgPublicKey([1; 32])]);
        assert_eq!(c.ports_added, vec![10002]);
        assert_eq!(c.ports_changed, vec![10001]);
        assert!(c.ports_removed.is_empty());
        assert!(plan(Some(&new), &new).is_empty());
        let first = plan(None, &new);
        assert!(first.peers.rebind_tunnel);
        assert_eq!(first.ports_added, vec![10000, 10001, 10002]);
    }
}
