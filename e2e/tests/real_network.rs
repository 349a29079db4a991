//! The data plane on real networks: a lossy router, a NAT that forgets its mappings, a crowd of
//! keep-alive clients, and a resource re-targeted under load.

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kakuremichi_e2e::netns::{NatLab, GW_PUBLIC};
use kakuremichi_e2e::{
    demo_pattern, free_tcp_port, start_demo_app, Stack, StackOptions, DEMO_HOST,
};

const TWENTY_MIB: usize = 20 << 20;

/// Downloads 20 MiB through the tunnel and, as the baseline, with kernel TCP across the same
/// router; checks every byte; returns both times.
async fn download_beside_kernel_tcp(lab: &NatLab, stack: &Stack) -> (Duration, Duration) {
    let started = Instant::now();
    let resp = stack
        .get(DEMO_HOST, &format!("/bytes/{TWENTY_MIB}"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(120), resp.bytes())
        .await
        .expect("the download did not finish in 120 s")
        .unwrap();
    let tunnel = started.elapsed();
    assert_eq!(body.len(), TWENTY_MIB);
    assert!(
        body.iter()
            .enumerate()
            .all(|(i, b)| *b == demo_pattern(i as u64)),
        "downloaded bytes differ"
    );
    let url = format!(
        "http://{}:9100/bytes/{TWENTY_MIB}",
        std::net::Ipv4Addr::from(GW_PUBLIC)
    );
    let out = lab
        .exec_output(
            &lab.lan_ns,
            &[
                "curl",
                "-s",
                "-m",
                "120",
                "-o",
                "/dev/null",
                "-w",
                "%{time_total} %{size_download}",
                &url,
            ],
        )
        .unwrap();
    let mut parts = out.split_whitespace();
    let secs: f64 = parts.next().unwrap().parse().unwrap();
    let size: usize = parts.next().unwrap().parse().unwrap();
    assert_eq!(size, TWENTY_MIB, "kernel TCP baseline incomplete");
    (tunnel, Duration::from_secs_f64(secs))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_mib_download_across_a_lossy_router_completes_byte_exact() {
    let lab = NatLab::new().unwrap();
    let stack = Stack::start_with(StackOptions::in_lab(&lab)).await.unwrap();
    // The kernel TCP baseline's server, on the public side of the same router.
    let _baseline = start_demo_app(
        SocketAddr::from((GW_PUBLIC, 9100)),
        Some(&lab.gw_ns),
        stack.dir.path(),
    )
    .unwrap();
    kakuremichi_e2e::wait_for("the baseline server", Duration::from_secs(10), || async {
        Ok(lab
            .exec_ok(
                &lab.lan_ns,
                &[
                    "curl",
                    "-s",
                    "-m",
                    "1",
                    "-o",
                    "/dev/null",
                    &format!(
                        "http://{}:9100/healthz",
                        std::net::Ipv4Addr::from(GW_PUBLIC)
                    ),
                ],
            )
            .then_some(()))
    })
    .await
    .unwrap();
    for loss in [0.0, 0.01, 0.05, 0.01] {
        lab.set_router_loss(loss).unwrap();
        let (tunnel, kernel) = download_beside_kernel_tcp(&lab, &stack).await;
        let mbit = |d: Duration| (TWENTY_MIB as f64 * 8.0) / d.as_secs_f64() / 1e6;
        println!(
            "{:.0}% random loss each way: 20 MiB through the tunnel in {:.2} s ({:.0} Mbit/s); \
             kernel TCP across the same router {:.2} s ({:.0} Mbit/s)",
            loss * 100.0,
            tunnel.as_secs_f64(),
            mbit(tunnel),
            kernel.as_secs_f64(),
            mbit(kernel)
        );
    }
    lab.set_router_loss(0.0).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nat_that_forgets_its_mappings_and_moves_ports_is_served_again_within_5s() {
    let lab = NatLab::new().unwrap();
    let stack = Stack::start_with(StackOptions::in_lab(&lab)).await.unwrap();
    for (round, ports) in ["41000-41999", "42000-42999"].into_iter().enumerate() {
        let resp = stack.get(DEMO_HOST, "/healthz").await.unwrap();
        assert_eq!(resp.status(), 200);
        lab.rebind(ports).unwrap();
        let moved = Instant::now();
        // Requests keep coming; each waits at most a second.
        let served = kakuremichi_e2e::wait_for(
            "traffic after the NAT rebinding",
            Duration::from_secs(10),
            || async {
                let attempt =
                    tokio::time::timeout(Duration::from_secs(1), stack.get(DEMO_HOST, "/healthz"))
                        .await;
                Ok(matches!(attempt, Ok(Ok(r)) if r.status() == 200).then_some(()))
            },
        )
        .await;
        let took = moved.elapsed();
        assert!(served.is_ok(), "{served:?}\n{}", stack.logs());
        println!("NAT rebinding {}: served again after {took:?}", round + 1);
        assert!(
            took < Duration::from_secs(5),
            "served again only after {took:?}"
        );
    }
    // The gateway now sees the agent from a port of the new range.
    let seen = kakuremichi_e2e::wait_for(
        "the new mapping in the gateway's status",
        Duration::from_secs(15),
        || async {
            let gw = stack
                .api
                .get(&format!("/api/v1/gateways/{}", stack.gateway_id))
                .await?;
            Ok(gw["peers"].to_string().contains(":42").then_some(()))
        },
    )
    .await;
    assert!(seen.is_ok(), "{seen:?}");
}

/// One keep-alive client connection: `requests` GETs in a row on the same TCP connection.
async fn keepalive_client(
    gateway: SocketAddr,
    requests: usize,
    ok: Arc<AtomicUsize>,
) -> anyhow::Result<()> {
    use http_body_util::{BodyExt as _, Empty};
    let tcp = tokio::net::TcpStream::connect(gateway).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<bytes::Bytes>>(
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await?;
    tokio::spawn(conn);
    for _ in 0..requests {
        sender.ready().await?;
        let req = http::Request::get("/bytes/1024")
            .header("host", DEMO_HOST)
            .body(Empty::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::ensure!(
            status == 200,
            "status {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
        anyhow::ensure!(body.len() == 1024, "short body");
        ok.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_concurrent_keepalive_clients_are_all_answered_200() {
    // 2,000 users, all from the harness's one address: lift the per-client cap for them.
    let mut opts = StackOptions::loopback();
    opts.gateway_args = vec!["--max-connections-per-client".into(), "100000".into()];
    let stack = Stack::start_with(opts).await.unwrap();
    let gateway = stack.opts.gateway_http_for_test;
    let ok = Arc::new(AtomicUsize::new(0));
    let clients = 2000;
    let requests = 5;
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| tokio::spawn(keepalive_client(gateway, requests, Arc::clone(&ok))))
        .collect();
    let mut failures = Vec::new();
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(120), t).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => failures.push(e.to_string()),
            Ok(Err(e)) => failures.push(e.to_string()),
            Err(_) => failures.push("timed out".into()),
        }
    }
    println!(
        "{clients} keep-alive clients x {requests} requests: {} answered 200 in {:?}",
        ok.load(Ordering::Relaxed),
        started.elapsed()
    );
    failures.sort();
    failures.dedup();
    assert!(
        failures.is_empty(),
        "failures: {failures:?}\n{}",
        stack.logs()
    );
    assert_eq!(ok.load(Ordering::Relaxed), clients * requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retargeted_resource_gets_no_response_from_the_old_target_once_applied() {
    let stack = Stack::start().await.unwrap();
    let old = stack.opts.app_listen.to_string();
    let new_addr = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
    let new_dir = stack.dir.path().join("new");
    std::fs::create_dir_all(&new_dir).unwrap();
    let _new_app = start_demo_app(new_addr, None, &new_dir).unwrap();
    kakuremichi_e2e::wait_for("the new target", Duration::from_secs(10), || async {
        Ok(reqwest::get(format!("http://{new_addr}/healthz"))
            .await
            .ok()
            .map(|_| ()))
    })
    .await
    .unwrap();

    // Continuous keep-alive load from 16 clients; each response says which target answered.
    let applied_at: Arc<parking_lot::Mutex<Option<Instant>>> = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let stale = Arc::new(AtomicUsize::new(0));
    let fresh = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..16 {
        let http = kakuremichi_e2e::test_http_client();
        let url = format!("http://{}/whoami", stack.opts.gateway_http_for_test);
        let (stop, stale, fresh, applied_at, old) = (
            stop.clone(),
            stale.clone(),
            fresh.clone(),
            applied_at.clone(),
            old.clone(),
        );
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let Ok(resp) = http.get(&url).header("host", DEMO_HOST).send().await else {
                    continue;
                };
                let Ok(who) = resp.text().await else { continue };
                let after_apply = applied_at.lock().is_some_and(|t| sent >= t);
                if after_apply {
                    if who == old {
                        stale.fetch_add(1, Ordering::Relaxed);
                    } else {
                        fresh.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let path = format!("/api/v1/resources/{}", stack.resource_id);
    stack
        .api
        .patch(&path, serde_json::json!({ "target": new_addr.to_string() }))
        .await
        .unwrap();
    let version = stack.api.config_version().await.unwrap();
    let site_path = format!("/api/v1/sites/{}", stack.site_id);
    kakuremichi_e2e::wait_for(
        "the agent to apply the change",
        Duration::from_secs(10),
        || async {
            let site = stack.api.get(&site_path).await?;
            Ok((site["applied_version"].as_u64() >= Some(version)).then_some(()))
        },
    )
    .await
    .unwrap();
    *applied_at.lock() = Some(Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let (stale, fresh) = (stale.load(Ordering::Relaxed), fresh.load(Ordering::Relaxed));
    println!(
        "after the change was applied: {fresh} responses from the new target, {stale} from the old"
    );
    assert!(fresh > 100, "too little load after the change: {fresh}");
    assert_eq!(
        stale, 0,
        "responses from the old target after the change was applied"
    );
}

/// Sends `count` numbered datagrams of 200 bytes, `gap` apart, and collects the echoes for a
/// second after the last: how many came back, and each one's round trip.
async fn udp_echoes(
    client: &Arc<tokio::net::UdpSocket>,
    count: u32,
    gap: Duration,
) -> Vec<Duration> {
    let sent_at = Arc::new(std::sync::Mutex::new(vec![None::<Instant>; count as usize]));
    let receiver = {
        let client = Arc::clone(client);
        let sent_at = Arc::clone(&sent_at);
        tokio::spawn(async move {
            let mut rtts = Vec::new();
            let mut seen = std::collections::HashSet::new();
            let mut buf = vec![0u8; 2048];
            while let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_secs(1), client.recv(&mut buf)).await
            {
                if n != 200 {
                    continue;
                }
                let i = u32::from_be_bytes(buf[..4].try_into().unwrap());
                let at = sent_at.lock().unwrap().get(i as usize).copied().flatten();
                if let Some(at) = at {
                    assert!(seen.insert(i), "datagram {i} echoed twice");
                    assert!(
                        buf[4..n].iter().all(|&b| b == i as u8),
                        "datagram {i} intact"
                    );
                    rtts.push(at.elapsed());
                }
            }
            rtts
        })
    };
    for i in 0..count {
        let mut d = vec![i as u8; 200];
        d[..4].copy_from_slice(&i.to_be_bytes());
        sent_at.lock().unwrap()[i as usize] = Some(Instant::now());
        client.send(&d).await.unwrap();
        tokio::time::sleep(gap).await;
    }
    receiver.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_across_a_lossy_router_loses_datagrams_instead_of_holding_them_up() {
    use kakuremichi_e2e::netns::{GW_FROM_HARNESS, LAN_HOST};
    let lab = NatLab::new().unwrap();
    let stack = Stack::start_with(StackOptions::in_lab(&lab)).await.unwrap();
    let echo = SocketAddr::from((LAN_HOST, 9300));
    let _echo = kakuremichi_e2e::start_demo_app_with(
        SocketAddr::from((LAN_HOST, 9200)),
        &["--udp-echo".into(), echo.to_string()],
        Some(&lab.lan_ns),
        stack.dir.path(),
    )
    .unwrap();
    let port = 5300;
    stack
        .api
        .create_port_resource("udp", port, &stack.site_id, &echo.to_string())
        .await
        .unwrap();
    let client = Arc::new(tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap());
    client
        .connect(SocketAddr::from((GW_FROM_HARNESS, port)))
        .await
        .unwrap();
    kakuremichi_e2e::wait_for(
        "a UDP echo across the NAT",
        Duration::from_secs(20),
        || async {
            let mut buf = vec![0u8; 64];
            client.send(b"ping").await?;
            match tokio::time::timeout(Duration::from_millis(300), client.recv(&mut buf)).await {
                Ok(Ok(4)) => Ok(Some(())),
                _ => Ok(None),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", stack.logs()));
    // Late echoes of the retries above.
    let mut buf = vec![0u8; 64];
    while tokio::time::timeout(Duration::from_millis(300), client.recv(&mut buf))
        .await
        .is_ok()
    {}

    let pct = |rtts: &mut Vec<Duration>, p: f64| -> f64 {
        rtts.sort_unstable();
        let i = ((rtts.len() as f64 * p).ceil() as usize).clamp(1, rtts.len()) - 1;
        rtts[i].as_secs_f64() * 1e3
    };
    // A clean router: every datagram comes back.
    let mut clean = udp_echoes(&client, 500, Duration::from_millis(2)).await;
    assert_eq!(clean.len(), 500, "a clean path loses no datagram");
    // 5% loss each way: a datagram and its echo cross the router once each, so about 90% come
    // back (0.95 x 0.95). Had the tunnel repaired the loss (a stream), all would, late.
    lab.set_router_loss(0.05).unwrap();
    let mut lossy = udp_echoes(&client, 1000, Duration::from_millis(2)).await;
    lab.set_router_loss(0.0).unwrap();
    println!(
        "UDP echo across the NAT router: clean {} of 500 back, p50 {:.2} ms, p99 {:.2} ms; \
         5% loss each way {} of 1000 back, p50 {:.2} ms, p99 {:.2} ms",
        clean.len(),
        pct(&mut clean, 0.5),
        pct(&mut clean, 0.99),
        lossy.len(),
        pct(&mut lossy, 0.5),
        pct(&mut lossy, 0.99),
    );
    assert!(
        (750..990).contains(&lossy.len()),
        "lost datagrams are lost, not resent: {} of 1000 back",
        lossy.len()
    );
}
