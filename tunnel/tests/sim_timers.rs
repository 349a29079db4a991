//! Simulation tests that depend on boringtun's timers: they advance boringtun's mock clock in
//! step with the virtual clock. Run with `--features mock-time`.
#![allow(clippy::unwrap_used)]
#![cfg(feature = "mock-time")]

mod common;

use std::time::Duration;

use common::*;
use kakuremichi_tunnel::Core;

#[test]
fn persistent_keepalive_is_sent_while_idle() {
    let mut sim = Sim::pair(20, Some(5));
    sim.run_until(Duration::from_secs(1), |s| s.handshake_done(GW));
    let before = sim.nodes[AGENT].sent;
    sim.max_step = Duration::from_millis(250);
    sim.run_for(Duration::from_secs(31));
    let keepalives = sim.nodes[AGENT].sent - before;
    assert!(
        (5..=8).contains(&keepalives),
        "{keepalives} keepalives in 31 s"
    );
    // The gateway saw them: its session stays up.
    assert!(sim.handshake_done(GW));
}

#[test]
fn no_keepalive_means_silence() {
    let mut sim = Sim::pair(21, None);
    sim.max_step = Duration::from_millis(250);
    sim.run_for(Duration::from_secs(30));
    assert_eq!(sim.nodes[AGENT].sent, 0);
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
    let mut fresh = Core::new(&config(sim.nodes[AGENT].key, AGENT_IP), 777, now);
    fresh.set_listen_ports([80]);
    fresh.set_peers(vec![sim.agent_peer(Some(25))], now);
    sim.nodes[AGENT].core = fresh;
    sim.nodes[AGENT].addr = "10.0.0.2:40001".parse().unwrap();
    sim.nodes[AGENT].events.clear();
    sim.run_until(Duration::from_secs(1), |s| {
        s.nodes[GW].core.peer_stats()[0].endpoint == Some(s.nodes[AGENT].addr)
    });
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
    let mut fresh = Core::new(&config(sim.nodes[GW].key, GW_IP), 778, now);
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
