//! Agent sessions: processes such as agentapi servers wrapping AI coding agents, started on
//! demand next to the private code, each on a port of its own, reached at `/<session-id>/...`.
//!
//! [`core`] is the lifecycle as a state machine without I/O; [`SessionHost`] is the thin tokio
//! shell around it: it starts each session's command from a template (default
//! `agentapi server --port {port} -- claude`) in its own working folder and process group (as
//! another user when configured), with the environment merged host < `default.env` <
//! `<role>.env` < request (the agent's own `KAKUREMICHI_*` settings never reach a session), an
//! optional start-up script run first in the same process group, its output in `session.log`;
//! it asks the agent's `/status` until it answers, and signals the whole group to end it.

pub mod core;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use uuid::Uuid;

use self::core::{Action, Sessions};
pub use self::core::{Limits, Phase, StartError, View};

/// The default session command.
pub const DEFAULT_COMMAND: &str = "agentapi server --port {port} -- claude";

/// How the host starts sessions.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The command template, one argument per element; `{port}`, `{id}` and `{dir}` are
    /// replaced in each.
    pub command: Vec<String>,
    /// Sessions' working folders are made under it, one per session id.
    pub work_dir: PathBuf,
    /// The folder of `default.env` and `<role>.env`, when any.
    pub env_dir: Option<PathBuf>,
    /// A shell script run first in each session's folder and environment (`sh -c`), e.g. to
    /// clone a repository; the session fails if it does.
    pub startup_script: Option<String>,
    /// The user and group id sessions run as (when the agent runs as root).
    pub run_as: Option<(u32, u32)>,
    /// The command template for a session whose folder is already there (the agent restarted
    /// while it ran), e.g. `agentapi server --port {port} -- claude --continue`; `None`: the
    /// command itself.
    pub resume_command: Option<Vec<String>>,
    /// A session folder older than this is not resumed (the session fails instead).
    pub resume_max_age: Duration,
    /// Resource limits of each session's processes.
    pub rlimits: SessionLimits,
    /// Ports, counts and timers.
    pub limits: Limits,
    /// Labels control matches against a new session's tags to choose the agent it runs on
    /// (e.g. `repo=github.com/acme/api`).
    pub labels: BTreeMap<String, String>,
}

/// Resource limits of a session's processes (`setrlimit`, through util-linux `prlimit`): each
/// process of the session inherits them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionLimits {
    /// Address space per process, bytes (`RLIMIT_AS`).
    pub memory_bytes: Option<u64>,
    /// CPU time per process, seconds (`RLIMIT_CPU`): SIGXCPU, then SIGKILL.
    pub cpu_secs: Option<u64>,
    /// Processes of the session's user at most (`RLIMIT_NPROC`): per session when sessions run
    /// as a user of their own.
    pub processes: Option<u64>,
}

impl SessionLimits {
    /// `prlimit` and its arguments, or nothing when no limit is set.
    pub fn prefix(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(m) = self.memory_bytes {
            out.push(format!("--as={m}"));
        }
        if let Some(c) = self.cpu_secs {
            out.push(format!("--cpu={c}"));
        }
        if let Some(p) = self.processes {
            out.push(format!("--nproc={p}"));
        }
        if out.is_empty() {
            return out;
        }
        out.insert(0, "prlimit".into());
        out.push("--".into());
        out
    }
}

/// Default [`HostConfig::resume_max_age`].
pub const DEFAULT_RESUME_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

impl HostConfig {
    /// `command` split at spaces, with the other settings at their defaults.
    pub fn new(command: &str, work_dir: impl Into<PathBuf>) -> Self {
        HostConfig {
            command: command.split_whitespace().map(str::to_owned).collect(),
            work_dir: work_dir.into(),
            env_dir: None,
            startup_script: None,
            run_as: None,
            resume_command: None,
            resume_max_age: DEFAULT_RESUME_MAX_AGE,
            rlimits: SessionLimits::default(),
            limits: Limits::default(),
            labels: BTreeMap::new(),
        }
    }
}

/// A request to start a session.
#[derive(Clone, Default)]
pub struct StartRequest {
    /// Its id (control's).
    pub id: Uuid,
    /// The role whose env file applies (`[A-Za-z0-9_-]`).
    pub role: Option<String>,
    /// Its own environment, over everything else.
    pub env: BTreeMap<String, String>,
    /// How long it may live.
    pub ttl: Option<Duration>,
    /// A first message sent to its agent once it is stable (not when it is resumed).
    pub initial_message: Option<String>,
    /// It ends the first time its agent finishes work (agentapi-proxy's `oneshot`).
    pub oneshot: bool,
}

impl std::fmt::Debug for StartRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Environment values may be secrets (tokens): names only.
        f.debug_struct("StartRequest")
            .field("id", &self.id)
            .field("role", &self.role)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("ttl", &self.ttl)
            .field("initial_message", &self.initial_message.is_some())
            .field("oneshot", &self.oneshot)
            .finish()
    }
}

/// What is known of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// Phase, port, reason, agent status.
    pub view: View,
    /// Its process (and process group) id, while it runs.
    pub pid: Option<u32>,
    /// Its working folder (its output is in `session.log` there).
    pub dir: PathBuf,
}

/// Why the host refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// The session cannot start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The request is not valid.
    #[error("{0}")]
    Invalid(String),
    /// No such session.
    #[error("no such session")]
    NotFound,
    /// The host has stopped.
    #[error("the session host has stopped")]
    Gone,
}

enum Command {
    Start(
        StartRequest,
        oneshot::Sender<Result<SessionInfo, HostError>>,
    ),
    Stop(Uuid, oneshot::Sender<Result<(), HostError>>),
    List(oneshot::Sender<Vec<SessionInfo>>),
    Shutdown(oneshot::Sender<()>),
}

enum Event {
    Exited(Uuid, Option<i32>),
    Probed(Uuid, Option<String>),
    /// A `status_change` on its agentapi's `/events`.
    AgentStatus(Uuid, String),
    /// Its `/events` is followed (or cannot be): its first message may go.
    Following(Uuid),
}

/// The sessions of this agent: a handle to the task that runs them.
#[derive(Debug, Clone)]
pub struct SessionHost {
    commands: mpsc::Sender<Command>,
    changes: broadcast::Sender<SessionInfo>,
    views: watch::Receiver<Vec<View>>,
}

impl SessionHost {
    /// Starts the host task (in a tokio runtime).
    pub fn spawn(config: HostConfig) -> SessionHost {
        let (commands, rx) = mpsc::channel(64);
        let (changes, _) = broadcast::channel(1024);
        let (events, events_rx) = mpsc::unbounded_channel();
        let (views_tx, views) = watch::channel(Vec::new());
        let shell = Shell {
            views: views_tx,
            core: Sessions::new(config.limits.clone()),
            config: Arc::new(config),
            procs: HashMap::new(),
            requests: HashMap::new(),
            followers: HashMap::new(),
            events,
            changes: changes.clone(),
        };
        tokio::spawn(async move {
            reap_orphans(&shell.config.work_dir, shell.config.limits.grace).await;
            remove_ended(&shell.config.work_dir).await;
            shell.run(rx, events_rx).await
        });
        SessionHost {
            commands,
            changes,
            views,
        }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Starts a session: its info once its process is being started (`creating` or `starting`).
    pub async fn start(&self, req: StartRequest) -> Result<SessionInfo, HostError> {
        self.ask(|tx| Command::Start(req, tx))
            .await
            .unwrap_or(Err(HostError::Gone))
    }

    /// Ends a session (SIGTERM to its group, SIGKILL after the grace period).
    pub async fn stop(&self, id: Uuid) -> Result<(), HostError> {
        self.ask(|tx| Command::Stop(id, tx))
            .await
            .unwrap_or(Err(HostError::Gone))
    }

    /// Every session, ended ones too.
    pub async fn list(&self) -> Vec<SessionInfo> {
        self.ask(Command::List).await.unwrap_or_default()
    }

    /// One session.
    pub async fn get(&self, id: Uuid) -> Option<SessionInfo> {
        self.list().await.into_iter().find(|s| s.view.id == id)
    }

    /// Every session as last seen, without waiting (for a status report).
    pub fn views(&self) -> Vec<View> {
        self.views.borrow().clone()
    }

    /// Each change of a session's phase or agent status, as it happens.
    pub fn changes(&self) -> broadcast::Receiver<SessionInfo> {
        self.changes.subscribe()
    }

    /// Ends every session and waits until their processes are gone.
    pub async fn shutdown(&self) {
        let _ = self.ask(Command::Shutdown).await;
    }
}

struct Shell {
    core: Sessions,
    config: Arc<HostConfig>,
    /// Process (group) ids of sessions whose process may run.
    procs: HashMap<Uuid, u32>,
    /// Start requests until their process starts (a taken port means another try).
    requests: HashMap<Uuid, StartRequest>,
    /// Active sessions' `/events` followers, and whether each follows yet.
    followers: HashMap<Uuid, (tokio::task::JoinHandle<()>, bool)>,
    events: mpsc::UnboundedSender<Event>,
    changes: broadcast::Sender<SessionInfo>,
    views: watch::Sender<Vec<View>>,
}

impl Shell {
    fn info(&self, view: &View) -> SessionInfo {
        SessionInfo {
            view: view.clone(),
            pid: self.procs.get(&view.id).copied(),
            dir: self.config.work_dir.join(view.id.to_string()),
        }
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut events: mpsc::UnboundedReceiver<Event>,
    ) {
        // Once every handle is gone or a shutdown is asked: every session ends, then the task.
        let mut ending = false;
        let mut shutting: Option<oneshot::Sender<()>> = None;
        loop {
            let due = self.core.poll_timeout();
            tokio::select! {
                cmd = commands.recv(), if !ending => match cmd {
                    None => {
                        self.core.stop_all(Instant::now());
                        ending = true;
                    }
                    Some(Command::Start(req, reply)) => {
                        let r = self.start(req);
                        self.drain();
                        let r = r.map(|id| {
                            self.core.get(id).map(|v| self.info(v)).unwrap_or_else(|| SessionInfo {
                                view: View { id, phase: Phase::Failed, port: 0, reason: None, agent_status: None },
                                pid: None,
                                dir: self.config.work_dir.join(id.to_string()),
                            })
                        });
                        let _ = reply.send(r);
                    }
                    Some(Command::Stop(id, reply)) => {
                        let found = self.core.stop(id, Instant::now());
                        let _ = reply.send(if found { Ok(()) } else { Err(HostError::NotFound) });
                    }
                    Some(Command::List(reply)) => {
                        let all = self.core.list().map(|v| self.info(v)).collect();
                        let _ = reply.send(all);
                    }
                    Some(Command::Shutdown(reply)) => {
                        self.core.stop_all(Instant::now());
                        ending = true;
                        shutting = Some(reply);
                    }
                },
                Some(ev) = events.recv() => match ev {
                    Event::Exited(id, code) => self.core.handle_exited(id, code, Instant::now()),
                    Event::Probed(id, status) => self.core.handle_probe(id, status, Instant::now()),
                    Event::AgentStatus(id, status) => {
                        self.core.handle_agent_status(id, status, Instant::now());
                    }
                    Event::Following(id) => {
                        if let Some((_, following)) = self.followers.get_mut(&id) {
                            *following = true;
                        }
                        self.first_message(id);
                    }
                },
                () = sleep_until(due), if due.is_some() => self.core.handle_timeout(Instant::now()),
            }
            self.drain();
            self.views.send_if_modified(|views| {
                let now: Vec<View> = self.core.list().cloned().collect();
                let changed = *views != now;
                *views = now;
                changed
            });
            if ending && self.procs.is_empty() {
                if let Some(reply) = shutting.take() {
                    let _ = reply.send(());
                }
                return;
            }
        }
    }

    fn start(&mut self, req: StartRequest) -> Result<Uuid, HostError> {
        if let Some(role) = &req.role {
            if role.is_empty()
                || !role
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(HostError::Invalid(format!(
                    "role {role:?} may hold letters, digits, - and _ only"
                )));
            }
        }
        if let Some(k) = req
            .env
            .keys()
            .find(|k| k.is_empty() || k.contains(['=', '\0']))
        {
            return Err(HostError::Invalid(format!(
                "environment name {k:?} is not valid"
            )));
        }
        let id = req.id;
        let ttl = req.ttl;
        let oneshot = req.oneshot;
        self.requests.insert(id, req);
        if let Err(e) = self.core.start(id, ttl, Instant::now()) {
            self.requests.remove(&id);
            return Err(e.into());
        }
        if oneshot {
            self.core.set_oneshot(id);
        }
        Ok(id)
    }

    fn drain(&mut self) {
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Spawn { id, port } => self.spawn(id, port),
                Action::Probe { id, port } => {
                    let events = self.events.clone();
                    tokio::spawn(async move {
                        let status = probe(port).await;
                        let _ = events.send(Event::Probed(id, status));
                    });
                }
                Action::Terminate(id) => self.signal(id, nix::sys::signal::Signal::SIGTERM),
                Action::Kill(id) => self.signal(id, nix::sys::signal::Signal::SIGKILL),
                Action::Forgotten(id) => {
                    let dir = self.config.work_dir.join(id.to_string());
                    tokio::spawn(async move {
                        if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
                            if e.kind() != std::io::ErrorKind::NotFound {
                                tracing::warn!(session = %id, error = %e, dir = %dir.display(), "cannot remove an ended session's folder");
                            }
                        }
                    });
                }
                Action::Changed(id) => {
                    if let Some(v) = self.core.get(id) {
                        let info = self.info(v);
                        let (phase, port) = (v.phase, v.port);
                        if phase == Phase::Active && !self.followers.contains_key(&id) {
                            let events = self.events.clone();
                            let task = tokio::spawn(follow_events(id, port, events));
                            self.followers.insert(id, (task, false));
                        }
                        self.first_message(id);
                        // A held `/events` stream would keep a gracefully stopping server
                        // (Go's `Shutdown`, axum's) waiting until the grace ends.
                        if phase == Phase::Stopping || phase.ended() {
                            if let Some((task, _)) = self.followers.remove(&id) {
                                task.abort();
                            }
                        }
                        if phase.ended() {
                            self.procs.remove(&id);
                            self.requests.remove(&id);
                            // Its folder goes when it is forgotten, or at the agent's next start.
                            let _ = std::fs::write(info.dir.join(ENDED_FILE), b"");
                        }
                        tracing::info!(session = %id, phase = ?info.view.phase, port = info.view.port, reason = info.view.reason.as_deref().unwrap_or(""), "session");
                        let _ = self.changes.send(info);
                    }
                }
            }
        }
    }

    /// Sends the session's first message once its agent is active and stable and its
    /// `/events` is followed (so the work it starts is seen, however short).
    fn first_message(&mut self, id: Uuid) {
        let Some(v) = self.core.get(id) else {
            return;
        };
        let ready = v.phase == Phase::Active
            && v.agent_status.as_deref() == Some("stable")
            && self
                .followers
                .get(&id)
                .is_some_and(|(_, following)| *following);
        if !ready {
            return;
        }
        let port = v.port;
        if let Some(message) = self
            .requests
            .get_mut(&id)
            .and_then(|r| r.initial_message.take())
        {
            tokio::spawn(send_message(id, port, message));
        }
    }

    fn signal(&self, id: Uuid, signal: nix::sys::signal::Signal) {
        let Some(pid) = self.procs.get(&id) else {
            return;
        };
        let Ok(pid) = i32::try_from(*pid) else {
            return;
        };
        match nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => tracing::warn!(session = %id, error = %e, ?signal, "cannot signal a session"),
        }
    }

    fn spawn(&mut self, id: Uuid, port: u16) {
        let now = Instant::now();
        // Another program on the port: the core picks another one.
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            tracing::warn!(session = %id, port, "port taken by another program; trying another");
            self.core.handle_port_taken(id, now);
            return;
        }
        let Some(req) = self.requests.get(&id) else {
            self.core
                .handle_spawn_failed(id, "the start request was lost".into(), now);
            return;
        };
        match spawn_process(&self.config, req, port) {
            Ok((mut child, resumed)) => {
                if resumed {
                    // Its conversation goes on: no first message again.
                    if let Some(r) = self.requests.get_mut(&id) {
                        r.initial_message = None;
                    }
                }
                let Some(pid) = child.id() else {
                    self.core
                        .handle_spawn_failed(id, "the session command vanished".into(), now);
                    return;
                };
                self.procs.insert(id, pid);
                self.core.handle_spawned(id, now);
                let events = self.events.clone();
                tokio::spawn(async move {
                    let code = match child.wait().await {
                        Ok(status) => status.code(),
                        Err(_) => None,
                    };
                    let _ = events.send(Event::Exited(id, code));
                });
            }
            Err(e) => self.core.handle_spawn_failed(id, e, now),
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        None => std::future::pending().await,
    }
}

/// `KEY=VALUE` lines (blank lines and `#` comments skipped, optional quotes around the value).
pub fn parse_env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let l = l.strip_prefix("export ").unwrap_or(l);
            let (k, v) = l.split_once('=')?;
            let k = k.trim();
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            (!k.is_empty()).then(|| (k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// The environment of a session: the host's (without the agent's own `KAKUREMICHI_*`
/// settings) < `default.env` < `<role>.env` < the request's, then its id.
pub fn session_env(
    host: impl Iterator<Item = (String, String)>,
    env_dir: Option<&Path>,
    req: &StartRequest,
) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = host
        .filter(|(k, _)| !k.starts_with("KAKUREMICHI_"))
        .collect();
    if let Some(dir) = env_dir {
        let files = std::iter::once("default".to_owned()).chain(req.role.clone());
        for name in files {
            if let Ok(text) = std::fs::read_to_string(dir.join(format!("{name}.env"))) {
                env.extend(parse_env_file(&text));
            }
        }
    }
    env.extend(req.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.insert("KAKUREMICHI_SESSION_ID".into(), req.id.to_string());
    env
}

/// The file in a session's folder marking when it first started.
const STARTED_FILE: &str = ".kakuremichi-started";
/// The file in a session's folder holding its process group id while it may run.
const PGID_FILE: &str = ".kakuremichi-pgid";
/// In a session's folder once the session ended: the folder goes at the agent's next start.
const ENDED_FILE: &str = ".kakuremichi-ended";

/// Starts a session's process: `(child, resumed)`, resumed when its folder was there already
/// (an earlier run of the agent started it).
fn spawn_process(
    config: &HostConfig,
    req: &StartRequest,
    port: u16,
) -> Result<(tokio::process::Child, bool), String> {
    let dir = config.work_dir.join(req.id.to_string());
    let started = dir.join(STARTED_FILE);
    let resumed = match std::fs::metadata(&started).and_then(|m| m.modified()) {
        Ok(at) => {
            let age = at.elapsed().unwrap_or_default();
            if age > config.resume_max_age {
                return Err(format!(
                    "the session began {} s ago, longer than the resume limit ({} s): not resumed",
                    age.as_secs(),
                    config.resume_max_age.as_secs()
                ));
            }
            true
        }
        Err(_) => false,
    };
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("cannot make the working folder {}: {e}", dir.display()))?;
    if !resumed {
        std::fs::write(&started, b"")
            .map_err(|e| format!("cannot write {}: {e}", started.display()))?;
    }
    if let Some((uid, gid)) = config.run_as {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
            .map_err(|e| format!("cannot give {} to user {uid}: {e}", dir.display()))?;
    }
    let fill = |a: &String| {
        a.replace("{port}", &port.to_string())
            .replace("{id}", &req.id.to_string())
            .replace("{dir}", &dir.display().to_string())
    };
    let template = match (&config.resume_command, resumed) {
        (Some(resume), true) => resume,
        _ => &config.command,
    };
    let mut argv: Vec<String> = template.iter().map(fill).collect();
    if argv.is_empty() {
        return Err("the session command is empty".into());
    }
    if let Some(script) = config.startup_script.as_ref().filter(|_| !resumed) {
        // The script first, then the command in its place: one process group, and a failing
        // script fails the session.
        let mut wrapped = vec![
            "sh".to_owned(),
            "-c".to_owned(),
            format!("{script}\nexec \"$@\""),
            "sh".to_owned(),
        ];
        wrapped.append(&mut argv);
        argv = wrapped;
    }
    let mut limited = config.rlimits.prefix();
    if !limited.is_empty() {
        limited.append(&mut argv);
        argv = limited;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("session.log"))
        .map_err(|e| format!("cannot open session.log: {e}"))?;
    let log2 = log
        .try_clone()
        .map_err(|e| format!("cannot open session.log: {e}"))?;
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .current_dir(&dir)
        .env_clear()
        .envs(session_env(
            std::env::vars(),
            config.env_dir.as_deref(),
            req,
        ))
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .kill_on_drop(false);
    if let Some((uid, gid)) = config.run_as {
        cmd.uid(uid).gid(gid);
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", argv[0]))?;
    if let Some(pid) = child.id() {
        // So that an agent started again after a crash ends what this one leaves behind.
        if let Err(e) = std::fs::write(dir.join(PGID_FILE), pid.to_string()) {
            tracing::warn!(session = %req.id, error = %e, "cannot note the session's process group");
        }
    }
    Ok((child, resumed))
}

/// The processes of group `pgid` whose working folder is `dir` or under it.
fn group_in(pgid: i32, dir: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // Fields after the command's closing parenthesis: state, ppid, pgrp, ...
            let pgrp = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(2))
                .and_then(|p| p.parse::<i32>().ok());
            pgrp == Some(pgid)
                && std::fs::read_link(format!("/proc/{pid}/cwd"))
                    .is_ok_and(|cwd| cwd.starts_with(dir))
        })
        .collect()
}

/// Ends the process groups an earlier run of the agent left (it was killed, so its sessions'
/// groups lived on): each session folder's noted group, if processes of it still work in that
/// folder (a reused id is left alone). SIGTERM, then SIGKILL after `grace`.
async fn reap_orphans(work_dir: &Path, grace: Duration) {
    let Ok(entries) = std::fs::read_dir(work_dir) else {
        return;
    };
    let mut groups = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        let Some(pgid) = std::fs::read_to_string(dir.join(PGID_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .filter(|p| *p > 1)
        else {
            continue;
        };
        let dir = dir.canonicalize().unwrap_or(dir);
        if !group_in(pgid, &dir).is_empty() {
            tracing::info!(pgid, dir = %dir.display(), "ending a session process group left by an earlier run");
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGTERM,
            );
            groups.push((pgid, dir));
        }
    }
    let deadline = tokio::time::Instant::now() + grace;
    while !groups.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        groups.retain(|(pgid, dir)| !group_in(*pgid, dir).is_empty());
    }
    for (pgid, _) in groups {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pgid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Removes the folders of sessions that ended (marked so) in an earlier run of the agent.
async fn remove_ended(work_dir: &Path) {
    let Ok(mut entries) = tokio::fs::read_dir(work_dir).await else {
        return;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let dir = entry.path();
        if tokio::fs::try_exists(dir.join(ENDED_FILE))
            .await
            .unwrap_or(false)
        {
            if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
                tracing::warn!(error = %e, dir = %dir.display(), "cannot remove an ended session's folder");
            }
        }
    }
}

/// The longest line of a session's `/events` followed; a longer one ends the following.
const MAX_EVENT_LINE: usize = 4 << 20;

/// Follows a session's agentapi `/events` (SSE) while it lives: each `status_change` goes to
/// the core as it happens, so even a short `running` is seen. [`Event::Following`] is sent once
/// the stream is open, or could not be opened (an agentapi without `/events`: its status is then
/// only what `/status` said at the start).
async fn follow_events(id: Uuid, port: u16, events: mpsc::UnboundedSender<Event>) {
    use http_body_util::BodyExt as _;
    let opened = tokio::time::timeout(Duration::from_secs(5), open_events(port))
        .await
        .ok()
        .flatten();
    let _ = events.send(Event::Following(id));
    let Some(mut body) = opened else {
        tracing::debug!(session = %id, "its agent's /events cannot be followed");
        return;
    };
    let mut buf: Vec<u8> = Vec::new();
    let mut event = String::new();
    while let Some(Ok(frame)) = body.frame().await {
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                event.clear();
            } else if let Some(name) = line.strip_prefix("event:") {
                name.trim().clone_into(&mut event);
            } else if let Some(data) = line.strip_prefix("data:") {
                if event != "status_change" {
                    continue;
                }
                let status = serde_json::from_str::<serde_json::Value>(data.trim())
                    .ok()
                    .and_then(|v| v["status"].as_str().map(str::to_owned));
                if let Some(status) = status {
                    tracing::trace!(session = %id, %status, "agent status");
                    let _ = events.send(Event::AgentStatus(id, status));
                }
            }
        }
        if buf.len() > MAX_EVENT_LINE {
            tracing::warn!(session = %id, "a line of its agent's /events is too long; no longer followed");
            return;
        }
    }
}

/// `GET /events` on a session's agentapi: the body of its event stream.
async fn open_events(port: u16) -> Option<hyper::body::Incoming> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let (mut send, conn) = hyper::client::conn::http1::handshake::<
        _,
        http_body_util::Empty<bytes::Bytes>,
    >(hyper_util::rt::TokioIo::new(tcp))
    .await
    .ok()?;
    tokio::spawn(conn);
    let req = http::Request::get("/events")
        .header(http::header::HOST, "localhost")
        .header(http::header::ACCEPT, "text/event-stream")
        .body(http_body_util::Empty::new())
        .ok()?;
    let resp = send.send_request(req).await.ok()?;
    resp.status().is_success().then(|| resp.into_body())
}

/// Sends a session's first message to its agentapi (`POST /message`), once.
async fn send_message(id: Uuid, port: u16, content: String) {
    let body = serde_json::json!({"content": content, "type": "user"}).to_string();
    let send = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let head = format!(
            "POST /message HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await?;
        s.write_all(body.as_bytes()).await?;
        let mut buf = Vec::new();
        s.take(64 * 1024).read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(
            String::from_utf8_lossy(&buf)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned(),
        )
    };
    match tokio::time::timeout(Duration::from_secs(30), send).await {
        Ok(Ok(status)) if status.contains(" 200") => {
            tracing::info!(session = %id, "first message sent")
        }
        Ok(Ok(status)) => {
            tracing::warn!(session = %id, %status, "the agent refused the first message")
        }
        Ok(Err(e)) => tracing::warn!(session = %id, error = %e, "cannot send the first message"),
        Err(_) => tracing::warn!(session = %id, "sending the first message timed out"),
    }
}

/// Asks an agentapi's `/status` on loopback: its `status`, or `None` when it does not answer
/// (yet) within a second.
async fn probe(port: u16) -> Option<String> {
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(b"GET /status HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.take(64 * 1024).read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text.split_once("\r\n\r\n")?;
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            return None;
        }
        let json = &body[body.find('{')?..=body.rfind('}')?];
        let v: serde_json::Value = serde_json::from_str(json).ok()?;
        v["status"].as_str().map(str::to_owned)
    };
    tokio::time::timeout(Duration::from_secs(1), ask)
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_become_a_prlimit_prefix() {
        assert!(SessionLimits::default().prefix().is_empty());
        let l = SessionLimits {
            memory_bytes: Some(1 << 30),
            cpu_secs: Some(3600),
            processes: Some(256),
        };
        assert_eq!(
            l.prefix(),
            [
                "prlimit",
                "--as=1073741824",
                "--cpu=3600",
                "--nproc=256",
                "--"
            ]
        );
    }

    #[test]
    fn env_is_host_then_default_then_role_then_request_without_the_agents_settings() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("default.env"),
            "# defaults\nA=default\nB=default\nexport C=\"quoted value\"\n\nnot a line\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("dev.env"), "B=role\nD='single'\n").unwrap();
        let req = StartRequest {
            id: Uuid::from_u128(7),
            role: Some("dev".into()),
            env: BTreeMap::from([("D".into(), "request".into())]),
            ..Default::default()
        };
        let host = [
            ("A".to_owned(), "host".to_owned()),
            ("PATH".to_owned(), "/usr/bin".to_owned()),
            ("KAKUREMICHI_TOKEN".to_owned(), "secret".to_owned()),
        ];
        let env = session_env(host.into_iter(), Some(dir.path()), &req);
        assert_eq!(env["A"], "default");
        assert_eq!(env["B"], "role");
        assert_eq!(env["C"], "quoted value");
        assert_eq!(env["D"], "request");
        assert_eq!(env["PATH"], "/usr/bin");
        assert!(!env.contains_key("KAKUREMICHI_TOKEN"));
        assert_eq!(
            env["KAKUREMICHI_SESSION_ID"],
            Uuid::from_u128(7).to_string()
        );
        // Values never show in Debug.
        let shown = format!("{req:?}");
        assert!(
            shown.contains("\"D\"") && !shown.contains("request"),
            "{shown}"
        );
    }
}
