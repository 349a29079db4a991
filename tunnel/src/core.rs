//! The sans-IO tunnel state machine: WireGuard [`Peers`] outside, QUIC [`Net`] inside.
//!
//! [`Core`] has no sockets and no clock. Feed it UDP datagrams with [`Core::handle_datagram`],
//! collect datagrams to send with [`Core::poll_transmit`], call [`Core::handle_timeout`] when
//! [`Core::poll_timeout`] has passed, and drain [`Core::poll_event`] and [`Core::poll_ready`].
//! Every method that needs time takes `now`.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use bytes::{Bytes, BytesMut};

pub use crate::net::STREAM_DATAGRAMS;

use crate::net::Net;
use crate::wg::{Peers, MAX_OUTER, OVERHEAD};
use crate::{PeerSpec, PeerStats, TunnelConfig, TunnelError};

/// The largest datagram [`Core::poll_transmit`] writes: pass a buffer at least this long.
pub const MAX_DATAGRAM_SIZE: usize = 2048;

/// Bytes of one receive arena (see `Core::rx`).
const RX_ARENA: usize = 64 * 1024;

/// Identifies a stream of a [`Core`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u64);

/// A datagram [`Core::poll_transmit`] wrote into the caller's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Where to send it.
    pub dst: SocketAddr,
    /// How many bytes of the buffer hold the datagram.
    pub len: usize,
}

/// Why an outbound stream could not be opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The peer was removed while the stream waited for its connection.
    Refused,
    /// The peer had no QUIC connection within the open timeout, or it was lost meanwhile.
    TimedOut,
    /// The peer's connection stayed full (as many streams open as it allows) for the open
    /// timeout.
    Exhausted,
}

/// Something the owner of a [`Core`] should act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A peer opened a stream.
    Accepted(StreamId),
    /// An outbound stream from [`Core::connect`] is open.
    Connected(StreamId),
    /// An outbound stream from [`Core::connect`] failed; the id is no longer valid.
    ConnectFailed(StreamId, ConnectFailure),
}

/// Errors of [`Core::connect`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnectError {
    /// No peer has this address as its allowed IP.
    #[error("no peer routes to {0}")]
    NoRoute(Ipv4Addr),
}

/// Errors of the stream operations of [`Core`].
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum StreamError {
    /// The stream does not exist (never did, or was already released).
    #[error("unknown stream")]
    Unknown,
    /// No data to read or no room to write right now; retry when the stream is ready again.
    #[error("operation would block")]
    WouldBlock,
    /// The stream cannot send or receive any more (closed in order).
    #[error("stream closed")]
    Closed,
    /// The stream was reset by the peer, or its connection was lost.
    #[error("stream reset")]
    Reset,
}

/// Errors of [`Core::stream_send_datagram`].
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum DatagramError {
    /// The stream cannot carry anything (unknown, reset, or its connection lost).
    #[error(transparent)]
    Stream(StreamError),
    /// Larger than one QUIC datagram on this path ([`Core::stream_max_datagram`]): send it on
    /// the stream instead.
    #[error("larger than a QUIC datagram on this path")]
    TooLarge,
    /// The peer takes no QUIC datagrams.
    #[error("the peer takes no QUIC datagrams")]
    Unsupported,
}

/// The tunnel state machine. See the module documentation.
pub struct Core {
    address: Ipv4Addr,
    peers: Peers,
    net: Net,
    /// Where WireGuard decrypts inner packets: a delivered packet is split off and handed to
    /// QUIC as is, so receiving allocates once per arena, not once per packet.
    rx: BytesMut,
    /// The inner packet being encrypted.
    packet: Vec<u8>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("address", &self.address)
            .field("streams", &self.net.stream_count())
            .finish_non_exhaustive()
    }
}

impl Core {
    /// A core for `config` (its `listen` field is the driver's business and ignored here).
    /// `seed` seeds QUIC's randomness; `now` is the time origin.
    pub fn new(config: &TunnelConfig, seed: u64, now: Instant) -> Result<Core, TunnelError> {
        if !(1280..=1920).contains(&config.mtu) {
            return Err(TunnelError::InvalidConfig(format!(
                "mtu {} is outside 1280..=1920",
                config.mtu
            )));
        }
        config.quic.validate()?;
        let net = Net::new(
            config.overlay_address,
            config.dials,
            config.mtu,
            &config.quic,
            &config.private_key,
            seed,
        )
        .map_err(TunnelError::InvalidConfig)?;
        Ok(Core {
            address: config.overlay_address,
            peers: Peers::new(config.private_key, now),
            net,
            rx: BytesMut::new(),
            packet: Vec::with_capacity(MAX_DATAGRAM_SIZE),
        })
    }

    /// The node's overlay address.
    pub fn overlay_address(&self) -> Ipv4Addr {
        self.address
    }

    /// The node's WireGuard public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.peers.public_key()
    }

    /// Replaces the whole peer set. Peers with an unchanged key keep their session and their
    /// streams; a changed endpoint is updated in place (a changed keepalive starts a new
    /// WireGuard session, streams survive). Removed peers, and peers whose allowed IP changed,
    /// lose their QUIC connection and its streams. A new peer with an endpoint and a keepalive
    /// starts its handshake at once; a dialing node dials every peer.
    pub fn set_peers(&mut self, specs: Vec<PeerSpec>, now: Instant) {
        let ips: Vec<Ipv4Addr> = specs.iter().map(|s| s.allowed_ip).collect();
        let gone = self.peers.set_peers(specs, now);
        if !gone.is_empty() {
            self.net.drop_peers(|ip| gone.contains(&ip), now);
        }
        self.net.set_peers(&ips, now);
    }

    /// Counters of every peer.
    pub fn peer_stats(&self) -> Vec<PeerStats> {
        self.peers.peer_stats()
    }

    /// QUIC's round-trip time estimate to each peer with a connection.
    pub fn rtts(&self) -> Vec<(Ipv4Addr, std::time::Duration)> {
        self.net.rtts()
    }

    /// The peers this node has an established QUIC connection with.
    pub fn connected_peers(&self) -> Vec<Ipv4Addr> {
        self.net.connected_peers()
    }

    /// Handles one UDP datagram received from `from`. Anything malformed, unauthenticated or from
    /// an unknown peer is dropped silently. Call [`Core::poll_transmit`] afterwards (after a
    /// batch of datagrams is best).
    pub fn handle_datagram(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) {
        if self.rx.capacity() < MAX_OUTER {
            self.rx = BytesMut::with_capacity(RX_ARENA);
        }
        self.rx.resize(MAX_OUTER, 0);
        let delivered = self
            .peers
            .handle_datagram(from, datagram, now, &mut self.rx);
        match delivered {
            Some((peer, len)) => {
                let packet = self.rx.split_to(len);
                self.rx.clear();
                self.net.handle_packet(peer, packet, now);
            }
            None => self.rx.clear(),
        }
    }

    /// Writes the next datagram to send into `buf` (at least [`MAX_DATAGRAM_SIZE`] bytes) and
    /// says where it goes. Call until it returns `None` after every input (datagrams, timeouts,
    /// stream operations).
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        if let Some(t) = self.peers.poll_control(buf) {
            return Some(t);
        }
        while let Some(dst) = self.net.poll_packet(now, &mut self.packet) {
            if buf.len() < self.packet.len() + OVERHEAD {
                continue;
            }
            if let Some(t) = self.peers.encapsulate(dst, &self.packet, buf, now) {
                return Some(t);
            }
            // No session yet: boringtun queued the packet (and maybe a handshake).
            if let Some(t) = self.peers.poll_control(buf) {
                return Some(t);
            }
        }
        self.peers.poll_control(buf)
    }

    /// Whether [`Core::poll_transmit`] may have something to send.
    pub fn needs_poll(&self) -> bool {
        self.peers.has_control() || self.net.wants_transmit()
    }

    /// When [`Core::handle_timeout`] should be called next.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let wg = self.peers.poll_timeout();
        Some(match self.net.poll_timeout() {
            Some(t) => t.min(wg),
            None => wg,
        })
    }

    /// Runs the timers that are due at `now` (WireGuard handshakes and keepalives, QUIC loss
    /// detection, keep-alives and idle timeouts, dials, open timeouts). Call
    /// [`Core::poll_transmit`] afterwards.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.peers.handle_timeout(now);
        self.net.handle_timeout(now);
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.net.poll_event()
    }

    /// The next stream whose readiness may have changed (data or room arrived, it was reset or
    /// its connection was lost): the owner retries what would block on it.
    pub fn poll_ready(&mut self) -> Option<StreamId> {
        self.net.poll_ready()
    }

    /// Opens a stream to the peer whose allowed IP is `peer`; [`Event::Connected`] or
    /// [`Event::ConnectFailed`] follows (at once when the peer's QUIC connection is up).
    pub fn connect(&mut self, peer: Ipv4Addr, now: Instant) -> Result<StreamId, ConnectError> {
        if !self.peers.routes_to(peer) {
            return Err(ConnectError::NoRoute(peer));
        }
        Ok(self.net.open(peer, now))
    }

    /// The peer a stream runs to.
    pub fn stream_peer(&self, id: StreamId) -> Option<Ipv4Addr> {
        self.net.stream_peer(id)
    }

    /// Queues `data` on the stream; returns how much was taken.
    pub fn stream_send(&mut self, id: StreamId, data: &[u8]) -> Result<usize, StreamError> {
        self.net.stream_send(id, data)
    }

    /// Reads received bytes into `buf`. `Err(Closed)` at the end of the stream.
    pub fn stream_recv(&mut self, id: StreamId, buf: &mut [u8]) -> Result<usize, StreamError> {
        self.net.stream_recv(id, buf)
    }

    /// Hands up to `max` received bytes to `sink`, chunk by chunk, from QUIC's own buffers;
    /// returns how many. `Err(Closed)` at the end of the stream.
    pub fn stream_recv_with(
        &mut self,
        id: StreamId,
        max: usize,
        sink: impl FnMut(&[u8]),
    ) -> Result<usize, StreamError> {
        self.net.stream_recv_with(id, max, sink)
    }

    /// Ends our sending side in order, after the queued data.
    pub fn stream_close(&mut self, id: StreamId) {
        self.net.stream_close(id)
    }

    /// Resets the stream both ways and releases it.
    pub fn stream_abort(&mut self, id: StreamId) {
        self.net.stream_abort(id)
    }

    /// Releases the stream: queued data still goes out, then a FIN; the peer is asked to stop
    /// sending.
    pub fn stream_release(&mut self, id: StreamId) {
        self.net.stream_release(id)
    }

    /// Sends `data` as one QUIC datagram tied to the stream: unreliable and unordered, never
    /// held up behind lost stream data; the peer reads it with [`Core::stream_recv_datagram`].
    pub fn stream_send_datagram(&mut self, id: StreamId, data: &[u8]) -> Result<(), DatagramError> {
        self.net.stream_send_datagram(id, data)
    }

    /// The largest datagram [`Core::stream_send_datagram`] takes on this stream now (`None`
    /// when the peer takes none, or the stream has no connection).
    pub fn stream_max_datagram(&mut self, id: StreamId) -> Option<usize> {
        self.net.stream_max_datagram(id)
    }

    /// The oldest datagram received for the stream; `WouldBlock` when none is waiting (the
    /// stream is reported by [`Core::poll_ready`] when one arrives).
    pub fn stream_recv_datagram(&mut self, id: StreamId) -> Result<Bytes, StreamError> {
        self.net.stream_recv_datagram(id)
    }

    /// QUIC datagrams dropped on receipt: malformed, naming no stream of ours, or over a
    /// stream's queue of [`STREAM_DATAGRAMS`].
    pub fn datagrams_dropped(&self) -> u64 {
        self.net.datagrams_dropped()
    }

    /// Number of streams held (open or waiting for their connection).
    pub fn stream_count(&self) -> usize {
        self.net.stream_count()
    }
}
