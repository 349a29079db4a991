//! Pure functions behind applying a snapshot: what changed (`plan`), which WireGuard peers to set,
//! and the endpoint memory that lets a restarted gateway reach agents behind NAT immediately.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use kakuremichi_node::plan::{diff, PeerChanges};
use kakuremichi_proto::{ConfigSnapshot, PeerConfig, Route, WgPublicKey};
use kakuremichi_tunnel::PeerSpec;
use serde::{Deserialize, Serialize};

/// What a new snapshot changes compared to the running one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// The tunnel and its peers.
    pub peers: PeerChanges,
    /// Hostnames added.
    pub routes_added: Vec<String>,
    /// Hostnames removed.
    pub routes_removed: Vec<String>,
    /// Hostnames whose target changed.
    pub routes_changed: Vec<String>,
}

impl Changes {
    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

/// Compares the running snapshot (if any) with a new one.
pub fn plan(old: Option<&ConfigSnapshot>, new: &ConfigSnapshot) -> Changes {
    let old_routes: BTreeMap<&str, &Route> = old
        .map(|o| o.routes.iter().map(|r| (r.hostname.as_str(), r)).collect())
        .unwrap_or_default();
    let new_routes: BTreeMap<&str, &Route> = new
        .routes
        .iter()
        .map(|r| (r.hostname.as_str(), r))
        .collect();
    let (routes_added, routes_removed, routes_changed) = diff(&old_routes, &new_routes);
    Changes {
        peers: PeerChanges::plan(old, new),
        routes_added: routes_added.into_iter().map(str::to_owned).collect(),
        routes_removed: routes_removed.into_iter().map(str::to_owned).collect(),
        routes_changed: routes_changed.into_iter().map(str::to_owned).collect(),
    }
}

/// The WireGuard peers for a snapshot. An endpoint configured by control (an `ip:port`) wins;
/// otherwise the endpoint remembered from an earlier session is used as a hint.
pub fn peer_specs(peers: &[PeerConfig], hints: &EndpointHints) -> Vec<PeerSpec> {
    peers
        .iter()
        .map(|p| {
            let configured = p
                .endpoint
                .as_deref()
                .and_then(|e| e.trim().parse::<SocketAddr>().ok());
            PeerSpec {
                public_key: p.public_key.0,
                allowed_ip: p.overlay_address,
                endpoint: configured.or_else(|| hints.get(&p.public_key)),
                persistent_keepalive: p.persistent_keepalive,
            }
        })
        .collect()
}

/// Endpoints learned from agents' authenticated packets, kept in `<data-dir>/peers.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointHints {
    /// Public key (base64) -> last endpoint.
    endpoints: BTreeMap<WgPublicKey, SocketAddr>,
}

impl EndpointHints {
    /// File name in the data dir.
    pub const FILE: &'static str = "peers.json";

    /// The file's path in `data_dir`.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(Self::FILE)
    }

    /// Loads the hints; a missing or unreadable file is empty (it is only an optimization).
    pub fn load(data_dir: &Path) -> Self {
        match kakuremichi_node::state::read_json::<Self>(&Self::path(data_dir)) {
            Ok(Some(h)) => h,
            Ok(None) => Self::default(),
            Err(error) => {
                tracing::warn!(%error, "ignoring unreadable peer endpoint memory");
                Self::default()
            }
        }
    }

    /// Saves the hints atomically.
    pub fn save(&self, data_dir: &Path) -> Result<(), kakuremichi_node::StateError> {
        let bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        kakuremichi_node::write_atomic(&Self::path(data_dir), &bytes)
    }

    /// The remembered endpoint of a peer.
    pub fn get(&self, key: &WgPublicKey) -> Option<SocketAddr> {
        self.endpoints.get(key).copied()
    }

    /// Merges freshly observed endpoints and forgets peers no longer configured. Returns whether
    /// anything changed (and so should be saved).
    pub fn merge(
        &mut self,
        observed: impl IntoIterator<Item = (WgPublicKey, SocketAddr)>,
        configured: &BTreeSet<WgPublicKey>,
    ) -> bool {
        let before = self.endpoints.clone();
        for (key, endpoint) in observed {
            if configured.contains(&key) {
                self.endpoints.insert(key, endpoint);
            }
        }
        self.endpoints.retain(|k, _| configured.contains(k));
        before != self.endpoints
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kakuremichi_proto::{NodeKind, OverlayConfig};
    use std::net::Ipv4Addr;
    use uuid::Uuid;

    fn peer(k: u8, endpoint: Option<&str>) -> PeerConfig {
        PeerConfig {
            node_id: Uuid::from_u128(k as u128),
            kind: NodeKind::Agent,
            name: format!("site{k}"),
            public_key: WgPublicKey([k; 32]),
            overlay_address: Ipv4Addr::new(100, 64, 0, k),
            endpoint: endpoint.map(str::to_owned),
            persistent_keepalive: None,
        }
    }

    fn route(host: &str, port: u16) -> Route {
        Route::http(
            Uuid::from_u128(port as u128),
            host,
            Uuid::from_u128(2),
            Ipv4Addr::new(100, 64, 0, 2),
            port,
        )
    }

    fn snap(version: u64, peers: Vec<PeerConfig>, routes: Vec<Route>) -> ConfigSnapshot {
        ConfigSnapshot {
            sessions: Vec::new(),
            sessions_endpoint: None,
            version,
            node_id: Uuid::from_u128(1),
            kind: NodeKind::Gateway,
            overlay: OverlayConfig {
                address: Ipv4Addr::new(100, 64, 0, 1),
                prefix_len: 10,
                mtu: 1420,
            },
            peers,
            routes,
            targets: vec![],
            certificates: vec![],
            acme_challenges: vec![],
            identity: None,
        }
    }

    #[test]
    fn first_snapshot_binds_and_adds_everything() {
        let new = snap(1, vec![peer(2, None)], vec![route("a.example", 10000)]);
        let c = plan(None, &new);
        assert!(c.peers.rebind_tunnel);
        assert_eq!(c.peers.peers_added, vec![WgPublicKey([2; 32])]);
        assert_eq!(c.routes_added, vec!["a.example".to_owned()]);
    }

    #[test]
    fn diff_of_routes_and_peers() {
        let old = snap(
            1,
            vec![peer(2, None), peer(3, None)],
            vec![route("a", 1), route("b", 2)],
        );
        let new = snap(
            2,
            vec![peer(2, None), peer(4, None)],
            vec![route("a", 1), route("b", 3), route("c", 4)],
        );
        let c = plan(Some(&old), &new);
        assert!(!c.peers.rebind_tunnel);
        assert_eq!(c.peers.peers_added, vec![WgPublicKey([4; 32])]);
        assert_eq!(c.peers.peers_removed, vec![WgPublicKey([3; 32])]);
        assert!(c.peers.peers_changed.is_empty());
        assert_eq!(c.routes_added, vec!["c".to_owned()]);
        assert_eq!(c.routes_removed, Vec::<String>::new());
        assert_eq!(c.routes_changed, vec!["b".to_owned()]);
        assert!(plan(Some(&new), &new).is_empty());
        let mut moved = new.clone();
        moved.overlay.address = Ipv4Addr::new(100, 64, 0, 9);
        assert!(plan(Some(&new), &moved).peers.rebind_tunnel);
    }

    #[test]
    fn endpoint_hints_fill_in_for_natted_peers() {
        let mut hints = EndpointHints::default();
        let configured: BTreeSet<_> = [WgPublicKey([2; 32]), WgPublicKey([3; 32])].into();
        let learned: SocketAddr = "198.51.100.2:40000".parse().unwrap();
        assert!(hints.merge(
            [
                (WgPublicKey([2; 32]), learned),
                (WgPublicKey([9; 32]), learned)
            ],
            &configured
        ));
        assert!(
            !hints.merge([(WgPublicKey([2; 32]), learned)], &configured),
            "no change"
        );
        let specs = peer_specs(&[peer(2, None), peer(3, Some("192.0.2.1:51820"))], &hints);
        assert_eq!(specs[0].endpoint, Some(learned));
        assert_eq!(specs[0].allowed_ip, Ipv4Addr::new(100, 64, 0, 2));
        assert_eq!(specs[1].endpoint, Some("192.0.2.1:51820".parse().unwrap()));
        // A peer that left the config is forgotten.
        let only3: BTreeSet<_> = [WgPublicKey([3; 32])].into();
        assert!(hints.merge([], &only3));
        assert_eq!(hints.get(&WgPublicKey([2; 32])), None);
    }

    #[test]
    fn endpoint_hints_roundtrip_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut hints = EndpointHints::default();
        let configured: BTreeSet<_> = [WgPublicKey([2; 32])].into();
        hints.merge(
            [(WgPublicKey([2; 32]), "198.51.100.2:4".parse().unwrap())],
            &configured,
        );
        hints.save(dir.path()).unwrap();
        assert_eq!(EndpointHints::load(dir.path()), hints);
        std::fs::write(EndpointHints::path(dir.path()), "garbage").unwrap();
        assert_eq!(EndpointHints::load(dir.path()), EndpointHints::default());
    }
}
