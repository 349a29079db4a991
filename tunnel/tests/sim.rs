//! Deterministic simulation of a gateway and an agent (no boringtun timers needed).
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddrV4;
use std::time::Duration;

use common::*;
use kakuremichi_tunnel::{ConnectFailure, Event, StreamError};
use rand::{Rng, RngCore};

#[test]
fn handshake_completes_and_gateway_learns_agent_endpoint() {
    let mut sim = Sim::pair(1, Some(25));
    sim.run_until(Duration::from_secs(1), |s| {
        s.handshake_done(GW) && s.handshake_done(AGENT)
    });
    let stats = sim.nodes[GW].core.peer_stats();
    assert_eq!(stats[0].endpoint, Some(sim.nodes[AGENT].addr));
}

#[test]
fn one_mib_each_way_byte_exact() {
    let mut sim = Sim::pair(2, Some(25));
    let (g, a) = sim.connect(GW, AGENT_IP, 80, AGENT);
    let ab = pattern(1 << 20, 1);
    let ba = pattern(1 << 20, 2);
    sim.transfer((GW, g), (AGENT, a), &ab, &ba, Duration::from_secs(30));
    let stats = sim.nodes[GW].core.peer_stats();
    assert!(stats[0].tx_bytes > 1 << 20 && stats[0].rx_bytes > 1 << 20);
}

#[test]
fn loss_and_reordering_still_deliver_exactly() {
    let mut sim = Sim::pair(3, Some(25));
    let (g, a) = sim.connect(GW, AGENT_IP, 80, AGENT);
    sim.loss = 0.02;
    sim.reorder = 0.1;
    let ab = pattern(1 << 20, 3);
    let ba = pattern(256 << 10, 4);
    sim.transfer((GW, g), (AGENT, a), &ab, &ba, Duration::from_secs(300));
}

#[test]
fn syn_to_unlisted_port_is_refused() {
    let mut sim = Sim::pair(4, Some(25));
    sim.run_until(Duration::from_secs(1), |s| s.handshake_done(GW));
    let now = sim.now;
    let id = sim.nodes[GW]
        .core
        .connect(SocketAddrV4::new(AGENT_IP, 81), now)
        .unwrap();
    sim.run_until(Duration::from_secs(2), |s| {
        s.nodes[GW]
            .events
            .contains(&Event::ConnectFailed(id, ConnectFailure::Refused))
    });
    assert!(!sim.nodes[AGENT]
        .events
        .iter()
        .any(|e| matches!(e, Event::Accepted(_))));
    // The listed port still works.
    let (g, a) = sim.connect(GW, AGENT_IP, 80, AGENT);
    sim.transfer(
        (GW, g),
        (AGENT, a),
        b"ping",
        b"pong",
        Duration::from_secs(5),
    );
}

#[test]
fn connect_without_route_fails_at_once() {
    let mut sim = Sim::pair(5, Some(25));
    let now = sim.now;
    let err = sim.nodes[GW]
        .core
        .connect(
            SocketAddrV4::new(std::net::Ipv4Addr::new(100, 64, 9, 9), 80),
            now,
        )
        .unwrap_err();
    assert!(matches!(err, kakuremichi_tunnel::ConnectError::NoRoute(_)));
}

#[test]
fn garbage_and_truncated_datagrams_are_ignored() {
    let mut sim = Sim::pair(6, Some(25));
    let (g, a) = sim.connect(GW, AGENT_IP, 80, AGENT);
    // Capture real datagrams to truncate and corrupt them.
    let mut real = Vec::new();
    let now = sim.now;
    sim.nodes[GW].core.stream_send(g, b"x").unwrap();
    let mut buf = vec![0u8; kakuremichi_tunnel::MAX_DATAGRAM_SIZE];
    while let Some(t) = sim.nodes[GW].core.poll_transmit(now, &mut buf) {
        real.push(buf[..t.len].to_vec());
    }
    let attacker = "203.0.113.9:666".parse().unwrap();
    let agent_addr = sim.nodes[AGENT].addr;
    let gw_addr = sim.nodes[GW].addr;
    for i in 0..5000 {
        let len = sim.rng.gen_range(0..1600);
        let mut junk = vec![0u8; len];
        sim.rng.fill_bytes(&mut junk);
        if len >= 4 && i % 2 == 0 {
            junk[..4].copy_from_slice(&[(i % 5) as u8, 0, 0, 0]);
        }
        sim.inject(attacker, AGENT, &junk);
        sim.inject(attacker, GW, &junk);
        for d in &real {
            let cut = sim.rng.gen_range(0..d.len());
            sim.inject(attacker, AGENT, &d[..cut]);
            let mut flipped = d.clone();
            let at = sim.rng.gen_range(0..d.len());
            flipped[at] ^= 1 << sim.rng.gen_range(0..8);
            sim.inject(attacker, AGENT, &flipped);
        }
    }
    // Unauthenticated input must not move the peer's endpoint.
    assert_eq!(
        sim.nodes[GW].core.peer_stats()[0].endpoint,
        Some(agent_addr)
    );
    assert_eq!(
        sim.nodes[AGENT].core.peer_stats()[0].endpoint,
        Some(gw_addr)
    );
    // Deliver the real datagrams (the "x") and keep going.
    for d in &real {
        sim.inject(gw_addr, AGENT, d);
    }
    let ab = pattern(100_000, 9);
    let mut one = [0u8; 1];
    sim.run_until(Duration::from_secs(2), |s| {
        s.nodes[AGENT].core.stream_recv(a, &mut one) == Ok(1)
    });
    sim.transfer((GW, g), (AGENT, a), &ab, &ab, Duration::from_secs(10));
}

#[test]
fn inbound_stream_from_wrong_source_ip_is_dropped() {
    // A second agent that claims the first agent's overlay address must not reach the gateway's
    // stack: the gateway only accepts packets whose source is the sending peer's allowed IP.
    let mut sim = Sim::pair(7, Some(25));
    sim.run_until(Duration::from_secs(1), |s| s.handshake_done(GW));
    let rogue_key = key(9);
    let now = sim.now;
    let mut rogue = kakuremichi_tunnel::Core::new(&config(rogue_key, AGENT_IP), 99, now);
    let gw_pub = kakuremichi_tunnel::public_key(&sim.nodes[GW].key);
    rogue.set_peers(
        vec![kakuremichi_tunnel::PeerSpec {
            public_key: gw_pub,
            allowed_ip: GW_IP,
            endpoint: Some(sim.nodes[GW].addr),
            persistent_keepalive: Some(25),
        }],
        now,
    );
    // The gateway knows the rogue as a peer with a different allowed IP.
    let mut peers = vec![sim.gw_peer()];
    peers.push(kakuremichi_tunnel::PeerSpec {
        public_key: kakuremichi_tunnel::public_key(&rogue_key),
        allowed_ip: std::net::Ipv4Addr::new(100, 64, 0, 3),
        endpoint: None,
        persistent_keepalive: None,
    });
    sim.nodes[GW].core.set_peers(peers, now);
    sim.nodes[GW].core.set_listen_ports([22]);
    sim.nodes.push(SimNode {
        core: rogue,
        addr: "10.0.0.3:1".parse().unwrap(),
        key: rogue_key,
        events: Vec::new(),
        sent: 0,
    });
    sim.run_for(Duration::from_millis(100));
    let now = sim.now;
    let id = sim.nodes[2]
        .core
        .connect(SocketAddrV4::new(GW_IP, 22), now)
        .unwrap();
    sim.run_for(Duration::from_secs(2));
    assert!(!sim.nodes[GW]
        .events
        .iter()
        .any(|e| matches!(e, Event::Accepted(_))));
    assert!(!sim.nodes[2].events.contains(&Event::Connected(id)));
}

#[test]
fn set_peers_with_same_set_keeps_streams() {
    let mut sim = Sim::pair(8, Some(25));
    let (g, a) = sim.connect(GW, AGENT_IP, 80, AGENT);
    let now = sim.now;
    let gw_peer = sim.gw_peer();
    let agent_peer = sim.agent_peer(Some(25));
    sim.nodes[GW].core.set_peers(vec![gw_peer], now);
    sim.nodes[AGENT].core.set_peers(vec![agent_peer], now);
    sim.transfer(
        (GW, g),
        (AGENT, a),
        &pattern(50_000, 1),
        &pattern(70_000, 2),
        Duration::from_secs(10),
    );
}

#[test]
fn many_concurrent_inbound_connections_are_all_accepted() {
    let mut sim = Sim::pair(10, Some(25));
    sim.run_until(Duration::from_secs(1), |s| s.handshake_done(GW));
    let now = sim.now;
    let ids: Vec<_> = (0..50)
        .map(|_| {
            sim.nodes[GW]
                .core
                .connect(SocketAddrV4::new(AGENT_IP, 80), now)
                .unwrap()
        })
        .collect();
    sim.run_until(Duration::from_secs(3), |s| {
        ids.iter()
            .all(|id| s.nodes[GW].events.contains(&Event::Connected(*id)))
    });
    sim.run_for(Duration::from_millis(50));
    let accepted = sim.nodes[AGENT]
        .events
        .iter()
        .filter(|e| matches!(e, Event::Accepted(_)))
        .count();
    assert_eq!(accepted, 50);
}

#[test]
fn both_ends_retransmitting_after_lost_acks_do_not_stall() {
    // Both ends send a flight at the same moment; the flights arrive, but every ACK for them is
    // lost, so both ends time out and go back to their first unacknowledged segment, which the
    // other end already has. Each end then answers the other's retransmission with an ACK; those
    // ACKs must be accepted (their sequence number must not go back with the retransmission), or
    // the connection stalls for good with both ends retransmitting.
    let mut sim = Sim::pair(11, Some(25));
    let (g, a) = sim.connect(GW, AGENT_IP, 80, AGENT);
    let start = sim.now + Duration::from_millis(1);
    sim.blackout = Some((start, start + Duration::from_millis(1500)));
    let ab = pattern(256 << 10, 5);
    let ba = pattern(256 << 10, 6);
    sim.transfer((GW, g), (AGENT, a), &ab, &ba, Duration::from_secs(30));
}

#[test]
fn connection_to_a_peer_that_went_silent_is_aborted() {
    // The agent vanishes (nothing it sends or receives gets through any more). A connection with
    // unanswered data is aborted after 10 s of silence, an idle one after its keep-alive probe
    // (15 s) goes unanswered for 10 s: neither waits forever.
    let mut sim = Sim::pair(12, Some(25));
    let (busy, _) = sim.connect(GW, AGENT_IP, 80, AGENT);
    let (idle, _) = sim.connect(GW, AGENT_IP, 80, AGENT);
    sim.blackout = Some((sim.now, sim.now + Duration::from_secs(3600)));
    let now = sim.now;
    assert_eq!(sim.nodes[GW].core.stream_send(busy, b"request").unwrap(), 7);
    fn gone(sim: &mut Sim, id: kakuremichi_tunnel::StreamId) -> bool {
        let mut buf = [0u8; 64];
        !matches!(
            sim.nodes[GW].core.stream_recv(id, &mut buf),
            Err(StreamError::WouldBlock)
        )
    }
    sim.run_for(Duration::from_secs(9));
    assert!(!gone(&mut sim, busy), "aborted too early");
    // (run_until fails the test if the condition is not met in time.)
    sim.run_until(Duration::from_secs(3), |s| gone(s, busy));
    assert!(sim.now - now <= Duration::from_secs(12));
    sim.run_until(Duration::from_secs(30), |s| gone(s, idle));
}
