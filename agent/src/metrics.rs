//! The agent's Prometheus metrics (`--metrics-listen`): streams gateways opened (accepted by
//! kind, refused by reason, open now), per resource the HTTP requests by status class, the time
//! to the target's response head, bytes to and from the target and failed dials; target health;
//! WireGuard peers and their handshake age per gateway; sessions by phase; whether the control
//! channel is up; the applied config version; resident memory.
//!
//! Labels stay bounded: resources, targets, gateways, kinds, reasons and phases, never a
//! connection, a client or a session id. Counters of a resource the config no longer has are
//! dropped with it.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use kakuremichi_metrics::{Exposition, Histogram, Kind};
use kakuremichi_proto::{PeerStatus, SessionPhase, StreamKind, TargetStatus};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use uuid::Uuid;

/// The kinds of stream, in the order of the counters.
const KINDS: [StreamKind; 5] = [
    StreamKind::Http,
    StreamKind::Tcp,
    StreamKind::Udp,
    StreamKind::Health,
    StreamKind::Session,
];

fn kind_index(kind: StreamKind) -> usize {
    match kind {
        StreamKind::Http => 0,
        StreamKind::Tcp => 1,
        StreamKind::Udp => 2,
        StreamKind::Health => 3,
        StreamKind::Session => 4,
    }
}

fn kind_name(kind: StreamKind) -> &'static str {
    match kind {
        StreamKind::Http => "http",
        StreamKind::Tcp => "tcp",
        StreamKind::Udp => "udp",
        StreamKind::Health => "health",
        StreamKind::Session => "session",
    }
}

const PHASES: [SessionPhase; 6] = [
    SessionPhase::Creating,
    SessionPhase::Starting,
    SessionPhase::Active,
    SessionPhase::Stopping,
    SessionPhase::Stopped,
    SessionPhase::Failed,
];

fn phase_name(phase: SessionPhase) -> &'static str {
    match phase {
        SessionPhase::Creating => "creating",
        SessionPhase::Starting => "starting",
        SessionPhase::Active => "active",
        SessionPhase::Stopping => "stopping",
        SessionPhase::Stopped => "stopped",
        SessionPhase::Failed => "failed",
    }
}

/// Why a stream was reset before anything was dialed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It came from a WireGuard peer that is not one of this agent's gateways.
    UnknownPeer,
    /// Its header did not arrive in time.
    HeaderTimeout,
    /// Its header could not be decoded.
    BadHeader,
    /// Its header names a resource and port this agent does not serve.
    UnknownResource,
}

impl Refusal {
    const ALL: [Refusal; 4] = [
        Refusal::UnknownPeer,
        Refusal::HeaderTimeout,
        Refusal::BadHeader,
        Refusal::UnknownResource,
    ];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::UnknownPeer => "unknown_peer",
            Refusal::HeaderTimeout => "header_timeout",
            Refusal::BadHeader => "bad_header",
            Refusal::UnknownResource => "unknown_resource",
        }
    }
}

/// One resource's counters.
#[derive(Debug, Default)]
pub struct ResourceCounters {
    /// HTTP requests answered, by status class (index 0 = 1xx ... 4 = 5xx).
    requests: [AtomicU64; 5],
    /// Time from sending a request to the target to its response head.
    response: Histogram,
    /// Bytes sent to the target (request bodies, TCP and UDP payload).
    pub bytes_to_target: AtomicU64,
    /// Bytes received from the target.
    pub bytes_from_target: AtomicU64,
    /// Dials (or name look-ups) of the target that failed.
    dial_failures: AtomicU64,
}

impl ResourceCounters {
    /// Counts one HTTP request answered with `status`.
    pub fn record_request(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Records how long the target took to its response head.
    pub fn record_response_time(&self, d: std::time::Duration) {
        self.response.observe(d);
    }

    /// Counts a failed dial of the target.
    pub fn record_dial_failure(&self) {
        self.dial_failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// What the agent's state says at a scrape (the counters are kept in [`Metrics`]).
#[derive(Debug, Default)]
pub struct Sample {
    /// The WireGuard peers (gateways).
    pub peers: Vec<PeerStatus>,
    /// Each target's health (the check's verdict, else the last flow's outcome).
    pub targets: Vec<TargetStatus>,
    /// The phase of each session the agent knows.
    pub sessions: Vec<SessionPhase>,
    /// The applied config version.
    pub applied_version: u64,
    /// Whether control welcomed the control channel and it is still open.
    pub control_connected: bool,
}

/// The agent's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    resources: Mutex<BTreeMap<Uuid, Arc<ResourceCounters>>>,
    accepted: [AtomicU64; 5],
    open: [AtomicI64; 5],
    refused: [AtomicU64; 4],
    /// Gateway names by WireGuard public key (base64), from the applied config.
    gateways: Mutex<HashMap<String, String>>,
}

/// An accepted stream, open until dropped.
#[derive(Debug)]
pub struct OpenStream {
    metrics: Arc<Metrics>,
    kind: usize,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.metrics.open[self.kind].fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// The counters of one resource (made on first use).
    pub fn resource(&self, id: Uuid) -> Arc<ResourceCounters> {
        Arc::clone(
            self.resources
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(id)
                .or_default(),
        )
    }

    /// Drops the counters of resources not in `keep` (the applied config's).
    pub fn retain_resources(&self, keep: &std::collections::HashSet<Uuid>) {
        self.resources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| keep.contains(id));
    }

    /// Replaces the gateway names (public key in base64, name).
    pub fn set_gateways(&self, gateways: impl IntoIterator<Item = (String, String)>) {
        *self.gateways.lock().unwrap_or_else(|e| e.into_inner()) = gateways.into_iter().collect();
    }

    /// Counts an accepted stream of `kind`, open until the guard is dropped.
    pub fn accepted(self: &Arc<Self>, kind: StreamKind) -> OpenStream {
        let kind = kind_index(kind);
        self.accepted[kind].fetch_add(1, Ordering::Relaxed);
        self.open[kind].fetch_add(1, Ordering::Relaxed);
        OpenStream {
            metrics: Arc::clone(self),
            kind,
        }
    }

    /// Counts a stream reset before anything was dialed.
    pub fn refused(&self, why: Refusal) {
        let i = Refusal::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.refused[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of the counters and `sample`.
    pub fn render(&self, sample: &Sample) -> String {
        let mut e = Exposition::new();
        e.single(
            "kakuremichi_agent_config_version",
            Kind::Gauge,
            "The applied config version (0 before any).",
            sample.applied_version,
        );
        e.single(
            "kakuremichi_agent_control_connected",
            Kind::Gauge,
            "1 while the control channel is up (welcomed by control), else 0.",
            u8::from(sample.control_connected),
        );
        self.render_peers(&mut e, &sample.peers);
        self.render_streams(&mut e);
        self.render_resources(&mut e);
        e.family(
            "kakuremichi_agent_target_up",
            Kind::Gauge,
            "Whether a resource's target is healthy (its health check's verdict, else the \
             outcome of the last flow to it).",
        );
        for t in &sample.targets {
            let id = t.resource_id.to_string();
            e.sample(
                "kakuremichi_agent_target_up",
                &[("resource_id", &id), ("target", &t.target)],
                u8::from(t.reachable),
            );
        }
        e.family(
            "kakuremichi_agent_sessions",
            Kind::Gauge,
            "Agent sessions by phase (ended ones are kept for a while).",
        );
        for phase in PHASES {
            let n = sample.sessions.iter().filter(|p| **p == phase).count();
            e.sample(
                "kakuremichi_agent_sessions",
                &[("phase", phase_name(phase))],
                n,
            );
        }
        kakuremichi_metrics::write_resident_memory(&mut e);
        e.into_text()
    }

    fn render_peers(&self, e: &mut Exposition, peers: &[PeerStatus]) {
        let names = self.gateways.lock().unwrap_or_else(|e| e.into_inner());
        let labelled: Vec<(String, String, &PeerStatus)> = peers
            .iter()
            .map(|p| {
                let key = p.public_key.to_string();
                let name = names.get(&key).cloned().unwrap_or_default();
                (name, key, p)
            })
            .collect();
        drop(names);
        e.single(
            "kakuremichi_agent_peers",
            Kind::Gauge,
            "WireGuard peers (gateways) configured.",
            peers.len(),
        );
        e.family(
            "kakuremichi_agent_peer_handshake_age_seconds",
            Kind::Gauge,
            "Seconds since the last WireGuard handshake with each gateway (none before the first).",
        );
        for (name, key, p) in &labelled {
            if let Some(ms) = p.last_handshake_age_ms {
                e.sample(
                    "kakuremichi_agent_peer_handshake_age_seconds",
                    &[("gateway", name), ("peer", key)],
                    ms as f64 / 1000.0,
                );
            }
        }
        for (metric, help, pick) in [
            (
                "kakuremichi_agent_peer_tx_bytes_total",
                "WireGuard payload bytes sent to each gateway.",
                (|p: &PeerStatus| p.tx_bytes) as fn(&PeerStatus) -> u64,
            ),
            (
                "kakuremichi_agent_peer_rx_bytes_total",
                "WireGuard payload bytes received from each gateway.",
                |p: &PeerStatus| p.rx_bytes,
            ),
        ] {
            e.family(metric, Kind::Counter, help);
            for (name, key, p) in &labelled {
                e.sample(metric, &[("gateway", name), ("peer", key)], pick(p));
            }
        }
    }

    fn render_streams(&self, e: &mut Exposition) {
        e.family(
            "kakuremichi_agent_streams_accepted_total",
            Kind::Counter,
            "Streams from gateways that passed the checks, by kind.",
        );
        for kind in KINDS {
            e.sample(
                "kakuremichi_agent_streams_accepted_total",
                &[("kind", kind_name(kind))],
                self.accepted[kind_index(kind)].load(Ordering::Relaxed),
            );
        }
        e.family(
            "kakuremichi_agent_streams_open",
            Kind::Gauge,
            "Streams from gateways being served now, by kind.",
        );
        for kind in KINDS {
            e.sample(
                "kakuremichi_agent_streams_open",
                &[("kind", kind_name(kind))],
                self.open[kind_index(kind)].load(Ordering::Relaxed),
            );
        }
        e.family(
            "kakuremichi_agent_streams_refused_total",
            Kind::Counter,
            "Streams reset before anything was dialed, by reason.",
        );
        for (i, why) in Refusal::ALL.iter().enumerate() {
            e.sample(
                "kakuremichi_agent_streams_refused_total",
                &[("reason", why.as_str())],
                self.refused[i].load(Ordering::Relaxed),
            );
        }
    }

    fn render_resources(&self, e: &mut Exposition) {
        let resources: Vec<(String, Arc<ResourceCounters>)> = self
            .resources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, c)| (id.to_string(), Arc::clone(c)))
            .collect();
        e.family(
            "kakuremichi_agent_requests_total",
            Kind::Counter,
            "HTTP requests forwarded to each resource's target, by the status class answered.",
        );
        for (id, c) in &resources {
            for (i, n) in c.requests.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    let class = format!("{}xx", i + 1);
                    e.sample(
                        "kakuremichi_agent_requests_total",
                        &[("resource_id", id), ("class", &class)],
                        n,
                    );
                }
            }
        }
        e.family(
            "kakuremichi_agent_target_response_seconds",
            Kind::Histogram,
            "Time from sending a request to a resource's target to its response head.",
        );
        for (id, c) in &resources {
            if c.response.count() > 0 {
                e.histogram(
                    "kakuremichi_agent_target_response_seconds",
                    &[("resource_id", id)],
                    &c.response,
                );
            }
        }
        type Pick = fn(&ResourceCounters) -> &AtomicU64;
        let counters: [(&str, &str, Pick); 3] = [
            (
                "kakuremichi_agent_target_bytes_sent_total",
                "Bytes sent to each resource's target (request bodies, TCP and UDP payload).",
                |c| &c.bytes_to_target,
            ),
            (
                "kakuremichi_agent_target_bytes_received_total",
                "Bytes received from each resource's target (response bodies, TCP and UDP \
                 payload).",
                |c| &c.bytes_from_target,
            ),
            (
                "kakuremichi_agent_target_dial_failures_total",
                "Connections to each resource's target that could not be made.",
                |c| &c.dial_failures,
            ),
        ];
        for (metric, help, pick) in counters {
            e.family(metric, Kind::Counter, help);
            for (id, c) in &resources {
                e.sample(
                    metric,
                    &[("resource_id", id)],
                    pick(c).load(Ordering::Relaxed),
                );
            }
        }
    }
}

/// A body whose data frames are counted into a resource's bytes to or from its target.
#[derive(Debug)]
pub struct CountedBody<B> {
    inner: B,
    counters: Option<Arc<ResourceCounters>>,
    to_target: bool,
}

impl<B> CountedBody<B> {
    /// Counts `inner`'s data into `counters` (nothing when `None`): as bytes sent to the target
    /// when `to_target`, else as bytes received from it.
    pub fn new(inner: B, counters: Option<Arc<ResourceCounters>>, to_target: bool) -> Self {
        Self {
            inner,
            counters,
            to_target,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for CountedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some(c)) = (&polled, &this.counters) {
            if let Some(data) = frame.data_ref() {
                let n = data.len() as u64;
                if this.to_target {
                    c.bytes_to_target.fetch_add(n, Ordering::Relaxed);
                } else {
                    c.bytes_from_target.fetch_add(n, Ordering::Relaxed);
                }
            }
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

/// A connection to a target whose reads count as bytes from it and writes as bytes to it.
#[derive(Debug)]
pub struct CountedIo<T> {
    inner: T,
    counters: Arc<ResourceCounters>,
}

impl<T> CountedIo<T> {
    /// Counts `inner`'s traffic into `counters`.
    pub fn new(inner: T, counters: Arc<ResourceCounters>) -> Self {
        Self { inner, counters }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        this.counters
            .bytes_from_target
            .fetch_add(n, Ordering::Relaxed);
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            this.counters
                .bytes_to_target
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use kakuremichi_proto::WgPublicKey;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn lines(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn renders_streams_resources_targets_peers_and_sessions() {
        let m = Arc::new(Metrics::default());
        let id = Uuid::from_u128(7);
        let c = m.resource(id);
        c.record_request(200);
        c.record_request(204);
        c.record_request(502);
        c.record_response_time(std::time::Duration::from_millis(3));
        c.record_dial_failure();
        c.bytes_to_target.fetch_add(10, Ordering::Relaxed);
        c.bytes_from_target.fetch_add(20, Ordering::Relaxed);
        let open = m.accepted(StreamKind::Http);
        let _ = m.accepted(StreamKind::Tcp);
        m.refused(Refusal::UnknownResource);
        m.refused(Refusal::UnknownResource);
        m.refused(Refusal::UnknownPeer);
        let key = WgPublicKey([1; 32]);
        m.set_gateways([(key.to_string(), "edge \"1\"".to_owned())]);
        let sample = Sample {
            peers: vec![
                PeerStatus {
                    public_key: key,
                    endpoint: None,
                    last_handshake_age_ms: Some(2500),
                    tx_bytes: 5,
                    rx_bytes: 6,
                },
                PeerStatus {
                    public_key: WgPublicKey([2; 32]),
                    endpoint: None,
                    last_handshake_age_ms: None,
                    tx_bytes: 0,
                    rx_bytes: 0,
                },
            ],
            targets: vec![TargetStatus {
                resource_id: id,
                target: "127.0.0.1:9000".into(),
                reachable: false,
                error: Some("refused".into()),
            }],
            sessions: vec![
                SessionPhase::Active,
                SessionPhase::Active,
                SessionPhase::Failed,
            ],
            applied_version: 42,
            control_connected: true,
        };
        let text = m.render(&sample);
        let got = lines(&text);
        let id = id.to_string();
        let k = key.to_string();
        for want in [
            "kakuremichi_agent_config_version 42".to_owned(),
            "kakuremichi_agent_control_connected 1".to_owned(),
            "kakuremichi_agent_peers 2".to_owned(),
            format!("kakuremichi_agent_peer_handshake_age_seconds{{gateway=\"edge \\\"1\\\"\",peer=\"{k}\"}} 2.5"),
            format!("kakuremichi_agent_peer_tx_bytes_total{{gateway=\"edge \\\"1\\\"\",peer=\"{k}\"}} 5"),
            "kakuremichi_agent_streams_accepted_total{kind=\"http\"} 1".to_owned(),
            "kakuremichi_agent_streams_accepted_total{kind=\"tcp\"} 1".to_owned(),
            "kakuremichi_agent_streams_open{kind=\"http\"} 1".to_owned(),
            "kakuremichi_agent_streams_open{kind=\"tcp\"} 0".to_owned(),
            "kakuremichi_agent_streams_refused_total{reason=\"unknown_resource\"} 2".to_owned(),
            "kakuremichi_agent_streams_refused_total{reason=\"unknown_peer\"} 1".to_owned(),
            "kakuremichi_agent_streams_refused_total{reason=\"bad_header\"} 0".to_owned(),
            format!("kakuremichi_agent_requests_total{{resource_id=\"{id}\",class=\"2xx\"}} 2"),
            format!("kakuremichi_agent_requests_total{{resource_id=\"{id}\",class=\"5xx\"}} 1"),
            format!("kakuremichi_agent_target_response_seconds_bucket{{resource_id=\"{id}\",le=\"0.0025\"}} 0"),
            format!("kakuremichi_agent_target_response_seconds_bucket{{resource_id=\"{id}\",le=\"0.005\"}} 1"),
            format!("kakuremichi_agent_target_response_seconds_count{{resource_id=\"{id}\"}} 1"),
            format!("kakuremichi_agent_target_bytes_sent_total{{resource_id=\"{id}\"}} 10"),
            format!("kakuremichi_agent_target_bytes_received_total{{resource_id=\"{id}\"}} 20"),
            format!("kakuremichi_agent_target_dial_failures_total{{resource_id=\"{id}\"}} 1"),
            format!("kakuremichi_agent_target_up{{resource_id=\"{id}\",target=\"127.0.0.1:9000\"}} 0"),
            "kakuremichi_agent_sessions{phase=\"active\"} 2".to_owned(),
            "kakuremichi_agent_sessions{phase=\"failed\"} 1".to_owned(),
            "kakuremichi_agent_sessions{phase=\"creating\"} 0".to_owned(),
        ] {
            assert!(got.contains(&want.as_str()), "missing {want}\n{text}");
        }
        assert!(
            !got.iter()
                .any(|l| l.contains("handshake_age")
                    && l.contains(&WgPublicKey([2; 32]).to_string())),
            "a peer with no handshake has no age\n{text}"
        );
        assert!(
            !got.iter().any(|l| l.contains("class=\"4xx\"")),
            "classes with no request are left out\n{text}"
        );
        // Every family has its TYPE line, samples or not.
        for family in [
            "kakuremichi_agent_target_response_seconds histogram",
            "kakuremichi_agent_requests_total counter",
            "kakuremichi_agent_target_up gauge",
        ] {
            assert!(text.contains(&format!("# TYPE {family}\n")), "{family}");
        }
        drop(open);
        let text = m.render(&Sample::default());
        assert!(text.contains("kakuremichi_agent_streams_open{kind=\"http\"} 0\n"));
        assert!(text.contains("kakuremichi_agent_control_connected 0\n"));
    }

    #[test]
    fn a_resource_no_longer_configured_loses_its_series() {
        let m = Metrics::default();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        m.resource(a).record_request(200);
        m.resource(b).record_request(200);
        m.retain_resources(&[a].into_iter().collect());
        let text = m.render(&Sample::default());
        assert!(text.contains(&a.to_string()));
        assert!(!text.contains(&b.to_string()), "{text}");
    }

    #[tokio::test]
    async fn bodies_and_connections_count_their_bytes() {
        let c = Arc::new(ResourceCounters::default());
        let body = CountedBody::new(
            http_body_util::Full::new(Bytes::from_static(b"hello")),
            Some(Arc::clone(&c)),
            true,
        );
        assert_eq!(body.size_hint().exact(), Some(5), "the length is kept");
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"hello");
        let body = CountedBody::new(
            http_body_util::Full::new(Bytes::from_static(b"abc")),
            Some(Arc::clone(&c)),
            false,
        );
        body.collect().await.unwrap();
        assert_eq!(c.bytes_to_target.load(Ordering::Relaxed), 5);
        assert_eq!(c.bytes_from_target.load(Ordering::Relaxed), 3);

        let (near, mut far) = tokio::io::duplex(64);
        let mut io = CountedIo::new(near, Arc::clone(&c));
        io.write_all(b"0123456789").await.unwrap();
        far.write_all(b"xy").await.unwrap();
        let mut buf = [0u8; 2];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(c.bytes_to_target.load(Ordering::Relaxed), 15);
        assert_eq!(c.bytes_from_target.load(Ordering::Relaxed), 5);
    }
}
