//! Agent sessions on one agent's session host, with the fake coder/agentapi server as the
//! session command: sessions start on free ports in their own folders and process groups with the
//! merged environment, become active when their agent answers, take and answer messages, and end
//! with nothing of their process group left behind; bad commands, a full port range and bad
//! requests fail clearly without disturbing the rest.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

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
        limits: Limits {
            first_port: first,
            ports: ports_n,
            start_timeout: Duration::from_secs(10),
            grace: Duration::from_secs(2),
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
            ttl: None,
        })
        .await
        .unwrap();
    assert!(matches!(
        started.view.phase,
        Phase::Creating | Phase::Starting
    ));
    let active = until_phase(&host, id, Phase::Active).await;
    let (port, pgid) = (active.view.port, active.pid.unwrap());
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
    host.stop(id).await.unwrap();
    let stopped = until_phase(&host, id, Phase::Stopped).await;
    assert_eq!(stopped.pid, None);
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
    });
    let spec = |id: Uuid| SessionSpec {
        id,
        role: None,
        env: BTreeMap::from([("TOKEN".to_owned(), kakuremichi_proto::Secret::new("s3cret"))]),
        ttl_secs: None,
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
