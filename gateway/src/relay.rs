//! The gateway side of the UDP-blocked fallback: a WebSocket upgrade at
//! [`RELAY_PATH`] on the HTTPS listener becomes one relay of the tunnel (see
//! `kakuremichi_node::relay` for the design). Only WireGuard datagrams travel on it, so it grants
//! nothing by itself: the peer still has to complete a WireGuard handshake with a key the config
//! names, as over UDP.

use std::net::SocketAddr;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kakuremichi_node::NodeTunnel;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

pub use kakuremichi_node::relay::{RELAY_PATH, RELAY_SERVER_NAME};

/// Whether `req` asks for the relay (the path, whatever the host).
pub fn is_relay_request<B>(req: &Request<B>) -> bool {
    req.uri().path() == RELAY_PATH
}

/// Answers a relay request: 101 and a relay task when it is a valid WebSocket upgrade over
/// HTTPS and the tunnel is up; a plain error otherwise.
pub fn accept<B, R>(
    mut req: Request<B>,
    tunnel: Option<&NodeTunnel>,
    client: SocketAddr,
    https: bool,
    body: impl Fn(&'static str) -> R,
) -> Response<R> {
    let refuse = |status: StatusCode, why: &'static str| {
        let mut r = Response::new(body(why));
        *r.status_mut() = status;
        r
    };
    if !https {
        return refuse(StatusCode::NOT_FOUND, "the relay is on the HTTPS port\n");
    }
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let version_13 = req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let (true, true, Some(key), &Method::GET) = (upgrade, version_13, key, req.method()) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "the relay takes a WebSocket upgrade (version 13)\n",
        );
    };
    let Some(tunnel) = tunnel.and_then(NodeTunnel::current) else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway has no tunnel yet\n",
        );
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                kakuremichi_node::relay::serve_relay(TokioIo::new(upgraded), tunnel, client).await;
            }
            Err(error) => tracing::debug!(%client, %error, "relay upgrade failed"),
        }
    });
    let accept = derive_accept_key(key.as_bytes());
    let mut r = Response::new(body(""));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}
