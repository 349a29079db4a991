//! The sans-IO tunnel state machine: WireGuard peers, the smoltcp interface and the TCP streams.
//!
//! [`Core`] has no sockets and no clock. Feed it UDP datagrams with [`Core::handle_datagram`],
//! collect datagrams to send with [`Core::poll_transmit`], call [`Core::handle_timeout`] when
//! [`Core::poll_timeout`] has passed, and drain [`Core::poll_event`]. Every method that needs time
//! takes `now`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpProtocol, Ipv4Packet, TcpPacket, TcpSeqNumber,
};
use tracing::{debug, trace};

use crate::device::{VirtualDevice, BUF_SIZE};
use crate::{PeerSpec, PeerStats, TunnelConfig};

/// The largest datagram [`Core::poll_transmit`] writes: pass a buffer at least this long.
pub const MAX_DATAGRAM_SIZE: usize = BUF_SIZE;

/// Receive and send buffer of every TCP socket. Window scaling follows from the size.
const TCP_BUFFER: usize = 4 * 1024 * 1024;
/// How long an outbound connection may stay in SYN-SENT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection whose peer answers nothing for this long while it has something to answer (data,
/// a keep-alive probe) is aborted.
const TCP_SILENCE: Duration = Duration::from_secs(10);
/// Idle connections are probed this often.
const TCP_KEEPALIVE: Duration = Duration::from_secs(15);
/// How long a stream whose handle was dropped may take to finish its close before it is reset.
const LINGER: Duration = Duration::from_secs(60);
/// How often boringtun's timers are updated (boringtun's own device uses 250 ms).
const WG_TICK: Duration = Duration::from_millis(250);
/// Least time between two answers to keepalives (and between two forced handshakes).
const KEEPALIVE_ANSWER_INTERVAL: Duration = Duration::from_secs(10);
/// Handshakes per second above which the shared rate limiter asks for cookies.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Resends of a handshake initiation while a peer has no session, after the first one: 1 s after
/// it, then 2 s after that; then boringtun's own schedule (REKEY_TIMEOUT, 5 s) takes over.
const FAST_RETRY: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(2)];
/// Least time between two handshakes started towards one peer because it sent transport data for
/// a session we do not have (it still uses a session with our previous process).
const RESET_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Most such handshakes per second over all peers, so that forged packets cannot turn the node
/// into an amplifier.
const RESET_PROBES_PER_SECOND: u32 = 100;
/// A session older than this is rejected by WireGuard (boringtun's REJECT_AFTER_TIME).
const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
/// Peer indices are 24 bits (boringtun keeps the low 8 bits of a session index for itself).
const INDEX_MASK: u32 = 0x00ff_ffff;
/// Most TCP sockets at once (listeners, inbound and outbound streams).
const MAX_SOCKETS: usize = 4096;
/// Most decrypted packets waiting for the interface.
const RX_LIMIT: usize = 4096;
/// First ephemeral port of outbound connections.
const EPHEMERAL_FIRST: u16 = 49152;

/// Identifies a TCP stream of a [`Core`].
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

/// Why an outbound connection failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The remote answered the SYN with a RST (nothing listens on that port).
    Refused,
    /// No answer within the connect timeout (10 s).
    TimedOut,
}

/// Something the owner of a [`Core`] should act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A peer opened a stream to a listed port and it is established.
    Accepted(StreamId),
    /// An outbound stream from [`Core::connect`] is established.
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
    /// Too many sockets are open, or every ephemeral port is in use.
    #[error("too many open connections")]
    Exhausted,
}

/// Errors of the stream operations of [`Core`].
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum StreamError {
    /// The stream does not exist (never did, or was already released).
    #[error("unknown stream")]
    Unknown,
    /// No data to read or no room to write right now; retry after the next poll.
    #[error("operation would block")]
    WouldBlock,
    /// The stream cannot send any more (closed by us, or the connection ended).
    #[error("stream closed")]
    Closed,
    /// The connection was reset before the peer closed it in order.
    #[error("connection reset")]
    Reset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Outbound, SYN sent; fails at the deadline.
    Connecting { deadline: Instant },
    /// Inbound, handshake not finished, not announced yet.
    Accepting,
    /// Announced to the owner.
    Open,
}

#[derive(Debug)]
struct Stream {
    handle: SocketHandle,
    local: SocketAddrV4,
    remote: SocketAddrV4,
    phase: Phase,
    /// Opened by [`Core::connect`] (its local port is an ephemeral port).
    outbound: bool,
    /// The owner released the stream; remove it once closed, reset it at the deadline.
    released: Option<Instant>,
}

struct Peer {
    public_key: [u8; 32],
    tunn: Tunn,
    index: u32,
    allowed_ip: Ipv4Addr,
    configured_endpoint: Option<SocketAddr>,
    endpoint: Option<SocketAddr>,
    keepalive: Option<u16>,
    /// When the last authenticated packet arrived from the peer.
    last_rx: Option<Instant>,
    /// When we last answered a keepalive, or forced a handshake.
    last_probe: Option<Instant>,
    /// Fast resends of the initiation of the handshake in progress while there is no session.
    fast_retry: Option<FastRetry>,
    /// When we last started a handshake because the peer sent data for an unknown session.
    last_reset_probe: Option<Instant>,
}

/// The fast resend schedule of one handshake attempt (see [`FAST_RETRY`]). It stays in place,
/// finished, until the peer has a session or boringtun gives the attempt up, so that boringtun's
/// own retries do not start it again.
#[derive(Clone, Copy, Debug)]
struct FastRetry {
    /// When to resend next; `None` once the schedule is done.
    next: Option<Instant>,
    /// How many resends went out.
    sent: usize,
}

/// Datagrams produced outside the data path (handshakes, cookies, keepalives).
type ControlQueue = VecDeque<(SocketAddr, Vec<u8>)>;

/// The tunnel state machine. See the module documentation.
pub struct Core {
    private: StaticSecret,
    public: PublicKey,
    address: Ipv4Addr,
    rate_limiter: Arc<RateLimiter>,
    peers: HashMap<u32, Peer>,
    by_key: HashMap<[u8; 32], u32>,
    by_ip: HashMap<Ipv4Addr, u32>,
    control: ControlQueue,
    /// The earliest [`FastRetry::next`] of all peers.
    next_fast_retry: Option<Instant>,
    /// Reset probes (handshakes started for unknown sessions) in the current second.
    reset_probes: u32,

    epoch: Instant,
    iface: Interface,
    device: VirtualDevice,
    sockets: SocketSet<'static>,
    needs_poll: bool,
    iface_poll_at: Option<Instant>,
    next_wg_tick: Instant,
    next_rate_reset: Instant,

    listen_ports: HashSet<u16>,
    /// Listening sockets created for SYNs of the current batch: (socket, port).
    listeners: Vec<(SocketHandle, u16)>,
    /// (local port, remote) of every stream and of every SYN waiting for the next poll.
    tuples: HashSet<(u16, SocketAddrV4)>,
    /// The highest sequence number sent so far (SND.MAX) on each connection, by (local port,
    /// remote); see [`Core::stamp_outbound`].
    send_max: HashMap<(u16, SocketAddrV4), TcpSeqNumber>,
    streams: HashMap<StreamId, Stream>,
    next_stream: u64,
    next_port: u16,
    used_ports: HashSet<u16>,
    events: VecDeque<Event>,
    /// Bumped whenever stream readiness may have changed (after each interface poll).
    readiness_epoch: u64,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("address", &self.address)
            .field("peers", &self.peers.len())
            .field("streams", &self.streams.len())
            .finish_non_exhaustive()
    }
}

fn smol_addr(a: IpAddress) -> Option<Ipv4Addr> {
    match a {
        IpAddress::Ipv4(v4) => Some(v4),
    }
}

fn endpoint_v4(e: IpEndpoint) -> Option<SocketAddrV4> {
    smol_addr(e.addr).map(|ip| SocketAddrV4::new(ip, e.port))
}

impl Core {
    /// A core for `config` (its `listen` field is the driver's business and ignored here).
    /// `seed` randomizes TCP sequence numbers and ephemeral ports; `now` is the time origin.
    pub fn new(config: &TunnelConfig, seed: u64, now: Instant) -> Core {
        let private = StaticSecret::from(config.private_key);
        let public = PublicKey::from(&private);
        let mtu = usize::from(config.mtu).clamp(576, BUF_SIZE - 128);
        let mut device = VirtualDevice::new(mtu);
        let mut iface_config = IfaceConfig::new(HardwareAddress::Ip);
        iface_config.random_seed = seed;
        let mut iface = Interface::new(iface_config, &mut device, SmolInstant::ZERO);
        iface.update_ip_addrs(|addrs| {
            // Capacity is several addresses; one cannot overflow it.
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(config.overlay_address), 32));
        });
        // Every overlay destination is "on link": the core routes by allowed IP itself.
        let _ = iface
            .routes_mut()
            .add_default_ipv4_route(config.overlay_address);
        let span = usize::from(u16::MAX - EPHEMERAL_FIRST);
        let next_port = EPHEMERAL_FIRST + (seed as usize % span) as u16;
        Core {
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            private,
            public,
            address: config.overlay_address,
            peers: HashMap::new(),
            by_key: HashMap::new(),
            by_ip: HashMap::new(),
            control: VecDeque::new(),
            next_fast_retry: None,
            reset_probes: 0,
            epoch: now,
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            needs_poll: false,
            iface_poll_at: None,
            next_wg_tick: now,
            next_rate_reset: now + Duration::from_secs(1),
            listen_ports: HashSet::new(),
            listeners: Vec::new(),
            tuples: HashSet::new(),
            send_max: HashMap::new(),
            streams: HashMap::new(),
            next_stream: 1,
            next_port,
            used_ports: HashSet::new(),
            events: VecDeque::new(),
            readiness_epoch: 0,
        }
    }

    /// The node's overlay address.
    pub fn overlay_address(&self) -> Ipv4Addr {
        self.address
    }

    /// The node's WireGuard public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    fn smol_now(&self, now: Instant) -> SmolInstant {
        SmolInstant::from_micros(now.saturating_duration_since(self.epoch).as_micros() as i64)
    }

    fn instant_of(&self, t: SmolInstant) -> Instant {
        self.epoch + Duration::from_micros(t.total_micros().max(0) as u64)
    }

    // ----------------------------------------------------------------------------------------
    // Peers

    /// Replaces the whole peer set. Peers with an unchanged key keep their session and their
    /// connections; a changed endpoint or allowed IP is updated in place (a changed keepalive
    /// starts a new session, connections survive). Removed peers are dropped and their streams
    /// reset. A new peer with an endpoint and a keepalive starts its handshake at once.
    pub fn set_peers(&mut self, specs: Vec<PeerSpec>, now: Instant) {
        // Key order, so that index collisions resolve the same way in every process.
        let wanted: BTreeMap<[u8; 32], PeerSpec> =
            specs.into_iter().map(|s| (s.public_key, s)).collect();
        let removed: Vec<u32> = self
            .peers
            .iter()
            .filter(|(_, p)| !wanted.contains_key(&p.public_key))
            .map(|(i, _)| *i)
            .collect();
        for index in removed {
            if let Some(peer) = self.peers.remove(&index) {
                debug!(allowed_ip = %peer.allowed_ip, "peer removed");
                self.by_key.remove(&peer.public_key);
                if self.by_ip.get(&peer.allowed_ip) == Some(&index) {
                    self.by_ip.remove(&peer.allowed_ip);
                }
                self.reset_streams_to(peer.allowed_ip);
            }
        }
        for (key, spec) in wanted {
            match self.by_key.get(&key).copied() {
                Some(index) => self.update_peer(index, spec, now),
                None => self.add_peer(spec, now),
            }
        }
        self.needs_poll = true;
    }

    /// The peer's index: derived from its key, so that it is the same in every process with the
    /// same peer set, and a restarted node can tell whose stale session a data packet belongs to.
    /// A collision takes the next free index (peers are added in key order).
    fn stable_index(&self, key: &[u8; 32]) -> u32 {
        let mut index = key_index(key);
        while self.peers.contains_key(&index) {
            index = (index + 1) & INDEX_MASK;
        }
        index
    }

    fn new_tunn(&self, key: &[u8; 32], keepalive: Option<u16>, index: u32) -> Tunn {
        Tunn::new(
            self.private.clone(),
            PublicKey::from(*key),
            None,
            keepalive,
            index,
            Some(self.rate_limiter.clone()),
        )
    }

    fn add_peer(&mut self, spec: PeerSpec, now: Instant) {
        let index = self.stable_index(&spec.public_key);
        let tunn = self.new_tunn(&spec.public_key, spec.persistent_keepalive, index);
        debug!(allowed_ip = %spec.allowed_ip, endpoint = ?spec.endpoint, "peer added");
        let mut peer = Peer {
            public_key: spec.public_key,
            tunn,
            index,
            allowed_ip: spec.allowed_ip,
            configured_endpoint: spec.endpoint,
            endpoint: spec.endpoint,
            keepalive: spec.persistent_keepalive,
            last_rx: None,
            last_probe: None,
            fast_retry: None,
            last_reset_probe: None,
        };
        if spec.endpoint.is_some() && spec.persistent_keepalive.is_some() {
            initiate(
                &mut peer,
                now,
                &mut self.control,
                &mut self.device.pool,
                &mut self.next_fast_retry,
            );
        }
        self.by_key.insert(spec.public_key, index);
        self.by_ip.insert(spec.allowed_ip, index);
        self.peers.insert(index, peer);
    }

    fn update_peer(&mut self, index: u32, spec: PeerSpec, now: Instant) {
        let new_tunn = match self.peers.get(&index) {
            Some(p) if p.keepalive != spec.persistent_keepalive => {
                Some(self.new_tunn(&spec.public_key, spec.persistent_keepalive, index))
            }
            Some(_) => None,
            None => return,
        };
        let Some(peer) = self.peers.get_mut(&index) else {
            return;
        };
        if peer.allowed_ip != spec.allowed_ip {
            if self.by_ip.get(&peer.allowed_ip) == Some(&index) {
                self.by_ip.remove(&peer.allowed_ip);
            }
            let old = peer.allowed_ip;
            peer.allowed_ip = spec.allowed_ip;
            self.by_ip.insert(spec.allowed_ip, index);
            self.reset_streams_to(old);
        }
        let Some(peer) = self.peers.get_mut(&index) else {
            return;
        };
        if spec.endpoint != peer.configured_endpoint {
            peer.configured_endpoint = spec.endpoint;
            if spec.endpoint.is_some() {
                peer.endpoint = spec.endpoint;
            }
        }
        if let Some(tunn) = new_tunn {
            peer.tunn = tunn;
            peer.keepalive = spec.persistent_keepalive;
            peer.fast_retry = None;
            if peer.endpoint.is_some() && peer.keepalive.is_some() {
                initiate(
                    peer,
                    now,
                    &mut self.control,
                    &mut self.device.pool,
                    &mut self.next_fast_retry,
                );
            }
        }
    }

    fn reset_streams_to(&mut self, ip: Ipv4Addr) {
        for s in self.streams.values() {
            if *s.remote.ip() == ip {
                self.sockets.get_mut::<tcp::Socket>(s.handle).abort();
            }
        }
        self.needs_poll = true;
    }

    /// Counters of every peer.
    pub fn peer_stats(&self) -> Vec<PeerStats> {
        let mut stats: Vec<PeerStats> = self
            .peers
            .values()
            .map(|p| {
                let (last_handshake, tx, rx, _loss, _rtt) = p.tunn.stats();
                PeerStats {
                    public_key: p.public_key,
                    endpoint: p.endpoint,
                    last_handshake,
                    tx_bytes: tx as u64,
                    rx_bytes: rx as u64,
                }
            })
            .collect();
        stats.sort_by_key(|s| s.public_key);
        stats
    }

    /// Sets the overlay ports inbound streams are accepted on; SYNs to other ports get a RST.
    /// Streams already open are not affected.
    pub fn set_listen_ports(&mut self, ports: impl IntoIterator<Item = u16>) {
        self.listen_ports = ports.into_iter().collect();
    }

    // ----------------------------------------------------------------------------------------
    // Network input and output

    /// Handles one UDP datagram received from `from`. Anything malformed, unauthenticated or from
    /// an unknown peer is dropped silently. Call [`Core::poll_transmit`] afterwards (after a
    /// batch of datagrams is best).
    pub fn handle_datagram(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) {
        if datagram.len() > BUF_SIZE - 64 {
            trace!(%from, len = datagram.len(), "oversized datagram dropped");
            return;
        }
        let mut cookie = [0u8; 64];
        let index = match self
            .rate_limiter
            .verify_packet(Some(from.ip()), datagram, &mut cookie)
        {
            Ok(Packet::HandshakeInit(p)) => {
                match parse_handshake_anon(&self.private, &self.public, &p) {
                    Ok(half) => match self.by_key.get(&half.peer_static_public) {
                        Some(i) => *i,
                        None => {
                            trace!(%from, "handshake from unknown key dropped");
                            return;
                        }
                    },
                    Err(e) => {
                        trace!(%from, ?e, "bad handshake initiation dropped");
                        return;
                    }
                }
            }
            Ok(Packet::HandshakeResponse(p)) => p.receiver_idx >> 8,
            Ok(Packet::PacketCookieReply(p)) => p.receiver_idx >> 8,
            Ok(Packet::PacketData(p)) => p.receiver_idx >> 8,
            Err(TunnResult::WriteToNetwork(reply)) => {
                trace!(%from, "under load: cookie reply");
                self.control.push_back((from, reply.to_vec()));
                return;
            }
            Err(TunnResult::Err(e)) => {
                trace!(%from, ?e, "invalid datagram dropped");
                return;
            }
            Err(TunnResult::Done)
            | Err(TunnResult::WriteToTunnelV4(..))
            | Err(TunnResult::WriteToTunnelV6(..)) => return,
        };
        let Some(peer) = self.peers.get_mut(&index) else {
            trace!(%from, index, "datagram for unknown index dropped");
            return;
        };
        let mut buf = VirtualDevice::take_buf(&mut self.device.pool);
        let mut input = datagram;
        let mut delivered: Option<usize> = None;
        let mut authenticated = false;
        let mut unknown_session = false;
        loop {
            match peer.tunn.decapsulate(Some(from.ip()), input, &mut buf) {
                TunnResult::Done => {
                    if !input.is_empty() {
                        // A keepalive or a cookie reply, both authenticated.
                        authenticated = true;
                        if datagram.first() == Some(&4) {
                            answer_keepalive(peer, from, now, &mut self.control, &mut buf);
                        }
                    }
                    break;
                }
                TunnResult::Err(e) => {
                    match e {
                        WireGuardError::DuplicateCounter => {
                            trace!(%from, "duplicate packet dropped")
                        }
                        other => {
                            trace!(%from, error = ?other, "datagram rejected");
                            // Transport data we cannot open: the sender may still use a session
                            // with our previous process.
                            unknown_session = datagram.first() == Some(&4);
                        }
                    }
                    break;
                }
                TunnResult::WriteToNetwork(packet) => {
                    authenticated = true;
                    self.control.push_back((from, packet.to_vec()));
                    input = &[];
                }
                TunnResult::WriteToTunnelV4(packet, src) => {
                    authenticated = true;
                    if src == peer.allowed_ip {
                        delivered = Some(packet.len());
                    } else {
                        trace!(%src, allowed = %peer.allowed_ip, "spoofed source dropped");
                    }
                    break;
                }
                TunnResult::WriteToTunnelV6(_, src) => {
                    authenticated = true;
                    trace!(%src, "IPv6 packet dropped");
                    break;
                }
            }
        }
        if authenticated {
            peer.last_rx = Some(now);
        }
        if authenticated && peer.endpoint != Some(from) {
            debug!(allowed_ip = %peer.allowed_ip, endpoint = %from, "peer endpoint updated");
            peer.endpoint = Some(from);
        }
        if unknown_session {
            let budget = &mut self.reset_probes;
            let next_fast = &mut self.next_fast_retry;
            reset_probe(
                peer,
                from,
                now,
                budget,
                next_fast,
                &mut self.control,
                &mut buf,
            );
        }
        match delivered {
            Some(len) if self.device.rx.len() < RX_LIMIT => {
                buf.truncate(len);
                self.inspect_inbound(&buf);
                self.device.rx.push_back(buf);
                self.needs_poll = true;
            }
            Some(_) | None => VirtualDevice::recycle(&mut self.device.pool, buf),
        }
    }

    /// Creates a listening socket on demand for a SYN to a listed port.
    fn inspect_inbound(&mut self, packet: &[u8]) {
        let Ok(ip) = Ipv4Packet::new_checked(packet) else {
            return;
        };
        if ip.next_header() != IpProtocol::Tcp || ip.dst_addr() != self.address {
            return;
        }
        let src = ip.src_addr();
        let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
            return;
        };
        if !tcp.syn() || tcp.ack() || !self.listen_ports.contains(&tcp.dst_port()) {
            return;
        }
        let tuple = (tcp.dst_port(), SocketAddrV4::new(src, tcp.src_port()));
        if self.tuples.contains(&tuple) || self.sockets_in_use() >= MAX_SOCKETS {
            return;
        }
        let mut socket = new_tcp_socket();
        if socket.listen(tcp.dst_port()).is_err() {
            return;
        }
        let handle = self.sockets.add(socket);
        self.listeners.push((handle, tcp.dst_port()));
        self.tuples.insert(tuple);
    }

    fn sockets_in_use(&self) -> usize {
        self.streams.len() + self.listeners.len()
    }

    /// Writes the next datagram to send into `buf` (at least [`MAX_DATAGRAM_SIZE`] bytes) and
    /// says where it goes. Call until it returns `None` after every input (datagrams, timeouts,
    /// stream operations); it polls the TCP/IP stack as needed.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        loop {
            if let Some((dst, packet)) = self.control.pop_front() {
                if packet.len() > buf.len() {
                    continue;
                }
                buf[..packet.len()].copy_from_slice(&packet);
                return Some(Transmit {
                    dst,
                    len: packet.len(),
                });
            }
            if let Some(mut packet) = self.device.tx.pop_front() {
                self.stamp_outbound(&mut packet);
                let result = self.encapsulate(&packet, buf, now);
                VirtualDevice::recycle(&mut self.device.pool, packet);
                match result {
                    Some(t) => return Some(t),
                    None => continue,
                }
            }
            if self.needs_poll || self.device.exhausted {
                self.poll_iface(now);
                if self.device.tx.is_empty() && self.control.is_empty() {
                    return None;
                }
                continue;
            }
            return None;
        }
    }

    /// Tracks the highest sequence number sent on each connection (SND.MAX), and stamps it on
    /// outgoing pure ACKs whose sequence number is behind it.
    ///
    /// When its retransmission timer fires, smoltcp goes back to the first unacknowledged byte
    /// ("go-back-N") and stamps every segment it sends afterwards, pure ACKs included, with the
    /// rewound sequence number. The other end has usually received more than that already, and
    /// (RFC 9293, 3.10.7.4) drops a zero-length segment below its RCV.NXT without looking at its
    /// acknowledgment. When both ends of a connection retransmit at once (segments lost in both
    /// directions, as when a burst overflows a UDP receive buffer), each end drops the other's
    /// ACKs, neither learns what the other has received, and the connection stalls for good,
    /// both ends resending their first unacknowledged segment with exponential backoff. BSD's
    /// `tcp_output` stamps pure ACKs with SND.MAX for this reason, and so do we: a pure ACK
    /// occupies no sequence space, and the other end has received nothing beyond SND.MAX and
    /// has its window open up to at least there, so it always accepts and processes it.
    fn stamp_outbound(&mut self, packet: &mut [u8]) {
        let Ok(mut ip) = Ipv4Packet::new_checked(&mut packet[..]) else {
            return;
        };
        if ip.next_header() != IpProtocol::Tcp {
            return;
        }
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        let Ok(mut tcp) = TcpPacket::new_checked(ip.payload_mut()) else {
            return;
        };
        if tcp.rst() {
            return;
        }
        let key = (tcp.src_port(), SocketAddrV4::new(dst, tcp.dst_port()));
        let seq = tcp.seq_number();
        let end = seq + tcp.segment_len();
        if tcp.syn() {
            // A new connection (or a retransmitted SYN): its sequence space starts here.
            self.send_max.insert(key, end);
            return;
        }
        let Some(max) = self.send_max.get_mut(&key) else {
            return;
        };
        if end > *max {
            *max = end;
        } else if seq < *max && tcp.ack() && tcp.segment_len() == 0 {
            tcp.set_seq_number(*max);
            tcp.fill_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst));
        }
    }

    fn encapsulate(&mut self, packet: &[u8], buf: &mut [u8], now: Instant) -> Option<Transmit> {
        let dst = Ipv4Packet::new_checked(packet).ok()?.dst_addr();
        let Some(peer) = self.by_ip.get(&dst).and_then(|i| self.peers.get_mut(i)) else {
            trace!(%dst, "no peer for destination");
            return None;
        };
        if buf.len() < packet.len() + 32 || buf.len() < 148 {
            return None;
        }
        match peer.tunn.encapsulate(packet, buf) {
            TunnResult::WriteToNetwork(out) => match peer.endpoint {
                Some(endpoint) => {
                    if out.first() == Some(&1) {
                        // No session: boringtun started a handshake instead.
                        note_initiation(peer, now, &mut self.next_fast_retry);
                    }
                    Some(Transmit {
                        dst: endpoint,
                        len: out.len(),
                    })
                }
                None => {
                    trace!(%dst, "peer has no endpoint yet");
                    None
                }
            },
            TunnResult::Done => None,
            TunnResult::Err(e) => {
                trace!(%dst, ?e, "encapsulate failed");
                None
            }
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => None,
        }
    }

    fn poll_iface(&mut self, now: Instant) {
        self.needs_poll = false;
        self.device.exhausted = false;
        self.device.top_up_spare();
        let ts = self.smol_now(now);
        self.iface.poll(ts, &mut self.device, &mut self.sockets);
        self.after_poll(now);
        self.iface_poll_at = self
            .iface
            .poll_at(ts, &self.sockets)
            .map(|t| self.instant_of(t));
        self.readiness_epoch = self.readiness_epoch.wrapping_add(1);
    }

    /// Turns consumed listeners into streams, reports connects, reaps released streams.
    fn after_poll(&mut self, now: Instant) {
        for (handle, port) in std::mem::take(&mut self.listeners) {
            let socket = self.sockets.get::<tcp::Socket>(handle);
            let remote = socket.remote_endpoint().and_then(endpoint_v4);
            match (socket.state(), remote) {
                (tcp::State::Listen | tcp::State::Closed | tcp::State::TimeWait, _) | (_, None) => {
                    self.sockets.remove(handle);
                }
                (_, Some(remote)) => {
                    let id = StreamId(self.next_stream);
                    self.next_stream += 1;
                    self.streams.insert(
                        id,
                        Stream {
                            handle,
                            local: SocketAddrV4::new(self.address, port),
                            remote,
                            phase: Phase::Accepting,
                            outbound: false,
                            released: None,
                        },
                    );
                }
            }
        }
        self.tuples.clear();
        let mut gone = Vec::new();
        for (id, s) in self.streams.iter_mut() {
            let state = self.sockets.get::<tcp::Socket>(s.handle).state();
            match s.phase {
                Phase::Connecting { .. } => match state {
                    tcp::State::SynSent => {}
                    tcp::State::Closed
                    | tcp::State::Listen
                    | tcp::State::TimeWait
                    | tcp::State::Closing
                    | tcp::State::LastAck => {
                        self.events
                            .push_back(Event::ConnectFailed(*id, ConnectFailure::Refused));
                        gone.push(*id);
                        continue;
                    }
                    _ => {
                        s.phase = Phase::Open;
                        self.events.push_back(Event::Connected(*id));
                    }
                },
                Phase::Accepting => match state {
                    tcp::State::SynReceived => {}
                    tcp::State::Closed | tcp::State::Listen | tcp::State::TimeWait => {
                        gone.push(*id);
                        continue;
                    }
                    _ => {
                        s.phase = Phase::Open;
                        self.events.push_back(Event::Accepted(*id));
                    }
                },
                Phase::Open => {}
            }
            if s.released.is_some() && is_finished(self.sockets.get::<tcp::Socket>(s.handle)) {
                gone.push(*id);
            }
            self.tuples.insert((s.local.port(), s.remote));
        }
        for id in gone {
            self.remove_stream(id);
        }
        let _ = now;
    }

    fn remove_stream(&mut self, id: StreamId) {
        if let Some(s) = self.streams.remove(&id) {
            self.sockets.remove(s.handle);
            self.send_max.remove(&(s.local.port(), s.remote));
            if s.outbound {
                self.used_ports.remove(&s.local.port());
            }
        }
    }

    // ----------------------------------------------------------------------------------------
    // Time

    /// When [`Core::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = self.next_wg_tick.min(self.next_rate_reset);
        if self.needs_poll || self.device.exhausted || !self.control.is_empty() {
            return Some(self.epoch.min(t));
        }
        if let Some(at) = self.iface_poll_at {
            t = t.min(at);
        }
        if let Some(at) = self.next_fast_retry {
            t = t.min(at);
        }
        for s in self.streams.values() {
            if let Phase::Connecting { deadline } = s.phase {
                t = t.min(deadline);
            }
            if let Some(released) = s.released {
                t = t.min(released + LINGER);
            }
        }
        Some(t)
    }

    /// Runs the timers that are due at `now` (WireGuard handshakes and keepalives, TCP
    /// retransmissions, connect timeouts). Call [`Core::poll_transmit`] afterwards.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.next_rate_reset {
            self.rate_limiter.reset_count();
            self.reset_probes = 0;
            self.next_rate_reset = now + Duration::from_secs(1);
        }
        if now >= self.next_wg_tick {
            self.next_wg_tick = now + WG_TICK;
            let mut buf = VirtualDevice::take_buf(&mut self.device.pool);
            for peer in self.peers.values_mut() {
                let queued = self.control.len();
                match peer.tunn.update_timers(&mut buf) {
                    TunnResult::Done => {}
                    TunnResult::Err(WireGuardError::ConnectionExpired) => {
                        trace!(allowed_ip = %peer.allowed_ip, "session expired");
                        // boringtun gave the attempt up: the next one gets fast resends again.
                        peer.fast_retry = None;
                    }
                    TunnResult::Err(e) => trace!(allowed_ip = %peer.allowed_ip, ?e, "timer error"),
                    TunnResult::WriteToNetwork(packet) => match peer.endpoint {
                        Some(endpoint) => self.control.push_back((endpoint, packet.to_vec())),
                        None => {
                            trace!(allowed_ip = %peer.allowed_ip, "no endpoint for timer packet")
                        }
                    },
                    TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
                }
                probe_silent_peer(peer, now, &mut self.control, &mut buf);
                if peer.fast_retry.is_some() && has_session(&peer.tunn) {
                    peer.fast_retry = None;
                }
                let new = self.control.range(queued..);
                note_initiations_in(peer, new, now, &mut self.next_fast_retry);
            }
            VirtualDevice::recycle(&mut self.device.pool, buf);
        }
        if self.next_fast_retry.is_some_and(|at| now >= at) {
            self.run_fast_retries(now);
        }
        let mut failed = Vec::new();
        for (id, s) in &self.streams {
            if let Phase::Connecting { deadline } = s.phase {
                if now >= deadline {
                    failed.push(*id);
                }
            }
            if let Some(released) = s.released {
                if now >= released + LINGER {
                    self.sockets.get_mut::<tcp::Socket>(s.handle).abort();
                }
            }
        }
        for id in failed {
            self.events
                .push_back(Event::ConnectFailed(id, ConnectFailure::TimedOut));
            if let Some(s) = self.streams.get(&id) {
                self.sockets.get_mut::<tcp::Socket>(s.handle).abort();
            }
            // Let the RST go out, then drop the socket.
            self.poll_iface(now);
            self.remove_stream(id);
        }
        if self.iface_poll_at.is_none_or(|at| now >= at) {
            self.needs_poll = true;
        }
    }

    /// Resends due initiations of handshakes that have not got a session yet.
    fn run_fast_retries(&mut self, now: Instant) {
        let mut next: Option<Instant> = None;
        let mut buf = VirtualDevice::take_buf(&mut self.device.pool);
        for peer in self.peers.values_mut() {
            let Some(retry) = peer.fast_retry.as_mut() else {
                continue;
            };
            let Some(at) = retry.next else {
                continue;
            };
            if at > now {
                next = Some(next.map_or(at, |n| n.min(at)));
                continue;
            }
            retry.sent += 1;
            retry.next = FAST_RETRY.get(retry.sent).map(|d| now + *d);
            if let Some(at) = retry.next {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
            let Some(endpoint) = peer.endpoint else {
                continue;
            };
            if has_session(&peer.tunn) {
                peer.fast_retry = None;
                continue;
            }
            debug!(allowed_ip = %peer.allowed_ip, "no handshake response yet: resending");
            match peer.tunn.format_handshake_initiation(&mut buf, true) {
                TunnResult::WriteToNetwork(packet) => {
                    self.control.push_back((endpoint, packet.to_vec()))
                }
                TunnResult::Err(e) => trace!(?e, "cannot resend handshake"),
                TunnResult::Done
                | TunnResult::WriteToTunnelV4(..)
                | TunnResult::WriteToTunnelV6(..) => {}
            }
        }
        VirtualDevice::recycle(&mut self.device.pool, buf);
        self.next_fast_retry = next;
    }

    /// True when the TCP/IP stack has work (input queued, data written): the owner should call
    /// [`Core::poll_transmit`] soon. A driver that sleeps can use it to decide whether to wake.
    pub fn needs_poll(&self) -> bool {
        self.needs_poll || self.device.exhausted || !self.control.is_empty()
    }

    /// The next event, if any. Call after handling input.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// A counter that changes whenever stream readiness may have changed; owners that park
    /// tasks on streams re-check them when it moves.
    pub fn readiness_epoch(&self) -> u64 {
        self.readiness_epoch
    }

    // ----------------------------------------------------------------------------------------
    // Streams

    /// Opens a TCP connection to `remote` from an ephemeral port. The result comes as
    /// [`Event::Connected`] or [`Event::ConnectFailed`].
    pub fn connect(
        &mut self,
        remote: SocketAddrV4,
        now: Instant,
    ) -> Result<StreamId, ConnectError> {
        if !self.by_ip.contains_key(remote.ip()) {
            return Err(ConnectError::NoRoute(*remote.ip()));
        }
        if self.sockets_in_use() >= MAX_SOCKETS {
            return Err(ConnectError::Exhausted);
        }
        let port = self.ephemeral_port()?;
        let mut socket = new_tcp_socket();
        let local = SocketAddrV4::new(self.address, port);
        socket
            .connect(
                self.iface.context(),
                (IpAddress::Ipv4(*remote.ip()), remote.port()),
                (IpAddress::Ipv4(self.address), port),
            )
            .map_err(|_| ConnectError::Exhausted)?;
        let handle = self.sockets.add(socket);
        self.used_ports.insert(port);
        let id = StreamId(self.next_stream);
        self.next_stream += 1;
        self.streams.insert(
            id,
            Stream {
                handle,
                local,
                remote,
                phase: Phase::Connecting {
                    deadline: now + CONNECT_TIMEOUT,
                },
                outbound: true,
                released: None,
            },
        );
        self.needs_poll = true;
        Ok(id)
    }

    fn ephemeral_port(&mut self) -> Result<u16, ConnectError> {
        for _ in 0..(u16::MAX - EPHEMERAL_FIRST) {
            let port = self.next_port;
            self.next_port = if self.next_port == u16::MAX {
                EPHEMERAL_FIRST
            } else {
                self.next_port + 1
            };
            if !self.used_ports.contains(&port) {
                return Ok(port);
            }
        }
        Err(ConnectError::Exhausted)
    }

    fn socket(&mut self, id: StreamId) -> Result<&mut tcp::Socket<'static>, StreamError> {
        let s = self.streams.get(&id).ok_or(StreamError::Unknown)?;
        Ok(self.sockets.get_mut::<tcp::Socket>(s.handle))
    }

    /// Local and remote address of a stream.
    pub fn stream_addrs(&self, id: StreamId) -> Option<(SocketAddrV4, SocketAddrV4)> {
        self.streams.get(&id).map(|s| (s.local, s.remote))
    }

    /// Queues bytes for sending; returns how many were taken (never 0 for non-empty `data`:
    /// [`StreamError::WouldBlock`] instead).
    pub fn stream_send(&mut self, id: StreamId, data: &[u8]) -> Result<usize, StreamError> {
        let socket = self.socket(id)?;
        match socket.send_slice(data) {
            Ok(0) if !data.is_empty() => Err(StreamError::WouldBlock),
            Ok(n) => {
                self.needs_poll = true;
                Ok(n)
            }
            Err(tcp::SendError::InvalidState) => Err(StreamError::Closed),
        }
    }

    /// Reads received bytes into `buf`. `Ok(0)` with a non-empty `buf` is the end of the stream
    /// (the peer closed it in order).
    pub fn stream_recv(&mut self, id: StreamId, buf: &mut [u8]) -> Result<usize, StreamError> {
        let socket = self.socket(id)?;
        match socket.recv_slice(buf) {
            Ok(0) if !buf.is_empty() => Err(StreamError::WouldBlock),
            Ok(n) => {
                // Freeing space may open the window: poll so the update goes out.
                self.needs_poll |= n > 0;
                Ok(n)
            }
            Err(tcp::RecvError::Finished) => Ok(0),
            Err(tcp::RecvError::InvalidState) => Err(StreamError::Reset),
        }
    }

    /// True when [`Core::stream_recv`] would not block (data, end of stream, reset or unknown).
    pub fn stream_readable(&self, id: StreamId) -> bool {
        match self.streams.get(&id) {
            Some(s) => {
                let socket = self.sockets.get::<tcp::Socket>(s.handle);
                socket.can_recv() || !socket.may_recv()
            }
            None => true,
        }
    }

    /// True when [`Core::stream_send`] would not block (room, or the stream cannot send).
    pub fn stream_writable(&self, id: StreamId) -> bool {
        match self.streams.get(&id) {
            Some(s) => {
                let socket = self.sockets.get::<tcp::Socket>(s.handle);
                socket.can_send() || !socket.may_send()
            }
            None => true,
        }
    }

    /// Bytes queued for sending and not yet acknowledged.
    pub fn stream_send_queue(&self, id: StreamId) -> usize {
        self.streams
            .get(&id)
            .map(|s| self.sockets.get::<tcp::Socket>(s.handle).send_queue())
            .unwrap_or(0)
    }

    /// Sends FIN after the queued data; reading stays possible.
    pub fn stream_close(&mut self, id: StreamId) {
        if let Ok(socket) = self.socket(id) {
            socket.close();
            self.needs_poll = true;
        }
    }

    /// Resets the connection (RST) and releases the stream.
    pub fn stream_abort(&mut self, id: StreamId, now: Instant) {
        if let Ok(socket) = self.socket(id) {
            socket.abort();
            self.needs_poll = true;
        }
        self.stream_release(id, now);
    }

    /// The owner is done with the stream: it is closed gracefully (FIN after the queued data),
    /// removed once closed, and reset if it has not closed within a minute.
    pub fn stream_release(&mut self, id: StreamId, now: Instant) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.released.is_none() {
            s.released = Some(now);
        }
        let socket = self.sockets.get_mut::<tcp::Socket>(s.handle);
        socket.close();
        if is_finished(socket) {
            self.remove_stream(id);
        }
        self.needs_poll = true;
    }

    /// Number of streams (of any phase) currently held.
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }
}

/// Whether a released socket may be dropped: closed with nothing left to send (an aborted socket
/// keeps its remote endpoint until its RST has gone out), or in TIME-WAIT.
fn is_finished(socket: &tcp::Socket<'_>) -> bool {
    match socket.state() {
        tcp::State::Closed => socket.remote_endpoint().is_none(),
        tcp::State::TimeWait => true,
        _ => false,
    }
}

/// The responder side of liveness: a peer without persistent keepalive answers a keepalive
/// (at most every `KEEPALIVE_ANSWER_INTERVAL`), so that the dialing side can tell a live peer from
/// one that restarted and lost the session (see [`probe_silent_peer`]).
fn answer_keepalive(
    peer: &mut Peer,
    from: SocketAddr,
    now: Instant,
    control: &mut ControlQueue,
    buf: &mut [u8],
) {
    if peer.keepalive.is_some()
        || peer
            .last_probe
            .is_some_and(|t| now.saturating_duration_since(t) < KEEPALIVE_ANSWER_INTERVAL)
    {
        return;
    }
    peer.last_probe = Some(now);
    match peer.tunn.encapsulate(&[], buf) {
        TunnResult::WriteToNetwork(packet) => control.push_back((from, packet.to_vec())),
        TunnResult::Done => {}
        TunnResult::Err(e) => trace!(?e, "cannot answer keepalive"),
        TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
    }
}

/// The dialing side of liveness: a peer with persistent keepalive that has heard nothing
/// authenticated for two keepalive intervals (plus slack) starts a new handshake. This recovers
/// within about a minute when the other side restarted and lost the session; boringtun alone
/// would wait for the session to expire (up to 180 s) when no data flows.
fn probe_silent_peer(peer: &mut Peer, now: Instant, control: &mut ControlQueue, buf: &mut [u8]) {
    let (Some(k), Some(endpoint), Some(last_rx)) = (peer.keepalive, peer.endpoint, peer.last_rx)
    else {
        return;
    };
    let silence = Duration::from_secs(2 * u64::from(k)) + KEEPALIVE_ANSWER_INTERVAL;
    let since_rx = now.saturating_duration_since(last_rx);
    let since_probe = peer
        .last_probe
        .map_or(Duration::MAX, |t| now.saturating_duration_since(t));
    if since_rx < silence || since_probe < silence {
        return;
    }
    peer.last_probe = Some(now);
    debug!(allowed_ip = %peer.allowed_ip, ?since_rx, "peer silent: new handshake");
    match peer.tunn.format_handshake_initiation(buf, false) {
        TunnResult::WriteToNetwork(packet) => control.push_back((endpoint, packet.to_vec())),
        TunnResult::Done => {}
        TunnResult::Err(e) => trace!(?e, "cannot start handshake"),
        TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
    }
}

/// Starts a handshake with `peer` and queues the initiation.
fn initiate(
    peer: &mut Peer,
    now: Instant,
    control: &mut ControlQueue,
    pool: &mut Vec<Vec<u8>>,
    next_fast: &mut Option<Instant>,
) {
    let Some(endpoint) = peer.endpoint else {
        return;
    };
    let mut buf = VirtualDevice::take_buf(pool);
    match peer.tunn.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(packet) => {
            control.push_back((endpoint, packet.to_vec()));
            note_initiation(peer, now, next_fast);
        }
        TunnResult::Done => {}
        TunnResult::Err(e) => trace!(?e, "cannot start handshake"),
        TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
    }
    VirtualDevice::recycle(pool, buf);
    let _ = peer.index;
}

/// The 24-bit index a peer's key maps to (before collisions are resolved): the top bits of a
/// 64-bit FNV-1a hash of the key, mixed by the SplitMix64 finalizer. Fixed here rather than
/// taken from `std`, whose hasher may change between Rust versions: the index must be the same
/// in every build, or a restart after an upgrade could not recognize stale sessions.
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
    (h >> 40) as u32 & INDEX_MASK
}

/// Whether the peer has a current session young enough to be used.
fn has_session(tunn: &Tunn) -> bool {
    tunn.time_since_last_handshake()
        .is_some_and(|age| age < REJECT_AFTER_TIME)
}

/// Records that a handshake initiation went out to `peer`: if the peer has no session and no
/// fast resend schedule, this starts one (see [`FAST_RETRY`]).
fn note_initiation(peer: &mut Peer, now: Instant, next_fast: &mut Option<Instant>) {
    if peer.fast_retry.is_some() || has_session(&peer.tunn) {
        return;
    }
    let at = now + FAST_RETRY[0];
    peer.fast_retry = Some(FastRetry {
        next: Some(at),
        sent: 0,
    });
    *next_fast = Some(next_fast.map_or(at, |n| n.min(at)));
}

/// [`note_initiation`] if any of the datagrams `queued` for `peer` is a handshake initiation.
fn note_initiations_in<'a>(
    peer: &mut Peer,
    mut queued: impl Iterator<Item = &'a (SocketAddr, Vec<u8>)>,
    now: Instant,
    next_fast: &mut Option<Instant>,
) {
    if queued.any(|(_, packet)| packet.first() == Some(&1)) {
        note_initiation(peer, now, next_fast);
    }
}

/// The "stateless reset" of WireGuard: `peer` sent transport data (from `from`) that we cannot
/// open, most likely because this process restarted and the peer still uses a session with the
/// previous one. If the peer has no working session, start a fresh handshake towards `from`, at
/// most once per [`RESET_PROBE_INTERVAL`] per peer and [`RESET_PROBES_PER_SECOND`] in all.
///
/// The packet is not authenticated, so it never changes the peer's endpoint: the initiation goes
/// to `from` only (resends go to the endpoint, if there is one), and the authenticated response
/// sets the endpoint as usual. Forged packets so cost at most one initiation per peer per second
/// and [`RESET_PROBES_PER_SECOND`] in all, and never disturb a working session.
fn reset_probe(
    peer: &mut Peer,
    from: SocketAddr,
    now: Instant,
    budget: &mut u32,
    next_fast: &mut Option<Instant>,
    control: &mut ControlQueue,
    buf: &mut [u8],
) {
    if peer
        .last_reset_probe
        .is_some_and(|t| now.saturating_duration_since(t) < RESET_PROBE_INTERVAL)
        || *budget >= RESET_PROBES_PER_SECOND
        || has_session(&peer.tunn)
    {
        return;
    }
    *budget += 1;
    peer.last_reset_probe = Some(now);
    debug!(allowed_ip = %peer.allowed_ip, %from, "data for an unknown session: new handshake");
    match peer.tunn.format_handshake_initiation(buf, true) {
        TunnResult::WriteToNetwork(packet) => {
            control.push_back((from, packet.to_vec()));
            note_initiation(peer, now, next_fast);
        }
        TunnResult::Err(e) => trace!(?e, "cannot start handshake"),
        TunnResult::Done | TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
    }
}

fn new_tcp_socket() -> tcp::Socket<'static> {
    let rx = tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]);
    let tx = tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]);
    let mut socket = tcp::Socket::new(rx, tx);
    socket.set_nagle_enabled(false);
    socket.set_ack_delay(None);
    // A peer that went away (agent killed, machine gone) must not leave connections that wait
    // forever: abort when sent data or a keep-alive probe gets no answer for TCP_SILENCE, and
    // probe idle connections so that pooled ones are found dead before they are reused.
    socket.set_timeout(Some(TCP_SILENCE.into()));
    socket.set_keep_alive(Some(TCP_KEEPALIVE.into()));
    socket.set_congestion_control(tcp::CongestionControl::Cubic);
    socket
}
