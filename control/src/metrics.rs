//! Prometheus text metrics: nodes online by kind, config version, API requests by status class
//! and their latency, config snapshots sent to nodes (the fan-out of each change), leadership,
//! resident memory.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kakuremichi_metrics::{Exposition, Histogram, Kind};
use kakuremichi_proto::NodeKind;

use crate::AppState;

/// Request counters by status class, their latency, and snapshots sent by node kind.
#[derive(Debug, Default)]
pub struct Metrics {
    by_class: [AtomicU64; 5],
    latency: Histogram,
    /// Config snapshots sent: to gateways, to agents.
    snapshots_sent: [AtomicU64; 2],
}

impl Metrics {
    /// Counts one answered API request.
    pub fn count(&self, status: u16) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a config snapshot sent to a node.
    pub fn snapshot_sent(&self, kind: NodeKind) {
        self.snapshots_sent[kind_index(kind)].fetch_add(1, Ordering::Relaxed);
    }
}

fn kind_index(kind: NodeKind) -> usize {
    match kind {
        NodeKind::Gateway => 0,
        NodeKind::Agent => 1,
    }
}

pub(crate) async fn count_requests(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    // The node socket is one long request: it would say nothing about the API's latency.
    let path = req.uri().path();
    let is_api = path.starts_with("/api/") && path != kakuremichi_proto::NODE_WS_PATH;
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    if is_api {
        state.metrics.count(resp.status().as_u16());
        state.metrics.latency.observe(started.elapsed());
    }
    resp
}

pub(crate) async fn render(State(state): State<AppState>) -> impl IntoResponse {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP kakuremichi_nodes_online Nodes with an open control session, with any replica.\n# TYPE kakuremichi_nodes_online gauge"
    );
    for kind in [NodeKind::Gateway, NodeKind::Agent] {
        let _ = writeln!(
            out,
            "kakuremichi_nodes_online{{kind=\"{kind}\"}} {}",
            state.hub.online_count(kind)
        );
    }
    let _ = writeln!(
        out,
        "# HELP kakuremichi_nodes_connected_here Nodes whose control session this replica holds.\n# TYPE kakuremichi_nodes_connected_here gauge"
    );
    for kind in [NodeKind::Gateway, NodeKind::Agent] {
        let _ = writeln!(
            out,
            "kakuremichi_nodes_connected_here{{kind=\"{kind}\"}} {}",
            state.hub.connected_here(kind)
        );
    }
    let _ = writeln!(
        out,
        "# HELP kakuremichi_control_leader 1 on the control replica that runs the singleton work.\n# TYPE kakuremichi_control_leader gauge\nkakuremichi_control_leader {}",
        u8::from(state.replica.is_leader())
    );
    let _ = writeln!(
        out,
        "# HELP kakuremichi_config_version The current config version.\n# TYPE kakuremichi_config_version gauge\nkakuremichi_config_version {}",
        *state.store.subscribe().borrow()
    );
    let _ = writeln!(
        out,
        "# HELP kakuremichi_api_requests_total API requests answered, by status class.\n# TYPE kakuremichi_api_requests_total counter"
    );
    for (i, c) in state.metrics.by_class.iter().enumerate() {
        let _ = writeln!(
            out,
            "kakuremichi_api_requests_total{{class=\"{}xx\"}} {}",
            i + 1,
            c.load(Ordering::Relaxed)
        );
    }
    let mut e = Exposition::new();
    e.family(
        "kakuremichi_api_request_duration_seconds",
        Kind::Histogram,
        "Time to answer an API request (the node socket left out).",
    )
    .histogram(
        "kakuremichi_api_request_duration_seconds",
        &[],
        &state.metrics.latency,
    );
    e.family(
        "kakuremichi_config_snapshots_sent_total",
        Kind::Counter,
        "Config snapshots this replica sent to nodes (a change is sent to each node it concerns), \
         by node kind.",
    );
    for kind in [NodeKind::Gateway, NodeKind::Agent] {
        e.sample(
            "kakuremichi_config_snapshots_sent_total",
            &[("kind", &kind.to_string())],
            state.metrics.snapshots_sent[kind_index(kind)].load(Ordering::Relaxed),
        );
    }
    kakuremichi_metrics::write_resident_memory(&mut e);
    out.push_str(&e.into_text());
    (
        [(header::CONTENT_TYPE, kakuremichi_metrics::CONTENT_TYPE)],
        out,
    )
}
