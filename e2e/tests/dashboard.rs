//! Metrics and the Grafana dashboard (issue 13): the agent's `/metrics` (`--metrics-listen`)
//! counts the requests, streams and bytes that went through it and the dials that failed, and
//! every query of `deploy/grafana/kakuremichi.json` reads metrics that a real control, gateway
//! and agent export.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use kakuremichi_e2e::dashboard::{queries, unexported};
use kakuremichi_e2e::{free_tcp_port, test_http_client, wait_for, Stack, StackOptions, DEMO_HOST};

/// The text at `url`, which must answer 200 with Prometheus's content type.
async fn scrape(url: &str) -> String {
    let r = test_http_client()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("scraping {url}: {e}"));
    assert_eq!(r.status(), 200, "{url}");
    assert_eq!(
        r.headers()[reqwest::header::CONTENT_TYPE],
        "text/plain; version=0.0.4",
        "{url}"
    );
    r.text().await.unwrap()
}

/// The value of the sample `series` (name and labels exactly as written), if there is one.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A stack whose gateway and agent serve metrics; returns it with their ports.
async fn stack_with_metrics() -> (Stack, u16, u16) {
    let gateway_port = free_tcp_port();
    let agent_port = free_tcp_port();
    let mut opts = StackOptions::loopback();
    opts.gateway_args = vec![
        "--metrics-listen".into(),
        format!("127.0.0.1:{gateway_port}"),
    ];
    opts.agent_args = vec!["--metrics-listen".into(), format!("127.0.0.1:{agent_port}")];
    let stack = Stack::start_with(opts).await.unwrap();
    (stack, gateway_port, agent_port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_metrics_count_requests_streams_bytes_and_failed_dials() {
    let (stack, _, agent_port) = stack_with_metrics().await;
    let url = format!("http://127.0.0.1:{agent_port}/metrics");
    let id = &stack.resource_id;
    let target = stack.opts.app_listen;
    let requests =
        format!("kakuremichi_agent_requests_total{{resource_id=\"{id}\",class=\"2xx\"}}");
    let received = format!("kakuremichi_agent_target_bytes_received_total{{resource_id=\"{id}\"}}");
    let http_streams = "kakuremichi_agent_streams_accepted_total{kind=\"http\"}";

    let before = scrape(&url).await;
    for _ in 0..5 {
        let r = stack.get(DEMO_HOST, "/bytes/10000").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap().len(), 10_000);
    }
    let after = scrape(&url).await;
    let delta =
        |series: &str| value(&after, series).unwrap_or(0.0) - value(&before, series).unwrap_or(0.0);
    assert_eq!(delta(&requests), 5.0, "five requests counted\n{after}");
    // The gateway keeps a stream to the agent open across requests (and one for health).
    let streams = value(&after, http_streams).unwrap_or(0.0);
    assert!(streams >= 1.0, "{after}");
    assert!(
        value(&after, "kakuremichi_agent_streams_open{kind=\"http\"}").unwrap_or(0.0) <= streams,
        "{after}"
    );
    assert_eq!(
        value(&after, "kakuremichi_agent_streams_open{kind=\"health\"}"),
        Some(1.0),
        "the gateway's health stream\n{after}"
    );
    assert!(
        delta(&received) >= 50_000.0,
        "the bodies' bytes from the target\n{after}"
    );
    assert!(
        value(
            &after,
            &format!("kakuremichi_agent_target_response_seconds_count{{resource_id=\"{id}\"}}")
        )
        .unwrap_or(0.0)
            >= 5.0,
        "{after}"
    );
    // The version is committed once the whole snapshot is applied, a moment after traffic flows.
    let version = stack.api.config_version().await.unwrap() as f64;
    wait_for(
        "the agent to report the config version",
        Duration::from_secs(5),
        || async {
            let text = scrape(&url).await;
            Ok((value(&text, "kakuremichi_agent_config_version") == Some(version)).then_some(()))
        },
    )
    .await
    .unwrap();
    for (series, want) in [
        ("kakuremichi_agent_control_connected".to_owned(), 1.0),
        ("kakuremichi_agent_peers".to_owned(), 1.0),
        (
            format!("kakuremichi_agent_target_up{{resource_id=\"{id}\",target=\"{target}\"}}"),
            1.0,
        ),
        (
            "kakuremichi_agent_streams_refused_total{reason=\"unknown_resource\"}".to_owned(),
            0.0,
        ),
    ] {
        assert_eq!(value(&after, &series), Some(want), "{series}\n{after}");
    }
    assert!(
        after.lines().any(|l| l
            .starts_with("kakuremichi_agent_peer_handshake_age_seconds{gateway=\"edge\",peer=\"")),
        "the handshake with gateway edge\n{after}"
    );
    assert!(
        value(&after, "process_resident_memory_bytes").unwrap_or(0.0) > 1e6,
        "{after}"
    );

    // A resource whose target does not listen: its dials fail and its target is down.
    let closed = format!("127.0.0.1:{}", free_tcp_port());
    let dead = stack
        .api
        .create_resource("dead.localhost", &stack.site_id, &closed)
        .await
        .unwrap();
    wait_for(
        "the dead resource to answer 502",
        Duration::from_secs(10),
        || async { Ok((stack.get("dead.localhost", "/").await?.status() == 502).then_some(())) },
    )
    .await
    .unwrap();
    let text = scrape(&url).await;
    assert!(
        value(
            &text,
            &format!("kakuremichi_agent_target_dial_failures_total{{resource_id=\"{dead}\"}}")
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            &format!("kakuremichi_agent_target_up{{resource_id=\"{dead}\",target=\"{closed}\"}}")
        ),
        Some(0.0),
        "{text}"
    );
    assert!(
        value(
            &text,
            &format!("kakuremichi_agent_requests_total{{resource_id=\"{dead}\",class=\"5xx\"}}")
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );
    // The agent is reachable only where it was told to listen: /metrics alone.
    let r = test_http_client()
        .get(format!("http://127.0.0.1:{agent_port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_reads_metrics_the_processes_export() {
    let (stack, gateway_port, agent_port) = stack_with_metrics().await;
    for path in ["/", "/bytes/2000", "/nope"] {
        stack.get(DEMO_HOST, path).await.unwrap();
    }
    let control = scrape(&format!("{}/metrics", stack.opts.control_url_for_test)).await;
    let gateway = scrape(&format!("http://127.0.0.1:{gateway_port}/metrics")).await;
    let agent = scrape(&format!("http://127.0.0.1:{agent_port}/metrics")).await;
    let mut exported = BTreeSet::new();
    for text in [&control, &gateway, &agent] {
        exported.extend(kakuremichi_metrics::exported_names(text));
    }

    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/kakuremichi.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let all = queries(&dashboard);
    assert!(all.len() >= 40, "only {} queries in {path}", all.len());
    let bad = unexported(&dashboard, &exported);
    assert!(
        bad.is_empty(),
        "dashboard queries that read what no process exports:\n{}",
        bad.iter()
            .map(|(q, name)| format!("  {}: {name}  ({})", q.place, q.expr))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Every family the agent exports has a panel (its histogram through its series).
    let read: BTreeSet<String> = all
        .iter()
        .flat_map(|q| kakuremichi_e2e::dashboard::metric_names(&q.expr).unwrap())
        .collect();
    let families: Vec<&str> = agent
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE kakuremichi_agent_"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(families.len() >= 15, "{agent}");
    for f in families {
        let family = format!("kakuremichi_agent_{f}");
        assert!(
            read.iter().any(
                |n| *n == family || n.strip_prefix(&family).is_some_and(|s| s.starts_with('_'))
            ),
            "no panel reads {family}"
        );
    }
    // Each process's own metrics are read, and every panel queries the chosen data source.
    for prefix in [
        "kakuremichi_gateway_",
        "kakuremichi_api_",
        "kakuremichi_control_",
    ] {
        assert!(read.iter().any(|n| n.starts_with(prefix)), "{prefix}");
    }
    let panels = dashboard["panels"].as_array().unwrap();
    for p in panels.iter().filter(|p| p.get("targets").is_some()) {
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {} does not use the datasource variable",
            p["title"]
        );
    }
}
