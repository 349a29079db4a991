//! Wire types shared by kakuremichi's control, gateways and agents.
//!
//! Everything that crosses the control channel (a WebSocket carrying JSON text frames) or the
//! enrollment call is defined here, and nothing else: this crate has serde and no I/O, no tokio and
//! no clock. A message is an internally tagged enum (`{"type": "hello", ...}`); unknown fields are
//! refused so that a mismatched peer fails loudly instead of half-working.
//!
//! The handshake: a node opens the socket and sends [`NodeMessage::Hello`] with the protocol version
//! it speaks and the credential it got at enrollment. Control answers [`ControlMessage::Welcome`] and
//! a full [`ConfigSnapshot`], or [`ControlMessage::Refused`] with a reason and closes. After every
//! change that concerns the node, control sends a new snapshot with a higher version; the node
//! answers [`NodeMessage::Applied`] and reports [`StatusReport`]s on the same socket.
//!
//! The data plane has one wire type here too: the [`StreamHeader`] that opens every stream a
//! gateway sends to an agent through the tunnel.

pub mod identity;
mod stream;
pub mod time;

pub use stream::{
    frame_datagram, StreamHeader, StreamHeaderError, StreamKind, AGENT_ERROR_HEADER, MAX_DATAGRAM,
};

use std::fmt;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The control-channel protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The versions this build accepts from a peer.
pub const SUPPORTED_PROTOCOL_VERSIONS: RangeInclusive<u32> = 1..=1;

/// Path of the node WebSocket on control.
pub const NODE_WS_PATH: &str = "/api/v1/nodes/connect";

/// Path of the enrollment call on control.
pub const ENROLL_PATH: &str = "/api/v1/enroll";

/// Overlay MTU as deployed: WireGuard over IPv4/IPv6 UDP within a 1500-byte path.
pub const DEFAULT_OVERLAY_MTU: u16 = 1420;

/// A peer spoke a protocol version this build does not support.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unsupported protocol version {got}: this build speaks versions {}..={}",
    SUPPORTED_PROTOCOL_VERSIONS.start(),
    SUPPORTED_PROTOCOL_VERSIONS.end()
)]
pub struct UnsupportedVersion {
    /// The version the peer announced.
    pub got: u32,
}

/// Checks a peer's announced protocol version.
pub fn check_protocol_version(got: u32) -> Result<(), UnsupportedVersion> {
    if SUPPORTED_PROTOCOL_VERSIONS.contains(&got) {
        Ok(())
    } else {
        Err(UnsupportedVersion { got })
    }
}

/// Which kind of node is speaking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    /// A public gateway: terminates users' traffic, forwards it over WireGuard.
    Gateway,
    /// An agent next to private apps (its identity in the API is a *site*).
    Agent,
}

impl fmt::Display for NodeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeKind::Gateway => "gateway",
            NodeKind::Agent => "agent",
        })
    }
}

/// A secret string (enrollment token, node credential, API key). Its `Debug` and `Display`
/// print a mask, so it never reaches a log by accident; read it with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for the few places that must send or hash it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A WireGuard (X25519) public key; base64 on the wire, as `wg` prints it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WgPublicKey(pub [u8; 32]);

impl schemars::JsonSchema for WgPublicKey {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "WgPublicKey".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "a WireGuard public key, base64 as `wg` prints it",
            "pattern": "^[A-Za-z0-9+/]{43}=$"
        })
    }
}

/// A string was not a base64 WireGuard key of 32 bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a WireGuard key: expected 32 bytes in base64")]
pub struct BadKey;

impl WgPublicKey {
    /// Parses the base64 form.
    pub fn from_base64(s: &str) -> Result<Self, BadKey> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|_| BadKey)?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| BadKey)?;
        Ok(Self(arr))
    }

    /// The base64 form.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }
}

impl fmt::Debug for WgPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgPublicKey({})", self.to_base64())
    }
}

impl fmt::Display for WgPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl Serialize for WgPublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for WgPublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        WgPublicKey::from_base64(&s).map_err(serde::de::Error::custom)
    }
}

/// Body of `POST /api/v1/enroll`: a node trades its one-time enrollment token for a credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The protocol version the node speaks.
    pub protocol_version: u32,
    /// The kind of node enrolling; must match what the token was issued for.
    pub kind: NodeKind,
    /// The one-time enrollment token shown when the site or gateway was created.
    pub token: Secret,
    /// The node's WireGuard public key (the private key never leaves the node).
    pub public_key: WgPublicKey,
}

/// Answer to a successful enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollResponse {
    /// The node's id (the site's or the gateway's id in the API).
    pub node_id: Uuid,
    /// The kind the node was enrolled as.
    pub kind: NodeKind,
    /// Long-lived credential for the WebSocket hello. Shown once; keep it on disk.
    pub credential: Secret,
    /// The node's overlay address.
    pub overlay_address: Ipv4Addr,
}

/// Messages a node (gateway or agent) sends to control.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum NodeMessage {
    /// First message on a new socket.
    Hello {
        /// The protocol version the node speaks.
        protocol_version: u32,
        /// The node's kind.
        kind: NodeKind,
        /// The node's id from enrollment.
        node_id: Uuid,
        /// The credential from enrollment.
        credential: Secret,
        /// The node's current WireGuard public key.
        public_key: WgPublicKey,
        /// The node's software version, for the API.
        software_version: String,
        /// The config version the node has applied (from its disk cache), if any.
        applied_version: Option<u64>,
    },
    /// The node applied the snapshot with this version.
    Applied {
        /// The version applied.
        version: u64,
    },
    /// Periodic status.
    Status(StatusReport),
    /// Liveness probe; answered with [`ControlMessage::Pong`].
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// Answer to [`ControlMessage::Ping`].
    Pong {
        /// The nonce of the ping.
        nonce: u64,
    },
}

/// Why control refused a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefuseReason {
    /// The node speaks a protocol version control does not support.
    UnsupportedProtocolVersion,
    /// The credential is wrong, revoked, or the node was deleted.
    BadCredential,
    /// The first message was not a valid hello.
    BadHello,
    /// The hello names a WireGuard public key another node holds.
    KeyInUse,
    /// Control is at its limit of handshakes in progress; retry after `retry_after_ms`, with
    /// jitter.
    Busy,
    /// Another session of the same node took over (the newest session wins).
    Replaced,
}

/// Messages control sends to a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlMessage {
    /// The hello was accepted; a [`ControlMessage::Config`] follows.
    Welcome {
        /// The protocol version control speaks on this socket.
        protocol_version: u32,
        /// Echo of the node's id.
        node_id: Uuid,
    },
    /// The hello was refused; control closes the socket after this.
    Refused {
        /// Machine-readable reason.
        reason: RefuseReason,
        /// Human-readable explanation.
        message: String,
        /// With [`RefuseReason::Busy`]: wait about this long (plus jitter) before retrying.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    /// A full config snapshot for this node.
    Config(ConfigSnapshot),
    /// Liveness probe; answered with [`NodeMessage::Pong`].
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// Answer to [`NodeMessage::Ping`].
    Pong {
        /// The nonce of the ping.
        nonce: u64,
    },
}

/// Everything a node needs to run, as of one config version. Applying the same snapshot twice is a
/// no-op; applying a newer one changes only what differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigSnapshot {
    /// Monotonically increasing config version (control-wide).
    pub version: u64,
    /// The node this snapshot is for.
    pub node_id: Uuid,
    /// The node's kind.
    pub kind: NodeKind,
    /// The node's place in the overlay.
    pub overlay: OverlayConfig,
    /// WireGuard peers: for a gateway, the agents; for an agent, its gateways.
    pub peers: Vec<PeerConfig>,
    /// Gateway only: hostnames and where to send them.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Agent only: overlay ports and the private targets behind them.
    #[serde(default)]
    pub targets: Vec<Target>,
    /// Gateway only: certificates control manages (ordered by ACME or uploaded), with their keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<TlsCertificate>,
    /// Gateway only: answers to ACME challenges in flight, which any gateway may be asked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acme_challenges: Vec<AcmeChallenge>,
    /// Gateway only: signing keys, the sign-in page and revocations, for resources that need
    /// sign-in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Box<identity::GatewayIdentity>>,
    /// Agent only: the agent sessions control wants running here. One that leaves the list is
    /// ended; one the agent ran before is not started again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sessions: Vec<SessionSpec>,
    /// Gateway only: the agent-sessions endpoint (a hostname serving agentapi-proxy's API), when
    /// control runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions_endpoint: Option<Box<SessionsEndpoint>>,
}

/// The agent-sessions endpoint a gateway serves: `/{id}/*` of each live session goes through
/// the tunnel to it (for the users it names), `/s/{token}/*` read-only to a shared one, and the
/// rest (`/start`, `/search`, `/sessions/...`) to control's `/api/v1/sessions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsEndpoint {
    /// The hostname, lower case, without port.
    pub hostname: String,
    /// Control's base URL, where the other routes go.
    pub control_url: String,
    /// The live sessions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sessions: Vec<SessionRoute>,
}

/// One live agent session, as a gateway routes to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRoute {
    /// The session.
    pub id: Uuid,
    /// The site (agent) it runs on.
    pub site_id: Uuid,
    /// That agent's overlay address.
    pub overlay_address: Ipv4Addr,
    /// The users who may reach it (its owner; for a team session the team's members and the
    /// organization's admins).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<Uuid>,
    /// Its share link, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<SessionShare>,
}

/// A session's read-only share link, as a gateway checks it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionShare {
    /// The token's [`identity::secret_digest`].
    pub digest: String,
    /// When it stops working (unix ms), if ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<i64>,
}

/// An agent session control wants running on an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSpec {
    /// The session's id.
    pub id: Uuid,
    /// The role whose env file applies on the agent (`<role>.env`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Its environment, over the agent's (values masked in `Debug`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub env: std::collections::BTreeMap<String, Secret>,
    /// How long it may live, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// A first message for its agent, sent once it is stable (not again when it is resumed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_message: Option<String>,
    /// It ends the first time its agent finishes work (agentapi-proxy's `oneshot`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub oneshot: bool,
}

/// Where an agent session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionPhase {
    /// Its process is being started.
    Creating,
    /// Its process runs; its agent does not answer yet.
    Starting,
    /// Its agent answers.
    Active,
    /// Asked to end; its process has not exited yet.
    Stopping,
    /// Ended.
    Stopped,
    /// Ended by a failure (see the reason).
    Failed,
}

impl SessionPhase {
    /// Whether the session has ended.
    pub fn ended(self) -> bool {
        matches!(self, SessionPhase::Stopped | SessionPhase::Failed)
    }
}

/// One of an agent's sessions, as its status report tells control.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionState {
    /// The session.
    pub id: Uuid,
    /// Its phase.
    pub phase: SessionPhase,
    /// The loopback port its agent listens on.
    pub port: u16,
    /// Why it ended, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Its agent's last status (`stable` or `running`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_status: Option<String>,
}

/// A certificate chain and its private key, as control pushes them to gateways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsCertificate {
    /// The certificate's id in control.
    pub id: Uuid,
    /// The names it covers (wildcards as `*.example.com`).
    pub names: Vec<String>,
    /// The chain, end-entity first, PEM.
    pub chain_pem: String,
    /// The private key, PEM (masked in `Debug`).
    pub key_pem: Secret,
    /// When it expires (unix ms).
    pub not_after_ms: i64,
}

/// An ACME challenge answer gateways serve while a certificate is being ordered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AcmeChallenge {
    /// HTTP-01: `GET /.well-known/acme-challenge/<token>` on port 80 answers the key authorization.
    #[serde(rename = "http-01")]
    Http01 {
        /// The token in the URL path.
        token: String,
        /// The body to answer.
        key_authorization: String,
    },
    /// TLS-ALPN-01: a handshake for `name` offering ALPN `acme-tls/1` gets a self-signed
    /// certificate carrying this SHA-256 digest of the key authorization (RFC 8737).
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01 {
        /// The name being validated.
        name: String,
        /// SHA-256 of the key authorization, base64url.
        digest: String,
    },
}

/// A node's overlay address and link settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlayConfig {
    /// The node's overlay address.
    pub address: Ipv4Addr,
    /// The overlay network's prefix length (10 for 100.64.0.0/10).
    pub prefix_len: u8,
    /// The overlay MTU.
    pub mtu: u16,
}

/// A WireGuard peer of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer's node id.
    pub node_id: Uuid,
    /// The peer's kind.
    pub kind: NodeKind,
    /// The peer's display name.
    pub name: String,
    /// The peer's WireGuard public key.
    pub public_key: WgPublicKey,
    /// The peer's overlay address: the only source address accepted from it (a /32).
    pub overlay_address: Ipv4Addr,
    /// Where to send the first packet (`host:port`); `None` for peers behind NAT, whose endpoint
    /// is learned from their authenticated packets.
    pub endpoint: Option<String>,
    /// Persistent keepalive in seconds, set on the NATed side.
    pub persistent_keepalive: Option<u16>,
}

/// The transport a route forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RouteProtocol {
    /// HTTP/1.1 reverse proxy, routed by `Host`.
    Http,
    /// Raw TCP: every connection to `public_port` on the gateway is one tunnel stream.
    Tcp,
    /// UDP: every client address sending to `public_port` on the gateway is one flow (one tunnel
    /// stream carrying length-prefixed datagrams), closed after an idle timeout.
    Udp,
}

/// Gateway routing entry: requests for `hostname` go to `overlay_address:port` (an agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// The resource's id.
    pub resource_id: Uuid,
    /// The public hostname, lower case, without port.
    pub hostname: String,
    /// What the route forwards.
    pub protocol: RouteProtocol,
    /// The site (agent) that reaches the target.
    pub site_id: Uuid,
    /// The agent's overlay address.
    pub overlay_address: Ipv4Addr,
    /// The port on the agent's overlay address that leads to the target.
    pub port: u16,
    /// TCP routes: the port every gateway listens on for this resource (`hostname` is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_port: Option<u16>,
    /// HTTP routes: answer plain-HTTP requests with a redirect to HTTPS.
    #[serde(default, skip_serializing_if = "is_false")]
    pub redirect_https: bool,
    /// HTTP routes: send `Strict-Transport-Security: max-age=<this>` over HTTPS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsts_max_age: Option<u32>,
    /// Further targets of the resource, beside the one at `overlay_address:port`, on the same
    /// agent or others; requests are balanced over all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_backends: Vec<Backend>,
    /// How requests are spread over the targets.
    #[serde(default, skip_serializing_if = "Balance::is_default")]
    pub balance: Balance,
    /// HTTP routes: a cookie keeps a client on the target it first reached.
    #[serde(default, skip_serializing_if = "is_false")]
    pub sticky: bool,
    /// What the gateway allows this resource beyond (or below) its own defaults.
    #[serde(default, skip_serializing_if = "Limits::is_default")]
    pub limits: Limits,
    /// TCP routes: the target at `overlay_address:port` expects a PROXY protocol v2 header
    /// with the client's address before the client's bytes.
    #[serde(default, skip_serializing_if = "is_false")]
    pub proxy_protocol: bool,
    /// HTTP routes: who may reach the resource; `None` is public.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<identity::AccessPolicy>,
}

impl Route {
    /// A plain HTTP route with every option at its default: `hostname` to `overlay_address:port`,
    /// one target on `site_id`.
    pub fn http(
        resource_id: Uuid,
        hostname: &str,
        site_id: Uuid,
        overlay_address: Ipv4Addr,
        port: u16,
    ) -> Route {
        Route {
            resource_id,
            hostname: hostname.to_owned(),
            protocol: RouteProtocol::Http,
            site_id,
            overlay_address,
            port,
            public_port: None,
            redirect_https: false,
            hsts_max_age: None,
            more_backends: vec![],
            balance: Default::default(),
            sticky: false,
            limits: Default::default(),
            proxy_protocol: false,
            access: None,
        }
    }
}

/// Per-resource limits a gateway enforces; an absent field takes the gateway's own setting.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// HTTP: the largest request body, in bytes; a larger one is answered 413.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_body_bytes: Option<u64>,
    /// HTTP: milliseconds from sending a request to the target until its response head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_timeout_ms: Option<u32>,
    /// The longest silence, in milliseconds: between body bytes of a request or a response
    /// (HTTP), between bytes either way (TCP), or before a flow is closed (UDP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u32>,
}

impl Limits {
    fn is_default(&self) -> bool {
        *self == Limits::default()
    }
}

/// One more target of a route: a port on an agent's overlay address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// The site (agent) that reaches the target.
    pub site_id: Uuid,
    /// The agent's overlay address.
    pub overlay_address: Ipv4Addr,
    /// The port on the agent's overlay address that leads to the target.
    pub port: u16,
    /// TCP routes: this target expects a PROXY protocol v2 header.
    #[serde(default, skip_serializing_if = "is_false")]
    pub proxy_protocol: bool,
}

/// How a gateway spreads requests (HTTP) or connections and flows (TCP, UDP) over a route's
/// healthy targets.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each target in turn.
    #[default]
    RoundRobin,
    /// The target with the fewest requests or connections in flight from this gateway.
    LeastOutstanding,
}

impl Balance {
    fn is_default(&self) -> bool {
        *self == Balance::RoundRobin
    }
}

/// An active health check an agent runs against one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// HTTP check: `GET` this path (with the resource's hostname as `Host`); absent: a TCP
    /// connect is the check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// HTTP check: the status that counts as healthy; absent: any 2xx or 3xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_status: Option<u16>,
    /// Milliseconds between checks.
    pub interval_ms: u32,
    /// Milliseconds a check may take before it counts as failed.
    pub timeout_ms: u32,
    /// Consecutive failures that take a healthy target out.
    pub unhealthy_threshold: u8,
    /// Consecutive successes that bring an unhealthy target back.
    pub healthy_threshold: u8,
}

pub(crate) fn is_false(b: &bool) -> bool {
    !*b
}

/// Agent target: flows to `port` on the agent's overlay address are forwarded to `target`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// The resource's id.
    pub resource_id: Uuid,
    /// The overlay port the agent accepts.
    pub port: u16,
    /// The private target as `host:port`.
    pub target: String,
    /// The active health check the agent runs against the target, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// HTTP targets: the resource's hostname, sent as `Host` by HTTP health checks.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hostname: String,
}

/// What an agent tells a gateway on a health stream: one JSON line when the stream opens, on
/// every change, and at least every [`HEALTH_HEARTBEAT_MS`] milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthReport {
    /// Overlay ports whose target fails its health check. Every other port is healthy.
    pub unhealthy_ports: Vec<u16>,
}

/// How often an agent writes a [`HealthReport`] on a health stream when nothing changes. A
/// gateway that hears nothing for three times this long counts the agent as offline.
pub const HEALTH_HEARTBEAT_MS: u64 = 1000;

/// A node's periodic status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusReport {
    /// The config version the node runs.
    pub applied_version: u64,
    /// WireGuard peers.
    pub peers: Vec<PeerStatus>,
    /// Agent only: whether each target accepted a connection recently.
    #[serde(default)]
    pub targets: Vec<TargetStatus>,
    /// Gateway only: requests refused access since the last report, for control's audit log.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refusals: Vec<AccessRefusal>,
    /// Agent only: its sessions (ended ones for a while too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sessions: Vec<SessionState>,
    /// Gateway only: requests that reached agent sessions since the last report, for control's
    /// audit log.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub session_accesses: Vec<SessionAccess>,
    /// Agent only: the labels it runs sessions with (`--session-label`), which control matches
    /// against a new session's tags to choose where it runs.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub session_labels: std::collections::BTreeMap<String, String>,
    /// Gateway only: requests each resource answered since the last report (the admin
    /// console's request rates).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<ResourceTraffic>,
}

/// Requests one resource answered at a gateway since its last status report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceTraffic {
    /// The resource.
    pub resource_id: Uuid,
    /// Requests answered (any status).
    pub requests: u64,
    /// Of those, answered with a 5xx status.
    pub errors: u64,
}

/// Requests from one client that reached one agent session through a gateway, counted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionAccess {
    /// The session.
    pub session_id: Uuid,
    /// The user whose key was used; `None` for a share link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<Uuid>,
    /// The client's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<std::net::IpAddr>,
    /// How many requests.
    pub count: u32,
    /// The first one (unix ms).
    pub first_at_ms: i64,
}

/// Requests a gateway refused access (a refused token, a user the policy does not allow, a
/// refused sign-in grant), counted by host, client, user and reason between two status reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRefusal {
    /// The first of them (unix ms).
    pub at_ms: i64,
    /// The resource hostname.
    pub host: String,
    /// The client's address.
    pub client: Option<String>,
    /// The user's e-mail address, when a valid token named one.
    pub user: Option<String>,
    /// Why.
    pub reason: String,
    /// How many.
    pub count: u32,
}

/// Status of one WireGuard peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PeerStatus {
    /// The peer's public key.
    pub public_key: WgPublicKey,
    /// The endpoint last seen or configured.
    pub endpoint: Option<String>,
    /// Milliseconds since the last completed handshake, if any.
    pub last_handshake_age_ms: Option<u64>,
    /// Bytes sent to the peer (WireGuard payload).
    pub tx_bytes: u64,
    /// Bytes received from the peer (WireGuard payload).
    pub rx_bytes: u64,
}

/// Reachability of one agent target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetStatus {
    /// The resource's id.
    pub resource_id: Uuid,
    /// The target as configured.
    pub target: String,
    /// Whether the last connection attempt succeeded.
    pub reachable: bool,
    /// The last error, if the last attempt failed.
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(b: u8) -> WgPublicKey {
        WgPublicKey([b; 32])
    }

    const ID: Uuid = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
    const ID2: Uuid = Uuid::from_u128(0xfedc_ba98_7654_3210_fedc_ba98_7654_3210);

    fn golden<T>(value: T, expected: serde_json::Value)
    where
        T: Serialize + for<'de> Deserialize<'de> + PartialEq + fmt::Debug,
    {
        assert_eq!(serde_json::to_value(&value).unwrap(), expected);
        let back: T = serde_json::from_value(expected).unwrap();
        assert_eq!(back, value);
    }

    #[test]
    fn hello_golden() {
        golden(
            NodeMessage::Hello {
                protocol_version: 1,
                kind: NodeKind::Agent,
                node_id: ID,
                credential: Secret::new("kmn_secret"),
                public_key: key(1),
                software_version: "0.1.0".into(),
                applied_version: Some(7),
            },
            json!({
                "type": "hello",
                "protocol_version": 1,
                "kind": "agent",
                "node_id": "01234567-89ab-cdef-0123-456789abcdef",
                "credential": "kmn_secret",
                "public_key": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
                "software_version": "0.1.0",
                "applied_version": 7
            }),
        );
    }

    #[test]
    fn snapshot_golden() {
        golden(
            ControlMessage::Config(ConfigSnapshot {
                sessions: Vec::new(),
                sessions_endpoint: None,
                version: 42,
                node_id: ID,
                kind: NodeKind::Gateway,
                overlay: OverlayConfig {
                    address: Ipv4Addr::new(100, 64, 0, 1),
                    prefix_len: 10,
                    mtu: 1420,
                },
                peers: vec![PeerConfig {
                    node_id: ID2,
                    kind: NodeKind::Agent,
                    name: "home".into(),
                    public_key: key(2),
                    overlay_address: Ipv4Addr::new(100, 64, 0, 2),
                    endpoint: None,
                    persistent_keepalive: None,
                }],
                routes: vec![Route {
                    resource_id: ID,
                    hostname: "demo.localhost".into(),
                    protocol: RouteProtocol::Http,
                    site_id: ID2,
                    overlay_address: Ipv4Addr::new(100, 64, 0, 2),
                    port: 10000,
                    public_port: None,
                    redirect_https: false,
                    hsts_max_age: None,
                    more_backends: vec![],
                    balance: Default::default(),
                    sticky: false,
                    limits: Default::default(),
                    proxy_protocol: false,
                    access: None,
                }],
                targets: vec![],
                certificates: vec![],
                acme_challenges: vec![],
                identity: None,
            }),
            json!({
                "type": "config",
                "version": 42,
                "node_id": "01234567-89ab-cdef-0123-456789abcdef",
                "kind": "gateway",
                "overlay": {"address": "100.64.0.1", "prefix_len": 10, "mtu": 1420},
                "peers": [{
                    "node_id": "fedcba98-7654-3210-fedc-ba9876543210",
                    "kind": "agent",
                    "name": "home",
                    "public_key": "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=",
                    "overlay_address": "100.64.0.2",
                    "endpoint": null,
                    "persistent_keepalive": null
                }],
                "routes": [{
                    "resource_id": "01234567-89ab-cdef-0123-456789abcdef",
                    "hostname": "demo.localhost",
                    "protocol": "http",
                    "site_id": "fedcba98-7654-3210-fedc-ba9876543210",
                    "overlay_address": "100.64.0.2",
                    "port": 10000
                }],
                "targets": []
            }),
        );
    }

    #[test]
    fn acme_challenges_and_certificates_golden() {
        golden(
            vec![
                AcmeChallenge::Http01 {
                    token: "tok".into(),
                    key_authorization: "tok.thumb".into(),
                },
                AcmeChallenge::TlsAlpn01 {
                    name: "a.example".into(),
                    digest: "ZGln".into(),
                },
            ],
            json!([
                {"type": "http-01", "token": "tok", "key_authorization": "tok.thumb"},
                {"type": "tls-alpn-01", "name": "a.example", "digest": "ZGln"}
            ]),
        );
        golden(
            TlsCertificate {
                id: ID,
                names: vec!["*.example.com".into()],
                chain_pem: "-----BEGIN CERTIFICATE-----".into(),
                key_pem: Secret::new("-----BEGIN PRIVATE KEY-----"),
                not_after_ms: 5,
            },
            json!({
                "id": "01234567-89ab-cdef-0123-456789abcdef",
                "names": ["*.example.com"],
                "chain_pem": "-----BEGIN CERTIFICATE-----",
                "key_pem": "-----BEGIN PRIVATE KEY-----",
                "not_after_ms": 5
            }),
        );
        let cert: TlsCertificate = serde_json::from_value(json!({
            "id": "01234567-89ab-cdef-0123-456789abcdef", "names": [], "chain_pem": "",
            "key_pem": "k", "not_after_ms": 0
        }))
        .expect("parses");
        assert!(
            !format!("{cert:?}").contains("\"k\""),
            "the key is masked in Debug"
        );
    }

    #[test]
    fn agent_snapshot_golden() {
        golden(
            ConfigSnapshot {
                sessions: Vec::new(),
                sessions_endpoint: None,
                version: 3,
                node_id: ID2,
                kind: NodeKind::Agent,
                overlay: OverlayConfig {
                    address: Ipv4Addr::new(100, 64, 0, 2),
                    prefix_len: 10,
                    mtu: 1420,
                },
                peers: vec![PeerConfig {
                    node_id: ID,
                    kind: NodeKind::Gateway,
                    name: "edge".into(),
                    public_key: key(1),
                    overlay_address: Ipv4Addr::new(100, 64, 0, 1),
                    endpoint: Some("203.0.113.7:51820".into()),
                    persistent_keepalive: Some(25),
                }],
                routes: vec![],
                targets: vec![Target {
                    resource_id: ID,
                    port: 10000,
                    target: "127.0.0.1:9000".into(),
                    health_check: None,
                    hostname: String::new(),
                }],
                certificates: vec![],
                acme_challenges: vec![],
                identity: None,
            },
            json!({
                "version": 3,
                "node_id": "fedcba98-7654-3210-fedc-ba9876543210",
                "kind": "agent",
                "overlay": {"address": "100.64.0.2", "prefix_len": 10, "mtu": 1420},
                "peers": [{
                    "node_id": "01234567-89ab-cdef-0123-456789abcdef",
                    "kind": "gateway",
                    "name": "edge",
                    "public_key": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
                    "overlay_address": "100.64.0.1",
                    "endpoint": "203.0.113.7:51820",
                    "persistent_keepalive": 25
                }],
                "routes": [],
                "targets": [{
                    "resource_id": "01234567-89ab-cdef-0123-456789abcdef",
                    "port": 10000,
                    "target": "127.0.0.1:9000"
                }]
            }),
        );
    }

    #[test]
    fn small_messages_golden() {
        golden(
            NodeMessage::Applied { version: 5 },
            json!({"type": "applied", "version": 5}),
        );
        golden(
            NodeMessage::Ping { nonce: 9 },
            json!({"type": "ping", "nonce": 9}),
        );
        golden(
            ControlMessage::Pong { nonce: 9 },
            json!({"type": "pong", "nonce": 9}),
        );
        golden(
            ControlMessage::Welcome {
                protocol_version: 1,
                node_id: ID,
            },
            json!({"type": "welcome", "protocol_version": 1, "node_id": "01234567-89ab-cdef-0123-456789abcdef"}),
        );
        golden(
            ControlMessage::Refused {
                reason: RefuseReason::UnsupportedProtocolVersion,
                message: "no".into(),
                retry_after_ms: None,
            },
            json!({"type": "refused", "reason": "unsupported_protocol_version", "message": "no"}),
        );
        golden(
            ControlMessage::Refused {
                reason: RefuseReason::Busy,
                message: "busy".into(),
                retry_after_ms: Some(750),
            },
            json!({"type": "refused", "reason": "busy", "message": "busy", "retry_after_ms": 750}),
        );
    }

    #[test]
    fn status_golden() {
        golden(
            NodeMessage::Status(StatusReport {
                session_accesses: Vec::new(),
                session_labels: Default::default(),
                traffic: Vec::new(),
                sessions: Vec::new(),
                applied_version: 4,
                peers: vec![PeerStatus {
                    public_key: key(1),
                    endpoint: Some("198.51.100.2:40000".into()),
                    last_handshake_age_ms: Some(1500),
                    tx_bytes: 10,
                    rx_bytes: 20,
                }],
                targets: vec![TargetStatus {
                    resource_id: ID,
                    target: "127.0.0.1:9000".into(),
                    reachable: false,
                    error: Some("connection refused".into()),
                }],
                refusals: vec![],
            }),
            json!({
                "type": "status",
                "applied_version": 4,
                "peers": [{
                    "public_key": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
                    "endpoint": "198.51.100.2:40000",
                    "last_handshake_age_ms": 1500,
                    "tx_bytes": 10,
                    "rx_bytes": 20
                }],
                "targets": [{
                    "resource_id": "01234567-89ab-cdef-0123-456789abcdef",
                    "target": "127.0.0.1:9000",
                    "reachable": false,
                    "error": "connection refused"
                }]
            }),
        );
    }

    #[test]
    fn enroll_golden() {
        golden(
            EnrollRequest {
                protocol_version: 1,
                kind: NodeKind::Gateway,
                token: Secret::new("kme_tok"),
                public_key: key(3),
            },
            json!({
                "protocol_version": 1,
                "kind": "gateway",
                "token": "kme_tok",
                "public_key": "AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM="
            }),
        );
    }

    #[test]
    fn unknown_fields_and_types_are_refused() {
        let err =
            serde_json::from_value::<NodeMessage>(json!({"type": "ping", "nonce": 1, "x": 2}));
        assert!(err.is_err());
        let err = serde_json::from_value::<NodeMessage>(json!({"type": "teleport"}));
        assert!(err.is_err());
        let err = serde_json::from_value::<WgPublicKey>(json!("AAAA"));
        assert!(err.is_err());
    }

    #[test]
    fn version_check() {
        assert!(check_protocol_version(PROTOCOL_VERSION).is_ok());
        let err = check_protocol_version(99).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported protocol version 99: this build speaks versions 1..=1"
        );
    }

    #[test]
    fn secrets_are_masked() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "Secret(***) ***");
        let hello = NodeMessage::Hello {
            protocol_version: 1,
            kind: NodeKind::Gateway,
            node_id: ID,
            credential: s,
            public_key: key(0),
            software_version: String::new(),
            applied_version: None,
        };
        assert!(!format!("{hello:?}").contains("hunter2"));
    }
}
