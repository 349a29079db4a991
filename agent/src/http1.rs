//! Where each HTTP/1.1 message starts and ends on a connection's two byte streams, without
//! copying or re-encoding them: the sans-IO core of the agent's HTTP pipe ([`crate::pipe`]).
//!
//! The gateway sends its requests already shaped for the app, so the agent only has to pass the
//! bytes on. It still counts each response by status class and times it from its request, and it
//! has to know where messages end: a target that closes its connection between two exchanges is
//! dialed again for the next request, while one that closes in the middle of a response cuts
//! it. [`Exchange`] is fed the bytes of both directions as they pass
//! ([`Exchange::handle_request_bytes`], [`Exchange::handle_response_bytes`]) and reports each
//! final response ([`Exchange::poll_response`]).
//!
//! Must never: hold more than one partial head per direction ([`MAX_HEAD`]), or panic on
//! anything it is fed. Bytes it cannot frame (which the gateway never sends) make it give up
//! ([`Exchange::is_tracking`] turns false) and the pipe goes on as a plain byte copy.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The largest message head kept while it is incomplete.
pub const MAX_HEAD: usize = 64 * 1024;
/// Header lines parsed per head.
const MAX_HEADERS: usize = 128;

/// Why the framing was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("a message head longer than {MAX_HEAD} bytes")]
    HeadTooLong,
    #[error("a message head that is not HTTP/1.x")]
    BadHead,
    #[error("a body length that is not valid")]
    BadLength,
    #[error("a chunked body that is not valid")]
    BadChunk,
    #[error("a response with no request")]
    UnaskedResponse,
}

/// A final response seen on the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// From the end of its request's head to this response's head.
    pub waited: Duration,
}

/// How the target's side of the connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eof {
    /// Between exchanges, with no request waiting: the next request may go on a new connection.
    Idle,
    /// The end of a response that ends with its connection, or of a connection no longer
    /// framed (upgraded, or not HTTP): the stream ends too.
    End,
    /// In the middle of a response, or with requests unanswered: they are cut.
    Cut,
}

/// A request waiting for its response.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// `HEAD`: the response has no body whatever its headers say.
    head: bool,
    /// `CONNECT`: a 2xx response turns the connection into a tunnel.
    connect: bool,
    sent: Instant,
}

/// What is left of the message being read in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// Waiting for a head.
    Head,
    /// This many bytes of a `Content-Length` body.
    Length(u64),
    Chunked(Chunk),
    /// A response body that ends with the connection.
    UntilClose,
    /// No longer framed: upgraded, or given up.
    Raw,
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// In a chunk-size line: the size so far, and whether a digit was seen.
    Size(u64, bool),
    /// After the size: extensions or spaces, up to the CR.
    Extension(u64),
    /// The LF that ends the size line.
    SizeLf(u64),
    /// This many bytes of chunk data.
    Data(u64),
    DataCr,
    DataLf,
    /// In the trailer section; `true` at the start of a line.
    Trailer(bool),
    TrailerLf,
    EndLf,
}

/// One direction: its partial head and what is left of its body.
#[derive(Debug)]
struct Direction {
    body: Body,
    partial: Vec<u8>,
}

impl Direction {
    fn new() -> Self {
        Direction {
            body: Body::Head,
            partial: Vec::new(),
        }
    }
}

/// The framing of one connection: requests one way, responses the other.
#[derive(Debug)]
pub struct Exchange {
    request: Direction,
    response: Direction,
    pending: VecDeque<Pending>,
    responses: VecDeque<Response>,
    /// Why the framing was given up, once it was.
    error: Option<FramingError>,
}

impl Default for Exchange {
    fn default() -> Self {
        Self::new()
    }
}

/// What a parsed head says about the message after it.
struct HeadInfo {
    length: Option<u64>,
    chunked: bool,
    /// A `Transfer-Encoding` whose last coding is not chunked.
    other_coding: bool,
}

fn head_info(headers: &[httparse::Header<'_>]) -> Result<HeadInfo, FramingError> {
    let mut info = HeadInfo {
        length: None,
        chunked: false,
        other_coding: false,
    };
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(FramingError::BadLength)?;
            if info.length.is_some_and(|m| m != n) {
                return Err(FramingError::BadLength);
            }
            info.length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let value = std::str::from_utf8(h.value).map_err(|_| FramingError::BadLength)?;
            let last = value.rsplit(',').next().unwrap_or("").trim();
            info.chunked = last.eq_ignore_ascii_case("chunked");
            info.other_coding = !info.chunked;
        }
    }
    Ok(info)
}

impl Exchange {
    pub fn new() -> Self {
        Exchange {
            request: Direction::new(),
            response: Direction::new(),
            pending: VecDeque::new(),
            responses: VecDeque::new(),
            error: None,
        }
    }

    /// Whether the messages are still framed (not upgraded, not given up).
    pub fn is_tracking(&self) -> bool {
        self.error.is_none() && self.response.body != Body::Raw
    }

    /// Why the framing was given up, if it was.
    pub fn error(&self) -> Option<FramingError> {
        self.error
    }

    /// Whether the connection is between exchanges: no request waiting or being sent, no
    /// response being read.
    pub fn is_idle(&self) -> bool {
        self.is_tracking()
            && self.pending.is_empty()
            && self.request.body == Body::Head
            && self.request.partial.is_empty()
            && self.response.body == Body::Head
            && self.response.partial.is_empty()
    }

    /// Whether every request whose head was seen has had its whole final response (so a reset
    /// from the target now loses nothing it answered).
    pub fn answered_all(&self) -> bool {
        self.is_tracking()
            && self.pending.is_empty()
            && self.response.body == Body::Head
            && self.response.partial.is_empty()
    }

    /// The next final response seen, oldest first.
    pub fn poll_response(&mut self) -> Option<Response> {
        self.responses.pop_front()
    }

    /// Requests sent and not yet answered with a final response.
    pub fn unanswered(&self) -> usize {
        self.pending.len()
    }

    fn give_up(&mut self, error: FramingError) {
        tracing::debug!(%error, "HTTP framing given up: the connection is copied as it is");
        self.error = Some(error);
        for d in [&mut self.request, &mut self.response] {
            d.body = Body::Raw;
            d.partial = Vec::new();
        }
    }

    /// Bytes on their way to the target, as they pass.
    pub fn handle_request_bytes(&mut self, data: &[u8], now: Instant) {
        if let Err(e) = self.request_bytes(data, now) {
            self.give_up(e);
        }
    }

    /// Bytes from the target, as they pass.
    pub fn handle_response_bytes(&mut self, data: &[u8], now: Instant) {
        if let Err(e) = self.response_bytes(data, now) {
            self.give_up(e);
        }
    }

    /// The target's side ended (it closed, or its connection failed) after all the bytes fed.
    pub fn handle_response_eof(&self) -> Eof {
        match self.response.body {
            Body::UntilClose | Body::Raw => Eof::End,
            _ if self.is_idle() => Eof::Idle,
            // It answered every request whose head it got, and closed while the next one (or
            // the body of the one it answered early, say with a 413) was still coming: its
            // answers stand, and the rest is its choice to refuse.
            _ if self.answered_all() => Eof::End,
            _ => Eof::Cut,
        }
    }

    fn request_bytes(&mut self, mut data: &[u8], now: Instant) -> Result<(), FramingError> {
        while !data.is_empty() {
            match self.request.body {
                Body::Raw => return Ok(()),
                Body::Head => {
                    let Some((used, pending, info)) = take_head(&mut self.request, data, |buf| {
                        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                        let mut req = httparse::Request::new(&mut headers);
                        match req.parse(buf) {
                            Ok(httparse::Status::Complete(n)) => {
                                let method = req.method.unwrap_or("");
                                let pending = Pending {
                                    head: method == "HEAD",
                                    connect: method == "CONNECT",
                                    sent: now,
                                };
                                Ok(Some((n, pending, head_info(req.headers)?)))
                            }
                            Ok(httparse::Status::Partial) => Ok(None),
                            Err(_) => Err(FramingError::BadHead),
                        }
                    })?
                    else {
                        return Ok(());
                    };
                    data = &data[used..];
                    self.pending.push_back(pending);
                    self.request.body = if info.other_coding {
                        // A request's length must be known (RFC 9112, 6.3).
                        return Err(FramingError::BadLength);
                    } else if info.chunked {
                        Body::Chunked(Chunk::Size(0, false))
                    } else {
                        match info.length {
                            Some(n) if n > 0 => Body::Length(n),
                            _ => Body::Head,
                        }
                    };
                }
                _ => {
                    let (used, body) = skip_body(self.request.body, data)?;
                    data = &data[used..];
                    self.request.body = body;
                }
            }
        }
        Ok(())
    }

    fn response_bytes(&mut self, mut data: &[u8], now: Instant) -> Result<(), FramingError> {
        while !data.is_empty() {
            match self.response.body {
                Body::Raw | Body::UntilClose => return Ok(()),
                Body::Head => {
                    let Some((used, status, info)) = take_head(&mut self.response, data, |buf| {
                        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                        let mut res = httparse::Response::new(&mut headers);
                        match res.parse(buf) {
                            Ok(httparse::Status::Complete(n)) => {
                                let status = res.code.unwrap_or(0);
                                Ok(Some((n, status, head_info(res.headers)?)))
                            }
                            Ok(httparse::Status::Partial) => Ok(None),
                            Err(_) => Err(FramingError::BadHead),
                        }
                    })?
                    else {
                        return Ok(());
                    };
                    data = &data[used..];
                    if status == 101 {
                        self.pending.pop_front();
                        self.responses.push_back(Response {
                            status,
                            waited: Duration::ZERO,
                        });
                        self.request.body = Body::Raw;
                        self.response.body = Body::Raw;
                        return Ok(());
                    }
                    if (100..200).contains(&status) {
                        // Informational: the final response is still to come.
                        continue;
                    }
                    let request = self
                        .pending
                        .pop_front()
                        .ok_or(FramingError::UnaskedResponse)?;
                    self.responses.push_back(Response {
                        status,
                        waited: now.saturating_duration_since(request.sent),
                    });
                    if request.connect && (200..300).contains(&status) {
                        self.request.body = Body::Raw;
                        self.response.body = Body::Raw;
                        return Ok(());
                    }
                    self.response.body = if request.head || status == 204 || status == 304 {
                        Body::Head
                    } else if info.chunked {
                        Body::Chunked(Chunk::Size(0, false))
                    } else if info.other_coding {
                        Body::UntilClose
                    } else {
                        match info.length {
                            Some(0) => Body::Head,
                            Some(n) => Body::Length(n),
                            None => Body::UntilClose,
                        }
                    };
                }
                _ => {
                    let (used, body) = skip_body(self.response.body, data)?;
                    data = &data[used..];
                    self.response.body = body;
                }
            }
        }
        Ok(())
    }
}

/// Parses a head that starts `data` (after the direction's partial head, if any): the bytes of
/// `data` it used and what `parse` made of it, or `None` (and `data` kept) while incomplete.
fn take_head<T>(
    dir: &mut Direction,
    data: &[u8],
    parse: impl Fn(&[u8]) -> Result<Option<(usize, T, HeadInfo)>, FramingError>,
) -> Result<Option<(usize, T, HeadInfo)>, FramingError> {
    if dir.partial.is_empty() {
        return match parse(data)? {
            Some(parsed) => Ok(Some(parsed)),
            None => {
                if data.len() > MAX_HEAD {
                    return Err(FramingError::HeadTooLong);
                }
                dir.partial.extend_from_slice(data);
                Ok(None)
            }
        };
    }
    let before = dir.partial.len();
    if before + data.len() > MAX_HEAD {
        // Only what can still belong to the head is looked at.
        let room = MAX_HEAD.saturating_sub(before);
        dir.partial.extend_from_slice(&data[..room.min(data.len())]);
    } else {
        dir.partial.extend_from_slice(data);
    }
    match parse(&dir.partial)? {
        Some((n, value, info)) => {
            dir.partial.clear();
            // The head was incomplete without these bytes, so it ends inside them.
            Ok(Some((
                n.saturating_sub(before).min(data.len()),
                value,
                info,
            )))
        }
        None if dir.partial.len() >= MAX_HEAD => Err(FramingError::HeadTooLong),
        None => Ok(None),
    }
}

/// Skips what `data` holds of a body in state `body`: the bytes used and the state after them.
fn skip_body(body: Body, data: &[u8]) -> Result<(usize, Body), FramingError> {
    match body {
        Body::Length(left) => {
            let n = left.min(data.len() as u64);
            let left = left - n;
            Ok((
                n as usize,
                if left == 0 {
                    Body::Head
                } else {
                    Body::Length(left)
                },
            ))
        }
        Body::Chunked(mut chunk) => {
            let mut i = 0;
            while i < data.len() {
                let b = data[i];
                chunk = match chunk {
                    Chunk::Data(left) => {
                        let n = left.min((data.len() - i) as u64);
                        i += n as usize;
                        let left = left - n;
                        if left == 0 {
                            Chunk::DataCr
                        } else {
                            Chunk::Data(left)
                        }
                    }
                    other => {
                        i += 1;
                        match chunk_byte(other, b)? {
                            Some(next) => next,
                            None => return Ok((i, Body::Head)),
                        }
                    }
                };
            }
            Ok((i, Body::Chunked(chunk)))
        }
        Body::Head | Body::UntilClose | Body::Raw => Ok((data.len(), body)),
    }
}

/// The chunk state after byte `b` (not in chunk data); `None` at the end of the body.
fn chunk_byte(chunk: Chunk, b: u8) -> Result<Option<Chunk>, FramingError> {
    Ok(Some(match chunk {
        Chunk::Size(size, digits) => match b {
            b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                let digit = u64::from(char::from(b).to_digit(16).ok_or(FramingError::BadChunk)?);
                let size = size
                    .checked_mul(16)
                    .and_then(|s| s.checked_add(digit))
                    .ok_or(FramingError::BadChunk)?;
                Chunk::Size(size, true)
            }
            b';' | b' ' | b'\t' if digits => Chunk::Extension(size),
            b'\r' if digits => Chunk::SizeLf(size),
            _ => return Err(FramingError::BadChunk),
        },
        Chunk::Extension(size) => match b {
            b'\r' => Chunk::SizeLf(size),
            b'\n' => return Err(FramingError::BadChunk),
            _ => Chunk::Extension(size),
        },
        Chunk::SizeLf(size) => match b {
            b'\n' if size == 0 => Chunk::Trailer(true),
            b'\n' => Chunk::Data(size),
            _ => return Err(FramingError::BadChunk),
        },
        Chunk::Data(_) => chunk,
        Chunk::DataCr => match b {
            b'\r' => Chunk::DataLf,
            _ => return Err(FramingError::BadChunk),
        },
        Chunk::DataLf => match b {
            b'\n' => Chunk::Size(0, false),
            _ => return Err(FramingError::BadChunk),
        },
        Chunk::Trailer(start) => match b {
            b'\r' if start => Chunk::EndLf,
            b'\r' => Chunk::TrailerLf,
            b'\n' => return Err(FramingError::BadChunk),
            _ => Chunk::Trailer(false),
        },
        Chunk::TrailerLf => match b {
            b'\n' => Chunk::Trailer(true),
            _ => return Err(FramingError::BadChunk),
        },
        Chunk::EndLf => match b {
            b'\n' => return Ok(None),
            _ => return Err(FramingError::BadChunk),
        },
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn t0() -> Instant {
        Instant::now()
    }

    /// Feeds `data` in pieces of `step` bytes.
    fn feed(ex: &mut Exchange, request: bool, data: &[u8], step: usize, now: Instant) {
        for piece in data.chunks(step.max(1)) {
            if request {
                ex.handle_request_bytes(piece, now);
            } else {
                ex.handle_response_bytes(piece, now);
            }
        }
    }

    fn statuses(ex: &mut Exchange) -> Vec<u16> {
        std::iter::from_fn(|| ex.poll_response())
            .map(|r| r.status)
            .collect()
    }

    const GET: &[u8] = b"GET /a HTTP/1.1\r\nhost: app\r\n\r\n";
    const POST_CHUNKED: &[u8] = b"POST /u HTTP/1.1\r\nhost: app\r\ntransfer-encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\ntrailer: 1\r\n\r\n";
    const OK_LENGTH: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
    const OK_CHUNKED: &[u8] =
        b"HTTP/1.1 201 Created\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";

    #[test]
    fn keep_alive_exchanges_are_framed_in_any_pieces() {
        for step in [1, 2, 3, 7, 64, 4096] {
            let mut ex = Exchange::new();
            let now = t0();
            for (req, res) in [
                (GET, OK_LENGTH),
                (POST_CHUNKED, OK_CHUNKED),
                (
                    b"HEAD /h HTTP/1.1\r\n\r\n".as_slice(),
                    b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n".as_slice(),
                ),
                (
                    GET,
                    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
                ),
                (
                    GET,
                    b"HTTP/1.1 304 Not Modified\r\ncontent-length: 7\r\n\r\n",
                ),
                (b"POST /e HTTP/1.1\r\ncontent-length: 0\r\n\r\n", OK_LENGTH),
            ] {
                feed(&mut ex, true, req, step, now);
                assert!(!ex.is_idle(), "step {step}");
                assert_eq!(ex.handle_response_eof(), Eof::Cut);
                feed(&mut ex, false, res, step, now + Duration::from_millis(3));
                assert!(ex.is_idle(), "step {step}: {req:?} / {res:?}: {ex:?}");
                assert_eq!(ex.handle_response_eof(), Eof::Idle);
                let r = ex.poll_response().unwrap();
                assert_eq!(r.waited, Duration::from_millis(3));
                assert_eq!(ex.poll_response(), None);
            }
            assert!(ex.is_tracking());
        }
    }

    #[test]
    fn pipelined_requests_are_answered_in_order_and_a_response_can_end_with_the_connection() {
        let mut ex = Exchange::new();
        let now = t0();
        let mut both = GET.to_vec();
        both.extend_from_slice(b"HEAD / HTTP/1.1\r\n\r\nGET /last HTTP/1.1\r\n\r\n");
        ex.handle_request_bytes(&both, now);
        assert_eq!(ex.unanswered(), 3);
        let mut res = OK_LENGTH.to_vec();
        res.extend_from_slice(b"HTTP/1.1 404 Not Found\r\ncontent-length: 10\r\n\r\n");
        res.extend_from_slice(b"HTTP/1.0 500 Oops\r\n\r\nthe body ends with the connection");
        feed(&mut ex, false, &res, 5, now);
        assert_eq!(statuses(&mut ex), [200, 404, 500]);
        assert_eq!(ex.handle_response_eof(), Eof::End);
    }

    #[test]
    fn a_cut_response_is_cut_and_an_early_answer_stands() {
        let mut ex = Exchange::new();
        let now = t0();
        ex.handle_request_bytes(GET, now);
        ex.handle_response_bytes(&OK_LENGTH[..OK_LENGTH.len() - 1], now);
        assert_eq!(ex.handle_response_eof(), Eof::Cut);
        let mut ex = Exchange::new();
        ex.handle_request_bytes(&POST_CHUNKED[..70], now);
        assert_eq!(ex.handle_response_eof(), Eof::Cut);
        // Closing on a request still being sent, with every earlier one answered, ends the
        // connection in order: an early answer (a 413 to an upload) stands.
        let mut ex = Exchange::new();
        ex.handle_request_bytes(&GET[..5], now);
        assert_eq!(ex.handle_response_eof(), Eof::End);
        let mut ex = Exchange::new();
        ex.handle_request_bytes(&POST_CHUNKED[..70], now);
        ex.handle_response_bytes(
            b"HTTP/1.1 413 Content Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            now,
        );
        assert_eq!(statuses(&mut ex), [413]);
        assert_eq!(ex.handle_response_eof(), Eof::End);
    }

    #[test]
    fn an_upgrade_or_a_tunnel_turns_the_connection_raw() {
        let mut ex = Exchange::new();
        let now = t0();
        ex.handle_request_bytes(
            b"GET /ws HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            now,
        );
        ex.handle_response_bytes(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n\x81\x05hello",
            now,
        );
        ex.handle_request_bytes(b"\x81\x85 masked frame, not HTTP", now);
        assert_eq!(statuses(&mut ex), [101]);
        assert!(!ex.is_tracking());
        assert_eq!(ex.error(), None);
        assert_eq!(ex.handle_response_eof(), Eof::End);

        let mut ex = Exchange::new();
        ex.handle_request_bytes(b"CONNECT db:5432 HTTP/1.1\r\n\r\n", now);
        ex.handle_response_bytes(b"HTTP/1.1 200 OK\r\n\r\nanything", now);
        ex.handle_request_bytes(b"anything at all", now);
        assert_eq!(statuses(&mut ex), [200]);
        assert!(!ex.is_tracking());
    }

    #[test]
    fn bytes_that_are_not_http_make_it_give_up_without_a_panic() {
        let now = t0();
        let cases: [(&[u8], &[u8], FramingError); 6] = [
            (b"\x16\x03\x01 tls", b"", FramingError::BadHead),
            (
                b"GET / HTTP/1.1\r\ncontent-length: -1\r\n\r\n",
                b"",
                FramingError::BadLength,
            ),
            (
                b"GET / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                b"",
                FramingError::BadLength,
            ),
            (
                b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                b"",
                FramingError::BadChunk,
            ),
            (
                b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nfffffffffffffffff\r\n",
                b"",
                FramingError::BadChunk,
            ),
            (
                b"",
                b"HTTP/1.1 200 OK\r\n\r\n",
                FramingError::UnaskedResponse,
            ),
        ];
        for (req, res, error) in cases {
            let mut ex = Exchange::new();
            ex.handle_request_bytes(req, now);
            ex.handle_response_bytes(res, now);
            assert_eq!(ex.error(), Some(error), "{req:?}");
            assert!(!ex.is_tracking());
            assert_eq!(ex.handle_response_eof(), Eof::End);
            // Anything after is passed over.
            ex.handle_request_bytes(b"more", now);
            ex.handle_response_bytes(b"more", now);
        }
    }

    #[test]
    fn a_head_longer_than_the_limit_is_given_up_in_one_piece_or_many() {
        let now = t0();
        let mut long = b"GET / HTTP/1.1\r\nx: ".to_vec();
        long.resize(MAX_HEAD + 10, b'a');
        for step in [MAX_HEAD + 10, 1000] {
            let mut ex = Exchange::new();
            feed(&mut ex, true, &long, step, now);
            assert_eq!(ex.error(), Some(FramingError::HeadTooLong), "step {step}");
        }
        // Just under the limit is fine.
        let mut ex = Exchange::new();
        let mut head = b"GET / HTTP/1.1\r\nx: ".to_vec();
        head.resize(MAX_HEAD - 4, b'a');
        head.extend_from_slice(b"\r\n\r\n");
        feed(&mut ex, true, &head, 1000, now);
        assert!(ex.is_tracking());
        assert_eq!(ex.unanswered(), 1);
    }
}
