//! The UDP-blocked fallback: WireGuard datagrams carried over a WebSocket on the gateway's HTTPS
//! port, when UDP between an agent and a gateway gets no answer.
//!
//! Why a WebSocket, and not RFC 9298 CONNECT-UDP: UDP is what is blocked, so HTTP/3 is out, and
//! CONNECT-UDP over HTTP/2 needs extended CONNECT plus the capsule protocol, which proxies and
//! middleboxes that let HTTPS through pass far less often than an HTTP/1.1 WebSocket upgrade
//! (cloudflared's own fallback is HTTP/2 over TCP for the same reason). Each WebSocket binary
//! message is one WireGuard datagram, unchanged: the payload is already encrypted and
//! authenticated end to end by WireGuard, so the gateway accepts exactly the peers it accepts over
//! UDP, and TLS around it only makes the connection look like any other HTTPS. The agent therefore
//! does not verify the gateway's certificate (the gateway answers the fixed name
//! [`RELAY_SERVER_NAME`] with a throwaway self-signed one): a man in the middle sees what it would
//! see of UDP, WireGuard ciphertext.
//!
//! - Agent: [`Fallback`] watches the paths ([`Tunnel::watch_paths`]), opens a WebSocket to the
//!   gateway's address on the fallback port when UDP is blocked, and attaches it as the
//!   gateway's relay. The tunnel probes UDP now and then and detaches the relay when UDP answers.
//! - Gateway: [`serve_relay`] runs one accepted WebSocket as a relay standing for an address in
//!   the discard prefix; WireGuard moves the peer's endpoint there on its first authenticated
//!   packet, as when a peer roams.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use kakuremichi_tunnel::{PathEvent, PathSettings, Relay, Tunnel, MAX_DATAGRAM_SIZE};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The path of the relay WebSocket on a gateway's HTTPS port.
pub const RELAY_PATH: &str = "/.well-known/kakuremichi/wireguard";
/// The TLS server name agents ask for; gateways answer it with a self-signed certificate.
pub const RELAY_SERVER_NAME: &str = "wireguard.kakuremichi.invalid";
/// How long opening the WebSocket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Datagrams written to the WebSocket before it is flushed.
const FLUSH_EVERY: usize = 64;

/// The agent's fallback settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FallbackSettings {
    /// The gateways' HTTPS port (the same on every gateway).
    pub port: u16,
    /// When UDP counts as blocked and how often it is probed.
    pub path: PathSettings,
}

/// WebSocket limits for relays: one message is one datagram.
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_DATAGRAM_SIZE + 64))
        .max_frame_size(Some(MAX_DATAGRAM_SIZE + 64))
}

/// Carries datagrams between `ws` and `relay` until either ends; returns how many datagrams went
/// each way (in, out).
pub async fn pump<S>(ws: WebSocketStream<S>, mut relay: Relay) -> (u64, u64)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let (mut got, mut sent) = (0u64, 0u64);
    loop {
        tokio::select! {
            message = stream.next() => match message {
                Some(Ok(Message::Binary(datagram))) => {
                    if datagram.len() <= MAX_DATAGRAM_SIZE {
                        got += 1;
                        if !relay.send(datagram) {
                            break;
                        }
                    }
                }
                // Pings are answered by the library on the next write; text is not ours.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Text(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => break,
                Some(Err(error)) => {
                    tracing::debug!(%error, "relay WebSocket failed");
                    break;
                }
            },
            datagram = relay.recv() => {
                let Some(datagram) = datagram else { break };
                let mut batch = 0;
                let mut next = Some(datagram);
                let mut failed = false;
                while let Some(d) = next.take() {
                    sent += 1;
                    if sink.feed(Message::Binary(d)).await.is_err() {
                        failed = true;
                        break;
                    }
                    batch += 1;
                    if batch < FLUSH_EVERY {
                        next = relay.try_recv();
                    }
                }
                if failed || sink.flush().await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = sink.close().await;
    (got, sent)
}

/// Gateway side: serves one accepted relay WebSocket (already upgraded) on `tunnel`.
pub async fn serve_relay<S>(io: S, tunnel: Tunnel, client: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    static RELAYS: AtomicU64 = AtomicU64::new(1);
    let n = RELAYS.fetch_add(1, Ordering::Relaxed);
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(websocket_config())).await;
    let relay = tunnel.attach_relay(kakuremichi_tunnel::relay_address(n));
    tracing::info!(%client, relay = n, "a peer carries WireGuard over a WebSocket (UDP blocked on its side)");
    let (got, sent) = pump(ws, relay).await;
    tracing::info!(%client, relay = n, datagrams_in = got, datagrams_out = sent, "relay closed");
}

/// Agent side: the fallback manager of one bound tunnel. Dropping it (or aborting its task)
/// ends every relay it opened.
#[derive(Debug)]
pub struct Fallback;

impl Fallback {
    /// Watches `tunnel`'s paths and opens relays as they are needed, until the tunnel shuts
    /// down or the task is aborted.
    pub async fn run(tunnel: Tunnel, settings: FallbackSettings) {
        let mut events = tunnel.watch_paths(settings.path);
        let mut relays: JoinSet<()> = JoinSet::new();
        let mut running: HashMap<SocketAddr, tokio::task::AbortHandle> = HashMap::new();
        while let Some(event) = events.recv().await {
            match event {
                PathEvent::Blocked(gateway) => {
                    if running.get(&gateway).is_some_and(|h| !h.is_finished()) {
                        continue;
                    }
                    let via = SocketAddr::new(gateway.ip(), settings.port);
                    tracing::warn!(
                        %gateway,
                        %via,
                        "UDP to the gateway gets no answer: carrying WireGuard over a WebSocket on its HTTPS port"
                    );
                    let handle = relays.spawn(open_relay(tunnel.clone(), gateway, via));
                    running.insert(gateway, handle);
                }
                PathEvent::Restored(gateway) => {
                    tracing::info!(%gateway, "UDP works again: WireGuard is back on UDP");
                    running.remove(&gateway);
                }
            }
            while relays.try_join_next().is_some() {}
        }
    }
}

async fn open_relay(tunnel: Tunnel, gateway: SocketAddr, via: SocketAddr) {
    let ws = match tokio::time::timeout(CONNECT_TIMEOUT, connect(via)).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(error)) => {
            tracing::warn!(%gateway, %via, %error, "cannot open the relay WebSocket; retrying while UDP stays blocked");
            return;
        }
        Err(_) => {
            tracing::warn!(%gateway, %via, "opening the relay WebSocket timed out; retrying while UDP stays blocked");
            return;
        }
    };
    let relay = tunnel.attach_relay(gateway);
    tracing::info!(%gateway, %via, "relay open: WireGuard runs over the WebSocket");
    let (got, sent) = pump(ws, relay).await;
    tracing::info!(%gateway, datagrams_in = got, datagrams_out = sent, "relay closed");
}

/// Why a relay WebSocket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// TCP or TLS failed.
    #[error("cannot connect: {0}")]
    Io(#[from] std::io::Error),
    /// The WebSocket handshake failed (e.g. the gateway has no relay, or no HTTPS there).
    #[error("WebSocket handshake failed: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
}

/// Opens the relay WebSocket to a gateway's HTTPS listener at `addr`.
pub async fn connect(
    addr: SocketAddr,
) -> Result<WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>, RelayError> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(RELAY_SERVER_NAME)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let tls = tokio_rustls::TlsConnector::from(client_config()?)
        .connect(name, tcp)
        .await?;
    let url = format!("wss://{RELAY_SERVER_NAME}{RELAY_PATH}");
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(url, tls, Some(websocket_config())).await?;
    Ok(ws)
}

fn client_config() -> std::io::Result<Arc<rustls::ClientConfig>> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| kakuremichi_tunnel::tls::relay_client_config(b"http/1.1"))
        .clone()
        .map_err(std::io::Error::other)
}
