//! Driver tests over real UDP on 127.0.0.1.
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::time::Duration;

use kakuremichi_tunnel::{
    generate_private_key, public_key, Incoming, PeerSpec, Tunnel, TunnelConfig, TunnelStream,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GW_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const AGENT_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);

struct Pair {
    gateway: Tunnel,
    agent: Tunnel,
    agent_incoming: Incoming,
    gw_peers: Vec<PeerSpec>,
}

async fn pair() -> Pair {
    // RUST_LOG=kakuremichi_tunnel=debug,quinn_proto=debug shows what happened.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let gw_key = generate_private_key();
    let agent_key = generate_private_key();
    let (gateway, _gw_incoming) = Tunnel::bind(TunnelConfig {
        private_key: gw_key,
        overlay_address: GW_IP,
        mtu: 1420,
        listen: "127.0.0.1:0".parse().unwrap(),
        dials: false,
        quic: Default::default(),
    })
    .await
    .unwrap();
    let (agent, agent_incoming) = Tunnel::bind(TunnelConfig {
        private_key: agent_key,
        overlay_address: AGENT_IP,
        mtu: 1420,
        listen: "127.0.0.1:0".parse().unwrap(),
        dials: true,
        quic: Default::default(),
    })
    .await
    .unwrap();
    // The gateway does not know the agent's endpoint: the agent dials it.
    let gw_peers = vec![PeerSpec {
        public_key: public_key(&agent_key),
        allowed_ip: AGENT_IP,
        endpoint: None,
        persistent_keepalive: None,
    }];
    gateway.set_peers(gw_peers.clone());
    agent.set_peers(vec![PeerSpec {
        public_key: public_key(&gw_key),
        allowed_ip: GW_IP,
        endpoint: Some(gateway.local_addr()),
        persistent_keepalive: Some(25),
    }]);
    // Wait for the handshake.
    for _ in 0..200 {
        if gateway.peer_stats()[0].last_handshake.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        gateway.peer_stats()[0].last_handshake.is_some(),
        "no handshake"
    );
    Pair {
        gateway,
        agent,
        agent_incoming,
        gw_peers,
    }
}

/// Echoes every accepted stream until EOF.
fn spawn_echo(mut incoming: Incoming) {
    tokio::spawn(async move {
        while let Some(stream) = incoming.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(stream);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[0] ^ seed)
        .collect()
}

async fn echo_roundtrip(stream: TunnelStream, data: Vec<u8>) {
    let (mut r, mut w) = tokio::io::split(stream);
    let expected = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
        w
    });
    let mut got = Vec::with_capacity(expected.len());
    r.read_to_end(&mut got).await.unwrap();
    let _w = writer.await.unwrap();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "echoed bytes differ");
}

#[tokio::test]
async fn connect_and_echo() {
    let p = pair().await;
    spawn_echo(p.agent_incoming);
    let stream = p.gateway.connect(AGENT_IP).await.unwrap();
    assert_eq!(stream.peer(), AGENT_IP);
    echo_roundtrip(stream, b"hello through the tunnel".to_vec()).await;
    drop(p.agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mib_both_ways_byte_exact() {
    let p = pair().await;
    spawn_echo(p.agent_incoming);
    let stream = p.gateway.connect(AGENT_IP).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(60),
        echo_roundtrip(stream, pattern(10 << 20, 7)),
    )
    .await
    .unwrap();
    let stats = p.gateway.peer_stats();
    assert!(stats[0].tx_bytes > 10 << 20);
    assert!(stats[0].rx_bytes > 10 << 20);
    drop(p.agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_streams() {
    let p = pair().await;
    spawn_echo(p.agent_incoming);
    let mut tasks = Vec::new();
    for i in 0..100u32 {
        let gw = p.gateway.clone();
        tasks.push(tokio::spawn(async move {
            let stream = gw.connect(AGENT_IP).await.unwrap();
            echo_roundtrip(stream, pattern(64 * 1024 + i as usize, i as u8)).await;
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .unwrap()
            .unwrap();
    }
    drop(p.agent);
}

/// 2,000 streams arrive before the accepting side takes any: every one waits to be accepted
/// (QUIC's stream limit is the bound), none is reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_streams_before_any_accept_is_all_delivered() {
    let p = pair().await;
    let mut opened = Vec::new();
    for i in 0..2000u32 {
        let mut stream = p.gateway.connect(AGENT_IP).await.unwrap();
        stream.write_all(&i.to_le_bytes()).await.unwrap();
        stream.flush().await.unwrap();
        opened.push(stream);
    }
    // Let every stream reach the agent before its accept loop starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    spawn_echo(p.agent_incoming);
    let mut tasks = Vec::new();
    for (i, mut stream) in opened.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            stream.shutdown().await.unwrap();
            let mut got = Vec::new();
            stream.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, (i as u32).to_le_bytes(), "stream {i}");
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .unwrap()
            .unwrap();
    }
    drop(p.agent);
}

#[tokio::test]
async fn connect_to_an_address_no_peer_has_is_unreachable() {
    let p = pair().await;
    spawn_echo(p.agent_incoming);
    let err = p
        .gateway
        .connect(Ipv4Addr::new(100, 64, 0, 9))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::HostUnreachable);
    drop(p.agent);
}

#[tokio::test]
async fn random_datagrams_do_not_break_the_tunnel() {
    use rand::{Rng, RngCore};
    let p = pair().await;
    spawn_echo(p.agent_incoming);
    let junk = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut rng = rand::thread_rng();
    let mut buf = vec![0u8; 2000];
    for i in 0..10_000 {
        let len = rng.gen_range(0..buf.len());
        rng.fill_bytes(&mut buf[..len]);
        // Some look like WireGuard messages (type 1..4, right sizes).
        if len >= 4 && i % 2 == 0 {
            let ty = rng.gen_range(1u8..=4);
            buf[..4].copy_from_slice(&[ty, 0, 0, 0]);
        }
        let target = if i % 2 == 0 {
            p.gateway.local_addr()
        } else {
            p.agent.local_addr()
        };
        junk.send_to(&buf[..len], target).await.unwrap();
        if i % 500 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let stream = p.gateway.connect(AGENT_IP).await.unwrap();
    echo_roundtrip(stream, pattern(1 << 20, 3)).await;
}

#[tokio::test]
async fn same_peer_set_keeps_stream_alive() {
    let p = pair().await;
    spawn_echo(p.agent_incoming);
    let stream = p.gateway.connect(AGENT_IP).await.unwrap();
    let (mut r, mut w) = tokio::io::split(stream);
    w.write_all(b"one").await.unwrap();
    let mut got = [0u8; 3];
    r.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"one");
    p.gateway.set_peers(p.gw_peers.clone());
    p.gateway.set_peers(p.gw_peers.clone());
    w.write_all(b"two").await.unwrap();
    r.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"two");
    w.shutdown().await.unwrap();
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    drop(p.agent);
}

#[tokio::test]
async fn aborted_stream_resets_the_other_side() {
    let mut p = pair().await;
    let mut client = p.gateway.connect(AGENT_IP).await.unwrap();
    // A QUIC stream reaches the peer with its first byte.
    client.write_all(b"x").await.unwrap();
    let accepted = p.agent_incoming.accept().await.unwrap();
    accepted.abort();
    let mut buf = [0u8; 16];
    let res = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
        .await
        .expect("the reset must arrive, not a hang");
    assert_eq!(res.unwrap_err().kind(), std::io::ErrorKind::ConnectionReset);
    drop(p.agent);
}

// boringtun's timers (the agent's keepalive) need the real clock, which `mock-time` replaces.
#[cfg(not(feature = "mock-time"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_restart_on_the_same_port_resumes_within_five_seconds() {
    let gw_key = generate_private_key();
    let agent_key = generate_private_key();
    let gw_config = |listen| TunnelConfig {
        private_key: gw_key,
        overlay_address: GW_IP,
        mtu: 1420,
        listen,
        dials: false,
        quic: Default::default(),
    };
    let (gateway, gw_incoming) = Tunnel::bind(gw_config("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let gw_addr = gateway.local_addr();
    let (agent, agent_incoming) = Tunnel::bind(TunnelConfig {
        private_key: agent_key,
        overlay_address: AGENT_IP,
        mtu: 1420,
        listen: "127.0.0.1:0".parse().unwrap(),
        dials: true,
        quic: Default::default(),
    })
    .await
    .unwrap();
    let gw_peers = vec![PeerSpec {
        public_key: public_key(&agent_key),
        allowed_ip: AGENT_IP,
        endpoint: None,
        persistent_keepalive: None,
    }];
    gateway.set_peers(gw_peers.clone());
    agent.set_peers(vec![PeerSpec {
        public_key: public_key(&gw_key),
        allowed_ip: GW_IP,
        endpoint: Some(gw_addr),
        persistent_keepalive: Some(1),
    }]);
    spawn_echo(agent_incoming);
    let stream = tokio::time::timeout(Duration::from_secs(5), gateway.connect(AGENT_IP))
        .await
        .unwrap()
        .unwrap();
    echo_roundtrip(stream, b"before the restart".to_vec()).await;

    // The gateway process restarts: same key, same port, same peers, no endpoint hint.
    gateway.shutdown();
    drop(gateway);
    drop(gw_incoming);
    let restart = tokio::time::Instant::now();
    let gateway = loop {
        match Tunnel::bind(gw_config(gw_addr)).await {
            Ok((gateway, _incoming)) => break gateway,
            Err(_) if restart.elapsed() < Duration::from_secs(2) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("cannot rebind {gw_addr}: {e}"),
        }
    };
    gateway.set_peers(gw_peers);
    // The agent's keepalive (1 s) on its stale session makes the gateway start a handshake.
    let recovered = async {
        loop {
            let attempt =
                tokio::time::timeout(Duration::from_millis(1500), gateway.connect(AGENT_IP)).await;
            if let Ok(Ok(stream)) = attempt {
                return stream;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let stream = tokio::time::timeout(Duration::from_secs(5), recovered)
        .await
        .expect("no traffic from the restarted gateway within 5 s");
    echo_roundtrip(stream, pattern(64 * 1024, 11)).await;
    assert!(restart.elapsed() < Duration::from_secs(6));
    drop(agent);
}

/// Carries datagrams between two relays (what the WebSocket does in the fallback).
fn bridge(mut a: kakuremichi_tunnel::Relay, mut b: kakuremichi_tunnel::Relay) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                d = a.recv() => match d { Some(d) => { b.send(d); } None => break },
                d = b.recv() => match d { Some(d) => { a.send(d); } None => break },
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_udp_is_black_holed_is_reported_blocked_and_reached_over_a_relay() {
    use kakuremichi_tunnel::{relay_address, PathEvent, PathSettings};
    let gw_key = generate_private_key();
    let agent_key = generate_private_key();
    let config = |key, ip, dials| TunnelConfig {
        private_key: key,
        overlay_address: ip,
        mtu: 1420,
        listen: "127.0.0.1:0".parse().unwrap(),
        dials,
        quic: Default::default(),
    };
    let (gateway, _gw_incoming) = Tunnel::bind(config(gw_key, GW_IP, false)).await.unwrap();
    let (agent, agent_incoming) = Tunnel::bind(config(agent_key, AGENT_IP, true))
        .await
        .unwrap();
    spawn_echo(agent_incoming);
    // The agent's configured gateway endpoint swallows everything: UDP "blocked".
    let black_hole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let hole = black_hole.local_addr().unwrap();
    let mut events = agent.watch_paths(PathSettings {
        blocked_after: Duration::from_millis(300),
        probe_every: Duration::from_secs(60),
    });
    gateway.set_peers(vec![PeerSpec {
        public_key: public_key(&agent_key),
        allowed_ip: AGENT_IP,
        endpoint: None,
        persistent_keepalive: None,
    }]);
    agent.set_peers(vec![PeerSpec {
        public_key: public_key(&gw_key),
        allowed_ip: GW_IP,
        endpoint: Some(hole),
        persistent_keepalive: Some(25),
    }]);
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("no path event within 5 s")
        .unwrap();
    assert_eq!(event, PathEvent::Blocked(hole));
    assert!(gateway.peer_stats()[0].last_handshake.is_none());

    // The relay: the agent's datagrams for `hole` reach the gateway as if from a relay address.
    bridge(
        agent.attach_relay(hole),
        gateway.attach_relay(relay_address(1)),
    );
    let stream = tokio::time::timeout(Duration::from_secs(10), gateway.connect(AGENT_IP))
        .await
        .expect("no connection over the relay")
        .unwrap();
    echo_roundtrip(stream, pattern(1 << 20, 3)).await;
    let stats = gateway.peer_stats();
    assert_eq!(
        stats[0].endpoint,
        Some(relay_address(1)),
        "the gateway roamed to the relay"
    );
    // While relayed, nothing more is reported.
    assert!(events.try_recv().is_err());
    drop(black_hole);
}
