//! Agent sessions on one agent's session host, with the fake coder/agentapi server as the
//! session command: sessions start on free ports in their own folders and process groups with the
//! merged environment, become active when their agent answers, take and answer messages, and end
//! with nothing of their process group left behind; bad commands, a full port range and bad
//! requests fail clearly without disturbing the rest.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use kakuremichi_agent::sessions::{
    HostConfig, HostError, Limits, Phase, SessionHost, SessionInfo, StartError, StartRequest,
};
use kakuremichi_e2e::{bin, wait_for};
use serde_json::Value;
use uuid::Uuid;

/// Ports per test process, in blocks from 20000: below the kernel's ephemeral range (where the
/// other tests' free ports come from).
const BLOCK: u16 = 64;

/// The first of `n` ports for a host. Each test process owns a block of its own, claimed with a
/// lock file that the kernel releases when the process ends, so two tests running at once never
/// share a port; calls in one process take the block's ports in turn.
fn ports(n: u16) -> u16 {
    static BLOCK_START: std::sync::OnceLock<(u16, std::fs::File)> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let (start, _lock) = BLOCK_START.get_or_init(|| {
        let blocks = (32_768 - 20_000) / BLOCK;
        let first = (std::process::id() as u16) % blocks;
        (0..blocks)
            .map(|i| (first + i) % blocks)
            .find_map(|k| {
                let path = std::env::temp_dir().join(format!("kakuremichi-session-ports-{k}.lock"));
                let file = std::fs::File::create(path).ok()?;
                file.try_lock().ok()?;
                Some((20_000 + k * BLOCK, file))
            })
            .expect("a free block of session ports")
    });
    let offset = NEXT.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    assert!(
        offset + n <= BLOCK,
        "this test process asks for more than {BLOCK} ports"
    );
    start + offset
}

/// Kills, when dropped (at a test's end, after a panic too), every process working under a
/// folder. Sessions outlive an agent that is killed (by design: the next agent resumes them), so
/// without this a test's sessions would outlive it and hold ports of its block, which the next
/// test process to claim that block would find taken.
struct KillUnder(std::path::PathBuf);

impl KillUnder {
    fn new(dir: &Path) -> KillUnder {
        KillUnder(dir.canonicalize().unwrap_or_else(|_| dir.to_owned()))
    }
}

impl Drop for KillUnder {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for pid in entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
            let under = std::fs::read_link(format!("/proc/{pid}/cwd"))
                .is_ok_and(|cwd| cwd.starts_with(&self.0));
            if under && pid != std::process::id() as i32 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

fn host(dir: &Path, extra: &[&str], ports_n: u16) -> (SessionHost, u16) {
    let fake = bin("kakuremichi-fake-agentapi").unwrap();
    let mut command = vec![
        fake.display().to_string(),
        "server".into(),
        "--port".into(),
        "{port}".into(),
    ];
    command.extend(extra.iter().map(|s| (*s).to_owned()));
    command.extend(["--".into(), "fake-claude".into()]);
    let first = ports(ports_n);
    let config = HostConfig {
        command,
        work_dir: dir.join("sessions"),
        env_dir: Some(dir.join("env")),
        startup_script: None,
        run_as: None,
        resume_command: None,
        resume_max_age: kakuremichi_agent::sessions::DEFAULT_RESUME_MAX_AGE,
        rlimits: kakuremichi_agent::sessions::SessionLimits {
            memory_bytes: Some(4 << 30),
            cpu_secs: Some(3600),
            processes: None,
        },
        labels: BTreeMap::new(),
        limits: Limits {
            first_port: first,
            ports: ports_n,
            start_timeout: Duration::from_secs(10),
            // Long, so that a stop that waits out the grace (a server kept from its graceful
            // exit) shows; a stop that works takes milliseconds.
            grace: Duration::from_secs(10),
            probe_every: Duration::from_millis(20),
            ..Limits::default()
        },
    };
    (SessionHost::spawn(config), first)
}

/// Starts a session with a new id and nothing else asked.
async fn start_plain(host: &SessionHost) -> Result<Uuid, HostError> {
    let id = Uuid::new_v4();
    host.start(StartRequest {
        id,
        ..Default::default()
    })
    .await
    .map(|_| id)
}

async fn until_phase(host: &SessionHost, id: Uuid, want: Phase) -> SessionInfo {
    wait_for(
        &format!("session {id} to be {want:?}"),
        Duration::from_secs(15),
        || async { Ok(host.get(id).await.filter(|s| s.view.phase == want)) },
    )
    .await
    .unwrap()
}

/// Live (not zombie) processes whose process group is `pgid`.
fn group_members(pgid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let mut rest = stat[stat.rfind(')')? + 2..].split(' ');
            let state = rest.next()?;
            let pgrp: u32 = rest.nth(1)?.parse().ok()?;
            (pgrp == pgid && state != "Z").then_some(pid)
        })
        .collect()
}

fn get(port: u16, path: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .header("host", "localhost")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_starts_with_its_environment_answers_messages_and_ends_with_its_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    let _reaper = KillUnder::new(dir.path());
    std::fs::create_dir_all(dir.path().join("env")).unwrap();
    std::fs::write(dir.path().join("env/default.env"), "A=default\nB=default\n").unwrap();
    std::fs::write(dir.path().join("env/dev.env"), "B=role\nC=role\n").unwrap();
    let (host, _) = host(dir.path(), &["--spawn-child"], 8);
    let mut changes = host.changes();

    let id = Uuid::new_v4();
    let started = host
        .start(StartRequest {
            id,
            role: Some("dev".into()),
            env: BTreeMap::from([("C".into(), "request".into())]),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(matches!(
        started.view.phase,
        Phase::Creating | Phase::Starting
    ));
    let active = until_phase(&host, id, Phase::Active).await;
    let (port, pgid) = (active.view.port, active.pid.unwrap());
    // Its resource limits hold (prlimit set them, then ran the command in its place).
    let limits = std::fs::read_to_string(format!("/proc/{pgid}/limits")).unwrap();
    let line = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap()
    };
    assert!(
        line("Max address space").contains("4294967296 4294967296"),
        "{limits}"
    );
    assert!(line("Max cpu time").contains("3600 3600"), "{limits}");
    assert_eq!(active.view.agent_status.as_deref(), Some("stable"));
    // Each phase was announced.
    let mut seen = Vec::new();
    while let Ok(c) = changes.try_recv() {
        seen.push(c.view.phase);
    }
    assert_eq!(seen, [Phase::Creating, Phase::Starting, Phase::Active]);

    // host < default.env < dev.env < request; the agent's own settings stay out.
    for (name, want) in [("A", "default"), ("B", "role"), ("C", "request")] {
        let v = get(port, &format!("/_test/env/{name}"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(v, want, "{name}");
    }
    let id_seen = get(port, "/_test/env/KAKUREMICHI_SESSION_ID")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(id_seen, id.to_string());
    let cwd = get(port, "/_test/cwd")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(Path::new(&cwd), active.dir.as_path());
    // Like agentapi, it refuses a Host it does not know: whoever forwards must rewrite it.
    let wrong = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/status"))
        .header("host", "session.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 400);

    // A message, and the fake agent's answer.
    let sent: Value = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/message"))
        .header("host", "localhost")
        .json(&serde_json::json!({"content": "hello", "type": "user"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(sent["ok"], true);
    let messages = wait_for("the agent's answer", Duration::from_secs(5), || async {
        let m: Value = get(port, "/messages").send().await?.json().await?;
        let all = m["messages"].as_array().cloned().unwrap_or_default();
        Ok((all.len() == 3).then_some(all))
    })
    .await
    .unwrap();
    assert_eq!(messages[1]["role"], "user");
    assert_eq!(messages[2]["content"], "echo: hello");

    // Its group holds the server and the child it started; ending the session ends both.
    assert!(group_members(pgid).len() >= 2, "{:?}", group_members(pgid));
    let asked = Instant::now();
    host.stop(id).await.unwrap();
    let stopped = until_phase(&host, id, Phase::Stopped).await;
    assert_eq!(stopped.pid, None);
    // SIGTERM ended it: the agent let go of its `/events` stream, which would otherwise hold
    // the server's graceful exit until SIGKILL at the end of the 10 s grace.
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "the stop took {:?}",
        asked.elapsed()
    );
    wait_for("the group to be gone", Duration::from_secs(5), || async {
        Ok(group_members(pgid).is_empty().then_some(()))
    })
    .await
    .unwrap();
    assert!(std::fs::read_to_string(active.dir.join("session.log")).is_ok());
    assert_eq!(host.stop(Uuid::new_v4()).await, Err(HostError::NotFound));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_commands_a_full_port_range_and_bad_requests_fail_clearly_and_disturb_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let _reaper = KillUnder::new(dir.path());
    let (ok_host, _) = host(dir.path(), &[], 2);
    let (dying, _) = host(dir.path(), &["--exit-at-once"], 2);

    // A command that exits at once.
    let id = start_plain(&dying).await.unwrap();
    let failed = until_phase(&dying, id, Phase::Failed).await;
    assert_eq!(
        failed.view.reason.as_deref(),
        Some("the session command exited (status 3) before its agent answered")
    );
    let log = std::fs::read_to_string(failed.dir.join("session.log")).unwrap();
    assert!(log.contains("exiting at once"), "{log}");

    // A command that does not exist.
    let mut missing = HostConfig::new("/nonexistent/agentapi server --port {port}", dir.path());
    missing.limits.first_port = ports(1);
    let missing = SessionHost::spawn(missing);
    let id = start_plain(&missing).await.unwrap();
    let failed = until_phase(&missing, id, Phase::Failed).await;
    assert!(
        failed
            .view
            .reason
            .as_deref()
            .unwrap()
            .starts_with("cannot start /nonexistent/agentapi:"),
        "{failed:?}"
    );

    // Two ports: two sessions, and the third is refused with the range named.
    let a = start_plain(&ok_host).await.unwrap();
    let b = start_plain(&ok_host).await.unwrap();
    let third = start_plain(&ok_host).await.unwrap_err();
    assert!(
        matches!(third, HostError::Start(StartError::NoFreePort { .. })),
        "{third:?}"
    );
    assert!(
        third.to_string().starts_with("no free port left in "),
        "{third}"
    );
    // Bad requests.
    let bad_role = ok_host
        .start(StartRequest {
            id: Uuid::new_v4(),
            role: Some("../../etc/passwd".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(bad_role, HostError::Invalid(_)), "{bad_role}");
    let bad_env = ok_host
        .start(StartRequest {
            id: Uuid::new_v4(),
            env: BTreeMap::from([("A=B".into(), "x".into())]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(bad_env, HostError::Invalid(_)), "{bad_env}");
    // None of that disturbed the two.
    for id in [a, b] {
        let s = until_phase(&ok_host, id, Phase::Active).await;
        let st: Value = get(s.view.port, "/status")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(st["status"], "stable");
    }
    ok_host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sessions_at_once_and_a_start_up_script_then_a_shutdown_ends_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let _reaper = KillUnder::new(dir.path());
    let fake = bin("kakuremichi-fake-agentapi").unwrap();
    let mut config = HostConfig::new(
        &format!(
            "{} server --port {{port}} --spawn-child -- fake",
            fake.display()
        ),
        dir.path(),
    );
    config.startup_script = Some("echo cloned > repo.txt".into());
    config.limits.first_port = ports(40);
    config.limits.ports = 40;
    config.limits.grace = Duration::from_secs(2);
    config.limits.probe_every = Duration::from_millis(20);
    let host = SessionHost::spawn(config);
    let ids: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    let starts = ids.iter().map(|id| {
        host.start(StartRequest {
            id: *id,
            ..Default::default()
        })
    });
    for r in futures_util::future::join_all(starts).await {
        r.unwrap();
    }
    let mut groups = Vec::new();
    for id in &ids {
        let s = until_phase(&host, *id, Phase::Active).await;
        assert_eq!(
            std::fs::read_to_string(s.dir.join("repo.txt")).unwrap(),
            "cloned\n"
        );
        groups.push(s.pid.unwrap());
    }
    let taken: std::collections::BTreeSet<u16> =
        host.list().await.iter().map(|s| s.view.port).collect();
    assert_eq!(taken.len(), 20, "a port each");

    host.shutdown().await;
    // Signals are delivered at once, deaths a moment later.
    wait_for("every group to be gone", Duration::from_secs(5), || async {
        Ok(groups
            .iter()
            .all(|g| group_members(*g).is_empty())
            .then_some(()))
    })
    .await
    .unwrap();

    // A start-up script that fails fails its session, with its status.
    let mut config = HostConfig::new(
        &format!("{} server --port {{port}}", fake.display()),
        dir.path(),
    );
    config.startup_script = Some("exit 7".into());
    config.limits.first_port = ports(1);
    let host = SessionHost::spawn(config);
    let id = start_plain(&host).await.unwrap();
    let failed = until_phase(&host, id, Phase::Failed).await;
    assert_eq!(
        failed.view.reason.as_deref(),
        Some("the session command exited (status 7) before its agent answered")
    );
}

fn agent_snapshot(
    version: u64,
    sessions: Vec<kakuremichi_proto::SessionSpec>,
) -> kakuremichi_proto::ConfigSnapshot {
    kakuremichi_proto::ConfigSnapshot {
        version,
        node_id: Uuid::from_u128(9),
        kind: kakuremichi_proto::NodeKind::Agent,
        overlay: kakuremichi_proto::OverlayConfig {
            address: std::net::Ipv4Addr::new(100, 64, 0, 9),
            prefix_len: 10,
            mtu: 1420,
        },
        peers: vec![],
        routes: vec![],
        targets: vec![],
        certificates: vec![],
        acme_challenges: vec![],
        identity: None,
        sessions,
        sessions_endpoint: None,
    }
}

/// The agent runs the sessions its config lists: a new one starts (once: an ended one is not
/// started again while listed), one that leaves the list ends, its status report tells control,
/// a start it refuses is reported failed, and stopping the agent ends every session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_runs_the_sessions_its_config_lists_and_reports_them() {
    use kakuremichi_agent::{Agent, AgentOptions};
    use kakuremichi_proto::{SessionPhase, SessionSpec};

    let dir = tempfile::tempdir().unwrap();
    let _reaper = KillUnder::new(dir.path());
    let fake = bin("kakuremichi-fake-agentapi").unwrap();
    let mut sessions = HostConfig::new(
        &format!("{} server --port {{port}} -- fake", fake.display()),
        dir.path().join("sessions"),
    );
    sessions.limits.first_port = ports(2);
    sessions.limits.ports = 2;
    sessions.limits.probe_every = Duration::from_millis(20);
    sessions.limits.grace = Duration::from_secs(2);
    let agent = Agent::new(AgentOptions {
        data_dir: dir.path().join("agent"),
        wg_listen: "127.0.0.1:0".parse().unwrap(),
        private_key: [7; 32],
        quic: Default::default(),
        sessions: Some(sessions),
        fallback: None,
    });
    let spec = |id: Uuid| SessionSpec {
        id,
        role: None,
        env: BTreeMap::from([("TOKEN".to_owned(), kakuremichi_proto::Secret::new("s3cret"))]),
        ttl_secs: None,
        initial_message: None,
        oneshot: false,
    };
    let state_of = |id: Uuid| agent.status().sessions.into_iter().find(|s| s.id == id);
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    agent
        .apply(agent_snapshot(1, vec![spec(a), spec(b)]), false)
        .await
        .unwrap();
    let mut ports_seen = Vec::new();
    for id in [a, b] {
        let s = wait_for("an active session", Duration::from_secs(10), || async {
            Ok(state_of(id).filter(|s| s.phase == SessionPhase::Active))
        })
        .await
        .unwrap();
        ports_seen.push(s.port);
        let token = get(s.port, "/_test/env/TOKEN")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(token, "s3cret");
    }
    // The same list again (a new version): nothing restarts. A third one: no port left, reported.
    let c = Uuid::new_v4();
    agent
        .apply(agent_snapshot(2, vec![spec(a), spec(b), spec(c)]), false)
        .await
        .unwrap();
    let refused = state_of(c).unwrap();
    assert_eq!(refused.phase, SessionPhase::Failed);
    assert!(
        refused
            .reason
            .as_deref()
            .unwrap()
            .starts_with("no free port left in "),
        "{refused:?}"
    );
    let host = agent.session_host().unwrap();
    assert_eq!(host.list().await.len(), 2, "nothing started twice");
    // b leaves the list: it ends; a keeps running.
    agent
        .apply(agent_snapshot(3, vec![spec(a)]), false)
        .await
        .unwrap();
    wait_for("b to stop", Duration::from_secs(10), || async {
        Ok(state_of(b).filter(|s| s.phase == SessionPhase::Stopped))
    })
    .await
    .unwrap();
    assert_eq!(state_of(a).unwrap().phase, SessionPhase::Active);
    assert!(
        state_of(c).is_none(),
        "no longer listed, no longer reported"
    );
    // Listed again after it ended: not started again (the host still knows it; control removes
    // ended sessions from the list and never reuses an id).
    agent
        .apply(agent_snapshot(4, vec![spec(a), spec(b)]), false)
        .await
        .unwrap();
    assert_eq!(state_of(b).unwrap().phase, SessionPhase::Stopped);
    // The agent stops: every session ends.
    let pid = host.get(a).await.unwrap().pid.unwrap();
    agent.stop_sessions().await;
    wait_for("the group to be gone", Duration::from_secs(5), || async {
        Ok(group_members(pid).is_empty().then_some(()))
    })
    .await
    .unwrap();
    assert!(agent.status().sessions.iter().all(|s| s.phase.ended()));
}

// ------------------------------------------------------------ through control and a gateway

const SESSIONS_HOST: &str = "agents.localhost";

/// A stack whose control serves the sessions endpoint at [`SESSIONS_HOST`] and whose agent runs
/// the fake agentapi as its session command, on `n` ports of this process's block.
async fn sessions_stack(n: u16) -> SessionsStack {
    sessions_stack_with(n, &[]).await
}

/// A stack and the reaper of its sessions (dropped first, while the stack's folder is there).
struct SessionsStack {
    _reaper: KillUnder,
    stack: kakuremichi_e2e::Stack,
}

impl std::ops::Deref for SessionsStack {
    type Target = kakuremichi_e2e::Stack;
    fn deref(&self) -> &kakuremichi_e2e::Stack {
        &self.stack
    }
}

impl std::ops::DerefMut for SessionsStack {
    fn deref_mut(&mut self) -> &mut kakuremichi_e2e::Stack {
        &mut self.stack
    }
}

/// [`sessions_stack`] with more agent arguments.
async fn sessions_stack_with(n: u16, more: &[String]) -> SessionsStack {
    let fake = bin("kakuremichi-fake-agentapi").unwrap();
    let first = ports(n);
    let mut opts = kakuremichi_e2e::StackOptions::loopback();
    opts.control_args = vec!["--sessions-hostname".into(), SESSIONS_HOST.into()];
    opts.agent_args = vec![
        "--session-command".into(),
        format!(
            "{} server --port {{port}} --reply-delay-ms 20 -- fake-claude",
            fake.display()
        ),
        "--session-ports".into(),
        format!("{first}-{}", first + n - 1),
    ];
    opts.agent_args.extend(more.iter().cloned());
    let stack = kakuremichi_e2e::Stack::start_with(opts).await.unwrap();
    SessionsStack {
        _reaper: KillUnder::new(stack.dir.path()),
        stack,
    }
}

/// A member with a personal API key holding every session permission; returns (user id, key).
async fn member_key(stack: &kakuremichi_e2e::Stack, email: &str) -> (String, String) {
    user_key(stack, email, &["member"]).await
}

/// A user with `roles` and a personal API key holding every session permission.
async fn user_key(stack: &kakuremichi_e2e::Stack, email: &str, roles: &[&str]) -> (String, String) {
    let (status, user) = stack
        .api
        .call(
            reqwest::Method::POST,
            "/api/v1/users",
            Some(serde_json::json!({"email": email, "password": "correct horse battery", "roles": roles})),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{user}");
    let id = user["id"].as_str().unwrap().to_owned();
    let (status, key) = stack
        .api
        .call(
            reqwest::Method::POST,
            "/api/v1/api-keys",
            Some(serde_json::json!({
                "name": "sessions",
                "user_id": id,
                "scopes": ["session:create", "session:list", "session:access", "session:delete"],
            })),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{key}");
    (id, key["secret"].as_str().unwrap().to_owned())
}

/// A request to the sessions hostname on the gateway, with `X-API-Key` when a key is given.
fn at_gateway(
    stack: &kakuremichi_e2e::Stack,
    method: reqwest::Method,
    path: &str,
    key: Option<&str>,
) -> reqwest::RequestBuilder {
    let r = stack.request_builder(method, SESSIONS_HOST, path);
    match key {
        Some(k) => r.header("x-api-key", k),
        None => r,
    }
}

async fn json_of(r: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Waits until the session shows `status` in `/search` (by its owner's key, at the gateway).
async fn until_status(stack: &kakuremichi_e2e::Stack, key: &str, id: &str, status: &str) {
    wait_for(
        &format!("session {id} to be {status}"),
        Duration::from_secs(20),
        || async {
            let (code, body) = json_of(at_gateway(
                stack,
                reqwest::Method::GET,
                &format!("/search?status={status}"),
                Some(key),
            ))
            .await;
            assert_eq!(code, 200, "{body}");
            Ok(body["sessions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["session_id"] == id)
                .then_some(()))
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agentapi_proxy_clients_work_unchanged_through_a_gateway_and_users_stay_apart() {
    let stack = sessions_stack(8).await;
    let (ann_id, ann) = member_key(&stack, "ann@example.com").await;
    let (_bob, bob) = member_key(&stack, "bob@example.com").await;
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;
    let delete = reqwest::Method::DELETE;

    // Health, without a key.
    let (code, body) = json_of(at_gateway(&stack, get.clone(), "/health", None)).await;
    assert_eq!((code, body["status"].as_str()), (200, Some("ok")));
    // agentapi-proxy's curl example: start with environment, tags and a first message.
    let (code, body) = json_of(at_gateway(&stack, post.clone(), "/start", Some(&ann)).json(
        &serde_json::json!({
            "environment": {"GITHUB_TOKEN": "ghp_secret"},
            "tags": {"repository": "org/repo", "branch": "main"},
            "params": {"message": "hello", "session_ttl": "1h"},
        }),
    ))
    .await;
    assert_eq!(code, 200, "{body}");
    let id = body["session_id"].as_str().unwrap().to_owned();
    until_status(&stack, &ann, &id, "active").await;
    // Search by tag; bob sees nothing of ann's.
    let (code, body) = json_of(at_gateway(
        &stack,
        get.clone(),
        "/search?tag.repository=org/repo",
        Some(&ann),
    ))
    .await;
    assert_eq!(code, 200);
    let found = &body["sessions"][0];
    assert_eq!(found["session_id"], id.as_str());
    assert_eq!(found["tags"]["branch"], "main");
    assert_eq!(found["scope"], "user");
    assert!(found["started_at"].as_str().unwrap().ends_with('Z'));
    let (_, body) = json_of(at_gateway(&stack, get.clone(), "/search", Some(&bob))).await;
    assert_eq!(body["sessions"].as_array().unwrap().len(), 0, "{body}");

    // The session's own agentapi, reached through the tunnel, the prefix stripped. The
    // gateway gets ann's key within a config push.
    wait_for(
        "the gateway to route ann's session",
        Duration::from_secs(10),
        || async {
            let r = at_gateway(&stack, get.clone(), &format!("/{id}/status"), Some(&ann))
                .send()
                .await?;
            Ok((r.status() == 200).then_some(()))
        },
    )
    .await
    .unwrap();
    // The first message (params.message) reached the agent once it was stable.
    wait_for(
        "the first message's answer",
        Duration::from_secs(10),
        || async {
            let (_, body) = json_of(at_gateway(
                &stack,
                get.clone(),
                &format!("/{id}/messages"),
                Some(&ann),
            ))
            .await;
            let answered = body["messages"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["content"] == "echo: hello"));
            // The fake adds its answer, then becomes stable: a moment apart.
            let (_, status) = json_of(at_gateway(
                &stack,
                get.clone(),
                &format!("/{id}/status"),
                Some(&ann),
            ))
            .await;
            Ok((answered && status["status"] == "stable").then_some(()))
        },
    )
    .await
    .unwrap();
    let (code, body) = json_of(at_gateway(
        &stack,
        get.clone(),
        &format!("/{id}/status"),
        Some(&ann),
    ))
    .await;
    assert_eq!(
        (code, body["status"].as_str()),
        (200, Some("stable")),
        "{body}"
    );
    // The request's environment reached the process.
    let r = at_gateway(
        &stack,
        get.clone(),
        &format!("/{id}/_test/env/GITHUB_TOKEN"),
        Some(&ann),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.text().await.unwrap(), "ghp_secret");
    // Send a message with Bearer auth (the Go client's way), read the answer.
    let (code, body) = json_of(
        stack
            .request_builder(post.clone(), SESSIONS_HOST, &format!("/{id}/message"))
            .bearer_auth(&ann)
            .json(&serde_json::json!({"content": "ping", "type": "user"})),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    wait_for(
        "the fake agent's answer",
        Duration::from_secs(10),
        || async {
            let (_, body) = json_of(at_gateway(
                &stack,
                get.clone(),
                &format!("/{id}/messages"),
                Some(&ann),
            ))
            .await;
            Ok(body["messages"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["content"] == "echo: ping"))
                .then_some(()))
        },
    )
    .await
    .unwrap();
    // Its output, from its agent (never through a share link).
    let r = at_gateway(
        &stack,
        get.clone(),
        &format!("/{id}/.kakuremichi/log"),
        Some(&ann),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    // Events stream at once (SSE passed through unbuffered).
    let mut events = at_gateway(&stack, get.clone(), &format!("/{id}/events"), Some(&ann))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    let first = tokio::time::timeout(Duration::from_secs(5), events.chunk())
        .await
        .expect("an event at once")
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&first).contains("data:"),
        "{first:?}"
    );
    drop(events);

    // Bob cannot see, reach or delete it; nobody without a key reaches it.
    for (method, path) in [
        (get.clone(), format!("/{id}/status")),
        (post.clone(), format!("/{id}/message")),
    ] {
        let (code, body) = json_of(at_gateway(&stack, method, &path, Some(&bob))).await;
        assert_eq!(
            (code, body["message"].as_str()),
            (404, Some("Session not found")),
            "{path}"
        );
    }
    let (code, _) = json_of(at_gateway(
        &stack,
        get.clone(),
        &format!("/{id}/status"),
        None,
    ))
    .await;
    assert_eq!(code, 401);
    let (code, _) = json_of(at_gateway(
        &stack,
        delete.clone(),
        &format!("/sessions/{id}"),
        Some(&bob),
    ))
    .await;
    assert_eq!(code, 404);
    // An unknown session id.
    let (code, body) = json_of(at_gateway(
        &stack,
        get.clone(),
        &format!("/{}/status", Uuid::new_v4()),
        Some(&ann),
    ))
    .await;
    assert_eq!(
        (code, body["message"].as_str()),
        (404, Some("Session not found"))
    );

    // A share link: read-only without a key, and it stops when revoked or expired.
    let (code, share) = json_of(at_gateway(
        &stack,
        post.clone(),
        &format!("/sessions/{id}/share"),
        Some(&ann),
    ))
    .await;
    assert_eq!(code, 201, "{share}");
    let token = share["token"].as_str().unwrap().to_owned();
    assert_eq!(share["share_url"], format!("/s/{token}/"));
    let (code, _) = json_of(at_gateway(
        &stack,
        post.clone(),
        &format!("/sessions/{id}/share"),
        Some(&bob),
    ))
    .await;
    assert_eq!(code, 404);
    wait_for(
        "the share link to work",
        Duration::from_secs(10),
        || async {
            let r = at_gateway(&stack, get.clone(), &format!("/s/{token}/messages"), None)
                .send()
                .await?;
            Ok((r.status() == 200).then_some(()))
        },
    )
    .await
    .unwrap();
    let (code, body) = json_of(
        at_gateway(&stack, post.clone(), &format!("/s/{token}/message"), None)
            .json(&serde_json::json!({"content": "rm -rf", "type": "user"})),
    )
    .await;
    assert_eq!(
        (code, body["message"].as_str()),
        (403, Some("Shared sessions are read-only"))
    );
    let (code, _) = json_of(at_gateway(
        &stack,
        delete.clone(),
        &format!("/sessions/{id}/share"),
        Some(&ann),
    ))
    .await;
    assert_eq!(code, 200);
    wait_for(
        "the revoked link to stop",
        Duration::from_secs(10),
        || async {
            let r = at_gateway(&stack, get.clone(), &format!("/s/{token}/messages"), None)
                .send()
                .await?;
            Ok((r.status() == 404).then_some(()))
        },
    )
    .await
    .unwrap();
    let (code, share) = json_of(at_gateway(
        &stack,
        post.clone(),
        &format!("/sessions/{id}/share?expires_in=2"),
        Some(&ann),
    ))
    .await;
    assert_eq!(code, 201, "{share}");
    let token = share["token"].as_str().unwrap().to_owned();
    wait_for(
        "the expiring link to work",
        Duration::from_secs(10),
        || async {
            let r = at_gateway(&stack, get.clone(), &format!("/s/{token}/status"), None)
                .send()
                .await?;
            Ok((r.status() == 200).then_some(()))
        },
    )
    .await
    .unwrap();
    wait_for("the link to expire", Duration::from_secs(10), || async {
        let (code, body) = json_of(at_gateway(
            &stack,
            get.clone(),
            &format!("/s/{token}/status"),
            None,
        ))
        .await;
        Ok((code == 410 && body["message"] == "Share link has expired").then_some(()))
    })
    .await
    .unwrap();

    // Bad input: a bad body, a bad TTL, a team session without a team, an unknown or offline
    // site: each a clear error, nothing started.
    for (body, want) in [
        (serde_json::json!({"nonsense": 1}), 400),
        (
            serde_json::json!({"params": {"session_ttl": "forever"}}),
            400,
        ),
        (serde_json::json!({"scope": "team"}), 400),
        (serde_json::json!({"scope": "team", "team_id": "ops"}), 403),
        (serde_json::json!({"environment": {"BAD NAME": "x"}}), 400),
        (serde_json::json!({"site": "nowhere"}), 404),
    ] {
        let (code, answer) =
            json_of(at_gateway(&stack, post.clone(), "/start", Some(&ann)).json(&body)).await;
        assert_eq!(code, want, "{body} -> {answer}");
        assert!(
            answer["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{answer}"
        );
    }
    stack.api.create_site("cold").await.unwrap();
    let (code, answer) = json_of(
        at_gateway(&stack, post.clone(), "/start", Some(&ann))
            .json(&serde_json::json!({"site": "cold"})),
    )
    .await;
    assert_eq!(code, 409, "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("offline"),
        "{answer}"
    );
    let (_, body) = json_of(at_gateway(&stack, get.clone(), "/search", Some(&ann))).await;
    assert_eq!(body["sessions"].as_array().unwrap().len(), 1, "{body}");

    // The status stream sees a new session start and become active.
    let mut stream = at_gateway(&stack, get.clone(), "/sessions/status/stream", Some(&ann))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let (code, body) = json_of(at_gateway(&stack, post.clone(), "/start", Some(&ann))).await;
    assert_eq!(code, 200, "{body}");
    let second = body["session_id"].as_str().unwrap().to_owned();
    let mut seen = String::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while !seen.contains(&format!(
            "{{\"session_id\":\"{second}\",\"status\":\"active\""
        )) {
            let chunk = stream.chunk().await.unwrap().expect("the stream goes on");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no active event for {second}: {seen}"));
    assert!(
        seen.contains(&format!(
            "\"session_id\":\"{second}\",\"status\":\"creating\""
        )),
        "{seen}"
    );
    drop(stream);

    // Delete: terminated at once, the gateway stops routing it, its process is gone.
    let port = until_port(&stack, &ann, &id).await;
    let (code, body) = json_of(at_gateway(
        &stack,
        delete.clone(),
        &format!("/sessions/{id}"),
        Some(&ann),
    ))
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "terminated");
    wait_for(
        "the deleted session to be unreachable",
        Duration::from_secs(10),
        || async {
            let r = at_gateway(&stack, get.clone(), &format!("/{id}/status"), Some(&ann))
                .send()
                .await?;
            Ok((r.status() == 404).then_some(()))
        },
    )
    .await
    .unwrap();
    wait_for(
        "the session's process to end",
        Duration::from_secs(10),
        || async {
            Ok(std::net::TcpStream::connect(("127.0.0.1", port))
                .is_err()
                .then_some(()))
        },
    )
    .await
    .unwrap();
    let (_, body) = json_of(at_gateway(
        &stack,
        get.clone(),
        "/search?status=stopped",
        Some(&ann),
    ))
    .await;
    assert!(
        body["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["session_id"] == id.as_str()),
        "{body}"
    );
    // Every access is in the audit log: the owner's requests and the share link's, counted.
    wait_for(
        "session accesses in the audit log",
        Duration::from_secs(20),
        || async {
            let log = stack
                .api
                .get("/api/v1/audit?action=session_access&limit=1000")
                .await?;
            let lines = log.as_array().cloned().unwrap_or_default();
            let by = |actor: &str| {
                lines.iter().any(|l| {
                    l["target"] == id.as_str()
                        && l["actor"].as_str().is_some_and(|a| a.starts_with(actor))
                })
            };
            Ok((by(&format!("user:{ann_id}")) && by("share-link")).then_some(()))
        },
    )
    .await
    .unwrap();
    // The environment is sealed at rest: the secret is nowhere in control's database.
    let mut files = 0;
    for entry in std::fs::read_dir(stack.dir.path().join("control")).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("control.db"))
        {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(10).any(|w| w == b"ghp_secret"),
                "{}",
                path.display()
            );
            files += 1;
        }
    }
    assert!(files >= 1);
    // Nor in any log.
    assert!(!stack.logs_full().contains("ghp_secret"));
}

/// The agent's loopback port of a session, once its agent has reported it (`/search`).
async fn until_port(stack: &kakuremichi_e2e::Stack, key: &str, id: &str) -> u16 {
    wait_for("the session's port", Duration::from_secs(10), || async {
        let (_, body) = json_of(at_gateway(
            stack,
            reqwest::Method::GET,
            "/search",
            Some(key),
        ))
        .await;
        Ok(body["sessions"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["session_id"] == id))
            .and_then(|s| s["port"].as_u64())
            .filter(|p| *p > 0)
            .map(|p| p as u16))
    })
    .await
    .unwrap()
}

/// Reads an SSE response until `want` shows; the time it took.
async fn until_in_stream(resp: &mut reqwest::Response, seen: &mut String, want: &str) -> Duration {
    let t = std::time::Instant::now();
    while !seen.contains(want) {
        let chunk = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
            .await
            .unwrap_or_else(|_| panic!("no {want} in {seen}"))
            .unwrap()
            .expect("the stream goes on");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sessions_on_one_agent_stream_each_event_through_the_gateway_within_100ms() {
    const N: usize = 20;
    let stack = sessions_stack(N as u16 + 4).await;
    let (_, key) = member_key(&stack, "ann@example.com").await;
    let mut ids = Vec::new();
    for _ in 0..N {
        let (code, body) = json_of(at_gateway(
            &stack,
            reqwest::Method::POST,
            "/start",
            Some(&key),
        ))
        .await;
        assert_eq!(code, 200, "{body}");
        ids.push(body["session_id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        until_status(&stack, &key, id, "active").await;
    }
    wait_for(
        "the gateway to route the sessions",
        Duration::from_secs(10),
        || async {
            let r = at_gateway(
                &stack,
                reqwest::Method::GET,
                &format!("/{}/status", ids[N - 1]),
                Some(&key),
            )
            .send()
            .await?;
            Ok((r.status() == 200).then_some(()))
        },
    )
    .await
    .unwrap();
    // Every session's event stream open at once through the gateway.
    let mut streams = Vec::new();
    for id in &ids {
        let mut resp = at_gateway(
            &stack,
            reqwest::Method::GET,
            &format!("/{id}/events"),
            Some(&key),
        )
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
        assert_eq!(resp.status(), 200);
        let mut seen = String::new();
        until_in_stream(&mut resp, &mut seen, "status_change").await;
        streams.push((id.clone(), resp, seen));
    }
    // A message to each, all at once: its event reaches the client within 100 ms of sending.
    let stack = &stack;
    let key = &key;
    let latencies = futures_util::future::join_all(streams.into_iter().enumerate().map(
        |(i, (id, mut resp, mut seen))| async move {
            let content = format!("message-{i}");
            let sent = std::time::Instant::now();
            let post = at_gateway(
                stack,
                reqwest::Method::POST,
                &format!("/{id}/message"),
                Some(key),
            )
            .json(&serde_json::json!({"content": content, "type": "user"}))
            .send();
            let want = format!("\"message\":\"{content}\"");
            let (answer, _) = tokio::join!(post, until_in_stream(&mut resp, &mut seen, &want));
            let latency = sent.elapsed();
            assert_eq!(answer.unwrap().status(), 200);
            // The answer streams too.
            until_in_stream(&mut resp, &mut seen, &format!("echo: {content}")).await;
            latency
        },
    ))
    .await;
    let worst = latencies.iter().max().unwrap();
    println!("20 sessions: worst event latency through the gateway {worst:?}");
    assert!(*worst < Duration::from_millis(100), "{latencies:?}");
}

async fn session_messages(stack: &kakuremichi_e2e::Stack, key: &str, id: &str) -> Vec<Value> {
    let (_, body) = json_of(at_gateway(
        stack,
        reqwest::Method::GET,
        &format!("/{id}/messages"),
        Some(key),
    ))
    .await;
    body["messages"].as_array().cloned().unwrap_or_default()
}

/// The processes whose working folder is `dir`.
fn working_in(dir: &Path) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c == dir))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_and_started_again_resumes_its_sessions_and_leaves_no_old_process() {
    let fake = bin("kakuremichi-fake-agentapi").unwrap();
    let resume = format!(
        "{} server --port {{port}} --type resumed --spawn-child -- fake-claude --continue",
        fake.display()
    );
    let mut stack = sessions_stack_with(
        6,
        &[
            "--session-resume-command".into(),
            resume,
            "--session-resume-max-age".into(),
            "1h".into(),
        ],
    )
    .await;
    let (_, key) = member_key(&stack, "ann@example.com").await;
    let (code, body) = json_of(
        at_gateway(&stack, reqwest::Method::POST, "/start", Some(&key))
            .json(&serde_json::json!({"params": {"message": "remember me"}})),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let id = body["session_id"].as_str().unwrap().to_owned();
    until_status(&stack, &key, &id, "active").await;
    wait_for("the first answer", Duration::from_secs(10), || async {
        Ok(session_messages(&stack, &key, &id)
            .await
            .iter()
            .any(|m| m["content"] == "echo: remember me")
            .then_some(()))
    })
    .await
    .unwrap();
    let dir = stack
        .dir
        .path()
        .join("agent")
        .join("sessions")
        .join(&id)
        .canonicalize()
        .unwrap();
    let before = working_in(&dir);
    assert!(!before.is_empty());

    // Killed: its session's process lives on, orphaned.
    stack.agent.kill();
    assert_eq!(working_in(&dir), before);
    stack.restart_agent().unwrap();
    // Back: the old process group ended, the session resumed with the resume command (in its
    // folder), active again, and its first message not sent twice.
    wait_for(
        "the session to be resumed",
        Duration::from_secs(30),
        || async {
            let r = at_gateway(
                &stack,
                reqwest::Method::GET,
                &format!("/{id}/status"),
                Some(&key),
            )
            .send()
            .await?;
            if r.status() != 200 {
                return Ok(None);
            }
            let v: Value = r.json().await?;
            Ok((v["agent_type"] == "resumed" && v["status"] == "stable").then_some(()))
        },
    )
    .await
    .unwrap();
    for pid in &before {
        // Gone, or a zombie its new parent has not reaped.
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = state.rsplit_once(')').map_or("", |(_, r)| r.trim_start());
        assert!(
            state.is_empty() || state.starts_with('Z'),
            "old process {pid} outlived the restart: {state}"
        );
    }
    let now = working_in(&dir);
    assert!(!now.is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !session_messages(&stack, &key, &id)
            .await
            .iter()
            .any(|m| m["content"] == "remember me"),
        "sent twice"
    );
    // Deleting it leaves no process of its group (the resumed one and its child) behind.
    let (code, _) = json_of(at_gateway(
        &stack,
        reqwest::Method::DELETE,
        &format!("/sessions/{id}"),
        Some(&key),
    ))
    .await;
    assert_eq!(code, 200);
    wait_for(
        "the session's processes to end",
        Duration::from_secs(15),
        || async { Ok(working_in(&dir).is_empty().then_some(())) },
    )
    .await
    .unwrap();
    until_status(&stack, &key, &id, "stopped").await;
    // Its folder is kept a while after the end, and goes at the agent's next start.
    assert!(dir.join("session.log").exists());
    stack.restart_agent().unwrap();
    wait_for(
        "the ended session's folder to go",
        Duration::from_secs(15),
        || async { Ok((!dir.exists()).then_some(())) },
    )
    .await
    .unwrap();
}

/// Runs `kakuremichi sessions <args>` against the stack's sessions hostname: its stdout, or
/// its stderr as the error.
fn cli(stack: &kakuremichi_e2e::Stack, key: &str, args: &[&str]) -> Result<String, String> {
    let mut command = cli_command(stack, key, args);
    let out = command.as_std_mut().output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `kakuremichi sessions <args>` aimed at the stack's sessions hostname with `key`.
fn cli_command(
    stack: &kakuremichi_e2e::Stack,
    key: &str,
    args: &[&str],
) -> tokio::process::Command {
    let gw = stack.opts.gateway_http_for_test;
    let mut c = tokio::process::Command::new(bin("kakuremichi").unwrap());
    c.arg("sessions")
        .args(args)
        .env(
            "KAKUREMICHI_ENDPOINT",
            format!("http://{SESSIONS_HOST}:{}", gw.port()),
        )
        .env("KAKUREMICHI_API_KEY", key)
        .env("KAKUREMICHI_CONNECT_TO", gw.to_string())
        .kill_on_drop(true);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_and_its_mcp_server_manage_sessions_through_a_gateway() {
    let stack = sessions_stack(6).await;
    let (_, key) = member_key(&stack, "ann@example.com").await;
    let id = cli(
        &stack,
        &key,
        &["start", "--tag", "repo=org/app", "--message", "hi"],
    )
    .unwrap();
    Uuid::parse_str(&id).unwrap();
    until_status(&stack, &key, &id, "active").await;
    let listed = cli(&stack, &key, &["search", "--tag", "repo=org/app", "--json"]).unwrap();
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed[0]["session_id"], id.as_str());
    wait_for("the first answer", Duration::from_secs(10), || async {
        Ok(session_messages(&stack, &key, &id)
            .await
            .iter()
            .any(|m| m["content"] == "echo: hi")
            .then_some(()))
    })
    .await
    .unwrap();
    let answer = cli(&stack, &key, &["send", &id, "second", "--wait"]).unwrap();
    assert_eq!(answer, "echo: second");
    // `tail` follows the events: the conversation so far comes first.
    let mut tail = cli_command(&stack, &key, &["tail", &id])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(tail.stdout.take().unwrap()));
    loop {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            line.starts_with("message_update: ") || line.starts_with("status_change: "),
            "{line}"
        );
        if line.contains("\"message\":\"hi\"") {
            break;
        }
    }
    tail.kill().await.unwrap();
    let link = cli(&stack, &key, &["open", &id]).unwrap();
    assert!(
        link.contains(&format!("{SESSIONS_HOST}:")) && link.contains("/s/kms_"),
        "{link}"
    );
    // Errors are clear and exit non-zero.
    let err = cli(&stack, &key, &["rm", &Uuid::new_v4().to_string()]).unwrap_err();
    assert!(
        err.contains("404") && err.contains("Session not found"),
        "{err}"
    );
    let err = cli(&stack, "kmk_bogus", &["search"]).unwrap_err();
    assert!(err.contains("401"), "{err}");

    // The MCP server: initialize, list the tools, use each.
    let mut mcp = cli_command(&stack, &key, &["mcp"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = mcp.stdin.take().unwrap();
    let mut out =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(mcp.stdout.take().unwrap()));
    let n = std::cell::Cell::new(0);
    let rpc = |method: &str, params: Value| {
        n.set(n.get() + 1);
        serde_json::json!({"jsonrpc": "2.0", "id": n.get(), "method": method, "params": params})
            .to_string()
            + "\n"
    };
    let mut ask = async |line: String| -> Value {
        tokio::io::AsyncWriteExt::write_all(&mut stdin, line.as_bytes())
            .await
            .unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), out.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        serde_json::from_str(&answer).unwrap()
    };
    let init = ask(rpc("initialize", serde_json::json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}))).await;
    assert_eq!(init["result"]["serverInfo"]["name"], "kakuremichi-sessions");
    let tools = ask(rpc("tools/list", serde_json::json!({}))).await;
    let names: Vec<&str> = tools["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "list_sessions",
            "create_session",
            "send_message",
            "get_messages",
            "delete_session"
        ]
    );
    let call = |name: &str, args: Value| {
        rpc(
            "tools/call",
            serde_json::json!({"name": name, "arguments": args}),
        )
    };
    let created = ask(call(
        "create_session",
        serde_json::json!({"tags": {"via": "mcp"}}),
    ))
    .await;
    let mcp_id = created["result"]["structuredContent"]["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    until_status(&stack, &key, &mcp_id, "active").await;
    wait_for(
        "the gateway to route the MCP session",
        Duration::from_secs(10),
        || async {
            let r = at_gateway(
                &stack,
                reqwest::Method::GET,
                &format!("/{mcp_id}/status"),
                Some(&key),
            )
            .send()
            .await?;
            Ok((r.status() == 200).then_some(()))
        },
    )
    .await
    .unwrap();
    let listed = ask(call(
        "list_sessions",
        serde_json::json!({"tags": {"via": "mcp"}}),
    ))
    .await;
    assert_eq!(
        listed["result"]["structuredContent"]["sessions"][0]["session_id"],
        mcp_id.as_str()
    );
    let sent = ask(call(
        "send_message",
        serde_json::json!({"session_id": mcp_id, "message": "from mcp"}),
    ))
    .await;
    assert_eq!(sent["result"]["isError"], false, "{sent}");
    let mut got = Value::Null;
    for _ in 0..50 {
        got = ask(call(
            "get_messages",
            serde_json::json!({"session_id": mcp_id}),
        ))
        .await;
        if got.to_string().contains("echo: from mcp") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(got.to_string().contains("echo: from mcp"), "{got}");
    let bad = ask(call(
        "send_message",
        serde_json::json!({"session_id": mcp_id}),
    ))
    .await;
    assert_eq!(bad["result"]["isError"], true);
    let deleted = ask(call(
        "delete_session",
        serde_json::json!({"session_id": mcp_id}),
    ))
    .await;
    assert_eq!(deleted["result"]["isError"], false, "{deleted}");
    let unknown = ask(rpc("nonsense", serde_json::json!({}))).await;
    assert_eq!(unknown["error"]["code"], -32601);
    until_status(&stack, &key, &mcp_id, "stopped").await;

    // The same tools over HTTP at the gateway's /mcp (streamable HTTP, JSON answers).
    let http_rpc = |key: Option<&str>, body: Value| {
        let r = at_gateway(&stack, reqwest::Method::POST, "/mcp", None)
            .header("accept", "application/json, text/event-stream")
            .json(&body);
        match key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    };
    let rpc_body = |id: u64, method: &str, params: Value| serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
    let r = http_rpc(None, rpc_body(1, "tools/list", serde_json::json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    let (code, init) = json_of(http_rpc(
        Some(&key),
        rpc_body(1, "initialize", serde_json::json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}})),
    ))
    .await;
    assert_eq!(code, 200, "{init}");
    assert_eq!(init["result"]["serverInfo"]["name"], "kakuremichi-sessions");
    let note = http_rpc(
        Some(&key),
        serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(note.status(), 202);
    let tool = |id: u64, name: &str, args: Value| {
        http_rpc(
            Some(&key),
            rpc_body(
                id,
                "tools/call",
                serde_json::json!({"name": name, "arguments": args}),
            ),
        )
    };
    let (_, created) = json_of(tool(
        2,
        "create_session",
        serde_json::json!({"tags": {"via": "http-mcp"}}),
    ))
    .await;
    let http_id = created["result"]["structuredContent"]["session_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{created}"))
        .to_owned();
    until_status(&stack, &key, &http_id, "active").await;
    wait_for(
        "the gateway to route the HTTP MCP session",
        Duration::from_secs(10),
        || async {
            let (_, sent) = json_of(tool(
                3,
                "send_message",
                serde_json::json!({"session_id": http_id, "message": "over http"}),
            ))
            .await;
            Ok((sent["result"]["isError"] == false).then_some(()))
        },
    )
    .await
    .unwrap();
    wait_for(
        "the answer over HTTP MCP",
        Duration::from_secs(10),
        || async {
            let (_, got) = json_of(tool(
                4,
                "get_messages",
                serde_json::json!({"session_id": http_id}),
            ))
            .await;
            Ok(got.to_string().contains("echo: over http").then_some(()))
        },
    )
    .await
    .unwrap();
    let (_, listed) = json_of(tool(
        5,
        "list_sessions",
        serde_json::json!({"tags": {"via": "http-mcp"}}),
    ))
    .await;
    assert_eq!(
        listed["result"]["structuredContent"]["sessions"][0]["session_id"],
        http_id.as_str()
    );
    // Another user's session is not found through MCP either.
    let (_, other) = json_of(tool(
        6,
        "get_messages",
        serde_json::json!({"session_id": Uuid::new_v4()}),
    ))
    .await;
    assert_eq!(other["result"]["isError"], true, "{other}");
    assert!(other.to_string().contains("Session not found"), "{other}");
    let (_, deleted) = json_of(tool(
        7,
        "delete_session",
        serde_json::json!({"session_id": http_id}),
    ))
    .await;
    assert_eq!(deleted["result"]["isError"], false, "{deleted}");
    until_status(&stack, &key, &http_id, "stopped").await;
    cli(&stack, &key, &["rm", &id]).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn team_sessions_are_for_the_teams_members_and_admins_see_everything() {
    let stack = sessions_stack(6).await;
    let (status, role) = stack
        .api
        .call(
            reqwest::Method::POST,
            "/api/v1/roles",
            Some(serde_json::json!({"name": "ops", "description": "the ops team", "permissions": ["session:list"]})),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{role}");
    let (_, carol) = user_key(&stack, "carol@example.com", &["member", "ops"]).await;
    let (_, erin) = user_key(&stack, "erin@example.com", &["member", "ops"]).await;
    let (_, dave) = user_key(&stack, "dave@example.com", &["member"]).await;
    let (_, boss) = user_key(&stack, "boss@example.com", &["admin"]).await;
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;
    let team = serde_json::json!({"scope": "team", "team_id": "ops", "tags": {"kind": "team"}});
    let (code, body) =
        json_of(at_gateway(&stack, post.clone(), "/start", Some(&dave)).json(&team)).await;
    assert_eq!(code, 403, "{body}");
    let (code, body) =
        json_of(at_gateway(&stack, post.clone(), "/start", Some(&carol)).json(&team)).await;
    assert_eq!(code, 200, "{body}");
    let team_id = body["session_id"].as_str().unwrap().to_owned();
    let (code, body) = json_of(at_gateway(&stack, post.clone(), "/start", Some(&carol))).await;
    assert_eq!(code, 200, "{body}");
    let personal = body["session_id"].as_str().unwrap().to_owned();
    let team_search = |key: &str| {
        let r = at_gateway(&stack, get.clone(), "/search?scope=team", Some(key));
        async move {
            let (_, body) = json_of(r).await;
            body["sessions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["session_id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    until_status(&stack, &carol, &personal, "active").await;
    // The team's members and admins see the team session; others do not.
    assert_eq!(team_search(&erin).await, vec![team_id.as_str()]);
    assert_eq!(team_search(&boss).await, vec![team_id.as_str()]);
    assert!(team_search(&dave).await.is_empty());
    // Without scope=team: personal sessions; admins see everyone's.
    let (_, mine) = json_of(at_gateway(&stack, get.clone(), "/search", Some(&erin))).await;
    assert!(mine["sessions"].as_array().unwrap().is_empty(), "{mine}");
    let (_, all) = json_of(at_gateway(&stack, get.clone(), "/search", Some(&boss))).await;
    assert_eq!(all["sessions"][0]["session_id"], personal.as_str(), "{all}");
    // Reaching them through the gateway: the team session for members and admins, the personal
    // one for its owner alone.
    let reach =
        |key: &str, id: &str| at_gateway(&stack, get.clone(), &format!("/{id}/status"), Some(key));
    wait_for(
        "erin to reach the team session",
        Duration::from_secs(20),
        || async { Ok((reach(&erin, &team_id).send().await?.status() == 200).then_some(())) },
    )
    .await
    .unwrap();
    wait_for(
        "carol to reach her session",
        Duration::from_secs(20),
        || async { Ok((reach(&carol, &personal).send().await?.status() == 200).then_some(())) },
    )
    .await
    .unwrap();
    assert_eq!(reach(&boss, &team_id).send().await.unwrap().status(), 200);
    assert_eq!(reach(&dave, &team_id).send().await.unwrap().status(), 404);
    assert_eq!(reach(&erin, &personal).send().await.unwrap().status(), 404);
    assert_eq!(reach(&boss, &personal).send().await.unwrap().status(), 404);
    // Deleting: not by an outsider; by a team member; by an admin for anyone's.
    let delete = |key: &str, id: &str| {
        at_gateway(
            &stack,
            reqwest::Method::DELETE,
            &format!("/sessions/{id}"),
            Some(key),
        )
    };
    assert_eq!(json_of(delete(&dave, &team_id)).await.0, 404);
    assert_eq!(json_of(delete(&erin, &team_id)).await.0, 200);
    assert_eq!(json_of(delete(&boss, &personal)).await.0, 200);
    until_status(&stack, &carol, &personal, "stopped").await;
}

/// The arguments of an agent running the fake agentapi as its session command on `n` ports of
/// this process's block, with `more` after them.
fn fake_session_args(n: u16, more: &[&str]) -> Vec<String> {
    let fake = bin("kakuremichi-fake-agentapi").unwrap();
    let first = ports(n);
    let mut args = vec![
        "--session-command".into(),
        format!(
            "{} server --port {{port}} --reply-delay-ms 20 -- fake-claude",
            fake.display()
        ),
        "--session-ports".into(),
        format!("{first}-{}", first + n - 1),
    ];
    args.extend(more.iter().map(|s| (*s).to_owned()));
    args
}

/// Starts a session with `body` at the gateway: its id.
async fn start_session(stack: &kakuremichi_e2e::Stack, key: &str, body: Value) -> String {
    let (code, answer) =
        json_of(at_gateway(stack, reqwest::Method::POST, "/start", Some(key)).json(&body)).await;
    assert_eq!(code, 200, "{answer}");
    answer["session_id"].as_str().unwrap().to_owned()
}

/// The session as `/search` shows it to `key`'s owner.
async fn found(stack: &kakuremichi_e2e::Stack, key: &str, id: &str) -> Value {
    let (code, body) = json_of(at_gateway(
        stack,
        reqwest::Method::GET,
        "/search",
        Some(key),
    ))
    .await;
    assert_eq!(code, 200, "{body}");
    body["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["session_id"] == id)
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_choose_the_agent_whose_labels_match_and_a_oneshot_session_ends_once_its_agent_answered(
) {
    let stack = sessions_stack_with(4, &["--session-label".into(), "repo=api".into()]).await;
    let second = stack.api.create_site("second").await.unwrap();
    let _second_agent = stack
        .start_another_agent_with(
            "second",
            &second.token,
            &fake_session_args(4, &["--session-label", "repo=web,gpu=yes"]),
        )
        .unwrap();
    // Both agents online, their labels known to control.
    wait_for(
        "both sites to report their labels",
        Duration::from_secs(20),
        || async {
            let sites = stack.api.get("/api/v1/sites").await?;
            let labelled = sites
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| s["online"] == true && s["session_labels"].is_object())
                .count();
            Ok((labelled == 2).then_some(()))
        },
    )
    .await
    .unwrap();
    let sites = stack.api.get("/api/v1/sites").await.unwrap();
    let by_name = |name: &str| {
        sites
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(
        by_name("second")["session_labels"],
        serde_json::json!({"repo": "web", "gpu": "yes"})
    );
    let (_, key) = member_key(&stack, "ann@example.com").await;
    // A scoped organization key (no user) cannot start a session nobody could then see.
    let (status, service) = stack
        .api
        .call(
            reqwest::Method::POST,
            "/api/v1/api-keys",
            Some(serde_json::json!({"name": "ci", "scopes": ["session:create", "session:list"]})),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{service}");
    let (code, body) = json_of(
        at_gateway(
            &stack,
            reqwest::Method::POST,
            "/start",
            service["secret"].as_str(),
        )
        .json(&serde_json::json!({})),
    )
    .await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("a user's API key"),
        "{body}"
    );

    // The tags pick the agent, whatever the load: three sessions for web, then api, then the
    // one matching two tags over the one matching one.
    let mut web = Vec::new();
    for _ in 0..2 {
        web.push(start_session(&stack, &key, serde_json::json!({"tags": {"repo": "web"}})).await);
    }
    let api = start_session(&stack, &key, serde_json::json!({"tags": {"repo": "api"}})).await;
    let both = start_session(
        &stack,
        &key,
        serde_json::json!({"tags": {"repo": "api", "gpu": "yes"}}),
    )
    .await;
    let untagged = start_session(&stack, &key, serde_json::json!({})).await;
    for id in &web {
        assert_eq!(found(&stack, &key, id).await["site_id"], second.id.as_str());
    }
    let first_site = stack.site_id.clone();
    assert_eq!(
        found(&stack, &key, &api).await["site_id"],
        first_site.as_str()
    );
    // repo=api (first) and gpu=yes (second) match one each: the less loaded, the first.
    assert_eq!(
        found(&stack, &key, &both).await["site_id"],
        first_site.as_str()
    );
    // No tag: one of the two, the less loaded (here they tie, two each).
    assert!(!found(&stack, &key, &untagged).await["site_id"].is_null());
    for id in web.iter().chain([&api, &both, &untagged]) {
        until_status(&stack, &key, id, "active").await;
        let (code, _) = json_of(at_gateway(
            &stack,
            reqwest::Method::DELETE,
            &format!("/sessions/{id}"),
            Some(&key),
        ))
        .await;
        assert_eq!(code, 200);
    }

    // oneshot: its agent answers the first message, then the session ends by itself.
    let once = start_session(
        &stack,
        &key,
        serde_json::json!({"params": {"message": "do it once", "oneshot": true}}),
    )
    .await;
    let kept = start_session(
        &stack,
        &key,
        serde_json::json!({"params": {"message": "and stay"}}),
    )
    .await;
    until_status(&stack, &key, &once, "stopped").await;
    let s = found(&stack, &key, &once).await;
    assert_eq!(s["reason"], "oneshot: its agent finished", "{s}");
    until_status(&stack, &key, &kept, "active").await;
    wait_for(
        "the kept session's answer",
        Duration::from_secs(10),
        || async {
            Ok(session_messages(&stack, &key, &kept)
                .await
                .iter()
                .any(|m| m["content"] == "echo: and stay")
                .then_some(()))
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(found(&stack, &key, &kept).await["status"], "active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_serve_while_control_is_down_and_a_control_restart_loses_nothing() {
    let mut stack = sessions_stack(4).await;
    let (_, key) = member_key(&stack, "ann@example.com").await;
    let id = start_session(
        &stack,
        &key,
        serde_json::json!({
            "environment": {"API_TOKEN": "s3cret-env"},
            "tags": {"repository": "org/repo"},
            "params": {"message": "before", "session_ttl": "2h"},
        }),
    )
    .await;
    until_status(&stack, &key, &id, "active").await;
    wait_for("the first answer", Duration::from_secs(10), || async {
        Ok(session_messages(&stack, &key, &id)
            .await
            .iter()
            .any(|m| m["content"] == "echo: before")
            .then_some(()))
    })
    .await
    .unwrap();
    let (code, share) = json_of(at_gateway(
        &stack,
        reqwest::Method::POST,
        &format!("/sessions/{id}/share"),
        Some(&key),
    ))
    .await;
    assert_eq!(code, 201, "{share}");
    let token = share["token"].as_str().unwrap().to_owned();
    let before = found(&stack, &key, &id).await;

    // Control down: the session is still reached through the gateway, by key and share link,
    // and still works.
    stack.stop_control();
    let (code, _) = json_of(
        at_gateway(
            &stack,
            reqwest::Method::POST,
            &format!("/{id}/message"),
            Some(&key),
        )
        .json(&serde_json::json!({"content": "while control is down", "type": "user"})),
    )
    .await;
    assert_eq!(code, 200);
    wait_for(
        "the answer without control",
        Duration::from_secs(10),
        || async {
            Ok(session_messages(&stack, &key, &id)
                .await
                .iter()
                .any(|m| m["content"] == "echo: while control is down")
                .then_some(()))
        },
    )
    .await
    .unwrap();
    let r = at_gateway(
        &stack,
        reqwest::Method::GET,
        &format!("/s/{token}/messages"),
        None,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);

    // Control back: the session as it was (same site, tags, times, share link), still active,
    // its environment not sent again as a new start (the agent runs the same process).
    let pid_before = working_in(
        &stack
            .dir
            .path()
            .join("agent/sessions")
            .join(&id)
            .canonicalize()
            .unwrap(),
    );
    stack.start_control_again().await.unwrap();
    wait_for(
        "sessions through control again",
        Duration::from_secs(20),
        || async {
            let r = at_gateway(&stack, reqwest::Method::GET, "/search", Some(&key))
                .send()
                .await?;
            Ok((r.status() == 200).then_some(()))
        },
    )
    .await
    .unwrap();
    let after = found(&stack, &key, &id).await;
    for field in [
        "session_id",
        "site_id",
        "tags",
        "started_at",
        "scope",
        "status",
    ] {
        assert_eq!(
            after[field], before[field],
            "{field}: {before} then {after}"
        );
    }
    let (code, listed) = json_of(at_gateway(
        &stack,
        reqwest::Method::GET,
        &format!("/sessions/{id}/share"),
        Some(&key),
    ))
    .await;
    assert_eq!(code, 200, "{listed}");
    assert_eq!(
        working_in(
            &stack
                .dir
                .path()
                .join("agent/sessions")
                .join(&id)
                .canonicalize()
                .unwrap()
        ),
        pid_before,
        "the session's process was started again"
    );
    // Status changes still reach control: the long poll sees the next answer.
    let (code, _) = json_of(
        at_gateway(
            &stack,
            reqwest::Method::POST,
            &format!("/{id}/message"),
            Some(&key),
        )
        .json(&serde_json::json!({"content": "after", "type": "user"})),
    )
    .await;
    assert_eq!(code, 200);
    wait_for(
        "the answer after the restart",
        Duration::from_secs(10),
        || async {
            Ok(session_messages(&stack, &key, &id)
                .await
                .iter()
                .any(|m| m["content"] == "echo: after")
                .then_some(()))
        },
    )
    .await
    .unwrap();
    let (code, _) = json_of(at_gateway(
        &stack,
        reqwest::Method::DELETE,
        &format!("/sessions/{id}"),
        Some(&key),
    ))
    .await;
    assert_eq!(code, 200);
    until_status(&stack, &key, &id, "stopped").await;
}
