//! The apply skeleton every node kind runs, whatever it serves: take the apply lock, plan what
//! the snapshot changes in the tunnel and its WireGuard peers, and (re)bind the tunnel when the
//! overlay settings changed. Each kind then applies its own part (routes on gateways, targets on
//! agents) with the [`PeerChanges`] and the new tunnel's [`Incoming`], and commits.

use kakuremichi_proto::ConfigSnapshot;
use kakuremichi_tunnel::Incoming;

use crate::applied::{AppliedConfig, ApplyError, Applying};
use crate::plan::PeerChanges;
use crate::tunnel::NodeTunnel;

/// An apply in progress with the shared part done (see [`begin_apply`]).
#[derive(Debug)]
pub struct Apply<'a> {
    /// The apply lock and the snapshot running before; [`Applying::commit`] ends the apply.
    pub applying: Applying<'a>,
    /// What the snapshot changes in the tunnel and its peers.
    pub peers: PeerChanges,
    /// The inbound streams of a tunnel bound by this apply (first snapshot, or overlay settings
    /// changed): the kind serves or refuses them.
    pub incoming: Option<Incoming>,
}

/// Starts applying `snapshot` on a node: checks its kind and waits for any apply in progress,
/// plans the peer changes against the running snapshot, and binds the tunnel if it must be.
pub async fn begin_apply<'a>(
    config: &'a AppliedConfig,
    tunnel: &NodeTunnel,
    snapshot: &ConfigSnapshot,
) -> Result<Apply<'a>, ApplyError> {
    let applying = config.begin(snapshot).await?;
    let peers = PeerChanges::plan(applying.running(), snapshot);
    let incoming = if peers.rebind_tunnel || tunnel.current().is_none() {
        Some(tunnel.bind(&snapshot.overlay).await?)
    } else {
        None
    };
    Ok(Apply {
        applying,
        peers,
        incoming,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kakuremichi_proto::{NodeKind, OverlayConfig};
    use kakuremichi_tunnel::QuicSettings;
    use std::net::Ipv4Addr;
    use uuid::Uuid;

    fn snap(version: u64, address: Ipv4Addr) -> ConfigSnapshot {
        ConfigSnapshot {
            sessions: Vec::new(),
            sessions_endpoint: None,
            version,
            node_id: Uuid::from_u128(1),
            kind: NodeKind::Agent,
            overlay: OverlayConfig {
                address,
                prefix_len: 10,
                mtu: 1420,
            },
            peers: vec![],
            routes: vec![],
            targets: vec![],
            certificates: vec![],
            acme_challenges: vec![],
            identity: None,
        }
    }

    #[tokio::test]
    async fn the_tunnel_is_bound_first_and_again_only_when_the_overlay_changes() {
        let dir = tempfile::tempdir().unwrap();
        let config = AppliedConfig::new(dir.path(), NodeKind::Agent);
        let tunnel = NodeTunnel::new(
            [7; 32],
            "127.0.0.1:0".parse().unwrap(),
            true,
            QuicSettings::default(),
        );
        let first = snap(1, Ipv4Addr::new(100, 64, 0, 2));
        let apply = begin_apply(&config, &tunnel, &first).await.unwrap();
        assert!(apply.peers.rebind_tunnel && apply.incoming.is_some());
        apply.applying.commit(first, false);
        let bound = tunnel.current().unwrap().local_addr();

        let same = snap(2, Ipv4Addr::new(100, 64, 0, 2));
        let apply = begin_apply(&config, &tunnel, &same).await.unwrap();
        assert!(!apply.peers.rebind_tunnel && apply.incoming.is_none());
        assert!(apply.peers.is_empty());
        apply.applying.commit(same, false);
        assert_eq!(tunnel.current().unwrap().local_addr(), bound);

        let moved = snap(3, Ipv4Addr::new(100, 64, 0, 9));
        let apply = begin_apply(&config, &tunnel, &moved).await.unwrap();
        assert!(apply.peers.rebind_tunnel && apply.incoming.is_some());
        drop(apply);
        assert_eq!(
            config.version(),
            2,
            "an apply dropped before commit keeps the old one"
        );

        let gateway = ConfigSnapshot {
            kind: NodeKind::Gateway,
            ..snap(4, Ipv4Addr::new(100, 64, 0, 2))
        };
        assert!(matches!(
            begin_apply(&config, &tunnel, &gateway).await,
            Err(ApplyError::WrongKind { .. })
        ));
        tunnel.shutdown();
    }
}
