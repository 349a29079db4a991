//! Config snapshots as nodes receive them: parsed, then planned against nothing and against the
//! previous input's snapshot (the peer diff, the agent's rebind decision, the gateway's change
//! plan and route table). Never a panic.
#![no_main]

use std::sync::Mutex;

use kakuremichi_proto::ConfigSnapshot;
use libfuzzer_sys::fuzz_target;

static PREVIOUS: Mutex<Option<ConfigSnapshot>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let Ok(snapshot) = serde_json::from_slice::<ConfigSnapshot>(data) else {
        return;
    };
    let mut previous = PREVIOUS.lock().unwrap_or_else(|e| e.into_inner());
    for old in [None, previous.as_ref()] {
        let _ = kakuremichi_node::plan::PeerChanges::plan(old, &snapshot);
        let _ = kakuremichi_node::plan::rebind_needed(old, &snapshot);
        let _ = kakuremichi_gateway::apply::plan(old, &snapshot);
    }
    let table = kakuremichi_gateway::routing::RouteTable::from_routes(&snapshot.routes);
    for r in &snapshot.routes {
        let _ = table.lookup(&r.hostname);
    }
    *previous = Some(snapshot);
});
