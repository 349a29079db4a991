//! Deterministic simulation of a gateway and an agent: WireGuard carrying QUIC, on a virtual
//! clock and a virtual link with latency, loss, reordering and blackouts.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;
use kakuremichi_tunnel::{ConnectError, ConnectFailure, Event, PeerSpec, StreamError, StreamId};
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
fn agent_dials_quic_at_once_and_gateway_accepts() {
    let mut sim = Sim::pair(21, Some(25));
    sim.run_until(Duration::from_millis(200), |s| {
        s.quic_up(GW, AGENT_IP) && s.quic_up(AGENT, GW_IP)
    });
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

fn lossy_transfer(seed: u64, loss: f64, reorder: f64, limit: Duration) -> Duration {
    let mut sim = Sim::pair(seed, Some(25));
    let (g, a) = sim.connect(GW, AGENT_IP, 80, AGENT);
    sim.loss = loss;
    sim.reorder = reorder;
    let ab = pattern(2 << 20, 3);
    let ba = pattern(512 << 10, 4);
    let start = sim.now;
    sim.transfer((GW, g), (AGENT, a), &ab, &ba, limit);
    sim.now - start
}

#[test]
fn one_percent_loss_and_reordering_deliver_exactly_and_fast() {
    // 2 MiB one way, 512 KiB the other, 5 ms one-way latency: QUIC's loss recovery keeps this
    // to well under a second of virtual time.
    let took = lossy_transfer(3, 0.01, 0.1, Duration::from_secs(20));
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[test]
fn five_percent_loss_and_reordering_deliver_exactly() {
    let took = lossy_transfer(31, 0.05, 0.1, Duration::from_secs(60));
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

#[test]
fn three_second_blackout_is_survived() {
    let mut sim = Sim::pair(11, Some(25));
    let (g, a) = sim.connect(GW, AGENT_IP, 80, AGENT);
    let start = sim.now + Duration::from_millis(20);
    sim.blackout = Some((start, start + Duration::from_secs(3)));
    let ab = pattern(1 << 20, 5);
    let ba = pattern(1 << 20, 6);
    sim.transfer((GW, g), (AGENT, a), &ab, &ba, Duration::from_secs(30));
    assert!(sim.quic_up(GW, AGENT_IP));
}

#[test]
fn connect_without_route_fails_at_once() {
    let mut sim = Sim::pair(5, Some(25));
    let now = sim.now;
    let err = sim.nodes[GW]
        .core
        .connect(Ipv4Addr::new(100, 64, 9, 9), now)
        .unwrap_err();
    assert!(matches!(err, ConnectError::NoRoute(_)));
}

#[test]
fn stream_waits_for_the_connection_then_times_out() {
    // The agent never gets through: the gateway's stream waits for the agent's connection for
    // the open timeout (4 s), then fails.
    let mut sim = Sim::pair(13, Some(25));
    sim.blackout = Some((sim.now, sim.now + Duration::from_secs(3600)));
    let now = sim.now;
    let id = sim.nodes[GW].core.connect(AGENT_IP, now).unwrap();
    sim.run_until(Duration::from_secs(5), |s| {
        s.nodes[GW]
            .events
            .contains(&Event::ConnectFailed(id, ConnectFailure::TimedOut))
    });
    assert!(sim.now - now >= Duration::from_secs(4));
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
fn quic_from_a_peer_claiming_another_address_is_dropped() {
    // A second agent that claims the first agent's overlay address must not reach the gateway's
    // QUIC endpoint: the gateway only takes inner packets whose source is the sending peer's
    // allowed IP.
    let mut sim = Sim::pair(7, Some(25));
    sim.run_until(Duration::from_secs(1), |s| s.quic_up(GW, AGENT_IP));
    let rogue_key = key(9);
    let now = sim.now;
    let mut rogue = core(&config(rogue_key, AGENT_IP), 99, now);
    let gw_pub = kakuremichi_tunnel::public_key(&sim.nodes[GW].key);
    rogue.set_peers(
        vec![PeerSpec {
            public_key: gw_pub,
            allowed_ip: GW_IP,
            endpoint: Some(sim.nodes[GW].addr),
            persistent_keepalive: Some(25),
        }],
        now,
    );
    // The gateway knows the rogue as a peer with a different allowed IP.
    let rogue_ip = Ipv4Addr::new(100, 64, 0, 3);
    let peers = vec![
        sim.gw_peer(),
        PeerSpec {
            public_key: kakuremichi_tunnel::public_key(&rogue_key),
            allowed_ip: rogue_ip,
            endpoint: None,
            persistent_keepalive: None,
        },
    ];
    sim.nodes[GW].core.set_peers(peers, now);
    sim.nodes.push(SimNode {
        core: rogue,
        addr: "10.0.0.3:1".parse().unwrap(),
        key: rogue_key,
        events: Vec::new(),
        sent: 0,
    });
    sim.run_for(Duration::from_secs(2));
    // The rogue has a WireGuard session but no QUIC connection; the real agent's is untouched.
    assert!(sim.nodes[GW]
        .core
        .peer_stats()
        .iter()
        .all(|p| p.last_handshake.is_some()));
    assert!(!sim.quic_up(2, GW_IP));
    assert!(!sim.quic_up(GW, rogue_ip));
    assert!(sim.quic_up(GW, AGENT_IP));
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
fn removed_peer_loses_its_streams_at_once() {
    let mut sim = Sim::pair(14, Some(25));
    let (g, _a) = sim.connect(GW, AGENT_IP, 80, AGENT);
    let now = sim.now;
    sim.nodes[GW].core.set_peers(Vec::new(), now);
    let mut buf = [0u8; 16];
    assert_eq!(
        sim.nodes[GW].core.stream_recv(g, &mut buf),
        Err(StreamError::Reset)
    );
    assert!(matches!(
        sim.nodes[GW].core.connect(AGENT_IP, now),
        Err(ConnectError::NoRoute(_))
    ));
}

#[test]
fn two_thousand_concurrent_streams_are_all_accepted() {
    let mut sim = Sim::pair(10, Some(25));
    sim.run_until(Duration::from_secs(1), |s| s.quic_up(GW, AGENT_IP));
    let now = sim.now;
    let ids: Vec<StreamId> = (0..2000)
        .map(|_| sim.nodes[GW].core.connect(AGENT_IP, now).unwrap())
        .collect();
    for id in &ids {
        sim.nodes[GW].core.stream_send(*id, b"hi").unwrap();
    }
    sim.run_until(Duration::from_secs(5), |s| {
        s.nodes[AGENT]
            .events
            .iter()
            .filter(|e| matches!(e, Event::Accepted(_)))
            .count()
            == 2000
    });
    assert_eq!(sim.nodes[GW].core.stream_count(), 2000);
    // Released streams are forgotten on both sides.
    let now = sim.now;
    for id in ids {
        sim.nodes[GW].core.stream_release(id);
    }
    let accepted: Vec<StreamId> = sim.nodes[AGENT]
        .events
        .drain(..)
        .filter_map(|e| match e {
            Event::Accepted(id) => Some(id),
            _ => None,
        })
        .collect();
    for id in accepted {
        sim.nodes[AGENT].core.stream_release(id);
    }
    let _ = now;
    sim.run_for(Duration::from_millis(200));
    assert_eq!(sim.nodes[GW].core.stream_count(), 0);
    assert_eq!(sim.nodes[AGENT].core.stream_count(), 0);
}

#[test]
fn streams_to_a_peer_that_went_silent_fail_within_five_seconds() {
    // The agent vanishes (nothing it sends or receives gets through any more). The connection's
    // idle timeout (5 s since anything was heard, kept from firing by 1 s keep-alives while the
    // agent lives) ends every stream on it, busy or idle.
    let mut sim = Sim::pair(12, Some(25));
    let (busy, _) = sim.connect(GW, AGENT_IP, 80, AGENT);
    let (idle, _) = sim.connect(GW, AGENT_IP, 80, AGENT);
    sim.blackout = Some((sim.now, sim.now + Duration::from_secs(3600)));
    let now = sim.now;
    assert_eq!(sim.nodes[GW].core.stream_send(busy, b"request").unwrap(), 7);
    fn gone(sim: &mut Sim, id: StreamId) -> bool {
        let mut buf = [0u8; 64];
        !matches!(
            sim.nodes[GW].core.stream_recv(id, &mut buf),
            Err(StreamError::WouldBlock)
        )
    }
    sim.run_for(Duration::from_secs(4));
    assert!(!gone(&mut sim, busy), "aborted too early");
    sim.run_until(Duration::from_secs(2), |s| gone(s, busy) && gone(s, idle));
    // 5 s from the request (the last thing either side did), to within a step of the clock.
    assert!(
        sim.now - now <= Duration::from_millis(5010),
        "{:?}",
        sim.now - now
    );
}

#[test]
fn agent_behind_a_rebinding_nat_is_reached_again_at_once() {
    // The agent's NAT forgets its mapping and gives it a new public port. The agent's next
    // QUIC keep-alive (1 s) arrives from the new address; the gateway's WireGuard moves the
    // endpoint and traffic flows again, on the same connection and stream.
    let mut sim = Sim::pair(15, Some(25));
    let (g, a) = sim.connect(GW, AGENT_IP, 80, AGENT);
    sim.transfer_open((GW, g), (AGENT, a), b"before");
    let moved: std::net::SocketAddr = "10.0.0.2:40999".parse().unwrap();
    sim.nodes[AGENT].addr = moved;
    let start = sim.now;
    sim.run_until(Duration::from_secs(5), |s| {
        s.nodes[GW].core.peer_stats()[0].endpoint == Some(moved)
    });
    assert!(sim.now - start <= Duration::from_millis(1500));
    sim.transfer(
        (GW, g),
        (AGENT, a),
        &pattern(200_000, 1),
        &pattern(200_000, 2),
        Duration::from_secs(10),
    );
}

#[test]
fn streams_over_the_cap_wait_for_room_then_fail_as_exhausted() {
    let quic = kakuremichi_tunnel::QuicSettings {
        max_streams: 4,
        ..Default::default()
    };
    let mut sim = Sim::pair_with(16, Some(25), quic);
    let open: Vec<(StreamId, StreamId)> = (0..4)
        .map(|_| sim.connect(GW, AGENT_IP, 80, AGENT))
        .collect();
    // A fifth waits for room: it opens once a stream ends on both sides.
    let now = sim.now;
    let fifth = sim.nodes[GW].core.connect(AGENT_IP, now).unwrap();
    sim.run_for(Duration::from_millis(200));
    assert!(!sim.nodes[GW]
        .events
        .iter()
        .any(|e| matches!(e, Event::Connected(x) | Event::ConnectFailed(x, _) if *x == fifth)));
    // The gateway is done first (as after reading a response whose length it knew): its
    // STOP_SENDING reaches the agent before the agent lets go of the stream.
    let (g, a) = open[0];
    sim.nodes[GW].core.stream_release(g);
    sim.run_for(Duration::from_millis(50));
    sim.nodes[AGENT].core.stream_release(a);
    sim.run_until(Duration::from_secs(1), |s| {
        s.nodes[GW].events.contains(&Event::Connected(fifth))
    });
    // A sixth finds no room for the whole open timeout: 503 material.
    let now = sim.now;
    let sixth = sim.nodes[GW].core.connect(AGENT_IP, now).unwrap();
    sim.run_until(Duration::from_secs(5), |s| {
        s.nodes[GW]
            .events
            .contains(&Event::ConnectFailed(sixth, ConnectFailure::Exhausted))
    });
}

/// Sends `count` numbered datagrams of `len` bytes from `a` on its stream, pacing them a
/// millisecond apart, and returns the numbers `b` read on its end of the stream, in order of
/// arrival.
fn datagrams_across(
    sim: &mut Sim,
    (a, sa): (usize, StreamId),
    (b, sb): (usize, StreamId),
    count: u32,
    len: usize,
) -> Vec<u32> {
    let mut got = Vec::new();
    let take = |sim: &mut Sim, got: &mut Vec<u32>| {
        while let Ok(d) = sim.nodes[b].core.stream_recv_datagram(sb) {
            assert_eq!(d.len(), len, "a datagram arrives whole");
            let n = u32::from_be_bytes(d[..4].try_into().unwrap());
            assert!(d[4..].iter().all(|&x| x == n as u8), "and intact");
            got.push(n);
        }
    };
    for n in 0..count {
        let mut d = vec![n as u8; len];
        d[..4].copy_from_slice(&n.to_be_bytes());
        assert_eq!(sim.nodes[a].core.stream_send_datagram(sa, &d), Ok(()));
        sim.run_for(Duration::from_millis(1));
        take(sim, &mut got);
    }
    sim.run_for(Duration::from_millis(200));
    take(sim, &mut got);
    got
}

#[test]
fn datagrams_tied_to_a_stream_arrive_both_ways_whole() {
    let mut sim = Sim::pair(41, Some(25));
    let (g, a) = sim.connect(GW, AGENT_IP, 53, AGENT);
    let max = sim.nodes[GW].core.stream_max_datagram(g).unwrap();
    assert!(
        (1200..1400).contains(&max),
        "one datagram fits an inner packet: {max}"
    );
    assert_eq!(sim.nodes[AGENT].core.stream_max_datagram(a), Some(max));
    let there = datagrams_across(&mut sim, (GW, g), (AGENT, a), 200, 100);
    assert_eq!(
        there,
        (0..200).collect::<Vec<_>>(),
        "a clean link loses none"
    );
    let back = datagrams_across(&mut sim, (AGENT, a), (GW, g), 200, max);
    assert_eq!(back, (0..200).collect::<Vec<_>>());
    // One byte more does not fit: the owner sends it on the stream instead.
    assert_eq!(
        sim.nodes[GW]
            .core
            .stream_send_datagram(g, &vec![0; max + 1]),
        Err(kakuremichi_tunnel::DatagramError::TooLarge)
    );
    // The stream itself still carries bytes.
    sim.transfer_open((GW, g), (AGENT, a), b"after the datagrams");
    assert_eq!(sim.nodes[GW].core.datagrams_dropped(), 0);
    assert_eq!(sim.nodes[AGENT].core.datagrams_dropped(), 0);
}

#[test]
fn lost_datagrams_are_not_resent_and_never_hold_up_later_ones() {
    let mut sim = Sim::pair(42, Some(25));
    let (g, a) = sim.connect(GW, AGENT_IP, 53, AGENT);
    sim.loss = 0.1;
    sim.reorder = 0.1;
    let got = datagrams_across(&mut sim, (GW, g), (AGENT, a), 1000, 200);
    // About 10% lost (each way's ACKs are lost too, which does not matter here).
    assert!(
        (800..990).contains(&got.len()),
        "lost ones are not resent: {} of 1000",
        got.len()
    );
    let mut unique = got.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), got.len(), "none arrives twice");
    // A blackout: what is sent during it is lost; what follows arrives at once, not after a
    // retransmission of what was lost.
    sim.loss = 0.0;
    sim.reorder = 0.0;
    let start = sim.now;
    sim.blackout = Some((start, start + Duration::from_millis(500)));
    let lost = datagrams_across(&mut sim, (GW, g), (AGENT, a), 100, 200);
    assert!(lost.len() < 100, "sent into the blackout: {}", lost.len());
    sim.run_for(Duration::from_millis(600));
    let sent_at = sim.now;
    let mut d = vec![7u8; 200];
    d[..4].copy_from_slice(&4242u32.to_be_bytes());
    sim.nodes[GW].core.stream_send_datagram(g, &d).unwrap();
    let mut arrived = None;
    sim.run_until(Duration::from_secs(1), |s| {
        if let Ok(d) = s.nodes[AGENT].core.stream_recv_datagram(a) {
            if d[..4] == 4242u32.to_be_bytes() {
                arrived = Some(s.now);
            }
        }
        arrived.is_some()
    });
    let took = arrived.unwrap() - sent_at;
    assert!(took < Duration::from_millis(50), "took {took:?}");
}

#[test]
fn a_datagram_naming_no_stream_of_the_connection_is_dropped() {
    let mut sim = Sim::pair(43, Some(25));
    let (g, a) = sim.connect(GW, AGENT_IP, 53, AGENT);
    let (g2, a2) = sim.connect(GW, AGENT_IP, 54, AGENT);
    // Datagrams go to the stream they name, not to its neighbour.
    sim.nodes[GW]
        .core
        .stream_send_datagram(g2, b"second")
        .unwrap();
    sim.run_for(Duration::from_millis(50));
    assert_eq!(
        sim.nodes[AGENT].core.stream_recv_datagram(a),
        Err(StreamError::WouldBlock)
    );
    assert_eq!(
        &sim.nodes[AGENT].core.stream_recv_datagram(a2).unwrap()[..],
        b"second"
    );
    // Once the agent has let its end go, a datagram for it is dropped and counted.
    sim.nodes[AGENT].core.stream_release(a);
    sim.run_for(Duration::from_millis(50));
    let _ = sim.nodes[GW].core.stream_send_datagram(g, b"late");
    sim.run_for(Duration::from_millis(50));
    assert_eq!(
        sim.nodes[AGENT].core.stream_recv_datagram(a),
        Err(StreamError::Unknown)
    );
    assert_eq!(sim.nodes[AGENT].core.datagrams_dropped(), 1);
    // A queue that is not read holds at most STREAM_DATAGRAMS; the rest are dropped.
    for _ in 0..kakuremichi_tunnel::STREAM_DATAGRAMS + 10 {
        sim.nodes[GW].core.stream_send_datagram(g2, b"x").unwrap();
        sim.run_for(Duration::from_micros(200));
    }
    sim.run_for(Duration::from_millis(100));
    assert_eq!(sim.nodes[AGENT].core.datagrams_dropped(), 11);
}
