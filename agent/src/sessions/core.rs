//! The lifecycle of agent sessions as a state machine, without I/O: fed with `start`, `stop` and
//! `handle_*(.., now)`, drained with [`Sessions::poll_action`] and [`Sessions::poll_timeout`].
//!
//! A session is `creating` (its process is being started on a free port), `starting` (the process
//! runs; its agentapi does not answer `/status` yet), `active` (it answers), `stopping` (asked to
//! end: SIGTERM to its process group, SIGKILL after the grace period), and finally `stopped` or
//! `failed` with a reason. A port is taken from the configured range and given back only once the
//! session's process has exited, so a new session never meets the old one's listener. Ended
//! sessions stay listed for a while, then are forgotten.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use uuid::Uuid;

/// Limits and timers of the session host.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The first port sessions listen on.
    pub first_port: u16,
    /// How many ports, from `first_port` on.
    pub ports: u16,
    /// Sessions alive at once at most.
    pub max_sessions: usize,
    /// How long a session may take to answer `/status`.
    pub start_timeout: Duration,
    /// From SIGTERM to SIGKILL.
    pub grace: Duration,
    /// The first wait before `/status` is asked; it doubles after each unanswered ask, up to
    /// `probe_every`.
    pub first_probe: Duration,
    /// How often `/status` is asked at most while a session starts.
    pub probe_every: Duration,
    /// How long an ended session stays listed.
    pub keep_ended: Duration,
    /// How long a port found taken by another program is skipped.
    pub skip_taken_port: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            first_port: 3284,
            ports: 100,
            max_sessions: 100,
            start_timeout: Duration::from_secs(60),
            grace: Duration::from_secs(10),
            first_probe: Duration::from_millis(1),
            probe_every: Duration::from_millis(50),
            keep_ended: Duration::from_secs(600),
            skip_taken_port: Duration::from_secs(60),
        }
    }
}

pub use kakuremichi_proto::SessionPhase as Phase;

/// Why a session cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    /// A session with this id is alive.
    #[error("a session with this id already runs")]
    Duplicate,
    /// As many sessions as allowed are alive.
    #[error("this agent runs {0} sessions, its most; end one first")]
    TooMany(usize),
    /// Every port of the range is taken.
    #[error("no free port left in {first}-{last}: every one is in use")]
    NoFreePort {
        /// The range's first port.
        first: u16,
        /// Its last.
        last: u16,
    },
}

/// What the I/O shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start the session's process, listening on `port`; answer with `handle_spawned`,
    /// `handle_spawn_failed` or `handle_port_taken`.
    Spawn {
        /// The session.
        id: Uuid,
        /// Its port.
        port: u16,
    },
    /// Ask its agentapi's `/status`; answer with `handle_probe`.
    Probe {
        /// The session.
        id: Uuid,
        /// Its port.
        port: u16,
    },
    /// SIGTERM to its process group.
    Terminate(Uuid),
    /// SIGKILL to its process group (also after it exited: nothing of it may stay behind).
    Kill(Uuid),
    /// Its phase changed (tell whoever follows).
    Changed(Uuid),
    /// It ended a while ago and is forgotten: its working folder may go.
    Forgotten(Uuid),
}

/// What is known of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// The session.
    pub id: Uuid,
    /// Its phase.
    pub phase: Phase,
    /// Its port.
    pub port: u16,
    /// Why it failed or stopped, when it did.
    pub reason: Option<String>,
    /// Its agent's last `/status` (`stable` or `running`).
    pub agent_status: Option<String>,
}

#[derive(Debug)]
struct Session {
    view: View,
    /// Whether its process runs (its port is held until it exits).
    process: bool,
    /// When it must be active by.
    start_deadline: Instant,
    probe_at: Option<Instant>,
    /// The wait before the next ask.
    probe_wait: Duration,
    kill_at: Option<Instant>,
    ttl_at: Option<Instant>,
    forget_at: Option<Instant>,
    /// The phase to end in once its process exits (a failure found while it ran).
    end_as: Option<(Phase, String)>,
    /// It ends the first time its agent finishes work (`running`, then `stable`).
    oneshot: bool,
    /// Its agent was seen `running`.
    worked: bool,
}

/// Every session of one agent.
#[derive(Debug)]
pub struct Sessions {
    limits: Limits,
    sessions: BTreeMap<Uuid, Session>,
    /// Ports held by a session's process.
    held: BTreeSet<u16>,
    /// Ports another program holds, skipped until then.
    taken: BTreeMap<u16, Instant>,
    actions: VecDeque<Action>,
}

impl Sessions {
    /// No sessions yet.
    pub fn new(limits: Limits) -> Self {
        Sessions {
            limits,
            sessions: BTreeMap::new(),
            held: BTreeSet::new(),
            taken: BTreeMap::new(),
            actions: VecDeque::new(),
        }
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn alive(&self) -> usize {
        self.sessions
            .values()
            .filter(|s| !s.view.phase.ended())
            .count()
    }

    fn free_port(&self, now: Instant) -> Option<u16> {
        let first = self.limits.first_port;
        (0..self.limits.ports)
            .filter_map(|i| first.checked_add(i))
            .find(|p| !self.held.contains(p) && self.taken.get(p).is_none_or(|until| *until <= now))
    }

    fn no_free_port(&self) -> StartError {
        StartError::NoFreePort {
            first: self.limits.first_port,
            last: self
                .limits
                .first_port
                .saturating_add(self.limits.ports.saturating_sub(1)),
        }
    }

    /// Starts session `id`, alive for `ttl` at most: its port, or why not.
    pub fn start(
        &mut self,
        id: Uuid,
        ttl: Option<Duration>,
        now: Instant,
    ) -> Result<u16, StartError> {
        if self
            .sessions
            .get(&id)
            .is_some_and(|s| !s.view.phase.ended())
        {
            return Err(StartError::Duplicate);
        }
        if self.alive() >= self.limits.max_sessions {
            return Err(StartError::TooMany(self.limits.max_sessions));
        }
        let port = self.free_port(now).ok_or_else(|| self.no_free_port())?;
        self.held.insert(port);
        self.sessions.insert(
            id,
            Session {
                view: View {
                    id,
                    phase: Phase::Creating,
                    port,
                    reason: None,
                    agent_status: None,
                },
                process: false,
                start_deadline: now + self.limits.start_timeout,
                probe_at: None,
                probe_wait: self.limits.first_probe,
                kill_at: None,
                ttl_at: ttl.map(|t| now + t),
                forget_at: None,
                end_as: None,
                oneshot: false,
                worked: false,
            },
        );
        self.actions.push_back(Action::Changed(id));
        self.actions.push_back(Action::Spawn { id, port });
        Ok(port)
    }

    /// Session `id` ends, as `stopped`, the first time its agent finishes work: it was seen
    /// `running`, then `stable` (agentapi-proxy's `oneshot`).
    pub fn set_oneshot(&mut self, id: Uuid) {
        if let Some(s) = self.sessions.get_mut(&id) {
            s.oneshot = true;
        }
    }

    /// Asks session `id` to end (SIGTERM, then SIGKILL after the grace period). `false`: no such
    /// session. Ending an ended one does nothing.
    pub fn stop(&mut self, id: Uuid, now: Instant) -> bool {
        self.stop_as(id, Phase::Stopped, None, now)
    }

    fn stop_as(&mut self, id: Uuid, end: Phase, reason: Option<String>, now: Instant) -> bool {
        let grace = self.limits.grace;
        let Some(s) = self.sessions.get_mut(&id) else {
            return false;
        };
        match s.view.phase {
            Phase::Stopped | Phase::Failed | Phase::Stopping => {}
            Phase::Creating | Phase::Starting | Phase::Active => {
                s.view.phase = Phase::Stopping;
                s.probe_at = None;
                s.ttl_at = None;
                s.end_as = Some((end, reason.unwrap_or_else(|| "stopped".into())));
                if s.process {
                    s.kill_at = Some(now + grace);
                    self.actions.push_back(Action::Terminate(id));
                }
                self.actions.push_back(Action::Changed(id));
            }
        }
        true
    }

    /// Ends every session (the agent stops).
    pub fn stop_all(&mut self, now: Instant) {
        let ids: Vec<Uuid> = self.sessions.keys().copied().collect();
        for id in ids {
            self.stop_as(id, Phase::Stopped, Some("the agent stopped".into()), now);
        }
    }

    /// Its process started.
    pub fn handle_spawned(&mut self, id: Uuid, now: Instant) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        s.process = true;
        match s.view.phase {
            Phase::Creating => {
                s.view.phase = Phase::Starting;
                s.probe_at = Some(now + s.probe_wait);
                self.actions.push_back(Action::Changed(id));
            }
            // Stopped while its process was being started.
            Phase::Stopping => {
                s.kill_at = Some(now + self.limits.grace);
                self.actions.push_back(Action::Terminate(id));
            }
            _ => {}
        }
    }

    /// Its process could not be started.
    pub fn handle_spawn_failed(&mut self, id: Uuid, reason: String, now: Instant) {
        self.end(id, Phase::Failed, reason, now);
    }

    /// Its port was found taken by another program: the port is skipped for a while and another
    /// one tried.
    pub fn handle_port_taken(&mut self, id: Uuid, now: Instant) {
        let skip = self.limits.skip_taken_port;
        let Some(s) = self.sessions.get(&id) else {
            return;
        };
        if s.view.phase != Phase::Creating {
            return;
        }
        let old = s.view.port;
        self.held.remove(&old);
        self.taken.insert(old, now + skip);
        match self.free_port(now) {
            Some(port) => {
                self.held.insert(port);
                if let Some(s) = self.sessions.get_mut(&id) {
                    s.view.port = port;
                }
                self.actions.push_back(Action::Spawn { id, port });
            }
            None => {
                let why = self.no_free_port().to_string();
                self.end(id, Phase::Failed, why, now);
            }
        }
    }

    /// What its agentapi answered at `/status` (`None`: nothing yet).
    pub fn handle_probe(&mut self, id: Uuid, status: Option<String>, now: Instant) {
        let every = self.limits.probe_every;
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        match (s.view.phase, status) {
            (Phase::Starting, Some(st)) => {
                s.view.phase = Phase::Active;
                s.probe_at = None;
                s.view.agent_status = Some(st);
                self.actions.push_back(Action::Changed(id));
            }
            (Phase::Starting, None) => {
                s.probe_wait = (s.probe_wait * 2).min(every).max(Duration::from_millis(1));
                s.probe_at = Some(now + s.probe_wait);
            }
            (Phase::Active, Some(st)) => self.handle_agent_status(id, st, now),
            _ => {}
        }
    }

    /// What its agent says on its event stream (`stable` or `running`).
    pub fn handle_agent_status(&mut self, id: Uuid, status: String, now: Instant) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        if s.view.phase != Phase::Active || s.view.agent_status.as_deref() == Some(&status) {
            return;
        }
        let finished = s.oneshot && s.worked && status == "stable";
        s.worked |= status == "running";
        s.view.agent_status = Some(status);
        self.actions.push_back(Action::Changed(id));
        if finished {
            self.stop_as(
                id,
                Phase::Stopped,
                Some("oneshot: its agent finished".into()),
                now,
            );
        }
    }

    /// Its process exited (`code`: its exit status, `None` when killed by a signal).
    pub fn handle_exited(&mut self, id: Uuid, code: Option<i32>, now: Instant) {
        let Some(s) = self.sessions.get(&id) else {
            return;
        };
        let status = match code {
            Some(c) => format!("status {c}"),
            None => "a signal".to_owned(),
        };
        let (phase, reason) = match (s.view.phase, &s.end_as) {
            (Phase::Stopping, Some((phase, reason))) => (*phase, reason.clone()),
            (Phase::Creating | Phase::Starting, _) => (
                Phase::Failed,
                format!("the session command exited ({status}) before its agent answered"),
            ),
            (_, _) if code == Some(0) => (Phase::Stopped, "the session command ended".into()),
            _ => (
                Phase::Failed,
                format!("the session command exited ({status})"),
            ),
        };
        // Whatever it started in its process group goes too.
        self.actions.push_back(Action::Kill(id));
        self.end(id, phase, reason, now);
    }

    fn end(&mut self, id: Uuid, phase: Phase, reason: String, now: Instant) {
        let keep = self.limits.keep_ended;
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        if s.view.phase.ended() {
            return;
        }
        s.view.phase = phase;
        s.view.reason = Some(reason);
        s.process = false;
        s.probe_at = None;
        s.kill_at = None;
        s.ttl_at = None;
        s.forget_at = Some(now + keep);
        self.held.remove(&s.view.port);
        self.actions.push_back(Action::Changed(id));
    }

    /// Time passed: probes due, start deadlines, TTLs, kills, forgetting.
    pub fn handle_timeout(&mut self, now: Instant) {
        let ids: Vec<Uuid> = self.sessions.keys().copied().collect();
        for id in ids {
            let Some(s) = self.sessions.get_mut(&id) else {
                continue;
            };
            if s.forget_at.is_some_and(|t| t <= now) {
                self.sessions.remove(&id);
                self.actions.push_back(Action::Forgotten(id));
                continue;
            }
            if s.kill_at.is_some_and(|t| t <= now) {
                s.kill_at = None;
                self.actions.push_back(Action::Kill(id));
            }
            if s.view.phase == Phase::Starting && s.start_deadline <= now {
                let why = format!(
                    "its agent did not answer at /status within {} s",
                    self.limits.start_timeout.as_secs()
                );
                self.stop_as(id, Phase::Failed, Some(why), now);
                continue;
            }
            if s.ttl_at.is_some_and(|t| t <= now) {
                self.stop_as(
                    id,
                    Phase::Stopped,
                    Some("its time to live ran out".into()),
                    now,
                );
                continue;
            }
            if s.probe_at.is_some_and(|t| t <= now) {
                s.probe_at = None;
                let port = s.view.port;
                self.actions.push_back(Action::Probe { id, port });
            }
        }
        self.taken.retain(|_, until| *until > now);
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Sessions::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.sessions
            .values()
            .flat_map(|s| {
                [
                    s.probe_at,
                    s.kill_at,
                    s.ttl_at,
                    s.forget_at,
                    (s.view.phase == Phase::Starting).then_some(s.start_deadline),
                ]
            })
            .flatten()
            .chain(self.taken.values().copied())
            .min()
    }

    /// One session.
    pub fn get(&self, id: Uuid) -> Option<&View> {
        self.sessions.get(&id).map(|s| &s.view)
    }

    /// Every session, ended ones too.
    pub fn list(&self) -> impl Iterator<Item = &View> {
        self.sessions.values().map(|s| &s.view)
    }

    /// Whether a session's process may still run.
    pub fn has_process(&self, id: Uuid) -> bool {
        self.sessions.get(&id).is_some_and(|s| s.process)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            first_port: 4000,
            ports: 3,
            max_sessions: 10,
            start_timeout: Duration::from_secs(5),
            grace: Duration::from_secs(2),
            first_probe: Duration::from_millis(25),
            probe_every: Duration::from_millis(100),
            keep_ended: Duration::from_secs(60),
            skip_taken_port: Duration::from_secs(30),
        }
    }

    fn drain(s: &mut Sessions) -> Vec<Action> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn a_session_starts_probes_until_its_agent_answers_and_is_active() {
        let t0 = Instant::now();
        let mut s = Sessions::new(limits());
        assert_eq!(s.start(id(1), None, t0), Ok(4000));
        assert_eq!(
            drain(&mut s),
            [
                Action::Changed(id(1)),
                Action::Spawn {
                    id: id(1),
                    port: 4000
                }
            ]
        );
        s.handle_spawned(id(1), t0);
        assert_eq!(s.get(id(1)).map(|v| v.phase), Some(Phase::Starting));
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_millis(25)));
        drain(&mut s);
        // Asked after 25 ms, then 50 and 100 ms after each unanswered ask, then every 100 ms.
        let mut at = t0 + Duration::from_millis(25);
        for wait in [50, 100, 100] {
            s.handle_timeout(at);
            assert_eq!(
                drain(&mut s),
                [Action::Probe {
                    id: id(1),
                    port: 4000
                }]
            );
            s.handle_probe(id(1), None, at);
            assert_eq!(s.poll_timeout(), Some(at + Duration::from_millis(wait)));
            s.handle_timeout(at + Duration::from_millis(wait - 1));
            assert!(drain(&mut s).is_empty());
            at += Duration::from_millis(wait);
        }
        s.handle_timeout(at);
        assert_eq!(
            drain(&mut s),
            [Action::Probe {
                id: id(1),
                port: 4000
            }]
        );
        s.handle_probe(id(1), Some("stable".into()), at);
        let v = s.get(id(1)).unwrap();
        assert_eq!(
            (v.phase, v.agent_status.as_deref()),
            (Phase::Active, Some("stable"))
        );
        assert_eq!(drain(&mut s), [Action::Changed(id(1))]);
        // Its event stream says it works, then waits.
        s.handle_agent_status(id(1), "running".into(), at);
        s.handle_agent_status(id(1), "running".into(), at);
        assert_eq!(drain(&mut s), [Action::Changed(id(1))]);
    }

    #[test]
    fn ports_are_taken_in_order_given_back_only_after_exit_and_run_out_clearly() {
        let t0 = Instant::now();
        let mut s = Sessions::new(limits());
        for n in 1..=3 {
            s.start(id(n), None, t0).unwrap();
            s.handle_spawned(id(n), t0);
        }
        assert_eq!(
            s.start(id(4), None, t0),
            Err(StartError::NoFreePort {
                first: 4000,
                last: 4002
            })
        );
        assert_eq!(
            s.start(id(4), None, t0).unwrap_err().to_string(),
            "no free port left in 4000-4002: every one is in use"
        );
        assert_eq!(s.start(id(1), None, t0), Err(StartError::Duplicate));
        // Stopping does not free the port; the exit does.
        assert!(s.stop(id(2), t0));
        assert!(s.start(id(4), None, t0).is_err());
        s.handle_exited(id(2), None, t0 + Duration::from_millis(10));
        assert_eq!(s.get(id(2)).map(|v| v.phase), Some(Phase::Stopped));
        assert_eq!(s.start(id(4), None, t0), Ok(4001));
        // An ended id may start again.
        assert!(s.stop(id(3), t0));
        s.handle_exited(id(3), Some(0), t0);
        assert_eq!(s.start(id(3), None, t0), Ok(4002));
    }

    #[test]
    fn a_command_that_exits_at_once_fails_with_its_status() {
        let t0 = Instant::now();
        let mut s = Sessions::new(limits());
        s.start(id(1), None, t0).unwrap();
        s.handle_spawned(id(1), t0);
        drain(&mut s);
        s.handle_exited(id(1), Some(3), t0 + Duration::from_millis(5));
        let v = s.get(id(1)).unwrap();
        assert_eq!(v.phase, Phase::Failed);
        assert_eq!(
            v.reason.as_deref(),
            Some("the session command exited (status 3) before its agent answered")
        );
        assert_eq!(drain(&mut s), [Action::Kill(id(1)), Action::Changed(id(1))]);
        // No timer is left for it but forgetting it.
        assert_eq!(
            s.poll_timeout(),
            Some(t0 + Duration::from_millis(5) + Duration::from_secs(60))
        );
        s.handle_timeout(t0 + Duration::from_secs(61));
        assert!(s.get(id(1)).is_none());
        assert_eq!(drain(&mut s), [Action::Forgotten(id(1))]);
        // A command that cannot start at all.
        s.start(id(2), None, t0).unwrap();
        s.handle_spawn_failed(id(2), "no such file: agentapi".into(), t0);
        assert_eq!(
            s.get(id(2)).and_then(|v| v.reason.clone()).as_deref(),
            Some("no such file: agentapi")
        );
        assert_eq!(s.start(id(3), None, t0), Ok(4000));
    }

    #[test]
    fn stopping_sends_sigterm_then_sigkill_after_the_grace_period() {
        let t0 = Instant::now();
        let mut s = Sessions::new(limits());
        s.start(id(1), None, t0).unwrap();
        s.handle_spawned(id(1), t0);
        s.handle_probe(id(1), Some("stable".into()), t0);
        drain(&mut s);
        assert!(s.stop(id(1), t0));
        assert!(s.stop(id(1), t0), "twice is fine");
        assert!(!s.stop(id(9), t0));
        assert_eq!(
            drain(&mut s),
            [Action::Terminate(id(1)), Action::Changed(id(1))]
        );
        s.handle_timeout(t0 + Duration::from_secs(1));
        assert!(drain(&mut s).is_empty());
        s.handle_timeout(t0 + Duration::from_secs(2));
        assert_eq!(drain(&mut s), [Action::Kill(id(1))]);
        s.handle_exited(id(1), None, t0 + Duration::from_secs(2));
        let v = s.get(id(1)).unwrap();
        assert_eq!(
            (v.phase, v.reason.as_deref()),
            (Phase::Stopped, Some("stopped"))
        );
    }

    #[test]
    fn a_session_that_never_answers_fails_and_a_ttl_ends_one() {
        let t0 = Instant::now();
        let mut s = Sessions::new(limits());
        s.start(id(1), None, t0).unwrap();
        s.handle_spawned(id(1), t0);
        s.start(id(2), Some(Duration::from_secs(30)), t0).unwrap();
        s.handle_spawned(id(2), t0);
        s.handle_probe(id(2), Some("stable".into()), t0);
        drain(&mut s);
        s.handle_timeout(t0 + Duration::from_secs(5));
        assert_eq!(
            drain(&mut s),
            [Action::Terminate(id(1)), Action::Changed(id(1))]
        );
        s.handle_exited(id(1), None, t0 + Duration::from_secs(5));
        let v = s.get(id(1)).unwrap();
        assert_eq!(v.phase, Phase::Failed);
        assert_eq!(
            v.reason.as_deref(),
            Some("its agent did not answer at /status within 5 s")
        );
        s.handle_timeout(t0 + Duration::from_secs(30));
        assert!(drain(&mut s).contains(&Action::Terminate(id(2))));
        s.handle_exited(id(2), Some(0), t0 + Duration::from_secs(31));
        assert_eq!(
            s.get(id(2)).and_then(|v| v.reason.clone()).as_deref(),
            Some("its time to live ran out")
        );
    }

    #[test]
    fn a_port_another_program_holds_is_skipped_for_a_while() {
        let t0 = Instant::now();
        let mut s = Sessions::new(limits());
        s.start(id(1), None, t0).unwrap();
        drain(&mut s);
        s.handle_port_taken(id(1), t0);
        assert_eq!(
            drain(&mut s),
            [Action::Spawn {
                id: id(1),
                port: 4001
            }]
        );
        s.handle_spawned(id(1), t0);
        assert_eq!(s.start(id(2), None, t0), Ok(4002));
        drain(&mut s);
        s.handle_port_taken(id(2), t0);
        assert_eq!(
            s.get(id(2)).and_then(|v| v.reason.clone()).as_deref(),
            Some("no free port left in 4000-4002: every one is in use")
        );
        // 4000 is tried again once the skip is over; 4002 is free again (its session failed).
        s.handle_timeout(t0 + Duration::from_secs(30));
        assert_eq!(s.start(id(3), None, t0 + Duration::from_secs(30)), Ok(4000));
    }

    #[test]
    fn too_many_sessions_and_stopping_all() {
        let t0 = Instant::now();
        let mut s = Sessions::new(Limits {
            max_sessions: 2,
            ..limits()
        });
        s.start(id(1), None, t0).unwrap();
        s.handle_spawned(id(1), t0);
        s.start(id(2), None, t0).unwrap();
        assert_eq!(s.start(id(3), None, t0), Err(StartError::TooMany(2)));
        drain(&mut s);
        s.stop_all(t0);
        // Only the one with a process gets a signal; the other one's process, when it starts,
        // gets one at once. (Both had announced themselves before.)
        assert_eq!(
            drain(&mut s),
            [
                Action::Terminate(id(1)),
                Action::Changed(id(1)),
                Action::Changed(id(2))
            ]
        );
        s.handle_spawned(id(2), t0);
        assert_eq!(drain(&mut s), [Action::Terminate(id(2))]);
        s.handle_exited(id(1), None, t0);
        s.handle_exited(id(2), None, t0);
        assert!(s.list().all(|v| v.phase == Phase::Stopped));
        assert_eq!(
            s.get(id(1)).and_then(|v| v.reason.clone()).as_deref(),
            Some("the agent stopped")
        );
    }

    #[test]
    fn a_oneshot_session_ends_once_its_agent_has_worked_and_waits_again() {
        let t0 = Instant::now();
        let mut s = Sessions::new(limits());
        for n in [1, 2] {
            s.start(id(n), None, t0).unwrap();
            s.handle_spawned(id(n), t0);
            s.handle_probe(id(n), Some("stable".into()), t0);
        }
        s.set_oneshot(id(1));
        drain(&mut s);
        // Stable again without having worked: nothing ends.
        s.handle_agent_status(id(1), "stable".into(), t0);
        assert_eq!(drain(&mut s), []);
        for n in [1, 2] {
            s.handle_agent_status(id(n), "running".into(), t0);
            s.handle_agent_status(id(n), "stable".into(), t0);
        }
        assert_eq!(s.get(id(1)).unwrap().phase, Phase::Stopping);
        assert_eq!(
            drain(&mut s),
            [
                Action::Changed(id(1)),
                Action::Changed(id(1)),
                Action::Terminate(id(1)),
                Action::Changed(id(1)),
                Action::Changed(id(2)),
                Action::Changed(id(2)),
            ]
        );
        s.handle_exited(id(1), None, t0);
        let v = s.get(id(1)).unwrap();
        assert_eq!(
            (v.phase, v.reason.as_deref()),
            (Phase::Stopped, Some("oneshot: its agent finished"))
        );
        // The other one, not oneshot, goes on.
        assert_eq!(s.get(id(2)).unwrap().phase, Phase::Active);
    }
}
