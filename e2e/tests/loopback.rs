//! End to end on loopback: real control, gateway, agent and demo app processes.

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use kakuremichi_e2e::{demo_pattern, wait_for, Stack, StackOptions, DEMO_HOST};
use sha2::{Digest as _, Sha256};

#[tokio::test]
async fn get_through_the_tunnel_returns_the_apps_body() {
    let stack = Stack::start().await.unwrap();
    let resp = stack.get(DEMO_HOST, "/").await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    assert!(
        body.contains("Hello from the kakuremichi demo app"),
        "{body}"
    );
    // Host matching ignores case and the port.
    let resp = stack.get("DEMO.localhost:8080", "/").await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn ten_mib_download_and_upload_are_byte_exact() {
    let stack = Stack::start().await.unwrap();
    const N: u64 = 10 * 1024 * 1024;

    let resp = stack.get(DEMO_HOST, &format!("/bytes/{N}")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.bytes().await.unwrap();
    assert_eq!(body.len() as u64, N);
    let wrong = body
        .iter()
        .enumerate()
        .find(|(i, b)| **b != demo_pattern(*i as u64));
    assert!(wrong.is_none(), "byte {:?} differs", wrong.map(|w| w.0));

    let upload: Vec<u8> = (0..N).map(|i| (i.wrapping_mul(7919) >> 3) as u8).collect();
    let expected = format!("{:x}", Sha256::digest(&upload));
    let resp = stack
        .request_builder(reqwest::Method::POST, DEMO_HOST, "/sha256")
        .body(upload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["len"].as_u64(), Some(N));
    assert_eq!(v["sha256"].as_str(), Some(expected.as_str()));

    // Streaming both ways at once: the echo comes back while the upload is still going.
    let resp = stack
        .request_builder(reqwest::Method::POST, DEMO_HOST, "/echo")
        .body(upload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echoed = resp.bytes().await.unwrap();
    assert!(echoed[..] == upload[..], "echo differs");
}

#[tokio::test]
async fn hundred_concurrent_requests_all_succeed() {
    let stack = Stack::start().await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..100u64 {
        let req = stack.request_builder(
            reqwest::Method::GET,
            DEMO_HOST,
            &format!("/bytes/{}", 1000 + i),
        );
        tasks.push(tokio::spawn(async move {
            let resp = req.send().await?;
            let status = resp.status();
            let len = resp.bytes().await?.len();
            anyhow::Ok((status, len))
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, len) = t.await.unwrap().unwrap();
        assert_eq!(status, 200, "request {i}");
        assert_eq!(len, 1000 + i, "request {i}");
    }
}

#[tokio::test]
async fn forwarded_headers_reach_the_app() {
    let stack = Stack::start().await.unwrap();
    let resp = stack.get(DEMO_HOST, "/headers").await.unwrap();
    assert_eq!(resp.status(), 200);
    let h: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(h["x-forwarded-for"].as_str(), Some("127.0.0.1"), "{h}");
    assert_eq!(h["x-forwarded-proto"].as_str(), Some("http"), "{h}");
    assert_eq!(h["x-forwarded-host"].as_str(), Some(DEMO_HOST), "{h}");
}

#[tokio::test]
async fn error_pages_unknown_host_refused_target_and_timeout() {
    let mut opts = StackOptions::loopback();
    opts.gateway_args = vec!["--upstream-timeout".into(), "2".into()];
    let stack = Stack::start_with(opts).await.unwrap();

    let resp = stack.get("nobody.localhost", "/").await.unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp.text().await.unwrap().contains("nobody.localhost"));

    // A resource whose target refuses connections.
    let closed = kakuremichi_e2e::free_tcp_port();
    stack
        .api
        .create_resource(
            "refused.localhost",
            &stack.site_id,
            &format!("127.0.0.1:{closed}"),
        )
        .await
        .unwrap();
    let status = wait_for(
        "refused.localhost to be routed",
        Duration::from_secs(5),
        || async {
            let s = stack.get("refused.localhost", "/").await?.status().as_u16();
            Ok((s != 404).then_some(s))
        },
    )
    .await
    .unwrap();
    assert_eq!(status, 502);

    // A target slower than the upstream timeout.
    let started = Instant::now();
    let resp = stack.get(DEMO_HOST, "/slow/10000").await.unwrap();
    assert_eq!(resp.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(8));

    // And the resource still works afterwards.
    assert_eq!(stack.get(DEMO_HOST, "/").await.unwrap().status(), 200);
}

#[tokio::test]
async fn created_resource_is_reachable_within_2s_and_deleted_one_404s_within_2s() {
    let stack = Stack::start().await.unwrap();
    let target = stack.opts.app_listen.to_string();
    let started = Instant::now();
    let id = stack
        .api
        .create_resource("fresh.localhost", &stack.site_id, &target)
        .await
        .unwrap();
    wait_for(
        "the new resource to answer",
        Duration::from_secs(2),
        || async {
            let resp = stack.get("fresh.localhost", "/").await?;
            Ok((resp.status() == 200).then_some(()))
        },
    )
    .await
    .unwrap();
    println!("created -> reachable in {:?}", started.elapsed());

    let started = Instant::now();
    stack.api.delete_resource(&id).await.unwrap();
    wait_for(
        "the deleted resource to 404",
        Duration::from_secs(2),
        || async {
            let resp = stack.get("fresh.localhost", "/").await?;
            Ok((resp.status() == 404).then_some(()))
        },
    )
    .await
    .unwrap();
    println!("deleted -> 404 in {:?}", started.elapsed());
    // The other resource is undisturbed.
    assert_eq!(stack.get(DEMO_HOST, "/").await.unwrap().status(), 200);
}

#[tokio::test]
async fn node_status_is_visible_through_the_api() {
    let stack = Stack::start().await.unwrap();
    let version = stack.api.config_version().await.unwrap();
    let site = wait_for("the site to report", Duration::from_secs(10), || async {
        let s = stack
            .api
            .get(&format!("/api/v1/sites/{}", stack.site_id))
            .await?;
        let ok = s["online"] == true
            && s["applied_version"].as_u64() == Some(version)
            && !s["last_handshake_at"].is_null();
        Ok(ok.then_some(s))
    })
    .await
    .unwrap();
    assert!(site["overlay_address"]
        .as_str()
        .unwrap()
        .starts_with("100."));
    let gw = stack
        .api
        .get(&format!("/api/v1/gateways/{}", stack.gateway_id))
        .await
        .unwrap();
    assert_eq!(gw["online"], true, "{gw}");
}

#[tokio::test]
async fn config_changes_do_not_drop_unrelated_connections() {
    let stack = Stack::start().await.unwrap();
    // An upload that trickles for ~3 s through the tunnel, echoed back as it goes.
    let chunks: Vec<Vec<u8>> = (0..30u8).map(|i| vec![i; 10_000]).collect();
    let expected: Vec<u8> = chunks.concat();
    let body = futures_util::stream::iter(chunks).then(|c| async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok::<_, std::io::Error>(c)
    });
    let req = stack
        .request_builder(reqwest::Method::POST, DEMO_HOST, "/echo")
        .body(reqwest::Body::wrap_stream(body));
    let upload = tokio::spawn(async move {
        let resp = req.send().await?;
        anyhow::Ok((resp.status(), resp.bytes().await?))
    });
    // Meanwhile: new sites and resources, a deleted resource, a renamed one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let target = stack.opts.app_listen.to_string();
    let other = stack.api.create_site("other").await.unwrap();
    let a = stack
        .api
        .create_resource("a.localhost", &stack.site_id, &target)
        .await
        .unwrap();
    stack
        .api
        .create_resource("b.localhost", &other.id, &target)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.api.delete_resource(&a).await.unwrap();
    let (status, _) = stack
        .api
        .call(
            reqwest::Method::PATCH,
            &format!("/api/v1/sites/{}", stack.site_id),
            Some(serde_json::json!({"name": "home-renamed"})),
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (status, echoed) = upload.await.unwrap().unwrap();
    assert_eq!(status, 200);
    assert!(echoed[..] == expected[..], "the echo was cut or changed");
}

#[tokio::test]
async fn agent_offline_gives_a_clear_502() {
    let mut stack = Stack::start().await.unwrap();
    stack.agent.kill();
    let started = Instant::now();
    let resp = stack.get(DEMO_HOST, "/").await.unwrap();
    assert_eq!(resp.status(), 502);
    let body = resp.text().await.unwrap();
    assert!(
        body.contains(DEMO_HOST) && body.contains("offline"),
        "{body}"
    );
    println!("agent offline -> 502 after {:?}", started.elapsed());
    // The tunnel's QUIC idle timeout (5 s after the agent last answered, which was before the
    // request) fails the stream; a second of slack for a loaded machine.
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn websocket_upgrade_passes_through_the_gateway() {
    use futures_util::SinkExt as _;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    use tokio_tungstenite::tungstenite::Message;

    let stack = Stack::start().await.unwrap();
    let mut req = format!("ws://{}/ws", stack.opts.gateway_http_for_test)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("host", DEMO_HOST.parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..20 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got, Message::text(format!("hello {i}")));
    }
    let big = vec![7u8; 1 << 20];
    ws.send(Message::binary(big.clone())).await.unwrap();
    let got = ws.next().await.unwrap().unwrap();
    assert_eq!(got.into_data().len(), big.len());
    ws.close(None).await.unwrap();
}
