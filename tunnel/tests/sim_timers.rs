//! Simulation tests that depend on boringtun's timers: they advance boringtun's mock clock in
//! step with the virtual clock. Run with `--features mock-time`.
#![allow(clippy::unwrap_used)]
#![cfg(feature = "mock-time")]

mod common;

use std::time::Duration;

use common::*;

#[test]
fn idle_connection_is_kept_alive_every_second() {
    // QUIC keep-alives (1 s) keep the connection, the WireGuard session and the NAT mapping
    // alive while no stream is open; the agent's persistent keepalive is then never needed.
    let mut sim = Sim::pair(20, Some(25));
    sim.run_until(Duration::from_secs(1), |s| s.quic_up(GW, AGENT_IP));
    let before = sim.nodes[AGENT].sent;
    sim.max_step = Duration::from_millis(100);
    sim.run_for(Duration::from_secs(31));
    let sent = sim.nodes[AGENT].sent - before;
    assert!((25..=100).contains(&sent), "{sent} datagrams in 31 s");
    assert!(sim.handshake_done(GW));
    assert!(sim.quic_up(GW, AGENT_IP));
}

#[test]
fn listening_node_is_silent_until_a_peer_reaches_it() {
    let mut sim = Sim::pair(21, None);
    // Nothing the agent sends arrives.
    sim.blackout = Some((sim.now, sim.now + Duration::from_secs(3600)));
    sim.max_step = Duration::from_millis(250);
    sim.run_for(Duration::from_secs(30));
    assert_eq!(sim.nodes[GW].sent, 0);
}

#[test]
fn rekey_keeps_data_flowing() {
    let mut sim = Sim::pair(22, Some(25));
    let (g, a) = sim.connect(GW, AGENT_IP, 80, AGENT);
    let mut rbuf = [0u8; 4096];
    let start = sim.now;
    // 200 s of traffic, a little every half second, past REKEY_AFTER_TIME (120 s) and
    // REJECT_AFTER_TIME (180 s).
    for round in 0..400u32 {
        let msg = round.to_le_bytes();
        sim.nodes[GW].core.stream_send(g, &msg).unwrap();
        sim.nodes[AGENT].core.stream_send(a, &msg).unwrap();
        let mut got = [Vec::new(), Vec::new()];
        sim.run_until(Duration::from_secs(5), |s| {
            for (k, (node, id)) in [(AGENT, a), (GW, g)].into_iter().enumerate() {
                if let Ok(n) = s.nodes[node].core.stream_recv(id, &mut rbuf) {
                    got[k].extend_from_slice(&rbuf[..n]);
                }
            }
            got[0].len() == 4 && got[1].len() == 4
        });
        assert_eq!(got[0], msg);
        assert_eq!(got[1], msg);
        sim.run_for(Duration::from_millis(500));
    }
    assert!(sim.now - start >= Duration::from_secs(200));
    let stats = sim.nodes[GW].core.peer_stats();
    let age = stats[0].last_handshake.unwrap();
    assert!(
        age < Duration::from_secs(120),
        "no rekey: session is {age:?} old"
    );
}

#[test]
fn agent_restart_with_same_key_resumes_traffic() {
    let mut sim = Sim::pair(23, Some(25));
    let (g, a) = sim.connect(GW, AGENT_IP, 80, AGENT);
    sim.transfer(
        (GW, g),
        (AGENT, a),
        b"before",
        b"restart",
        Duration::from_secs(5),
    );
    sim.run_for(Duration::from_secs(3));
    // The agent restarts: new core, same key, new UDP port (NAT rebinding).
    let now = sim.now;
    let mut fresh = core(&config(sim.nodes[AGENT].key, AGENT_IP), 777, now);
    fresh.set_peers(vec![sim.agent_peer(Some(25))], now);
    sim.nodes[AGENT].core = fresh;
    sim.nodes[AGENT].addr = "10.0.0.2:40001".parse().unwrap();
    sim.nodes[AGENT].events.clear();
    sim.run_until(Duration::from_secs(1), |s| {
        s.nodes[GW].core.peer_stats()[0].endpoint == Some(s.nodes[AGENT].addr)
    });
    // The fresh agent's QUIC connection replaces the old one within a few round trips.
    sim.run_for(Duration::from_millis(200));
    let (g, a) = sim.connect(GW, AGENT_IP, 80, AGENT);
    sim.transfer(
        (GW, g),
        (AGENT, a),
        &pattern(200_000, 1),
        &pattern(200_000, 2),
        Duration::from_secs(10),
    );
}

#[test]
fn gateway_restart_with_same_key_resumes_traffic() {
    let mut sim = Sim::pair(24, Some(25));
    let (g, a) = sim.connect(GW, AGENT_IP, 80, AGENT);
    sim.transfer((GW, g), (AGENT, a), b"one", b"two", Duration::from_secs(5));
    let now = sim.now;
    let mut fresh = core(&config(sim.nodes[GW].key, GW_IP), 778, now);
    fresh.set_peers(vec![sim.gw_peer()], now);
    sim.nodes[GW].core = fresh;
    sim.nodes[GW].events.clear();
    // The fresh gateway learns the agent's endpoint at the agent's next handshake (keepalive
    // traffic without a session triggers it within KEEPALIVE + REKEY_TIMEOUT).
    sim.max_step = Duration::from_millis(100);
    sim.run_until(Duration::from_secs(90), |s| s.handshake_done(GW));
    sim.max_step = Duration::from_millis(5);
    let (g, a) = sim.connect(GW, AGENT_IP, 80, AGENT);
    sim.transfer(
        (GW, g),
        (AGENT, a),
        &pattern(100_000, 3),
        &pattern(100_000, 4),
        Duration::from_secs(10),
    );
}

#[test]
fn lost_handshake_is_retried() {
    let mut sim = Sim::pair(25, Some(25));
    sim.loss = 1.0;
    sim.run_for(Duration::from_millis(100));
    assert!(!sim.handshake_done(AGENT));
    sim.loss = 0.0;
    sim.max_step = Duration::from_millis(100);
    sim.run_until(Duration::from_secs(10), |s| {
        s.handshake_done(AGENT) && s.handshake_done(GW)
    });
    sim.max_step = Duration::from_millis(5);
    let (g, a) = sim.connect(GW, AGENT_IP, 80, AGENT);
    sim.transfer(
        (GW, g),
        (AGENT, a),
        b"late",
        b"but fine",
        Duration::from_secs(5),
    );
}

#[test]
fn lost_first_initiation_is_resent_within_a_second() {
    let mut sim = Sim::pair(26, Some(25));
    let start = sim.now;
    // The first initiation is lost (the gateway's socket is not bound yet, say).
    sim.loss = 1.0;
    sim.run_until(Duration::from_secs(1), |s| s.nodes[AGENT].sent >= 1);
    assert!(!sim.handshake_done(AGENT));
    sim.loss = 0.0;
    sim.run_until(Duration::from_secs(2), |s| {
        s.handshake_done(AGENT) && s.handshake_done(GW)
    });
    let took = sim.now - start;
    assert!(
        took <= Duration::from_millis(1500),
        "session after {took:?}"
    );
    let (g, a) = sim.connect(GW, AGENT_IP, 80, AGENT);
    sim.transfer(
        (GW, g),
        (AGENT, a),
        b"fast",
        b"retry",
        Duration::from_secs(5),
    );
}

#[test]
fn lost_initiations_are_resent_at_one_then_two_seconds() {
    let mut sim = Sim::pair(27, Some(25));
    sim.loss = 1.0;
    sim.max_step = Duration::from_millis(50);
    sim.run_for(Duration::from_millis(3500));
    // The first initiation, then 1 s and 3 s after it; boringtun's next one is at 8 s.
    assert_eq!(sim.nodes[AGENT].sent, 3);
    sim.run_for(Duration::from_secs(4));
    assert_eq!(sim.nodes[AGENT].sent, 3);
    sim.run_for(Duration::from_secs(1));
    assert_eq!(sim.nodes[AGENT].sent, 4);
    sim.loss = 0.0;
    sim.run_until(Duration::from_secs(6), |s| {
        s.handshake_done(AGENT) && s.handshake_done(GW)
    });
}

#[test]
fn restarted_gateway_probes_the_agent_using_its_stale_session() {
    let mut sim = Sim::pair(28, Some(25));
    let (g, a) = sim.connect(GW, AGENT_IP, 80, AGENT);
    sim.transfer((GW, g), (AGENT, a), b"one", b"two", Duration::from_secs(5));
    sim.run_for(Duration::from_secs(2));
    // The gateway restarts: same key, no session, and no idea where the agent is.
    let now = sim.now;
    let mut fresh = core(&config(sim.nodes[GW].key, GW_IP), 779, now);
    fresh.set_peers(vec![sim.gw_peer()], now);
    sim.nodes[GW].core = fresh;
    sim.nodes[GW].events.clear();
    assert_eq!(sim.nodes[GW].core.peer_stats()[0].endpoint, None);
    // The agent still has its sessions and sends QUIC keep-alives on them: the gateway answers
    // with a WireGuard handshake, then a QUIC stateless reset, and the agent dials again.
    let restart = sim.now;
    sim.run_until(Duration::from_secs(5), |s| s.quic_up(GW, AGENT_IP));
    let (a2, g2) = sim.connect(AGENT, GW_IP, 81, GW);
    assert!(sim.handshake_done(GW));
    assert_eq!(
        sim.nodes[GW].core.peer_stats()[0].endpoint,
        Some(sim.nodes[AGENT].addr)
    );
    let took = sim.now - restart;
    assert!(took < Duration::from_secs(5), "recovered after {took:?}");
    sim.transfer(
        (AGENT, a2),
        (GW, g2),
        &pattern(50_000, 5),
        &pattern(50_000, 6),
        Duration::from_secs(10),
    );
    let (g, a) = sim.connect(GW, AGENT_IP, 80, AGENT);
    sim.transfer(
        (GW, g),
        (AGENT, a),
        &pattern(50_000, 7),
        &pattern(50_000, 8),
        Duration::from_secs(10),
    );
}

#[test]
fn restarted_gateway_recovers_on_the_agents_keepalive() {
    let mut sim = Sim::pair(29, Some(5));
    let (g, a) = sim.connect(GW, AGENT_IP, 80, AGENT);
    sim.transfer((GW, g), (AGENT, a), b"one", b"two", Duration::from_secs(5));
    let now = sim.now;
    let mut fresh = core(&config(sim.nodes[GW].key, GW_IP), 780, now);
    fresh.set_peers(vec![sim.gw_peer()], now);
    sim.nodes[GW].core = fresh;
    sim.nodes[GW].events.clear();
    sim.max_step = Duration::from_millis(50);
    // The agent's next persistent keepalive (5 s) triggers the probe.
    sim.run_until(Duration::from_secs(6), |s| s.handshake_done(GW));
    sim.max_step = Duration::from_millis(5);
    let (g, a) = sim.connect(GW, AGENT_IP, 80, AGENT);
    sim.transfer(
        (GW, g),
        (AGENT, a),
        b"three",
        b"four",
        Duration::from_secs(5),
    );
}

/// The core's index of a peer key (FNV-1a + SplitMix64 finalizer, top 24 bits), copied here to
/// aim forged packets at real peers and to pin the derivation down.
fn key_index(key: &[u8; 32]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"kakuremichi peer index".iter().chain(key.iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h >> 40) as u32 & 0x00ff_ffff
}

#[test]
fn forged_data_packets_cannot_move_endpoints_or_amplify() {
    use kakuremichi_tunnel::{public_key, PeerSpec, MAX_DATAGRAM_SIZE};
    use rand::Rng;
    use std::net::{Ipv4Addr, SocketAddr};

    let mut sim = Sim::pair(30, Some(25));
    let (g, a) = sim.connect(GW, AGENT_IP, 80, AGENT);
    sim.transfer((GW, g), (AGENT, a), b"one", b"two", Duration::from_secs(5));
    // A real data packet from the agent shows the gateway's index for it.
    let (g, a) = sim.connect(GW, AGENT_IP, 80, AGENT);
    sim.nodes[AGENT].core.stream_send(a, b"x").unwrap();
    let mut buf = vec![0u8; MAX_DATAGRAM_SIZE];
    let now = sim.now;
    let t = sim.nodes[AGENT].core.poll_transmit(now, &mut buf).unwrap();
    assert_eq!(buf[0], 4);
    let receiver = u32::from_le_bytes(buf[4..8].try_into().unwrap());
    let agent_pub = public_key(&sim.nodes[AGENT].key);
    assert_eq!(
        receiver >> 8,
        key_index(&agent_pub),
        "index not derived from the key"
    );
    let real = buf[..t.len].to_vec();
    let agent_addr = sim.nodes[AGENT].addr;
    sim.inject(agent_addr, GW, &real);

    // 300 more peers that never connected (no session, no endpoint).
    let mut peers = vec![sim.gw_peer()];
    let mut idle = Vec::new();
    for i in 0..300u32 {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&(i + 1000).to_le_bytes());
        k[4] = 7;
        let pk = public_key(&k);
        idle.push(key_index(&pk));
        peers.push(PeerSpec {
            public_key: pk,
            allowed_ip: Ipv4Addr::new(100, 65, (i >> 8) as u8, i as u8),
            endpoint: None,
            persistent_keepalive: None,
        });
    }
    let now = sim.now;
    sim.nodes[GW].core.set_peers(peers, now);

    let attacker: SocketAddr = "10.6.6.6:666".parse().unwrap();
    let start = sim.now;
    let mut forged = [0u8; 200];
    for round in 0..30u32 {
        for i in 0..400usize {
            let len = sim.rng.gen_range(32..forged.len());
            sim.rng.fill(&mut forged[..len]);
            forged[..4].copy_from_slice(&[4, 0, 0, 0]);
            let index = match i % 4 {
                // The agent's live session and its other slots.
                0 => receiver,
                1 => (receiver & !0xff) | sim.rng.gen_range(0..256),
                // Peers without a session.
                2 => (idle[(i / 4 + round as usize) % idle.len()] << 8) | sim.rng.gen_range(0..256),
                _ => sim.rng.gen(),
            };
            forged[4..8].copy_from_slice(&index.to_le_bytes());
            sim.inject(attacker, GW, &forged[..len]);
        }
        sim.run_for(Duration::from_millis(100));
    }
    let elapsed = sim.now - start;
    let probes = sim.sent_to.get(&attacker).copied().unwrap_or(0);
    let windows = elapsed.as_secs() as usize + 2;
    assert!(probes > 0, "peers without a session were never probed");
    assert!(
        probes <= 100 * windows,
        "{probes} datagrams to the attacker in {elapsed:?}"
    );
    let stats = sim.nodes[GW].core.peer_stats();
    let agent = stats.iter().find(|s| s.public_key == agent_pub).unwrap();
    assert_eq!(agent.endpoint, Some(agent_addr));
    assert!(stats
        .iter()
        .filter(|s| s.public_key != agent_pub)
        .all(|s| s.endpoint.is_none()));
    // The tunnel still works.
    let mut got = [0u8; 1];
    sim.run_until(Duration::from_secs(1), |s| {
        s.nodes[GW].core.stream_recv(g, &mut got) == Ok(1)
    });
    assert_eq!(&got, b"x");
    sim.transfer(
        (GW, g),
        (AGENT, a),
        &pattern(20_000, 9),
        &pattern(20_000, 10),
        Duration::from_secs(5),
    );
}
