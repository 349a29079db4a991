//! The benchmark: single-stream TCP throughput and HTTP requests/s through
//! gateway -> WireGuard tunnel -> agent, each beside the direct path and beside onetun (the same
//! boringtun + smoltcp stack, talking to the same agent), measured in one run on this machine.
//!
//! Needs the release binaries, `iperf3`, `curl`, `wg`, and onetun (installed with
//! `cargo install onetun --root target/bench-tools` when missing). Prints a Markdown table.

#![allow(clippy::print_stdout)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use kakuremichi_e2e::{free_tcp_port, free_udp_port, Proc, Stack, StackOptions, DEMO_HOST};
use serde_json::json;

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
    /// Skip onetun.
    #[arg(long)]
    no_onetun: bool,
    /// Skip the wireguard-go pair with kernel TCP (needs root and network namespaces).
    #[arg(long)]
    no_wireguard_go: bool,
}

#[derive(Debug, Default, Clone)]
struct Row {
    path: &'static str,
    iperf_mbit: Option<f64>,
    http_download_mbit: Option<f64>,
    http_upload_mbit: Option<f64>,
    http_rps: Option<f64>,
    http_errors: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let secs = Duration::from_secs(args.seconds);
    for tool in ["iperf3", "curl", "wg"] {
        if which(tool).is_none() {
            bail!("{tool} is missing: run scripts/setup");
        }
    }
    let onetun = if args.no_onetun {
        None
    } else {
        Some(onetun_path()?)
    };

    let mut opts = StackOptions::loopback();
    let agent_wg = free_udp_port();
    opts.agent_wg_listen = Some(SocketAddr::from(([127, 0, 0, 1], agent_wg)));
    let stack = Stack::start_with(opts).await?;
    let dir = stack.dir.path().to_path_buf();

    // iperf3 server, published as a resource too (its overlay port is what onetun forwards to).
    let iperf_port = free_tcp_port();
    let _iperf = Proc::spawn(
        "iperf3",
        &which("iperf3").context("iperf3")?,
        &["-s".into(), "-p".into(), iperf_port.to_string()],
        &[],
        None,
        dir.join("iperf3.log"),
    )?;
    let iperf_res = stack
        .api
        .create_resource(
            "iperf.localhost",
            &stack.site_id,
            &format!("127.0.0.1:{iperf_port}"),
        )
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let app = stack.opts.app_listen;
    let gateway = stack.opts.gateway_http_for_test;
    let mut rows = Vec::new();

    println!("direct path...");
    rows.push(Row {
        path: "direct (no tunnel)",
        iperf_mbit: Some(iperf(iperf_port, secs)?),
        http_download_mbit: Some(download(app, None, secs)?),
        http_upload_mbit: Some(upload(app, None, secs)?),
        ..measure_rps(app, None, secs, args.connections).await
    });

    println!("kakuremichi gateway -> tunnel -> agent...");
    rows.push(Row {
        path: "kakuremichi: gateway -> WireGuard -> agent",
        iperf_mbit: None,
        http_download_mbit: Some(download(gateway, Some(DEMO_HOST), secs)?),
        http_upload_mbit: Some(upload(gateway, Some(DEMO_HOST), secs)?),
        ..measure_rps(gateway, Some(DEMO_HOST), secs, args.connections).await
    });

    if let Some(onetun) = onetun {
        println!("onetun -> agent...");
        let (local_iperf, local_http, _proc) =
            start_onetun(&stack, &onetun, agent_wg, &iperf_res, &dir).await?;
        let local_http = SocketAddr::from(([127, 0, 0, 1], local_http));
        rows.push(Row {
            path: "onetun -> WireGuard -> agent",
            iperf_mbit: iperf(local_iperf, secs)
                .map_err(|e| println!("  onetun iperf3 failed: {e:#}"))
                .ok(),
            http_download_mbit: Some(download(local_http, None, secs)?),
            http_upload_mbit: Some(upload(local_http, None, secs)?),
            ..measure_rps(local_http, None, secs, args.connections).await
        });
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
    println!("| path | single-stream TCP, iperf3 (Mbit/s) | single-stream HTTP download (Mbit/s) | single-stream HTTP upload (Mbit/s) | HTTP requests/s ({} connections) |", args.connections);
    println!("| --- | ---: | ---: | ---: | ---: |");
    for r in &rows {
        let f = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "n/a".into());
        let errors = if r.http_errors > 0 {
            format!(" ({} errors)", r.http_errors)
        } else {
            String::new()
        };
        println!(
            "| {} | {} | {} | {} | {}{} |",
            r.path,
            f(r.iperf_mbit),
            f(r.http_download_mbit),
            f(r.http_upload_mbit),
            f(r.http_rps),
            errors
        );
    }
    if let (Some(d), Some(k)) = (rows[0].http_download_mbit, rows[1].http_download_mbit) {
        println!("\nkakuremichi download / direct: {:.2}", k / d);
    }
    if let (Some(d), Some(k)) = (rows[0].http_rps, rows[1].http_rps) {
        println!("kakuremichi requests/s / direct: {:.2}", k / d);
    }
    if let Some(o) = rows.get(2) {
        if let (Some(oo), Some(k)) = (o.http_download_mbit, rows[1].http_download_mbit) {
            println!("kakuremichi download / onetun: {:.1}", k / oo);
        }
    }
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    })
}

fn onetun_path() -> anyhow::Result<PathBuf> {
    if let Some(p) = which("onetun") {
        return Ok(p);
    }
    let root = kakuremichi_e2e::bin_dir().join("../bench-tools");
    let path = root.join("bin/onetun");
    if !path.exists() {
        println!("installing onetun into {} ...", root.display());
        let status = Command::new("cargo")
            .args(["install", "onetun", "--locked", "--root"])
            .arg(&root)
            .status()
            .context("running cargo install onetun")?;
        if !status.success() {
            bail!("cargo install onetun failed");
        }
    }
    Ok(path)
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

/// `connections` keep-alive clients sending `GET /` for `secs`.
async fn measure_rps(
    addr: SocketAddr,
    host: Option<&'static str>,
    secs: Duration,
    connections: usize,
) -> Row {
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + secs;
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(connections)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (ok, errors, client) = (ok.clone(), errors.clone(), client.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let mut req = client.get(format!("http://{addr}/"));
                if let Some(h) = host {
                    req = req.header(reqwest::header::HOST, h);
                }
                let good = match req.send().await {
                    Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if good {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Row {
        http_rps: Some(ok.load(Ordering::Relaxed) as f64 / elapsed),
        http_errors: errors.load(Ordering::Relaxed),
        ..Row::default()
    }
}

/// Registers onetun as a peer of the agent (a gateway record enrolled with onetun's key) and
/// starts it forwarding two local ports to the iperf3 and demo-app resources on the agent.
async fn start_onetun(
    stack: &Stack,
    onetun: &std::path::Path,
    agent_wg: u16,
    iperf_resource: &str,
    dir: &std::path::Path,
) -> anyhow::Result<(u16, u16, Proc)> {
    let private = wg(&["genkey"], "")?;
    let public = wg(&["pubkey"], &private)?;
    // Its endpoint is never dialled with success: onetun initiates and the agent learns it.
    let gw = stack.api.create_gateway("onetun", "127.0.0.1:9").await?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    let enrolled: serde_json::Value = http
        .post(format!(
            "{}{}",
            stack.api.base(),
            kakuremichi_proto::ENROLL_PATH
        ))
        .json(&json!({
            "protocol_version": kakuremichi_proto::PROTOCOL_VERSION,
            "kind": "gateway",
            "token": gw.token,
            "public_key": public,
        }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let onetun_ip = enrolled["overlay_address"]
        .as_str()
        .context("overlay")?
        .to_string();
    let site = stack
        .api
        .get(&format!("/api/v1/sites/{}", stack.site_id))
        .await?;
    let agent_ip = site["overlay_address"].as_str().context("agent overlay")?;
    let agent_key = site["public_key"].as_str().context("agent key")?;
    let port_of = |v: serde_json::Value| v["overlay_port"].as_u64().context("overlay_port");
    let iperf_port = port_of(
        stack
            .api
            .get(&format!("/api/v1/resources/{iperf_resource}"))
            .await?,
    )?;
    let demo_port = port_of(
        stack
            .api
            .get(&format!("/api/v1/resources/{}", stack.resource_id))
            .await?,
    )?;
    let (l1, l2) = (free_tcp_port(), free_tcp_port());
    // Let the agent apply the new peer.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let proc = Proc::spawn(
        "onetun",
        onetun,
        &[
            format!("127.0.0.1:{l1}:{agent_ip}:{iperf_port}"),
            format!("127.0.0.1:{l2}:{agent_ip}:{demo_port}"),
            "--endpoint-addr".into(),
            format!("127.0.0.1:{agent_wg}"),
            "--endpoint-public-key".into(),
            agent_key.into(),
            "--private-key".into(),
            private,
            "--source-peer-ip".into(),
            onetun_ip,
            "--keep-alive".into(),
            "10".into(),
        ],
        &[],
        None,
        dir.join("onetun.log"),
    )?;
    kakuremichi_e2e::wait_for("onetun to forward", Duration::from_secs(15), || async {
        let r = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{l2}/"))
            .timeout(Duration::from_secs(3))
            .send()
            .await;
        Ok(r.ok().filter(|r| r.status() == 200).map(|_| ()))
    })
    .await
    .with_context(|| proc.log_tail(20))?;
    Ok((l1, l2, proc))
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
