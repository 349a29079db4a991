//! Choosing a target among a resource's backends, from what the agents' health streams say.
//!
//! [`Balancer`] is the sans-IO core: fed with health reports and lost health streams per agent,
//! it picks a backend for each request or connection (round robin or least outstanding, a
//! sticky preference first), skipping backends whose agent is offline or whose target fails its
//! health check. When nothing is usable it fails open and tries every backend: a misconfigured
//! health check must not take down a resource that still answers. [`BackendPool`] is the shared
//! shell around it: a mutex, the leases that count requests in flight, and a `watch` channel
//! that wakes requests waiting on a backend that just went down, so that they can be retried
//! elsewhere.
//!
//! [`watch_agents`] keeps one health stream open to every agent the routes name.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kakuremichi_proto::{Balance, HealthReport, HEALTH_HEARTBEAT_MS};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::proxy::{Upstream, UpstreamIo};
use crate::routing::{Dial, RouteTarget};

/// What the gateway knows of one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AgentState {
    /// The health stream is open: these ports fail their health checks.
    Up { unhealthy: BTreeSet<u16> },
    /// The health stream broke or fell silent: the agent is offline.
    Down,
}

/// The pure balancing state. See the module documentation.
#[derive(Debug, Default)]
pub struct Balancer {
    /// Agents never heard of are usable (a gateway that just started serves at once).
    agents: HashMap<Ipv4Addr, AgentState>,
    outstanding: HashMap<SocketAddrV4, u32>,
    cursor: HashMap<Uuid, usize>,
}

impl Balancer {
    /// Whether a backend takes traffic: its agent is not offline and its target is healthy.
    pub fn usable(&self, backend: SocketAddrV4) -> bool {
        match self.agents.get(backend.ip()) {
            None => true,
            Some(AgentState::Down) => false,
            Some(AgentState::Up { unhealthy }) => !unhealthy.contains(&backend.port()),
        }
    }

    /// Whether an agent is known to be offline.
    pub fn agent_down(&self, agent: Ipv4Addr) -> bool {
        self.agents.get(&agent) == Some(&AgentState::Down)
    }

    /// An agent's health report arrived. True if a backend that was usable is not any more.
    pub fn handle_report(&mut self, agent: Ipv4Addr, report: &HealthReport) -> bool {
        let unhealthy: BTreeSet<u16> = report.unhealthy_ports.iter().copied().collect();
        let worse = match self.agents.get(&agent) {
            None | Some(AgentState::Down) => !unhealthy.is_empty(),
            Some(AgentState::Up { unhealthy: old }) => !unhealthy.is_subset(old),
        };
        self.agents.insert(agent, AgentState::Up { unhealthy });
        worse
    }

    /// An agent's health stream broke or fell silent. True if it was not already offline.
    pub fn handle_agent_lost(&mut self, agent: Ipv4Addr) -> bool {
        self.agents.insert(agent, AgentState::Down) != Some(AgentState::Down)
    }

    /// Forgets agents no route names any more.
    pub fn retain_agents(&mut self, keep: &HashSet<Ipv4Addr>) {
        self.agents.retain(|a, _| keep.contains(a));
        self.cursor.clear();
    }

    /// Picks a backend not in `tried`, counting it as outstanding until [`Balancer::release`].
    pub fn pick(
        &mut self,
        resource: Uuid,
        backends: &[SocketAddrV4],
        balance: Balance,
        prefer: Option<SocketAddrV4>,
        tried: &[SocketAddrV4],
    ) -> Option<SocketAddrV4> {
        let untried: Vec<SocketAddrV4> = backends
            .iter()
            .copied()
            .filter(|b| !tried.contains(b))
            .collect();
        let usable: Vec<SocketAddrV4> = untried
            .iter()
            .copied()
            .filter(|b| self.usable(*b))
            .collect();
        let candidates = if usable.is_empty() { untried } else { usable };
        if candidates.is_empty() {
            return None;
        }
        let chosen = match prefer.filter(|p| candidates.contains(p)) {
            Some(p) => p,
            None => {
                let cursor = self.cursor.entry(resource).or_insert(0);
                let start = *cursor % candidates.len();
                *cursor = cursor.wrapping_add(1);
                match balance {
                    Balance::RoundRobin => candidates[start],
                    Balance::LeastOutstanding => (0..candidates.len())
                        .map(|i| candidates[(start + i) % candidates.len()])
                        .min_by_key(|b| self.outstanding.get(b).copied().unwrap_or(0))
                        .unwrap_or(candidates[start]),
                }
            }
        };
        *self.outstanding.entry(chosen).or_insert(0) += 1;
        Some(chosen)
    }

    /// A request or connection to `backend` ended.
    pub fn release(&mut self, backend: SocketAddrV4) {
        if let Some(n) = self.outstanding.get_mut(&backend) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.outstanding.remove(&backend);
            }
        }
    }

    /// Requests or connections in flight to `backend`.
    pub fn outstanding(&self, backend: SocketAddrV4) -> u32 {
        self.outstanding.get(&backend).copied().unwrap_or(0)
    }
}

/// The balancer shared by the proxy, the TCP and UDP listeners and the health watchers.
#[derive(Debug, Default)]
pub struct BackendPool {
    core: Mutex<Balancer>,
    downs: watch::Sender<u64>,
}

/// One request or connection counted against a backend until dropped.
#[derive(Debug)]
pub struct Lease {
    pool: Arc<BackendPool>,
    /// The backend chosen.
    pub backend: SocketAddrV4,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.lock().release(self.backend);
    }
}

impl BackendPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Balancer> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Picks a backend for `target`'s resource; `None` when every backend was tried.
    pub fn pick(
        self: &Arc<Self>,
        target: &RouteTarget,
        prefer: Option<SocketAddrV4>,
        tried: &[SocketAddrV4],
    ) -> Option<Lease> {
        let backend = self.lock().pick(
            target.resource_id,
            &target.backends,
            target.balance,
            prefer,
            tried,
        )?;
        Some(Lease {
            pool: Arc::clone(self),
            backend,
        })
    }

    /// Whether a backend takes traffic.
    pub fn usable(&self, backend: SocketAddrV4) -> bool {
        self.lock().usable(backend)
    }

    /// Requests or connections in flight to a backend.
    pub fn outstanding(&self, backend: SocketAddrV4) -> u32 {
        self.lock().outstanding(backend)
    }

    /// Records an agent's health report.
    pub fn report(&self, agent: Ipv4Addr, report: &HealthReport) {
        if self.lock().handle_report(agent, report) {
            self.downs.send_modify(|n| *n += 1);
        }
    }

    /// Records that an agent is offline.
    pub fn lost(&self, agent: Ipv4Addr) {
        if self.lock().handle_agent_lost(agent) {
            tracing::warn!(agent = %agent, "agent offline: its targets are skipped");
            self.downs.send_modify(|n| *n += 1);
        }
    }

    /// Resolves once `backend` stops taking traffic.
    pub async fn until_unusable(&self, backend: SocketAddrV4) {
        let mut rx = self.downs.subscribe();
        loop {
            if !self.usable(backend) {
                return;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    fn retain_agents(&self, keep: &HashSet<Ipv4Addr>) {
        self.lock().retain_agents(keep);
    }
}

/// Opens balanced streams for TCP connections and UDP flows: a healthy backend, and the next
/// one when a stream cannot be opened.
pub struct Dialer {
    upstream: Arc<dyn Upstream>,
    pool: Arc<BackendPool>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer").finish_non_exhaustive()
    }
}

impl Dialer {
    /// A dialer over `upstream`, balanced by `pool`.
    pub fn new(upstream: Arc<dyn Upstream>, pool: Arc<BackendPool>) -> Self {
        Dialer { upstream, pool }
    }

    /// A stream to one of `target`'s backends, with the lease that counts it.
    pub async fn open(&self, target: &RouteTarget) -> io::Result<(UpstreamIo, Lease)> {
        let mut tried = Vec::new();
        let mut last = io::Error::new(io::ErrorKind::NotConnected, "the resource has no target");
        while let Some(lease) = self.pool.pick(target, None, &tried) {
            tried.push(lease.backend);
            match self.upstream.connect(&target.dial(lease.backend)).await {
                Ok(io) => return Ok((io, lease)),
                Err(e) => {
                    tracing::debug!(backend = %lease.backend, error = %e, "cannot open a stream: next target");
                    last = e;
                }
            }
        }
        Err(last)
    }
}

/// Keeps one health stream open to every agent that routes name.
pub struct HealthWatchers {
    pool: Arc<BackendPool>,
    upstream: Arc<dyn Upstream>,
    tasks: Mutex<HashMap<Ipv4Addr, JoinHandle<()>>>,
}

impl std::fmt::Debug for HealthWatchers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthWatchers").finish_non_exhaustive()
    }
}

/// How long a health stream may stay silent before its agent counts as offline.
pub const HEALTH_SILENCE: Duration = Duration::from_millis(3 * HEALTH_HEARTBEAT_MS);

impl HealthWatchers {
    /// Watchers feeding `pool`, opening streams through `upstream`.
    pub fn new(pool: Arc<BackendPool>, upstream: Arc<dyn Upstream>) -> Self {
        HealthWatchers {
            pool,
            upstream,
            tasks: Mutex::new(HashMap::new()),
        }
    }

    /// Watches exactly these agents.
    pub fn apply(&self, agents: &HashSet<Ipv4Addr>) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.retain(|a, t| {
            let keep = agents.contains(a);
            if !keep {
                t.abort();
            }
            keep
        });
        for &agent in agents {
            tasks.entry(agent).or_insert_with(|| {
                let span = tracing::debug_span!("health_stream", agent = %agent);
                tokio::spawn(
                    watch_agent(Arc::clone(&self.pool), Arc::clone(&self.upstream), agent)
                        .instrument(span),
                )
            });
        }
        self.pool.retain_agents(agents);
    }

    /// Stops every watcher.
    pub fn stop(&self) {
        for (_, t) in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            t.abort();
        }
    }
}

impl Drop for HealthWatchers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One agent's health stream, reopened after a pause whenever it breaks.
async fn watch_agent(pool: Arc<BackendPool>, upstream: Arc<dyn Upstream>, agent: Ipv4Addr) {
    let target = Dial::health(agent);
    let mut pause = Duration::from_millis(200);
    loop {
        let opened = tokio::time::timeout(HEALTH_SILENCE, upstream.connect(&target)).await;
        match opened {
            Ok(Ok(io)) => {
                let mut lines = BufReader::new(io).lines();
                loop {
                    match tokio::time::timeout(HEALTH_SILENCE, lines.next_line()).await {
                        Ok(Ok(Some(line))) => match serde_json::from_str::<HealthReport>(&line) {
                            Ok(report) => {
                                pool.report(agent, &report);
                                pause = Duration::from_millis(200);
                            }
                            Err(error) => {
                                tracing::debug!(%error, "bad health report");
                                break;
                            }
                        },
                        Ok(Ok(None)) => {
                            tracing::debug!("health stream ended");
                            break;
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(%error, "health stream failed");
                            break;
                        }
                        Err(_) => {
                            tracing::debug!("health stream silent");
                            break;
                        }
                    }
                }
            }
            Ok(Err(error)) => tracing::debug!(%error, "cannot open a health stream"),
            Err(_) => tracing::debug!("opening a health stream timed out"),
        }
        pool.lost(agent);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kakuremichi_proto::StreamKind;

    fn b(agent: u8, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(100, 64, 0, agent), port)
    }

    const R: Uuid = Uuid::from_u128(1);

    fn report(ports: &[u16]) -> HealthReport {
        HealthReport {
            unhealthy_ports: ports.to_vec(),
        }
    }

    #[test]
    fn round_robin_skips_unhealthy_and_offline_backends() {
        let backends = [b(2, 10), b(2, 11), b(3, 10)];
        let mut bal = Balancer::default();
        let picks: Vec<_> = (0..6)
            .map(|_| {
                bal.pick(R, &backends, Balance::RoundRobin, None, &[])
                    .unwrap()
            })
            .collect();
        assert_eq!(picks[..3], backends);
        assert_eq!(picks[3..], backends);
        assert!(bal.handle_report(Ipv4Addr::new(100, 64, 0, 2), &report(&[11])));
        assert!(!bal.usable(b(2, 11)));
        for _ in 0..4 {
            let p = bal
                .pick(R, &backends, Balance::RoundRobin, None, &[])
                .unwrap();
            assert_ne!(p, b(2, 11));
        }
        assert!(bal.handle_agent_lost(Ipv4Addr::new(100, 64, 0, 3)));
        assert!(!bal.handle_agent_lost(Ipv4Addr::new(100, 64, 0, 3)));
        for _ in 0..4 {
            assert_eq!(
                bal.pick(R, &backends, Balance::RoundRobin, None, &[]),
                Some(b(2, 10))
            );
        }
        // Healthy again: no "worse" event, and it is picked again.
        assert!(!bal.handle_report(Ipv4Addr::new(100, 64, 0, 2), &report(&[])));
        assert!(bal.usable(b(2, 11)));
    }

    #[test]
    fn nothing_usable_fails_open_and_tried_backends_are_not_repeated() {
        let backends = [b(2, 10), b(3, 10)];
        let mut bal = Balancer::default();
        bal.handle_agent_lost(Ipv4Addr::new(100, 64, 0, 2));
        bal.handle_agent_lost(Ipv4Addr::new(100, 64, 0, 3));
        assert!(bal
            .pick(R, &backends, Balance::RoundRobin, None, &[])
            .is_some());
        let first = bal
            .pick(R, &backends, Balance::RoundRobin, None, &[])
            .unwrap();
        let second = bal
            .pick(R, &backends, Balance::RoundRobin, None, &[first])
            .unwrap();
        assert_ne!(first, second);
        assert_eq!(
            bal.pick(R, &backends, Balance::RoundRobin, None, &[first, second]),
            None
        );
        // One usable: the other is skipped while untried ones remain usable.
        bal.handle_report(Ipv4Addr::new(100, 64, 0, 3), &report(&[]));
        assert_eq!(
            bal.pick(R, &backends, Balance::RoundRobin, None, &[]),
            Some(b(3, 10))
        );
        // Retrying after it failed goes to the offline one rather than giving up.
        assert_eq!(
            bal.pick(R, &backends, Balance::RoundRobin, None, &[b(3, 10)]),
            Some(b(2, 10))
        );
    }

    #[test]
    fn least_outstanding_and_sticky_preference() {
        let backends = [b(2, 10), b(3, 10)];
        let mut bal = Balancer::default();
        let a = bal
            .pick(R, &backends, Balance::LeastOutstanding, None, &[])
            .unwrap();
        // `a` has one in flight: the next three go to the other until it is level.
        let other = backends.iter().copied().find(|x| *x != a).unwrap();
        assert_eq!(
            bal.pick(R, &backends, Balance::LeastOutstanding, None, &[]),
            Some(other)
        );
        assert_eq!(bal.outstanding(a), 1);
        assert_eq!(bal.outstanding(other), 1);
        bal.release(a);
        assert_eq!(
            bal.pick(R, &backends, Balance::LeastOutstanding, None, &[]),
            Some(a)
        );
        bal.release(a);
        bal.release(a);
        assert_eq!(bal.outstanding(a), 0, "release never goes below zero");
        // A sticky preference wins while usable, and is dropped when not.
        for _ in 0..3 {
            assert_eq!(
                bal.pick(R, &backends, Balance::RoundRobin, Some(b(3, 10)), &[]),
                Some(b(3, 10))
            );
        }
        bal.handle_agent_lost(Ipv4Addr::new(100, 64, 0, 3));
        assert_eq!(
            bal.pick(R, &backends, Balance::RoundRobin, Some(b(3, 10)), &[]),
            Some(b(2, 10))
        );
        // A preference that is not a backend of the route is ignored.
        assert_eq!(
            bal.pick(R, &backends, Balance::RoundRobin, Some(b(9, 9)), &[]),
            Some(b(2, 10))
        );
    }

    #[tokio::test]
    async fn a_backend_going_down_wakes_its_waiters() {
        let pool = Arc::new(BackendPool::default());
        let agent = Ipv4Addr::new(100, 64, 0, 2);
        let waiting = tokio::spawn({
            let pool = Arc::clone(&pool);
            async move { pool.until_unusable(SocketAddrV4::new(agent, 10)).await }
        });
        tokio::task::yield_now().await;
        pool.report(agent, &report(&[11]));
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "another port going down is not ours"
        );
        pool.report(agent, &report(&[10]));
        tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(Dial::health(agent).kind, StreamKind::Health);
    }
}
