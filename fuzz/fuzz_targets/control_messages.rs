//! Control-channel messages as a node or control reads them off the WebSocket: anything parses
//! to a message or to an error, never a panic; a message that parses serializes back to the same
//! message.
#![no_main]

use kakuremichi_proto::{ControlMessage, NodeMessage};
use libfuzzer_sys::fuzz_target;

fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(data: &[u8]) {
    if let Ok(msg) = serde_json::from_slice::<T>(data) {
        let once = serde_json::to_value(&msg).expect("a parsed message serializes");
        let again: T = serde_json::from_value(once.clone()).expect("and parses again");
        let twice = serde_json::to_value(&again).expect("and serializes again");
        assert_eq!(once, twice, "a message changed on its way round");
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<ControlMessage>(data);
    round_trip::<NodeMessage>(data);
});
