//! Keep-alive HTTP load through the real path, recorded request by request, and the figures a
//! fault is judged by.
//!
//! [`Load::start`] runs N clients. Each keeps one persistent HTTP/1.1 connection to a gateway
//! and sends `GET` requests on it one after another (back to back, or with a pause), as a
//! browser or an API client does. Like a client given several A records for one name, a client
//! opens a connection by trying the gateways' addresses in its own order (client `i` starts at
//! address `i mod n`) and takes the first that accepts; it keeps that connection until it
//! fails, then opens another the same way. A request that finds its connection closed before
//! it was sent goes on the new connection (nothing was sent: any client library does this);
//! one that was sent and got no answer is a failure. Every request is recorded: its client,
//! the gateway its connection went to, when it started and ended, and its outcome.
//!
//! [`Figures::of`] turns the records of a window into the numbers printed after a fault:
//! requests answered and failed, the failures allowed (requests in flight on the part a fault
//! killed, as the test defines that part), the longest time a client went without an answer,
//! how soon every client was answered again, and latency percentiles. It never judges: the
//! tests assert on it.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http1::SendRequest;
use tokio::task::JoinHandle;

use crate::fleet::{ms, Summary};

/// What the load sends and where.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// How many clients (one connection each at a time).
    pub clients: usize,
    /// The gateways' HTTP addresses: the A records of the resource's name.
    pub gateways: Vec<SocketAddr>,
    /// The `Host` header: the resource.
    pub host: String,
    /// The path of every `GET`.
    pub path: String,
    /// How long a client waits between an answer and its next request (zero: back to back).
    pub pause: Duration,
    /// A request not answered within this is a failure.
    pub request_timeout: Duration,
    /// How long a client tries to connect to one address before the next.
    pub connect_timeout: Duration,
}

impl LoadOptions {
    /// `clients` clients sending `GET /whoami` for `host` back to back to `gateways`.
    pub fn new(clients: usize, gateways: Vec<SocketAddr>, host: &str) -> LoadOptions {
        LoadOptions {
            clients,
            gateways,
            host: host.to_owned(),
            path: "/whoami".into(),
            pause: Duration::ZERO,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 200 and the whole body (its text when short, as `/whoami` names the target).
    Ok(String),
    /// Anything else: another status, a connection lost before the answer, a timeout, or no
    /// gateway accepting a connection.
    Failed(String),
}

/// One request as its client saw it.
#[derive(Debug, Clone)]
pub struct Record {
    /// Which client sent it.
    pub client: usize,
    /// Index in [`LoadOptions::gateways`] of the gateway its connection went to (`None`: no
    /// gateway accepted a connection).
    pub gateway: Option<usize>,
    /// When the client started it (connecting included, if it had to).
    pub start: Instant,
    /// When it ended: the whole answer read, or the failure seen.
    pub end: Instant,
    /// How it ended.
    pub outcome: Outcome,
}

impl Record {
    /// Whether it was answered 200 in full.
    pub fn ok(&self) -> bool {
        matches!(self.outcome, Outcome::Ok(_))
    }

    /// The answer's text (for `/whoami`: the target that answered), if answered.
    pub fn answer(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Ok(text) => Some(text),
            Outcome::Failed(_) => None,
        }
    }

    /// Whether it was under way at some moment of `[at, until]`: started by `until` and not
    /// ended before `at`.
    pub fn in_flight_during(&self, at: Instant, until: Instant) -> bool {
        self.start <= until && self.end >= at
    }
}

/// The running load. Dropping it stops the clients.
#[derive(Debug)]
pub struct Load {
    records: Arc<parking_lot::Mutex<Vec<Record>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    opts: LoadOptions,
}

impl Load {
    /// Starts the clients.
    pub fn start(opts: LoadOptions) -> Load {
        assert!(!opts.gateways.is_empty(), "the load needs a gateway");
        let records = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..opts.clients)
            .map(|i| {
                let client = Client {
                    index: i,
                    opts: opts.clone(),
                    records: Arc::clone(&records),
                    stop: Arc::clone(&stop),
                };
                tokio::spawn(client.run())
            })
            .collect();
        Load {
            records,
            stop,
            tasks,
            opts,
        }
    }

    /// What it was started with.
    pub fn options(&self) -> &LoadOptions {
        &self.opts
    }

    /// Waits until every client has been answered at least once since `since`.
    pub async fn wait_all_answered(&self, since: Instant, timeout: Duration) -> anyhow::Result<()> {
        crate::wait_for("every load client to be answered", timeout, || async {
            let records = self.records.lock();
            let mut answered = vec![false; self.opts.clients];
            for r in records.iter().filter(|r| r.ok() && r.start >= since) {
                answered[r.client] = true;
            }
            let failures: Vec<&Record> = records
                .iter()
                .filter(|r| !r.ok() && r.start >= since)
                .collect();
            anyhow::ensure!(
                failures.len() < 1000,
                "requests fail: {:?}",
                failures.last().map(|r| &r.outcome)
            );
            Ok(answered.iter().all(|a| *a).then_some(()))
        })
        .await
    }

    /// A copy of the records so far.
    pub fn records(&self) -> Vec<Record> {
        self.records.lock().clone()
    }

    /// Stops the clients (each after the request it has under way) and returns every record.
    pub async fn stop(mut self) -> Vec<Record> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        let mut records = self.records.lock().clone();
        records.sort_by_key(|r| r.start);
        records
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in &self.tasks {
            t.abort();
        }
    }
}

type Sender = SendRequest<Empty<Bytes>>;

struct Client {
    index: usize,
    opts: LoadOptions,
    records: Arc<parking_lot::Mutex<Vec<Record>>>,
    stop: Arc<AtomicBool>,
}

impl Client {
    async fn run(self) {
        let mut conn: Option<(usize, Sender)> = None;
        while !self.stop.load(Ordering::SeqCst) {
            let start = Instant::now();
            let (gateway, outcome) =
                match tokio::time::timeout(self.opts.request_timeout, self.one(&mut conn)).await {
                    Ok(done) => done,
                    Err(_) => {
                        let gateway = conn.take().map(|(g, _)| g);
                        (gateway, Outcome::Failed("timed out".into()))
                    }
                };
            let failed = matches!(outcome, Outcome::Failed(_));
            self.records.lock().push(Record {
                client: self.index,
                gateway,
                start,
                end: Instant::now(),
                outcome,
            });
            if failed {
                // A failed connection is not used again; a client with nowhere to connect
                // does not spin.
                conn = None;
                if gateway.is_none() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            if !self.opts.pause.is_zero() {
                tokio::time::sleep(self.opts.pause).await;
            }
        }
    }

    /// One request: on the kept connection if it is still open, else on a new one; a request
    /// given back unsent goes once more on a new connection.
    async fn one(&self, conn: &mut Option<(usize, Sender)>) -> (Option<usize>, Outcome) {
        let mut request = self.request();
        for _ in 0..3 {
            let kept = match conn.take() {
                Some((g, mut s)) => s.ready().await.is_ok().then_some((g, s)),
                None => None,
            };
            let (gateway, mut sender) = match kept {
                Some(c) => c,
                None => match self.connect().await {
                    Some(c) => c,
                    None => {
                        return (
                            None,
                            Outcome::Failed("no gateway accepted a connection".into()),
                        )
                    }
                },
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let status = response.status();
                    return match response.into_body().collect().await {
                        Ok(body) if status == 200 => {
                            *conn = Some((gateway, sender));
                            let body = body.to_bytes();
                            let text = if body.len() <= 64 {
                                String::from_utf8_lossy(&body).into_owned()
                            } else {
                                format!("{} bytes", body.len())
                            };
                            (Some(gateway), Outcome::Ok(text))
                        }
                        Ok(body) => (
                            Some(gateway),
                            Outcome::Failed(format!(
                                "status {status}: {}",
                                String::from_utf8_lossy(&body.to_bytes()).trim()
                            )),
                        ),
                        Err(e) => (Some(gateway), Outcome::Failed(format!("body: {e}"))),
                    };
                }
                Err(mut e) => match e.take_message() {
                    // Not sent: the connection had closed. Again on a new one.
                    Some(unsent) => request = unsent,
                    None => {
                        return (
                            Some(gateway),
                            Outcome::Failed(format!("{}", e.into_error())),
                        )
                    }
                },
            }
        }
        (
            None,
            Outcome::Failed("connections closed before the request went".into()),
        )
    }

    fn request(&self) -> http::Request<Empty<Bytes>> {
        let mut req = http::Request::new(Empty::new());
        *req.uri_mut() = self
            .opts
            .path
            .parse()
            .unwrap_or_else(|_| http::Uri::from_static("/"));
        if let Ok(host) = http::HeaderValue::from_str(&self.opts.host) {
            req.headers_mut().insert(http::header::HOST, host);
        }
        req
    }

    /// Tries the addresses in this client's order; the first that accepts.
    async fn connect(&self) -> Option<(usize, Sender)> {
        let n = self.opts.gateways.len();
        for k in 0..n {
            let g = (self.index + k) % n;
            let Ok(Ok(tcp)) = tokio::time::timeout(
                self.opts.connect_timeout,
                tokio::net::TcpStream::connect(self.opts.gateways[g]),
            )
            .await
            else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let Ok((sender, connection)) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await
            else {
                continue;
            };
            tokio::spawn(connection);
            return Some((g, sender));
        }
        None
    }
}

/// A fault's moment: from just before it was caused to when causing it was done (a killed
/// process reaped, a command returned).
#[derive(Debug, Clone, Copy)]
pub struct Fault {
    /// Just before the fault was caused.
    pub at: Instant,
    /// Once causing it was done.
    pub until: Instant,
}

impl Fault {
    /// Runs `cause` and returns the moment around it.
    pub fn cause(cause: impl FnOnce()) -> Fault {
        let at = Instant::now();
        cause();
        Fault {
            at,
            until: Instant::now(),
        }
    }
}

/// The figures of one window of load.
#[derive(Debug, Clone)]
pub struct Figures {
    /// Clients.
    pub clients: usize,
    /// Whether the window held a fault (the allowance and the return are about it).
    pub with_fault: bool,
    /// The window's length.
    pub window: Duration,
    /// Requests answered 200 in full.
    pub ok: usize,
    /// Requests failed.
    pub failed: usize,
    /// Requests in flight on the killed part at the fault (the only ones allowed to fail).
    pub in_flight_on_killed: usize,
    /// Of those, how many failed.
    pub failed_in_flight: usize,
    /// Failures outside the allowance, oldest first: each one a broken promise.
    pub unexpected: Vec<Record>,
    /// The longest time any one client went without an answer (between two answers, or from
    /// the window's start or to its end).
    pub longest_gap: Duration,
    /// With a fault: from the fault until every client was answered a request it started
    /// after the fault (`None`: some client never was).
    pub back_after: Option<Duration>,
    /// Latency of the answered requests.
    pub latency: Summary,
}

impl Figures {
    /// The figures of the requests that started in `[from, to]`. With a fault,
    /// `on_killed_part` says which requests count as on the killed part (it is asked only of
    /// requests in flight at the fault).
    pub fn of(
        records: &[Record],
        clients: usize,
        from: Instant,
        to: Instant,
        fault: Option<Fault>,
        on_killed_part: impl Fn(&Record) -> bool,
    ) -> Figures {
        let window: Vec<&Record> = records
            .iter()
            .filter(|r| r.start >= from && r.start <= to)
            .collect();
        let allowed = |r: &Record| {
            fault.is_some_and(|f| r.in_flight_during(f.at, f.until) && on_killed_part(r))
        };
        let in_flight_on_killed = window.iter().filter(|r| allowed(r)).count();
        let failed: Vec<&Record> = window.iter().copied().filter(|r| !r.ok()).collect();
        let failed_in_flight = failed.iter().filter(|r| allowed(r)).count();
        let unexpected: Vec<Record> = failed
            .iter()
            .filter(|r| !allowed(r))
            .map(|r| (*r).clone())
            .collect();

        let mut longest_gap = Duration::ZERO;
        let mut back_after = Some(Duration::ZERO);
        for c in 0..clients {
            let mut answered: Vec<Instant> = window
                .iter()
                .filter(|r| r.client == c && r.ok())
                .map(|r| r.end)
                .collect();
            answered.sort();
            let mut last = from;
            for end in answered.iter().copied().chain([to]) {
                longest_gap = longest_gap.max(end.saturating_duration_since(last));
                last = last.max(end);
            }
            if let Some(f) = fault {
                let first = window
                    .iter()
                    .filter(|r| r.client == c && r.ok() && r.start >= f.until)
                    .map(|r| r.end)
                    .min();
                back_after = match (back_after, first) {
                    (Some(b), Some(end)) => Some(b.max(end.saturating_duration_since(f.at))),
                    _ => None,
                };
            }
        }
        if fault.is_none() {
            back_after = None;
        }
        let latency: Vec<Duration> = window
            .iter()
            .filter(|r| r.ok())
            .map(|r| r.end.saturating_duration_since(r.start))
            .collect();
        Figures {
            clients,
            with_fault: fault.is_some(),
            window: to.saturating_duration_since(from),
            ok: window.len() - failed.len(),
            failed: failed.len(),
            in_flight_on_killed,
            failed_in_flight,
            unexpected,
            longest_gap,
            back_after,
            latency: Summary::of(&latency),
        }
    }

    /// The first few unexpected failures, for an assertion message.
    pub fn unexpected_sample(&self) -> String {
        self.unexpected
            .iter()
            .take(5)
            .map(|r| {
                format!(
                    "client {} on gateway {:?}: {:?} after {}",
                    r.client,
                    r.gateway,
                    r.outcome,
                    ms(r.end.saturating_duration_since(r.start))
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} clients for {:.1} s: {} ok, {} failed",
            self.clients,
            self.window.as_secs_f64(),
            self.ok,
            self.failed,
        )?;
        if self.with_fault {
            write!(
                f,
                " ({} of the {} in flight on the killed part, {} other)",
                self.failed_in_flight,
                self.in_flight_on_killed,
                self.unexpected.len(),
            )?;
        }
        write!(
            f,
            "; longest gap without an answer {}",
            ms(self.longest_gap)
        )?;
        if let Some(b) = self.back_after {
            write!(f, "; service back after {}", ms(b))?;
        }
        write!(
            f,
            "; latency p50 {} p99 {} max {}",
            ms(self.latency.p50),
            ms(self.latency.p99),
            ms(self.latency.max)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(client: usize, start_ms: u64, end_ms: u64, ok: bool, t0: Instant) -> Record {
        Record {
            client,
            gateway: Some(client % 2),
            start: t0 + Duration::from_millis(start_ms),
            end: t0 + Duration::from_millis(end_ms),
            outcome: if ok {
                Outcome::Ok("a".into())
            } else {
                Outcome::Failed("reset".into())
            },
        }
    }

    #[test]
    fn only_failures_in_flight_on_the_killed_part_are_allowed_and_gaps_and_return_are_measured() {
        let t0 = Instant::now();
        let fault = Fault {
            at: t0 + Duration::from_millis(100),
            until: t0 + Duration::from_millis(110),
        };
        let records = vec![
            // Client 0 on gateway 0 (survives): answered throughout.
            rec(0, 0, 50, true, t0),
            rec(0, 50, 100, true, t0),
            rec(0, 100, 150, true, t0),
            rec(0, 150, 200, true, t0),
            // Client 1 on gateway 1 (killed): in flight at the kill, fails; back at 400.
            rec(1, 0, 60, true, t0),
            rec(1, 60, 105, false, t0),
            rec(1, 300, 400, true, t0),
            // Client 3 on gateway 1: a failure that started after the kill is not allowed.
            rec(3, 0, 90, true, t0),
            rec(3, 120, 130, false, t0),
            rec(3, 130, 180, true, t0),
        ];
        let to = t0 + Duration::from_millis(500);
        let f = Figures::of(&records, 4, t0, to, Some(fault), |r| r.gateway == Some(1));
        assert_eq!((f.ok, f.failed), (8, 2));
        assert_eq!(f.in_flight_on_killed, 1);
        assert_eq!(f.failed_in_flight, 1);
        assert_eq!(f.unexpected.len(), 1);
        assert_eq!(f.unexpected[0].client, 3);
        // Client 2 sent nothing: never answered, so the gap is the whole window and it is
        // not back.
        assert_eq!(f.longest_gap, Duration::from_millis(500));
        assert_eq!(f.back_after, None);
        let f = Figures::of(&records, 2, t0, to, Some(fault), |r| r.gateway == Some(1));
        // Client 1: 60 -> 400; client 0: 200 -> 500 (the window's end).
        assert_eq!(f.longest_gap, Duration::from_millis(340));
        assert_eq!(f.back_after, Some(Duration::from_millis(300)));
        assert_eq!(f.latency.count, 8);
    }
}
