//! Bad input against the real binaries: the API answers clearly, the data plane shrugs off garbage.

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use kakuremichi_e2e::{Api, Stack, DEMO_HOST};
use rand::{Rng as _, SeedableRng as _};
use serde_json::json;

const ROUTES: &[(&str, &str)] = &[
    ("POST", "/api/v1/sites"),
    ("PATCH", "/api/v1/sites/{site}"),
    ("POST", "/api/v1/gateways"),
    ("PATCH", "/api/v1/gateways/{gateway}"),
    ("POST", "/api/v1/resources"),
    ("PATCH", "/api/v1/resources/{resource}"),
    ("POST", "/api/v1/enroll"),
];

#[tokio::test]
async fn api_rejects_malformed_json_unknown_fields_and_bad_keys() {
    let stack = Stack::start().await.unwrap();
    let http = reqwest::Client::new();
    for (method, path) in ROUTES {
        let path = path
            .replace("{site}", &stack.site_id)
            .replace("{gateway}", &stack.gateway_id)
            .replace("{resource}", &stack.resource_id);
        let url = format!("{}{}", stack.api.base(), path);
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        for body in [
            "{\"name\": ",
            "[1,2",
            "{\"name\":\"x\",\"no_such_field\":1}",
        ] {
            let resp = http
                .request(method.clone(), &url)
                .bearer_auth(kakuremichi_e2e::TEST_ADMIN_KEY)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 400, "{method} {path} with {body}");
            let v: serde_json::Value = resp.json().await.unwrap();
            assert!(v["error"]["message"].is_string(), "{method} {path}: {v}");
        }
    }
    // Every admin route needs the key.
    for path in [
        "/api/v1/sites",
        "/api/v1/gateways",
        "/api/v1/resources",
        "/api/v1/config/version",
    ] {
        let url = format!("{}{}", stack.api.base(), path);
        let resp = http.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 401, "{path} without key");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert!(v["error"]["message"].is_string());
        let resp = http
            .get(&url)
            .bearer_auth("kma_nope_nope")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{path} with a wrong key");
    }
    let wrong = Api::new(stack.api.base(), "kma_wrong_key");
    let (status, _) = wrong
        .call(
            reqwest::Method::POST,
            "/api/v1/sites",
            Some(json!({"name": "x"})),
        )
        .await
        .unwrap();
    assert_eq!(status, 401);
}

#[tokio::test]
async fn websocket_with_a_bad_credential_is_refused() {
    let stack = Stack::start().await.unwrap();
    let url = format!(
        "{}{}",
        stack.api.base().replace("http://", "ws://"),
        kakuremichi_proto::NODE_WS_PATH
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let hello = kakuremichi_proto::NodeMessage::Hello {
        protocol_version: kakuremichi_proto::PROTOCOL_VERSION,
        kind: kakuremichi_proto::NodeKind::Agent,
        node_id: stack.site_id.parse().unwrap(),
        credential: kakuremichi_proto::Secret::new("kmn_not_the_credential"),
        public_key: kakuremichi_proto::WgPublicKey([7; 32]),
        software_version: "test".into(),
        applied_version: None,
    };
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        serde_json::to_string(&hello).unwrap(),
    ))
    .await
    .unwrap();
    let mut refused = false;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        match msg {
            Ok(tokio_tungstenite::tungstenite::Message::Text(t)) => {
                let m: kakuremichi_proto::ControlMessage = serde_json::from_str(&t).unwrap();
                match m {
                    kakuremichi_proto::ControlMessage::Refused { reason, .. } => {
                        assert_eq!(reason, kakuremichi_proto::RefuseReason::BadCredential);
                        refused = true;
                    }
                    other => panic!("a bad credential got {other:?}"),
                }
            }
            Ok(tokio_tungstenite::tungstenite::Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    assert!(refused, "no Refused message before the close");
}

#[tokio::test]
async fn random_datagrams_at_the_gateway_do_not_break_the_tunnel() {
    let mut stack = Stack::start().await.unwrap();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let target = stack.opts.gateway_wg_listen;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b6d);
    let mut buf = vec![0u8; 2048];
    for i in 0..10_000u32 {
        let len = rng.gen_range(0..1500);
        rng.fill(&mut buf[..len]);
        // Some datagrams look like WireGuard messages (types 1-4 with zero padding).
        if i % 3 == 0 && len >= 4 {
            buf[0] = rng.gen_range(1..=4);
            buf[1..4].fill(0);
        }
        sock.send_to(&buf[..len], target).await.unwrap();
        if i % 500 == 0 {
            tokio::task::yield_now().await;
        }
    }
    assert!(
        stack.gateway.is_running(),
        "the gateway died:\n{}",
        stack.gateway.log_tail(40)
    );
    for _ in 0..20 {
        let resp = stack.get(DEMO_HOST, "/").await.unwrap();
        assert_eq!(resp.status(), 200);
    }
}
