//! The control-channel client against a tiny in-test WebSocket server.

#![allow(clippy::unwrap_used, clippy::result_large_err)] // tests may unwrap

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use kakuremichi_node::channel::{run_channel, ChannelConfig, ChannelState, NodeHooks};
use kakuremichi_proto::*;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use uuid::Uuid;

const NODE: Uuid = Uuid::from_u128(0x42);

struct Hooks {
    applied: mpsc::UnboundedSender<u64>,
}

impl NodeHooks for Hooks {
    async fn apply(&self, snapshot: ConfigSnapshot) -> Result<(), String> {
        self.applied
            .send(snapshot.version)
            .map_err(|e| e.to_string())
    }
    fn status(&self) -> StatusReport {
        StatusReport {
            session_accesses: Vec::new(),
            session_labels: Default::default(),
            traffic: Vec::new(),
            sessions: Vec::new(),
            applied_version: 0,
            peers: vec![],
            targets: vec![],
            refusals: vec![],
        }
    }
}

fn config(addr: SocketAddr) -> ChannelConfig {
    ChannelConfig {
        control_url: format!("http://{addr}"),
        kind: NodeKind::Gateway,
        node_id: NODE,
        credential: Secret::new("kmn_cred"),
        public_key: WgPublicKey([5; 32]),
        software_version: "9.9.9".into(),
        data_dir: PathBuf::from("/tmp/x"),
        status_interval: Duration::from_millis(100),
        ping_interval: Duration::from_secs(15),
        idle_timeout: Duration::from_secs(45),
        connect_timeout: Duration::from_secs(2),
        handshake_timeout: Duration::from_secs(5),
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        refused_retry: Duration::from_secs(60),
    }
}

fn snapshot(version: u64) -> ConfigSnapshot {
    ConfigSnapshot {
        sessions: Vec::new(),
        sessions_endpoint: None,
        version,
        node_id: NODE,
        kind: NodeKind::Gateway,
        overlay: OverlayConfig {
            address: Ipv4Addr::new(100, 64, 0, 1),
            prefix_len: 10,
            mtu: 1420,
        },
        peers: vec![],
        routes: vec![],
        targets: vec![],
        certificates: vec![],
        acme_challenges: vec![],
        identity: None,
    }
}

async fn accept(listener: &TcpListener) -> WebSocketStream<TcpStream> {
    let (tcp, _) = listener.accept().await.unwrap();
    tokio_tungstenite::accept_hdr_async(
        tcp,
        |req: &tokio_tungstenite::tungstenite::handshake::server::Request, resp| {
            assert_eq!(req.uri().path(), NODE_WS_PATH);
            Ok(resp)
        },
    )
    .await
    .unwrap()
}

async fn recv(ws: &mut WebSocketStream<TcpStream>) -> NodeMessage {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("node said nothing")
            .unwrap()
            .unwrap();
        if let Message::Text(t) = msg {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

/// Receives until a message that is not a status report.
async fn recv_non_status(ws: &mut WebSocketStream<TcpStream>) -> NodeMessage {
    loop {
        match recv(ws).await {
            NodeMessage::Status(_) => continue,
            other => return other,
        }
    }
}

async fn send(ws: &mut WebSocketStream<TcpStream>, msg: ControlMessage) {
    ws.send(Message::Text(serde_json::to_string(&msg).unwrap().into()))
        .await
        .unwrap();
}

fn start(
    addr: SocketAddr,
    applied: Option<u64>,
) -> (
    tokio::task::JoinHandle<()>,
    mpsc::UnboundedReceiver<u64>,
    watch::Receiver<ChannelState>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (state_tx, state_rx) = watch::channel(ChannelState::Connecting);
    let task = tokio::spawn(run_channel(
        config(addr),
        Arc::new(Hooks { applied: tx }),
        applied,
        state_tx,
    ));
    (task, rx, state_rx)
}

#[tokio::test]
async fn hello_snapshot_applied_status_and_ping() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (task, mut applied, mut state) = start(addr, Some(3));
    let mut ws = accept(&listener).await;
    match recv(&mut ws).await {
        NodeMessage::Hello {
            protocol_version,
            kind,
            node_id,
            credential,
            public_key,
            software_version,
            applied_version,
        } => {
            assert_eq!(protocol_version, PROTOCOL_VERSION);
            assert_eq!(kind, NodeKind::Gateway);
            assert_eq!(node_id, NODE);
            assert_eq!(credential.expose(), "kmn_cred");
            assert_eq!(public_key, WgPublicKey([5; 32]));
            assert_eq!(software_version, "9.9.9");
            assert_eq!(applied_version, Some(3));
        }
        other => panic!("expected hello, got {other:?}"),
    }
    send(
        &mut ws,
        ControlMessage::Welcome {
            protocol_version: 1,
            node_id: NODE,
        },
    )
    .await;
    send(&mut ws, ControlMessage::Config(snapshot(7))).await;
    assert_eq!(applied.recv().await, Some(7));
    assert_eq!(
        recv_non_status(&mut ws).await,
        NodeMessage::Applied { version: 7 }
    );
    state
        .wait_for(|s| *s == ChannelState::Connected)
        .await
        .unwrap();
    // Status reports carry the applied version.
    loop {
        if let NodeMessage::Status(report) = recv(&mut ws).await {
            if report.applied_version == 7 {
                break;
            }
        }
    }
    send(&mut ws, ControlMessage::Ping { nonce: 77 }).await;
    assert_eq!(
        recv_non_status(&mut ws).await,
        NodeMessage::Pong { nonce: 77 }
    );
    task.abort();
}

#[tokio::test]
async fn reconnects_after_server_restart_and_announces_applied_version() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (task, mut applied, _state) = start(addr, None);
    let mut ws = accept(&listener).await;
    assert!(matches!(
        recv(&mut ws).await,
        NodeMessage::Hello {
            applied_version: None,
            ..
        }
    ));
    send(
        &mut ws,
        ControlMessage::Welcome {
            protocol_version: 1,
            node_id: NODE,
        },
    )
    .await;
    send(&mut ws, ControlMessage::Config(snapshot(1))).await;
    assert_eq!(applied.recv().await, Some(1));
    assert_eq!(
        recv_non_status(&mut ws).await,
        NodeMessage::Applied { version: 1 }
    );
    // Control goes away.
    drop(ws);
    drop(listener);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // And comes back on the same port.
    let listener = TcpListener::bind(addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut ws = accept(&listener).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "reconnect took {:?}",
        started.elapsed()
    );
    assert!(matches!(
        recv(&mut ws).await,
        NodeMessage::Hello {
            applied_version: Some(1),
            ..
        }
    ));
    send(
        &mut ws,
        ControlMessage::Welcome {
            protocol_version: 1,
            node_id: NODE,
        },
    )
    .await;
    send(&mut ws, ControlMessage::Config(snapshot(2))).await;
    assert_eq!(applied.recv().await, Some(2));
    assert_eq!(
        recv_non_status(&mut ws).await,
        NodeMessage::Applied { version: 2 }
    );
    task.abort();
}

#[tokio::test]
async fn unsupported_control_version_is_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (task, mut applied, mut state) = start(addr, None);
    let mut ws = accept(&listener).await;
    assert!(matches!(recv(&mut ws).await, NodeMessage::Hello { .. }));
    send(
        &mut ws,
        ControlMessage::Welcome {
            protocol_version: 99,
            node_id: NODE,
        },
    )
    .await;
    let _ = ws
        .send(Message::Text(
            serde_json::to_string(&ControlMessage::Config(snapshot(1)))
                .unwrap()
                .into(),
        ))
        .await;
    let s = state
        .wait_for(|s| matches!(s, ChannelState::Refused { .. }))
        .await
        .unwrap()
        .clone();
    match s {
        ChannelState::Refused {
            reason: None,
            message,
        } => {
            assert!(
                message.contains("unsupported protocol version 99"),
                "{message}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(
        applied.try_recv().is_err(),
        "nothing applied from an incompatible control"
    );
    task.abort();
}

#[tokio::test]
async fn bad_credential_is_reported_and_retried_slowly() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (task, _applied, mut state) = start(addr, None);
    let mut ws = accept(&listener).await;
    assert!(matches!(recv(&mut ws).await, NodeMessage::Hello { .. }));
    send(
        &mut ws,
        ControlMessage::Refused {
            reason: RefuseReason::BadCredential,
            message: "unknown node".into(),
            retry_after_ms: None,
        },
    )
    .await;
    state
        .wait_for(|s| {
            matches!(
                s,
                ChannelState::Refused {
                    reason: Some(RefuseReason::BadCredential),
                    ..
                }
            )
        })
        .await
        .unwrap();
    // No quick retry.
    let again = tokio::time::timeout(Duration::from_millis(700), listener.accept()).await;
    assert!(again.is_err(), "retried too fast after a refusal");
    task.abort();
}

#[tokio::test]
async fn busy_is_retried_after_the_delay_with_jitter_and_is_not_a_refusal() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (task, mut applied, mut state) = start(addr, None);
    let mut ws = accept(&listener).await;
    assert!(matches!(recv(&mut ws).await, NodeMessage::Hello { .. }));
    send(
        &mut ws,
        ControlMessage::Refused {
            reason: RefuseReason::Busy,
            message: "busy".into(),
            retry_after_ms: Some(400),
        },
    )
    .await;
    let told = tokio::time::Instant::now();
    drop(ws);
    // Not before the delay (the backoff alone would retry within 50 ms); the jitter adds at most
    // 50% (the upper bound leaves room for a loaded machine).
    let mut ws = tokio::time::timeout(Duration::from_secs(2), accept(&listener))
        .await
        .expect("no retry after busy");
    let waited = told.elapsed();
    assert!(
        waited >= Duration::from_millis(390) && waited <= Duration::from_millis(1500),
        "retried after {waited:?}"
    );
    assert_eq!(
        *state.borrow(),
        ChannelState::Connecting,
        "busy is not a refusal"
    );
    assert!(matches!(recv(&mut ws).await, NodeMessage::Hello { .. }));
    send(
        &mut ws,
        ControlMessage::Welcome {
            protocol_version: PROTOCOL_VERSION,
            node_id: NODE,
        },
    )
    .await;
    send(&mut ws, ControlMessage::Config(snapshot(4))).await;
    state
        .wait_for(|s| *s == ChannelState::Connected)
        .await
        .unwrap();
    assert_eq!(applied.recv().await, Some(4));
    task.abort();
}

#[tokio::test]
async fn moves_to_another_control_replica_when_its_own_dies() {
    let a = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    let mut cfg = config(a_addr);
    // Trailing slashes and spaces are fine; a long backoff shows the move does not wait for it.
    cfg.control_url = format!("http://{a_addr}/ , http://{b_addr}");
    cfg.backoff_base = Duration::from_millis(100);
    cfg.backoff_max = Duration::from_secs(30);
    let (tx, mut applied) = mpsc::unbounded_channel();
    let (state_tx, mut state) = watch::channel(ChannelState::Connecting);
    let task = tokio::spawn(run_channel(
        cfg,
        Arc::new(Hooks { applied: tx }),
        None,
        state_tx,
    ));
    // The node picks one replica, whichever.
    let (mut ws, first_is_a) = tokio::select! {
        ws = accept(&a) => (ws, true),
        ws = accept(&b) => (ws, false),
    };
    assert!(matches!(recv(&mut ws).await, NodeMessage::Hello { .. }));
    send(
        &mut ws,
        ControlMessage::Welcome {
            protocol_version: 1,
            node_id: NODE,
        },
    )
    .await;
    send(&mut ws, ControlMessage::Config(snapshot(4))).await;
    assert_eq!(applied.recv().await, Some(4));
    assert_eq!(
        recv_non_status(&mut ws).await,
        NodeMessage::Applied { version: 4 }
    );
    state
        .wait_for(|s| *s == ChannelState::Connected)
        .await
        .unwrap();
    // That replica dies; the other one gets the node well within a second.
    let other = if first_is_a {
        drop(a);
        b
    } else {
        drop(b);
        a
    };
    drop(ws);
    let started = std::time::Instant::now();
    let mut ws = tokio::time::timeout(Duration::from_secs(5), accept(&other))
        .await
        .expect("the node did not move to the other replica");
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "moving took {:?}",
        started.elapsed()
    );
    assert!(matches!(
        recv(&mut ws).await,
        NodeMessage::Hello {
            applied_version: Some(4),
            ..
        }
    ));
    send(
        &mut ws,
        ControlMessage::Welcome {
            protocol_version: 1,
            node_id: NODE,
        },
    )
    .await;
    send(&mut ws, ControlMessage::Config(snapshot(5))).await;
    assert_eq!(applied.recv().await, Some(5));
    task.abort();
}

/// A listening socket whose accept queue is full, and the connections that fill it: the kernel
/// drops every further SYN to it without an answer, as a path that black-holes packets does.
async fn black_hole() -> (TcpListener, Vec<TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fill = Vec::new();
    while let Ok(Ok(s)) =
        tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await
    {
        fill.push(s);
        assert!(fill.len() < 100, "the accept queue never filled");
    }
    (listener, fill)
}

#[tokio::test]
async fn a_connection_attempt_that_gets_no_answer_is_made_afresh_so_control_is_found_soon_after_its_path_works_again(
) {
    let (listener, fill) = black_hole().await;
    let addr = listener.local_addr().unwrap();
    let mut cfg = config(addr);
    cfg.connect_timeout = Duration::from_millis(300);
    cfg.handshake_timeout = Duration::from_secs(10);
    let (tx, _applied) = mpsc::unbounded_channel();
    let (state_tx, _state) = watch::channel(ChannelState::Connecting);
    let task = tokio::spawn(run_channel(
        cfg,
        Arc::new(Hooks { applied: tx }),
        None,
        state_tx,
    ));
    // Every SYN is dropped for 8.5 s. One attempt left to the kernel would have its SYN resent
    // 1, 2, 3, 4, 5, 6 and 8 s after the first (Linux 6.7 and later; 1, 3 and 7 s before), all
    // dropped, and next at 12 s (15 s), after the 10 s handshake timeout.
    tokio::time::sleep(Duration::from_millis(8500)).await;
    // The path works again.
    for _ in 0..fill.len() {
        drop(listener.accept().await.unwrap());
    }
    drop(fill);
    let opened = std::time::Instant::now();
    let mut ws = tokio::time::timeout(Duration::from_secs(5), accept(&listener))
        .await
        .expect("the node did not connect");
    let took = opened.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "connected {took:?} after the path worked again: within a connect timeout and a backoff"
    );
    assert!(matches!(recv(&mut ws).await, NodeMessage::Hello { .. }));
    task.abort();
}
