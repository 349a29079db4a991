//! Several control replicas on one PostgreSQL, all active. Three tasks per replica keep them one
//! control plane:
//!
//! - [`follow_changes`]: every config change sends `NOTIFY` in its own transaction
//!   ([`crate::store::CONFIG_CHANNEL`]); each replica `LISTEN`s and publishes the version it hears
//!   on the store's signal, so the node sessions it holds push the new snapshot as if the change
//!   had been made here. A poll of the version every [`POLL`] covers notifications lost while
//!   the listening connection was being re-established.
//! - [`lead`]: the singleton work (certificate orders and renewals, the gateways' credential
//!   refresh) runs on the replica holding a session-level advisory lock on a connection of its
//!   own. When that replica dies its connection closes, PostgreSQL releases the lock, and another
//!   replica takes it on its next try (every [`LEAD_TRY`]). [`while_leader`] starts and stops a
//!   task with the leadership.
//! - [`heartbeat`]: every [`HEARTBEAT`] the replica notes itself and the nodes it holds in the
//!   store, and reads those the others hold, so that every replica answers the same about who is
//!   online. A replica silent for [`STALE`] counts as gone, with its nodes.
//!
//! With SQLite there is one replica: it leads and none of the tasks run.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kakuremichi_proto::NodeKind;
use tokio::sync::watch;
use uuid::Uuid;

use crate::store::{now_ms, Heartbeat, Store};
use crate::AppState;

/// How often the config version is read even without a notification.
pub const POLL: Duration = Duration::from_secs(2);
/// How often a replica that does not lead tries to.
pub const LEAD_TRY: Duration = Duration::from_secs(1);
/// How often a replica notes itself and its nodes.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A replica not heard from for this long is gone (its nodes offline unless they moved).
pub const STALE: Duration = Duration::from_secs(5);

/// The advisory lock of the singleton work ("kakulead" in ASCII).
const LEADER_LOCK: i64 = 0x6b61_6b75_6c65_6164;

/// This process as one of control's replicas.
#[derive(Debug)]
pub struct Replica {
    /// New at every start.
    pub id: Uuid,
    /// When it started (unix ms).
    pub started_at: i64,
    leader: watch::Sender<bool>,
}

impl Default for Replica {
    /// A replica that leads (the only one, as with SQLite).
    fn default() -> Self {
        Self::new(true)
    }
}

impl Replica {
    /// A new replica, leading or not.
    pub fn new(leader: bool) -> Self {
        Self {
            id: Uuid::new_v4(),
            started_at: now_ms(),
            leader: watch::Sender::new(leader),
        }
    }

    /// Whether this replica runs the singleton work now.
    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    /// Sees every change of leadership.
    pub fn watch_leader(&self) -> watch::Receiver<bool> {
        self.leader.subscribe()
    }

    fn set_leader(&self, leader: bool) {
        self.leader.send_if_modified(|l| {
            let changed = *l != leader;
            *l = leader;
            changed
        });
    }
}

/// The PostgreSQL notification channel of agent sessions' changes: `replica:org:session`.
pub const SESSIONS_CHANNEL: &str = "kakuremichi_sessions";

/// Publishes every config version another replica commits: `LISTEN` on the config channel, and
/// a read of the version every [`POLL`] (and after every reconnect); and every agent session
/// another replica saw change, loaded from the store, to this replica's status streams and long
/// polls. Runs until shutdown.
pub async fn follow_changes(state: AppState, url: String) {
    let store = state.store.clone();
    let mut shutdown = state.shutdown_signal();
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect(&url).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for config changes; polling");
                if poll_until(&store, &mut shutdown, POLL).await {
                    return;
                }
                continue;
            }
        };
        if let Err(e) = listener
            .listen_all([crate::store::CONFIG_CHANNEL, SESSIONS_CHANNEL])
            .await
        {
            tracing::warn!(error = %e, "cannot listen for config changes; polling");
            if poll_until(&store, &mut shutdown, POLL).await {
                return;
            }
            continue;
        }
        catch_up(&store).await;
        loop {
            tokio::select! {
                n = listener.try_recv() => match n {
                    Ok(Some(n)) if n.channel() == SESSIONS_CHANNEL => {
                        session_from_another_replica(&state, n.payload()).await;
                    }
                    Ok(Some(n)) => match n.payload().parse::<u64>() {
                        Ok(v) => {
                            tracing::trace!(version = v, "config change from another replica");
                            store.publish(v);
                        }
                        Err(_) => catch_up(&store).await,
                    },
                    // The connection was lost: notifications may have been missed.
                    Ok(None) => catch_up(&store).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "listening for config changes failed; reconnecting");
                        break;
                    }
                },
                () = tokio::time::sleep(POLL) => catch_up(&store).await,
                () = crate::until_set(&mut shutdown) => return,
            }
        }
    }
}

/// `replica:org:session`: unless this replica sent it, loads the session and tells this
/// replica's listeners.
async fn session_from_another_replica(state: &AppState, payload: &str) {
    let mut parts = payload.splitn(3, ':').map(Uuid::parse_str);
    let (Some(Ok(replica)), Some(Ok(org)), Some(Ok(id))) =
        (parts.next(), parts.next(), parts.next())
    else {
        tracing::debug!(payload, "an unreadable agent-session notification");
        return;
    };
    if replica == state.replica.id {
        return;
    }
    match state.store.agent_session(org, id).await {
        Ok(Some(s)) => state.session_events.publish(s),
        Ok(None) => {}
        Err(e) => {
            tracing::debug!(error = %e, session_id = %id, "cannot load a changed agent session")
        }
    }
}

/// Reads the version every `every` until the first success or shutdown (`true`).
async fn poll_until(store: &Store, shutdown: &mut watch::Receiver<bool>, every: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(every) => {
            catch_up(store).await;
            false
        }
        () = crate::until_set(shutdown) => true,
    }
}

async fn catch_up(store: &Store) {
    if let Err(e) = store.catch_up().await {
        tracing::debug!(error = %e, "cannot read the config version");
    }
}

/// Holds the leadership while this replica has the advisory lock, on a connection of its own to
/// `url`; checks the connection every [`LEAD_TRY`] and gives the leadership up as soon as it
/// fails. Runs until `shutdown` (then the lock is released with the connection).
pub async fn lead(replica: Arc<Replica>, url: String, mut shutdown: watch::Receiver<bool>) {
    use sqlx::Connection as _;
    let mut conn: Option<sqlx::PgConnection> = None;
    loop {
        let leading = match conn.as_mut() {
            None => match sqlx::PgConnection::connect(&url).await {
                Ok(c) => {
                    conn = Some(c);
                    false
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot connect to take the lead");
                    false
                }
            },
            Some(c) if replica.is_leader() => {
                match sqlx::query("SELECT 1").execute(&mut *c).await {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, "lost the connection that holds the lead");
                        conn = None;
                        false
                    }
                }
            }
            Some(c) => {
                match sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
                    .bind(LEADER_LOCK)
                    .fetch_one(&mut *c)
                    .await
                {
                    Ok(got) => got,
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot try the lead");
                        conn = None;
                        false
                    }
                }
            }
        };
        if leading != replica.is_leader() {
            if leading {
                tracing::info!(replica = %replica.id, "this replica now runs the singleton work");
            } else {
                tracing::warn!(replica = %replica.id, "this replica no longer runs the singleton work");
            }
            replica.set_leader(leading);
        }
        tokio::select! {
            () = tokio::time::sleep(LEAD_TRY) => {}
            () = crate::until_set(&mut shutdown) => {
                replica.set_leader(false);
                if let Some(c) = conn.take() {
                    let _ = c.close().await;
                }
                return;
            }
        }
    }
}

/// Runs the task `start` makes while `leader` says this replica leads: started when it becomes
/// the leader, aborted when it stops being one. Returns when the leadership's sender is gone.
pub async fn while_leader<F, Fut>(mut leader: watch::Receiver<bool>, work: &'static str, start: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        while !*leader.borrow_and_update() {
            if leader.changed().await.is_err() {
                return;
            }
        }
        tracing::info!(work, "starting singleton work");
        let task = tokio::spawn(start());
        while *leader.borrow_and_update() {
            if leader.changed().await.is_err() {
                task.abort();
                return;
            }
        }
        tracing::info!(work, "stopping singleton work (another replica leads)");
        task.abort();
    }
}

/// What changed in the set of nodes held here since the last heartbeat.
#[derive(Debug, Default)]
pub struct PresenceDiff {
    written: HashSet<Uuid>,
}

impl PresenceDiff {
    /// The nodes that joined and left between the set last written and `now_held`. Nothing is
    /// noted as written until [`PresenceDiff::written`] says so.
    pub fn diff(&self, now_held: &HashMap<Uuid, NodeKind>) -> (Vec<(Uuid, NodeKind)>, Vec<Uuid>) {
        let joined = now_held
            .iter()
            .filter(|(id, _)| !self.written.contains(id))
            .map(|(id, k)| (*id, *k))
            .collect();
        let left = self
            .written
            .iter()
            .filter(|id| !now_held.contains_key(id))
            .copied()
            .collect();
        (joined, left)
    }

    /// `held` is what the store now holds for this replica.
    pub fn written(&mut self, held: &HashMap<Uuid, NodeKind>) {
        self.written = held.keys().copied().collect();
    }
}

/// Every [`HEARTBEAT`]: notes this replica (with `address`) and the nodes it holds, reads those
/// the others hold into the hub. Until shutdown (then the binary calls
/// [`Store::replica_gone`]).
pub async fn heartbeat(state: AppState, address: String) {
    let mut shutdown = state.shutdown_signal();
    let mut presence = PresenceDiff::default();
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let replica = state.replica.clone();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = crate::until_set(&mut shutdown) => return,
        }
        let now = now_ms();
        let hb = Heartbeat {
            id: replica.id,
            address: &address,
            software_version: env!("CARGO_PKG_VERSION"),
            started_at: replica.started_at,
            leader: replica.is_leader(),
        };
        if let Err(e) = state.store.replica_heartbeat(&hb, now).await {
            tracing::warn!(error = %e, "cannot note this replica in the store");
            continue;
        }
        let held = state.hub.local_nodes();
        let (joined, left) = presence.diff(&held);
        match state
            .store
            .presence_update(replica.id, &joined, &left, now)
            .await
        {
            Ok(()) => presence.written(&held),
            Err(e) => tracing::warn!(error = %e, "cannot note this replica's nodes"),
        }
        let fresh = now - STALE.as_millis() as i64;
        match state.store.remote_presence(replica.id, fresh).await {
            Ok(remote) => state.hub.set_remote(remote.into_iter().collect()),
            Err(e) => tracing::warn!(error = %e, "cannot read the other replicas' nodes"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_diff_writes_joins_and_leaves_once() {
        let a = Uuid::new_v4();
        let b = Uuid::new_v4();
        let mut p = PresenceDiff::default();
        let held: HashMap<_, _> = [(a, NodeKind::Agent), (b, NodeKind::Gateway)].into();
        let (joined, left) = p.diff(&held);
        assert_eq!(joined.len(), 2);
        assert!(left.is_empty());
        // Not written (the store failed): the same again.
        assert_eq!(p.diff(&held).0.len(), 2);
        p.written(&held);
        assert_eq!(p.diff(&held), (vec![], vec![]));
        let held: HashMap<_, _> = [(b, NodeKind::Gateway)].into();
        assert_eq!(p.diff(&held), (vec![], vec![a]));
        p.written(&held);
        assert_eq!(p.diff(&held), (vec![], vec![]));
    }

    #[tokio::test]
    async fn singleton_work_runs_only_while_leading() {
        let replica = Arc::new(Replica::new(false));
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let alive = Arc::new(());
        let (r, a) = (runs.clone(), alive.clone());
        let task = tokio::spawn(while_leader(replica.watch_leader(), "test", move || {
            let r = r.clone();
            let a = a.clone();
            async move {
                r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _held = a;
                std::future::pending::<()>().await;
            }
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 0);
        replica.set_leader(true);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(Arc::strong_count(&alive), 3, "the work runs");
        replica.set_leader(false);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(Arc::strong_count(&alive), 2, "the work was stopped");
        replica.set_leader(true);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2);
        task.abort();
    }
}
