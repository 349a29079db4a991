//! Idle HTTP/1.1 client connections to agents, each on its own tunnel stream, kept for the next
//! request to the same backend (agent, overlay port and resource).
//!
//! Opening a stream per request costs a QUIC stream set-up at both ends, a hop through the
//! tunnel driver, an HTTP handshake and two tasks; a kept stream costs none of that. It cannot go
//! stale: the stream names its resource, and the agent ends every stream of a resource whose
//! target changes or goes away, so a kept connection to an old target is closed, never used. A
//! request whose kept connection turns out closed before it was sent goes on a fresh stream.
//!
//! Must never: hand out a connection that is busy, keep one whose response body was not read to
//! its end, or keep more than [`MAX_IDLE_PER_BACKEND`] per backend or any longer than
//! [`IDLE_TIMEOUT`].

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;

use crate::proxy::RequestBody;
use crate::routing::Dial;

/// How long an idle connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per backend.
pub const MAX_IDLE_PER_BACKEND: usize = 1024;

struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

/// The idle connections, by backend.
#[derive(Default)]
pub struct IdleStreams {
    by_dial: Mutex<HashMap<Dial, Vec<Idle>>>,
}

impl std::fmt::Debug for IdleStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleStreams")
            .field("idle", &self.len())
            .finish()
    }
}

impl IdleStreams {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Dial, Vec<Idle>>> {
        self.by_dial.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used idle connection to `dial` that is still open, if any.
    pub fn take(&self, dial: &Dial, now: Instant) -> Option<SendRequest<RequestBody>> {
        let mut map = self.lock();
        let list = map.get_mut(dial)?;
        let mut found = None;
        while let Some(idle) = list.pop() {
            if !idle.sender.is_closed() && now.duration_since(idle.since) < IDLE_TIMEOUT {
                found = Some(idle.sender);
                break;
            }
        }
        if list.is_empty() {
            map.remove(dial);
        }
        found
    }

    /// Keeps `sender` for the next request to `dial` (dropped, and so closed, when full).
    pub fn put(&self, dial: Dial, sender: SendRequest<RequestBody>, now: Instant) {
        if sender.is_closed() {
            return;
        }
        let mut map = self.lock();
        let list = map.entry(dial).or_default();
        // The oldest are first: the ones past their time go.
        let expired = list
            .iter()
            .take_while(|i| now.duration_since(i.since) >= IDLE_TIMEOUT)
            .count();
        list.drain(..expired);
        if list.len() < MAX_IDLE_PER_BACKEND {
            list.push(Idle { sender, since: now });
        }
    }

    /// Closes the connections idle for [`IDLE_TIMEOUT`] or closed by the agent.
    pub fn sweep(&self, now: Instant) {
        self.lock().retain(|_, list| {
            list.retain(|i| !i.sender.is_closed() && now.duration_since(i.since) < IDLE_TIMEOUT);
            !list.is_empty()
        });
    }

    /// Idle connections held.
    pub fn len(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A response body that gives its connection back to the idle set once it has been read to its
/// end; dropped before that, the connection is closed with it.
pub struct GiveBack {
    inner: Incoming,
    back: Option<(SendRequest<RequestBody>, Dial, Arc<IdleStreams>)>,
}

impl std::fmt::Debug for GiveBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GiveBack")
            .field("kept", &self.back.is_some())
            .finish_non_exhaustive()
    }
}

impl GiveBack {
    /// `inner`, whose connection `sender` goes back to `idle` under `dial` at its end.
    pub fn new(
        inner: Incoming,
        sender: SendRequest<RequestBody>,
        dial: Dial,
        idle: Arc<IdleStreams>,
    ) -> Self {
        GiveBack {
            inner,
            back: Some((sender, dial, idle)),
        }
    }

    /// `inner`, whose connection closes with it.
    pub fn closing(inner: Incoming) -> Self {
        GiveBack { inner, back: None }
    }

    fn give_back(&mut self) {
        if let Some((sender, dial, idle)) = self.back.take() {
            idle.put(dial, sender, Instant::now());
        }
    }
}

impl Body for GiveBack {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for GiveBack {
    fn drop(&mut self) {
        // A body that was never polled because it is empty (HEAD, 204, 304) is at its end too.
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use hyper_util::rt::TokioIo;
    use kakuremichi_proto::StreamKind;

    use super::*;

    /// A client connection on an in-memory pipe, and the pipe's far end (dropping it closes the
    /// connection).
    async fn connection() -> (SendRequest<RequestBody>, tokio::io::DuplexStream) {
        let (near, far) = tokio::io::duplex(1024);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(near))
            .await
            .unwrap();
        tokio::spawn(conn);
        (sender, far)
    }

    fn dial(port: u16) -> Dial {
        Dial {
            resource_id: uuid::Uuid::from_u128(1),
            addr: SocketAddrV4::new(Ipv4Addr::new(100, 64, 0, 2), port),
            kind: StreamKind::Http,
        }
    }

    #[tokio::test]
    async fn kept_connections_are_per_backend_expire_and_closed_ones_are_never_handed_out() {
        let idle = IdleStreams::default();
        let t0 = Instant::now();
        let (a, _a_far) = connection().await;
        let (b, b_far) = connection().await;
        idle.put(dial(1), a, t0);
        idle.put(dial(1), b, t0);
        assert_eq!(idle.len(), 2);
        assert!(
            idle.take(&dial(2), t0).is_none(),
            "another backend's connection"
        );

        // The one whose far end went away is closed: it is passed over.
        drop(b_far);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let got = idle.take(&dial(1), t0).expect("the open one");
        assert!(!got.is_closed());
        assert!(idle.is_empty());

        // Kept past the idle timeout: gone, by take and by sweep alike.
        idle.put(dial(1), got, t0);
        assert!(idle.take(&dial(1), t0 + IDLE_TIMEOUT).is_none());
        let (c, _c_far) = connection().await;
        idle.put(dial(1), c, t0);
        idle.sweep(t0 + IDLE_TIMEOUT - Duration::from_secs(1));
        assert_eq!(idle.len(), 1);
        idle.sweep(t0 + IDLE_TIMEOUT);
        assert!(idle.is_empty());
    }

    #[tokio::test]
    async fn at_most_the_cap_is_kept_per_backend() {
        let idle = IdleStreams::default();
        let now = Instant::now();
        let mut fars = Vec::new();
        for _ in 0..MAX_IDLE_PER_BACKEND + 5 {
            let (s, far) = connection().await;
            fars.push(far);
            idle.put(dial(1), s, now);
        }
        assert_eq!(idle.len(), MAX_IDLE_PER_BACKEND);
    }
}
