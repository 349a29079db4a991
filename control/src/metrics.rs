//! Prometheus text metrics: nodes online by kind, config version, API requests.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kakuremichi_proto::NodeKind;

use crate::AppState;

/// Request counters by status class.
#[derive(Debug, Default)]
pub struct Metrics {
    by_class: [AtomicU64; 5],
}

impl Metrics {
    /// Counts one answered API request.
    pub fn count(&self, status: u16) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
    }
}

pub(crate) async fn count_requests(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let is_api = req.uri().path().starts_with("/api/");
    let resp = next.run(req).await;
    if is_api {
        state.metrics.count(resp.status().as_u16());
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
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
