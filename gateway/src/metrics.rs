//! Prometheus text metrics: requests by status, routes, peers.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

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

/// The gateway's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<u16, u64>>,
    refused: Mutex<BTreeMap<&'static str, u64>>,
    open_connections: AtomicUsize,
    routes: AtomicUsize,
    peers: Mutex<Vec<PeerSample>>,
}

impl Metrics {
    /// Counts one answered request.
    pub fn record_request(&self, status: u16) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(status)
            .or_default() += 1;
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

    /// Sets the number of open client connections.
    pub fn set_open_connections(&self, n: usize) {
        self.open_connections.store(n, Ordering::Relaxed);
    }

    /// Sets the number of routes.
    pub fn set_routes(&self, n: usize) {
        self.routes.store(n, Ordering::Relaxed);
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
        out.push_str("# HELP kakuremichi_gateway_open_connections Open client connections.\n");
        out.push_str("# TYPE kakuremichi_gateway_open_connections gauge\n");
        let _ = writeln!(
            out,
            "kakuremichi_gateway_open_connections {}",
            self.open_connections.load(Ordering::Relaxed)
        );
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
        out
    }
}

/// Serves `GET /metrics` on `listener` forever.
pub async fn serve_metrics(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let metrics = Arc::clone(&metrics);
                    async move {
                        let mut response = if req.uri().path() == "/metrics" {
                            let mut r = Response::new(Full::new(Bytes::from(metrics.render())));
                            r.headers_mut().insert(
                                http::header::CONTENT_TYPE,
                                http::HeaderValue::from_static("text/plain; version=0.0.4"),
                            );
                            r
                        } else {
                            Response::new(Full::new(Bytes::from_static(b"not found\n")))
                        };
                        if req.uri().path() != "/metrics" {
                            *response.status_mut() = StatusCode::NOT_FOUND;
                        }
                        Ok::<_, Infallible>(response)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
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
}
