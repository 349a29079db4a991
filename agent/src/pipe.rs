//! The agent's HTTP pipe: an HTTP stream from a gateway passed to a kernel TCP connection to its
//! target byte for byte, with no HTTP parse and encode of its own.
//!
//! The gateway already sends each request shaped for the app (its own `Host`, the forwarding
//! headers) and reads each response with its own HTTP/1.1 client, so the agent only copies.
//! [`Exchange`] frames the bytes as they pass, for three things:
//! - each final response is counted by status class and timed from its request;
//! - a target that closes its connection between exchanges (its keep-alive timeout) is dialed
//!   again when the next request comes, and the gateway's kept stream goes on;
//! - a target that closes in the middle of a response cuts the stream, so the gateway sees an
//!   error, not a short body.
//!
//! The target is dialed when the first bytes of a request arrive; if it cannot be reached, the
//! agent answers that request with its own 502 marked with [`AGENT_ERROR_HEADER`], so the
//! gateway tries another target or shows its page.
//!
//! Copy buffers start small and double while reads fill them, up to [`MAX_BUFFER`]: a small
//! request costs [`MIN_BUFFER`] a way, a large download gets large reads.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use kakuremichi_proto::AGENT_ERROR_HEADER;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};

use crate::http1::{Eof, Exchange, Response};

/// A copy buffer's first size.
pub const MIN_BUFFER: usize = 8 * 1024;
/// A copy buffer's largest size.
pub const MAX_BUFFER: usize = 256 * 1024;

/// What the pipe tells its owner as it goes.
pub trait PipeHooks {
    /// The target was dialed: `Ok`, or why not (the request is answered with the agent's 502).
    fn dialed(&self, result: Result<(), &io::Error>);
    /// A final response from the target passed.
    fn response(&self, response: Response);
}

/// How a pipe ended.
#[derive(Debug)]
pub enum Outcome {
    /// In order: the gateway closed its side (and the target answered all it was sent), or a
    /// response ended with its connection, or the target could not be dialed (answered).
    Done,
    /// The target closed in the middle of an exchange: the stream should be reset.
    Cut,
    /// Reading or writing failed on either side: the stream should be reset.
    Failed(io::Error),
}

/// A copy failed reading or writing.
enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// One direction's buffer: bytes read and not yet written are `buf[start..end]`.
struct Half {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Its reader ended.
    eof: bool,
    /// Its writer is shut down (after `eof`, once all was written) or closed by its peer.
    shut: bool,
}

impl Half {
    fn new() -> Self {
        Half {
            buf: Vec::new(),
            start: 0,
            end: 0,
            eof: false,
            shut: false,
        }
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Reads once into the empty buffer; the bytes read (0 at the end) are passed to `seen`.
    fn poll_fill<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        seen: impl FnOnce(&[u8]),
    ) -> Poll<io::Result<usize>> {
        debug_assert!(self.is_empty());
        if self.buf.is_empty() {
            self.buf = vec![0; MIN_BUFFER];
        }
        let mut rb = ReadBuf::new(&mut self.buf);
        ready!(Pin::new(reader).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        if n == 0 {
            self.eof = true;
        } else {
            seen(&self.buf[..n]);
        }
        self.start = 0;
        self.end = n;
        Poll::Ready(Ok(n))
    }

    /// Copies from `reader` to `writer` until the reader ends and all is written (then
    /// `Ready(Ok)`, the writer not shut down), an error, or both would block.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        mut seen: impl FnMut(&[u8]),
    ) -> Poll<Result<(), CopyError>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.is_empty() {
                if self.eof {
                    return Poll::Ready(Ok(()));
                }
                // A full read asks for a larger buffer next time (the old one is written out
                // first, so it is only replaced while empty).
                if self.end == self.buf.len() && self.end > 0 && self.buf.len() < MAX_BUFFER {
                    self.buf = vec![0; self.buf.len() * 2];
                }
                ready!(self.poll_fill(cx, reader, &mut seen)).map_err(CopyError::Read)?;
                continue;
            }
            let n = ready!(Pin::new(&mut *writer).poll_write(cx, &self.buf[self.start..self.end]))
                .map_err(CopyError::Write)?;
            if n == 0 {
                return Poll::Ready(Err(CopyError::Write(io::ErrorKind::WriteZero.into())));
            }
            self.start += n;
            if self.is_empty() && self.end < self.buf.len() {
                self.start = 0;
                self.end = 0;
            }
        }
    }
}

/// How one connection to the target ended.
enum Leg {
    /// It closed between exchanges: dial again for the next request.
    Idle,
    Ended(Outcome),
}

/// Pipes the HTTP exchanges on `stream` to connections `dial` makes, one at a time, until the
/// stream or the target ends them.
pub async fn pipe<S, T, D, F>(stream: &mut S, mut dial: D, hooks: &impl PipeHooks) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
    D: FnMut() -> F,
    F: Future<Output = io::Result<T>>,
{
    let mut exchange = Exchange::new();
    let mut up = Half::new();
    let mut down = Half::new();
    loop {
        // The next request's first bytes.
        if up.is_empty() {
            let read = poll_fn(|cx| {
                up.poll_fill(cx, stream, |b| {
                    exchange.handle_request_bytes(b, Instant::now());
                })
            })
            .await;
            match read {
                Ok(0) => return finish(stream).await,
                Ok(_) => {}
                Err(e) => return Outcome::Failed(e),
            }
        }
        let mut target = match dial().await {
            Ok(t) => {
                hooks.dialed(Ok(()));
                t
            }
            Err(e) => {
                hooks.dialed(Err(&e));
                return refuse(stream, &e).await;
            }
        };
        match leg(
            stream,
            &mut target,
            &mut exchange,
            &mut up,
            &mut down,
            hooks,
        )
        .await
        {
            Leg::Idle => {
                tracing::trace!("the target closed an idle connection: dialed again when asked");
            }
            Leg::Ended(outcome) => return outcome,
        }
    }
}

/// Copies both ways between `stream` and one connection to the target.
async fn leg<S, T>(
    stream: &mut S,
    target: &mut T,
    exchange: &mut Exchange,
    up: &mut Half,
    down: &mut Half,
    hooks: &impl PipeHooks,
) -> Leg
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    down.eof = false;
    let ended = poll_fn(|cx| {
        if !up.shut {
            let upward = up.poll_copy(cx, stream, target, |b| {
                exchange.handle_request_bytes(b, Instant::now());
            });
            match upward {
                Poll::Ready(Ok(())) => {
                    // The gateway is done sending: so is the target's connection.
                    match Pin::new(&mut *target).poll_shutdown(cx) {
                        Poll::Ready(Err(e)) if !closed(&e) => {
                            return Poll::Ready(Leg::Ended(Outcome::Failed(e)));
                        }
                        Poll::Ready(_) => up.shut = true,
                        Poll::Pending => {}
                    }
                }
                // The target closed before reading everything: what it answered, or how it
                // ended, is read below.
                Poll::Ready(Err(CopyError::Write(e))) if closed(&e) => up.shut = true,
                Poll::Ready(Err(CopyError::Read(e) | CopyError::Write(e))) => {
                    return Poll::Ready(Leg::Ended(Outcome::Failed(e)));
                }
                Poll::Pending => {}
            }
        }
        let downward = down.poll_copy(cx, target, stream, |b| {
            exchange.handle_response_bytes(b, Instant::now());
        });
        while let Some(r) = exchange.poll_response() {
            hooks.response(r);
        }
        match downward {
            // The gateway is done and every answer passed: the target's connection is closed
            // here rather than waiting for the target to close it (not all do on a half-close).
            Poll::Pending if up.eof && up.is_empty() && down.is_empty() && exchange.is_idle() => {
                Poll::Ready(Leg::Ended(Outcome::Done))
            }
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(target_closed(exchange, up)),
            // A reset (the target closed with bytes of ours unread) after it answered all it
            // was asked loses nothing: as a close.
            Poll::Ready(Err(CopyError::Read(e))) if closed(&e) && exchange.answered_all() => {
                Poll::Ready(target_closed(exchange, up))
            }
            Poll::Ready(Err(CopyError::Read(e) | CopyError::Write(e))) => {
                Poll::Ready(Leg::Ended(Outcome::Failed(e)))
            }
        }
    })
    .await;
    match ended {
        Leg::Ended(Outcome::Done) => Leg::Ended(finish(stream).await),
        other => other,
    }
}

/// Whether `e` says the other end closed the connection.
fn closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

/// The target closed its side: between exchanges the stream goes on, otherwise it ends.
fn target_closed(exchange: &Exchange, up: &Half) -> Leg {
    match exchange.handle_response_eof() {
        Eof::Idle if !up.eof && !up.shut => Leg::Idle,
        Eof::Idle | Eof::End => Leg::Ended(Outcome::Done),
        Eof::Cut => Leg::Ended(Outcome::Cut),
    }
}

/// Ends `stream` in order.
async fn finish<S: AsyncWrite + Unpin>(stream: &mut S) -> Outcome {
    match stream.shutdown().await {
        Ok(()) => Outcome::Done,
        Err(e) => Outcome::Failed(e),
    }
}

/// Answers the request with the agent's own 502 and ends the stream.
async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, error: &io::Error) -> Outcome {
    let message = if error.kind() == io::ErrorKind::TimedOut {
        "connecting to the target timed out"
    } else {
        "the target refused the connection"
    };
    let response = format!(
        "HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain; charset=utf-8\r\n\
         cache-control: no-store\r\n{AGENT_ERROR_HEADER}: 1\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{message}\n",
        message.len() + 1
    );
    if let Err(e) = stream.write_all(response.as_bytes()).await {
        return Outcome::Failed(e);
    }
    finish(stream).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    use tokio::io::{duplex, AsyncReadExt as _, DuplexStream};
    use tokio::sync::mpsc;

    use super::*;

    #[derive(Default)]
    struct Seen {
        dials: AtomicUsize,
        refused: AtomicUsize,
        statuses: Mutex<Vec<u16>>,
    }

    impl PipeHooks for Seen {
        fn dialed(&self, result: Result<(), &io::Error>) {
            match result {
                Ok(()) => self.dials.fetch_add(1, Ordering::Relaxed),
                Err(_) => self.refused.fetch_add(1, Ordering::Relaxed),
            };
        }
        fn response(&self, response: Response) {
            self.statuses.lock().unwrap().push(response.status);
        }
    }

    const GET: &[u8] = b"GET /a HTTP/1.1\r\nhost: app\r\n\r\n";
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";

    /// A pipe between the test's gateway end and apps it hands out: each dial takes the next
    /// app end from the channel (none left: refused).
    struct Rig {
        gateway: DuplexStream,
        apps: mpsc::UnboundedSender<DuplexStream>,
        seen: std::sync::Arc<Seen>,
        outcome: tokio::task::JoinHandle<Outcome>,
    }

    fn rig() -> Rig {
        let (gateway, mut stream) = duplex(64 * 1024);
        let (apps, mut next) = mpsc::unbounded_channel::<DuplexStream>();
        let seen = std::sync::Arc::new(Seen::default());
        let hooks = std::sync::Arc::clone(&seen);
        let outcome = tokio::spawn(async move {
            let dial = || {
                let app = next.try_recv();
                async move { app.map_err(|_| io::Error::from(io::ErrorKind::ConnectionRefused)) }
            };
            pipe(&mut stream, dial, &*hooks).await
        });
        Rig {
            gateway,
            apps,
            seen,
            outcome,
        }
    }

    /// An app end, and the test's end of it.
    fn app_pair() -> (DuplexStream, DuplexStream) {
        duplex(64 * 1024)
    }

    async fn read_n(s: &mut DuplexStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .expect("in time")
            .unwrap();
        buf
    }

    async fn read_to_end(s: &mut DuplexStream) -> Vec<u8> {
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .expect("in time")
            .unwrap();
        buf
    }

    #[tokio::test]
    async fn exchanges_pass_byte_for_byte_and_are_counted_on_one_connection() {
        let mut r = rig();
        let (end, mut app) = app_pair();
        r.apps.send(end).unwrap();
        for _ in 0..3 {
            r.gateway.write_all(GET).await.unwrap();
            assert_eq!(read_n(&mut app, GET.len()).await, GET);
            app.write_all(OK).await.unwrap();
            assert_eq!(read_n(&mut r.gateway, OK.len()).await, OK);
        }
        // The gateway closes its side: the app sees the end, and so does the gateway after it.
        r.gateway.shutdown().await.unwrap();
        assert_eq!(read_to_end(&mut app).await, b"");
        drop(app);
        assert_eq!(read_to_end(&mut r.gateway).await, b"");
        assert!(matches!(r.outcome.await.unwrap(), Outcome::Done));
        assert_eq!(r.seen.dials.load(Ordering::Relaxed), 1);
        assert_eq!(*r.seen.statuses.lock().unwrap(), [200, 200, 200]);
    }

    #[tokio::test]
    async fn an_app_that_closes_between_exchanges_is_dialed_again_for_the_next_request() {
        let mut r = rig();
        let (end, mut app) = app_pair();
        r.apps.send(end).unwrap();
        r.gateway.write_all(GET).await.unwrap();
        read_n(&mut app, GET.len()).await;
        app.write_all(OK).await.unwrap();
        drop(app);
        assert_eq!(read_n(&mut r.gateway, OK.len()).await, OK);
        // The stream goes on: the next request reaches a new connection.
        let (end, mut app) = app_pair();
        r.apps.send(end).unwrap();
        r.gateway.write_all(GET).await.unwrap();
        assert_eq!(read_n(&mut app, GET.len()).await, GET);
        app.write_all(OK).await.unwrap();
        assert_eq!(read_n(&mut r.gateway, OK.len()).await, OK);
        assert_eq!(r.seen.dials.load(Ordering::Relaxed), 2);
        assert_eq!(*r.seen.statuses.lock().unwrap(), [200, 200]);
        drop(r.gateway);
        drop(app);
        r.outcome.await.unwrap();
    }

    #[tokio::test]
    async fn an_app_that_closes_in_the_middle_of_a_response_cuts_the_stream() {
        let mut r = rig();
        let (end, mut app) = app_pair();
        r.apps.send(end).unwrap();
        r.gateway.write_all(GET).await.unwrap();
        read_n(&mut app, GET.len()).await;
        app.write_all(&OK[..OK.len() - 2]).await.unwrap();
        drop(app);
        assert!(matches!(r.outcome.await.unwrap(), Outcome::Cut));
        // A request that got no answer at all is cut too.
        let mut r = rig();
        let (end, mut app) = app_pair();
        r.apps.send(end).unwrap();
        r.gateway.write_all(GET).await.unwrap();
        read_n(&mut app, GET.len()).await;
        drop(app);
        assert!(matches!(r.outcome.await.unwrap(), Outcome::Cut));
    }

    #[tokio::test]
    async fn a_target_that_refuses_gets_the_agents_own_502_marked_for_the_gateway() {
        let mut r = rig();
        r.gateway.write_all(GET).await.unwrap();
        let answer = String::from_utf8(read_to_end(&mut r.gateway).await).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 502 Bad Gateway\r\n"),
            "{answer}"
        );
        assert!(
            answer.contains(&format!("\r\n{AGENT_ERROR_HEADER}: 1\r\n")),
            "{answer}"
        );
        assert!(
            answer.ends_with("\r\n\r\nthe target refused the connection\n"),
            "{answer}"
        );
        // The length is right: a client reads exactly the body.
        let mut exchange = Exchange::new();
        exchange.handle_request_bytes(GET, Instant::now());
        exchange.handle_response_bytes(answer.as_bytes(), Instant::now());
        assert!(exchange.is_idle(), "{exchange:?}");
        assert!(matches!(r.outcome.await.unwrap(), Outcome::Done));
        assert_eq!(r.seen.refused.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn the_gateway_closing_its_side_ends_the_pipe_even_if_the_app_never_closes() {
        let mut r = rig();
        let (end, mut app) = app_pair();
        r.apps.send(end).unwrap();
        r.gateway.write_all(GET).await.unwrap();
        read_n(&mut app, GET.len()).await;
        // The gateway is done sending before the answer comes.
        r.gateway.shutdown().await.unwrap();
        assert_eq!(
            read_to_end(&mut app).await,
            b"",
            "the app sees the gateway's end"
        );
        app.write_all(OK).await.unwrap();
        // The app keeps its side open; the pipe still ends once the answer has passed.
        assert_eq!(read_to_end(&mut r.gateway).await, OK);
        let outcome = tokio::time::timeout(Duration::from_secs(5), r.outcome)
            .await
            .expect("the pipe ends without the app closing");
        assert!(matches!(outcome.unwrap(), Outcome::Done));
        drop(app);
    }

    #[tokio::test]
    async fn an_early_answer_to_an_upload_reaches_the_gateway_whole() {
        let mut r = rig();
        let (end, mut app) = app_pair();
        r.apps.send(end).unwrap();
        let head = b"POST /u HTTP/1.1\r\ncontent-length: 1000000\r\n\r\n";
        r.gateway.write_all(head).await.unwrap();
        r.gateway.write_all(&[7; 1000]).await.unwrap();
        read_n(&mut app, head.len()).await;
        let refused =
            b"HTTP/1.1 413 Content Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        app.write_all(refused).await.unwrap();
        drop(app);
        assert_eq!(read_to_end(&mut r.gateway).await, refused);
        assert!(matches!(r.outcome.await.unwrap(), Outcome::Done));
        assert_eq!(*r.seen.statuses.lock().unwrap(), [413]);
    }

    #[tokio::test]
    async fn a_response_that_ends_with_its_connection_ends_the_stream_in_order() {
        let mut r = rig();
        let (end, mut app) = app_pair();
        r.apps.send(end).unwrap();
        r.gateway.write_all(GET).await.unwrap();
        read_n(&mut app, GET.len()).await;
        let answer = b"HTTP/1.0 200 OK\r\n\r\nuntil the end";
        app.write_all(answer).await.unwrap();
        drop(app);
        assert_eq!(read_to_end(&mut r.gateway).await, answer);
        assert!(matches!(r.outcome.await.unwrap(), Outcome::Done));
        assert_eq!(*r.seen.statuses.lock().unwrap(), [200]);
    }

    #[tokio::test]
    async fn an_upgraded_connection_is_copied_both_ways_and_large_bodies_pass_whole() {
        let mut r = rig();
        let (end, mut app) = app_pair();
        r.apps.send(end).unwrap();
        let upgrade = b"GET /ws HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n";
        r.gateway.write_all(upgrade).await.unwrap();
        read_n(&mut app, upgrade.len()).await;
        let switched = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n";
        app.write_all(switched).await.unwrap();
        assert_eq!(read_n(&mut r.gateway, switched.len()).await, switched);
        // 1 MiB each way at once, in no HTTP framing: neither side waits for the other.
        let big: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        let (mut gw_read, mut gw_write) = tokio::io::split(r.gateway);
        let (mut app_read, mut app_write) = tokio::io::split(app);
        let sent = big.clone();
        let up = tokio::spawn(async move {
            gw_write.write_all(&sent).await.unwrap();
            gw_write.shutdown().await.unwrap();
        });
        let sent = big.clone();
        let down = tokio::spawn(async move {
            app_write.write_all(&sent).await.unwrap();
            app_write.shutdown().await.unwrap();
        });
        let mut at_app = Vec::new();
        let mut at_gateway = Vec::new();
        let (a, b) = tokio::join!(
            app_read.read_to_end(&mut at_app),
            gw_read.read_to_end(&mut at_gateway)
        );
        a.unwrap();
        b.unwrap();
        up.await.unwrap();
        down.await.unwrap();
        assert!(at_app == big && at_gateway == big);
        assert!(matches!(r.outcome.await.unwrap(), Outcome::Done));
        assert_eq!(*r.seen.statuses.lock().unwrap(), [101]);
    }
}
