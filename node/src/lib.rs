//! What gateways and agents share: enrollment, the on-disk node state and config cache, the
//! rule for the control URL ([`control_url`]: HTTPS unless control is on loopback; a
//! comma-separated list of URLs for several control replicas), the control-channel client, a
//! sans-IO jittered backoff and the sans-IO choice of the control replica to try next
//! ([`failover`]), and the parts of a node runtime that do not
//! depend on its kind: the WireGuard tunnel slot ([`NodeTunnel`]), the applied snapshot
//! ([`AppliedConfig`]), snapshot diff helpers ([`plan`]), the
//! apply skeleton both kinds run ([`runtime`]), the settings every node binary has
//! ([`settings`]), the process scaffolding of the binaries ([`process`]: signals, draining),
//! SIGHUP reloads of the config file ([`reload`]), serving Prometheus metrics on their own
//! listener ([`metrics`]), the UDP-blocked fallback ([`relay`]) and returning freed heap memory
//! after a load ([`memory`]).
//!
//! This crate knows nodes, not traffic: it must never know about HTTP routing or agent targets
//! (those belong to `kakuremichi-gateway` and `kakuremichi-agent`), and the control channel it runs
//! is never needed for the data plane: a node serves from its cached config while control is away.

pub mod applied;
pub mod backoff;
pub mod channel;
pub mod control_url;
pub mod enroll;
pub mod failover;
pub mod memory;
pub mod metrics;
pub mod plan;
pub mod process;
pub mod relay;
pub mod reload;
pub mod runtime;
pub mod settings;
pub mod state;
pub mod traces;
pub mod tunnel;

pub use applied::{AppliedConfig, ApplyError, Applying};
pub use backoff::Backoff;
pub use channel::{run_channel, run_channel_until, ChannelConfig, ChannelState, NodeHooks};
pub use control_url::{check_control_url, check_control_urls, control_urls, ControlUrlError};
pub use enroll::{enroll, load_or_enroll, EnrollError};
pub use failover::Failover;
pub use runtime::{begin_apply, Apply};
pub use settings::{ConfigError, NodeSettings};
pub use state::{write_atomic, ConfigCache, NodeState, PrivateKey, StateError};
pub use tunnel::NodeTunnel;

/// The software version nodes report to control.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");
