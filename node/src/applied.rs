//! Which config snapshot a node runs: the applied version reported to control, the disk cache a
//! restarted node serves from, and the lock that makes applies run one at a time.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use kakuremichi_proto::{ConfigSnapshot, NodeKind};
use tokio::sync::{Mutex, MutexGuard};

use crate::state::ConfigCache;

/// Applying a snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The snapshot is for another kind of node.
    #[error("the snapshot is for a {kind} node, not this {expected}")]
    WrongKind {
        /// The snapshot's kind.
        kind: NodeKind,
        /// This node's kind.
        expected: NodeKind,
    },
    /// The tunnel could not be bound.
    #[error(transparent)]
    Tunnel(#[from] kakuremichi_tunnel::TunnelError),
}

/// The running snapshot of a node of one kind, and its cache in `<data-dir>/config.json`.
#[derive(Debug)]
pub struct AppliedConfig {
    kind: NodeKind,
    cache: ConfigCache,
    version: AtomicU64,
    running: Mutex<Option<ConfigSnapshot>>,
}

impl AppliedConfig {
    /// Nothing applied yet; the cache lives in `data_dir`.
    pub fn new(data_dir: &Path, kind: NodeKind) -> Self {
        Self {
            kind,
            cache: ConfigCache::new(data_dir),
            version: AtomicU64::new(0),
            running: Mutex::new(None),
        }
    }

    /// The applied config version (0 before any).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The cached snapshot from a previous run, if any and if it is for this kind of node.
    pub fn cached(&self) -> Option<ConfigSnapshot> {
        match self.cache.load() {
            Ok(Some(s)) if s.kind == self.kind => Some(s),
            Ok(_) => None,
            Err(error) => {
                tracing::warn!(%error, "ignoring the unreadable config cache");
                None
            }
        }
    }

    /// Starts applying `snapshot`: checks it is for this kind of node and waits for any apply in
    /// progress. Dropping the returned guard without [`Applying::commit`] keeps the old snapshot.
    pub async fn begin(&self, snapshot: &ConfigSnapshot) -> Result<Applying<'_>, ApplyError> {
        if snapshot.kind != self.kind {
            return Err(ApplyError::WrongKind {
                kind: snapshot.kind,
                expected: self.kind,
            });
        }
        Ok(Applying {
            config: self,
            running: self.running.lock().await,
        })
    }
}

/// An apply in progress (see [`AppliedConfig::begin`]).
#[derive(Debug)]
pub struct Applying<'a> {
    config: &'a AppliedConfig,
    running: MutexGuard<'a, Option<ConfigSnapshot>>,
}

impl Applying<'_> {
    /// The snapshot running before this apply, if any.
    pub fn running(&self) -> Option<&ConfigSnapshot> {
        self.running.as_ref()
    }

    /// Records `snapshot` as applied: writes the cache when `persist` (a failure is logged, the
    /// node serves from memory), publishes its version and makes it the running snapshot.
    pub fn commit(mut self, snapshot: ConfigSnapshot, persist: bool) {
        if persist {
            if let Err(error) = self.config.cache.store(&snapshot) {
                tracing::warn!(%error, "could not write the config cache; serving from memory");
            }
        }
        self.config
            .version
            .store(snapshot.version, Ordering::Release);
        *self.running = Some(snapshot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kakuremichi_proto::OverlayConfig;
    use std::net::Ipv4Addr;
    use uuid::Uuid;

    fn snap(version: u64, kind: NodeKind) -> ConfigSnapshot {
        ConfigSnapshot {
            sessions: Vec::new(),
            sessions_endpoint: None,
            version,
            node_id: Uuid::from_u128(1),
            kind,
            overlay: OverlayConfig {
                address: Ipv4Addr::new(100, 64, 0, 1),
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
    async fn commit_persists_and_publishes_the_version() {
        let dir = tempfile::tempdir().unwrap();
        let applied = AppliedConfig::new(dir.path(), NodeKind::Agent);
        assert_eq!(applied.version(), 0);
        assert_eq!(applied.cached(), None);

        let applying = applied.begin(&snap(3, NodeKind::Agent)).await.unwrap();
        assert_eq!(applying.running(), None);
        applying.commit(snap(3, NodeKind::Agent), false);
        assert_eq!(applied.version(), 3);
        assert_eq!(applied.cached(), None, "not persisted");

        let applying = applied.begin(&snap(4, NodeKind::Agent)).await.unwrap();
        assert_eq!(applying.running().map(|s| s.version), Some(3));
        applying.commit(snap(4, NodeKind::Agent), true);
        assert_eq!(applied.cached(), Some(snap(4, NodeKind::Agent)));
        // A cache written for another kind is ignored.
        let gateway = AppliedConfig::new(dir.path(), NodeKind::Gateway);
        assert_eq!(gateway.cached(), None);
    }

    #[tokio::test]
    async fn wrong_kind_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let applied = AppliedConfig::new(dir.path(), NodeKind::Gateway);
        let err = applied.begin(&snap(1, NodeKind::Agent)).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "the snapshot is for a agent node, not this gateway"
        );
    }
}
