//! A small deterministic network simulator: two (or more) `Core`s, a virtual clock, latency,
//! loss and reordering knobs. The boringtun mock clock (feature `mock-time`) is advanced in step
//! with the virtual clock; it is thread-local, and every test runs on its own thread.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use kakuremichi_tunnel::{
    public_key, Core, Event, PeerSpec, QuicSettings, StreamError, StreamId, TunnelConfig,
    MAX_DATAGRAM_SIZE,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const GW_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
pub const AGENT_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
pub const GW: usize = 0;
pub const AGENT: usize = 1;

pub struct SimNode {
    pub core: Core,
    pub addr: SocketAddr,
    pub key: [u8; 32],
    pub events: Vec<Event>,
    /// Datagrams this node sent.
    pub sent: usize,
}

pub struct Sim {
    pub now: Instant,
    pub nodes: Vec<SimNode>,
    pub latency: Duration,
    /// Probability that a datagram is dropped.
    pub loss: f64,
    /// Probability that a datagram is delayed by up to another `latency` (so it is reordered).
    pub reorder: f64,
    /// Largest jump of the virtual clock per step.
    pub max_step: Duration,
    /// Datagrams sent in `[start, end)` are all dropped (a blackout in both directions).
    pub blackout: Option<(Instant, Instant)>,
    /// Datagrams sent to each destination address (including lost ones).
    pub sent_to: BTreeMap<SocketAddr, usize>,
    in_flight: BTreeMap<(Instant, u64), (SocketAddr, SocketAddr, Vec<u8>)>,
    seq: u64,
    pub rng: StdRng,
    buf: Vec<u8>,
}

pub fn key(seed: u8) -> [u8; 32] {
    let mut k = [seed; 32];
    k[0] = 0x40;
    k
}

/// A node's config; the agent's address dials, every other node listens.
pub fn config(key: [u8; 32], ip: Ipv4Addr) -> TunnelConfig {
    TunnelConfig {
        private_key: key,
        overlay_address: ip,
        mtu: 1420,
        listen: "0.0.0.0:0".parse().unwrap(),
        dials: ip == AGENT_IP,
        quic: Default::default(),
    }
}

/// A core for `config`.
pub fn core(config: &TunnelConfig, seed: u64, now: Instant) -> Core {
    Core::new(config, seed, now).unwrap()
}

impl Sim {
    /// A gateway (node 0) and an agent (node 1) that dials it with the given keepalive.
    pub fn pair(seed: u64, agent_keepalive: Option<u16>) -> Sim {
        Self::pair_with(seed, agent_keepalive, QuicSettings::default())
    }

    /// [`Sim::pair`] with these QUIC settings on both nodes.
    pub fn pair_with(seed: u64, agent_keepalive: Option<u16>, quic: QuicSettings) -> Sim {
        // RUST_LOG=kakuremichi_tunnel=debug,quinn_proto=debug shows what happened.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let now = Instant::now();
        let mut sim = Sim {
            now,
            nodes: Vec::new(),
            latency: Duration::from_millis(5),
            loss: 0.0,
            reorder: 0.0,
            max_step: Duration::from_millis(5),
            blackout: None,
            sent_to: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            seq: 0,
            rng: StdRng::seed_from_u64(seed),
            buf: vec![0; MAX_DATAGRAM_SIZE],
        };
        let gw_key = key(1);
        let agent_key = key(2);
        sim.nodes.push(SimNode {
            core: core(
                &TunnelConfig {
                    quic: quic.clone(),
                    ..config(gw_key, GW_IP)
                },
                seed,
                now,
            ),
            addr: "10.0.0.1:51820".parse().unwrap(),
            key: gw_key,
            events: Vec::new(),
            sent: 0,
        });
        sim.nodes.push(SimNode {
            core: core(
                &TunnelConfig {
                    quic,
                    ..config(agent_key, AGENT_IP)
                },
                seed + 1,
                now,
            ),
            addr: "10.0.0.2:40000".parse().unwrap(),
            key: agent_key,
            events: Vec::new(),
            sent: 0,
        });
        let gw_peer = sim.gw_peer();
        let agent_peer = sim.agent_peer(agent_keepalive);
        sim.nodes[GW].core.set_peers(vec![gw_peer], now);
        sim.nodes[AGENT].core.set_peers(vec![agent_peer], now);
        sim
    }

    pub fn gw_peer(&self) -> PeerSpec {
        PeerSpec {
            public_key: public_key(&self.nodes[AGENT].key),
            allowed_ip: AGENT_IP,
            endpoint: None,
            persistent_keepalive: None,
        }
    }

    pub fn agent_peer(&self, keepalive: Option<u16>) -> PeerSpec {
        PeerSpec {
            public_key: public_key(&self.nodes[GW].key),
            allowed_ip: GW_IP,
            endpoint: Some(self.nodes[GW].addr),
            persistent_keepalive: keepalive,
        }
    }

    /// Sends a raw datagram to node `to` from `from`.
    pub fn inject(&mut self, from: SocketAddr, to: usize, data: &[u8]) {
        let now = self.now;
        self.nodes[to].core.handle_datagram(from, data, now);
    }

    /// One slice of virtual time: deliver due datagrams, run due timers, collect output and
    /// events, then advance the clock to the next thing that happens (at most `max_step`).
    pub fn step(&mut self) {
        let now = self.now;
        while let Some(entry) = self.in_flight.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (src, dst, data) = entry.remove();
            if let Some(node) = self.nodes.iter_mut().find(|n| n.addr == dst) {
                node.core.handle_datagram(src, &data, now);
            }
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].core.poll_timeout().is_some_and(|t| t <= now) {
                self.nodes[i].core.handle_timeout(now);
            }
            while let Some(t) = self.nodes[i].core.poll_transmit(now, &mut self.buf) {
                self.nodes[i].sent += 1;
                *self.sent_to.entry(t.dst).or_default() += 1;
                let lost = self.rng.gen_bool(self.loss);
                let blacked_out = self
                    .blackout
                    .is_some_and(|(start, end)| now >= start && now < end);
                if lost || blacked_out {
                    continue;
                }
                let mut at = now + self.latency;
                if self.rng.gen_bool(self.reorder) {
                    at += self.latency.mul_f64(self.rng.gen_range(0.0..1.0));
                }
                self.seq += 1;
                let src = self.nodes[i].addr;
                self.in_flight
                    .insert((at, self.seq), (src, t.dst, self.buf[..t.len].to_vec()));
            }
            while let Some(e) = self.nodes[i].core.poll_event() {
                self.nodes[i].events.push(e);
            }
        }
        let mut next = now + self.max_step;
        if let Some(((t, _), _)) = self.in_flight.first_key_value() {
            next = next.min(*t);
        }
        for n in &mut self.nodes {
            if let Some(t) = n.core.poll_timeout() {
                next = next.min(t);
            }
        }
        let next = next.max(now + Duration::from_micros(10));
        self.advance_clock(next - now);
    }

    fn advance_clock(&mut self, d: Duration) {
        self.now += d;
        mock_instant::MockClock::advance(d);
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.step();
        }
    }

    /// Steps until `cond` holds; panics after `limit` of virtual time.
    pub fn run_until(&mut self, limit: Duration, mut cond: impl FnMut(&mut Sim) -> bool) {
        let end = self.now + limit;
        while !cond(self) {
            assert!(self.now < end, "condition not met within {limit:?}");
            self.step();
        }
    }

    pub fn handshake_done(&self, node: usize) -> bool {
        self.nodes[node]
            .core
            .peer_stats()
            .first()
            .is_some_and(|s| s.last_handshake.is_some())
    }

    /// Opens a stream from `from` to `to` (whose overlay address is `to_ip`) and sends `port` as
    /// its first two bytes (as nodes send a header), which `to` reads off and checks; returns
    /// both stream ids.
    pub fn connect(
        &mut self,
        from: usize,
        to_ip: Ipv4Addr,
        port: u16,
        to: usize,
    ) -> (StreamId, StreamId) {
        let now = self.now;
        let id = self.nodes[from].core.connect(to_ip, now).unwrap();
        self.run_until(Duration::from_secs(11), |s| {
            s.nodes[from]
                .events
                .iter()
                .any(|e| matches!(e, Event::Connected(x) | Event::ConnectFailed(x, _) if *x == id))
        });
        assert!(
            self.nodes[from].events.contains(&Event::Connected(id)),
            "connect failed: {:?}",
            self.nodes[from].events
        );
        assert_eq!(
            self.nodes[from].core.stream_send(id, &port.to_be_bytes()),
            Ok(2)
        );
        let mut accepted = None;
        self.run_until(Duration::from_secs(10), |s| {
            let pos = s.nodes[to]
                .events
                .iter()
                .position(|e| matches!(e, Event::Accepted(_)));
            if let Some(pos) = pos {
                if let Event::Accepted(x) = s.nodes[to].events.remove(pos) {
                    accepted = Some(x);
                }
                true
            } else {
                false
            }
        });
        let accepted = accepted.unwrap();
        let mut header = [0u8; 2];
        let mut got = 0;
        self.run_until(Duration::from_secs(10), |s| {
            if let Ok(n) = s.nodes[to].core.stream_recv(accepted, &mut header[got..]) {
                got += n;
            }
            got == 2
        });
        assert_eq!(u16::from_be_bytes(header), port);
        self.nodes[from]
            .events
            .retain(|e| *e != Event::Connected(id));
        (id, accepted)
    }

    /// Sends `msg` from a to b on an open stream (without closing it) and checks it arrives.
    pub fn transfer_open(
        &mut self,
        (a, sa): (usize, StreamId),
        (b, sb): (usize, StreamId),
        msg: &[u8],
    ) {
        assert_eq!(self.nodes[a].core.stream_send(sa, msg), Ok(msg.len()));
        let mut got = Vec::new();
        let mut buf = vec![0u8; 4096];
        self.run_until(Duration::from_secs(5), |s| {
            if let Ok(n) = s.nodes[b].core.stream_recv(sb, &mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
            got.len() >= msg.len()
        });
        assert_eq!(got, msg);
    }

    /// Whether `node` has an established QUIC connection to `peer`.
    pub fn quic_up(&self, node: usize, peer: Ipv4Addr) -> bool {
        self.nodes[node].core.connected_peers().contains(&peer)
    }

    /// Sends `ab` from a to b and `ba` from b to a at the same time, closes both, and checks that
    /// both arrive byte-exact followed by end of stream.
    pub fn transfer(
        &mut self,
        (a, sa): (usize, StreamId),
        (b, sb): (usize, StreamId),
        ab: &[u8],
        ba: &[u8],
        limit: Duration,
    ) {
        let end = self.now + limit;
        let mut sent = [0usize; 2];
        let mut closed = [false; 2];
        let mut got: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        let mut eof = [false; 2];
        let mut rbuf = vec![0u8; 65536];
        let ends = [(a, sa, ab), (b, sb, ba)];
        loop {
            for (k, (node, id, data)) in ends.iter().enumerate() {
                let core = &mut self.nodes[*node].core;
                while sent[k] < data.len() {
                    match core.stream_send(*id, &data[sent[k]..]) {
                        Ok(n) => sent[k] += n,
                        Err(StreamError::WouldBlock) => break,
                        Err(e) => panic!("send failed: {e}"),
                    }
                }
                if sent[k] == data.len() && !closed[k] {
                    core.stream_close(*id);
                    closed[k] = true;
                }
                while !eof[k] {
                    match core.stream_recv(*id, &mut rbuf) {
                        Err(StreamError::Closed) => eof[k] = true,
                        Ok(n) => got[k].extend_from_slice(&rbuf[..n]),
                        Err(StreamError::WouldBlock) => break,
                        Err(e) => panic!("recv failed: {e}"),
                    }
                }
            }
            if eof[0] && eof[1] {
                break;
            }
            assert!(
                self.now < end,
                "transfer incomplete: got {} of {} and {} of {}",
                got[1].len(),
                ab.len(),
                got[0].len(),
                ba.len()
            );
            self.step();
        }
        assert_eq!(got[1].len(), ab.len());
        assert!(got[1] == ab, "a->b bytes differ");
        assert_eq!(got[0].len(), ba.len());
        assert!(got[0] == ba, "b->a bytes differ");
    }
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[1] ^ seed)
        .collect()
}
