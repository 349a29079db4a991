//! The kakuremichi gateway: a public HTTP/1.1, HTTP/2 and HTTP/3 reverse proxy (and TCP and UDP
//! port forwarder) that routes each request by `Host` to one of a resource's targets behind
//! agents, balanced over the healthy ones ([`balance`]), through a userspace WireGuard tunnel (`kakuremichi-tunnel`), and a control
//! channel client (`kakuremichi-node`) that keeps its routes and peers up to date.
//!
//! The gateway must never depend on control at request time: routes, peers and learned agent
//! endpoints live in memory and on disk (`config.json`, `peers.json`), so it keeps serving (and
//! restarts into serving) while control is down. It never buffers whole bodies.

pub mod apply;
pub mod auth;
pub mod balance;
pub mod body;
pub mod config;
pub mod gateway;
pub mod h3;
pub mod idle;
pub mod listener;
pub mod metrics;
pub mod ports;
pub mod proxy;
pub mod relay;
pub mod reload;
pub mod routing;
pub mod tcp;
pub mod tls;
pub mod udp;

pub use gateway::{Gateway, GatewayOptions};
pub use listener::{serve_http, serve_http_with, serve_https_with, ListenerLimits};
pub use proxy::{Proxy, ProxyTimeouts, Upstream, UpstreamIo};
pub use routing::RouteTable;
