//! What nodes report (last seen, applied version, software version, status), coalesced in memory
//! and written to the store in one transaction per flush instead of one write per message.
//!
//! With a thousand nodes each sending a status every few seconds, one write per message kept
//! SQLite's single writer busy and made admin writes wait; a flush per second writes each node's
//! latest values once. A failed flush keeps its values for the next one (newer values win).

use std::collections::HashMap;
use std::sync::Mutex;

use kakuremichi_proto::NodeKind;
use uuid::Uuid;

/// The latest unrecorded activity of one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeActivity {
    /// Last message from the node (unix ms).
    pub seen_at: Option<i64>,
    /// The config version the node applied.
    pub applied_version: Option<u64>,
    /// Software version from the hello.
    pub software_version: Option<String>,
    /// The latest status report as JSON, and when it arrived (unix ms).
    pub status: Option<(String, i64)>,
}

impl NodeActivity {
    /// Fills what `self` lacks from `older`.
    fn fill_from(&mut self, older: NodeActivity) {
        self.seen_at = self.seen_at.max(older.seen_at);
        self.applied_version = self.applied_version.or(older.applied_version);
        self.software_version = self.software_version.take().or(older.software_version);
        self.status = self.status.take().or(older.status);
    }
}

/// Pending activity of every node, keyed by kind and id.
#[derive(Debug, Default)]
pub struct Activity {
    pending: Mutex<HashMap<(NodeKind, Uuid), NodeActivity>>,
}

impl Activity {
    fn update(&self, kind: NodeKind, id: Uuid, f: impl FnOnce(&mut NodeActivity)) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        f(pending.entry((kind, id)).or_default());
    }

    /// The node was heard from at `at`.
    pub fn seen(&self, kind: NodeKind, id: Uuid, at: i64) {
        self.update(kind, id, |a| a.seen_at = a.seen_at.max(Some(at)));
    }

    /// A hello: software version and the version the node already runs.
    pub fn hello(
        &self,
        kind: NodeKind,
        id: Uuid,
        software_version: &str,
        applied: Option<u64>,
        at: i64,
    ) {
        self.update(kind, id, |a| {
            a.seen_at = a.seen_at.max(Some(at));
            a.software_version = Some(software_version.to_owned());
            if applied.is_some() {
                a.applied_version = applied;
            }
        });
    }

    /// The node applied `version`.
    pub fn applied(&self, kind: NodeKind, id: Uuid, version: u64, at: i64) {
        self.update(kind, id, |a| {
            a.seen_at = a.seen_at.max(Some(at));
            a.applied_version = Some(version);
        });
    }

    /// A status report (as JSON) that names the applied version.
    pub fn status(&self, kind: NodeKind, id: Uuid, json: String, applied: u64, at: i64) {
        self.update(kind, id, |a| {
            a.seen_at = a.seen_at.max(Some(at));
            a.applied_version = Some(applied);
            a.status = Some((json, at));
        });
    }

    /// What is pending for one node, without taking it (API views show it before the flush).
    pub fn peek(&self, kind: NodeKind, id: Uuid) -> Option<NodeActivity> {
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.get(&(kind, id)).cloned()
    }

    /// Takes everything pending.
    pub fn take(&self) -> Vec<((NodeKind, Uuid), NodeActivity)> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.drain().collect()
    }

    /// Puts back what a failed flush took; what arrived since wins.
    pub fn restore(&self, batch: Vec<((NodeKind, Uuid), NodeActivity)>) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for (key, older) in batch {
            pending.entry(key).or_default().fill_from(older);
        }
    }

    /// How many nodes have something pending.
    pub fn len(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesces_per_node_and_restores_under_newer_values() {
        let a = Activity::default();
        let id = Uuid::from_u128(1);
        a.hello(NodeKind::Agent, id, "1.0", Some(3), 100);
        a.applied(NodeKind::Agent, id, 4, 200);
        a.seen(NodeKind::Agent, id, 150);
        a.status(NodeKind::Gateway, id, "{}".into(), 4, 300);
        let batch = a.take();
        assert!(a.is_empty());
        assert_eq!(batch.len(), 2, "one entry per kind and id");
        let agent = &batch
            .iter()
            .find(|(k, _)| k.0 == NodeKind::Agent)
            .expect("agent entry")
            .1;
        assert_eq!(agent.seen_at, Some(200));
        assert_eq!(agent.applied_version, Some(4));
        assert_eq!(agent.software_version.as_deref(), Some("1.0"));

        // A failed flush is restored; what came after it wins.
        a.applied(NodeKind::Agent, id, 5, 400);
        a.restore(batch);
        let again = a.take();
        let agent = &again
            .iter()
            .find(|(k, _)| k.0 == NodeKind::Agent)
            .expect("agent entry")
            .1;
        assert_eq!(agent.applied_version, Some(5));
        assert_eq!(agent.seen_at, Some(400));
        assert_eq!(agent.software_version.as_deref(), Some("1.0"));
    }
}
