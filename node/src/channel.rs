//! The control-channel client: one long-lived task per node that keeps a WebSocket to control,
//! receives config snapshots, hands them to the node, acknowledges what was applied and reports
//! status. It reconnects forever with jittered backoff; the data plane never waits for it.
//!
//! With several control URLs (control replicas, a comma-separated list), the channel starts at a
//! random one and, when its session fails or is lost, moves on to the next within a short
//! jittered delay; only once every URL failed in a row does it back off ([`Failover`]).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use kakuremichi_proto::{
    check_protocol_version, ConfigSnapshot, ControlMessage, NodeKind, NodeMessage, RefuseReason,
    Secret, StatusReport, WgPublicKey, NODE_WS_PATH, PROTOCOL_VERSION,
};
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::control_url::{control_urls, redact_url};
use crate::failover::Failover;
use crate::state::NodeState;

/// What the node binary provides to the channel.
pub trait NodeHooks: Send + Sync + 'static {
    /// Applies a snapshot. `Ok` makes the channel acknowledge it with `Applied{version}`; an `Err`
    /// is logged and not acknowledged (control keeps showing the old applied version).
    fn apply(&self, snapshot: ConfigSnapshot) -> impl Future<Output = Result<(), String>> + Send;

    /// A status report, sent every few seconds.
    fn status(&self) -> StatusReport;

    /// A report from [`NodeHooks::status`] that could not be sent (the socket failed): what it
    /// drained (a gateway's refusals) goes back, to ride on the next session's first report.
    fn undelivered(&self, report: StatusReport) {
        let _ = report;
    }

    /// Wakes the channel to send a status report at once, between ticks (an agent session
    /// changed phase); `None`: reports go on ticks only.
    fn status_wake(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }
}

/// The default [`ChannelConfig::connect_timeout`]: the kernel's first SYN and its resend 1 s
/// later, each with a second to be answered, time enough on any path a node should use.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Settings of the control channel.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    /// Control's base URL (`http://` or `https://`), or a comma-separated list of them (control
    /// replicas); the socket uses `ws://` or `wss://`.
    pub control_url: String,
    /// This node's kind.
    pub kind: NodeKind,
    /// This node's id.
    pub node_id: Uuid,
    /// The credential from enrollment.
    pub credential: Secret,
    /// This node's WireGuard public key.
    pub public_key: WgPublicKey,
    /// Reported software version.
    pub software_version: String,
    /// The data dir, named in error messages.
    pub data_dir: PathBuf,
    /// How often a status report is sent.
    pub status_interval: Duration,
    /// How often control is pinged.
    pub ping_interval: Duration,
    /// Reconnect when control said nothing for this long.
    pub idle_timeout: Duration,
    /// Timeout of one TCP connection attempt to one of control's addresses. An attempt that
    /// gets no answer (a path that drops packets) is given up after it and a new one made a
    /// backoff later: a new attempt sends its SYN at once, where the kernel would resend the
    /// first one only 1, 3, 7 s after it, so a path that works again is found within this plus
    /// a backoff, not seconds later.
    pub connect_timeout: Duration,
    /// Timeout of resolving control's host, of TLS and the upgrade once connected, and of the
    /// hello/welcome exchange.
    pub handshake_timeout: Duration,
    /// First reconnect delay, and the longest wait before trying another control URL that did
    /// not fail yet in this outage.
    pub backoff_base: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Delay before retrying after control refused the node.
    pub refused_retry: Duration,
}

impl ChannelConfig {
    /// Defaults for a node with this state.
    pub fn new(state: &NodeState, data_dir: PathBuf) -> Self {
        Self {
            control_url: state.control_url.clone(),
            kind: state.kind,
            node_id: state.node_id,
            credential: state.credential.clone(),
            public_key: state.private_key.public_key(),
            software_version: crate::SOFTWARE_VERSION.to_owned(),
            data_dir,
            status_interval: Duration::from_secs(5),
            ping_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
            connect_timeout: CONNECT_TIMEOUT,
            handshake_timeout: Duration::from_secs(10),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            refused_retry: Duration::from_secs(30),
        }
    }
}

/// Where the channel stands, for the binary and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelState {
    /// Not connected (yet or any more); retrying.
    Connecting,
    /// Welcomed by control.
    Connected,
    /// Control refused this node, or speaks a version this build does not support.
    Refused {
        /// Control's reason, if it sent one (`None` for a version this node refused).
        reason: Option<RefuseReason>,
        /// Explanation.
        message: String,
    },
}

/// Turns a control base URL into the node socket URL (one URL; see [`ws_urls`] for a list).
pub fn ws_url(control_url: &str) -> String {
    let base = control_url.trim().trim_end_matches('/');
    let base = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        base.to_owned()
    };
    format!("{base}{NODE_WS_PATH}")
}

/// The node socket URLs of a control URL or comma-separated list of them, in order.
pub fn ws_urls(control_url: &str) -> Vec<String> {
    control_urls(control_url)
        .iter()
        .map(|u| ws_url(u))
        .collect()
}

enum SessionEnd {
    /// Could not connect or the hello failed.
    Failed(String),
    /// A welcomed session ended.
    Lost(String),
    /// Control refused the node.
    Refused(RefuseReason, String),
    /// Control is busy; retry after about this long.
    Busy(Duration),
    /// Control speaks an unsupported protocol version.
    Incompatible(String),
    /// The node is shutting down.
    Stopped,
}

/// Runs the control channel forever (abort the task to stop it). `applied_version` is the version
/// of the cached config the node already runs, announced in the hello. With several control URLs
/// the channel starts at a random one and moves on when a session fails, is lost or control is
/// busy (see [`Failover`]); a refusal is retried at the same URL after
/// [`ChannelConfig::refused_retry`].
pub async fn run_channel<H: NodeHooks>(
    config: ChannelConfig,
    hooks: Arc<H>,
    applied_version: Option<u64>,
    state: watch::Sender<ChannelState>,
) {
    let (_never, stop) = watch::channel(false);
    run_channel_until(config, hooks, applied_version, state, stop).await;
}

/// [`run_channel`] until `stop` turns true (or its sender is dropped): a welcomed session then
/// says goodbye with a WebSocket close frame (`1001 going away`, "node shutting down"), so
/// control sees the node leave on purpose rather than lose its socket, and the task returns.
pub async fn run_channel_until<H: NodeHooks>(
    config: ChannelConfig,
    hooks: Arc<H>,
    mut applied_version: Option<u64>,
    state: watch::Sender<ChannelState>,
    mut stop: watch::Receiver<bool>,
) {
    let mut urls = ws_urls(&config.control_url);
    if urls.is_empty() {
        // Checked at start; should it be empty anyway, fail on the URL as given, visibly.
        urls.push(ws_url(&config.control_url));
    }
    let seed = rand::random::<u64>();
    let mut failover = Failover::new(urls.len(), config.backoff_base, config.backoff_max, seed);
    let mut in_outage = false;
    // The URL of the last welcomed session, to log the URL in use when it changes.
    let mut connected_to: Option<usize> = None;
    loop {
        state.send_replace(ChannelState::Connecting);
        let index = failover.current();
        let url = redact_url(&urls[index]);
        let mut welcomed = false;
        let end = session(
            &config,
            &urls[index],
            &*hooks,
            &mut applied_version,
            &state,
            &mut welcomed,
            connected_to != Some(index),
            &mut stop,
        )
        .await;
        if welcomed {
            failover.welcomed();
            in_outage = false;
            connected_to = Some(index);
        }
        let delay = match end {
            SessionEnd::Stopped => {
                state.send_replace(ChannelState::Connecting);
                return;
            }
            SessionEnd::Failed(error) | SessionEnd::Lost(error) => {
                if in_outage {
                    tracing::debug!(%url, %error, "control channel still down");
                } else {
                    tracing::warn!(
                        %url,
                        %error,
                        "control channel down; serving the last applied config and reconnecting"
                    );
                    in_outage = true;
                }
                failover.failed()
            }
            SessionEnd::Busy(after) => {
                tracing::debug!(%url, ?after, "control is busy; retrying later");
                failover.busy(after)
            }
            SessionEnd::Refused(reason, message) => {
                in_outage = true;
                if reason == RefuseReason::BadCredential {
                    tracing::error!(
                        %message,
                        "control refused this node's credential; re-enroll: delete {} and start \
                         with a new --token",
                        crate::state::NodeState::path(&config.data_dir).display()
                    );
                } else if reason == RefuseReason::Replaced {
                    tracing::error!(
                        %message,
                        "another session with this node's credential took over; is a second \
                         copy of this node running with the same data dir?"
                    );
                } else {
                    tracing::error!(?reason, %message, "control refused this node");
                }
                state.send_replace(ChannelState::Refused {
                    reason: Some(reason),
                    message,
                });
                config.refused_retry
            }
            SessionEnd::Incompatible(message) => {
                in_outage = true;
                tracing::error!(
                    %message,
                    "control speaks a protocol version this node does not support; upgrade \
                     the node or control"
                );
                state.send_replace(ChannelState::Refused {
                    reason: None,
                    message,
                });
                config.refused_retry
            }
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stopped(&mut stop) => return,
        }
    }
}

/// Resolves once `stop` is true or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The close frame a node sends when it shuts down.
fn goodbye() -> Message {
    Message::Close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Away,
        reason: "node shutting down".into(),
    }))
}

fn encode(msg: &NodeMessage) -> Result<Message, String> {
    serde_json::to_string(msg)
        .map(|s| Message::Text(s.into()))
        .map_err(|e| format!("encoding a message failed: {e}"))
}

/// One session with control at `url`; `new_url`: this URL differs from the last welcomed
/// session's, so the welcome names it. Once welcomed, `stop` ends it with a close frame.
#[allow(clippy::too_many_arguments)]
async fn session<H: NodeHooks>(
    config: &ChannelConfig,
    url: &str,
    hooks: &H,
    applied: &mut Option<u64>,
    state: &watch::Sender<ChannelState>,
    welcomed: &mut bool,
    new_url: bool,
    stop: &mut watch::Receiver<bool>,
) -> SessionEnd {
    let connect = tokio::select! {
        c = open(config, url) => c,
        // Not welcomed yet: nothing to say goodbye on.
        () = stopped(stop) => return SessionEnd::Stopped,
    };
    let ws = match connect {
        Ok(ws) => ws,
        Err(e) => return SessionEnd::Failed(e),
    };
    let (mut sink, mut stream) = ws.split();

    let hello = NodeMessage::Hello {
        protocol_version: PROTOCOL_VERSION,
        kind: config.kind,
        node_id: config.node_id,
        credential: config.credential.clone(),
        public_key: config.public_key,
        software_version: config.software_version.clone(),
        applied_version: *applied,
    };
    let hello = match encode(&hello) {
        Ok(m) => m,
        Err(e) => return SessionEnd::Failed(e),
    };
    if let Err(e) = sink.send(hello).await {
        return SessionEnd::Failed(format!("sending hello: {e}"));
    }

    // The first answer must be Welcome or Refused.
    let answer = timeout(config.handshake_timeout, async {
        loop {
            match stream.next().await {
                None => return Err("control closed the socket before welcome".to_owned()),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(Message::Text(text))) => {
                    return serde_json::from_str::<ControlMessage>(text.as_str())
                        .map_err(|e| format!("control sent an unreadable message: {e}"));
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(format!(
                        "control closed the socket before welcome{}",
                        frame.map(|f| format!(": {}", f.reason)).unwrap_or_default()
                    ))
                }
                Some(Ok(_)) => continue,
            }
        }
    });
    let first = tokio::select! {
        f = answer => f,
        () = stopped(stop) => return SessionEnd::Stopped,
    };
    match first {
        Err(_) => return SessionEnd::Failed("no welcome from control within the timeout".into()),
        Ok(Err(e)) => return SessionEnd::Failed(e),
        Ok(Ok(ControlMessage::Welcome {
            protocol_version,
            node_id,
        })) => {
            if let Err(e) = check_protocol_version(protocol_version) {
                let _ = sink.close().await;
                return SessionEnd::Incompatible(e.to_string());
            }
            if node_id != config.node_id {
                tracing::warn!(%node_id, expected = %config.node_id, "control welcomed another node id");
            }
        }
        Ok(Ok(ControlMessage::Refused {
            reason: RefuseReason::Busy,
            retry_after_ms,
            ..
        })) => {
            return SessionEnd::Busy(Duration::from_millis(
                retry_after_ms.unwrap_or(1000).min(60_000),
            ))
        }
        Ok(Ok(ControlMessage::Refused {
            reason, message, ..
        })) => return SessionEnd::Refused(reason, message),
        Ok(Ok(other)) => {
            return SessionEnd::Failed(format!("expected welcome, got {}", message_name(&other)))
        }
    }
    *welcomed = true;
    state.send_replace(ChannelState::Connected);
    if new_url {
        tracing::info!(url = %redact_url(url), node_id = %config.node_id, "connected to control");
    } else {
        tracing::info!(node_id = %config.node_id, "connected to control");
    }

    let mut last_rx = Instant::now();
    let mut status_tick = tokio::time::interval(config.status_interval);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ping_tick =
        tokio::time::interval_at(Instant::now() + config.ping_interval, config.ping_interval);
    ping_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let idle_check = config
        .idle_timeout
        .min(config.status_interval)
        .max(Duration::from_millis(10));
    let mut idle_tick = tokio::time::interval(idle_check);
    let mut nonce: u64 = rand::random();
    let wake = hooks.status_wake();

    loop {
        let outgoing: Option<NodeMessage> = tokio::select! {
            frame = stream.next() => {
                last_rx = Instant::now();
                match frame {
                    None => return SessionEnd::Lost("control closed the socket".into()),
                    Some(Err(e)) => return SessionEnd::Lost(e.to_string()),
                    Some(Ok(Message::Close(frame))) => {
                        return SessionEnd::Lost(format!(
                            "control closed the socket{}",
                            frame.map(|f| format!(": {}", f.reason)).unwrap_or_default()
                        ))
                    }
                    Some(Ok(Message::Text(text))) => {
                        match serde_json::from_str::<ControlMessage>(text.as_str()) {
                            Err(e) => {
                                tracing::error!(error = %e, "ignoring a control message this node cannot read");
                                None
                            }
                            Ok(ControlMessage::Config(snapshot)) => {
                                let version = snapshot.version;
                                match hooks.apply(snapshot).await {
                                    Ok(()) => {
                                        tracing::info!(version, "config applied");
                                        *applied = Some(version);
                                        Some(NodeMessage::Applied { version })
                                    }
                                    Err(error) => {
                                        tracing::error!(version, %error, "applying config failed");
                                        None
                                    }
                                }
                            }
                            Ok(ControlMessage::Ping { nonce }) => Some(NodeMessage::Pong { nonce }),
                            Ok(ControlMessage::Pong { .. }) | Ok(ControlMessage::Welcome { .. }) => None,
                            Ok(ControlMessage::Refused { reason, message, .. }) => {
                                return SessionEnd::Refused(reason, message)
                            }
                        }
                    }
                    Some(Ok(_)) => None,
                }
            }
            () = async {
                match &wake {
                    Some(w) => w.notified().await,
                    None => std::future::pending().await,
                }
            } => {
                let mut report = hooks.status();
                report.applied_version = applied.unwrap_or(0);
                Some(NodeMessage::Status(report))
            }
            _ = status_tick.tick() => {
                let mut report = hooks.status();
                report.applied_version = applied.unwrap_or(0);
                Some(NodeMessage::Status(report))
            }
            _ = ping_tick.tick() => {
                nonce = nonce.wrapping_add(1);
                Some(NodeMessage::Ping { nonce })
            }
            () = stopped(stop) => {
                // Tell control this node is leaving, and wait (briefly) for its close in return.
                let _ = timeout(Duration::from_secs(1), async {
                    if sink.send(goodbye()).await.is_ok() {
                        while let Some(Ok(frame)) = stream.next().await {
                            if matches!(frame, Message::Close(_)) {
                                break;
                            }
                        }
                    }
                })
                .await;
                tracing::info!("told control this node is leaving");
                return SessionEnd::Stopped;
            }
            _ = idle_tick.tick() => {
                if last_rx.elapsed() > config.idle_timeout {
                    return SessionEnd::Lost(format!(
                        "control silent for {} s",
                        config.idle_timeout.as_secs()
                    ));
                }
                None
            }
        };
        if let Some(msg) = outgoing {
            let frame = match encode(&msg) {
                Ok(f) => f,
                Err(e) => return SessionEnd::Lost(e),
            };
            if let Err(e) = sink.send(frame).await {
                if let NodeMessage::Status(report) = msg {
                    hooks.undelivered(report);
                }
                return SessionEnd::Lost(format!("sending to control: {e}"));
            }
        }
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the WebSocket at `url` as `connect_async` does (resolve, TCP, TLS for `wss://`, the
/// upgrade), but with each TCP attempt bounded by [`ChannelConfig::connect_timeout`] and the
/// rest by [`ChannelConfig::handshake_timeout`].
async fn open(config: &ChannelConfig, url: &str) -> Result<Socket, String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let request = url
        .into_client_request()
        .map_err(|e| format!("control URL: {e}"))?;
    let uri = request.uri();
    let host = uri
        .host()
        .ok_or_else(|| "no host in the control URL".to_owned())?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("wss") {
            443
        } else {
            80
        });
    let addrs: Vec<std::net::SocketAddr> = match timeout(
        config.handshake_timeout,
        tokio::net::lookup_host((host.as_str(), port)),
    )
    .await
    {
        Err(_) => return Err(format!("resolving {host} timed out")),
        Ok(Err(e)) => return Err(format!("resolving {host}: {e}")),
        Ok(Ok(addrs)) => addrs.collect(),
    };
    let mut error = format!("{host} has no address");
    for addr in addrs {
        let tcp = match timeout(config.connect_timeout, tokio::net::TcpStream::connect(addr)).await
        {
            Err(_) => {
                error = format!("connecting to {addr} timed out");
                continue;
            }
            Ok(Err(e)) => {
                error = format!("connecting to {addr}: {e}");
                continue;
            }
            Ok(Ok(tcp)) => tcp,
        };
        return match timeout(
            config.handshake_timeout,
            tokio_tungstenite::client_async_tls_with_config(request, tcp, None, None),
        )
        .await
        {
            Err(_) => Err(format!("the WebSocket handshake with {addr} timed out")),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok((ws, _response))) => Ok(ws),
        };
    }
    Err(error)
}

fn message_name(msg: &ControlMessage) -> &'static str {
    match msg {
        ControlMessage::Welcome { .. } => "welcome",
        ControlMessage::Refused { .. } => "refused",
        ControlMessage::Config(_) => "config",
        ControlMessage::Ping { .. } => "ping",
        ControlMessage::Pong { .. } => "pong",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_url_maps_schemes() {
        assert_eq!(
            ws_url("http://127.0.0.1:3000/"),
            "ws://127.0.0.1:3000/api/v1/nodes/connect"
        );
        assert_eq!(
            ws_url("https://control.example.com"),
            "wss://control.example.com/api/v1/nodes/connect"
        );
    }

    #[test]
    fn ws_urls_map_each_control_url() {
        assert_eq!(
            ws_urls("https://c1.example.com/, http://127.0.0.1:3000"),
            [
                "wss://c1.example.com/api/v1/nodes/connect",
                "ws://127.0.0.1:3000/api/v1/nodes/connect"
            ]
        );
        assert_eq!(
            ws_urls("http://127.0.0.1:3000/"),
            ["ws://127.0.0.1:3000/api/v1/nodes/connect"]
        );
        assert!(ws_urls(",").is_empty());
    }
}
