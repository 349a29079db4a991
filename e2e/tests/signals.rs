//! Signals with real processes (issue 13): SIGTERM drains the gateway, the agent and control
//! within `--shutdown-grace` (in-flight requests finish, new connections are refused at once,
//! the process exits as soon as the last one is done, or at the grace period), and SIGHUP reloads
//! the `--config` file (a live key changes, a broken file changes nothing and the process keeps
//! serving).

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kakuremichi_e2e::{wait_for, Stack, StackOptions, DEMO_HOST};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Connects to `addr` every 5 ms until the connection is refused; returns how long after
/// `since` that was.
async fn refused_after(addr: SocketAddr, since: Instant, within: Duration) -> Duration {
    loop {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return since.elapsed()
            }
            _ => {}
        }
        assert!(
            since.elapsed() < within,
            "{addr} still accepts connections {:?} after the signal",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A `GET path` on a fresh connection, sent now; resolves to (status, body).
fn slow_request(
    stack: &Stack,
    path: &str,
) -> tokio::task::JoinHandle<Result<(u16, String), String>> {
    let gateway = stack.opts.gateway_http_for_test;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {DEMO_HOST}\r\nConnection: close\r\n\r\n");
    tokio::spawn(async move {
        let mut s = TcpStream::connect(gateway)
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&answer).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status line in {text:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    })
}

/// Keep-alive clients asking for `/` in a loop until `stop`; counts answers before and after
/// `signalled` turns true.
struct Load {
    stop: Arc<AtomicBool>,
    signalled: Arc<AtomicBool>,
    ok_before: Arc<AtomicU64>,
    failed_before: Arc<AtomicU64>,
    ok_after: Arc<AtomicU64>,
    failed_after: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(stack: &Stack, clients: usize) -> Load {
        let load = Load {
            stop: Arc::default(),
            signalled: Arc::default(),
            ok_before: Arc::default(),
            failed_before: Arc::default(),
            ok_after: Arc::default(),
            failed_after: Arc::default(),
            tasks: Vec::new(),
        };
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let http = kakuremichi_e2e::test_http_client();
            let url = format!("http://{}/", stack.opts.gateway_http_for_test);
            let (stop, signalled) = (load.stop.clone(), load.signalled.clone());
            let counters = [
                load.ok_before.clone(),
                load.failed_before.clone(),
                load.ok_after.clone(),
                load.failed_after.clone(),
            ];
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let after = signalled.load(Ordering::Relaxed);
                    let ok = match http.get(&url).header("host", DEMO_HOST).send().await {
                        Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    let i = usize::from(after) * 2 + usize::from(!ok);
                    counters[i].fetch_add(1, Ordering::Relaxed);
                    if !ok {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }));
        }
        Load { tasks, ..load }
    }

    async fn stop(self) -> [u64; 4] {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        [
            self.ok_before.load(Ordering::Relaxed),
            self.failed_before.load(Ordering::Relaxed),
            self.ok_after.load(Ordering::Relaxed),
            self.failed_after.load(Ordering::Relaxed),
        ]
    }
}

async fn stack_with(gateway_args: &[&str], agent_args: &[&str]) -> Stack {
    let mut opts = StackOptions::loopback();
    opts.gateway_args = gateway_args.iter().map(|s| s.to_string()).collect();
    opts.agent_args = agent_args.iter().map(|s| s.to_string()).collect();
    Stack::start_with(opts).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_the_gateway_under_load_within_the_grace_period() {
    let mut stack = stack_with(&["--shutdown-grace", "5s"], &[]).await;
    let load = Load::start(&stack, 16);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let slow: Vec<_> = (0..4).map(|_| slow_request(&stack, "/slow/2000")).collect();
    // The slow requests reach the app (and wait there) before the signal.
    tokio::time::sleep(Duration::from_millis(400)).await;

    let signalled = Instant::now();
    load.signalled.store(true, Ordering::Relaxed);
    stack.gateway.signal(Signal::SIGTERM).unwrap();
    let refused = refused_after(
        stack.opts.gateway_http_for_test,
        signalled,
        Duration::from_secs(1),
    )
    .await;

    let mut last_done = Duration::ZERO;
    let mut completed = 0;
    for s in slow {
        let (status, body) = s.await.unwrap().unwrap();
        assert_eq!(status, 200, "{}", stack.logs());
        assert_eq!(body, "slow response\n");
        completed += 1;
        last_done = last_done.max(signalled.elapsed());
    }
    let status = stack
        .gateway
        .wait_exit(Duration::from_secs(6))
        .await
        .expect("the gateway still runs past its grace period");
    let exited = signalled.elapsed();
    let [ok_before, failed_before, ok_after, failed_after] = load.stop().await;
    println!(
        "gateway SIGTERM, grace 5 s: new connections refused after {refused:?}; {completed}/4 slow \
         (2 s) requests completed with 200, the last {last_done:?} after the signal; exited \
         {exited:?} after the signal ({status}); keep-alive load of 16 clients: {ok_before} ok / \
         {failed_before} failed before, {ok_after} ok / {failed_after} failed after the signal"
    );
    assert!(status.success(), "{status}");
    assert_eq!(failed_before, 0);
    assert!(ok_before > 0);
    assert!(refused < Duration::from_millis(250), "{refused:?}");
    // It exits once the last request is done, well before the grace period.
    assert!(
        exited < last_done + Duration::from_millis(1000),
        "{exited:?}"
    );
    assert!(exited < Duration::from_secs(4), "{exited:?}");
    let log = stack.gateway.log_text();
    assert!(log.contains("told control this node is leaving"), "{log}");
    wait_for(
        "control to hear the gateway leave",
        Duration::from_secs(5),
        || async {
            Ok(stack
                .control
                .log_text()
                .contains("node shutting down")
                .then_some(()))
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_slower_than_the_grace_period_is_cut_at_the_grace_period() {
    let mut stack = stack_with(&["--shutdown-grace", "1s"], &[]).await;
    let slow = slow_request(&stack, "/slow/5000");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signalled = Instant::now();
    stack.gateway.signal(Signal::SIGTERM).unwrap();
    let status = stack
        .gateway
        .wait_exit(Duration::from_secs(4))
        .await
        .expect("the gateway still runs past its grace period");
    let exited = signalled.elapsed();
    let answer = slow.await.unwrap();
    println!(
        "gateway SIGTERM, grace 1 s, a 5 s request in flight: exited {exited:?} after the \
         signal ({status}); the request: {answer:?}"
    );
    assert!(status.success(), "{status}");
    assert!(
        (Duration::from_millis(950)..Duration::from_millis(2000)).contains(&exited),
        "{exited:?}"
    );
    assert!(
        !matches!(&answer, Ok((200, body)) if body == "slow response\n"),
        "{answer:?}"
    );
    assert!(stack
        .gateway
        .log_text()
        .contains("connections still open at the end of the shutdown grace period are cut"));
}

/// A request to control that is still arriving (its body half sent) when SIGTERM comes is
/// answered; new connections are refused at once; control exits well within the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_controls_request_in_flight_finish() {
    let mut opts = StackOptions::loopback();
    opts.control_args = vec!["--shutdown-grace".into(), "5s".into()];
    let mut stack = Stack::start_with(opts).await.unwrap();
    let control = stack.opts.control_listen;
    let body = br#"{"name":"late-site"}"#;
    let mut s = TcpStream::connect(control).await.unwrap();
    s.write_all(
        format!(
            "POST /api/v1/sites HTTP/1.1\r\nHost: control\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            stack.opts.admin_key,
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    s.write_all(&body[..5]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let signalled = Instant::now();
    stack.control.signal(Signal::SIGTERM).unwrap();
    let refused = refused_after(control, signalled, Duration::from_secs(1)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.write_all(&body[5..]).await.unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    let answered = signalled.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    let status = stack
        .control
        .wait_exit(Duration::from_secs(6))
        .await
        .expect("control still runs past its grace period");
    let exited = signalled.elapsed();
    println!(
        "control SIGTERM, grace 5 s: new connections refused after {refused:?}; the request in \
         flight answered {:?} after {answered:?}; exited {exited:?} after the signal ({status})",
        answer.lines().next()
    );
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    assert!(answer.contains("late-site"), "{answer}");
    assert!(refused < Duration::from_millis(250), "{refused:?}");
    assert!(status.success(), "{status}");
    assert!(exited < Duration::from_secs(4), "{exited:?}");
}

/// The gateway's trusted proxies change with a SIGHUP; a broken file changes nothing, is logged,
/// and the gateway keeps serving; a key that needs a restart is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_reloads_the_gateways_trusted_proxies_and_survives_a_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, "trusted_proxies = []\n").unwrap();
    let mut stack = stack_with(&["--config", file.to_str().unwrap()], &[]).await;
    let forwarded_for = |stack: &Stack| {
        let req = stack
            .request_builder(reqwest::Method::GET, DEMO_HOST, "/headers")
            .header("x-forwarded-for", "203.0.113.66");
        async move {
            let h: serde_json::Value = req.send().await.unwrap().json().await.unwrap();
            h["x-forwarded-for"].as_str().unwrap_or_default().to_owned()
        }
    };
    assert_eq!(forwarded_for(&stack).await, "127.0.0.1");

    let http_listen = "127.0.0.1:1";
    std::fs::write(
        &file,
        format!("trusted_proxies = [\"127.0.0.1\"]\nhttp_listen = \"{http_listen}\"\n"),
    )
    .unwrap();
    let hup = Instant::now();
    stack.gateway.signal(Signal::SIGHUP).unwrap();
    wait_for(
        "the new trusted proxies",
        Duration::from_secs(5),
        || async { Ok((forwarded_for(&stack).await == "203.0.113.66, 127.0.0.1").then_some(())) },
    )
    .await
    .unwrap();
    let reloaded = hup.elapsed();
    let log = stack.gateway.log_text();
    assert!(log.contains("config reloaded"), "{log}");
    // --http-listen on the command line wins over the file: no change there. The file's
    // header_read_timeout is a live key; a connection cap is not.
    std::fs::write(
        &file,
        "trusted_proxies = [\"127.0.0.1\"]\nmax_connections_per_client = 7\n",
    )
    .unwrap();
    stack.gateway.signal(Signal::SIGHUP).unwrap();
    wait_for("the restart warning", Duration::from_secs(5), || async {
        Ok(stack
            .gateway
            .log_text()
            .contains("max_connections_per_client changed, but it takes effect only at a restart")
            .then_some(()))
    })
    .await
    .unwrap();

    std::fs::write(&file, "trusted_proxies = [\"127.0.0.1\"\n").unwrap();
    stack.gateway.signal(Signal::SIGHUP).unwrap();
    wait_for("the reload error", Duration::from_secs(5), || async {
        Ok(stack
            .gateway
            .log_text()
            .contains("config reload failed")
            .then_some(()))
    })
    .await
    .unwrap();
    assert!(stack.gateway.is_running());
    assert_eq!(forwarded_for(&stack).await, "203.0.113.66, 127.0.0.1");
    // A file that parses but does not validate is refused the same way.
    std::fs::write(&file, "trusted_proxies = [\"not an address\"]\n").unwrap();
    stack.gateway.signal(Signal::SIGHUP).unwrap();
    wait_for(
        "the second reload error",
        Duration::from_secs(5),
        || async {
            Ok((stack
                .gateway
                .log_text()
                .matches("config reload failed")
                .count()
                == 2)
                .then_some(()))
        },
    )
    .await
    .unwrap();
    assert_eq!(forwarded_for(&stack).await, "203.0.113.66, 127.0.0.1");
    assert!(stack.gateway.is_running());
    println!("gateway SIGHUP: new trusted proxies in force after {reloaded:?}");
}

/// The agent's grace period changes with a SIGHUP (and a broken file changes nothing): SIGTERM
/// then lets a short request in flight finish, cuts a long one at the new grace period, and the
/// agent tells control it is leaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_changes_the_agents_grace_period_and_sigterm_drains_its_streams() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, "shutdown_grace = \"10s\"\n").unwrap();
    let mut stack = stack_with(&[], &["--config", file.to_str().unwrap()]).await;

    std::fs::write(&file, "shutdown_grace = \"2s\"\n").unwrap();
    stack.agent.signal(Signal::SIGHUP).unwrap();
    wait_for("the agent's reload", Duration::from_secs(5), || async {
        Ok(stack
            .agent
            .log_text()
            .contains("config reloaded")
            .then_some(()))
    })
    .await
    .unwrap();
    std::fs::write(&file, "shutdown_grace = \"a while\"\n").unwrap();
    stack.agent.signal(Signal::SIGHUP).unwrap();
    wait_for(
        "the agent's reload error",
        Duration::from_secs(5),
        || async {
            Ok(stack
                .agent
                .log_text()
                .contains("config reload failed")
                .then_some(()))
        },
    )
    .await
    .unwrap();
    let resp = stack.get(DEMO_HOST, "/").await.unwrap();
    assert_eq!(resp.status(), 200);

    let short = slow_request(&stack, "/slow/1000");
    let long = slow_request(&stack, "/slow/6000");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signalled = Instant::now();
    stack.agent.signal(Signal::SIGTERM).unwrap();
    let status = stack
        .agent
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("the agent still runs past its grace period");
    let exited = signalled.elapsed();
    let short = short.await.unwrap();
    let long = long.await.unwrap();
    println!(
        "agent SIGTERM, grace 2 s (from a SIGHUP): exited {exited:?} after the signal ({status}); \
         a 1 s request: {short:?}; a 6 s request: {:?}",
        long.as_ref().map(|(s, _)| *s)
    );
    assert!(status.success(), "{status}");
    assert_eq!(short, Ok((200, "slow response\n".to_owned())));
    assert!(
        !matches!(&long, Ok((200, body)) if body == "slow response\n"),
        "{long:?}"
    );
    assert!(
        (Duration::from_millis(1900)..Duration::from_millis(3500)).contains(&exited),
        "{exited:?}"
    );
    let log = stack.agent.log_text();
    assert!(log.contains("told control this node is leaving"), "{log}");
}
