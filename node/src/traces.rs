//! Starting trace export for a node once it knows its id (after enrollment): `service.name`
//! `kakuremichi-gateway` or `kakuremichi-agent`, the node id as `service.instance.id` and
//! `kakuremichi.node.id`. Logging and the trace layer itself are set up by
//! [`crate::process::run_main`]; see `kakuremichi-telemetry`.

use anyhow::Context as _;
use kakuremichi_proto::NodeKind;
use kakuremichi_telemetry::{Service, TracesEndpoint};

use crate::state::NodeState;

/// Starts exporting this node's spans to `endpoint` (nothing when `None`).
pub fn start(
    endpoint: Option<&TracesEndpoint>,
    kind: NodeKind,
    state: &NodeState,
) -> anyhow::Result<()> {
    let Some(endpoint) = endpoint else {
        return Ok(());
    };
    let name = match kind {
        NodeKind::Gateway => "kakuremichi-gateway",
        NodeKind::Agent => "kakuremichi-agent",
    };
    kakuremichi_telemetry::start(
        endpoint,
        Service {
            name,
            instance_id: state.node_id.to_string(),
            attributes: vec![
                ("kakuremichi.node.id", state.node_id.to_string()),
                ("kakuremichi.node.kind", kind.to_string()),
            ],
        },
    )
    .context("cannot start exporting traces (--otlp-endpoint)")
}
