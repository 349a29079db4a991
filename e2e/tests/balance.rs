//! Several targets per resource, end to end: two agents (two sites) serve one hostname, requests
//! are spread over both, a failing health check takes a target out within one interval and
//! brings it back after, a sticky cookie keeps a client on one target, and killing one agent
//! under continuous load fails nothing (idempotent requests waiting on it are retried on the
//! other).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kakuremichi_e2e::{free_tcp_port, start_demo_app, wait_for, Stack};
use serde_json::json;

const HOST: &str = "lb.localhost";
const INTERVAL_MS: u64 = 1000;

async fn whoami(stack: &Stack) -> anyhow::Result<String> {
    let r = stack.get(HOST, "/whoami").await?;
    anyhow::ensure!(r.status() == 200, "status {}", r.status());
    Ok(r.text().await?)
}

/// Who answers `n` requests in a row.
async fn answers(stack: &Stack, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        if let Ok(who) = whoami(stack).await {
            *seen.entry(who).or_insert(0) += 1;
        }
    }
    seen
}

async fn toggle(app: SocketAddr, path: &str) {
    let r = reqwest::Client::new()
        .post(format!("http://{app}{path}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_agents_serve_one_resource_through_health_checks_stickiness_and_a_killed_agent() {
    let stack = Stack::start().await.unwrap();
    let app1 = stack.opts.app_listen;
    let app2: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let _app2 = start_demo_app(app2, None, stack.dir.path()).unwrap();
    let site2 = stack.api.create_site("second").await.unwrap();
    let mut agent2 = stack.start_another_agent("second", &site2.token).unwrap();

    let (status, created) = stack
        .api
        .call(
            reqwest::Method::POST,
            "/api/v1/resources",
            Some(json!({
                "hostname": HOST,
                "site_id": stack.site_id,
                "target": app1.to_string(),
                "targets": [{"site_id": site2.id, "target": app2.to_string()}],
                "health_check": {
                    "path": "/healthz",
                    "interval_ms": INTERVAL_MS,
                    "timeout_ms": 800,
                    "unhealthy_threshold": 1,
                    "healthy_threshold": 1
                }
            })),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["targets"].as_array().map(Vec::len), Some(2));
    let resource = created["id"].as_str().unwrap().to_owned();
    let (one, two) = (app1.to_string(), app2.to_string());

    // Both targets answer, in turn.
    wait_for(
        "both targets to answer",
        Duration::from_secs(30),
        || async {
            let seen = answers(&stack, 8).await;
            Ok((seen.get(&one) >= Some(&2) && seen.get(&two) >= Some(&2)).then_some(()))
        },
    )
    .await
    .unwrap();

    // A failing health check takes the second target out within one interval...
    toggle(app2, "/healthz/fail").await;
    let failed_at = Instant::now();
    wait_for(
        "the failing target to be skipped",
        Duration::from_secs(10),
        || async {
            let seen = answers(&stack, 10).await;
            Ok((seen.get(&one) == Some(&10)).then_some(()))
        },
    )
    .await
    .unwrap();
    let out_after = failed_at.elapsed();
    // ...and it stays out.
    let seen = answers(&stack, 20).await;
    assert_eq!(seen.get(&one), Some(&20), "{seen:?}");
    // Back after it passes again.
    toggle(app2, "/healthz/ok").await;
    let ok_at = Instant::now();
    wait_for("the target to be back", Duration::from_secs(10), || async {
        Ok(answers(&stack, 6).await.contains_key(&two).then_some(()))
    })
    .await
    .unwrap();
    let back_after = ok_at.elapsed();
    eprintln!("health check: out after {out_after:?}, back after {back_after:?}");
    // One interval, the check's own time and the time it takes to see 10 answers in a row.
    assert!(
        out_after < Duration::from_millis(INTERVAL_MS + 1500),
        "out after {out_after:?}"
    );
    assert!(
        back_after < Duration::from_millis(INTERVAL_MS + 1500),
        "back after {back_after:?}"
    );

    // Sticky: the cookie keeps a client on the target it reached first.
    stack
        .api
        .patch(
            &format!("/api/v1/resources/{resource}"),
            json!({"sticky": true}),
        )
        .await
        .unwrap();
    let cookie = wait_for("a sticky cookie", Duration::from_secs(10), || async {
        let r = stack.get(HOST, "/whoami").await?;
        Ok(r.headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or_default().to_owned()))
    })
    .await
    .unwrap();
    assert!(cookie.starts_with("kakuremichi_target="), "{cookie}");
    let mut stuck = BTreeMap::new();
    for _ in 0..10 {
        let r = stack
            .request_builder(reqwest::Method::GET, HOST, "/whoami")
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert!(
            r.headers().get("set-cookie").is_none(),
            "a valid cookie is kept"
        );
        *stuck.entry(r.text().await.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(stuck.len(), 1, "every request on one target: {stuck:?}");
    stack
        .api
        .patch(
            &format!("/api/v1/resources/{resource}"),
            json!({"sticky": false}),
        )
        .await
        .unwrap();

    // Continuous load from 8 clients; the second agent is killed in the middle of it.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let from_two_after_kill = Arc::new(AtomicU64::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let stack = Arc::new(stack);
    let mut load = Vec::new();
    for _ in 0..8 {
        let (stack, stop, ok, failed) = (stack.clone(), stop.clone(), ok.clone(), failed.clone());
        let (from_two, killed, two) = (from_two_after_kill.clone(), killed.clone(), two.clone());
        load.push(tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                match whoami(&stack).await {
                    Ok(who) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                        if who == two && killed.load(Ordering::SeqCst) {
                            from_two.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Err(e) => {
                        eprintln!("request failed: {e:#}");
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
                worst = worst.max(started.elapsed());
            }
            worst
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = ok.load(Ordering::SeqCst);
    agent2.kill();
    killed.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.store(true, Ordering::SeqCst);
    let mut worst = Duration::ZERO;
    for l in load {
        worst = worst.max(l.await.unwrap());
    }
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    eprintln!(
        "load: {ok} ok ({before} before the kill), {failed} failed, slowest {worst:?}, {} answered by the killed agent after the kill",
        from_two_after_kill.load(Ordering::SeqCst)
    );
    assert_eq!(
        failed, 0,
        "no request fails: those waiting on the killed agent are retried"
    );
    assert!(
        ok > before + 100,
        "the load went on after the kill: {ok} vs {before}"
    );
    // Afterwards everything goes to the surviving target at once.
    let seen = answers(&stack, 10).await;
    assert_eq!(seen.get(&one), Some(&10), "{seen:?}");
}

/// A TCP server that answers every line with `<name>:<line>`.
async fn named_echo(name: &'static str) -> SocketAddr {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut lines = tokio::io::BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if w.write_all(format!("{name}:{line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Sends `line` and reads one answer line; `None` if the connection closed.
async fn ask(conn: &mut tokio::io::BufReader<tokio::net::TcpStream>, line: &str) -> Option<String> {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    conn.get_mut()
        .write_all(format!("{line}\n").as_bytes())
        .await
        .ok()?;
    let mut answer = String::new();
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read_line(&mut answer))
        .await
        .ok()?
        .ok()?;
    (n > 0).then(|| answer.trim_end().to_owned())
}

async fn connect(port: u16) -> tokio::io::BufReader<tokio::net::TcpStream> {
    tokio::io::BufReader::new(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap(),
    )
}

/// A TCP resource gains a target, changes its limits and loses the target again: the port is
/// never rebound, a connection to the target that stays keeps working throughout, and only the
/// connection to the removed target is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_resource_gains_and_loses_targets_without_dropping_the_connections_that_stay() {
    let mut opts = kakuremichi_e2e::StackOptions::loopback();
    opts.gateway_args = vec!["--tcp-listen-ip".into(), "127.0.0.1".into()];
    let stack = Stack::start_with(opts).await.unwrap();
    let a = named_echo("a").await;
    let b = named_echo("b").await;
    let port = free_tcp_port();
    let (status, created) = stack
        .api
        .call(
            reqwest::Method::POST,
            "/api/v1/resources",
            Some(json!({"protocol": "tcp", "public_port": port, "site_id": stack.site_id, "target": a.to_string()})),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let mut stays = wait_for("the TCP resource", Duration::from_secs(20), || async {
        let Ok(s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
            return Ok(None);
        };
        let mut c = tokio::io::BufReader::new(s);
        Ok(ask(&mut c, "hello").await.map(|_| c))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", stack.logs()));
    assert_eq!(ask(&mut stays, "one").await.as_deref(), Some("a:one"));

    // A second target: new connections reach both, the open one stays on its target.
    let (status, target) = stack
        .api
        .call(
            reqwest::Method::POST,
            &format!("/api/v1/resources/{id}/targets"),
            Some(json!({"site_id": stack.site_id, "target": b.to_string()})),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{target}");
    let mut on_b = wait_for(
        "a connection to the new target",
        Duration::from_secs(20),
        || async {
            let mut c = connect(port).await;
            Ok(ask(&mut c, "who").await.filter(|a| a == "b:who").map(|_| c))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", stack.logs()));
    assert_eq!(ask(&mut stays, "two").await.as_deref(), Some("a:two"));

    // Other changes (limits, balancing) leave both connections alone.
    let v = stack.api.config_version().await.unwrap();
    stack
        .api
        .patch(
            &format!("/api/v1/resources/{id}"),
            json!({"balance": "least_outstanding", "limits": {"idle_timeout_ms": 600000}}),
        )
        .await
        .unwrap();
    assert!(stack.api.config_version().await.unwrap() > v);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(ask(&mut stays, "three").await.as_deref(), Some("a:three"));
    assert_eq!(ask(&mut on_b, "three").await.as_deref(), Some("b:three"));

    // The second target removed: its connection is closed, the other keeps working, and new
    // connections all go to the target that is left.
    stack
        .api
        .call(
            reqwest::Method::DELETE,
            &format!(
                "/api/v1/resources/{id}/targets/{}",
                target["id"].as_str().unwrap()
            ),
            None,
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ask(&mut on_b, "still?").await.is_some() {
        assert!(
            Instant::now() < deadline,
            "the removed target's connection stayed open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ask(&mut stays, "four").await.as_deref(), Some("a:four"));
    for _ in 0..4 {
        let mut c = connect(port).await;
        assert_eq!(ask(&mut c, "new").await.as_deref(), Some("a:new"));
    }
}
