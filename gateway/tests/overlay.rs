//! A gateway proxy and an agent forwarder connected by two real tunnels on 127.0.0.1, fed
//! snapshots directly (no control), in front of an in-test HTTP server.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use kakuremichi_agent::{Agent, AgentOptions};
use kakuremichi_gateway::{Gateway, GatewayOptions, ProxyTimeouts};
use kakuremichi_proto::*;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use uuid::Uuid;

const GW_OVERLAY: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const AGENT_OVERLAY: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const BIG: usize = 10 * 1024 * 1024;

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 9)) as u8
}

/// The private app: `/headers` echoes forwarding headers, `/big` streams 10 MiB, `/echo` echoes
/// the request body.
async fn app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let response: Response<
                        http_body_util::combinators::BoxBody<Bytes, hyper::Error>,
                    > = match req.uri().path() {
                        "/big" => {
                            let chunks = (0..BIG / 65536).map(|c| {
                                let data: Vec<u8> =
                                    (c * 65536..(c + 1) * 65536).map(pattern).collect();
                                Ok::<_, hyper::Error>(Frame::data(Bytes::from(data)))
                            });
                            Response::new(
                                StreamBody::new(futures_util::stream::iter(chunks)).boxed(),
                            )
                        }
                        "/echo" => Response::new(req.into_body().boxed()),
                        _ => {
                            let h = req.headers();
                            let get = |n: &str| {
                                h.get(n)
                                    .map(|v| v.to_str().unwrap().to_owned())
                                    .unwrap_or_default()
                            };
                            let text = format!(
                                "host={}\nxff={}\nproto={}\nxfh={}\npath={}\n",
                                get("host"),
                                get("x-forwarded-for"),
                                get("x-forwarded-proto"),
                                get("x-forwarded-host"),
                                req.uri()
                            );
                            Response::new(
                                Full::new(Bytes::from(text))
                                    .map_err(|never: Infallible| match never {})
                                    .boxed(),
                            )
                        }
                    };
                    Ok::<_, Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn gateway_snapshot(agent_key: [u8; 32]) -> ConfigSnapshot {
    let route = |host: &str, port: u16| {
        Route::http(
            Uuid::from_u128(port as u128),
            host,
            Uuid::from_u128(2),
            AGENT_OVERLAY,
            port,
        )
    };
    ConfigSnapshot {
        sessions: Vec::new(),
        sessions_endpoint: None,
        version: 1,
        node_id: Uuid::from_u128(1),
        kind: NodeKind::Gateway,
        overlay: OverlayConfig {
            address: GW_OVERLAY,
            prefix_len: 10,
            mtu: 1420,
        },
        peers: vec![PeerConfig {
            node_id: Uuid::from_u128(2),
            kind: NodeKind::Agent,
            name: "home".into(),
            public_key: WgPublicKey(agent_key),
            overlay_address: AGENT_OVERLAY,
            endpoint: None,
            persistent_keepalive: None,
        }],
        routes: vec![
            route("demo.localhost", 10000),
            route("dead.localhost", 10001),
            route("unconfigured.localhost", 10002),
        ],
        targets: vec![],
        certificates: vec![],
        acme_challenges: vec![],
        identity: None,
    }
}

fn agent_snapshot(
    gw_key: [u8; 32],
    gw_endpoint: SocketAddr,
    app: SocketAddr,
    dead: SocketAddr,
) -> ConfigSnapshot {
    ConfigSnapshot {
        sessions: Vec::new(),
        sessions_endpoint: None,
        version: 1,
        node_id: Uuid::from_u128(2),
        kind: NodeKind::Agent,
        overlay: OverlayConfig {
            address: AGENT_OVERLAY,
            prefix_len: 10,
            mtu: 1420,
        },
        peers: vec![PeerConfig {
            node_id: Uuid::from_u128(1),
            kind: NodeKind::Gateway,
            name: "edge".into(),
            public_key: WgPublicKey(gw_key),
            overlay_address: GW_OVERLAY,
            endpoint: Some(gw_endpoint.to_string()),
            persistent_keepalive: Some(25),
        }],
        routes: vec![],
        targets: vec![
            Target {
                resource_id: Uuid::from_u128(10000),
                port: 10000,
                target: app.to_string(),
                health_check: None,
                hostname: String::new(),
            },
            Target {
                resource_id: Uuid::from_u128(10001),
                port: 10001,
                target: dead.to_string(),
                health_check: None,
                hostname: String::new(),
            },
        ],
        certificates: vec![],
        acme_challenges: vec![],
        identity: None,
    }
}

struct Setup {
    http: SocketAddr,
    gw_key: [u8; 32],
    agent_key: [u8; 32],
    gateway: Gateway,
    agent: Agent,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    _shutdown: watch::Sender<bool>,
}

async fn setup() -> Setup {
    let app = app().await;
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let gw_key = kakuremichi_tunnel::generate_private_key();
    let agent_key = kakuremichi_tunnel::generate_private_key();
    let gw_dir = tempfile::tempdir().unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::new(GatewayOptions {
        data_dir: gw_dir.path().to_owned(),
        wg_listen: "127.0.0.1:0".parse().unwrap(),
        private_key: gw_key,
        timeouts: ProxyTimeouts {
            connect: Duration::from_secs(10),
            response: Duration::from_secs(20),
            body: Duration::from_secs(60),
        },
        quic: Default::default(),
        trusted_proxies: Vec::new(),
        tcp_listen_ip: std::net::Ipv4Addr::LOCALHOST.into(),
        limits: Default::default(),
        https_port: None,
    });
    gateway
        .apply(
            gateway_snapshot(kakuremichi_tunnel::public_key(&agent_key)),
            true,
        )
        .await
        .unwrap();
    let gw_endpoint = gateway.tunnel().unwrap().local_addr();
    let agent = Agent::new(AgentOptions {
        data_dir: agent_dir.path().to_owned(),
        wg_listen: "127.0.0.1:0".parse().unwrap(),
        private_key: agent_key,
        quic: Default::default(),
        sessions: None,
        fallback: None,
    });
    agent
        .apply(
            agent_snapshot(
                kakuremichi_tunnel::public_key(&gw_key),
                gw_endpoint,
                app,
                dead,
            ),
            true,
        )
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = listener.local_addr().unwrap();
    let (tx, rx) = watch::channel(false);
    tokio::spawn(kakuremichi_gateway::serve_http(
        listener,
        gateway.proxy(),
        rx,
        Duration::from_secs(1),
    ));
    Setup {
        http,
        gw_key,
        agent_key,
        gateway,
        agent,
        _dirs: (gw_dir, agent_dir),
        _shutdown: tx,
    }
}

async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> (u16, hyper::HeaderMap, Bytes) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let response = sender.send_request(req).await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

fn get(host: &str, path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_through_two_real_tunnels() {
    let s = setup().await;

    // GET with forwarding headers.
    let (status, _, body) = tokio::time::timeout(
        Duration::from_secs(15),
        send(s.http, get("Demo.Localhost:8080", "/headers?x=1")),
    )
    .await
    .expect("first request through the tunnel took too long");
    let body = String::from_utf8(body.to_vec()).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("host=Demo.Localhost:8080\n"), "{body}");
    assert!(body.contains("xff=127.0.0.1\n"), "{body}");
    assert!(body.contains("proto=http\n"), "{body}");
    assert!(body.contains("xfh=Demo.Localhost:8080\n"), "{body}");
    assert!(body.contains("path=/headers?x=1\n"), "{body}");

    // Unknown host.
    let (status, headers, body) = send(s.http, get("nope.localhost", "/")).await;
    assert_eq!(status, 404);
    assert_eq!(headers["content-type"], "text/plain; charset=utf-8");
    assert_eq!(body, "no resource is published at nope.localhost\n");

    // Target refused: the agent resets the flow, the gateway answers 502.
    let (status, _, body) = send(s.http, get("dead.localhost", "/")).await;
    assert_eq!(status, 502);
    assert_eq!(
        body,
        "the site that serves dead.localhost is offline or its target refused the connection\n"
    );
    // And the agent reports it.
    let report = s.agent.status();
    let dead = report
        .targets
        .iter()
        .find(|t| t.resource_id == Uuid::from_u128(10001))
        .unwrap();
    assert!(!dead.reachable && dead.error.is_some(), "{report:?}");

    // A port the agent was not told about is refused too.
    let (status, _, _) = send(s.http, get("unconfigured.localhost", "/")).await;
    assert_eq!(status, 502);

    // No Host at all.
    let req = Request::get("/").body(Full::new(Bytes::new())).unwrap();
    let mut req = req;
    req.headers_mut().remove("host");
    let (status, _, _) = send(s.http, req).await;
    assert_eq!(status, 400);

    // Status and endpoint memory on the gateway side.
    let report = s.gateway.status();
    assert_eq!(report.applied_version, 1);
    assert!(
        report.peers[0].last_handshake_age_ms.is_some(),
        "{report:?}"
    );
    s.gateway.remember_endpoints();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_ten_mebibytes_both_ways_and_survives_concurrency() {
    let s = setup().await;
    let (status, _, _) = tokio::time::timeout(
        Duration::from_secs(15),
        send(s.http, get("demo.localhost", "/")),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);

    // Download.
    let (status, _, body) = send(s.http, get("demo.localhost", "/big")).await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), BIG);
    assert!(
        body.iter().enumerate().all(|(i, b)| *b == pattern(i)),
        "download corrupted"
    );

    // Upload, echoed back.
    let data: Vec<u8> = (0..BIG).map(|i| pattern(i + 7)).collect();
    let req = Request::post("/echo")
        .header("host", "demo.localhost")
        .body(Full::new(Bytes::from(data.clone())))
        .unwrap();
    let (status, _, body) = send(s.http, req).await;
    assert_eq!(status, 200);
    assert!(body == data, "upload corrupted ({} bytes back)", body.len());

    // 100 concurrent requests.
    let mut tasks = Vec::new();
    for i in 0..100 {
        let http = s.http;
        tasks.push(tokio::spawn(async move {
            send(http, get("demo.localhost", &format!("/n{i}"))).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, _, body) = t.await.unwrap();
        assert_eq!(status, 200);
        assert!(String::from_utf8_lossy(&body).contains(&format!("path=/n{i}\n")));
    }

    // Sequential requests on one client connection reuse pooled upstream connections.
    let stream = TcpStream::connect(s.http).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    for i in 0..20 {
        sender.ready().await.unwrap();
        let r = sender
            .send_request(get("demo.localhost", &format!("/s{i}")))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.into_body().collect().await.unwrap();
    }
    let _ = Arc::new(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_gateway_reaches_natted_agent_from_remembered_endpoint() {
    let s = setup().await;
    let (status, _, _) = tokio::time::timeout(
        Duration::from_secs(15),
        send(s.http, get("demo.localhost", "/")),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    // The gateway remembers where the agent is, then restarts on the same UDP port.
    s.gateway.remember_endpoints();
    let wg = s.gateway.tunnel().unwrap().local_addr();
    let data_dir = s._dirs.0.path().to_owned();
    assert!(data_dir.join("peers.json").exists());
    s.gateway.shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let restarted = Gateway::new(GatewayOptions {
        data_dir,
        wg_listen: wg,
        private_key: s.gw_key,
        timeouts: ProxyTimeouts {
            connect: Duration::from_secs(10),
            response: Duration::from_secs(20),
            body: Duration::from_secs(60),
        },
        quic: Default::default(),
        trusted_proxies: Vec::new(),
        tcp_listen_ip: std::net::Ipv4Addr::LOCALHOST.into(),
        limits: Default::default(),
        https_port: None,
    });
    let cached = restarted
        .cached_config()
        .expect("config cached by the first run");
    assert_eq!(
        cached,
        gateway_snapshot(kakuremichi_tunnel::public_key(&s.agent_key))
    );
    restarted.apply(cached, false).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = listener.local_addr().unwrap();
    let (_tx, rx) = watch::channel(false);
    tokio::spawn(kakuremichi_gateway::serve_http(
        listener,
        restarted.proxy(),
        rx,
        Duration::from_secs(1),
    ));
    // The agent's keepalive is 25 s: only the remembered endpoint makes this fast.
    let started = std::time::Instant::now();
    let (status, _, _) = tokio::time::timeout(
        Duration::from_secs(5),
        send(http, get("demo.localhost", "/")),
    )
    .await
    .expect("traffic did not resume within 5 s after the restart");
    assert_eq!(status, 200, "after {:?}", started.elapsed());
}

/// An app that answers every request with `tag`.
async fn tagged_app(tag: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                        tag.as_bytes(),
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_share_a_kept_stream_that_a_retarget_closes_without_a_failure() {
    let s = setup().await;
    let first = tagged_app("first").await;
    let second = tagged_app("second").await;
    let gw_endpoint = s.gateway.tunnel().unwrap().local_addr();
    let gw_public = kakuremichi_tunnel::public_key(&s.gw_key);
    let dead: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let retarget = |version: u64, app: SocketAddr| {
        let mut snapshot = agent_snapshot(gw_public, gw_endpoint, app, dead);
        snapshot.version = version;
        snapshot
    };
    s.agent.apply(retarget(2, first), true).await.unwrap();

    // Twenty requests, each from a new client connection, one after the other: the gateway
    // keeps one stream to the agent and sends them all on it.
    for _ in 0..20 {
        let (status, _, body) = tokio::time::timeout(
            Duration::from_secs(15),
            send(s.http, get("demo.localhost", "/")),
        )
        .await
        .unwrap();
        assert_eq!((status, &body[..]), (200, &b"first"[..]));
    }
    assert_eq!(s.gateway.proxy().idle_upstreams(), 1);
    // The agent holds that stream and the health stream (the others would have ended).
    assert_eq!(s.agent.tunnel().unwrap().stream_count(), 2);

    // The target changes: the agent ends the kept stream, and every request after the change
    // reaches the new target; none fails, none reaches the old one.
    s.agent.apply(retarget(3, second), true).await.unwrap();
    for _ in 0..20 {
        let (status, _, body) = send(s.http, get("demo.localhost", "/")).await;
        assert_eq!((status, &body[..]), (200, &b"second"[..]));
    }
    assert_eq!(s.gateway.proxy().idle_upstreams(), 1);
}
