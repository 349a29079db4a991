//! The benchmark: single-stream HTTP download and upload, requests/s at 32 and 500 keep-alive
//! connections, and the nodes' memory, through gateway -> QUIC in WireGuard -> agent, each beside
//! the direct path, rathole (plain TCP and Noise) and a wireguard-go pair with kernel TCP,
//! measured in one run on this machine.
//!
//! Needs the release binaries, `iperf3`, `curl`, `wg`, `wrk` (scripts/setup installs them) and,
//! for its rows, rathole (`cargo install rathole --root target/bench-tools --no-default-features
//! --features server,client,noise`). Prints a Markdown table and the ratios.
//!
//! `--https` measures the edge instead: HTTPS h1 (wrk) and h2 (h2load) requests/s and latency,
//! new TLS connections per second, and latency at a fixed 1,000 requests/s, through the
//! gateway's HTTPS listener, beside the demo app serving TLS itself and rathole carrying the
//! app's TLS (needs `h2load`, from Debian's nghttp2-client).

#![allow(clippy::print_stdout)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use kakuremichi_e2e::{free_tcp_port, free_udp_port, Proc, Stack, StackOptions, DEMO_HOST};

/// Command line of the benchmark.
#[derive(Debug, Parser)]
#[command(name = "kakuremichi-bench")]
struct Args {
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Concurrent connections for the requests/s measurement.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Skip the wireguard-go pair with kernel TCP (needs root and network namespaces).
    #[arg(long)]
    no_wireguard_go: bool,
    /// Measure HTTPS instead: HTTP/1.1 (wrk) and HTTP/2 (h2load) over TLS, new TLS connections
    /// per second, and latency at a fixed 1,000 requests/s, through the gateway's HTTPS listener,
    /// beside the app serving TLS itself and rathole carrying the app's TLS.
    #[arg(long)]
    https: bool,
    /// Measure what sign-in costs: requests/s through a resource that needs sign-in (with a
    /// signed-in session) beside the same app public, alternating rounds in one run.
    #[arg(long)]
    identity: bool,
    /// Measure agent sessions: start to `active` (p50/p99 over 50 starts, the fake agentapi as
    /// the command) beside starting the same command by hand and polling it every millisecond.
    #[arg(long)]
    sessions: bool,
    /// Measure the admin console: response time p50/p99 of its pages with 1,000 sites and
    /// 1,000 resources beside the API list each stands on, and the bytes each page ships.
    #[arg(long)]
    ui: bool,
    /// Measure the UDP-blocked fallback: the agent behind a NAT (network namespaces), HTTP
    /// download, upload and requests/s through the gateway over UDP, then with UDP dropped in
    /// the agent's namespace (WireGuard over the WebSocket on the gateway's HTTPS port).
    #[arg(long)]
    fallback: bool,
    /// Measure this many concurrent keep-alive client connections, each sending requests back
    /// to back for `--seconds`: through one gateway, beside the same clients on the app
    /// directly; requests/s, errors, and the gateway's RSS per connection.
    #[arg(long)]
    keepalive: Option<usize>,
}

#[derive(Debug, Default, Clone)]
struct Row {
    path: &'static str,
    iperf_mbit: Option<f64>,
    http_download_mbit: Option<f64>,
    http_upload_mbit: Option<f64>,
    http_rps: Option<f64>,
    http_errors: u64,
    /// Requests/s with 500 keep-alive connections (wrk).
    rps_500: Option<f64>,
    rps_500_errors: u64,
}

/// `wrk` with `connections` keep-alive connections for `secs`, `GET /bytes/1024`: requests/s
/// and errors (socket errors plus non-2xx answers).
fn wrk(
    addr: SocketAddr,
    host: Option<&str>,
    secs: Duration,
    connections: usize,
) -> anyhow::Result<(f64, u64)> {
    wrk_with(addr, host, None, secs, connections)
}

/// [`wrk`] with one more request header.
fn wrk_with(
    addr: SocketAddr,
    host: Option<&str>,
    header: Option<&str>,
    secs: Duration,
    connections: usize,
) -> anyhow::Result<(f64, u64)> {
    let mut cmd = Command::new("wrk");
    if let Some(h) = header {
        cmd.args(["-H", h]);
    }
    cmd.args([
        "-t2",
        &format!("-c{connections}"),
        &format!("-d{}s", secs.as_secs()),
        "--timeout",
        "10s",
    ]);
    if let Some(h) = host {
        cmd.args(["-H", &format!("Host: {h}")]);
    }
    cmd.arg(format!("http://{addr}/bytes/1024"));
    let out = cmd.output().context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk output: {text}"))?;
    let mut errors = 0u64;
    for line in text.lines() {
        if let Some(rest) = line.trim().strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<u64>().unwrap_or(0);
        }
        if let Some(rest) = line.trim().strip_prefix("Socket errors:") {
            errors += rest
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    Ok((rps, errors))
}

/// RSS of the gateway and the agent (MiB) sampled every 100 ms while `f` runs: (peak gateway,
/// peak agent).
fn with_peak_rss<T>(stack: &Stack, f: impl FnOnce() -> T) -> (T, f64, f64) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gw_pid = stack.gateway.pid();
    let agent_pid = stack.agent.pid();
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut g, mut a) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                g = g.max(gw_pid.and_then(kakuremichi_e2e::rss_kib).unwrap_or(0));
                a = a.max(agent_pid.and_then(kakuremichi_e2e::rss_kib).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(100));
            }
            (g, a)
        })
    };
    let out = f();
    stop.store(true, Ordering::Relaxed);
    let (g, a) = sampler.join().unwrap_or((0, 0));
    (out, g as f64 / 1024.0, a as f64 / 1024.0)
}

/// Requests/s through a resource that needs sign-in, beside the same app public: three
/// alternating rounds each, so that the machine's drift hits both alike.
async fn identity(secs: Duration, connections: usize) -> anyhow::Result<()> {
    use kakuremichi_e2e::identity::Browser;
    let mut opts = StackOptions::loopback();
    opts.gateway_args = vec!["--max-connections-per-client".into(), "100000".into()];
    let stack = Stack::start_with(opts).await?;
    let password = "bench password 1234";
    kakuremichi_e2e::identity::private_resource(
        &stack,
        serde_json::json!({"email": "bench@example.com", "password": password}),
        serde_json::json!({"roles": ["member"]}),
    )
    .await?;
    let port = stack.opts.gateway_http_for_test.port();
    let url = format!("http://private.localhost:{port}/bytes/1024");
    // The gateway learns of the new resource within a config push.
    let mut browser = Browser::new();
    let started = std::time::Instant::now();
    let page = loop {
        match browser
            .sign_in(&stack, &url, "bench@example.com", password)
            .await
        {
            Ok(p) if p.status == 200 => break p,
            other if started.elapsed() > Duration::from_secs(10) => {
                bail!("cannot sign in: {:?}", other.map(|p| (p.status, p.body)))
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    drop(page);
    let cookie = format!(
        "Cookie: kakuremichi_session={}; kakuremichi_nonce={}",
        browser
            .cookie("private.localhost", "kakuremichi_session")
            .context("no session cookie")?,
        browser
            .cookie("private.localhost", "kakuremichi_nonce")
            .context("no nonce cookie")?
    );
    let gw = stack.opts.gateway_http_for_test;
    // What the app receives on each path: the request head's size decides how many QUIC
    // packets a request costs inside the tunnel.
    for host in [DEMO_HOST, "private.localhost"] {
        let seen = app_head_size(gw, host, &cookie).await?;
        println!("request head the app receives via {host}: {seen} bytes");
    }
    // Paired rounds, A B B A then B A A B: a drift of the machine within a round (which on this
    // VM is as large as the effect) weighs on both paths alike, and each round gives one ratio.
    // Both paths send the same Cookie header, so that only the check and what it adds differ.
    const ROUNDS: usize = 6;
    let (mut public, mut private, mut costs) = (Vec::new(), Vec::new(), Vec::new());
    // CPU time of each process per request on each path: (clock ticks, requests).
    let procs = [
        ("gateway", stack.gateway.pid()),
        ("agent", stack.agent.pid()),
        ("app", stack.app.pid()),
    ];
    let mut cpu_public = [(0.0f64, 0.0f64); 3];
    let mut cpu_private = [(0.0f64, 0.0f64); 3];
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 {
            [false, true, true, false]
        } else {
            [true, false, false, true]
        };
        let (mut p_sum, mut s_sum) = (0.0, 0.0);
        for signed_in in order {
            let host = if signed_in {
                "private.localhost"
            } else {
                DEMO_HOST
            };
            let before = cpu_ticks(&procs);
            let (rps, e) = wrk_with(gw, Some(host), Some(cookie.as_str()), secs, connections)?;
            anyhow::ensure!(e == 0, "{e} errors on {host}");
            let after = cpu_ticks(&procs);
            let requests = rps * secs.as_secs_f64();
            let spent = if signed_in {
                &mut cpu_private
            } else {
                &mut cpu_public
            };
            for (i, (a, b)) in after.iter().zip(&before).enumerate() {
                spent[i].0 += (a - b) as f64;
                spent[i].1 += requests;
            }
            if signed_in {
                s_sum += rps;
                private.push(rps);
            } else {
                p_sum += rps;
                public.push(rps);
            }
        }
        costs.push((1.0 - s_sum / p_sum) * 100.0);
    }
    let range = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lo, hi, v.iter().sum::<f64>() / v.len() as f64)
    };
    let (plo, phi, pavg) = range(&public);
    let (slo, shi, savg) = range(&private);
    let (clo, chi, _) = range(&costs);
    let mut sorted = costs.clone();
    sorted.sort_by(f64::total_cmp);
    let median = (sorted[ROUNDS / 2 - 1] + sorted[ROUNDS / 2]) / 2.0;
    println!(
        "requests/s, {connections} keep-alive connections, GET /bytes/1024 with the same Cookie \
         header, {ROUNDS} paired rounds (ABBA, BAAB) of {}s runs",
        secs.as_secs()
    );
    println!("| path | req/s (range) | mean |");
    println!("| --- | --- | ---: |");
    println!("| public resource | {plo:.0}-{phi:.0} | {pavg:.0} |");
    println!("| behind sign-in (session cookie checked, identity headers and assertion added) | {slo:.0}-{shi:.0} | {savg:.0} |");
    let each: Vec<String> = costs.iter().map(|c| format!("{c:.1}%")).collect();
    println!("cost of sign-in per round: {}", each.join(", "));
    println!(
        "cost of sign-in: median {median:.1}% (rounds {clo:.1}% to {chi:.1}%), mean to mean {:.1}%",
        (1.0 - savg / pavg) * 100.0
    );
    // /proc counts in USER_HZ, 100 on Linux.
    let hz = 100.0;
    let per = |(ticks, n): (f64, f64)| ticks / hz / n.max(1.0) * 1e6;
    println!("| CPU per request (us) | public | behind sign-in |");
    println!("| --- | ---: | ---: |");
    for (i, (name, _)) in procs.iter().enumerate() {
        println!(
            "| {name} | {:.1} | {:.1} |",
            per(cpu_public[i]),
            per(cpu_private[i])
        );
    }
    Ok(())
}

/// User plus system CPU time of each process so far, in clock ticks (0 for one not running).
fn cpu_ticks(procs: &[(&str, Option<u32>)]) -> Vec<u64> {
    procs
        .iter()
        .map(|(_, pid)| {
            let Some(pid) = pid else { return 0 };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return 0;
            };
            // After the command name in parentheses: fields 3.. ; utime and stime are 14 and 15.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            let get = |i: usize| {
                f.get(i - 3)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            get(14) + get(15)
        })
        .collect()
}

/// The size of the HTTP/1.1 head the demo app receives for `GET /headers` sent to the gateway
/// as wrk sends its requests (`Host: host` and `cookie`, a `Cookie: ...` header line).
async fn app_head_size(gw: SocketAddr, host: &str, cookie: &str) -> anyhow::Result<usize> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(gw).await?;
    let req =
        format!("GET /headers HTTP/1.1\r\nHost: {host}\r\n{cookie}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    // The JSON object, whether the body came with a length or chunked.
    let body = match (text.find('{'), text.rfind('}')) {
        (Some(a), Some(b)) if a < b => &text[a..=b],
        _ => bail!("no JSON object in the answer: {text}"),
    };
    let headers: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(body).with_context(|| format!("not a JSON object: {body}"))?;
    // "GET /bytes/1024 HTTP/1.1\r\n", each "name: value\r\n", the blank line.
    let lines: usize = headers
        .iter()
        .map(|(k, v)| k.len() + 2 + v.as_str().map_or(0, str::len) + 2)
        .sum();
    Ok("GET /bytes/1024 HTTP/1.1\r\n".len() + lines + 2)
}

/// p50 and p99 of `samples`, in milliseconds.
fn p50_p99(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len().max(1)) - 1;
        samples
            .get(i)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    (at(0.50), at(0.99))
}

/// Session start to `active` through the agent's session host, beside the floor: the same
/// command started by hand and asked `/status` every millisecond until it answers.
async fn sessions() -> anyhow::Result<()> {
    use kakuremichi_agent::sessions::{HostConfig, Phase, SessionHost, StartRequest};
    const STARTS: usize = 50;
    let fake = kakuremichi_e2e::bin("kakuremichi-fake-agentapi")?;
    let dir = tempfile::tempdir()?;
    let config = HostConfig::new(
        &format!("{} server --port {{port}} -- fake", fake.display()),
        dir.path(),
    );
    let first_port = 21_000;
    let host = SessionHost::spawn(HostConfig {
        limits: kakuremichi_agent::sessions::Limits {
            first_port,
            ..config.limits.clone()
        },
        ..config
    });
    let mut changes = host.changes();
    let mut managed = Vec::new();
    for _ in 0..STARTS {
        let id = uuid::Uuid::new_v4();
        let t = Instant::now();
        host.start(StartRequest {
            id,
            ..Default::default()
        })
        .await?;
        loop {
            let c = changes.recv().await?;
            if c.view.id == id && c.view.phase == Phase::Active {
                break;
            }
            if c.view.id == id && c.view.phase.ended() {
                bail!("session failed: {:?}", c.view.reason);
            }
        }
        managed.push(t.elapsed());
        host.stop(id).await?;
        loop {
            let c = changes.recv().await?;
            if c.view.id == id && c.view.phase.ended() {
                break;
            }
        }
    }
    host.shutdown().await;

    let http = reqwest::Client::new();
    let mut by_hand = Vec::new();
    for _ in 0..STARTS {
        let port = free_tcp_port();
        let t = Instant::now();
        let mut child = tokio::process::Command::new(&fake)
            .args(["server", "--port", &port.to_string(), "--", "fake"])
            .kill_on_drop(true)
            .spawn()?;
        loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let ok = http
                .get(format!("http://127.0.0.1:{port}/status"))
                .header("host", "localhost")
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                break;
            }
        }
        by_hand.push(t.elapsed());
        child.kill().await?;
    }
    let (m50, m99) = p50_p99(managed);
    let (h50, h99) = p50_p99(by_hand);
    println!();
    println!("| session start to active ({STARTS} starts, fake agentapi) | p50 (ms) | p99 (ms) |");
    println!("| --- | --- | --- |");
    println!("| by hand: spawn, ask /status every 1 ms | {h50:.1} | {h99:.1} |");
    println!("| kakuremichi agent session host | {m50:.1} | {m99:.1} |");
    println!();
    println!(
        "session host / by hand: p50 {:.2}x, p99 {:.2}x",
        m50 / h50,
        m99 / h99
    );
    session_messages(&fake).await
}

/// The console's pages with 1,000 sites and 1,000 resources: time to the last byte over
/// loopback (keep-alive, one at a time, rounds alternating between the pages and the API list
/// beside them), and the bytes a first visit loads (the page, its stylesheet and its script).
async fn ui() -> anyhow::Result<()> {
    const N: usize = 1000;
    const ROUNDS: usize = 300;
    let stack = Stack::start_with(StackOptions::loopback()).await?;
    let control = stack.opts.control_url_for_test.clone();
    let password = "correct horse battery";
    let (status, body) = stack
        .api
        .call(
            reqwest::Method::POST,
            "/api/v1/users",
            Some(serde_json::json!({"email": "owner@example.com", "password": password, "roles": ["owner"]})),
        )
        .await?;
    anyhow::ensure!(status == 201, "{status} {body}");
    println!("creating {N} sites and {N} resources...");
    for i in 0..N {
        let (status, site) = stack
            .api
            .call(
                reqwest::Method::POST,
                "/api/v1/sites",
                Some(serde_json::json!({"name": format!("site-{i:04}")})),
            )
            .await?;
        anyhow::ensure!(status == 201, "{status} {site}");
        let (status, r) = stack
            .api
            .call(
                reqwest::Method::POST,
                "/api/v1/resources",
                Some(serde_json::json!({
                    "hostname": format!("app-{i:04}.example.com"), "site_id": site["id"],
                    "target": "127.0.0.1:9"
                })),
            )
            .await?;
        anyhow::ensure!(status == 201, "{status} {r}");
    }
    let cookie =
        kakuremichi_e2e::identity::console_cookies(&control, "owner@example.com", password).await?;
    let http = reqwest::Client::new();
    let pages = [
        ("dashboard /ui", "/ui", true),
        ("resources /ui/resources", "/ui/resources", true),
        ("sites /ui/sites", "/ui/sites", true),
        (
            "resources searched /ui/resources?q=app-05",
            "/ui/resources?q=app-05",
            true,
        ),
        (
            "API: /api/v1/resources?limit=50",
            "/api/v1/resources?limit=50",
            false,
        ),
        (
            "API: /api/v1/sites?limit=50",
            "/api/v1/sites?limit=50",
            false,
        ),
    ];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); pages.len()];
    let mut bytes = vec![0usize; pages.len()];
    for round in 0..ROUNDS {
        for (i, (_, path, console)) in pages.iter().enumerate() {
            let req = http.get(format!("{control}{path}"));
            let req = if *console {
                req.header(reqwest::header::COOKIE, &cookie)
            } else {
                req.bearer_auth(&stack.opts.admin_key)
            };
            let t = Instant::now();
            let r = req.send().await?;
            anyhow::ensure!(r.status() == 200, "{path}: {}", r.status());
            let body = r.bytes().await?;
            // The first rounds warm up.
            if round >= 10 {
                times[i].push(t.elapsed());
            }
            bytes[i] = body.len();
        }
    }
    let mut assets = 0;
    for a in ["/ui/app.css", "/ui/app.js"] {
        assets += http
            .get(format!("{control}{a}"))
            .send()
            .await?
            .bytes()
            .await?
            .len();
    }
    println!();
    println!("| with {N} sites and {N} resources | p50 (ms) | p99 (ms) | first visit (KB: page + CSS + JS) |");
    println!("| --- | --- | --- | --- |");
    for (i, (name, _, console)) in pages.iter().enumerate() {
        let (p50, p99) = p50_p99(std::mem::take(&mut times[i]));
        let kb = if *console {
            format!("{:.1}", (bytes[i] + assets) as f64 / 1024.0)
        } else {
            format!("({:.1} JSON)", bytes[i] as f64 / 1024.0)
        };
        println!("| {name} | {p50:.1} | {p99:.1} | {kb} |");
    }
    println!();
    println!("control RSS after: {:.0} MiB", mib(stack.control.rss_kib()));
    Ok(())
}

/// `GET /{id}/messages` through a gateway (API key, tunnel, the agent's session stream) beside
/// the same call on the agent's host, alternating rounds of 100 sequential keep-alive calls.
async fn session_messages(fake: &std::path::Path) -> anyhow::Result<()> {
    const HOST: &str = "agents.localhost";
    const ROUNDS: usize = 10;
    const PER_ROUND: usize = 100;
    let mut opts = StackOptions::loopback();
    opts.control_args = vec!["--sessions-hostname".into(), HOST.into()];
    opts.agent_args = vec![
        "--session-command".into(),
        format!("{} server --port {{port}} -- fake", fake.display()),
        "--session-ports".into(),
        "21100-21109".into(),
    ];
    let stack = Stack::start_with(opts).await?;
    let (status, user) = stack
        .api
        .call(
            reqwest::Method::POST,
            "/api/v1/users",
            Some(serde_json::json!({"email": "bench@example.com", "password": "correct horse battery", "roles": ["member"]})),
        )
        .await?;
    anyhow::ensure!(status == 201, "user: {user}");
    let (status, key) = stack
        .api
        .call(
            reqwest::Method::POST,
            "/api/v1/api-keys",
            Some(serde_json::json!({"name": "bench", "user_id": user["id"], "scopes": ["session:create", "session:list", "session:access", "session:delete"]})),
        )
        .await?;
    anyhow::ensure!(status == 201, "key: {key}");
    let key = key["secret"].as_str().context("no key")?.to_owned();
    let gw = stack.opts.gateway_http_for_test;
    let http = reqwest::Client::new();
    let start: serde_json::Value = http
        .post(format!("http://{gw}/start"))
        .header("host", HOST)
        .header("x-api-key", &key)
        .send()
        .await?
        .json()
        .await?;
    let id = start["session_id"]
        .as_str()
        .context("no session id")?
        .to_owned();
    let through = format!("http://{gw}/{id}/messages");
    let port = kakuremichi_e2e::wait_for("the session", Duration::from_secs(30), || async {
        let r = http
            .get(&through)
            .header("host", HOST)
            .header("x-api-key", &key)
            .send()
            .await?;
        if r.status() != 200 {
            return Ok(None);
        }
        let found: serde_json::Value = http
            .get(format!("http://{gw}/search"))
            .header("host", HOST)
            .header("x-api-key", &key)
            .send()
            .await?
            .json()
            .await?;
        Ok(found["sessions"][0]["port"].as_u64())
    })
    .await?;
    let direct = format!("http://127.0.0.1:{port}/messages");
    let mut via_gateway = Vec::new();
    let mut on_host = Vec::new();
    for _ in 0..ROUNDS {
        for _ in 0..PER_ROUND {
            let t = Instant::now();
            let r = http.get(&direct).header("host", "localhost").send().await?;
            anyhow::ensure!(r.status() == 200);
            r.bytes().await?;
            on_host.push(t.elapsed());
        }
        for _ in 0..PER_ROUND {
            let t = Instant::now();
            let r = http
                .get(&through)
                .header("host", HOST)
                .header("x-api-key", &key)
                .send()
                .await?;
            anyhow::ensure!(r.status() == 200);
            r.bytes().await?;
            via_gateway.push(t.elapsed());
        }
    }
    let n = via_gateway.len();
    let (d50, d99) = p50_p99(on_host);
    let (g50, g99) = p50_p99(via_gateway);
    println!();
    println!("| GET /{{id}}/messages ({n} calls, keep-alive) | p50 (ms) | p99 (ms) |");
    println!("| --- | --- | --- |");
    println!("| on the agent's host, to the session's port | {d50:.2} | {d99:.2} |");
    println!("| through the gateway (API key, tunnel, agent) | {g50:.2} | {g99:.2} |");
    println!();
    println!(
        "added by the gateway path: p50 +{:.2} ms, p99 +{:.2} ms",
        g50 - d50,
        g99 - d99
    );
    // End the session (its process outlives a killed agent, by design: it would be resumed).
    http.delete(format!("http://{gw}/sessions/{id}"))
        .header("host", HOST)
        .header("x-api-key", &key)
        .send()
        .await?;
    kakuremichi_e2e::wait_for("the session to end", Duration::from_secs(30), || async {
        let gone = http
            .get(&direct)
            .header("host", "localhost")
            .send()
            .await
            .is_err();
        Ok(gone.then_some(()))
    })
    .await?;
    Ok(())
}

fn mib(kib: Option<u64>) -> f64 {
    kib.unwrap_or(0) as f64 / 1024.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let secs = Duration::from_secs(args.seconds);
    if args.https {
        return https::run(secs).await;
    }
    if args.identity {
        return identity(secs, args.connections).await;
    }
    if args.sessions {
        return sessions().await;
    }
    if args.ui {
        return ui().await;
    }
    if args.fallback {
        return fallback(secs, args.connections).await;
    }
    if let Some(n) = args.keepalive {
        return keepalive(n, secs).await;
    }
    for tool in ["iperf3", "curl", "wg", "wrk"] {
        if which(tool).is_none() {
            bail!("{tool} is missing: run scripts/setup");
        }
    }
    let mut opts = StackOptions::loopback();
    let agent_wg = free_udp_port();
    opts.agent_wg_listen = Some(SocketAddr::from(([127, 0, 0, 1], agent_wg)));
    // Every simulated user comes from 127.0.0.1: lift the per-client connection cap.
    opts.gateway_args = vec!["--max-connections-per-client".into(), "100000".into()];
    let stack = Stack::start_with(opts).await?;
    let dir = stack.dir.path().to_path_buf();

    // iperf3 server for the direct row.
    let iperf_port = free_tcp_port();
    let _iperf = Proc::spawn(
        "iperf3",
        &which("iperf3").context("iperf3")?,
        &["-s".into(), "-p".into(), iperf_port.to_string()],
        &[],
        None,
        dir.join("iperf3.log"),
    )?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let app = stack.opts.app_listen;
    let gateway = stack.opts.gateway_http_for_test;
    let mut rows = Vec::new();

    println!("direct path...");
    rows.push(http_row(
        "direct (no tunnel)",
        app,
        None,
        secs,
        args.connections,
        Some(iperf(iperf_port, secs)?),
    )?);

    println!("kakuremichi gateway -> tunnel -> agent...");
    let idle = (mib(stack.gateway.rss_kib()), mib(stack.agent.rss_kib()));
    let mut row = http_row(
        "kakuremichi: gateway -> WireGuard -> agent",
        gateway,
        Some(DEMO_HOST),
        secs,
        args.connections,
        None,
    )?;
    let (measured, gw_peak, agent_peak) =
        with_peak_rss(&stack, || wrk(gateway, Some(DEMO_HOST), secs, 500));
    let (rps, errors) = measured?;
    row.rps_500 = Some(rps);
    row.rps_500_errors = errors;
    rows.push(row);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = (mib(stack.gateway.rss_kib()), mib(stack.agent.rss_kib()));
    // The agent keeps idle connections to the app for its pool's idle timeout
    // (`kakuremichi_agent::POOL_IDLE_TIMEOUT`, 30 s), and its pool looks for expired ones once
    // per timeout: sampled again after both, once they are gone.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let later = (mib(stack.gateway.rss_kib()), mib(stack.agent.rss_kib()));
    let memory = format!(
        "memory (RSS, MiB): gateway {:.0} idle, {:.0} peak with 500 connections, {:.0} 5 s after, \
         {:.0} 65 s after; agent {:.0} idle, {:.0} peak, {:.0} 5 s after, {:.0} 65 s after \
         (its pool's idle connections to the app closed)",
        idle.0, gw_peak, after.0, later.0, idle.1, agent_peak, after.1, later.1
    );
    println!("{memory}");
    let idle_conns = idle_connections_cost(&stack, gateway, 10_000).await;
    match &idle_conns {
        Ok(line) => println!("{line}"),
        Err(e) => println!("  idle connections: {e:#}"),
    }

    if let Some(rathole) = rathole_path() {
        for noise in [false, true] {
            println!("rathole ({})...", if noise { "noise" } else { "plain" });
            match start_rathole(&rathole, app, noise, &dir) {
                Ok((local, _procs)) => rows.push(http_row(
                    if noise {
                        "rathole, noise (encrypted)"
                    } else {
                        "rathole, plain TCP"
                    },
                    local,
                    None,
                    secs,
                    args.connections,
                    None,
                )?),
                Err(e) => println!("  skipped: {e:#}"),
            }
        }
    } else {
        println!("rathole not found in target/bench-tools (cargo install rathole --root target/bench-tools --no-default-features --features server,client,noise): skipped");
    }

    if !args.no_wireguard_go {
        println!("wireguard-go pair with kernel TCP...");
        match wireguard_go_pair(secs) {
            Ok(mbit) => rows.push(Row {
                path: "reference: wireguard-go pair, kernel TCP (TUN, 2 namespaces)",
                iperf_mbit: Some(mbit),
                ..Row::default()
            }),
            Err(e) => println!("  skipped: {e:#}"),
        }
    }

    println!();
    println!("| path | single-stream TCP, iperf3 (Mbit/s) | single-stream HTTP download (Mbit/s) | single-stream HTTP upload (Mbit/s) | HTTP requests/s ({} connections) | HTTP requests/s (500 connections) |", args.connections);
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        let f = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "n/a".into());
        let errors = if r.http_errors > 0 {
            format!(" ({} errors)", r.http_errors)
        } else {
            String::new()
        };
        let errors_500 = if r.rps_500_errors > 0 {
            format!(" ({} errors)", r.rps_500_errors)
        } else {
            String::new()
        };
        println!(
            "| {} | {} | {} | {} | {}{} | {}{} |",
            r.path,
            f(r.iperf_mbit),
            f(r.http_download_mbit),
            f(r.http_upload_mbit),
            f(r.http_rps),
            errors,
            f(r.rps_500),
            errors_500
        );
    }
    println!("\n{memory}");
    if let Ok(line) = &idle_conns {
        println!("{line}");
    }
    let by = |name: &str| rows.iter().find(|r| r.path.starts_with(name)).cloned();
    let k = by("kakuremichi");
    for base in [
        "rathole, plain",
        "rathole, noise",
        "reference: wireguard-go",
    ] {
        if let (Some(k), Some(b)) = (&k, by(base)) {
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                _ => "n/a".into(),
            };
            println!(
                "kakuremichi / {base}: download {}, upload {}, requests/s {} (32) {} (500)",
                ratio(k.http_download_mbit, b.http_download_mbit.or(b.iperf_mbit)),
                ratio(k.http_upload_mbit, b.http_upload_mbit.or(b.iperf_mbit)),
                ratio(k.http_rps, b.http_rps),
                ratio(k.rps_500, b.rps_500),
            );
        }
    }
    if let (Some(d), Some(k)) = (rows[0].http_download_mbit, rows[1].http_download_mbit) {
        println!("\nkakuremichi download / direct: {:.2}", k / d);
    }
    if let (Some(d), Some(k)) = (rows[0].http_rps, rows[1].http_rps) {
        println!("kakuremichi requests/s / direct: {:.2}", k / d);
    }
    Ok(())
}

/// Opens `n` keep-alive client connections to the gateway, one request on each, holds them idle,
/// and reports what each costs the gateway in RSS.
async fn idle_connections_cost(
    stack: &Stack,
    gateway: SocketAddr,
    n: usize,
) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = stack.gateway.rss_kib().context("gateway RSS")?;
    let mut held = Vec::with_capacity(n);
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {DEMO_HOST}\r\n\r\n");
    let mut buf = [0u8; 1024];
    for _ in 0..n {
        let mut s = tokio::net::TcpStream::connect(gateway).await?;
        s.write_all(request.as_bytes()).await?;
        let got = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await??;
        anyhow::ensure!(buf[..got].starts_with(b"HTTP/1.1 200"), "not 200");
        held.push(s);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = stack.gateway.rss_kib().context("gateway RSS")?;
    let per = after.saturating_sub(before) as f64 * 1024.0 / n as f64 / 1024.0;
    drop(held);
    Ok(format!(
        "{n} idle keep-alive client connections: gateway RSS {:.0} -> {:.0} MiB, {per:.1} KiB each",
        before as f64 / 1024.0,
        after as f64 / 1024.0
    ))
}

/// Download, upload and requests/s (32 connections with reqwest-free wrk, and 500) through `addr`.
async fn fallback(secs: Duration, connections: usize) -> anyhow::Result<()> {
    for tool in ["curl", "wrk", "iptables"] {
        if which(tool).is_none() {
            bail!("{tool} is missing: run scripts/setup");
        }
    }
    const HTTPS_PORT: u16 = 8443;
    let lab = kakuremichi_e2e::netns::NatLab::new()?;
    let mut opts = StackOptions::in_lab(&lab);
    opts.gateway_args.extend([
        "--https-listen".into(),
        format!("0.0.0.0:{HTTPS_PORT}"),
        "--tls-self-signed".into(),
        "--max-connections-per-client".into(),
        "100000".into(),
    ]);
    opts.agent_args
        .extend(["--udp-fallback-port".into(), HTTPS_PORT.to_string()]);
    let stack = Stack::start_with(opts).await?;
    let gateway = stack.opts.gateway_http_for_test;
    println!("over UDP (agent behind the NAT)...");
    let udp = http_row(
        "kakuremichi, agent behind a NAT, WireGuard over UDP",
        gateway,
        Some(DEMO_HOST),
        secs,
        connections,
        None,
    )?;
    for chain in ["OUTPUT", "INPUT"] {
        lab.exec_output(
            &lab.lan_ns,
            &["iptables", "-I", chain, "-p", "udp", "-j", "DROP"],
        )?;
    }
    let blocked = Instant::now();
    kakuremichi_e2e::wait_for("the fallback", Duration::from_secs(20), || async {
        let log = std::fs::read_to_string(stack.agent.log_path()).unwrap_or_default();
        let ok = log.contains("relay open")
            && matches!(
                tokio::time::timeout(Duration::from_secs(1), stack.get(DEMO_HOST, "/")).await,
                Ok(Ok(r)) if r.status() == 200
            );
        Ok(ok.then_some(()))
    })
    .await?;
    println!(
        "UDP dropped: served over the fallback after {:.2} s",
        blocked.elapsed().as_secs_f64()
    );
    let (ws, gw_peak, agent_peak) = with_peak_rss(&stack, || {
        http_row(
            "same, UDP dropped: WireGuard over the WebSocket on the HTTPS port",
            gateway,
            Some(DEMO_HOST),
            secs,
            connections,
            None,
        )
    });
    let ws = ws?;
    println!();
    println!("| path | single-stream HTTP download (Mbit/s) | single-stream HTTP upload (Mbit/s) | HTTP requests/s ({connections} connections) | HTTP requests/s (500 connections) |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for r in [&udp, &ws] {
        let f = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "n/a".into());
        let e = |n: u64| {
            if n > 0 {
                format!(" ({n} errors)")
            } else {
                String::new()
            }
        };
        println!(
            "| {} | {} | {} | {}{} | {}{} |",
            r.path,
            f(r.http_download_mbit),
            f(r.http_upload_mbit),
            f(r.http_rps),
            e(r.http_errors),
            f(r.rps_500),
            e(r.rps_500_errors)
        );
    }
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "n/a".into(),
    };
    println!(
        "\nfallback / UDP: download {}, upload {}, requests/s {} and {} (500 connections); \
         peak RSS over the fallback: gateway {gw_peak:.0} MiB, agent {agent_peak:.0} MiB",
        ratio(ws.http_download_mbit, udp.http_download_mbit),
        ratio(ws.http_upload_mbit, udp.http_upload_mbit),
        ratio(ws.http_rps, udp.http_rps),
        ratio(ws.rps_500, udp.rps_500),
    );
    Ok(())
}

/// One keep-alive client: requests `GET /bytes/1024` on one connection back to back until
/// `until`; returns (responses, errors).
async fn keepalive_client(
    addr: SocketAddr,
    host: &'static str,
    start: tokio::time::Instant,
    until: tokio::time::Instant,
) -> (u64, u64) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    tokio::time::sleep_until(start).await;
    let request = format!("GET /bytes/1024 HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let Ok(Ok(mut conn)) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    else {
        return (0, 1);
    };
    let mut buf = vec![0u8; 4096];
    let (mut ok, mut errors) = (0u64, 0u64);
    while tokio::time::Instant::now() < until {
        if conn.write_all(request.as_bytes()).await.is_err() {
            return (ok, errors + 1);
        }
        // Read the head, then the body by Content-Length.
        let mut have = 0;
        let done = loop {
            let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf[have..])).await
            else {
                break None;
            };
            if n == 0 {
                break None;
            }
            have += n;
            let text = &buf[..have];
            if let Some(end) = text.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&text[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if have >= end + 4 + length {
                    break Some(head.starts_with("http/1.1 200"));
                }
            }
            if have == buf.len() {
                break None;
            }
        };
        match done {
            Some(true) => ok += 1,
            Some(false) => errors += 1,
            None => return (ok, errors + 1),
        }
    }
    (ok, errors)
}

/// `n` keep-alive clients against `addr` for `secs`: (requests/s, errors).
async fn keepalive_run(
    n: usize,
    addr: SocketAddr,
    host: &'static str,
    secs: Duration,
) -> (f64, u64) {
    // Connections open over the first 2 s, so the measurement is of serving, not of a SYN flood.
    let t0 = tokio::time::Instant::now();
    let until = t0 + Duration::from_secs(2) + secs;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let start = t0
                + Duration::from_secs(2) * u32::try_from(i).unwrap_or(0)
                    / u32::try_from(n).unwrap_or(1);
            tokio::spawn(keepalive_client(addr, host, start, until))
        })
        .collect();
    let (mut ok, mut errors) = (0, 0);
    for t in tasks {
        let (o, e) = t.await.unwrap_or((0, 1));
        ok += o;
        errors += e;
    }
    (ok as f64 / (secs.as_secs_f64() + 1.0), errors)
}

async fn keepalive(n: usize, secs: Duration) -> anyhow::Result<()> {
    let want = u64::try_from(n).unwrap_or(u64::MAX).saturating_mul(3) + 1024;
    if let Err(e) = rlimit::increase_nofile_limit(want) {
        println!("cannot raise the open-file limit to {want}: {e}");
    }
    let mut opts = StackOptions::loopback();
    opts.gateway_args = vec![
        "--max-connections-per-client".into(),
        "1000000".into(),
        "--max-connections".into(),
        (n * 2).to_string(),
    ];
    let stack = Stack::start_with(opts).await?;
    let gateway = stack.opts.gateway_http_for_test;
    println!("{n} keep-alive clients on the app directly...");
    let direct = keepalive_run(n, stack.opts.app_listen, DEMO_HOST, secs).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = stack.gateway.rss_kib().context("gateway RSS")?;
    println!("{n} keep-alive clients through the gateway...");
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(idle));
    let sampler = {
        let peak = Arc::clone(&peak);
        let pid = stack.gateway.pid();
        tokio::spawn(async move {
            loop {
                if let Some(kib) = pid.and_then(kakuremichi_e2e::rss_kib) {
                    peak.fetch_max(kib, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let through = keepalive_run(n, gateway, DEMO_HOST, secs).await;
    sampler.abort();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = stack.gateway.rss_kib().unwrap_or(0);
    println!();
    println!("| path | {n} keep-alive connections: requests/s | errors |");
    println!("| --- | ---: | ---: |");
    println!("| direct (no tunnel) | {:.0} | {} |", direct.0, direct.1);
    println!(
        "| kakuremichi: gateway -> WireGuard -> agent | {:.0} | {} |",
        through.0, through.1
    );
    println!(
        "\nthrough / direct: {:.2}; gateway RSS {:.0} MiB idle, {:.0} MiB peak ({:.1} KiB per \
         connection), {:.0} MiB 5 s after",
        if direct.0 > 0.0 {
            through.0 / direct.0
        } else {
            0.0
        },
        idle as f64 / 1024.0,
        peak as f64 / 1024.0,
        peak.saturating_sub(idle) as f64 / n as f64,
        after as f64 / 1024.0
    );
    Ok(())
}

fn http_row(
    path: &'static str,
    addr: SocketAddr,
    host: Option<&str>,
    secs: Duration,
    connections: usize,
    iperf_mbit: Option<f64>,
) -> anyhow::Result<Row> {
    let (rps, errors) = wrk(addr, host, secs, connections)?;
    let (rps_500, errors_500) = wrk(addr, host, secs, 500)?;
    Ok(Row {
        path,
        iperf_mbit,
        http_download_mbit: Some(download(addr, host, secs)?),
        http_upload_mbit: Some(upload(addr, host, secs)?),
        http_rps: Some(rps),
        http_errors: errors,
        rps_500: Some(rps_500),
        rps_500_errors: errors_500,
    })
}

fn rathole_path() -> Option<PathBuf> {
    which("rathole").or_else(|| {
        let p = PathBuf::from("target/bench-tools/bin/rathole");
        p.exists().then_some(p)
    })
}

/// A rathole server and client on loopback forwarding a local port to `app`, plain TCP or with
/// the Noise transport (encrypted, as kakuremichi is); returns the forwarded port's address.
fn start_rathole(
    rathole: &std::path::Path,
    app: SocketAddr,
    noise: bool,
    dir: &std::path::Path,
) -> anyhow::Result<(SocketAddr, Vec<Proc>)> {
    start_rathole_to(rathole, app, noise, false, dir)
}

/// [`start_rathole`], with `tls` when the app at `app` speaks TLS (rathole carries it).
fn start_rathole_to(
    rathole: &std::path::Path,
    app: SocketAddr,
    noise: bool,
    tls: bool,
    dir: &std::path::Path,
) -> anyhow::Result<(SocketAddr, Vec<Proc>)> {
    let control = free_tcp_port();
    let local = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
    let (server_transport, client_transport) = if noise {
        let out = Command::new(rathole).arg("--genkey").output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let keys: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.contains(':'))
            .collect();
        anyhow::ensure!(
            keys.len() >= 2,
            "unexpected `rathole --genkey` output: {text}"
        );
        (
            format!("[server.transport]\ntype = \"noise\"\n[server.transport.noise]\nlocal_private_key = \"{}\"\n", keys[0]),
            format!("[client.transport]\ntype = \"noise\"\n[client.transport.noise]\nremote_public_key = \"{}\"\n", keys[1]),
        )
    } else {
        (String::new(), String::new())
    };
    let tag = if noise { "noise" } else { "plain" };
    let server_toml = dir.join(format!("rathole-server-{tag}.toml"));
    let client_toml = dir.join(format!("rathole-client-{tag}.toml"));
    std::fs::write(
        &server_toml,
        format!("[server]\nbind_addr = \"127.0.0.1:{control}\"\n{server_transport}[server.services.demo]\ntoken = \"bench\"\nbind_addr = \"{local}\"\n"),
    )?;
    std::fs::write(
        &client_toml,
        format!("[client]\nremote_addr = \"127.0.0.1:{control}\"\n{client_transport}[client.services.demo]\ntoken = \"bench\"\nlocal_addr = \"{app}\"\n"),
    )?;
    let server = Proc::spawn(
        "rathole-server",
        rathole,
        &["--server".into(), server_toml.display().to_string()],
        &[],
        None,
        dir.join(format!("rathole-server-{tag}.log")),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let client = Proc::spawn(
        "rathole-client",
        rathole,
        &["--client".into(), client_toml.display().to_string()],
        &[],
        None,
        dir.join(format!("rathole-client-{tag}.log")),
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ok = Command::new("curl")
            .args([
                "-s",
                "-m",
                "1",
                "-o",
                "/dev/null",
                "-k",
                "-w",
                "%{http_code}",
                &if tls {
                    format!("https://localhost:{}/healthz", local.port())
                } else {
                    format!("http://{local}/healthz")
                },
            ])
            .output()
            .map(|o| o.stdout == b"200")
            .unwrap_or(false);
        if ok {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "rathole did not forward within 10 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok((local, vec![server, client]))
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    })
}

/// Single-stream iperf3 client to 127.0.0.1:port; received Mbit/s.
fn iperf(port: u16, secs: Duration) -> anyhow::Result<f64> {
    let out = Command::new("iperf3")
        .args(["-c", "127.0.0.1", "-p", &port.to_string(), "-J", "-t"])
        .arg(secs.as_secs().to_string())
        .output()
        .context("running iperf3")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 gave no result: {}", v["error"]))?;
    Ok(bps / 1e6)
}

/// One HTTP download of a very large body for `secs`, with curl; Mbit/s.
fn download(addr: SocketAddr, host: Option<&str>, secs: Duration) -> anyhow::Result<f64> {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download} %{time_total}",
        "-m",
    ])
    .arg(secs.as_secs().to_string());
    if let Some(h) = host {
        cmd.args(["-H", &format!("Host: {h}")]);
    }
    cmd.arg(format!("http://{addr}/bytes/{}", 64u64 << 30));
    let out = cmd.output().context("running curl")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace();
    let bytes: f64 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .context("curl size")?;
    let time: f64 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .context("curl time")?;
    if bytes == 0.0 {
        bail!("download through {addr} got nothing");
    }
    Ok(bytes * 8.0 / time / 1e6)
}

/// HTTP upload (chunked, from /dev/zero) to the demo app's `/discard`, timed until the app has
/// answered, so that bytes buffered by a proxy do not count: a 16 MiB probe, then a body sized to
/// take about `secs`. Mbit/s.
fn upload(addr: SocketAddr, host: Option<&str>, secs: Duration) -> anyhow::Result<f64> {
    let once = |bytes: u64| -> anyhow::Result<f64> {
        let host_header = host.map(|h| format!("-H 'Host: {h}'")).unwrap_or_default();
        let script = format!(
            "head -c {bytes} /dev/zero | curl -s -m 120 -T - -X POST {host_header} \
             -w ' %{{time_total}}' http://{addr}/discard"
        );
        let out = Command::new("sh")
            .args(["-c", &script])
            .output()
            .context("running curl")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, time) = text.rsplit_once(' ').context("curl output")?;
        let got: serde_json::Value = serde_json::from_str(body)
            .with_context(|| format!("upload through {addr} did not complete: {text}"))?;
        if got["len"].as_u64() != Some(bytes) {
            bail!(
                "upload through {addr}: the app got {} of {bytes} bytes",
                got["len"]
            );
        }
        let time: f64 = time.trim().parse().context("curl time")?;
        Ok(bytes as f64 * 8.0 / time / 1e6)
    };
    let probe = once(16 << 20)?;
    let bytes = (probe * 1e6 / 8.0 * secs.as_secs_f64()) as u64;
    once(bytes.clamp(16 << 20, 64 << 30))
}

fn wg(args: &[&str], stdin: &str) -> anyhow::Result<String> {
    use std::io::Write as _;
    let mut child = Command::new("wg")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running wg")?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(stdin.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Single-stream iperf3 between two network namespaces joined by two wireguard-go instances
/// (TUN devices, the kernel's TCP): the stock userspace WireGuard reference.
fn wireguard_go_pair(secs: Duration) -> anyhow::Result<f64> {
    struct Lab(Vec<String>, Vec<std::process::Child>);
    impl Drop for Lab {
        fn drop(&mut self) {
            for c in &mut self.1 {
                let _ = c.kill();
                let _ = c.wait();
            }
            for ns in &self.0 {
                let _ = Command::new("ip").args(["netns", "del", ns]).output();
            }
        }
    }
    fn sh(args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new(args[0]).args(&args[1..]).output()?;
        if !out.status.success() {
            bail!(
                "`{}`: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
    let id = std::process::id() % 100_000;
    let (a, b) = (format!("kmba{id}"), format!("kmbb{id}"));
    let mut lab = Lab(vec![a.clone(), b.clone()], Vec::new());
    for ns in [&a, &b] {
        sh(&["ip", "netns", "add", ns])?;
        sh(&["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"])?;
    }
    let (va, vb) = (format!("kmva{id}"), format!("kmvb{id}"));
    sh(&[
        "ip", "link", "add", &va, "type", "veth", "peer", "name", &vb,
    ])?;
    sh(&["ip", "link", "set", &va, "netns", &a])?;
    sh(&["ip", "link", "set", &vb, "netns", &b])?;
    let keys: Vec<(String, String)> = (0..2)
        .map(|_| {
            let private = wg(&["genkey"], "")?;
            let public = wg(&["pubkey"], &private)?;
            anyhow::Ok((private, public))
        })
        .collect::<Result<_, _>>()?;
    let dir = tempfile::tempdir()?;
    for (i, (ns, veth)) in [(&a, &va), (&b, &vb)].into_iter().enumerate() {
        let wgif = format!("kmwb{id}{i}");
        sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "ip",
            "addr",
            "add",
            &format!("198.18.200.{}/24", i + 1),
            "dev",
            veth,
        ])?;
        sh(&["ip", "netns", "exec", ns, "ip", "link", "set", veth, "up"])?;
        lab.1.push(
            Command::new("ip")
                .args(["netns", "exec", ns, "wireguard-go", "-f", &wgif])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()?,
        );
        let mut up = false;
        for _ in 0..100 {
            if sh(&["ip", "netns", "exec", ns, "ip", "link", "show", &wgif]).is_ok() {
                up = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !up {
            bail!("wireguard-go did not create {wgif}");
        }
        let key = dir.path().join(format!("key{i}"));
        std::fs::write(&key, &keys[i].0)?;
        let other = 1 - i;
        sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "wg",
            "set",
            &wgif,
            "private-key",
            &key.display().to_string(),
            "listen-port",
            "51820",
            "peer",
            &keys[other].1,
            "allowed-ips",
            &format!("100.127.0.{}/32", other + 1),
            "endpoint",
            &format!("198.18.200.{}:51820", other + 1),
        ])?;
        sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "ip",
            "addr",
            "add",
            &format!("100.127.0.{}/24", i + 1),
            "dev",
            &wgif,
        ])?;
        sh(&[
            "ip", "netns", "exec", ns, "ip", "link", "set", &wgif, "mtu", "1420", "up",
        ])?;
    }
    lab.1.push(
        Command::new("ip")
            .args(["netns", "exec", &b, "iperf3", "-s", "-p", "5201"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?,
    );
    std::thread::sleep(Duration::from_millis(500));
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &a,
            "iperf3",
            "-c",
            "100.127.0.2",
            "-p",
            "5201",
            "-J",
            "-t",
        ])
        .arg(secs.as_secs().to_string())
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 gave no result: {}", v["error"]))?;
    Ok(bps / 1e6)
}

/// The HTTPS benchmark (`--https`).
mod https {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::process::Command;
    use std::time::Duration;

    use anyhow::{bail, Context as _};
    use kakuremichi_e2e::{free_tcp_port, Proc, Stack, StackOptions};

    use super::{rathole_path, start_rathole_to, which};

    /// Requests/s and latency of one load.
    #[derive(Debug, Clone, Copy, Default)]
    struct Load {
        rps: f64,
        p50_ms: f64,
        p99_ms: f64,
        errors: u64,
    }

    #[derive(Debug, Default)]
    struct TlsRow {
        path: &'static str,
        h1: Option<Load>,
        h2: Option<Load>,
        handshakes: Option<Load>,
        fixed: Option<Load>,
    }

    fn ms(v: &str) -> Option<f64> {
        let v = v.trim();
        let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
        let n: f64 = num.parse().ok()?;
        Some(match unit {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            _ => return None,
        })
    }

    /// `wrk` over TLS (`https://localhost:<port>`, so SNI is `localhost`): requests/s, p50, p99.
    fn wrk(port: u16, secs: Duration, connections: usize, close: bool) -> anyhow::Result<Load> {
        let mut cmd = Command::new("wrk");
        cmd.args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{}s", secs.as_secs()),
            "--timeout",
            "10s",
            "--latency",
        ]);
        if close {
            cmd.args(["-H", "Connection: close"]);
        }
        cmd.arg(format!("https://localhost:{port}/bytes/1024"));
        let out = cmd.output().context("running wrk")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let find = |prefix: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(prefix).map(str::to_owned))
        };
        let rps = find("Requests/sec:")
            .and_then(|v| v.trim().parse::<f64>().ok())
            .with_context(|| format!("no Requests/sec in wrk output: {text}"))?;
        let mut errors = 0u64;
        if let Some(rest) = find("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<u64>().unwrap_or(0);
        }
        if let Some(rest) = find("Socket errors:") {
            errors += rest
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
        Ok(Load {
            rps,
            p50_ms: find("50%").and_then(|v| ms(&v)).unwrap_or(f64::NAN),
            p99_ms: find("99%").and_then(|v| ms(&v)).unwrap_or(f64::NAN),
            errors,
        })
    }

    /// `h2load` over TLS: HTTP/2 (or `--h1`), `clients` connections with `streams` requests in
    /// flight each, optionally at `rps` requests/s per client; percentiles from its per-request
    /// log.
    fn h2load(
        port: u16,
        secs: Duration,
        clients: usize,
        streams: usize,
        rps: Option<u32>,
        log: &Path,
    ) -> anyhow::Result<Load> {
        let mut cmd = Command::new("h2load");
        cmd.args([
            &format!("-c{clients}"),
            &format!("-m{streams}"),
            &format!("-D{}", secs.as_secs()),
            "--warm-up-time=1",
            &format!("--log-file={}", log.display()),
        ]);
        if let Some(r) = rps {
            cmd.arg(format!("--rps={r}"));
        }
        cmd.arg(format!("https://localhost:{port}/bytes/1024"));
        let out = cmd.output().context("running h2load")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let finished = text
            .lines()
            .find(|l| l.starts_with("finished in"))
            .with_context(|| format!("no result in h2load output: {text}"))?;
        let rps = finished
            .split(',')
            .find_map(|p| p.trim().strip_suffix(" req/s"))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .with_context(|| format!("no req/s in {finished:?}"))?;
        let errors = text
            .lines()
            .find(|l| l.starts_with("requests:"))
            .map(|l| {
                l.split(',')
                    .filter(|p| {
                        p.contains("failed") || p.contains("errored") || p.contains("timeout")
                    })
                    .filter_map(|p| p.split_whitespace().next()?.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0);
        let mut micros: Vec<u64> = std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
            .collect();
        micros.sort_unstable();
        let pct = |p: f64| {
            if micros.is_empty() {
                return f64::NAN;
            }
            let i = ((micros.len() as f64 - 1.0) * p).round() as usize;
            micros[i.min(micros.len() - 1)] as f64 / 1000.0
        };
        Ok(Load {
            rps,
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            errors,
        })
    }

    fn wait_https(port: u16) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new("curl")
                .args([
                    "-sk",
                    "-m",
                    "2",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    &format!("https://localhost:{port}/healthz"),
                ])
                .output()
                .map(|o| o.stdout == b"200")
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!("https://localhost:{port} did not answer within 30 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn row(path: &'static str, port: u16, secs: Duration, dir: &Path) -> anyhow::Result<TlsRow> {
        println!("{path}...");
        let tag = path.split_whitespace().next().unwrap_or("x");
        Ok(TlsRow {
            path,
            h1: Some(wrk(port, secs, 32, false)?),
            h2: Some(h2load(
                port,
                secs,
                32,
                10,
                None,
                &dir.join(format!("{tag}-h2.log")),
            )?),
            handshakes: Some(wrk(port, secs, 32, true)?),
            fixed: Some(h2load(
                port,
                secs,
                10,
                1,
                Some(100),
                &dir.join(format!("{tag}-fixed.log")),
            )?),
        })
    }

    pub(super) async fn run(secs: Duration) -> anyhow::Result<()> {
        for tool in ["curl", "wrk", "h2load"] {
            if which(tool).is_none() {
                bail!("{tool} is missing: run scripts/setup");
            }
        }
        let https_port = free_tcp_port();
        let mut opts = StackOptions::loopback();
        opts.gateway_args = vec![
            "--max-connections-per-client".into(),
            "100000".into(),
            "--https-listen".into(),
            format!("127.0.0.1:{https_port}"),
            "--tls-self-signed".into(),
        ];
        let stack = Stack::start_with(opts).await?;
        let dir = stack.dir.path().to_path_buf();
        // The resource is named `localhost`, so that clients resolve it and send it as SNI.
        stack
            .api
            .create_resource(
                "localhost",
                &stack.site_id,
                &stack.opts.app_listen.to_string(),
            )
            .await
            .context("creating the localhost resource")?;
        wait_https(https_port)?;

        // The same app serving TLS itself: the direct baseline.
        let tls_app = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        let _tls_app = Proc::spawn(
            "demo-app-tls",
            &kakuremichi_e2e::bin("kakuremichi-demo-app")?,
            &[
                "--listen".into(),
                format!("127.0.0.1:{}", free_tcp_port()),
                "--tls-listen".into(),
                tls_app.to_string(),
            ],
            &[],
            None,
            dir.join("demo-app-tls.log"),
        )?;
        wait_https(tls_app.port())?;

        let mut rows = vec![row(
            "direct: the app serving TLS itself",
            tls_app.port(),
            secs,
            &dir,
        )?];
        let idle = super::mib(stack.gateway.rss_kib());
        let (k, peak, _) = super::with_peak_rss(&stack, || {
            row(
                "kakuremichi: gateway HTTPS -> QUIC in WireGuard -> agent -> app",
                https_port,
                secs,
                &dir,
            )
        });
        rows.push(k?);
        let memory = format!(
            "gateway RSS: {idle:.0} MiB idle, {peak:.0} MiB peak during the HTTPS rows, {:.0} MiB after",
            super::mib(stack.gateway.rss_kib())
        );
        let mut _rathole = Vec::new();
        if let Some(rathole) = rathole_path() {
            for noise in [false, true] {
                match start_rathole_to(&rathole, tls_app, noise, true, &dir) {
                    Ok((local, procs)) => {
                        _rathole.push(procs);
                        rows.push(row(
                            if noise {
                                "rathole noise, carrying the app's TLS"
                            } else {
                                "rathole plain, carrying the app's TLS"
                            },
                            local.port(),
                            secs,
                            &dir,
                        )?);
                    }
                    Err(e) => println!("  rathole skipped: {e:#}"),
                }
            }
        } else {
            println!("rathole not found in target/bench-tools: its rows are skipped");
        }

        println!();
        println!("| path | HTTPS h1 req/s (wrk, 32 conns) | h1 p50 / p99 (ms) | HTTPS h2 req/s (h2load, 32 conns x 10 streams) | h2 p50 / p99 (ms) | new TLS connections/s (wrk, `Connection: close`, 32) | p50 / p99 at 1,000 req/s (h2load h2, 10 conns x 100/s) (ms) |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        let f = |l: &Option<Load>| {
            l.map(|l| {
                if l.errors > 0 {
                    format!("{:.0} ({} errors)", l.rps, l.errors)
                } else {
                    format!("{:.0}", l.rps)
                }
            })
            .unwrap_or_else(|| "n/a".into())
        };
        let lat = |l: &Option<Load>| {
            l.map(|l| format!("{:.2} / {:.2}", l.p50_ms, l.p99_ms))
                .unwrap_or_else(|| "n/a".into())
        };
        for r in &rows {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.path,
                f(&r.h1),
                lat(&r.h1),
                f(&r.h2),
                lat(&r.h2),
                f(&r.handshakes),
                lat(&r.fixed),
            );
        }
        println!("\n{memory}");
        let k = &rows[1];
        for base in &rows {
            if std::ptr::eq(base, k) {
                continue;
            }
            let ratio = |a: &Option<Load>, b: &Option<Load>| match (a, b) {
                (Some(a), Some(b)) if b.rps > 0.0 => format!("{:.2}", a.rps / b.rps),
                _ => "n/a".into(),
            };
            println!(
                "kakuremichi / {}: h1 {}, h2 {}, new TLS connections {}",
                base.path,
                ratio(&k.h1, &base.h1),
                ratio(&k.h2, &base.h2),
                ratio(&k.handshakes, &base.handshakes),
            );
        }
        if let (Some(d), Some(g)) = (rows[0].fixed, k.fixed) {
            println!(
                "added latency at 1,000 req/s: p50 {:+.2} ms, p99 {:+.2} ms",
                g.p50_ms - d.p50_ms,
                g.p99_ms - d.p99_ms
            );
        }
        Ok(())
    }
}
