//! The tunnel core (userspace WireGuard carrying QUIC) of a gateway fed what a network and a peer
//! can send it: raw datagrams from anywhere, and, from a peer that completed its handshake (a
//! compromised agent), arbitrary inner packets encrypted properly, so that the inner IP and QUIC
//! handling is reached too; time moves as the input says. Never a panic.
//!
//! Input: chunks `[op, len, bytes...]`; op 0: a raw datagram; op 1: an inner packet the peer
//! encrypts and sends; op 2: time advances by `len` x 50 ms.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use kakuremichi_tunnel::core::Core;
use kakuremichi_tunnel::{PeerSpec, QuicSettings, TunnelConfig, MAX_DATAGRAM_SIZE};
use libfuzzer_sys::fuzz_target;

const GATEWAY_KEY: [u8; 32] = [7; 32];
const AGENT_KEY: [u8; 32] = [9; 32];

fn drain(core: &mut Core, now: Instant, agent: &mut Tunn) {
    let mut buf = vec![0u8; MAX_DATAGRAM_SIZE];
    let mut scratch = vec![0u8; 65_536];
    for _ in 0..64 {
        let Some(t) = core.poll_transmit(now, &mut buf) else {
            break;
        };
        // What the gateway sends its peer goes to the peer (answers, keepalives).
        let _ = agent.decapsulate(None, &buf[..t.len], &mut scratch);
    }
    while core.poll_event().is_some() {}
    while core.poll_ready().is_some() {}
}

fuzz_target!(|data: &[u8]| {
    let agent_secret = StaticSecret::from(AGENT_KEY);
    let gateway_public = PublicKey::from(&StaticSecret::from(GATEWAY_KEY));
    let config = TunnelConfig {
        private_key: GATEWAY_KEY,
        overlay_address: Ipv4Addr::new(100, 64, 0, 1),
        mtu: 1420,
        listen: SocketAddr::from(([127, 0, 0, 1], 51820)),
        dials: false,
        quic: QuicSettings::default(),
    };
    let mut now = Instant::now();
    let Ok(mut core) = Core::new(&config, 1, now) else {
        return;
    };
    core.set_peers(
        vec![PeerSpec {
            public_key: PublicKey::from(&agent_secret).to_bytes(),
            allowed_ip: Ipv4Addr::new(100, 64, 0, 2),
            endpoint: None,
            persistent_keepalive: None,
        }],
        now,
    );
    let from = SocketAddr::from(([192, 0, 2, 1], 40000));
    let mut agent = Tunn::new(agent_secret, gateway_public, None, None, 1, None);
    let mut out = vec![0u8; 65_536];
    // The handshake, so that op 1's packets are accepted.
    if let TunnResult::WriteToNetwork(init) = agent.format_handshake_initiation(&mut out, false) {
        let init = init.to_vec();
        core.handle_datagram(from, &init, now);
        drain(&mut core, now, &mut agent);
    }

    let mut rest = data;
    while let [op, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (bytes, next) = tail.split_at(n);
        rest = next;
        match op % 3 {
            0 => core.handle_datagram(from, bytes, now),
            1 => {
                if let TunnResult::WriteToNetwork(d) = agent.encapsulate(bytes, &mut out) {
                    let d = d.to_vec();
                    core.handle_datagram(from, &d, now);
                }
            }
            _ => {
                now += Duration::from_millis(50 * u64::from(*len));
                core.handle_timeout(now);
            }
        }
        drain(&mut core, now, &mut agent);
    }
});
