//! Pure helpers for comparing the running config snapshot with a new one. Each node kind builds
//! its own `plan` (routes for gateways, target ports for agents) from these.

use std::collections::BTreeMap;

use kakuremichi_proto::{ConfigSnapshot, PeerConfig, WgPublicKey};

/// Keys added, removed and changed, each in key order.
pub type Diff<K> = (Vec<K>, Vec<K>, Vec<K>);

/// Which keys `new` adds to `old`, which it removes, and whose value it changes.
pub fn diff<K: Ord + Copy, V: PartialEq>(old: &BTreeMap<K, V>, new: &BTreeMap<K, V>) -> Diff<K> {
    let added = new
        .keys()
        .filter(|k| !old.contains_key(k))
        .copied()
        .collect();
    let removed = old
        .keys()
        .filter(|k| !new.contains_key(k))
        .copied()
        .collect();
    let changed = new
        .iter()
        .filter(|(k, v)| old.get(k).is_some_and(|o| o != *v))
        .map(|(k, _)| *k)
        .collect();
    (added, removed, changed)
}

/// The WireGuard peers (by public key) a new snapshot adds, removes and changes.
pub fn diff_peers(old: Option<&ConfigSnapshot>, new: &ConfigSnapshot) -> Diff<WgPublicKey> {
    fn peers(s: &ConfigSnapshot) -> BTreeMap<WgPublicKey, &PeerConfig> {
        s.peers.iter().map(|p| (p.public_key, p)).collect()
    }
    diff(&old.map(peers).unwrap_or_default(), &peers(new))
}

/// What a snapshot changes in the part every node kind has: the tunnel and its WireGuard peers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerChanges {
    /// The tunnel must be (re)bound: first snapshot, or overlay address, prefix or MTU changed.
    pub rebind_tunnel: bool,
    /// Peers added (by public key).
    pub peers_added: Vec<WgPublicKey>,
    /// Peers removed.
    pub peers_removed: Vec<WgPublicKey>,
    /// Peers whose settings changed.
    pub peers_changed: Vec<WgPublicKey>,
}

impl PeerChanges {
    /// Compares the running snapshot (if any) with a new one.
    pub fn plan(old: Option<&ConfigSnapshot>, new: &ConfigSnapshot) -> PeerChanges {
        let (peers_added, peers_removed, peers_changed) = diff_peers(old, new);
        PeerChanges {
            rebind_tunnel: rebind_needed(old, new),
            peers_added,
            peers_removed,
            peers_changed,
        }
    }

    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        *self == PeerChanges::default()
    }
}

/// Whether the tunnel must be (re)bound: first snapshot, or overlay address, prefix or MTU changed.
pub fn rebind_needed(old: Option<&ConfigSnapshot>, new: &ConfigSnapshot) -> bool {
    old.is_none_or(|o| o.overlay != new.overlay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_sorts_keys_into_added_removed_changed() {
        let old: BTreeMap<u16, &str> = [(1, "a"), (2, "b"), (3, "c")].into();
        let new: BTreeMap<u16, &str> = [(1, "a"), (3, "x"), (4, "d")].into();
        assert_eq!(diff(&old, &new), (vec![4], vec![2], vec![3]));
        assert_eq!(diff(&new, &new), (vec![], vec![], vec![]));
    }
}
