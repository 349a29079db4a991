//! Bodies with limits: a size cap and a progress timeout, enforced as the bytes stream through
//! (nothing is buffered). A body that goes over either ends with an error, and says which
//! ([`Tripped`]), so that the proxy can answer 413 or 408 instead of a generic 502.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::proxy::BoxError;

/// Which limit a [`Guarded`] body went over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Trip {
    /// More bytes than the size cap.
    #[error("the body is larger than the resource allows")]
    TooLarge,
    /// No bytes for longer than the progress timeout.
    #[error("the body made no progress in time")]
    Idle,
}

/// Tells whether (and why) a [`Guarded`] body was cut, and when it ended. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Tripped(Arc<State>);

#[derive(Debug, Default)]
struct State {
    trip: AtomicU8,
    ended: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl Tripped {
    /// The limit the body went over, if any.
    pub fn get(&self) -> Option<Trip> {
        match self.0.trip.load(Ordering::Acquire) {
            1 => Some(Trip::TooLarge),
            2 => Some(Trip::Idle),
            _ => None,
        }
    }

    fn set(&self, trip: Trip) {
        let v = match trip {
            Trip::TooLarge => 1,
            Trip::Idle => 2,
        };
        let _ = self
            .0
            .trip
            .compare_exchange(0, v, Ordering::AcqRel, Ordering::Acquire);
        self.end();
    }

    fn end(&self) {
        if !self.0.ended.swap(true, Ordering::AcqRel) {
            self.0.notify.notify_waiters();
        }
    }

    /// Whether the body has ended (read to its end, failed or cut).
    pub fn is_ended(&self) -> bool {
        self.0.ended.load(Ordering::Acquire)
    }

    /// Resolves once the body has ended (at once if it has).
    pub async fn ended(&self) {
        loop {
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_ended() {
                return;
            }
            notified.await;
        }
    }
}

/// A body held to a size cap and a progress timeout (either optional).
pub struct Guarded<B> {
    inner: B,
    remaining: Option<u64>,
    idle: Option<Duration>,
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the last poll found nothing: the timer runs only while the body waits for its
    /// sender, never while the reader is not asking (backpressure is not the sender's fault).
    waiting: bool,
    tripped: Tripped,
    done: bool,
}

impl<B> std::fmt::Debug for Guarded<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("remaining", &self.remaining)
            .field("idle", &self.idle)
            .finish_non_exhaustive()
    }
}

impl<B: Body> Guarded<B> {
    /// `inner`, cut after `max_bytes` bytes or after `idle` without a frame.
    pub fn new(inner: B, max_bytes: Option<u64>, idle: Option<Duration>) -> (Self, Tripped) {
        let tripped = Tripped::default();
        if inner.is_end_stream() {
            tripped.end();
        }
        (
            Guarded {
                inner,
                remaining: max_bytes,
                idle,
                timer: None,
                waiting: false,
                tripped: tripped.clone(),
                done: false,
            },
            tripped,
        )
    }
}

impl<B> Guarded<B> {
    fn trip(&mut self, trip: Trip) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.tripped.set(trip);
        self.done = true;
        Poll::Ready(Some(Err(Box::new(trip))))
    }
}

impl<B> Body for Guarded<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(remaining)) = (frame.data_ref(), this.remaining.as_mut()) {
                    let n = data.len() as u64;
                    if n > *remaining {
                        return this.trip(Trip::TooLarge);
                    }
                    *remaining -= n;
                }
                this.waiting = false;
                if this.inner.is_end_stream() {
                    this.tripped.end();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.done = true;
                this.tripped.end();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.done = true;
                this.tripped.end();
                Poll::Ready(None)
            }
            Poll::Pending => {
                let Some(idle) = this.idle else {
                    return Poll::Pending;
                };
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                if !this.waiting {
                    this.waiting = true;
                    timer.as_mut().reset(Instant::now() + idle);
                }
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => this.trip(Trip::Idle),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt as _, StreamBody};

    /// A body whose sender sends each part `delay_ms` after the one before, whether or not
    /// the reader asks.
    fn chunks(
        parts: Vec<(u64, &'static [u8])>,
    ) -> http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            for (delay_ms, bytes) in parts {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                let _ = tx.send(Bytes::from_static(bytes)).await;
            }
        });
        let s = futures_util::stream::unfold(rx, |mut rx| async move {
            let b = rx.recv().await?;
            Some((Ok::<_, BoxError>(Frame::data(b)), rx))
        });
        StreamBody::new(s).boxed_unsync()
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_within_its_limits_passes_whole() {
        let (body, tripped) = Guarded::new(
            chunks(vec![(0, b"abc"), (900, b"def")]),
            Some(6),
            Some(Duration::from_secs(1)),
        );
        assert!(!tripped.is_ended());
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"abcdef");
        assert_eq!(tripped.get(), None);
        assert!(tripped.is_ended());
        tripped.ended().await;
        let (_, empty) = Guarded::new(http_body_util::Empty::<Bytes>::new(), None, None);
        assert!(
            empty.is_ended(),
            "a body with nothing to send has ended from the start"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_byte_too_many_is_cut() {
        let (body, tripped) = Guarded::new(chunks(vec![(0, b"abc"), (0, b"defg")]), Some(6), None);
        let err = body.collect().await.err().unwrap();
        assert_eq!(err.to_string(), Trip::TooLarge.to_string());
        assert_eq!(tripped.get(), Some(Trip::TooLarge));
    }

    #[tokio::test(start_paused = true)]
    async fn silence_longer_than_the_timeout_is_cut_and_progress_resets_it() {
        // Three gaps of 900 ms pass a 1 s timeout; a gap of 1.1 s does not.
        let (body, tripped) = Guarded::new(
            chunks(vec![(900, b"a"), (900, b"b"), (900, b"c"), (1100, b"d")]),
            None,
            Some(Duration::from_secs(1)),
        );
        let started = Instant::now();
        let mut body = body;
        let mut seen = Vec::new();
        let err = loop {
            match body.frame().await {
                Some(Ok(f)) => seen.extend_from_slice(f.data_ref().unwrap()),
                Some(Err(e)) => break e,
                None => panic!("ended without the timeout"),
            }
        };
        assert_eq!(seen, b"abc");
        assert_eq!(err.to_string(), Trip::Idle.to_string());
        assert_eq!(tripped.get(), Some(Trip::Idle));
        assert_eq!(started.elapsed(), Duration::from_millis(3700));
        assert!(body.frame().await.is_none(), "a cut body stays ended");
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_reader_does_not_ask_does_not_count() {
        let (mut body, tripped) = Guarded::new(
            chunks(vec![(500, b"a"), (5000, b"b"), (5400, b"c")]),
            None,
            Some(Duration::from_secs(1)),
        );
        assert!(body.frame().await.is_some());
        // The reader waits 10 s (backpressure) before it asks again; the sender's next frame
        // came after 5 s and waits for it; the one after comes 400 ms after the reader asks.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(body.frame().await.unwrap().is_ok());
        assert!(
            body.frame().await.unwrap().is_ok(),
            "400 ms of waiting: fine"
        );
        assert_eq!(tripped.get(), None);
    }
}
