//! UDP blocked: the agent, behind a real NAT, carries WireGuard over a WebSocket on the
//! gateway's HTTPS port while iptables drops every UDP datagram in its namespace, and moves back
//! to UDP once UDP is allowed again.

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use kakuremichi_e2e::netns::NatLab;
use kakuremichi_e2e::{demo_pattern, Stack, StackOptions, DEMO_HOST};

const TWENTY_MIB: usize = 20 << 20;
const HTTPS_PORT: u16 = 8443;

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

fn log(p: &kakuremichi_e2e::Proc) -> String {
    std::fs::read_to_string(p.log_path()).unwrap_or_default()
}

/// Whether the demo resource answers 200 within a second.
async fn answers(stack: &Stack) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(1), stack.get(DEMO_HOST, "/")).await,
        Ok(Ok(r)) if r.status() == 200
    )
}

/// The UDP datagrams the LAN namespace's DROP rules caught.
fn dropped_udp(lab: &NatLab) -> u64 {
    let out = lab
        .exec_output(&lab.lan_ns, &["iptables", "-L", "OUTPUT", "-v", "-x", "-n"])
        .unwrap();
    out.lines()
        .filter(|l| l.contains("DROP") && l.contains("udp"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_blocked_agent_is_served_over_the_https_port_and_returns_to_udp() {
    let lab = NatLab::new().unwrap();
    let mut opts = StackOptions::in_lab(&lab);
    opts.gateway_args.extend([
        "--https-listen".into(),
        format!("0.0.0.0:{HTTPS_PORT}"),
        "--tls-self-signed".into(),
    ]);
    opts.agent_args
        .extend(["--udp-fallback-port".into(), HTTPS_PORT.to_string()]);
    let stack = Stack::start_with(opts).await.unwrap();
    assert!(answers(&stack).await, "served over UDP first");
    assert_eq!(
        count(&log(&stack.agent), "relay open"),
        0,
        "no relay while UDP works"
    );

    // Block UDP both ways in the agent's namespace (the NAT router still forwards TCP).
    let blocked_at = Instant::now();
    for chain in ["OUTPUT", "INPUT"] {
        let out = lab.exec_output(
            &lab.lan_ns,
            &["iptables", "-I", chain, "-p", "udp", "-j", "DROP"],
        );
        out.unwrap();
    }
    let served_again = kakuremichi_e2e::wait_for(
        "the resource served over the fallback",
        Duration::from_secs(10),
        || async {
            let relayed = count(&log(&stack.agent), "relay open") > 0;
            Ok((relayed && answers(&stack).await).then_some(blocked_at.elapsed()))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", stack.logs()));
    let gateway_log = log(&stack.gateway);
    assert!(
        gateway_log.contains("a peer carries WireGuard over a WebSocket"),
        "the gateway took the relay:\n{}",
        stack.logs()
    );

    // A 20 MiB download through the fallback, byte-exact, while UDP stays blocked.
    let dropped_before = dropped_udp(&lab);
    let started = Instant::now();
    let resp = stack
        .get(DEMO_HOST, &format!("/bytes/{TWENTY_MIB}"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(60), resp.bytes())
        .await
        .expect("the download over the fallback did not finish in 60 s")
        .unwrap();
    let download = started.elapsed();
    assert_eq!(body.len(), TWENTY_MIB);
    assert!(
        body.iter()
            .enumerate()
            .all(|(i, b)| *b == demo_pattern(i as u64)),
        "downloaded bytes differ"
    );
    let probes = dropped_udp(&lab) - dropped_before;
    // Only the probes (one data packet every few seconds) and handshake retries tried UDP.
    assert!(
        probes < 50,
        "{probes} UDP datagrams tried during the download: the data did not take the relay"
    );

    // UDP allowed again: back on UDP within 30 s.
    for chain in ["OUTPUT", "INPUT"] {
        lab.exec_output(
            &lab.lan_ns,
            &["iptables", "-D", chain, "-p", "udp", "-j", "DROP"],
        )
        .unwrap();
    }
    let allowed_at = Instant::now();
    let back_on_udp =
        kakuremichi_e2e::wait_for("the agent back on UDP", Duration::from_secs(30), || async {
            Ok((count(&log(&stack.agent), "UDP works again") > 0).then_some(allowed_at.elapsed()))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", stack.logs()));
    kakuremichi_e2e::wait_for("the relay closed", Duration::from_secs(10), || async {
        Ok((count(&log(&stack.gateway), "relay closed") > 0).then_some(()))
    })
    .await
    .unwrap();
    assert!(answers(&stack).await, "served over UDP again");
    println!(
        "UDP blocked: served again over the WebSocket fallback after {:.2} s; 20 MiB through it in \
         {:.2} s ({:.0} Mbit/s, byte-exact); back on UDP {:.2} s after UDP was allowed",
        served_again.as_secs_f64(),
        download.as_secs_f64(),
        (TWENTY_MIB as f64 * 8.0) / download.as_secs_f64() / 1e6,
        back_on_udp.as_secs_f64()
    );
}
