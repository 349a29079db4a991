//! Userspace WireGuard (boringtun) carrying QUIC (quinn-proto) for kakuremichi nodes.
//!
//! Between a gateway and an agent there is one WireGuard session and, inside it, one QUIC
//! connection between their overlay addresses; every user connection or HTTP request is a QUIC
//! stream on it. The gateway opens streams with [`Tunnel::connect`]; the agent takes them from
//! [`Incoming::accept`]. No TUN device and no root are needed.
//!
//! Two layers, as quinn-proto and quinn:
//! - [`core`]: a deterministic, sans-IO state machine ([`Core`]) made of the WireGuard peers
//!   (`wg`) and the QUIC endpoint (`net`). It has no sockets and never reads the clock: the
//!   caller passes `now` to every method that needs time.
//! - [`driver`]: the tokio shell ([`Tunnel`]) that owns the UDP socket and drives the core.
//!
//! The core must never read the clock, spawn tasks or touch sockets; the driver passes `now`.
#![deny(unsafe_code)]

pub mod core;
pub mod driver;
mod ip;
mod net;
pub mod path;
pub mod tls;
mod udp;
mod wg;

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

pub use crate::core::{
    ConnectError, ConnectFailure, Core, DatagramError, Event, StreamError, StreamId, Transmit,
    MAX_DATAGRAM_SIZE, STREAM_DATAGRAMS,
};
pub use crate::driver::{relay_address, Incoming, Relay, StreamDatagrams, Tunnel, TunnelStream};
pub use crate::net::QUIC_PORT;
pub use crate::path::{PathEvent, PathSettings};

/// Settings of one tunnel endpoint (a gateway or an agent).
#[derive(Clone)]
pub struct TunnelConfig {
    /// The node's WireGuard private key (x25519). Never printed.
    pub private_key: [u8; 32],
    /// The node's overlay IPv4 address, which its QUIC endpoint answers on.
    pub overlay_address: Ipv4Addr,
    /// MTU of the overlay (inner) IP packets; 1420 is the WireGuard default.
    pub mtu: u16,
    /// UDP address the WireGuard socket binds to.
    pub listen: SocketAddr,
    /// Whether this node dials a QUIC connection to every peer (agents) or waits for its peers
    /// to dial (gateways).
    pub dials: bool,
    /// QUIC windows, limits and timers.
    pub quic: QuicSettings,
}

/// QUIC settings of the tunnel. The defaults carry 1 Gbit/s at 100 ms RTT on one stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuicSettings {
    /// Bytes one stream may have in flight to us unread (its receive window).
    pub stream_window: u32,
    /// Bytes all streams of one connection may have in flight to us, and that we may have in
    /// flight to the peer.
    pub connection_window: u32,
    /// Streams the peer may have open towards us at once; more are refused.
    pub max_streams: u32,
    /// A connection that hears nothing for this long is lost, and its streams fail.
    pub idle_timeout: Duration,
    /// How often an idle connection is probed.
    pub keep_alive: Duration,
    /// How long a stream may wait for its peer's connection.
    pub open_timeout: Duration,
}

impl Default for QuicSettings {
    fn default() -> Self {
        QuicSettings {
            stream_window: 16 * 1024 * 1024,
            connection_window: 32 * 1024 * 1024,
            max_streams: 10_000,
            idle_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_secs(1),
            open_timeout: Duration::from_secs(4),
        }
    }
}

impl QuicSettings {
    /// Checks that the settings can work together.
    pub fn validate(&self) -> Result<(), TunnelError> {
        let bad = |m: &str| Err(TunnelError::InvalidConfig(m.to_owned()));
        if self.stream_window < 64 * 1024 || self.connection_window < self.stream_window {
            return bad(
                "the stream window must be at least 64 KiB and at most the connection window",
            );
        }
        if self.max_streams == 0 {
            return bad("at least one stream per peer must be allowed");
        }
        if self.keep_alive >= self.idle_timeout || self.keep_alive.is_zero() {
            return bad("the keep-alive interval must be shorter than the idle timeout");
        }
        Ok(())
    }
}

impl fmt::Debug for TunnelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelConfig")
            .field("private_key", &"<redacted>")
            .field("overlay_address", &self.overlay_address)
            .field("mtu", &self.mtu)
            .field("listen", &self.listen)
            .field("dials", &self.dials)
            .field("quic", &self.quic)
            .finish()
    }
}

/// One WireGuard peer as configured by control.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    /// The peer's static public key.
    pub public_key: [u8; 32],
    /// The single overlay address (a /32) the peer may use as source, and that routes to it.
    pub allowed_ip: Ipv4Addr,
    /// Where to send to the peer until it roams; `None` until the peer contacts us.
    pub endpoint: Option<SocketAddr>,
    /// Persistent keepalive interval in seconds (agents set it to keep NAT mappings open).
    pub persistent_keepalive: Option<u16>,
}

/// Counters of one peer, for status reports.
#[derive(Clone, Debug)]
pub struct PeerStats {
    /// The peer's static public key.
    pub public_key: [u8; 32],
    /// The peer's current endpoint (configured or learned from its last authenticated packet).
    pub endpoint: Option<SocketAddr>,
    /// Age of the current session's handshake, if there is a session.
    pub last_handshake: Option<Duration>,
    /// Inner bytes sent to the peer.
    pub tx_bytes: u64,
    /// Inner bytes received from the peer.
    pub rx_bytes: u64,
}

/// Errors of [`Tunnel::bind`].
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The UDP socket could not be bound to the configured address.
    #[error("cannot bind the WireGuard UDP socket to {addr}: {source}")]
    Bind {
        /// The configured listen address.
        addr: SocketAddr,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The configuration is not usable (for example an MTU out of range).
    #[error("invalid tunnel configuration: {0}")]
    InvalidConfig(String),
}

/// Generates a new random x25519 private key.
pub fn generate_private_key() -> [u8; 32] {
    boringtun::x25519::StaticSecret::random_from_rng(rand::rngs::OsRng).to_bytes()
}

/// The x25519 public key of `private`.
pub fn public_key(private: &[u8; 32]) -> [u8; 32] {
    let secret = boringtun::x25519::StaticSecret::from(*private);
    boringtun::x25519::PublicKey::from(&secret).to_bytes()
}
