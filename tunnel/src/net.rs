//! The packet side of the tunnel: one QUIC endpoint on the node's overlay address, one QUIC
//! connection per peer, and every stream a QUIC bidirectional stream.
//!
//! [`Net`] is sans-IO, as quinn-proto itself: inner IPv4/UDP packets go in with
//! [`Net::handle_packet`] and come out of [`Net::poll_packet`]; streams are read and written in
//! place. Which side dials is fixed by the node's role: a dialing node (an agent) keeps a
//! connection to every peer at all times, re-dialing when one is lost, and its keep-alives are
//! the probes that keep NAT mappings fresh; a listening node (a gateway) accepts those
//! connections and opens its streams on them. It must never read the clock or touch a socket.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn_proto::coding::Codec as _;
use quinn_proto::{
    congestion, ClientConfig, ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig,
    IdleTimeout, ServerConfig, StreamEvent, TransportConfig, VarInt,
};
use tracing::{debug, trace};

use crate::ip::{self, HEADER_LEN};
use crate::{ConnectFailure, DatagramError, Event, QuicSettings, StreamError, StreamId};

/// The UDP port of every node's QUIC endpoint on its overlay address.
pub const QUIC_PORT: u16 = 4433;
/// How long a dialing node waits before dialing a peer again after a connection was lost or
/// could not be made.
const REDIAL: Duration = Duration::from_millis(500);
/// Error code of a stream reset because its owner aborted it.
const ABORTED: u32 = 1;
/// Error code of a connection closed because a newer one from the same peer replaced it, or
/// the peer was removed.
const REPLACED: u32 = 2;

/// QUIC datagrams received for one stream and not yet taken by its owner, at most; more are
/// dropped, as a full socket buffer would.
pub const STREAM_DATAGRAMS: usize = 256;
/// Bytes of QUIC datagrams buffered per connection, each way.
const DATAGRAM_BUFFER: usize = 1024 * 1024;

/// Bytes of `x` as a QUIC varint (RFC 9000, section 16).
fn varint_len(x: u64) -> usize {
    match x {
        0..=63 => 1,
        64..=16_383 => 2,
        16_384..=1_073_741_823 => 4,
        _ => 8,
    }
}

/// Why a stream could not be opened on a connection right now.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
enum OpenError {
    /// The peer's connection has as many streams open as the peer allows.
    #[error("too many streams open to this peer")]
    Exhausted,
}

struct Conn {
    conn: quinn_proto::Connection,
    peer: Ipv4Addr,
    established: bool,
    /// Our ids of the streams on this connection.
    streams: HashSet<StreamId>,
}

#[derive(Debug)]
struct Stream {
    conn: ConnectionHandle,
    quic: quinn_proto::StreamId,
    peer: Ipv4Addr,
    /// The connection is gone: every operation fails.
    lost: bool,
    /// QUIC datagrams that named this stream, oldest first.
    datagrams: VecDeque<Bytes>,
}

struct Pending {
    id: StreamId,
    peer: Ipv4Addr,
    deadline: Instant,
}

/// QUIC over the overlay. See the module documentation.
pub(crate) struct Net {
    address: Ipv4Addr,
    endpoint: Endpoint,
    client: Option<ClientConfig>,
    conns: HashMap<ConnectionHandle, Conn>,
    /// The connection streams to a peer are opened on: its newest established one.
    by_peer: HashMap<Ipv4Addr, ConnectionHandle>,
    /// Peers a dialing node keeps a connection to, with when to dial next (`None`: dialed).
    dial: HashMap<Ipv4Addr, Option<Instant>>,
    streams: HashMap<StreamId, Stream>,
    by_quic: HashMap<(ConnectionHandle, quinn_proto::StreamId), StreamId>,
    pending: Vec<Pending>,
    open_timeout: Duration,
    next_stream: u64,
    events: VecDeque<Event>,
    /// Streams whose readiness may have changed since the owner last looked.
    ready: Vec<StreamId>,
    ready_set: HashSet<StreamId>,
    /// Connections that may have something to send.
    dirty: VecDeque<ConnectionHandle>,
    dirty_set: HashSet<ConnectionHandle>,
    /// Endpoint-level answers (stateless resets, refusals): (to, QUIC datagram).
    responses: VecDeque<(SocketAddr, Vec<u8>)>,
    scratch: Vec<u8>,
    /// QUIC datagrams dropped on receipt: malformed, for no stream of ours, or over a stream's
    /// queue.
    datagrams_dropped: u64,
}

fn transport(settings: &QuicSettings, payload_mtu: u16) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(settings.max_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(settings.stream_window))
        .receive_window(VarInt::from_u32(settings.connection_window))
        .send_window(u64::from(settings.connection_window))
        .max_idle_timeout(IdleTimeout::try_from(settings.idle_timeout).ok())
        .keep_alive_interval(Some(settings.keep_alive))
        .initial_rtt(Duration::from_millis(10))
        .initial_mtu(payload_mtu)
        .min_mtu(payload_mtu)
        .mtu_discovery_config(None)
        .datagram_receive_buffer_size(Some(DATAGRAM_BUFFER))
        .datagram_send_buffer_size(DATAGRAM_BUFFER)
        .allow_spin(false)
        .congestion_controller_factory(Arc::new(congestion::BbrConfig::default()));
    Arc::new(t)
}

impl Net {
    /// A QUIC endpoint on `address`. `dials` makes this node the dialing side; `mtu` is the
    /// inner packet MTU.
    ///
    /// The stateless-reset key is derived from `reset_secret` (the node's WireGuard private
    /// key), so that a restarted node's resets are recognized by peers still holding a
    /// connection with its previous process, and they dial again at once.
    pub(crate) fn new(
        address: Ipv4Addr,
        dials: bool,
        mtu: u16,
        settings: &QuicSettings,
        reset_secret: &[u8; 32],
        seed: u64,
    ) -> Result<Net, String> {
        let payload_mtu = mtu.saturating_sub(HEADER_LEN as u16).max(1200);
        let transport = transport(settings, payload_mtu);
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"kakuremichi QUIC stateless reset key");
        ctx.update(reset_secret);
        let derived = ctx.finish();
        let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref());
        let mut endpoint_config = EndpointConfig::new(Arc::new(reset_key));
        // Connection IDs carry a keyed hash that the endpoint checks before it answers a packet
        // for an unknown connection with a reset: the same key across restarts, too.
        let mut cid_key = [0u8; 8];
        cid_key.copy_from_slice(&derived.as_ref()[..8]);
        let cid_key = u64::from_le_bytes(cid_key);
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        endpoint_config
            .max_udp_payload_size(payload_mtu)
            .map_err(|e| e.to_string())?;
        let mut rng_seed = [0u8; 32];
        rng_seed[..8].copy_from_slice(&seed.to_le_bytes());
        let (server, client) = if dials {
            let mut client = ClientConfig::new(crate::tls::client_crypto()?);
            client.transport_config(transport);
            (None, Some(client))
        } else {
            let mut server = ServerConfig::with_crypto(crate::tls::server_crypto()?);
            server.transport_config(transport).migration(false);
            (Some(Arc::new(server)), None)
        };
        Ok(Net {
            address,
            endpoint: Endpoint::new(Arc::new(endpoint_config), server, false, Some(rng_seed)),
            client,
            conns: HashMap::new(),
            by_peer: HashMap::new(),
            dial: HashMap::new(),
            streams: HashMap::new(),
            by_quic: HashMap::new(),
            pending: Vec::new(),
            open_timeout: settings.open_timeout,
            next_stream: 1,
            events: VecDeque::new(),
            ready: Vec::new(),
            ready_set: HashSet::new(),
            dirty: VecDeque::new(),
            dirty_set: HashSet::new(),
            responses: VecDeque::new(),
            scratch: Vec::with_capacity(2048),
            datagrams_dropped: 0,
        })
    }

    /// Sets the peers (their overlay addresses). A dialing node dials new ones at once;
    /// connections to addresses no longer listed are closed and their streams fail.
    pub(crate) fn set_peers(&mut self, peers: &[Ipv4Addr], now: Instant) {
        let wanted: HashSet<Ipv4Addr> = peers.iter().copied().collect();
        self.drop_peers(|ip| !wanted.contains(&ip), now);
        if self.client.is_some() {
            self.dial.retain(|ip, _| wanted.contains(ip));
            for ip in wanted {
                self.dial.entry(ip).or_insert(Some(now));
            }
            self.run_dials(now);
        }
    }

    /// Closes every connection to a peer `gone` picks; its streams fail.
    pub(crate) fn drop_peers(&mut self, gone: impl Fn(Ipv4Addr) -> bool, now: Instant) {
        let closing: Vec<ConnectionHandle> = self
            .conns
            .iter()
            .filter(|(_, c)| gone(c.peer))
            .map(|(h, _)| *h)
            .collect();
        for ch in closing {
            if let Some(c) = self.conns.get_mut(&ch) {
                debug!(peer = %c.peer, "peer gone: closing its QUIC connection");
                c.conn
                    .close(now, VarInt::from_u32(REPLACED), "peer removed".into());
                self.lose_streams(ch);
                self.mark_dirty(ch);
            }
        }
        self.by_peer.retain(|ip, _| !gone(*ip));
        self.fail_pending(&gone, ConnectFailure::Refused);
    }

    fn run_dials(&mut self, now: Instant) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let due: Vec<Ipv4Addr> = self
            .dial
            .iter()
            .filter(|(_, at)| at.is_some_and(|t| t <= now))
            .map(|(ip, _)| *ip)
            .collect();
        for ip in due {
            let remote = SocketAddr::new(IpAddr::V4(ip), QUIC_PORT);
            match self
                .endpoint
                .connect(now, client.clone(), remote, crate::tls::SERVER_NAME)
            {
                Ok((ch, conn)) => {
                    debug!(peer = %ip, "dialing QUIC");
                    self.conns.insert(
                        ch,
                        Conn {
                            conn,
                            peer: ip,
                            established: false,
                            streams: HashSet::new(),
                        },
                    );
                    self.dial.insert(ip, None);
                    self.mark_dirty(ch);
                }
                Err(e) => {
                    debug!(peer = %ip, error = %e, "cannot dial QUIC");
                    self.dial.insert(ip, Some(now + REDIAL));
                }
            }
        }
    }

    fn mark_dirty(&mut self, ch: ConnectionHandle) {
        if self.dirty_set.insert(ch) {
            self.dirty.push_back(ch);
        }
    }

    fn mark_ready(&mut self, id: StreamId) {
        if self.ready_set.insert(id) {
            self.ready.push(id);
        }
    }

    /// Handles one inner packet that WireGuard delivered from the peer at `peer`.
    pub(crate) fn handle_packet(&mut self, peer: Ipv4Addr, mut packet: BytesMut, now: Instant) {
        let Some(udp) = ip::parse_udp(&packet) else {
            trace!(%peer, "inner packet that is not IPv4/UDP dropped");
            return;
        };
        if udp.src != peer || udp.dst != self.address || udp.dst_port != QUIC_PORT {
            trace!(%peer, src = %udp.src, dst = %udp.dst, "misaddressed inner packet dropped");
            return;
        }
        let remote = SocketAddr::new(IpAddr::V4(udp.src), udp.src_port);
        packet.truncate(udp.payload_end);
        let data = packet.split_off(udp.payload_start);
        self.scratch.clear();
        let event = self.endpoint.handle(
            now,
            remote,
            Some(IpAddr::V4(self.address)),
            None,
            data,
            &mut self.scratch,
        );
        match event {
            Some(DatagramEvent::ConnectionEvent(ch, event)) => {
                if let Some(c) = self.conns.get_mut(&ch) {
                    c.conn.handle_event(event);
                    self.drive(ch, now);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                self.scratch.clear();
                match self.endpoint.accept(incoming, now, &mut self.scratch, None) {
                    Ok((ch, conn)) => {
                        debug!(%peer, "QUIC connection from peer");
                        self.conns.insert(
                            ch,
                            Conn {
                                conn,
                                peer,
                                established: false,
                                streams: HashSet::new(),
                            },
                        );
                        self.drive(ch, now);
                    }
                    Err(e) => {
                        debug!(%peer, error = %e.cause, "QUIC connection refused");
                        if let Some(t) = e.response {
                            self.responses
                                .push_back((t.destination, self.scratch[..t.size].to_vec()));
                        }
                    }
                }
            }
            Some(DatagramEvent::Response(t)) => {
                self.responses
                    .push_back((t.destination, self.scratch[..t.size].to_vec()));
            }
            None => {}
        }
    }

    /// Processes what a connection has for the endpoint and for us after any input.
    fn drive(&mut self, ch: ConnectionHandle, now: Instant) {
        self.mark_dirty(ch);
        self.drive_quiet(ch, now);
    }

    fn on_event(&mut self, ch: ConnectionHandle, event: quinn_proto::Event, now: Instant) {
        use quinn_proto::Event as E;
        let Some(c) = self.conns.get_mut(&ch) else {
            return;
        };
        let peer = c.peer;
        match event {
            E::DatagramReceived => self.take_datagrams(ch),
            E::HandshakeDataReady | E::DatagramsUnblocked => {}
            E::Connected => {
                c.established = true;
                debug!(%peer, "QUIC connection established");
                if let Some(old) = self.by_peer.insert(peer, ch) {
                    if old != ch {
                        // The peer dialed again (it restarted, or lost the old connection): the
                        // old connection is dead or dying.
                        if let Some(o) = self.conns.get_mut(&old) {
                            o.conn
                                .close(now, VarInt::from_u32(REPLACED), "replaced".into());
                            self.mark_dirty(old);
                        }
                    }
                }
                self.open_pending(peer, now);
            }
            E::ConnectionLost { reason } => {
                debug!(%peer, %reason, "QUIC connection lost");
                self.lose(ch, now);
            }
            E::Stream(StreamEvent::Opened { dir }) => loop {
                let Some(c) = self.conns.get_mut(&ch) else {
                    return;
                };
                let Some(quic) = c.conn.streams().accept(dir) else {
                    break;
                };
                if dir == Dir::Uni {
                    let _ = c.conn.recv_stream(quic).stop(VarInt::from_u32(ABORTED));
                    continue;
                }
                let id = self.insert_stream(ch, quic, peer);
                self.events.push_back(Event::Accepted(id));
            },
            E::Stream(StreamEvent::Readable { id })
            | E::Stream(StreamEvent::Writable { id })
            | E::Stream(StreamEvent::Stopped { id, .. }) => {
                if let Some(ours) = self.by_quic.get(&(ch, id)).copied() {
                    self.mark_ready(ours);
                }
            }
            E::Stream(StreamEvent::Available { dir: Dir::Bi }) => self.open_pending(peer, now),
            E::Stream(StreamEvent::Finished { .. })
            | E::Stream(StreamEvent::Available { dir: Dir::Uni }) => {}
        }
    }

    /// A new id for a stream the peer opened.
    fn insert_stream(
        &mut self,
        ch: ConnectionHandle,
        quic: quinn_proto::StreamId,
        peer: Ipv4Addr,
    ) -> StreamId {
        let id = StreamId(self.next_stream);
        self.next_stream += 1;
        self.register(id, ch, quic, peer);
        id
    }

    /// Records that our stream `id` is QUIC stream `quic` on connection `ch`.
    fn register(
        &mut self,
        id: StreamId,
        ch: ConnectionHandle,
        quic: quinn_proto::StreamId,
        peer: Ipv4Addr,
    ) {
        self.streams.insert(
            id,
            Stream {
                conn: ch,
                quic,
                peer,
                lost: false,
                datagrams: VecDeque::new(),
            },
        );
        self.by_quic.insert((ch, quic), id);
        if let Some(c) = self.conns.get_mut(&ch) {
            c.streams.insert(id);
        }
    }

    /// The connection is lost: its streams fail, a dialing node dials again soon.
    fn lose(&mut self, ch: ConnectionHandle, now: Instant) {
        self.lose_streams(ch);
        let Some(c) = self.conns.get(&ch) else {
            return;
        };
        let peer = c.peer;
        if self.by_peer.get(&peer) == Some(&ch) {
            self.by_peer.remove(&peer);
        }
        let other_dial_in_progress = self
            .conns
            .iter()
            .any(|(h, o)| *h != ch && o.peer == peer && !o.conn.is_closed());
        if let Some(at) = self.dial.get_mut(&peer) {
            if !other_dial_in_progress && at.is_none() {
                *at = Some(now + REDIAL);
            }
        }
        if !self.by_peer.contains_key(&peer) && !other_dial_in_progress {
            self.fail_pending(|p| p == peer, ConnectFailure::TimedOut);
        }
    }

    fn lose_streams(&mut self, ch: ConnectionHandle) {
        let Some(c) = self.conns.get_mut(&ch) else {
            return;
        };
        trace!(peer = %c.peer, streams = c.streams.len(), "streams of a closed connection fail");
        let ids: Vec<StreamId> = c.streams.drain().collect();
        for id in ids {
            if let Some(s) = self.streams.get_mut(&id) {
                s.lost = true;
                self.by_quic.remove(&(s.conn, s.quic));
            }
            self.mark_ready(id);
        }
    }

    fn forget(&mut self, ch: ConnectionHandle, now: Instant) {
        trace!(?ch, "connection drained");
        self.lose(ch, now);
        self.conns.remove(&ch);
        self.dirty_set.remove(&ch);
    }

    fn fail_pending(&mut self, pick: impl Fn(Ipv4Addr) -> bool, why: ConnectFailure) {
        let events = &mut self.events;
        self.pending.retain(|p| {
            if pick(p.peer) {
                events.push_back(Event::ConnectFailed(p.id, why));
                false
            } else {
                true
            }
        });
    }

    /// Opens the streams waiting for `peer`, in the order they were asked for, until the peer
    /// allows no more (the rest wait for its next MAX_STREAMS).
    fn open_pending(&mut self, peer: Ipv4Addr, now: Instant) {
        let (waiting, rest): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.peer == peer);
        self.pending = rest;
        let mut waiting = waiting.into_iter();
        for p in waiting.by_ref() {
            match self.open_on(peer, p.id, now) {
                Ok(()) => self.events.push_back(Event::Connected(p.id)),
                Err(OpenError::Exhausted) => {
                    self.pending.push(p);
                    break;
                }
            }
        }
        self.pending.extend(waiting);
    }

    fn open_on(&mut self, peer: Ipv4Addr, id: StreamId, _now: Instant) -> Result<(), OpenError> {
        let ch = *self.by_peer.get(&peer).ok_or(OpenError::Exhausted)?;
        let c = self.conns.get_mut(&ch).ok_or(OpenError::Exhausted)?;
        let quic = c.conn.streams().open(Dir::Bi).ok_or(OpenError::Exhausted)?;
        self.register(id, ch, quic, peer);
        Ok(())
    }

    /// Opens a stream to `peer`. On an established connection with room for another stream it
    /// is open at once ([`Event::Connected`] follows); otherwise it waits for the connection or
    /// for room (at most the open timeout), then [`Event::Connected`] or
    /// [`Event::ConnectFailed`] (`Exhausted` when the connection was there but full).
    pub(crate) fn open(&mut self, peer: Ipv4Addr, now: Instant) -> StreamId {
        let id = StreamId(self.next_stream);
        self.next_stream += 1;
        let queued = self.pending.iter().any(|p| p.peer == peer);
        if self.by_peer.contains_key(&peer) && !queued && self.open_on(peer, id, now).is_ok() {
            self.events.push_back(Event::Connected(id));
        } else {
            self.pending.push(Pending {
                id,
                peer,
                deadline: now + self.open_timeout,
            });
            if let Some(at) = self.dial.get_mut(&peer) {
                if at.is_some_and(|t| t > now) {
                    *at = Some(now);
                }
                self.run_dials(now);
            }
        }
        id
    }

    /// The peer a stream runs to.
    pub(crate) fn stream_peer(&self, id: StreamId) -> Option<Ipv4Addr> {
        self.streams.get(&id).map(|s| s.peer)
    }

    fn conn_of(
        &mut self,
        id: StreamId,
    ) -> Result<(ConnectionHandle, quinn_proto::StreamId), StreamError> {
        let s = self.streams.get(&id).ok_or(StreamError::Unknown)?;
        if s.lost {
            trace!(?id, "stream of a lost connection");
            return Err(StreamError::Reset);
        }
        Ok((s.conn, s.quic))
    }

    /// Hands the connection's received QUIC datagrams to the streams they name. A datagram
    /// begins with the QUIC id of its stream (a varint, as HTTP/3 datagrams name theirs, RFC
    /// 9297), so only a stream on the same connection, with the same authenticated peer, ever
    /// sees it.
    fn take_datagrams(&mut self, ch: ConnectionHandle) {
        loop {
            let Some(c) = self.conns.get_mut(&ch) else {
                return;
            };
            let Some(mut datagram) = c.conn.datagrams().recv() else {
                return;
            };
            let ours = VarInt::decode(&mut datagram)
                .ok()
                .and_then(|quic| self.by_quic.get(&(ch, quinn_proto::StreamId::from(quic))));
            let Some(stream) = ours
                .copied()
                .and_then(|id| Some((id, self.streams.get_mut(&id)?)))
            else {
                trace!(?ch, "a QUIC datagram for no stream of ours: dropped");
                self.datagrams_dropped += 1;
                continue;
            };
            let (id, s) = stream;
            if s.datagrams.len() >= STREAM_DATAGRAMS {
                trace!(?id, "a stream's datagram queue is full: dropped");
                self.datagrams_dropped += 1;
                continue;
            }
            s.datagrams.push_back(datagram);
            self.mark_ready(id);
        }
    }

    /// Sends `data` as one QUIC datagram on the stream's connection, naming the stream. It is
    /// not retransmitted when lost; when the connection's datagram buffer is full the oldest
    /// queued datagram is dropped.
    pub(crate) fn stream_send_datagram(
        &mut self,
        id: StreamId,
        data: &[u8],
    ) -> Result<(), DatagramError> {
        let (ch, quic) = self.conn_of(id).map_err(DatagramError::Stream)?;
        let c = self
            .conns
            .get_mut(&ch)
            .ok_or(DatagramError::Stream(StreamError::Reset))?;
        let mut buf = BytesMut::with_capacity(8 + data.len());
        VarInt::from(quic).encode(&mut buf);
        buf.extend_from_slice(data);
        let sent = c.conn.datagrams().send(buf.freeze(), true);
        match sent {
            Ok(()) => {
                self.mark_dirty(ch);
                Ok(())
            }
            Err(quinn_proto::SendDatagramError::TooLarge) => Err(DatagramError::TooLarge),
            // Only without `drop`: a full buffer drops its oldest instead. Lost, as on a
            // congested link.
            Err(quinn_proto::SendDatagramError::Blocked(_)) => Ok(()),
            Err(
                quinn_proto::SendDatagramError::UnsupportedByPeer
                | quinn_proto::SendDatagramError::Disabled,
            ) => Err(DatagramError::Unsupported),
        }
    }

    /// The largest `data` [`Net::stream_send_datagram`] takes on this stream now, if the peer
    /// takes datagrams at all.
    pub(crate) fn stream_max_datagram(&mut self, id: StreamId) -> Option<usize> {
        let (ch, quic) = self.conn_of(id).ok()?;
        let c = self.conns.get_mut(&ch)?;
        let max = c.conn.datagrams().max_size()?;
        Some(max.saturating_sub(varint_len(u64::from(quic))))
    }

    /// The oldest QUIC datagram received for the stream; `WouldBlock` when there is none.
    pub(crate) fn stream_recv_datagram(&mut self, id: StreamId) -> Result<Bytes, StreamError> {
        let s = self.streams.get_mut(&id).ok_or(StreamError::Unknown)?;
        if let Some(d) = s.datagrams.pop_front() {
            return Ok(d);
        }
        if s.lost {
            return Err(StreamError::Reset);
        }
        Err(StreamError::WouldBlock)
    }

    /// QUIC datagrams dropped on receipt so far.
    pub(crate) fn datagrams_dropped(&self) -> u64 {
        self.datagrams_dropped
    }

    /// Queues `data` on the stream; returns how much was taken.
    pub(crate) fn stream_send(&mut self, id: StreamId, data: &[u8]) -> Result<usize, StreamError> {
        let (ch, quic) = self.conn_of(id)?;
        let c = self.conns.get_mut(&ch).ok_or(StreamError::Reset)?;
        let written = c.conn.send_stream(quic).write(data);
        self.mark_dirty(ch);
        match written {
            Ok(n) => Ok(n),
            Err(quinn_proto::WriteError::Blocked) => Err(StreamError::WouldBlock),
            Err(quinn_proto::WriteError::Stopped(_)) => Err(StreamError::Reset),
            Err(quinn_proto::WriteError::ClosedStream) => Err(StreamError::Closed),
        }
    }

    /// Reads received bytes into `buf`; `Ok(0)` for an empty `buf` only, `Err(Closed)` at the
    /// end of the stream.
    pub(crate) fn stream_recv(
        &mut self,
        id: StreamId,
        buf: &mut [u8],
    ) -> Result<usize, StreamError> {
        let mut filled = 0;
        let max = buf.len();
        self.stream_recv_with(id, max, |chunk| {
            buf[filled..filled + chunk.len()].copy_from_slice(chunk);
            filled += chunk.len();
        })
    }

    /// Hands up to `max` received bytes to `sink`, chunk by chunk, straight from QUIC's buffers
    /// (so the caller need not zero a buffer first); returns how many. `Ok(0)` for `max == 0`
    /// only, `Err(Closed)` at the end of the stream.
    pub(crate) fn stream_recv_with(
        &mut self,
        id: StreamId,
        max: usize,
        mut sink: impl FnMut(&[u8]),
    ) -> Result<usize, StreamError> {
        let (ch, quic) = self.conn_of(id)?;
        if max == 0 {
            return Ok(0);
        }
        let c = self.conns.get_mut(&ch).ok_or(StreamError::Reset)?;
        let mut recv = c.conn.recv_stream(quic);
        let mut chunks = match recv.read(true) {
            Ok(chunks) => chunks,
            Err(quinn_proto::ReadableError::ClosedStream) => return Err(StreamError::Closed),
            Err(quinn_proto::ReadableError::IllegalOrderedRead) => return Err(StreamError::Reset),
        };
        let mut filled = 0;
        let result = loop {
            if filled == max {
                break Ok(filled);
            }
            match chunks.next(max - filled) {
                Ok(Some(chunk)) => {
                    sink(&chunk.bytes);
                    filled += chunk.bytes.len();
                }
                Ok(None) if filled > 0 => break Ok(filled),
                Ok(None) => break Err(StreamError::Closed),
                Err(quinn_proto::ReadError::Blocked) if filled > 0 => break Ok(filled),
                Err(quinn_proto::ReadError::Blocked) => break Err(StreamError::WouldBlock),
                Err(quinn_proto::ReadError::Reset(_)) if filled > 0 => break Ok(filled),
                Err(quinn_proto::ReadError::Reset(code)) => {
                    trace!(?id, %code, "stream reset by the peer");
                    break Err(StreamError::Reset);
                }
            }
        };
        if chunks.finalize().should_transmit() {
            self.mark_dirty(ch);
        }
        result
    }

    /// Ends our side of the stream in order (a FIN after the queued data).
    pub(crate) fn stream_close(&mut self, id: StreamId) {
        let Ok((ch, quic)) = self.conn_of(id) else {
            return;
        };
        if let Some(c) = self.conns.get_mut(&ch) {
            let _ = c.conn.send_stream(quic).finish();
            self.mark_dirty(ch);
        }
    }

    /// Resets the stream both ways.
    pub(crate) fn stream_abort(&mut self, id: StreamId) {
        self.pending.retain(|p| p.id != id);
        if let Ok((ch, quic)) = self.conn_of(id) {
            if let Some(c) = self.conns.get_mut(&ch) {
                let _ = c.conn.send_stream(quic).reset(VarInt::from_u32(ABORTED));
                let _ = c.conn.recv_stream(quic).stop(VarInt::from_u32(ABORTED));
                self.mark_dirty(ch);
            }
        }
        self.remove_stream(id);
    }

    /// The owner is done with the stream: what it queued still goes out, then a FIN; anything
    /// more the peer sends is refused (STOP_SENDING).
    pub(crate) fn stream_release(&mut self, id: StreamId) {
        self.pending.retain(|p| p.id != id);
        if let Ok((ch, quic)) = self.conn_of(id) {
            if let Some(c) = self.conns.get_mut(&ch) {
                let mut send = c.conn.send_stream(quic);
                if let Err(quinn_proto::FinishError::Stopped(code)) = send.finish() {
                    // The peer stopped reading (it is done with the stream): only a reset
                    // frees the stream, on both sides.
                    let _ = send.reset(code);
                }
                let mut recv = c.conn.recv_stream(quic);
                // A stream read to its end is gone on its receive side already.
                let _ = recv.stop(VarInt::from_u32(0));
                self.mark_dirty(ch);
            }
        }
        self.remove_stream(id);
    }

    fn remove_stream(&mut self, id: StreamId) {
        if let Some(s) = self.streams.remove(&id) {
            self.by_quic.remove(&(s.conn, s.quic));
            if let Some(c) = self.conns.get_mut(&s.conn) {
                c.streams.remove(&id);
            }
        }
        self.ready_set.remove(&id);
    }

    /// Number of streams held (open or waiting for their connection).
    pub(crate) fn stream_count(&self) -> usize {
        self.streams.len() + self.pending.len()
    }

    /// The next event for the owner.
    pub(crate) fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next stream whose readiness may have changed.
    pub(crate) fn poll_ready(&mut self) -> Option<StreamId> {
        let id = self.ready.pop()?;
        self.ready_set.remove(&id);
        Some(id)
    }

    /// Whether [`Net::poll_packet`] may have something.
    pub(crate) fn wants_transmit(&self) -> bool {
        !self.dirty.is_empty() || !self.responses.is_empty()
    }

    /// Writes the next inner packet (IPv4/UDP header and QUIC datagram) into `out` (cleared
    /// first); returns the peer it goes to.
    pub(crate) fn poll_packet(&mut self, now: Instant, out: &mut Vec<u8>) -> Option<Ipv4Addr> {
        out.clear();
        if let Some((to, datagram)) = self.responses.pop_front() {
            let IpAddr::V4(dst) = to.ip() else {
                return None;
            };
            self.frame(out, (dst, to.port()), &datagram);
            return Some(dst);
        }
        while let Some(&ch) = self.dirty.front() {
            let Some(c) = self.conns.get_mut(&ch) else {
                self.dirty.pop_front();
                self.dirty_set.remove(&ch);
                continue;
            };
            self.scratch.clear();
            match c.conn.poll_transmit(now, 1, &mut self.scratch) {
                Some(t) => {
                    let peer = c.peer;
                    let IpAddr::V4(dst) = t.destination.ip() else {
                        continue;
                    };
                    let datagram = std::mem::take(&mut self.scratch);
                    self.frame(out, (dst, t.destination.port()), &datagram[..t.size]);
                    self.scratch = datagram;
                    // Round robin: the next packet comes from the next connection.
                    self.dirty.rotate_left(1);
                    debug_assert_eq!(dst, peer);
                    return Some(dst);
                }
                None => {
                    // Whatever it now has for us or the endpoint (a drained connection, events
                    // produced while sending).
                    self.dirty.pop_front();
                    self.dirty_set.remove(&ch);
                    self.drive_quiet(ch, now);
                }
            }
        }
        None
    }

    /// Hands a connection's endpoint events to the endpoint and its events to us; marks it dirty
    /// only when something happened.
    fn drive_quiet(&mut self, ch: ConnectionHandle, now: Instant) {
        loop {
            let Some(c) = self.conns.get_mut(&ch) else {
                return;
            };
            if let Some(event) = c.conn.poll_endpoint_events() {
                let drained = event.is_drained();
                if let Some(back) = self.endpoint.handle_event(ch, event) {
                    c.conn.handle_event(back);
                    self.mark_dirty(ch);
                }
                if drained {
                    self.forget(ch, now);
                    return;
                }
                continue;
            }
            match c.conn.poll() {
                Some(event) => {
                    self.on_event(ch, event, now);
                    self.mark_dirty(ch);
                }
                None => return,
            }
        }
    }

    fn frame(&self, out: &mut Vec<u8>, dst: (Ipv4Addr, u16), datagram: &[u8]) {
        out.resize(HEADER_LEN, 0);
        ip::write_udp_header(
            &mut out[..HEADER_LEN],
            (self.address, QUIC_PORT),
            dst,
            datagram.len(),
        );
        out.extend_from_slice(datagram);
    }

    /// When [`Net::handle_timeout`] should run next.
    pub(crate) fn poll_timeout(&mut self) -> Option<Instant> {
        let conns = self
            .conns
            .values_mut()
            .filter_map(|c| c.conn.poll_timeout());
        let dials = self.dial.values().filter_map(|at| *at);
        let pending = self.pending.iter().map(|p| p.deadline);
        conns.chain(dials).chain(pending).min()
    }

    /// Runs the QUIC timers that are due, dials that are due and open timeouts.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<ConnectionHandle> = self
            .conns
            .iter_mut()
            .filter_map(|(h, c)| {
                c.conn
                    .poll_timeout()
                    .is_some_and(|t| t <= now)
                    .then_some(*h)
            })
            .collect();
        for ch in due {
            if let Some(c) = self.conns.get_mut(&ch) {
                c.conn.handle_timeout(now);
            }
            self.drive(ch, now);
        }
        self.run_dials(now);
        let events = &mut self.events;
        let by_peer = &self.by_peer;
        self.pending.retain(|p| {
            if p.deadline > now {
                return true;
            }
            let why = if by_peer.contains_key(&p.peer) {
                ConnectFailure::Exhausted
            } else {
                ConnectFailure::TimedOut
            };
            events.push_back(Event::ConnectFailed(p.id, why));
            false
        });
    }

    /// Round-trip time estimates of the connections, by peer.
    pub(crate) fn rtts(&self) -> Vec<(Ipv4Addr, Duration)> {
        self.conns
            .values()
            .map(|c| (c.peer, c.conn.rtt()))
            .collect()
    }

    /// Established connections, for tests and status.
    pub(crate) fn connected_peers(&self) -> Vec<Ipv4Addr> {
        let mut v: Vec<Ipv4Addr> = self.by_peer.keys().copied().collect();
        v.sort();
        v
    }
}
