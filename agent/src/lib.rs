//! The kakuremichi agent: runs next to private apps, keeps WireGuard sessions to its gateways
//! (outbound only, with persistent keepalives through NAT), accepts overlay TCP flows on the ports
//! control assigned to targets, and dials each flow's target with an ordinary socket.
//!
//! The agent must never accept a flow for a port control did not configure (such flows are
//! answered with RST), never open an inbound port of its own, and never need control to forward
//! traffic: it serves from its cached config while control is down.

pub mod agent;
pub mod apply;
pub mod config;
pub mod health;
pub mod http1;
pub mod metrics;
pub mod pipe;
pub mod reload;
pub mod sessions;

pub use agent::{Agent, AgentOptions};
