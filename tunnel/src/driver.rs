//! The tokio shell around [`Core`]: one UDP socket, one driver task, async streams.
//!
//! The driver task receives datagrams in batches, runs the core's timers, and sends what the
//! core produces (outside the lock). Streams lock the core to copy straight into and out of the
//! QUIC stream buffers; the driver wakes exactly the streams the core reports ready.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, trace};

use crate::core::{
    ConnectError, ConnectFailure, Core, DatagramError, Event, StreamError, StreamId,
};
use crate::path::{PathEvent, PathSettings, PathWatch, Via};
use crate::udp::{BatchSocket, SendQueue};
use crate::{PeerSpec, PeerStats, TunnelConfig, TunnelError, MAX_DATAGRAM_SIZE};

/// Datagrams read before the core's output is sent.
const RECV_BUDGET: usize = 1024;
/// Datagrams collected under the lock before they are sent.
const SEND_BATCH: usize = 256;
/// Datagrams from relays waiting for the driver (all relays together); more are dropped, as a
/// full socket buffer drops them.
const RELAY_IN: usize = 4096;
/// Datagrams waiting to go out on one relay; more are dropped.
const RELAY_OUT: usize = 1024;

struct State {
    core: Core,
    read_wakers: HashMap<StreamId, Waker>,
    write_wakers: HashMap<StreamId, Waker>,
    datagram_wakers: HashMap<StreamId, Waker>,
    connects: HashMap<StreamId, oneshot::Sender<Result<(), ConnectFailure>>>,
    /// Destinations whose datagrams go over a relay instead of UDP, by relay id.
    relays: HashMap<SocketAddr, (u64, mpsc::Sender<Bytes>)>,
    /// Whether UDP reaches each destination (only once someone asked, see
    /// [`Tunnel::watch_paths`]).
    paths: Option<(PathWatch, mpsc::UnboundedSender<PathEvent>)>,
}

impl State {
    /// Detaches `dst`'s relay (if it is still relay `id`, when given).
    fn detach_relay(&mut self, dst: SocketAddr, id: Option<u64>, now: Instant) {
        if self
            .relays
            .get(&dst)
            .is_some_and(|(current, _)| id.is_none_or(|id| id == *current))
        {
            self.relays.remove(&dst);
            if let Some((paths, _)) = &mut self.paths {
                paths.handle_relay_detached(dst, now);
            }
            debug!(%dst, "relay detached");
        }
    }
}

struct Shared {
    state: Mutex<State>,
    notify: Notify,
    closed: AtomicBool,
    handles: AtomicUsize,
    local_addr: SocketAddr,
    relay_in: mpsc::Sender<(SocketAddr, Bytes)>,
    relay_ids: AtomicU64,
}

impl Shared {
    /// Runs `f` on the core and wakes the driver if the core now wants a poll.
    fn with_core<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut st = self.state.lock();
        let before = st.core.needs_poll();
        let r = f(&mut st);
        let after = st.core.needs_poll();
        drop(st);
        if after && !before {
            self.notify.notify_one();
        }
        r
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.notify.notify_one();
    }
}

/// Keeps the driver running while alive: one for all `Tunnel` clones, one for `Incoming`.
struct HandleGuard(Arc<Shared>);

impl Drop for HandleGuard {
    fn drop(&mut self) {
        if self.0.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.close();
        }
    }
}

/// A running tunnel endpoint: a cheap, cloneable handle to the driver task.
///
/// The driver stops on [`Tunnel::shutdown`] or when every handle and the [`Incoming`] are dropped.
#[derive(Clone)]
pub struct Tunnel {
    shared: Arc<Shared>,
    _guard: Arc<HandleGuard>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("local_addr", &self.shared.local_addr)
            .finish_non_exhaustive()
    }
}

/// Streams the peers open.
pub struct Incoming {
    /// Unbounded here because it is bounded already: each peer may hold at most
    /// `QuicSettings::max_streams` streams open, and QUIC makes it wait for more. A channel of its
    /// own size would reset streams that QUIC had admitted, whenever a burst outran the accept
    /// loop.
    rx: mpsc::UnboundedReceiver<TunnelStream>,
    _guard: HandleGuard,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming").finish_non_exhaustive()
    }
}

impl Incoming {
    /// The next inbound stream, or `None` once the tunnel has shut down.
    pub async fn accept(&mut self) -> Option<TunnelStream> {
        self.rx.recv().await
    }
}

impl Tunnel {
    /// Binds the UDP socket and starts the driver task (call inside a tokio runtime).
    pub async fn bind(config: TunnelConfig) -> Result<(Tunnel, Incoming), TunnelError> {
        let core = Core::new(&config, rand::random(), Instant::now())?;
        let socket = UdpSocket::bind(config.listen)
            .await
            .map_err(|source| TunnelError::Bind {
                addr: config.listen,
                source,
            })?;
        let local_addr = socket.local_addr().map_err(|source| TunnelError::Bind {
            addr: config.listen,
            source,
        })?;
        raise_buffers(&socket);
        let socket = BatchSocket::new(socket).map_err(|source| TunnelError::Bind {
            addr: config.listen,
            source,
        })?;
        let (relay_tx, relay_rx) = mpsc::channel(RELAY_IN);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                core,
                read_wakers: HashMap::new(),
                write_wakers: HashMap::new(),
                datagram_wakers: HashMap::new(),
                connects: HashMap::new(),
                relays: HashMap::new(),
                paths: None,
            }),
            notify: Notify::new(),
            closed: AtomicBool::new(false),
            handles: AtomicUsize::new(2),
            local_addr,
            relay_in: relay_tx,
            relay_ids: AtomicU64::new(1),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(shared.clone(), socket, relay_rx, tx));
        debug!(%local_addr, overlay = %config.overlay_address, "tunnel started");
        Ok((
            Tunnel {
                shared: shared.clone(),
                _guard: Arc::new(HandleGuard(shared.clone())),
            },
            Incoming {
                rx,
                _guard: HandleGuard(shared),
            },
        ))
    }

    /// The UDP address the tunnel receives on.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// Replaces the peer set (see [`Core::set_peers`]).
    pub fn set_peers(&self, peers: Vec<PeerSpec>) {
        self.shared
            .with_core(|st| st.core.set_peers(peers, Instant::now()));
        self.shared.notify.notify_one();
    }

    /// Opens a stream to the peer whose allowed IP is `remote`.
    ///
    /// Errors: `HostUnreachable` when no peer has that address, `TimedOut` when the peer has no
    /// QUIC connection within the open timeout, `ConnectionRefused` when the peer was removed
    /// meanwhile, `AddrNotAvailable` when the peer allows no more streams, `NotConnected` after
    /// shutdown.
    pub async fn connect(&self, remote: Ipv4Addr) -> io::Result<TunnelStream> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(shut_down());
        }
        let (tx, rx) = oneshot::channel();
        let id = self.shared.with_core(|st| {
            let id = st.core.connect(remote, Instant::now())?;
            st.connects.insert(id, tx);
            Ok::<_, ConnectError>(id)
        });
        let id = id.map_err(|e| match e {
            ConnectError::NoRoute(_) => io::Error::new(io::ErrorKind::HostUnreachable, e),
        })?;
        self.shared.notify.notify_one();
        match rx.await {
            Ok(Ok(())) => Ok(TunnelStream {
                shared: self.shared.clone(),
                id,
                peer: remote,
                released: false,
            }),
            Ok(Err(ConnectFailure::Refused)) => Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("{remote} was removed"),
            )),
            Ok(Err(ConnectFailure::TimedOut)) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{remote} has no connection"),
            )),
            Ok(Err(ConnectFailure::Exhausted)) => Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                format!("{remote} allows no more streams"),
            )),
            Err(_) => Err(shut_down()),
        }
    }

    /// Counters of every peer.
    pub fn peer_stats(&self) -> Vec<PeerStats> {
        self.shared.state.lock().core.peer_stats()
    }

    /// The peers with an established QUIC connection.
    pub fn connected_peers(&self) -> Vec<Ipv4Addr> {
        self.shared.state.lock().core.connected_peers()
    }

    /// Streams currently held.
    pub fn stream_count(&self) -> usize {
        self.shared.state.lock().core.stream_count()
    }

    /// Stops the driver task; streams fail afterwards.
    pub fn shutdown(&self) {
        self.shared.close();
    }

    /// Starts watching whether UDP reaches each destination (see [`crate::path`]) and returns
    /// the reports: `Blocked(dst)` when `dst` should be given a relay
    /// ([`Tunnel::attach_relay`]), `Restored(dst)` when UDP works again (the relay was detached
    /// already). Agents watch; gateways only take relays their peers open. Calling it again
    /// replaces the previous watch.
    pub fn watch_paths(&self, settings: PathSettings) -> mpsc::UnboundedReceiver<PathEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.shared.with_core(|st| {
            let mut watch = PathWatch::new(settings);
            let now = Instant::now();
            for dst in st.relays.keys() {
                watch.handle_relay_attached(*dst, now);
            }
            st.paths = Some((watch, tx));
        });
        self.shared.notify.notify_one();
        rx
    }

    /// Carries the datagrams for `dst` over a relay from now on, instead of UDP (replacing any
    /// relay `dst` had): the core's datagrams to `dst` come out of [`Relay::recv`], and what is
    /// given to [`Relay::send`] reaches the core as if it had come from `dst` over UDP.
    ///
    /// On an agent, `dst` is the gateway's UDP endpoint, so nothing above the driver notices.
    /// On a gateway, `dst` is an address no UDP datagram can come from (see
    /// [`relay_address`]): WireGuard authenticates the peer's packets and moves the peer's
    /// endpoint to it, exactly as when a peer roams.
    pub fn attach_relay(&self, dst: SocketAddr) -> Relay {
        let id = self.shared.relay_ids.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(RELAY_OUT);
        if self.shared.closed.load(Ordering::Acquire) {
            // Never carries anything: `recv` ends at once.
            drop(tx);
            return Relay {
                shared: self.shared.clone(),
                dst,
                id,
                rx,
            };
        }
        self.shared.with_core(|st| {
            st.relays.insert(dst, (id, tx));
            if let Some((paths, _)) = &mut st.paths {
                paths.handle_relay_attached(dst, Instant::now());
            }
        });
        debug!(%dst, id, "relay attached");
        Relay {
            shared: self.shared.clone(),
            dst,
            id,
            rx,
        }
    }
}

/// The address standing for relay number `n` on a gateway: in 100::/64, the IPv6 discard-only
/// prefix (RFC 6666), so no real datagram comes from it and nothing sent to it leaves the host.
pub fn relay_address(n: u64) -> SocketAddr {
    let ip =
        std::net::Ipv6Addr::from(0x0100_0000_0000_0000_0000_0000_0000_0000u128 | u128::from(n));
    SocketAddr::new(ip.into(), 1)
}

/// One destination's datagrams carried over something other than UDP (a WebSocket, for the
/// UDP-blocked fallback). Dropping it detaches it: UDP carries the datagrams again.
pub struct Relay {
    shared: Arc<Shared>,
    dst: SocketAddr,
    id: u64,
    rx: mpsc::Receiver<Bytes>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("dst", &self.dst)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// The destination this relay stands for.
    pub fn destination(&self) -> SocketAddr {
        self.dst
    }

    /// Hands a datagram that arrived over the relay to the tunnel, as if it came from the
    /// destination. Dropped (like a UDP datagram in a full socket buffer) when the driver is
    /// behind; `false` once the tunnel has shut down.
    pub fn send(&self, datagram: Bytes) -> bool {
        if self.shared.closed.load(Ordering::Acquire) {
            return false;
        }
        match self.shared.relay_in.try_send((self.dst, datagram)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                trace!(dst = %self.dst, "relay datagram dropped: driver busy");
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// The next datagram the tunnel sends to the destination; `None` once the relay was
    /// detached (UDP works again, or another relay replaced it) or the tunnel shut down.
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.rx.recv().await
    }

    /// The next datagram for the destination if one is waiting.
    pub fn try_recv(&mut self) -> Option<Bytes> {
        self.rx.try_recv().ok()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let (dst, id) = (self.dst, self.id);
        self.shared
            .with_core(|st| st.detach_relay(dst, Some(id), Instant::now()));
    }
}

/// UDP socket buffers to ask for; the kernel caps them at net.core.{r,w}mem_max.
const SOCKET_BUFFER: usize = 8 * 1024 * 1024;

/// Raises the socket's buffers so that bursts are not dropped, and says once if the system
/// allows less.
fn raise_buffers(socket: &UdpSocket) {
    use std::sync::atomic::AtomicBool;
    static WARNED: AtomicBool = AtomicBool::new(false);
    let sock = socket2::SockRef::from(socket);
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    let recv = sock.recv_buffer_size().unwrap_or(0);
    let send = sock.send_buffer_size().unwrap_or(0);
    // Linux reports twice what it grants (bookkeeping included).
    if (recv < SOCKET_BUFFER || send < SOCKET_BUFFER) && !WARNED.swap(true, Ordering::Relaxed) {
        tracing::info!(
            recv,
            send,
            wanted = SOCKET_BUFFER,
            "the system caps UDP socket buffers (net.core.rmem_max / wmem_max): bursts may be dropped"
        );
    }
}

fn shut_down() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "tunnel shut down")
}

/// The driver task.
async fn run(
    shared: Arc<Shared>,
    socket: BatchSocket,
    mut relay_rx: mpsc::Receiver<(SocketAddr, Bytes)>,
    accept_tx: mpsc::UnboundedSender<TunnelStream>,
) {
    let mut socket = socket;
    let mut queue = SendQueue::new(SEND_BATCH, MAX_DATAGRAM_SIZE, socket.max_segments());
    let mut accepted: Vec<TunnelStream> = Vec::new();
    // A datagram from a relay, taken while waiting.
    let mut pending_relay: Option<(SocketAddr, Bytes)> = None;
    let sleep = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(sleep);
    loop {
        if shared.closed.load(Ordering::Acquire) {
            break;
        }
        let deadline;
        {
            let mut st = shared.state.lock();
            let st = &mut *st;
            let now = Instant::now();
            let mut received = 0;
            while received < RECV_BUDGET {
                let State { core, paths, .. } = &mut *st;
                let n = socket.recv_batch(|from, d| {
                    if let Some((paths, _)) = paths {
                        paths.handle_udp_received(from, now);
                    }
                    core.handle_datagram(from, d, now);
                });
                if n == 0 {
                    break;
                }
                received += n;
            }
            if let Some((from, d)) = pending_relay.take() {
                st.core.handle_datagram(from, &d, now);
            }
            while received < 2 * RECV_BUDGET {
                let Ok((from, d)) = relay_rx.try_recv() else {
                    break;
                };
                st.core.handle_datagram(from, &d, now);
                received += 1;
            }
            if st.core.poll_timeout().is_some_and(|t| t <= now) {
                st.core.handle_timeout(now);
            }
            if let Some((paths, _)) = &mut st.paths {
                if paths.poll_timeout().is_some_and(|t| t <= now) {
                    paths.handle_timeout(now);
                }
            }
            while let Some(slot) = queue.slot() {
                let Some(t) = st.core.poll_transmit(now, slot) else {
                    break;
                };
                if st.relays.is_empty() && st.paths.is_none() {
                    queue.commit(t.dst, t.len);
                    continue;
                }
                let datagram = &slot[..t.len];
                let via = match &mut st.paths {
                    Some((paths, _)) => paths.route(t.dst, datagram, now),
                    None if st.relays.contains_key(&t.dst) => Via::Relay,
                    None => Via::Udp,
                };
                let relay = match via {
                    Via::Relay => st.relays.get(&t.dst),
                    Via::Udp => None,
                };
                match relay.map(|(id, tx)| (*id, tx.try_send(Bytes::copy_from_slice(datagram)))) {
                    None => queue.commit(t.dst, t.len),
                    Some((_, Ok(()))) => {}
                    Some((_, Err(mpsc::error::TrySendError::Full(_)))) => {
                        trace!(dst = %t.dst, "relay full: datagram dropped");
                    }
                    Some((id, Err(mpsc::error::TrySendError::Closed(_)))) => {
                        st.detach_relay(t.dst, Some(id), now);
                    }
                }
            }
            if let Some((paths, events)) = &mut st.paths {
                while let Some(event) = paths.poll_event() {
                    debug!(?event, "path");
                    if let PathEvent::Restored(dst) = event {
                        st.relays.remove(&dst);
                    }
                    let _ = events.send(event);
                }
            }
            while let Some(event) = st.core.poll_event() {
                match event {
                    Event::Accepted(id) => {
                        if let Some(peer) = st.core.stream_peer(id) {
                            accepted.push(TunnelStream {
                                shared: shared.clone(),
                                id,
                                peer,
                                released: false,
                            });
                        }
                    }
                    Event::Connected(id) => {
                        let delivered = st
                            .connects
                            .remove(&id)
                            .is_some_and(|tx| tx.send(Ok(())).is_ok());
                        if !delivered {
                            st.core.stream_abort(id);
                        }
                    }
                    Event::ConnectFailed(id, failure) => {
                        if let Some(tx) = st.connects.remove(&id) {
                            let _ = tx.send(Err(failure));
                        }
                    }
                }
            }
            while let Some(id) = st.core.poll_ready() {
                if let Some(w) = st.read_wakers.remove(&id) {
                    w.wake();
                }
                if let Some(w) = st.write_wakers.remove(&id) {
                    w.wake();
                }
                if let Some(w) = st.datagram_wakers.remove(&id) {
                    w.wake();
                }
            }
            deadline = match (
                st.core.poll_timeout(),
                st.paths.as_ref().and_then(|(p, _)| p.poll_timeout()),
            ) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        for stream in accepted.drain(..) {
            // A dropped `Incoming` drops (and so resets) the stream.
            let _ = accept_tx.send(stream);
        }
        let full = queue.slot().is_none();
        if !queue.is_empty() {
            socket.flush(&mut queue).await;
        }
        if full {
            continue;
        }
        let wake_at = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        sleep
            .as_mut()
            .reset(tokio::time::Instant::from_std(wake_at));
        tokio::select! {
            biased;
            _ = shared.notify.notified() => {}
            r = relay_rx.recv() => pending_relay = r,
            r = socket.socket().readable() => {
                if let Err(e) = r {
                    trace!(error = %e, "udp readiness error");
                }
            }
            _ = &mut sleep => {}
        }
    }
    shared.state.lock().relays.clear();
    // Fail everything still waiting.
    let mut st = shared.state.lock();
    st.connects.clear();
    for (_, w) in st.read_wakers.drain() {
        w.wake();
    }
    for (_, w) in st.write_wakers.drain() {
        w.wake();
    }
    for (_, w) in st.datagram_wakers.drain() {
        w.wake();
    }
    debug!(local_addr = %shared.local_addr, "tunnel stopped");
}

/// A stream through the tunnel (a QUIC bidirectional stream). Dropping it closes it
/// gracefully (FIN after queued data); [`TunnelStream::abort`] resets it.
pub struct TunnelStream {
    shared: Arc<Shared>,
    id: StreamId,
    peer: Ipv4Addr,
    released: bool,
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream")
            .field("id", &self.id)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl TunnelStream {
    /// The overlay address of the peer at the other end.
    pub fn peer(&self) -> Ipv4Addr {
        self.peer
    }

    /// Resets the stream both ways instead of closing it.
    pub fn abort(mut self) {
        self.released = true;
        let id = self.id;
        self.shared.with_core(|st| {
            st.read_wakers.remove(&id);
            st.write_wakers.remove(&id);
            if let Some(w) = st.datagram_wakers.remove(&id) {
                w.wake();
            }
            st.core.stream_abort(id);
        });
    }

    /// The stream's QUIC datagrams: a handle that outlives a split of the stream and fails
    /// once the stream is dropped.
    pub fn datagrams(&self) -> StreamDatagrams {
        StreamDatagrams {
            shared: self.shared.clone(),
            id: self.id,
        }
    }
}

/// QUIC datagrams tied to one [`TunnelStream`] (see [`Core::stream_send_datagram`]): what a
/// UDP flow sends when it must not wait behind lost packets.
#[derive(Clone)]
pub struct StreamDatagrams {
    shared: Arc<Shared>,
    id: StreamId,
}

impl std::fmt::Debug for StreamDatagrams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDatagrams")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl StreamDatagrams {
    /// Sends one datagram; `TooLarge` above [`StreamDatagrams::max_size`].
    pub fn send(&self, data: &[u8]) -> Result<(), DatagramError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(DatagramError::Stream(StreamError::Reset));
        }
        let id = self.id;
        self.shared
            .with_core(|st| st.core.stream_send_datagram(id, data))
    }

    /// The largest datagram [`StreamDatagrams::send`] takes now, if the peer takes any.
    pub fn max_size(&self) -> Option<usize> {
        let id = self.id;
        self.shared.state.lock().core.stream_max_datagram(id)
    }

    /// The next datagram received for the stream. Fails once the stream is dropped or reset,
    /// or the tunnel shuts down.
    pub async fn recv(&self) -> io::Result<bytes::Bytes> {
        std::future::poll_fn(|cx| {
            if self.shared.closed.load(Ordering::Acquire) {
                return Poll::Ready(Err(shut_down()));
            }
            let id = self.id;
            self.shared
                .with_core(|st| match st.core.stream_recv_datagram(id) {
                    Err(StreamError::WouldBlock) => {
                        st.datagram_wakers.insert(id, cx.waker().clone());
                        Poll::Pending
                    }
                    Ok(d) => Poll::Ready(Ok(d)),
                    Err(e) => Poll::Ready(Err(stream_error(e))),
                })
        })
        .await
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let id = self.id;
        self.shared.with_core(|st| {
            st.read_wakers.remove(&id);
            st.write_wakers.remove(&id);
            if let Some(w) = st.datagram_wakers.remove(&id) {
                w.wake();
            }
            st.core.stream_release(id);
        });
    }
}

/// The I/O error a stream operation's failure reads as.
fn stream_error(e: StreamError) -> io::Error {
    match e {
        StreamError::WouldBlock => io::ErrorKind::WouldBlock.into(),
        StreamError::Closed => io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"),
        StreamError::Reset => io::Error::new(io::ErrorKind::ConnectionReset, "connection reset"),
        StreamError::Unknown => io::Error::new(io::ErrorKind::NotConnected, "stream released"),
    }
}

impl TunnelStream {
    /// Runs `op` on this stream under the lock; when it would block, parks the task's waker in
    /// the slot `wakers` picks (read or write), to be woken when the stream's readiness changes.
    fn poll_op<T>(
        &self,
        cx: &Context<'_>,
        wakers: fn(&mut State) -> &mut HashMap<StreamId, Waker>,
        op: impl FnOnce(&mut Core, StreamId) -> Result<T, StreamError>,
    ) -> Poll<Result<T, StreamError>> {
        let id = self.id;
        self.shared.with_core(|st| match op(&mut st.core, id) {
            Err(StreamError::WouldBlock) => {
                wakers(st).insert(id, cx.waker().clone());
                Poll::Pending
            }
            result => Poll::Ready(result),
        })
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Poll::Ready(Err(shut_down()));
        }
        let read = self.poll_op(
            cx,
            |st| &mut st.read_wakers,
            // Copied straight into the unfilled part: no zeroing of the caller's buffer first.
            |core, id| core.stream_recv_with(id, buf.remaining(), |chunk| buf.put_slice(chunk)),
        );
        match read {
            Poll::Ready(Ok(_)) => Poll::Ready(Ok(())),
            // The peer closed in order: end of stream.
            Poll::Ready(Err(StreamError::Closed)) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(stream_error(e))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Poll::Ready(Err(shut_down()));
        }
        self.poll_op(
            cx,
            |st| &mut st.write_wakers,
            |core, id| core.stream_send(id, data),
        )
        .map_err(stream_error)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let id = self.id;
        self.shared.with_core(|st| st.core.stream_close(id));
        Poll::Ready(Ok(()))
    }
}
