//! Node hub tests: a real server on 127.0.0.1:0 and tokio-tungstenite clients.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use kakuremichi_proto::{
    ControlMessage, EnrollResponse, NodeKind, NodeMessage, PeerStatus, RefuseReason, Secret,
    StatusReport, WgPublicKey, NODE_WS_PATH,
};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::common::{self, ADMIN_KEY};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

struct Server {
    addr: SocketAddr,
    http: reqwest::Client,
    state: kakuremichi_control::AppState,
    _db: common::TestDb,
}

impl Server {
    async fn start() -> Self {
        let db = common::sqlite().await;
        let state = common::state(&db).await;
        let addr = common::serve(state.clone()).await;
        Self {
            addr,
            http: reqwest::Client::new(),
            state,
            _db: db,
        }
    }

    async fn api(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .http
            .request(method, format!("http://{}/api/v1{path}", self.addr))
            .bearer_auth(ADMIN_KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        resp.json().await.unwrap()
    }

    /// Creates and enrolls a node; returns its id and credential.
    async fn enrolled(&self, kind: NodeKind, name: &str, key: u8) -> EnrollResponse {
        let created = match kind {
            NodeKind::Agent => {
                self.api(reqwest::Method::POST, "/sites", Some(json!({"name": name})))
                    .await
            }
            NodeKind::Gateway => {
                self.api(
                    reqwest::Method::POST,
                    "/gateways",
                    Some(json!({"name": name, "endpoint": "127.0.0.1:51820"})),
                )
                .await
            }
        };
        let body = json!({
            "protocol_version": 1,
            "kind": kind,
            "token": created["enrollment_token"],
            "public_key": WgPublicKey([key; 32]),
        });
        let resp = self
            .http
            .post(format!("http://{}/api/v1/enroll", self.addr))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
        resp.json().await.unwrap()
    }

    async fn connect(&self) -> Ws {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}{NODE_WS_PATH}", self.addr))
            .await
            .unwrap();
        ws
    }
}

fn hello(e: &EnrollResponse, credential: &str, version: u32, key: u8) -> NodeMessage {
    NodeMessage::Hello {
        protocol_version: version,
        kind: e.kind,
        node_id: e.node_id,
        credential: Secret::new(credential),
        public_key: WgPublicKey([key; 32]),
        software_version: "9.9.9-test".into(),
        applied_version: None,
    }
}

async fn send(ws: &mut Ws, msg: &NodeMessage) {
    ws.send(Message::text(serde_json::to_string(msg).unwrap()))
        .await
        .unwrap();
}

/// The next control message, skipping pings.
async fn recv(ws: &mut Ws) -> ControlMessage {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("no message within 5 s")
            .expect("socket closed")
            .unwrap();
        if let Message::Text(t) = msg {
            let m: ControlMessage = serde_json::from_str(t.as_str()).unwrap();
            if !matches!(m, ControlMessage::Ping { .. }) {
                return m;
            }
        }
    }
}

/// Receives a `Refused`; returns its reason and message.
async fn recv_refused(ws: &mut Ws) -> (RefuseReason, String) {
    match recv(ws).await {
        ControlMessage::Refused {
            reason, message, ..
        } => (reason, message),
        other => panic!("expected refused, got {other:?}"),
    }
}

async fn expect_closed(ws: &mut Ws) {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
        {
            None | Some(Err(_)) => return,
            Some(Ok(Message::Close(frame))) => {
                assert_eq!(u16::from(frame.unwrap().code), 1008);
                return;
            }
            Some(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn good_hello_gets_welcome_and_config_then_pushes() {
    let s = Server::start().await;
    let gw = s.enrolled(NodeKind::Gateway, "edge", 1).await;
    let site = s.enrolled(NodeKind::Agent, "home", 2).await;
    let mut ws = s.connect().await;
    send(&mut ws, &hello(&gw, gw.credential.expose(), 1, 1)).await;
    assert_eq!(
        recv(&mut ws).await,
        ControlMessage::Welcome {
            protocol_version: 1,
            node_id: gw.node_id
        }
    );
    let ControlMessage::Config(first) = recv(&mut ws).await else {
        panic!("expected a config")
    };
    assert_eq!(first.node_id, gw.node_id);
    assert_eq!(first.overlay.address, gw.overlay_address);
    assert_eq!(first.peers.len(), 1);
    assert_eq!(first.peers[0].node_id, site.node_id);
    assert!(first.routes.is_empty());

    // The agent gets the gateway as a peer with its endpoint.
    let mut agent = s.connect().await;
    send(&mut agent, &hello(&site, site.credential.expose(), 1, 2)).await;
    assert!(matches!(
        recv(&mut agent).await,
        ControlMessage::Welcome { .. }
    ));
    let ControlMessage::Config(asnap) = recv(&mut agent).await else {
        panic!("expected a config")
    };
    assert_eq!(asnap.peers[0].endpoint.as_deref(), Some("127.0.0.1:51820"));
    assert_eq!(asnap.peers[0].persistent_keepalive, Some(25));

    // Creating a resource pushes a new snapshot with a higher version within 1 s to both.
    s.api(
        reqwest::Method::POST,
        "/resources",
        Some(json!({"hostname": "demo.localhost", "site_id": site.node_id, "target": "127.0.0.1:9000"})),
    )
    .await;
    let pushed = tokio::time::timeout(Duration::from_secs(1), recv(&mut ws))
        .await
        .expect("no push within 1 s");
    let ControlMessage::Config(next) = pushed else {
        panic!("expected a config")
    };
    assert!(next.version > first.version);
    assert_eq!(next.routes.len(), 1);
    assert_eq!(next.routes[0].hostname, "demo.localhost");
    assert_eq!(next.routes[0].port, 10000);
    let ControlMessage::Config(anext) =
        tokio::time::timeout(Duration::from_secs(1), recv(&mut agent))
            .await
            .expect("no push within 1 s")
    else {
        panic!("expected a config")
    };
    assert_eq!(anext.targets.len(), 1);
    assert_eq!(anext.targets[0].target, "127.0.0.1:9000");

    // Node pings are answered.
    send(&mut ws, &NodeMessage::Ping { nonce: 77 }).await;
    assert_eq!(recv(&mut ws).await, ControlMessage::Pong { nonce: 77 });

    // Online shows through the API and metrics.
    let got = s
        .api(
            reqwest::Method::GET,
            &format!("/gateways/{}", gw.node_id),
            None,
        )
        .await;
    assert_eq!(got["online"], true);
    assert_eq!(got["software_version"], "9.9.9-test");
}

#[tokio::test]
async fn bad_credential_is_refused() {
    let s = Server::start().await;
    let gw = s.enrolled(NodeKind::Gateway, "edge", 1).await;
    let mut ws = s.connect().await;
    send(&mut ws, &hello(&gw, "kmc_wrong", 1, 1)).await;
    let (reason, _) = recv_refused(&mut ws).await;
    assert_eq!(reason, RefuseReason::BadCredential);
    expect_closed(&mut ws).await;
    // The wrong kind for the id is a bad credential too.
    let mut ws = s.connect().await;
    let mut h = hello(&gw, gw.credential.expose(), 1, 1);
    if let NodeMessage::Hello { kind, .. } = &mut h {
        *kind = NodeKind::Agent;
    }
    send(&mut ws, &h).await;
    let (reason, _) = recv_refused(&mut ws).await;
    assert_eq!(reason, RefuseReason::BadCredential);
}

#[tokio::test]
async fn unsupported_protocol_version_is_refused_clearly() {
    let s = Server::start().await;
    let gw = s.enrolled(NodeKind::Gateway, "edge", 1).await;
    let mut ws = s.connect().await;
    send(&mut ws, &hello(&gw, gw.credential.expose(), 99, 1)).await;
    let (reason, message) = recv_refused(&mut ws).await;
    assert_eq!(reason, RefuseReason::UnsupportedProtocolVersion);
    assert!(
        message.contains("unsupported protocol version 99"),
        "{message}"
    );
    expect_closed(&mut ws).await;
}

#[tokio::test]
async fn bad_hello_is_refused() {
    let s = Server::start().await;
    let mut ws = s.connect().await;
    ws.send(Message::text("{\"type\": \"hello\", \"nonsense\": true}"))
        .await
        .unwrap();
    let (reason, _) = recv_refused(&mut ws).await;
    assert_eq!(reason, RefuseReason::BadHello);
}

#[tokio::test]
async fn applied_and_status_are_visible_through_get() {
    let s = Server::start().await;
    let gw = s.enrolled(NodeKind::Gateway, "edge", 1).await;
    let site = s.enrolled(NodeKind::Agent, "home", 2).await;
    let mut ws = s.connect().await;
    send(&mut ws, &hello(&site, site.credential.expose(), 1, 2)).await;
    recv(&mut ws).await;
    let ControlMessage::Config(snap) = recv(&mut ws).await else {
        panic!("expected a config")
    };
    send(
        &mut ws,
        &NodeMessage::Applied {
            version: snap.version,
        },
    )
    .await;
    send(
        &mut ws,
        &NodeMessage::Status(StatusReport {
            session_accesses: Vec::new(),
            session_labels: Default::default(),
            traffic: Vec::new(),
            sessions: Vec::new(),
            applied_version: snap.version,
            peers: vec![PeerStatus {
                public_key: WgPublicKey([1; 32]),
                endpoint: Some("127.0.0.1:51820".into()),
                last_handshake_age_ms: Some(2000),
                tx_bytes: 10,
                rx_bytes: 20,
            }],
            targets: vec![],
            refusals: vec![],
        }),
    )
    .await;
    let path = format!("/sites/{}", site.node_id);
    let mut got = Value::Null;
    for _ in 0..50 {
        got = s.api(reqwest::Method::GET, &path, None).await;
        if !got["peers"].as_array().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(got["online"], true, "{got}");
    assert_eq!(got["enrolled"], true);
    assert_eq!(got["applied_version"], snap.version);
    assert_eq!(got["software_version"], "9.9.9-test");
    assert_eq!(got["peers"][0]["tx_bytes"], 10);
    let time = |field: &str| {
        kakuremichi_control::times::parse_time_ms(got[field].as_str().unwrap()).unwrap()
    };
    assert!(time("last_seen_at") > 0);
    assert_eq!(time("last_handshake_at"), time("status_at") - 2000);
    let _ = gw;

    // After the socket closes the node is offline, with its last status kept.
    ws.close(None).await.unwrap();
    for _ in 0..50 {
        got = s.api(reqwest::Method::GET, &path, None).await;
        if got["online"] == false {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(got["online"], false);
    assert_eq!(got["peers"][0]["rx_bytes"], 20);
}

#[tokio::test]
async fn new_public_key_in_hello_is_stored_and_bumps() {
    let s = Server::start().await;
    let site = s.enrolled(NodeKind::Agent, "home", 2).await;
    let v1 = s.api(reqwest::Method::GET, "/config/version", None).await["version"]
        .as_u64()
        .unwrap();
    let mut ws = s.connect().await;
    send(&mut ws, &hello(&site, site.credential.expose(), 1, 3)).await;
    recv(&mut ws).await;
    let ControlMessage::Config(snap) = recv(&mut ws).await else {
        panic!("expected a config")
    };
    assert!(snap.version > v1);
    let got = s
        .api(
            reqwest::Method::GET,
            &format!("/sites/{}", site.node_id),
            None,
        )
        .await;
    assert_eq!(got["public_key"], WgPublicKey([3; 32]).to_base64());
}

/// Receives the welcome and the first config of a hello that was accepted.
async fn welcomed(ws: &mut Ws) -> kakuremichi_proto::ConfigSnapshot {
    assert!(matches!(recv(ws).await, ControlMessage::Welcome { .. }));
    match recv(ws).await {
        ControlMessage::Config(c) => c,
        other => panic!("expected a config, got {other:?}"),
    }
}

async fn add_resource(s: &Server, site: &EnrollResponse, hostname: &str) {
    s.api(
        reqwest::Method::POST,
        "/resources",
        Some(json!({"hostname": hostname, "site_id": site.node_id, "target": "127.0.0.1:9000"})),
    )
    .await;
}

#[tokio::test]
async fn a_hello_with_another_nodes_key_is_refused_and_the_owner_keeps_working() {
    let s = Server::start().await;
    let gw = s.enrolled(NodeKind::Gateway, "edge", 1).await;
    let a = s.enrolled(NodeKind::Agent, "a", 2).await;
    let b = s.enrolled(NodeKind::Agent, "b", 3).await;
    let mut gws = s.connect().await;
    send(&mut gws, &hello(&gw, gw.credential.expose(), 1, 1)).await;
    let first = welcomed(&mut gws).await;
    assert_eq!(first.peers.len(), 2);

    // Site b, with its own valid credential, claims site a's key (2), then the gateway's (1).
    for stolen in [2, 1] {
        let mut bws = s.connect().await;
        send(&mut bws, &hello(&b, b.credential.expose(), 1, stolen)).await;
        let (reason, message) = recv_refused(&mut bws).await;
        assert_eq!(reason, RefuseReason::KeyInUse);
        assert!(message.contains("another node"), "{message}");
        expect_closed(&mut bws).await;
    }
    // Nothing changed: the gateway still has a's key for a, and a change still reaches it.
    add_resource(&s, &a, "a.localhost").await;
    let ControlMessage::Config(next) = recv(&mut gws).await else {
        panic!("expected a config")
    };
    let peer_a = next.peers.iter().find(|p| p.node_id == a.node_id).unwrap();
    assert_eq!(peer_a.public_key, WgPublicKey([2; 32]));
    let peer_b = next.peers.iter().find(|p| p.node_id == b.node_id).unwrap();
    assert_eq!(peer_b.public_key, WgPublicKey([3; 32]));
    assert_eq!(next.routes.len(), 1);
}

/// A session of `site` is refused within 1 s of `act` (revoke or regenerate), with a reason that
/// says what to do.
async fn loses_its_session_within_1s(path: &str) {
    let s = Server::start().await;
    let site = s.enrolled(NodeKind::Agent, "home", 2).await;
    let other = s.enrolled(NodeKind::Agent, "other", 3).await;
    let mut ws = s.connect().await;
    send(&mut ws, &hello(&site, site.credential.expose(), 1, 2)).await;
    welcomed(&mut ws).await;
    let mut ows = s.connect().await;
    send(&mut ows, &hello(&other, other.credential.expose(), 1, 3)).await;
    welcomed(&mut ows).await;

    let started = tokio::time::Instant::now();
    s.api(
        reqwest::Method::POST,
        &format!("/sites/{}/{path}", site.node_id),
        None,
    )
    .await;
    let (reason, message) = tokio::time::timeout(Duration::from_secs(1), recv_refused(&mut ws))
        .await
        .expect("the session was not refused within 1 s");
    assert_eq!(reason, RefuseReason::BadCredential);
    assert!(message.contains("revoked"), "{message}");
    expect_closed(&mut ws).await;
    assert!(started.elapsed() < Duration::from_secs(1));
    // The old credential is refused from now on; the other site is still online.
    let mut again = s.connect().await;
    send(&mut again, &hello(&site, site.credential.expose(), 1, 2)).await;
    assert_eq!(
        recv_refused(&mut again).await.0,
        RefuseReason::BadCredential
    );
    send(&mut ows, &NodeMessage::Ping { nonce: 5 }).await;
    assert_eq!(recv(&mut ows).await, ControlMessage::Pong { nonce: 5 });
    let got = s
        .api(
            reqwest::Method::GET,
            &format!("/sites/{}", site.node_id),
            None,
        )
        .await;
    assert_eq!(got["enrolled"], false, "{got}");
}

#[tokio::test]
async fn a_revoked_node_loses_its_live_session_within_1s() {
    loses_its_session_within_1s("revoke").await;
}

#[tokio::test]
async fn a_regenerated_token_ends_the_live_session_within_1s() {
    loses_its_session_within_1s("enrollment-token").await;
}

#[tokio::test]
async fn a_second_session_of_a_node_replaces_the_first() {
    let s = Server::start().await;
    let site = s.enrolled(NodeKind::Agent, "home", 2).await;
    let mut old = s.connect().await;
    send(&mut old, &hello(&site, site.credential.expose(), 1, 2)).await;
    welcomed(&mut old).await;
    let mut new = s.connect().await;
    send(&mut new, &hello(&site, site.credential.expose(), 1, 2)).await;
    welcomed(&mut new).await;
    let (reason, _) = recv_refused(&mut old).await;
    assert_eq!(reason, RefuseReason::Replaced);
    expect_closed(&mut old).await;
    // The new one is the live one: it still gets changes, and the node is online.
    add_resource(&s, &site, "a.localhost").await;
    let ControlMessage::Config(next) = recv(&mut new).await else {
        panic!("expected a config")
    };
    assert_eq!(next.targets.len(), 1);
    assert!(s.state.hub.is_online(site.node_id));
    assert_eq!(s.state.hub.online_count(NodeKind::Agent), 1);
}

#[tokio::test]
async fn a_hello_with_no_handshake_slot_is_told_busy_with_a_retry_delay() {
    let s = Server::start().await;
    let site = s.enrolled(NodeKind::Agent, "home", 2).await;
    let all = u32::try_from(s.state.timing.max_handshakes).unwrap();
    let held = s
        .state
        .handshakes()
        .clone()
        .acquire_many_owned(all)
        .await
        .unwrap();
    let mut ws = s.connect().await;
    send(&mut ws, &hello(&site, site.credential.expose(), 1, 2)).await;
    let started = tokio::time::Instant::now();
    match recv(&mut ws).await {
        ControlMessage::Refused {
            reason: RefuseReason::Busy,
            retry_after_ms,
            ..
        } => assert_eq!(
            retry_after_ms,
            Some(s.state.timing.busy_retry.as_millis() as u64)
        ),
        other => panic!("expected busy, got {other:?}"),
    }
    // It waited for a slot for the configured time, no longer.
    assert!(started.elapsed() < s.state.timing.handshake_wait + Duration::from_secs(1));
    drop(held);
    let mut ws = s.connect().await;
    send(&mut ws, &hello(&site, site.credential.expose(), 1, 2)).await;
    welcomed(&mut ws).await;
}

#[tokio::test]
async fn an_oversized_frame_is_refused_before_it_is_buffered() {
    let s = Server::start().await;
    let mut ws = s.connect().await;
    // 2 MiB in one frame: over the 1 MiB frame limit.
    let big = "x".repeat(2 << 20);
    let _ = ws.send(Message::text(big)).await;
    // Control closes the socket (protocol error) instead of reading it all.
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the socket stayed open");
}

#[tokio::test]
async fn a_client_that_sends_no_request_headers_is_dropped() {
    use tokio::io::AsyncReadExt as _;
    let db = common::sqlite().await;
    let state = common::state(&db).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(kakuremichi_control::serve::serve(
        listener,
        kakuremichi_control::app(state),
        kakuremichi_control::serve::ServeOptions {
            max_connections: 2,
            header_read_timeout: Duration::from_millis(300),
        },
        std::future::pending(),
        Duration::from_secs(1),
    ));
    // Two silent clients take both slots; a third waits in the backlog.
    let mut silent1 = TcpStream::connect(addr).await.unwrap();
    let mut silent2 = TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut silent2, b"GET /healthz HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(3), silent1.read(&mut buf))
        .await
        .expect("the silent client was not dropped")
        .unwrap_or(0);
    let _ = n;
    assert!(started.elapsed() >= Duration::from_millis(250));
    let _ = tokio::time::timeout(Duration::from_secs(3), silent2.read(&mut buf)).await;
    // Their slots are free again: a real request is served.
    let ok = reqwest::get(format!("http://{addr}/healthz"))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn gateways_traffic_and_agents_target_reports_make_each_resources_stats() {
    let s = Server::start().await;
    let gw = s.enrolled(NodeKind::Gateway, "edge", 1).await;
    let site = s.enrolled(NodeKind::Agent, "home", 2).await;
    let mut ids = Vec::new();
    for (host, target) in [
        ("up.example.com", "127.0.0.1:1"),
        ("down.example.com", "127.0.0.1:2"),
    ] {
        let r = s
            .api(
                reqwest::Method::POST,
                "/resources",
                Some(serde_json::json!({"hostname": host, "site_id": site.node_id, "target": target})),
            )
            .await;
        ids.push(uuid::Uuid::parse_str(r["id"].as_str().unwrap()).unwrap());
    }
    // Before anyone reports: no requests, health unknown (its site is not connected: offline).
    let stats = s.api(reqwest::Method::GET, "/resources/stats", None).await;
    assert_eq!(stats.as_array().unwrap().len(), 2, "{stats}");
    assert_eq!(stats[0]["health"], "offline", "{stats}");
    assert_eq!(
        stats[0]["requests_per_minute"].as_array().unwrap().len(),
        30
    );

    let report = |traffic, targets| {
        NodeMessage::Status(StatusReport {
            session_accesses: Vec::new(),
            session_labels: Default::default(),
            traffic,
            sessions: Vec::new(),
            applied_version: 0,
            peers: vec![],
            targets,
            refusals: vec![],
        })
    };
    let mut agent = s.connect().await;
    send(&mut agent, &hello(&site, site.credential.expose(), 1, 2)).await;
    recv(&mut agent).await;
    recv(&mut agent).await;
    send(
        &mut agent,
        &report(
            vec![],
            vec![
                kakuremichi_proto::TargetStatus {
                    resource_id: ids[0],
                    target: "127.0.0.1:1".into(),
                    reachable: true,
                    error: None,
                },
                kakuremichi_proto::TargetStatus {
                    resource_id: ids[1],
                    target: "127.0.0.1:2".into(),
                    reachable: false,
                    error: Some("connection refused".into()),
                },
            ],
        ),
    )
    .await;
    let mut gateway = s.connect().await;
    send(&mut gateway, &hello(&gw, gw.credential.expose(), 1, 1)).await;
    recv(&mut gateway).await;
    recv(&mut gateway).await;
    for requests in [5, 7] {
        send(
            &mut gateway,
            &report(
                vec![kakuremichi_proto::ResourceTraffic {
                    resource_id: ids[0],
                    requests,
                    errors: 1,
                }],
                vec![],
            ),
        )
        .await;
    }
    let mut stats = Value::Null;
    for _ in 0..100 {
        stats = s
            .api(
                reqwest::Method::GET,
                "/resources/stats?sort=-requests_30m",
                None,
            )
            .await;
        if stats[0]["requests_30m"] == 12 && stats[1]["health"] == "unhealthy" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stats[0]["id"], ids[0].to_string(), "{stats}");
    assert_eq!(stats[0]["requests_30m"], 12, "{stats}");
    assert_eq!(stats[0]["errors_30m"], 2, "{stats}");
    assert_eq!(stats[0]["health"], "healthy", "{stats}");
    assert_eq!(stats[1]["health"], "unhealthy", "{stats}");
    assert_eq!(
        stats[1]["failing"][0]["error"], "connection refused",
        "{stats}"
    );
}
