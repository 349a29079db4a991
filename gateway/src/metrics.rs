//! Prometheus text metrics: requests by status, per-resource requests by status class, bytes
//! and a latency histogram, refused and open connections, routes, peers.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// One peer's counters, as last sampled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSample {
    /// Base64 public key.
    pub public_key: String,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Seconds since the last handshake.
    pub handshake_age_secs: Option<u64>,
}

/// Upper bounds (seconds) of the response-head latency histogram.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// One resource's counters.
#[derive(Debug, Default)]
pub struct ResourceCounters {
    /// Requests answered, by status class (index 0 = 1xx ... 4 = 5xx).
    classes: [AtomicU64; 5],
    /// Request body bytes from clients.
    pub bytes_in: AtomicU64,
    /// Response body bytes to clients.
    pub bytes_out: AtomicU64,
    /// Histogram of the time to the response head: counts per bucket of [`LATENCY_BUCKETS`],
    /// then +Inf.
    latency: [AtomicU64; 13],
    latency_sum_micros: AtomicU64,
    /// Open TCP flows (TCP resources).
    pub open_flows: AtomicI64,
}

impl ResourceCounters {
    /// Counts one answered request.
    pub fn record(&self, status: u16, latency: std::time::Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.classes[class].fetch_add(1, Ordering::Relaxed);
        let secs = latency.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros.fetch_add(
            u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

/// The gateway's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    resources: Mutex<BTreeMap<uuid::Uuid, Arc<ResourceCounters>>>,
    requests: Mutex<BTreeMap<u16, u64>>,
    refused: Mutex<BTreeMap<&'static str, u64>>,
    refused_requests: Mutex<BTreeMap<&'static str, u64>>,
    open_connections: AtomicUsize,
    routes: AtomicUsize,
    peers: Mutex<Vec<PeerSample>>,
    certificate_expiry: Mutex<Vec<(String, i64)>>,
    backends: Mutex<Vec<(uuid::Uuid, std::net::SocketAddrV4)>>,
    pool: std::sync::OnceLock<Arc<crate::balance::BackendPool>>,
    /// UDP datagrams through the tunnel: [to the agent, to the client] x [QUIC datagram, stream].
    udp_datagrams: [[AtomicU64; 2]; 2],
    /// Per resource, the (requests, 5xx) totals the last status report counted up to.
    reported: Mutex<BTreeMap<uuid::Uuid, (u64, u64)>>,
}

impl Metrics {
    /// Where target health comes from (set once by the gateway).
    pub fn set_pool(&self, pool: Arc<crate::balance::BackendPool>) {
        let _ = self.pool.set(pool);
    }

    /// Replaces the list of (resource, backend) pairs whose health is exported.
    pub fn set_backends(&self, backends: Vec<(uuid::Uuid, std::net::SocketAddrV4)>) {
        *self.backends.lock().unwrap_or_else(|e| e.into_inner()) = backends;
    }

    /// The counters of one resource (made on first use).
    pub fn resource(&self, id: uuid::Uuid) -> Arc<ResourceCounters> {
        Arc::clone(
            self.resources
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(id)
                .or_default(),
        )
    }

    /// Counts one answered request.
    pub fn record_request(&self, status: u16) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(status)
            .or_default() += 1;
    }

    /// Counts a UDP datagram carried through the tunnel: towards the agent or back to the
    /// client, as a QUIC datagram or on the flow's stream.
    pub fn record_udp_datagram(&self, to_agent: bool, as_quic_datagram: bool) {
        self.udp_datagrams[usize::from(!to_agent)][usize::from(!as_quic_datagram)]
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a client connection closed at once, by reason.
    pub fn record_refused_connection(&self, reason: &'static str) {
        *self
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    /// Counts a request answered by the gateway because it went over a limit, by reason.
    pub fn record_refused_request(&self, reason: &'static str) {
        *self
            .refused_requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    /// Requests each resource answered since the last call (for control's status report),
    /// from the cumulative counters; [`Metrics::traffic_undelivered`] gives back a report that
    /// did not reach control, so its requests are in the next one.
    pub fn traffic_since_last(&self) -> Vec<kakuremichi_proto::ResourceTraffic> {
        let totals: Vec<(uuid::Uuid, u64, u64)> = self
            .resources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, c)| {
                let classes: Vec<u64> = c
                    .classes
                    .iter()
                    .map(|n| n.load(Ordering::Relaxed))
                    .collect();
                (*id, classes.iter().sum(), classes[4])
            })
            .collect();
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (id, requests, errors) in totals {
            let last = reported.entry(id).or_default();
            let delta = kakuremichi_proto::ResourceTraffic {
                resource_id: id,
                requests: requests.saturating_sub(last.0),
                errors: errors.saturating_sub(last.1),
            };
            *last = (requests, errors);
            if delta.requests > 0 {
                out.push(delta);
            }
        }
        out
    }

    /// A report's traffic that did not reach control: counted again in the next one.
    pub fn traffic_undelivered(&self, traffic: &[kakuremichi_proto::ResourceTraffic]) {
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        for t in traffic {
            if let Some(last) = reported.get_mut(&t.resource_id) {
                last.0 = last.0.saturating_sub(t.requests);
                last.1 = last.1.saturating_sub(t.errors);
            }
        }
    }

    /// Sets the number of open client connections.
    pub fn set_open_connections(&self, n: usize) {
        self.open_connections.store(n, Ordering::Relaxed);
    }

    /// Sets the number of routes.
    pub fn set_routes(&self, n: usize) {
        self.routes.store(n, Ordering::Relaxed);
    }

    /// Replaces the expiry (unix ms) of each name of each certificate from control.
    pub fn set_certificate_expiry(&self, expiry: Vec<(String, i64)>) {
        *self
            .certificate_expiry
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = expiry;
    }

    /// Replaces the peer samples.
    pub fn set_peers(&self, peers: Vec<PeerSample>) {
        *self.peers.lock().unwrap_or_else(|e| e.into_inner()) = peers;
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP kakuremichi_gateway_requests_total HTTP requests answered, by status.\n",
        );
        out.push_str("# TYPE kakuremichi_gateway_requests_total counter\n");
        for (status, n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "kakuremichi_gateway_requests_total{{status=\"{status}\"}} {n}"
            );
        }
        out.push_str(
            "# HELP kakuremichi_gateway_connections_refused_total Client connections closed at \
             once, by the limit they hit.\n",
        );
        out.push_str("# TYPE kakuremichi_gateway_connections_refused_total counter\n");
        for (reason, n) in self
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "kakuremichi_gateway_connections_refused_total{{reason=\"{reason}\"}} {n}"
            );
        }
        out.push_str(
            "# HELP kakuremichi_gateway_requests_refused_total Requests cut or refused by the \
             gateway because they went over a limit, by the limit.\n",
        );
        out.push_str("# TYPE kakuremichi_gateway_requests_refused_total counter\n");
        for (reason, n) in self
            .refused_requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "kakuremichi_gateway_requests_refused_total{{reason=\"{reason}\"}} {n}"
            );
        }
        out.push_str(
            "# HELP kakuremichi_gateway_udp_datagrams_total UDP datagrams carried through the \
             tunnel, by direction and by how: a QUIC datagram, or the flow's stream (too large \
             for one, or the first of a flow).\n",
        );
        out.push_str("# TYPE kakuremichi_gateway_udp_datagrams_total counter\n");
        for (d, direction) in ["to_agent", "to_client"].iter().enumerate() {
            for (c, carried) in ["quic_datagram", "stream"].iter().enumerate() {
                let _ = writeln!(
                    out,
                    "kakuremichi_gateway_udp_datagrams_total{{direction=\"{direction}\",carried=\"{carried}\"}} {}",
                    self.udp_datagrams[d][c].load(Ordering::Relaxed)
                );
            }
        }
        out.push_str(
            "# HELP kakuremichi_gateway_certificate_expiry_seconds When each certificate from \
             control expires (unix seconds), by name.\n",
        );
        out.push_str("# TYPE kakuremichi_gateway_certificate_expiry_seconds gauge\n");
        for (name, at) in self
            .certificate_expiry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "kakuremichi_gateway_certificate_expiry_seconds{{name=\"{}\"}} {}",
                name.replace(['"', '\\', '\n'], "_"),
                at / 1000
            );
        }
        if let Some(pool) = self.pool.get() {
            out.push_str(
                "# HELP kakuremichi_gateway_target_up Whether a resource's target takes traffic \
                 (its agent is online and its health check passes).\n",
            );
            out.push_str("# TYPE kakuremichi_gateway_target_up gauge\n");
            let backends = self
                .backends
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            for (id, b) in &backends {
                let _ = writeln!(
                    out,
                    "kakuremichi_gateway_target_up{{resource_id=\"{id}\",target=\"{b}\"}} {}",
                    u8::from(pool.usable(*b))
                );
            }
            out.push_str(
                "# HELP kakuremichi_gateway_target_in_flight Requests and connections in flight \
                 to a resource's target.\n",
            );
            out.push_str("# TYPE kakuremichi_gateway_target_in_flight gauge\n");
            for (id, b) in &backends {
                let _ = writeln!(
                    out,
                    "kakuremichi_gateway_target_in_flight{{resource_id=\"{id}\",target=\"{b}\"}} {}",
                    pool.outstanding(*b)
                );
            }
        }
        out.push_str("# HELP kakuremichi_gateway_open_connections Open client connections.\n");
        out.push_str("# TYPE kakuremichi_gateway_open_connections gauge\n");
        let _ = writeln!(
            out,
            "kakuremichi_gateway_open_connections {}",
            self.open_connections.load(Ordering::Relaxed)
        );
        let resources: Vec<(uuid::Uuid, Arc<ResourceCounters>)> = self
            .resources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, c)| (*id, Arc::clone(c)))
            .collect();
        out.push_str(
            "# HELP kakuremichi_gateway_resource_requests_total Requests answered per resource, \
             by status class.\n",
        );
        out.push_str("# TYPE kakuremichi_gateway_resource_requests_total counter\n");
        for (id, c) in &resources {
            for (i, n) in c.classes.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "kakuremichi_gateway_resource_requests_total{{resource_id=\"{id}\",class=\"{}xx\"}} {n}",
                        i + 1
                    );
                }
            }
        }
        out.push_str("# TYPE kakuremichi_gateway_resource_bytes_in_total counter\n");
        for (id, c) in &resources {
            let _ = writeln!(
                out,
                "kakuremichi_gateway_resource_bytes_in_total{{resource_id=\"{id}\"}} {}",
                c.bytes_in.load(Ordering::Relaxed)
            );
        }
        out.push_str("# TYPE kakuremichi_gateway_resource_bytes_out_total counter\n");
        for (id, c) in &resources {
            let _ = writeln!(
                out,
                "kakuremichi_gateway_resource_bytes_out_total{{resource_id=\"{id}\"}} {}",
                c.bytes_out.load(Ordering::Relaxed)
            );
        }
        out.push_str("# TYPE kakuremichi_gateway_resource_open_flows gauge\n");
        for (id, c) in &resources {
            let _ = writeln!(
                out,
                "kakuremichi_gateway_resource_open_flows{{resource_id=\"{id}\"}} {}",
                c.open_flows.load(Ordering::Relaxed)
            );
        }
        out.push_str(
            "# HELP kakuremichi_gateway_resource_response_seconds Time to the response head.\n",
        );
        out.push_str("# TYPE kakuremichi_gateway_resource_response_seconds histogram\n");
        for (id, c) in &resources {
            let mut cumulative = 0;
            for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
                cumulative += c.latency[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "kakuremichi_gateway_resource_response_seconds_bucket{{resource_id=\"{id}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            cumulative += c.latency[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "kakuremichi_gateway_resource_response_seconds_bucket{{resource_id=\"{id}\",le=\"+Inf\"}} {cumulative}"
            );
            let _ = writeln!(
                out,
                "kakuremichi_gateway_resource_response_seconds_sum{{resource_id=\"{id}\"}} {}",
                c.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(
                out,
                "kakuremichi_gateway_resource_response_seconds_count{{resource_id=\"{id}\"}} {cumulative}"
            );
        }
        out.push_str("# HELP kakuremichi_gateway_routes Published hostnames.\n");
        out.push_str("# TYPE kakuremichi_gateway_routes gauge\n");
        let _ = writeln!(
            out,
            "kakuremichi_gateway_routes {}",
            self.routes.load(Ordering::Relaxed)
        );
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        out.push_str("# HELP kakuremichi_gateway_peers WireGuard peers configured.\n");
        out.push_str("# TYPE kakuremichi_gateway_peers gauge\n");
        let _ = writeln!(out, "kakuremichi_gateway_peers {}", peers.len());
        out.push_str("# TYPE kakuremichi_gateway_peer_tx_bytes counter\n");
        for p in peers.iter() {
            let _ = writeln!(
                out,
                "kakuremichi_gateway_peer_tx_bytes{{peer=\"{}\"}} {}",
                p.public_key, p.tx_bytes
            );
        }
        out.push_str("# TYPE kakuremichi_gateway_peer_rx_bytes counter\n");
        for p in peers.iter() {
            let _ = writeln!(
                out,
                "kakuremichi_gateway_peer_rx_bytes{{peer=\"{}\"}} {}",
                p.public_key, p.rx_bytes
            );
        }
        out.push_str("# TYPE kakuremichi_gateway_peer_handshake_age_seconds gauge\n");
        for p in peers.iter() {
            if let Some(age) = p.handshake_age_secs {
                let _ = writeln!(
                    out,
                    "kakuremichi_gateway_peer_handshake_age_seconds{{peer=\"{}\"}} {age}",
                    p.public_key
                );
            }
        }
        drop(peers);
        let mut process = kakuremichi_metrics::Exposition::new();
        kakuremichi_metrics::write_resident_memory(&mut process);
        out.push_str(&process.into_text());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.record_request(200);
        m.record_request(200);
        m.record_request(502);
        m.set_routes(3);
        m.set_peers(vec![PeerSample {
            public_key: "k".into(),
            tx_bytes: 1,
            rx_bytes: 2,
            handshake_age_secs: Some(4),
        }]);
        let text = m.render();
        assert!(text.contains("kakuremichi_gateway_requests_total{status=\"200\"} 2\n"));
        assert!(text.contains("kakuremichi_gateway_requests_total{status=\"502\"} 1\n"));
        assert!(text.contains("kakuremichi_gateway_routes 3\n"));
        assert!(text.contains("kakuremichi_gateway_peers 1\n"));
        assert!(text.contains("kakuremichi_gateway_peer_handshake_age_seconds{peer=\"k\"} 4\n"));
    }

    #[test]
    fn traffic_reports_what_came_since_the_last_one_and_an_undelivered_one_comes_again() {
        let m = Metrics::default();
        let (a, b) = (uuid::Uuid::from_u128(1), uuid::Uuid::from_u128(2));
        let ms = std::time::Duration::from_millis(1);
        for status in [200, 200, 503] {
            m.resource(a).record(status, ms);
        }
        m.resource(b).record(404, ms);
        let first = m.traffic_since_last();
        assert_eq!(
            first,
            [
                kakuremichi_proto::ResourceTraffic {
                    resource_id: a,
                    requests: 3,
                    errors: 1
                },
                kakuremichi_proto::ResourceTraffic {
                    resource_id: b,
                    requests: 1,
                    errors: 0
                },
            ]
        );
        // Nothing new: nothing reported (a quiet resource costs the report nothing).
        assert_eq!(m.traffic_since_last(), []);
        m.resource(a).record(200, ms);
        let second = m.traffic_since_last();
        assert_eq!(second[0].requests, 1);
        // That report was lost: its request is counted again with the next one's.
        m.traffic_undelivered(&second);
        m.resource(a).record(500, ms);
        assert_eq!(
            m.traffic_since_last(),
            [kakuremichi_proto::ResourceTraffic {
                resource_id: a,
                requests: 2,
                errors: 1
            }]
        );
    }

    #[test]
    fn per_resource_classes_bytes_and_histogram() {
        let m = Metrics::default();
        let id = uuid::Uuid::from_u128(7);
        let c = m.resource(id);
        c.record(200, std::time::Duration::from_micros(800));
        c.record(204, std::time::Duration::from_millis(30));
        c.record(502, std::time::Duration::from_secs(20));
        c.bytes_out.fetch_add(1234, Ordering::Relaxed);
        let text = m.render();
        let id = id.to_string();
        for line in [
            format!("kakuremichi_gateway_resource_requests_total{{resource_id=\"{id}\",class=\"2xx\"}} 2"),
            format!("kakuremichi_gateway_resource_requests_total{{resource_id=\"{id}\",class=\"5xx\"}} 1"),
            format!("kakuremichi_gateway_resource_bytes_out_total{{resource_id=\"{id}\"}} 1234"),
            format!("kakuremichi_gateway_resource_response_seconds_bucket{{resource_id=\"{id}\",le=\"0.001\"}} 1"),
            format!("kakuremichi_gateway_resource_response_seconds_bucket{{resource_id=\"{id}\",le=\"0.05\"}} 2"),
            format!("kakuremichi_gateway_resource_response_seconds_bucket{{resource_id=\"{id}\",le=\"10\"}} 2"),
            format!("kakuremichi_gateway_resource_response_seconds_bucket{{resource_id=\"{id}\",le=\"+Inf\"}} 3"),
            format!("kakuremichi_gateway_resource_response_seconds_count{{resource_id=\"{id}\"}} 3"),
        ] {
            assert!(text.contains(&line), "missing {line}\n{text}");
        }
    }

    #[test]
    fn target_health_and_in_flight() {
        let m = Metrics::default();
        let pool = Arc::new(crate::balance::BackendPool::default());
        m.set_pool(Arc::clone(&pool));
        let id = uuid::Uuid::from_u128(7);
        let a: std::net::SocketAddrV4 = "100.64.0.2:10000".parse().unwrap();
        let b: std::net::SocketAddrV4 = "100.64.0.3:10000".parse().unwrap();
        m.set_backends(vec![(id, a), (id, b)]);
        pool.lost(*b.ip());
        let target = crate::routing::RouteTarget {
            resource_id: id,
            addr: a,
            backends: vec![a, b],
            balance: kakuremichi_proto::Balance::RoundRobin,
            sticky: false,
            kind: kakuremichi_proto::StreamKind::Http,
            redirect_https: false,
            hsts_max_age: None,
            limits: Default::default(),
            proxy_protocol: vec![],
            access: None,
        };
        let lease = pool.pick(&target, None, &[]).unwrap();
        assert_eq!(lease.backend, a, "the offline agent's target is skipped");
        let text = m.render();
        for line in [
            format!("kakuremichi_gateway_target_up{{resource_id=\"{id}\",target=\"{a}\"}} 1"),
            format!("kakuremichi_gateway_target_up{{resource_id=\"{id}\",target=\"{b}\"}} 0"),
            format!(
                "kakuremichi_gateway_target_in_flight{{resource_id=\"{id}\",target=\"{a}\"}} 1"
            ),
        ] {
            assert!(text.contains(&line), "missing {line}\n{text}");
        }
        drop(lease);
        assert!(m.render().contains(&format!(
            "kakuremichi_gateway_target_in_flight{{resource_id=\"{id}\",target=\"{a}\"}} 0"
        )));
    }
}
