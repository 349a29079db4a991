//! The kakuremichi gateway: a public HTTP/1.1 reverse proxy that routes each request by `Host` to
//! a resource's agent, through a userspace WireGuard tunnel (`kakuremichi-tunnel`), and a control
//! channel client (`kakuremichi-node`) that keeps its routes and peers up to date.
//!
//! The gateway must never depend on control at request time: routes, peers and learned agent
//! endpoints live in memory and on disk (`config.json`, `peers.json`), so it keeps serving (and
//! restarts into serving) while control is down. It never buffers whole bodies.

pub mod apply;
pub mod config;
pub mod gateway;
pub mod h3;
pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod routing;
pub mod tcp;
pub mod tls;
pub mod udp;

pub use gateway::{Gateway, GatewayOptions};
pub use listener::{serve_http, serve_http_with, serve_https_with, ListenerLimits};
pub use proxy::{Proxy, ProxyTimeouts, Upstream, UpstreamIo};
pub use routing::RouteTable;
