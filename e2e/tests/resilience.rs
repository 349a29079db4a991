//! The data plane without control, and nodes that restart.

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use kakuremichi_e2e::{wait_for, Stack, DEMO_HOST};

fn soak_duration() -> Duration {
    let secs = std::env::var("KAKUREMICHI_E2E_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

#[tokio::test]
async fn control_down_data_plane_serves_restarts_from_cache_and_resyncs() {
    let mut stack = Stack::start().await.unwrap();
    stack.stop_control();

    // Continuous requests while control is down: zero failures.
    let soak = soak_duration();
    let started = Instant::now();
    let (mut ok, mut failed) = (0u64, Vec::new());
    while started.elapsed() < soak {
        match stack.get(DEMO_HOST, "/bytes/4096").await {
            Ok(resp) if resp.status() == 200 => match resp.bytes().await {
                Ok(b) if b.len() == 4096 => ok += 1,
                other => failed.push(format!("body: {other:?}")),
            },
            Ok(resp) => failed.push(format!("status {}", resp.status())),
            Err(e) => failed.push(format!("{e:#}")),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "{ok} requests in {soak:?} with control down, {} failed",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "failures with control down: {failed:?}\n{}",
        stack.logs()
    );
    assert!(ok > 100);

    // Both nodes restart while control is still down and serve from their cached config.
    stack.restart_gateway().unwrap();
    stack.restart_agent().unwrap();
    let took = stack.wait_serving(Duration::from_secs(15)).await.unwrap();
    println!("gateway and agent restarted without control: serving again after {took:?}");

    // Control comes back: the nodes resync to its current version.
    stack.start_control_again().await.unwrap();
    let fresh = stack
        .api
        .create_resource(
            "after.localhost",
            &stack.site_id,
            &stack.opts.app_listen.to_string(),
        )
        .await
        .unwrap();
    let version = stack.api.config_version().await.unwrap();
    for kind in ["sites", "gateways"] {
        let id = if kind == "sites" {
            &stack.site_id
        } else {
            &stack.gateway_id
        };
        wait_for(
            &format!("{kind} to apply version {version}"),
            Duration::from_secs(15),
            || async {
                let v = stack.api.get(&format!("/api/v1/{kind}/{id}")).await?;
                Ok(
                    (v["applied_version"].as_u64() == Some(version) && v["online"] == true)
                        .then_some(()),
                )
            },
        )
        .await
        .unwrap();
    }
    wait_for(
        "the resource made after the outage",
        Duration::from_secs(5),
        || async { Ok((stack.get("after.localhost", "/").await?.status() == 200).then_some(())) },
    )
    .await
    .unwrap();
    let _ = fresh;
}

async fn serve_for(stack: &Stack, time: Duration) {
    let started = Instant::now();
    while started.elapsed() < time {
        assert_eq!(stack.get(DEMO_HOST, "/").await.unwrap().status(), 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn assert_resumes_within(stack: &Stack, limit: Duration, what: &str) {
    let took = stack
        .wait_serving(limit)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    println!("{what}: traffic resumed {took:?} after the start");
}

#[tokio::test]
async fn agent_restart_resumes_traffic_within_5s() {
    let mut stack = Stack::start().await.unwrap();
    for _ in 0..2 {
        stack.restart_agent().unwrap();
        assert_resumes_within(&stack, Duration::from_secs(5), "agent restart").await;
    }
}

#[tokio::test]
async fn gateway_restart_resumes_traffic_within_5s() {
    let mut stack = Stack::start().await.unwrap();
    for _ in 0..2 {
        // A gateway that has been serving for a moment (it remembers agents' endpoints within
        // 250 ms of learning them).
        serve_for(&stack, Duration::from_secs(1)).await;
        stack.restart_gateway().unwrap();
        assert_resumes_within(&stack, Duration::from_secs(5), "gateway restart").await;
    }
}
