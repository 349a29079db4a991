//! Faults under continuous keep-alive load through the real path (client -> gateway ->
//! WireGuard/QUIC -> agent -> demo app), one test a fault, each with the same harness
//! ([`kakuremichi_e2e::load`]): N clients on persistent connections, every request recorded.
//! After each fault a figure line is printed (`faults: ...`): requests answered and failed,
//! failures among the requests in flight on the killed part, the longest time a client went
//! without an answer, and how soon every client was answered again. Each test asserts that
//! nothing failed except requests in flight on the killed part, and that service was back
//! within 5 s:
//!
//! - one of two gateways killed: the allowance is the requests on connections to that gateway
//!   in flight at the kill; its clients reconnect to the other, as a client given both
//!   gateways' A records does;
//! - one of two agents serving a resource killed: the allowance is the requests in flight at
//!   the kill (a client cannot tell which target a request went to); the gateway retries
//!   idempotent requests waiting on a target whose agent fell silent on the other, so none
//!   should fail;
//! - a gateway cut off from control for 60 s (a black hole on a router between them): no
//!   failure at all, and the gateway applies the change made meanwhile within 5 s of the end;
//! - the agent's NAT forgetting its mappings and moving its ports: the allowance is the
//!   requests in flight at the flush;
//! - 5% random loss on the agent's NAT router: no failure at all, latency beside a clean link.

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kakuremichi_e2e::fleet::ms;
use kakuremichi_e2e::load::{Fault, Figures, Load, LoadOptions, Record};
use kakuremichi_e2e::netns::{NatLab, RoutedHost};
use kakuremichi_e2e::{
    free_tcp_port, free_udp_port, start_demo_app, start_gateway, test_http_client, wait_for,
    Placement, Stack, StackOptions, DEMO_HOST,
};
use serde_json::json;

/// Clients of every load: modest, as the machine has two cores for everything.
const CLIENTS: usize = 20;
/// What every client asks for, back to back: the target's address, answered after 20 ms (the
/// app's own time, as a real app takes some), so that nearly every client has a request in
/// flight at any moment while the load stays within what two cores carry.
const PATH: &str = "/whoami/slow/20";
/// How soon service must be back after a fault.
const BACK_WITHIN: Duration = Duration::from_secs(5);

fn load_options(gateways: Vec<SocketAddr>, host: &str) -> LoadOptions {
    let mut opts = LoadOptions::new(CLIENTS, gateways, host);
    opts.path = PATH.into();
    opts
}

/// Starts the load and waits until every client has been answered.
async fn start_load(opts: LoadOptions, logs: impl Fn() -> String) -> Load {
    let load = Load::start(opts);
    load.wait_all_answered(Instant::now(), Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", logs()));
    load
}

/// Prints the figure line and asserts the promise: nothing failed beyond the allowance, and
/// with a fault, every client answered again within [`BACK_WITHIN`].
fn judge(label: &str, f: &Figures, logs: impl Fn() -> String) {
    println!("faults: {label}: {f}");
    assert!(
        f.unexpected.is_empty(),
        "{label}: {} requests failed beyond those in flight on the killed part: {}\n{}",
        f.unexpected.len(),
        f.unexpected_sample(),
        logs()
    );
    assert!(f.ok > 0, "{label}: nothing answered");
}

fn judge_back(label: &str, f: &Figures, logs: impl Fn() -> String) {
    match f.back_after {
        Some(b) => assert!(
            b <= BACK_WITHIN,
            "{label}: service back only after {}\n{}",
            ms(b),
            logs()
        ),
        None => panic!("{label}: some client was never answered again\n{}", logs()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_gateways_killed_under_load_fails_only_its_requests_in_flight_and_its_clients_move_over(
) {
    let stack = Stack::start().await.unwrap();
    // A second gateway beside the stack's, with ports and a data folder of its own.
    let mut second = stack.opts.clone();
    let (http, wg) = (free_tcp_port(), free_udp_port());
    second.gateway_http_listen = SocketAddr::from(([127, 0, 0, 1], http));
    second.gateway_http_for_test = second.gateway_http_listen;
    second.gateway_wg_listen = SocketAddr::from(([127, 0, 0, 1], wg));
    second.gateway_endpoint = format!("127.0.0.1:{wg}");
    let gw2 = stack
        .api
        .create_gateway("edge2", &second.gateway_endpoint)
        .await
        .unwrap();
    let dir2 = stack.dir.path().join("second");
    std::fs::create_dir_all(&dir2).unwrap();
    let mut gateway2 = start_gateway(&second, &dir2, Some(&gw2.token)).unwrap();
    let gateway2_log = gateway2.log_path().to_owned();
    let logs = || format!("{}\n{}", stack.logs(), tail(&gateway2_log));
    let http = test_http_client();
    wait_for(
        "the second gateway to serve",
        Duration::from_secs(30),
        || async {
            let r = http
                .get(format!("http://{}/whoami", second.gateway_http_for_test))
                .header("host", DEMO_HOST)
                .send()
                .await?;
            Ok((r.status() == 200).then_some(()))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs()));

    // Clients spread over both: client i starts at gateway i mod 2.
    let gateways = vec![
        stack.opts.gateway_http_for_test,
        second.gateway_http_for_test,
    ];
    let load = start_load(load_options(gateways, DEMO_HOST), logs).await;
    let from = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fault = Fault::cause(|| gateway2.kill());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let to = Instant::now();
    let records = load.stop().await;
    let killed = |r: &Record| r.gateway == Some(1);
    let f = Figures::of(&records, CLIENTS, from, to, Some(fault), killed);
    let on_killed_before: Vec<usize> = clients_where(&records, |r| {
        r.gateway == Some(1) && r.ok() && r.end < fault.at
    });
    let on_survivor_after = clients_where(&records, |r| {
        r.gateway == Some(0) && r.ok() && r.start >= fault.until
    });
    let answered_by_killed_after = records
        .iter()
        .filter(|r| r.gateway == Some(1) && r.ok() && r.start >= fault.until)
        .count();
    judge("one of two gateways killed (kill -9)", &f, logs);
    println!(
        "faults: one of two gateways killed: {} clients were on it, {} clients answered by the \
         other after the kill",
        on_killed_before.len(),
        on_survivor_after.len()
    );
    judge_back("one of two gateways killed", &f, logs);
    assert_eq!(
        on_killed_before.len(),
        CLIENTS / 2,
        "clients spread over both"
    );
    assert_eq!(
        on_survivor_after.len(),
        CLIENTS,
        "every client, those of the killed gateway included, is answered by the other"
    );
    assert_eq!(answered_by_killed_after, 0);
}

/// The last lines of a log file.
fn tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "--- {} ---\n{}",
        path.display(),
        lines[lines.len().saturating_sub(40)..].join("\n")
    )
}

/// The clients that sent at least one request `matching`.
fn clients_where(records: &[Record], matching: impl Fn(&Record) -> bool) -> Vec<usize> {
    let mut clients: Vec<usize> = records
        .iter()
        .filter(|r| matching(r))
        .map(|r| r.client)
        .collect();
    clients.sort_unstable();
    clients.dedup();
    clients
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_agents_killed_under_load_fails_nothing_and_the_other_serves_within_5s() {
    const HOST: &str = "two.localhost";
    let stack = Stack::start().await.unwrap();
    let app1 = stack.opts.app_listen;
    let app2 = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
    let dir2 = stack.dir.path().join("second");
    std::fs::create_dir_all(&dir2).unwrap();
    let _app2 = start_demo_app(app2, None, &dir2).unwrap();
    let site2 = stack.api.create_site("second").await.unwrap();
    let mut agent2 = stack.start_another_agent("second", &site2.token).unwrap();
    let agent2_log = agent2.log_path().to_owned();
    let logs = || format!("{}\n{}", stack.logs(), tail(&agent2_log));
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
            })),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{created}");
    let (one, two) = (app1.to_string(), app2.to_string());
    wait_for(
        "both targets to answer",
        Duration::from_secs(30),
        || async {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..6 {
                let r = stack.get(HOST, "/whoami").await?;
                if r.status() == 200 {
                    seen.insert(r.text().await?);
                }
            }
            Ok((seen.contains(&one) && seen.contains(&two)).then_some(()))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs()));

    let load = start_load(
        load_options(vec![stack.opts.gateway_http_for_test], HOST),
        logs,
    )
    .await;
    let from = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fault = Fault::cause(|| agent2.kill());
    tokio::time::sleep(Duration::from_secs(6)).await;
    let to = Instant::now();
    let records = load.stop().await;
    // A client cannot tell which target a failed request went to: every request in flight at
    // the kill counts as possibly on the killed agent.
    let f = Figures::of(&records, CLIENTS, from, to, Some(fault), |_| true);
    let by = |who: &str, before: bool| {
        records
            .iter()
            .filter(|r| r.start >= from && r.answer() == Some(who))
            .filter(|r| (r.end < fault.at) == before && (before || r.start >= fault.until))
            .count()
    };
    judge("one of two agents killed (kill -9)", &f, logs);
    println!(
        "faults: one of two agents killed: before the kill {} answers by the killed agent's \
         target and {} by the other's; after it {} and {}",
        by(&two, true),
        by(&one, true),
        by(&two, false),
        by(&one, false)
    );
    judge_back("one of two agents killed", &f, logs);
    assert!(by(&two, true) > 0, "both targets served before the kill");
    assert_eq!(by(&two, false), 0, "nothing from the killed agent after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_cut_off_from_control_for_60s_serves_without_a_failure_and_resyncs_within_5s() {
    let cut_for = Duration::from_secs(
        std::env::var("KAKUREMICHI_E2E_CUT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    // The gateway in a namespace of its own behind a router; control, the agent, the app and
    // the clients here. The router is the only way between the gateway and control.
    let host = RoutedHost::new().unwrap();
    let mut opts = StackOptions::loopback();
    let control_port = opts.control_listen.port();
    opts.control_listen = SocketAddr::from(([0, 0, 0, 0], control_port));
    opts.control_url_for_nodes = format!("http://{}:{control_port}", host.harness_addr);
    opts.gateway_at = Placement {
        netns: Some(host.host_ns.clone()),
    };
    opts.gateway_http_listen = SocketAddr::from(([0, 0, 0, 0], 8080));
    opts.gateway_http_for_test = SocketAddr::from((host.host_addr, 8080));
    opts.gateway_wg_listen = SocketAddr::from(([0, 0, 0, 0], 51820));
    opts.gateway_endpoint = format!("{}:51820", host.host_addr);
    let stack = Stack::start_with(opts).await.unwrap();
    let logs = || stack.logs();
    let gateway_path = format!("/api/v1/gateways/{}", stack.gateway_id);
    let site_path = format!("/api/v1/sites/{}", stack.site_id);
    let applied = |path: String| {
        let api = stack.api.clone();
        async move {
            let v = api.get(&path).await?;
            anyhow::Ok(v["applied_version"].as_u64().unwrap_or(0))
        }
    };

    let load = start_load(
        load_options(vec![stack.opts.gateway_http_for_test], DEMO_HOST),
        logs,
    )
    .await;
    let from = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    host.cut_tcp_port(control_port).unwrap();
    let cut_at = Instant::now();

    // An admin change that does not concern the loaded resource: another resource. The agent,
    // still connected, applies it; the gateway cannot hear of it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack
        .api
        .create_resource(
            "unrelated.localhost",
            &stack.site_id,
            &stack.opts.app_listen.to_string(),
        )
        .await
        .unwrap();
    let version = stack.api.config_version().await.unwrap();
    let changed = Instant::now();
    wait_for(
        "the agent to apply the change",
        Duration::from_secs(10),
        || async { Ok((applied(site_path.clone()).await? >= version).then_some(())) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs()));
    let agent_took = changed.elapsed();

    tokio::time::sleep(cut_for.saturating_sub(cut_at.elapsed())).await;
    let behind = applied(gateway_path.clone()).await.unwrap();
    assert!(
        behind < version,
        "the cut gateway applied version {behind} (>= {version}) while cut off: not a black hole"
    );
    let cut_records = load.records();
    let copied = Instant::now();
    host.restore_tcp_port(control_port).unwrap();
    let ended = Instant::now();
    let resynced = wait_for(
        "the gateway to apply the change made while it was cut off",
        Duration::from_secs(60),
        || async { Ok((applied(gateway_path.clone()).await? >= version).then(|| ended.elapsed())) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs()));
    let during = Figures::of(&cut_records, CLIENTS, cut_at, copied, None, |_| false);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let to = Instant::now();
    let records = load.stop().await;
    let whole = Figures::of(&records, CLIENTS, from, to, None, |_| false);
    judge(
        &format!(
            "gateway cut off from control for {} s, during the cut",
            cut_for.as_secs()
        ),
        &during,
        logs,
    );
    judge("gateway cut off from control, whole run", &whole, logs);
    println!(
        "faults: gateway cut off from control: a change made during the cut applied by the \
         agent in {}; the gateway applied it {} after the cut ended",
        ms(agent_took),
        ms(resynced)
    );
    assert!(
        resynced <= BACK_WITHIN,
        "the gateway resynced only {} after the cut ended\n{}",
        ms(resynced),
        logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_nat_forgetting_its_mappings_under_load_fails_nothing_beyond_in_flight() {
    let lab = NatLab::new().unwrap();
    let stack = Stack::start_with(StackOptions::in_lab(&lab)).await.unwrap();
    let logs = || stack.logs();
    let load = start_load(
        load_options(vec![stack.opts.gateway_http_for_test], DEMO_HOST),
        logs,
    )
    .await;
    for (round, ports) in ["41000-41999", "42000-42999"].into_iter().enumerate() {
        let from = Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let fault = Fault::cause(|| lab.rebind(ports).unwrap());
        tokio::time::sleep(Duration::from_secs(5)).await;
        let to = Instant::now();
        // Every request in flight at the flush counts as on the killed part (the mappings).
        let f = Figures::of(&load.records(), CLIENTS, from, to, Some(fault), |_| true);
        let label = format!(
            "NAT mappings flushed and ports moved to {ports} (round {})",
            round + 1
        );
        judge(&label, &f, logs);
        judge_back(&label, &f, logs);
        // The fault was real: the gateway now sees the agent from a port of the new range.
        let range = port_range(ports);
        wait_for(
            "the gateway to see the agent from the new range",
            Duration::from_secs(15),
            || async {
                let gw = stack
                    .api
                    .get(&format!("/api/v1/gateways/{}", stack.gateway_id))
                    .await?;
                let seen = gw["peers"].as_array().into_iter().flatten().any(|p| {
                    p["endpoint"]
                        .as_str()
                        .and_then(|e| e.parse::<SocketAddr>().ok())
                        .is_some_and(|e| range.contains(&e.port()))
                });
                Ok(seen.then_some(()))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", logs()));
    }
    load.stop().await;
}

/// `"41000-41999"` as a range.
fn port_range(ports: &str) -> std::ops::RangeInclusive<u16> {
    let (low, high) = ports.split_once('-').unwrap();
    low.parse().unwrap()..=high.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_percent_loss_on_the_nat_router_under_load_fails_nothing() {
    let lab = NatLab::new().unwrap();
    let stack = Stack::start_with(StackOptions::in_lab(&lab)).await.unwrap();
    let logs = || stack.logs();
    let load = start_load(
        load_options(vec![stack.opts.gateway_http_for_test], DEMO_HOST),
        logs,
    )
    .await;
    let from = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let clean_to = Instant::now();
    lab.set_router_loss(0.05).unwrap();
    let lossy_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(15)).await;
    let lossy_to = Instant::now();
    lab.set_router_loss(0.0).unwrap();
    let records = load.stop().await;
    let clean = Figures::of(&records, CLIENTS, from, clean_to, None, |_| false);
    let lossy = Figures::of(&records, CLIENTS, lossy_from, lossy_to, None, |_| false);
    judge("clean NAT router", &clean, logs);
    judge("5% random loss each way on the NAT router", &lossy, logs);
}
