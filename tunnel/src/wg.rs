//! The WireGuard side of the tunnel: one boringtun `Tunn` per peer, found by session index, by
//! public key and by allowed IP, with the timers that keep sessions alive and bring them back
//! after a restart.
//!
//! [`Peers`] is sans-IO: it turns outer UDP datagrams into inner IP packets and back, and queues
//! handshakes, cookies and keepalives for [`Peers::poll_control`]. It must never read the clock:
//! every method that needs time takes `now`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use tracing::{debug, trace};

use crate::{PeerSpec, PeerStats, Transmit};

/// Largest outer datagram accepted; larger ones cannot be ours (inner MTU at most 1920).
pub(crate) const MAX_OUTER: usize = 2048 - 64;
/// What WireGuard adds to an inner packet: header (16) and tag (16).
pub(crate) const OVERHEAD: usize = 32;
/// Smallest buffer boringtun writes a handshake into.
const MIN_HANDSHAKE_BUF: usize = 148;

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

/// The four WireGuard messages, by the type byte that starts each one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MessageType {
    /// The initiator's first handshake message.
    HandshakeInitiation,
    /// The responder's handshake message.
    HandshakeResponse,
    /// A cookie, sent instead of a response when under load.
    CookieReply,
    /// Encrypted data (an inner packet, or nothing: a keepalive).
    TransportData,
}

impl MessageType {
    /// The type of the message `datagram` holds, if it is one of the four.
    pub(crate) fn of(datagram: &[u8]) -> Option<MessageType> {
        match datagram.first()? {
            1 => Some(MessageType::HandshakeInitiation),
            2 => Some(MessageType::HandshakeResponse),
            3 => Some(MessageType::CookieReply),
            4 => Some(MessageType::TransportData),
            _ => None,
        }
    }
}

struct Peer {
    public_key: [u8; 32],
    tunn: Tunn,
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

/// The WireGuard peers of one node. See the module documentation.
pub(crate) struct Peers {
    private: StaticSecret,
    public: PublicKey,
    rate_limiter: Arc<RateLimiter>,
    peers: HashMap<u32, Peer>,
    by_key: HashMap<[u8; 32], u32>,
    by_ip: HashMap<Ipv4Addr, u32>,
    control: ControlQueue,
    /// The earliest [`FastRetry::next`] of all peers.
    next_fast_retry: Option<Instant>,
    /// Reset probes (handshakes started for unknown sessions) in the current second.
    reset_probes: u32,
    next_tick: Instant,
    next_rate_reset: Instant,
    scratch: Vec<u8>,
}

impl Peers {
    pub(crate) fn new(private_key: [u8; 32], now: Instant) -> Peers {
        let private = StaticSecret::from(private_key);
        let public = PublicKey::from(&private);
        Peers {
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            private,
            public,
            peers: HashMap::new(),
            by_key: HashMap::new(),
            by_ip: HashMap::new(),
            control: VecDeque::new(),
            next_fast_retry: None,
            reset_probes: 0,
            next_tick: now,
            next_rate_reset: now + Duration::from_secs(1),
            scratch: vec![0; MAX_OUTER + 64],
        }
    }

    pub(crate) fn public_key(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    /// Replaces the whole peer set (see [`crate::Core::set_peers`]). Returns the overlay
    /// addresses that no longer route to the peer they routed to (removed peers, changed allowed
    /// IPs): whatever ran over them must end.
    pub(crate) fn set_peers(&mut self, specs: Vec<PeerSpec>, now: Instant) -> Vec<Ipv4Addr> {
        // Key order, so that index collisions resolve the same way in every process.
        let wanted: BTreeMap<[u8; 32], PeerSpec> =
            specs.into_iter().map(|s| (s.public_key, s)).collect();
        let mut gone = Vec::new();
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
                gone.push(peer.allowed_ip);
            }
        }
        for (key, spec) in wanted {
            match self.by_key.get(&key).copied() {
                Some(index) => {
                    if let Some(old_ip) = self.update_peer(index, spec, now) {
                        gone.push(old_ip);
                    }
                }
                None => self.add_peer(spec, now),
            }
        }
        gone
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
                &mut self.scratch,
                &mut self.next_fast_retry,
            );
        }
        self.by_key.insert(spec.public_key, index);
        self.by_ip.insert(spec.allowed_ip, index);
        self.peers.insert(index, peer);
    }

    /// Updates a peer in place; returns its previous allowed IP if that changed.
    fn update_peer(&mut self, index: u32, spec: PeerSpec, now: Instant) -> Option<Ipv4Addr> {
        let new_tunn = match self.peers.get(&index) {
            Some(p) if p.keepalive != spec.persistent_keepalive => {
                Some(self.new_tunn(&spec.public_key, spec.persistent_keepalive, index))
            }
            Some(_) => None,
            None => return None,
        };
        let peer = self.peers.get_mut(&index)?;
        let mut moved = None;
        if peer.allowed_ip != spec.allowed_ip {
            if self.by_ip.get(&peer.allowed_ip) == Some(&index) {
                self.by_ip.remove(&peer.allowed_ip);
            }
            moved = Some(peer.allowed_ip);
            peer.allowed_ip = spec.allowed_ip;
            self.by_ip.insert(spec.allowed_ip, index);
        }
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
                    &mut self.scratch,
                    &mut self.next_fast_retry,
                );
            }
        }
        moved
    }

    /// Whether a peer has `ip` as its allowed IP.
    pub(crate) fn routes_to(&self, ip: Ipv4Addr) -> bool {
        self.by_ip.contains_key(&ip)
    }

    /// Counters of every peer.
    pub(crate) fn peer_stats(&self) -> Vec<PeerStats> {
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

    /// Handles one outer UDP datagram from `from`. An inner packet from a peer is decrypted into
    /// `out` (at least [`MAX_OUTER`] bytes); returns the peer's allowed IP and the packet's length.
    /// Anything malformed, unauthenticated, from an unknown peer or with a source address the
    /// peer may not use is dropped silently. Handshake answers go to the control queue.
    pub(crate) fn handle_datagram(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        out: &mut [u8],
    ) -> Option<(Ipv4Addr, usize)> {
        if datagram.len() > MAX_OUTER || out.len() < MAX_OUTER {
            trace!(%from, len = datagram.len(), "oversized datagram dropped");
            return None;
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
                            return None;
                        }
                    },
                    Err(e) => {
                        trace!(%from, ?e, "bad handshake initiation dropped");
                        return None;
                    }
                }
            }
            Ok(Packet::HandshakeResponse(p)) => p.receiver_idx >> 8,
            Ok(Packet::PacketCookieReply(p)) => p.receiver_idx >> 8,
            Ok(Packet::PacketData(p)) => p.receiver_idx >> 8,
            Err(TunnResult::WriteToNetwork(reply)) => {
                trace!(%from, "under load: cookie reply");
                self.control.push_back((from, reply.to_vec()));
                return None;
            }
            Err(TunnResult::Err(e)) => {
                trace!(%from, ?e, "invalid datagram dropped");
                return None;
            }
            Err(TunnResult::Done)
            | Err(TunnResult::WriteToTunnelV4(..))
            | Err(TunnResult::WriteToTunnelV6(..)) => return None,
        };
        let Some(peer) = self.peers.get_mut(&index) else {
            trace!(%from, index, "datagram for unknown index dropped");
            return None;
        };
        let is_data = MessageType::of(datagram) == Some(MessageType::TransportData);
        let mut input = datagram;
        let mut delivered: Option<usize> = None;
        let mut authenticated = false;
        let mut unknown_session = false;
        let mut keepalive = false;
        loop {
            match peer.tunn.decapsulate(Some(from.ip()), input, out) {
                TunnResult::Done => {
                    if !input.is_empty() {
                        // A keepalive or a cookie reply, both authenticated.
                        authenticated = true;
                        keepalive = is_data;
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
                            unknown_session = is_data;
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
            if peer.endpoint != Some(from) {
                debug!(allowed_ip = %peer.allowed_ip, endpoint = %from, "peer endpoint updated");
                peer.endpoint = Some(from);
            }
        }
        if keepalive {
            answer_keepalive(peer, from, now, &mut self.control, &mut self.scratch);
        }
        if unknown_session {
            reset_probe(
                peer,
                from,
                now,
                &mut self.reset_probes,
                &mut self.next_fast_retry,
                &mut self.control,
                &mut self.scratch,
            );
        }
        delivered.map(|len| (peer.allowed_ip, len))
    }

    /// Whether datagrams wait in the control queue.
    pub(crate) fn has_control(&self) -> bool {
        !self.control.is_empty()
    }

    /// The next queued handshake, cookie or keepalive, written into `buf`.
    pub(crate) fn poll_control(&mut self, buf: &mut [u8]) -> Option<Transmit> {
        while let Some((dst, packet)) = self.control.pop_front() {
            if let Some(slot) = buf.get_mut(..packet.len()) {
                slot.copy_from_slice(&packet);
                return Some(Transmit {
                    dst,
                    len: packet.len(),
                });
            }
        }
        None
    }

    /// Encrypts the inner `packet` for the peer whose allowed IP is `dst` into `buf` (at least
    /// `packet.len()` + [`OVERHEAD`] bytes). Without a session, boringtun queues the packet and
    /// writes a handshake initiation instead. `None` when nothing is to be sent.
    pub(crate) fn encapsulate(
        &mut self,
        dst: Ipv4Addr,
        packet: &[u8],
        buf: &mut [u8],
        now: Instant,
    ) -> Option<Transmit> {
        let Some(peer) = self.by_ip.get(&dst).and_then(|i| self.peers.get_mut(i)) else {
            trace!(%dst, "no peer for destination");
            return None;
        };
        if buf.len() < packet.len() + OVERHEAD || buf.len() < MIN_HANDSHAKE_BUF {
            return None;
        }
        match peer.tunn.encapsulate(packet, buf) {
            TunnResult::WriteToNetwork(out) => match peer.endpoint {
                Some(endpoint) => {
                    if MessageType::of(out) == Some(MessageType::HandshakeInitiation) {
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

    /// When [`Peers::handle_timeout`] should run next.
    pub(crate) fn poll_timeout(&self) -> Instant {
        let t = self.next_tick.min(self.next_rate_reset);
        match self.next_fast_retry {
            Some(at) => t.min(at),
            None => t,
        }
    }

    /// Runs boringtun's timers, liveness probes and fast handshake resends that are due.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if now >= self.next_rate_reset {
            self.rate_limiter.reset_count();
            self.reset_probes = 0;
            self.next_rate_reset = now + Duration::from_secs(1);
        }
        if now >= self.next_tick {
            self.next_tick = now + WG_TICK;
            let buf = &mut self.scratch;
            for peer in self.peers.values_mut() {
                let queued = self.control.len();
                match peer.tunn.update_timers(buf) {
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
                probe_silent_peer(peer, now, &mut self.control, buf);
                if peer.fast_retry.is_some() && has_session(&peer.tunn) {
                    peer.fast_retry = None;
                }
                let initiated = self
                    .control
                    .range(queued..)
                    .any(|(_, p)| MessageType::of(p) == Some(MessageType::HandshakeInitiation));
                if initiated {
                    note_initiation(peer, now, &mut self.next_fast_retry);
                }
            }
        }
        if self.next_fast_retry.is_some_and(|at| now >= at) {
            self.run_fast_retries(now);
        }
    }

    /// Resends due initiations of handshakes that have not got a session yet.
    fn run_fast_retries(&mut self, now: Instant) {
        let mut next: Option<Instant> = None;
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
            match peer
                .tunn
                .format_handshake_initiation(&mut self.scratch, true)
            {
                TunnResult::WriteToNetwork(packet) => {
                    self.control.push_back((endpoint, packet.to_vec()))
                }
                TunnResult::Err(e) => trace!(?e, "cannot resend handshake"),
                TunnResult::Done
                | TunnResult::WriteToTunnelV4(..)
                | TunnResult::WriteToTunnelV6(..) => {}
            }
        }
        self.next_fast_retry = next;
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
    buf: &mut [u8],
    next_fast: &mut Option<Instant>,
) {
    let Some(endpoint) = peer.endpoint else {
        return;
    };
    match peer.tunn.format_handshake_initiation(buf, false) {
        TunnResult::WriteToNetwork(packet) => {
            control.push_back((endpoint, packet.to_vec()));
            note_initiation(peer, now, next_fast);
        }
        TunnResult::Done => {}
        TunnResult::Err(e) => trace!(?e, "cannot start handshake"),
        TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
    }
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
