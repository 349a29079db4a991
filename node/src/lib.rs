//! What gateways and agents share: enrollment, the on-disk node state and config cache, the
//! control-channel client, and a sans-IO jittered backoff.
//!
//! This crate knows nodes, not traffic: it must never know about HTTP routing or agent targets
//! (those belong to `kakuremichi-gateway` and `kakuremichi-agent`), and the control channel it runs
//! is never needed for the data plane: a node serves from its cached config while control is away.

pub mod backoff;
pub mod channel;
pub mod enroll;
pub mod state;

pub use backoff::Backoff;
pub use channel::{run_channel, ChannelConfig, ChannelState, NodeHooks};
pub use enroll::{enroll, load_or_enroll, EnrollError};
pub use state::{write_atomic, ConfigCache, NodeState, PrivateKey, StateError};

/// The software version nodes report to control.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");
