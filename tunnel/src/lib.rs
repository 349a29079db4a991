//! Userspace WireGuard (boringtun) plus userspace TCP/IP (smoltcp) for kakuremichi nodes.
//!
//! The gateway opens TCP flows to agents' overlay addresses with [`Tunnel::connect`]; the agent
//! accepts flows on the overlay ports it lists ([`Tunnel::set_listen_ports`]) through
//! [`Incoming::accept`]. No TUN device and no root are needed: every peer has a boringtun `Tunn`,
//! and one smoltcp interface holds the node's overlay IPv4 address.
//!
//! Two layers, as quinn-proto and quinn:
//! - [`core`]: a deterministic, sans-IO state machine ([`Core`]). It has no sockets and never reads
//!   the clock: the caller passes `now` to every method that needs time.
//! - [`driver`]: the tokio shell ([`Tunnel`]) that owns the UDP socket and drives the core.
//!
//! The core must never read the clock, spawn tasks or touch sockets; the driver passes `now`.
#![deny(unsafe_code)]

pub mod core;
mod device;
pub mod driver;

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

pub use crate::core::{
    ConnectError, ConnectFailure, Core, Event, StreamError, StreamId, Transmit, MAX_DATAGRAM_SIZE,
};
pub use crate::driver::{Incoming, Tunnel, TunnelStream};

/// Settings of one tunnel endpoint (a gateway or an agent).
#[derive(Clone)]
pub struct TunnelConfig {
    /// The node's WireGuard private key (x25519). Never printed.
    pub private_key: [u8; 32],
    /// The node's overlay IPv4 address, which its TCP/IP stack answers on.
    pub overlay_address: Ipv4Addr,
    /// MTU of the overlay (inner) IP packets; 1420 is the WireGuard default.
    pub mtu: u16,
    /// UDP address the WireGuard socket binds to.
    pub listen: SocketAddr,
}

impl fmt::Debug for TunnelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelConfig")
            .field("private_key", &"<redacted>")
            .field("overlay_address", &self.overlay_address)
            .field("mtu", &self.mtu)
            .field("listen", &self.listen)
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
