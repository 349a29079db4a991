//! The store: sites, gateways, resources, admin keys and the config version, in SQLite or
//! PostgreSQL through one sqlx `AnyPool` code path (`$1` placeholders work in both).
//!
//! Every change that affects any node's snapshot bumps the config version in the same
//! transaction, then publishes the new version on a `tokio::sync::watch` channel
//! ([`Store::subscribe`]). WebSocket sessions recompute their snapshot on each new version. On
//! PostgreSQL the same transaction also sends `NOTIFY` on [`CONFIG_CHANNEL`], so that every other
//! control replica publishes the version too ([`crate::replicas`]).

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kakuremichi_proto::identity::AccessPolicy;
use kakuremichi_proto::{
    Balance, ConfigSnapshot, EnrollResponse, HealthCheck, Limits, NodeKind, RouteProtocol, Secret,
    StatusReport, WgPublicKey,
};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Row, Transaction};
use tokio::sync::{watch, Mutex};
use uuid::Uuid;

use crate::activity::NodeActivity;
use crate::overlay::OverlayNet;
use crate::secrets::{self, HashError};
use crate::world::{World, WorldNode};

mod certificates;
mod idempotency;
mod identity;
mod oauth;
mod orgs;
mod passkeys;
mod policies;
mod replicas;
mod roles;
mod sessions;
mod share_links;
mod sso;
mod visitors;
pub use certificates::{
    CertSource, CertStatus, Certificate, ChallengeKind, Issued, StoredChallenge,
};
pub use idempotency::{IdempotencyBegin, IDEMPOTENCY_TTL_MS};
pub use identity::{
    ApiKey, AuditEntry, AuditFilter, NewUser, PublishedKey, Session, Signer, User, UserPatch,
    ACCESS_PERMISSION, API_KEY_PREFIX, BUILT_IN_ROLES, SESSION_PREFIX,
};
pub use oauth::{GrantRefusal, OAuthClient, OAuthCode, OAuthGrant, OAuthGrantInfo};
pub use orgs::{Organization, DEFAULT_ORG};
pub use passkeys::PasskeyInfo;
pub use policies::Policy;
pub use replicas::{Heartbeat, ReplicaRow};
pub use roles::CustomRole;
pub use sessions::{AgentSession, LiveSession, NewAgentSession, SessionShareInfo};
pub use share_links::{ShareLink, ShareRefusal};
pub use sso::{ExternalAccount, IdentityProvider, NewIdentityProvider, ProviderKind};
pub use visitors::{
    EmailCodeRefusal, LivePasscode, PasscodeInfo, PasscodeKind, EMAIL_CODE_ATTEMPTS,
};

/// The first overlay port given to a resource on its site.
pub const FIRST_OVERLAY_PORT: u16 = 10000;

/// How long an enrollment token is valid unless configured otherwise.
pub const DEFAULT_ENROLLMENT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// Persistent keepalive agents use towards gateways, in seconds.
pub const AGENT_KEEPALIVE_SECS: u16 = 25;

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The named thing does not exist.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// A unique value (name, hostname, address) is already taken.
    #[error("{0}")]
    Conflict(String),
    /// A value refers to something that does not exist or cannot be used.
    #[error("{0}")]
    Invalid(String),
    /// A token or credential did not match.
    #[error("invalid or already used token or credential")]
    BadSecret,
    /// An enrollment token was valid but expired.
    #[error("this enrollment token has expired: create a new one for the node")]
    Expired,
    /// A public key another node holds.
    #[error("this WireGuard public key belongs to another node")]
    KeyInUse,
    /// No overlay address or port is left.
    #[error("{0}")]
    Exhausted(String),
    /// The database URL is not one this build supports.
    #[error("unsupported database URL scheme (expected sqlite:// or postgres://)")]
    UnsupportedUrl,
    /// The database said no.
    #[error("database error: {0}")]
    Db(sqlx::Error),
    /// The database cannot be reached now (restarting, unreachable, busy); try again shortly.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// Migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Hashing a secret failed.
    #[error(transparent)]
    Hash(#[from] HashError),
    /// A stored value could not be read back.
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        let unique = e
            .as_database_error()
            .is_some_and(|d| d.is_unique_violation());
        if unique {
            StoreError::Conflict("a value that must be unique is already in use".into())
        } else if unavailable(&e) {
            StoreError::Unavailable(e.to_string())
        } else {
            StoreError::Db(e)
        }
    }
}

/// Whether `e` says the database cannot be reached now (rather than that a statement is wrong):
/// no connection within the pool's wait, a connection refused or broken, PostgreSQL shutting
/// down or starting (SQLSTATE classes 08 and 57P), SQLite busy past its timeout.
fn unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|c| {
            c.starts_with("08")
                || c.starts_with("57P")
                // SQLite: SQLITE_BUSY (5) and its extended codes.
                || c == "5"
                || c == "517"
                || c == "261"
        }),
        _ => false,
    }
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Maps a database error to a [`StoreError`], a unique-value violation to a `Conflict` saying
/// `msg` (which value is taken, in the caller's words).
fn taken(msg: impl FnOnce() -> String) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| match StoreError::from(e) {
        StoreError::Conflict(_) => StoreError::Conflict(msg()),
        other => other,
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A site (an agent) or a gateway, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The node's id.
    pub id: Uuid,
    /// Site (agent) or gateway.
    pub kind: NodeKind,
    /// The organization it belongs to.
    pub org_id: Uuid,
    /// Display name, unique per kind.
    pub name: String,
    /// Overlay address, unique across sites and gateways.
    pub overlay_address: Ipv4Addr,
    /// Gateways only: the public `host:port` agents dial.
    pub endpoint: Option<String>,
    /// The WireGuard public key, known after enrollment.
    pub public_key: Option<WgPublicKey>,
    /// Whether the node holds a credential.
    pub has_credential: bool,
    /// Last message from the node (unix ms).
    pub last_seen_at: Option<i64>,
    /// The config version the node last reported as applied.
    pub applied_version: Option<u64>,
    /// The node's software version from its hello.
    pub software_version: Option<String>,
    /// The latest status report.
    pub last_status: Option<StatusReport>,
    /// When the latest status report arrived (unix ms).
    pub last_status_at: Option<i64>,
    /// Creation time (unix ms).
    pub created_at: i64,
}

impl Node {
    /// Enrolled: holds a credential and a public key.
    pub fn enrolled(&self) -> bool {
        self.has_credential && self.public_key.is_some()
    }
}

/// The most targets a resource may have, its primary one included.
pub const MAX_TARGETS: u16 = 32;

/// The first public port given to a TCP resource that names none.
pub const FIRST_TCP_PORT: u16 = 20000;
/// The last public port given to a TCP resource that names none.
pub const LAST_TCP_PORT: u16 = 29999;

/// A resource: a public hostname (HTTP) or a public port on every gateway (TCP) forwarded to a
/// private target through a site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// The resource's id.
    pub id: Uuid,
    /// The organization it belongs to (its primary site's).
    pub org_id: Uuid,
    /// Display name.
    pub name: String,
    /// HTTP or TCP.
    pub protocol: RouteProtocol,
    /// HTTP: public hostname, lower case, unique. TCP: empty.
    pub hostname: String,
    /// TCP: the port every gateway listens on, unique.
    pub public_port: Option<u16>,
    /// HTTP: plain-HTTP requests are redirected to HTTPS.
    pub redirect_https: bool,
    /// HTTP: `Strict-Transport-Security: max-age=<this>` on HTTPS responses.
    pub hsts_max_age: Option<u32>,
    /// The site whose agent reaches the target.
    pub site_id: Uuid,
    /// The private target, `host:port`.
    pub target: String,
    /// The port on the site's overlay address that leads to the target.
    pub overlay_port: u16,
    /// Creation time (unix ms).
    pub created_at: i64,
    /// How gateways spread requests over the targets.
    pub balance: Balance,
    /// HTTP: a cookie keeps a client on one target.
    pub sticky: bool,
    /// The health check agents run against every target.
    pub health_check: Option<HealthCheck>,
    /// Limits the gateways enforce, beside their own defaults.
    pub limits: Limits,
    /// TCP: targets get a PROXY protocol v2 header (unless a target says otherwise).
    pub proxy_protocol: bool,
    /// Targets beside the primary one (`site_id`, `target`), oldest first.
    pub more_targets: Vec<ResourceTarget>,
    /// HTTP: who may reach it (its own fields laid over its policy's); `None` is public.
    pub access: Option<AccessPolicy>,
    /// HTTP: the resource's own access fields (laid over its policy, when it follows one).
    pub own_access: Option<AccessPolicy>,
    /// HTTP: the reusable access policy it follows.
    pub policy_id: Option<Uuid>,
}

/// One more target of a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceTarget {
    /// Id.
    pub id: Uuid,
    /// The site whose agent reaches it.
    pub site_id: Uuid,
    /// `host:port`.
    pub target: String,
    /// The port on the site's overlay address that leads to it.
    pub overlay_port: u16,
    /// Creation time (unix ms).
    pub created_at: i64,
    /// TCP: whether it gets a PROXY protocol v2 header; `None`: as the resource says.
    pub proxy_protocol: Option<bool>,
}

impl ResourceTarget {
    /// Whether this target gets a PROXY protocol v2 header, on a resource that says `default`.
    pub fn proxy_protocol_or(&self, default: bool) -> bool {
        self.proxy_protocol.unwrap_or(default)
    }
}

/// A further target of a new resource, or one added later (already validated).
#[derive(Debug, Clone)]
pub struct NewTarget {
    /// The site whose agent reaches it.
    pub site_id: Uuid,
    /// `host:port`.
    pub target: String,
    /// TCP: PROXY protocol v2 to this target; `None`: as the resource says.
    pub proxy_protocol: Option<bool>,
}

/// Fields of a new resource (already validated).
#[derive(Debug, Clone)]
pub struct NewResource {
    /// Display name.
    pub name: String,
    /// HTTP or TCP.
    pub protocol: RouteProtocol,
    /// HTTP: public hostname; TCP: empty.
    pub hostname: String,
    /// TCP: the public port, or `None` for the lowest free one from 20000.
    pub public_port: Option<u16>,
    /// HTTP: redirect plain HTTP to HTTPS.
    pub redirect_https: bool,
    /// HTTP: HSTS max-age in seconds.
    pub hsts_max_age: Option<u32>,
    /// The site.
    pub site_id: Uuid,
    /// The target.
    pub target: String,
    /// Balancing.
    pub balance: Balance,
    /// Sticky sessions (HTTP).
    pub sticky: bool,
    /// Health check.
    pub health_check: Option<HealthCheck>,
    /// Limits.
    pub limits: Limits,
    /// TCP: PROXY protocol v2 to the targets.
    pub proxy_protocol: bool,
    /// Further targets.
    pub more_targets: Vec<NewTarget>,
    /// HTTP: who may reach it; `None` is public (or, with a policy, the policy alone).
    pub access: Option<AccessPolicy>,
    /// HTTP: the reusable access policy it follows (checked to be the same organization's).
    pub policy_id: Option<Uuid>,
}

/// Changes to a resource (already validated); `None` keeps the field.
#[derive(Debug, Clone, Default)]
pub struct ResourcePatch {
    /// New name.
    pub name: Option<String>,
    /// New hostname (HTTP).
    pub hostname: Option<String>,
    /// New public port (TCP).
    pub public_port: Option<u16>,
    /// Redirect plain HTTP to HTTPS (HTTP).
    pub redirect_https: Option<bool>,
    /// New HSTS max-age; `Some(None)` turns HSTS off (HTTP).
    pub hsts_max_age: Option<Option<u32>>,
    /// New site (the resource gets a new overlay port there).
    pub site_id: Option<Uuid>,
    /// New target.
    pub target: Option<String>,
    /// New balancing.
    pub balance: Option<Balance>,
    /// Sticky sessions on or off (HTTP).
    pub sticky: Option<bool>,
    /// New health check; `Some(None)` removes it.
    pub health_check: Option<Option<HealthCheck>>,
    /// New limits (replacing the old ones whole).
    pub limits: Option<Limits>,
    /// PROXY protocol v2 on or off (TCP).
    pub proxy_protocol: Option<bool>,
    /// New access policy; `Some(None)` makes the resource public (HTTP).
    pub access: Option<Option<AccessPolicy>>,
    /// The reusable policy it follows; `Some(None)`: none (HTTP).
    pub policy_id: Option<Option<Uuid>>,
}

fn table(kind: NodeKind) -> &'static str {
    match kind {
        NodeKind::Agent => "sites",
        NodeKind::Gateway => "gateways",
    }
}

fn what(kind: NodeKind) -> &'static str {
    match kind {
        NodeKind::Agent => "site",
        NodeKind::Gateway => "gateway",
    }
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn parse_uuid(s: &str) -> Result<Uuid> {
    Uuid::parse_str(s).map_err(corrupt)
}

const NODE_COLUMNS: &str = "id, name, overlay_address, public_key, credential_hash, last_seen_at, \
     applied_version, software_version, last_status, last_status_at, created_at, org_id";

fn node_from_row(kind: NodeKind, row: &AnyRow) -> Result<Node> {
    let id: String = row.try_get("id")?;
    let addr: String = row.try_get("overlay_address")?;
    let public_key: Option<String> = row.try_get("public_key")?;
    let credential: Option<String> = row.try_get("credential_hash")?;
    let applied: Option<i64> = row.try_get("applied_version")?;
    let status: Option<String> = row.try_get("last_status")?;
    let endpoint = match kind {
        NodeKind::Gateway => Some(row.try_get::<String, _>("endpoint")?),
        NodeKind::Agent => None,
    };
    let org: String = row.try_get("org_id")?;
    Ok(Node {
        id: parse_uuid(&id)?,
        kind,
        org_id: parse_uuid(&org)?,
        name: row.try_get("name")?,
        overlay_address: Ipv4Addr::from_str(&addr).map_err(corrupt)?,
        endpoint,
        public_key: public_key
            .map(|k| WgPublicKey::from_base64(&k).map_err(corrupt))
            .transpose()?,
        has_credential: credential.is_some(),
        last_seen_at: row.try_get("last_seen_at")?,
        applied_version: applied.map(|v| v.max(0) as u64),
        software_version: row.try_get("software_version")?,
        last_status: status
            .map(|s| serde_json::from_str(&s).map_err(corrupt))
            .transpose()?,
        last_status_at: row.try_get("last_status_at")?,
        created_at: row.try_get("created_at")?,
    })
}

/// Resources with their policy's access (`policy_access`), for [`resource_from_row`].
const RESOURCE_SELECT: &str = "SELECT r.*, p.access AS policy_access FROM resources r \
     LEFT JOIN access_policies p ON p.id = r.policy_id";

fn resource_from_row(row: &AnyRow) -> Result<Resource> {
    let id: String = row.try_get("id")?;
    let site_id: String = row.try_get("site_id")?;
    let port: i64 = row.try_get("overlay_port")?;
    let hostname: Option<String> = row.try_get("hostname")?;
    let protocol: String = row.try_get("protocol")?;
    let public_port: Option<i64> = row.try_get("public_port")?;
    let redirect_https: i64 = row.try_get("redirect_https")?;
    let hsts_max_age: Option<i64> = row.try_get("hsts_max_age")?;
    let org: String = row.try_get("org_id")?;
    let own_access: Option<AccessPolicy> = row
        .try_get::<Option<String>, _>("access")?
        .map(|j| serde_json::from_str(&j).map_err(corrupt))
        .transpose()?;
    let policy_id = row
        .try_get::<Option<String>, _>("policy_id")?
        .map(|p| parse_uuid(&p))
        .transpose()?;
    // A resource whose policy is gone (never, while deleting one in use is refused) is closed
    // rather than opened: an empty policy needs sign-in.
    let policy_access: Option<AccessPolicy> = match policy_id {
        None => None,
        Some(_) => Some(
            row.try_get::<Option<String>, _>("policy_access")?
                .map(|j| serde_json::from_str(&j).map_err(corrupt))
                .transpose()?
                .unwrap_or_default(),
        ),
    };
    Ok(Resource {
        id: parse_uuid(&id)?,
        org_id: parse_uuid(&org)?,
        name: row.try_get("name")?,
        protocol: match protocol.as_str() {
            "http" => RouteProtocol::Http,
            "tcp" => RouteProtocol::Tcp,
            "udp" => RouteProtocol::Udp,
            other => return Err(corrupt(format!("resource protocol {other:?}"))),
        },
        hostname: hostname.unwrap_or_default(),
        public_port: public_port
            .map(|p| u16::try_from(p).map_err(corrupt))
            .transpose()?,
        redirect_https: redirect_https != 0,
        hsts_max_age: hsts_max_age
            .map(|p| u32::try_from(p).map_err(corrupt))
            .transpose()?,
        site_id: parse_uuid(&site_id)?,
        target: row.try_get("target")?,
        overlay_port: u16::try_from(port).map_err(corrupt)?,
        created_at: row.try_get("created_at")?,
        balance: match row.try_get::<String, _>("balance")?.as_str() {
            "round_robin" => Balance::RoundRobin,
            "least_outstanding" => Balance::LeastOutstanding,
            other => return Err(corrupt(format!("resource balance {other:?}"))),
        },
        sticky: row.try_get::<i64, _>("sticky")? != 0,
        health_check: row
            .try_get::<Option<String>, _>("health_check")?
            .map(|j| serde_json::from_str(&j).map_err(corrupt))
            .transpose()?,
        limits: row
            .try_get::<Option<String>, _>("limits")?
            .map(|j| serde_json::from_str(&j).map_err(corrupt))
            .transpose()?
            .unwrap_or_default(),
        proxy_protocol: row.try_get::<i64, _>("proxy_protocol")? != 0,
        more_targets: Vec::new(),
        access: match &policy_access {
            Some(p) => Some(p.overlaid_with(own_access.as_ref())),
            None => own_access.clone(),
        },
        own_access,
        policy_id,
    })
}

fn resource_target_from_row(row: &AnyRow) -> Result<(Uuid, ResourceTarget)> {
    let resource: String = row.try_get("resource_id")?;
    let id: String = row.try_get("id")?;
    let site: String = row.try_get("site_id")?;
    let port: i64 = row.try_get("overlay_port")?;
    Ok((
        parse_uuid(&resource)?,
        ResourceTarget {
            id: parse_uuid(&id)?,
            site_id: parse_uuid(&site)?,
            target: row.try_get("target")?,
            overlay_port: u16::try_from(port).map_err(corrupt)?,
            created_at: row.try_get("created_at")?,
            proxy_protocol: row
                .try_get::<Option<i64>, _>("proxy_protocol")?
                .map(|v| v != 0),
        },
    ))
}

/// Gives each resource its further targets from `rows` of `resource_targets`.
fn attach_targets(resources: &mut [Resource], rows: &[AnyRow]) -> Result<()> {
    let mut by_resource: std::collections::HashMap<Uuid, Vec<ResourceTarget>> =
        std::collections::HashMap::new();
    for row in rows {
        let (resource, t) = resource_target_from_row(row)?;
        by_resource.entry(resource).or_default().push(t);
    }
    for r in resources {
        if let Some(mut ts) = by_resource.remove(&r.id) {
            ts.sort_by_key(|t| (t.created_at, t.id));
            r.more_targets = ts;
        }
    }
    Ok(())
}

fn balance_name(b: Balance) -> &'static str {
    match b {
        Balance::RoundRobin => "round_robin",
        Balance::LeastOutstanding => "least_outstanding",
    }
}

fn health_json(h: &Option<HealthCheck>) -> Result<Option<String>> {
    h.as_ref()
        .map(|h| serde_json::to_string(h).map_err(corrupt))
        .transpose()
}

fn limits_json(l: &Limits) -> Result<Option<String>> {
    if *l == Limits::default() {
        return Ok(None);
    }
    serde_json::to_string(l).map(Some).map_err(corrupt)
}

fn access_json(a: &Option<AccessPolicy>) -> Result<Option<String>> {
    a.as_ref()
        .map(|a| serde_json::to_string(a).map_err(corrupt))
        .transpose()
}

/// The store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    overlay: OverlayNet,
    signal: watch::Sender<u64>,
    /// Serializes config mutations in this process, so allocations do not race.
    write: std::sync::Arc<Mutex<()>>,
    /// How long a new enrollment token is valid.
    token_ttl: Duration,
    /// Seals private keys at rest; without one, certificates cannot be kept.
    sealer: Option<std::sync::Arc<crate::seal::Sealer>>,
    /// Control's public URL: the issuer of session tokens, and where the sign-in page is.
    public_url: String,
    /// How long a sign-in lasts (ms).
    session_life_ms: i64,
    /// The gateways' agent-sessions hostname, if control runs that endpoint.
    sessions_host: Option<String>,
    /// SQLite or PostgreSQL.
    backend: Backend,
}

/// How long a request waits for a PostgreSQL connection before it is answered 503.
pub const POSTGRES_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// The PostgreSQL notification channel of config versions: every replica `LISTEN`s on it and
/// publishes each version it hears ([`crate::replicas::follow_changes`]).
pub const CONFIG_CHANNEL: &str = "kakuremichi_config";

/// The PostgreSQL advisory lock of first-run seeding ("kakuremi" in ASCII).
const SEEDING_LOCK: i64 = 0x6b61_6b75_7265_6d69;

/// How long a session (and every token minted from it) lasts.
pub const SESSION_LIFE_MS: i64 = 24 * 3600 * 1000;

/// Which database a URL points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite file.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

impl Backend {
    /// The backend of a database URL.
    pub fn of_url(url: &str) -> Option<Backend> {
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }
}

impl Store {
    /// Connects to `url` (`sqlite://...` or `postgres://...`) and runs the migrations.
    pub async fn connect(url: &str, overlay: OverlayNet) -> Result<Store> {
        Self::connect_with(url, overlay, 8).await
    }

    /// Like [`Store::connect`], with a maximum pool size.
    pub async fn connect_with(url: &str, overlay: OverlayNet, max_conns: u32) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of_url(url).ok_or(StoreError::UnsupportedUrl)?;
        // SQLite allows one writer at a time, and a transaction that reads first and then writes
        // fails at once with "database is locked" (no busy wait can help it) when another
        // connection wrote in between. One connection per process makes that impossible; WAL
        // with synchronous=NORMAL keeps commits cheap (no fsync but at checkpoints), and the busy
        // timeout covers another process (a backup, the sqlite3 shell) holding the file.
        let options = match backend {
            Backend::Sqlite => AnyPoolOptions::new()
                .max_connections(1)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        use sqlx::Executor as _;
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                        Ok(())
                    })
                }),
            // While PostgreSQL is away (restarting, unreachable), a request waits this long for
            // a connection and is then answered 503 with Retry-After, not held for 30 s.
            Backend::Postgres => AnyPoolOptions::new()
                .max_connections(max_conns)
                .acquire_timeout(POSTGRES_ACQUIRE_TIMEOUT),
        };
        let pool = options.connect(url).await?;
        // A migration a newer release applied is not an error: during a rolling upgrade a
        // replica of the version before may (re)start on the database the new one migrated.
        // Migrations only ever expand (add tables, nullable columns, indexes) in the release that
        // needs them and contract in a later one, so the older code runs on the newer schema.
        let mut migrator = match backend {
            Backend::Sqlite => sqlx::migrate!("../migrations/sqlite"),
            Backend::Postgres => sqlx::migrate!("../migrations/postgres"),
        };
        migrator.set_ignore_missing(true);
        migrator.run(&pool).await?;
        let version: i64 = sqlx::query_scalar("SELECT version FROM config_state WHERE id = 1")
            .fetch_one(&pool)
            .await?;
        let (signal, _) = watch::channel(version.max(0) as u64);
        Ok(Store {
            pool,
            overlay,
            signal,
            write: Default::default(),
            token_ttl: DEFAULT_ENROLLMENT_TOKEN_TTL,
            sealer: None,
            public_url: "http://127.0.0.1:3000".into(),
            session_life_ms: SESSION_LIFE_MS,
            sessions_host: None,
            backend,
        })
    }

    /// `NOTIFY channel, payload` on PostgreSQL (other replicas listen); nothing on SQLite.
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<()> {
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(channel)
                .bind(payload)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// SQLite or PostgreSQL.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Holds, until `tx` ends, the lock under which first-run seeding happens (the admin key, the
    /// signing key): replicas started together on an empty PostgreSQL database take turns, and
    /// each after the first finds what the first made. (SQLite has one writer already.)
    pub(crate) async fn seeding_lock(&self, tx: &mut Transaction<'static, Any>) -> Result<()> {
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(SEEDING_LOCK)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// The same store, sealing private keys with `sealer`.
    pub fn with_sealer(mut self, sealer: std::sync::Arc<crate::seal::Sealer>) -> Store {
        self.sealer = Some(sealer);
        self
    }

    /// The same store, with sign-ins lasting `life` (at least a second).
    pub fn with_session_life(mut self, life: Duration) -> Store {
        self.session_life_ms = i64::try_from(life.as_millis())
            .unwrap_or(SESSION_LIFE_MS)
            .max(1000);
        self
    }

    /// How long a sign-in lasts (ms): control's session and the tokens gateways hold.
    pub fn session_life_ms(&self) -> i64 {
        self.session_life_ms
    }

    /// The same store, with control reachable by browsers at `url` (no trailing slash).
    pub fn with_public_url(mut self, url: &str) -> Store {
        self.public_url = url.trim_end_matches('/').to_owned();
        self
    }

    /// Control's public URL (the issuer of session tokens).
    pub fn public_url(&self) -> &str {
        &self.public_url
    }

    /// The same store, with gateways serving the agent-sessions endpoint at `host`.
    pub fn with_sessions_host(mut self, host: Option<String>) -> Store {
        self.sessions_host = host.map(|h| h.to_ascii_lowercase());
        self
    }

    /// The gateways' agent-sessions hostname, if any.
    pub fn sessions_host(&self) -> Option<&str> {
        self.sessions_host.as_deref()
    }

    /// The same store, issuing enrollment tokens valid for `ttl`.
    pub fn with_enrollment_token_ttl(mut self, ttl: Duration) -> Store {
        self.token_ttl = ttl;
        self
    }

    /// The overlay network addresses are allocated from.
    pub fn overlay(&self) -> OverlayNet {
        self.overlay
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A receiver of the config version; it changes after every committed config change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.signal.subscribe()
    }

    /// The sender behind [`Store::subscribe`], for other sources of changes (e.g. Postgres NOTIFY).
    pub fn signal(&self) -> &watch::Sender<u64> {
        &self.signal
    }

    pub(crate) fn publish(&self, version: u64) {
        self.signal.send_if_modified(|v| {
            if version > *v {
                *v = version;
                true
            } else {
                false
            }
        });
    }

    /// Reads the config version from the database and publishes it when it is newer than the
    /// one known here (another replica's change whose notification has not arrived yet), so that
    /// what is read from [`crate::AppState::world`] next is at least that new.
    pub async fn catch_up(&self) -> Result<u64> {
        let v = self.config_version().await?;
        self.publish(v);
        Ok(v)
    }

    /// The current config version, from the database.
    pub async fn config_version(&self) -> Result<u64> {
        let v: i64 = sqlx::query_scalar("SELECT version FROM config_state WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(v.max(0) as u64)
    }

    async fn bump(tx: &mut Transaction<'static, Any>) -> Result<u64> {
        let v: i64 = sqlx::query_scalar(
            "UPDATE config_state SET version = version + 1 WHERE id = 1 RETURNING version",
        )
        .fetch_one(&mut **tx)
        .await?;
        Ok(v.max(0) as u64)
    }

    async fn commit_bumped(&self, mut tx: Transaction<'static, Any>) -> Result<u64> {
        let v = Self::bump(&mut tx).await?;
        if self.backend == Backend::Postgres {
            // Delivered to every replica's LISTEN when (and only if) the transaction commits.
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CONFIG_CHANNEL)
                .bind(v.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.publish(v);
        Ok(v)
    }

    // ---------------------------------------------------------------- admin keys

    /// Makes sure an admin key exists. With none stored, stores `initial` if given, otherwise
    /// generates one. Returns the key only when it was generated here (to show it once).
    pub async fn ensure_admin_key(&self, initial: Option<&Secret>) -> Result<Option<Secret>> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        self.seeding_lock(&mut tx).await?;
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys")
            .fetch_one(&mut *tx)
            .await?;
        if count > 0 {
            return Ok(None);
        }
        let (id, key, generated) = match initial {
            Some(k) => {
                let id = secrets::embedded_id(secrets::ADMIN_KEY_PREFIX, k).ok_or_else(|| {
                    StoreError::Invalid(
                        "initial admin key must look like kma_<32 hex>_<secret>".into(),
                    )
                })?;
                (id, k.clone(), false)
            }
            None => {
                let id = Uuid::new_v4();
                (
                    id,
                    secrets::new_with_id(secrets::ADMIN_KEY_PREFIX, id),
                    true,
                )
            }
        };
        sqlx::query("INSERT INTO api_keys (id, hash, created_at) VALUES ($1, $2, $3)")
            .bind(id.to_string())
            .bind(secrets::digest(&key))
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(generated.then_some(key))
    }

    /// Whether `key` is a stored admin key (looked up by its embedded id, compared by digest).
    pub async fn verify_admin_key(&self, key: &Secret) -> Result<bool> {
        let Some(id) = secrets::embedded_id(secrets::ADMIN_KEY_PREFIX, key) else {
            return Ok(false);
        };
        let hash: Option<String> = sqlx::query_scalar("SELECT hash FROM api_keys WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        let Some(hash) = hash else {
            return Ok(false);
        };
        let verified = secrets::verify(&hash, key).await;
        if verified == secrets::Verified::YesUpgrade {
            sqlx::query("UPDATE api_keys SET hash = $1 WHERE id = $2 AND hash = $3")
                .bind(secrets::digest(key))
                .bind(id.to_string())
                .bind(&hash)
                .execute(&self.pool)
                .await?;
        }
        Ok(verified.ok())
    }

    // ---------------------------------------------------------------- nodes

    async fn used_addresses(tx: &mut Transaction<'static, Any>) -> Result<HashSet<Ipv4Addr>> {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT overlay_address FROM sites UNION ALL SELECT overlay_address FROM gateways",
        )
        .fetch_all(&mut **tx)
        .await?;
        Ok(rows.iter().filter_map(|a| a.parse().ok()).collect())
    }

    /// Creates a site (`endpoint: None`) or a gateway (`endpoint: Some`) in `org`, allocating
    /// the lowest free overlay address. Returns the node and its one-time enrollment token.
    pub async fn create_node(
        &self,
        kind: NodeKind,
        org: Uuid,
        name: &str,
        endpoint: Option<&str>,
    ) -> Result<(Node, Secret)> {
        let _w = self.write.lock().await;
        let id = Uuid::new_v4();
        let token = secrets::new_with_id(secrets::ENROLL_TOKEN_PREFIX, id);
        let token_hash = secrets::digest(&token);
        let mut tx = self.pool.begin().await?;
        self.check_name_free(&mut tx, kind, name, None).await?;
        let used = Self::used_addresses(&mut tx).await?;
        let addr = self.overlay.lowest_free(&used).ok_or_else(|| {
            StoreError::Exhausted(format!("overlay network {} is full", self.overlay))
        })?;
        let now = now_ms();
        // Gateways store their endpoint too, bound last.
        let (endpoint_column, endpoint_param) = match kind {
            NodeKind::Agent => ("", ""),
            NodeKind::Gateway => (", endpoint", ", $8"),
        };
        let sql = format!(
            "INSERT INTO {} (id, name, overlay_address, enrollment_token_hash, \
             enrollment_token_expires_at, created_at, org_id{endpoint_column}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7{endpoint_param})",
            table(kind)
        );
        let mut insert = sqlx::query(&sql)
            .bind(id.to_string())
            .bind(name)
            .bind(addr.to_string())
            .bind(token_hash)
            .bind(self.token_expiry(now))
            .bind(now)
            .bind(org.to_string());
        if kind == NodeKind::Gateway {
            insert = insert.bind(endpoint.unwrap_or_default());
        }
        insert.execute(&mut *tx).await?;
        // A node without a public key appears in no snapshot, but the bump keeps "every change
        // bumps" simple to reason about.
        self.commit_bumped(tx).await?;
        let node = self.get_node(kind, id).await?;
        Ok((node, token))
    }

    async fn check_name_free(
        &self,
        tx: &mut Transaction<'static, Any>,
        kind: NodeKind,
        name: &str,
        except: Option<Uuid>,
    ) -> Result<()> {
        let sql = format!("SELECT id FROM {} WHERE name = $1", table(kind));
        let other: Option<String> = sqlx::query_scalar(&sql)
            .bind(name)
            .fetch_optional(&mut **tx)
            .await?;
        match other {
            Some(o) if Some(o.as_str()) != except.map(|e| e.to_string()).as_deref() => Err(
                StoreError::Conflict(format!("a {} named {name:?} already exists", what(kind))),
            ),
            _ => Ok(()),
        }
    }

    fn node_select(kind: NodeKind) -> String {
        match kind {
            NodeKind::Agent => format!("SELECT {NODE_COLUMNS} FROM sites"),
            NodeKind::Gateway => format!("SELECT {NODE_COLUMNS}, endpoint FROM gateways"),
        }
    }

    /// One site or gateway.
    pub async fn get_node(&self, kind: NodeKind, id: Uuid) -> Result<Node> {
        let sql = format!("{} WHERE id = $1", Self::node_select(kind));
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound(what(kind)))?;
        node_from_row(kind, &row)
    }

    /// All sites or gateways, oldest first.
    pub async fn list_nodes(&self, kind: NodeKind) -> Result<Vec<Node>> {
        let sql = format!("{} ORDER BY created_at, id", Self::node_select(kind));
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(|r| node_from_row(kind, r)).collect()
    }

    /// Renames a node and/or (gateways) changes its endpoint.
    pub async fn update_node(
        &self,
        kind: NodeKind,
        id: Uuid,
        name: Option<&str>,
        endpoint: Option<&str>,
    ) -> Result<Node> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let exists: Option<String> =
            sqlx::query_scalar(&format!("SELECT id FROM {} WHERE id = $1", table(kind)))
                .bind(id.to_string())
                .fetch_optional(&mut *tx)
                .await?;
        if exists.is_none() {
            return Err(StoreError::NotFound(what(kind)));
        }
        if let Some(name) = name {
            self.check_name_free(&mut tx, kind, name, Some(id)).await?;
            sqlx::query(&format!(
                "UPDATE {} SET name = $1 WHERE id = $2",
                table(kind)
            ))
            .bind(name)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        }
        if let (NodeKind::Gateway, Some(endpoint)) = (kind, endpoint) {
            sqlx::query("UPDATE gateways SET endpoint = $1 WHERE id = $2")
                .bind(endpoint)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        self.commit_bumped(tx).await?;
        self.get_node(kind, id).await
    }

    /// Deletes a node. Deleting a site deletes the resources whose primary target it serves, and
    /// the further targets it serves for other resources.
    pub async fn delete_node(&self, kind: NodeKind, id: Uuid) -> Result<()> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        if kind == NodeKind::Agent {
            // What the foreign keys cascade, spelled out: no connection setting can then leave a
            // target pointing at a site or a resource that is gone.
            sqlx::query(
                "DELETE FROM resource_targets WHERE site_id = $1 \
                 OR resource_id IN (SELECT id FROM resources WHERE site_id = $2)",
            )
            .bind(id.to_string())
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM resources WHERE site_id = $1")
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        let done = sqlx::query(&format!("DELETE FROM {} WHERE id = $1", table(kind)))
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(what(kind)));
        }
        sqlx::query("DELETE FROM node_keys WHERE node_id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        self.commit_bumped(tx).await?;
        Ok(())
    }

    /// When a token issued at `now` expires.
    fn token_expiry(&self, now: i64) -> i64 {
        let ttl = i64::try_from(self.token_ttl.as_millis()).unwrap_or(i64::MAX);
        now.saturating_add(ttl)
    }

    /// Revokes the node's credential and forgets its public key (it leaves every snapshot, and
    /// its live session is refused at the next config version, which this bumps), then issues a
    /// new one-time enrollment token, returned once. The node must enroll again.
    pub async fn regenerate_enrollment_token(&self, kind: NodeKind, id: Uuid) -> Result<Secret> {
        let token = secrets::new_with_id(secrets::ENROLL_TOKEN_PREFIX, id);
        self.reset_credentials(kind, id, Some(&token)).await?;
        Ok(token)
    }

    /// Revokes the node: no credential, no public key, no enrollment token. Its live session is
    /// refused at once (the config version is bumped); a new token brings it back.
    pub async fn revoke_node(&self, kind: NodeKind, id: Uuid) -> Result<()> {
        self.reset_credentials(kind, id, None).await
    }

    async fn reset_credentials(
        &self,
        kind: NodeKind,
        id: Uuid,
        token: Option<&Secret>,
    ) -> Result<()> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(&format!(
            "UPDATE {} SET enrollment_token_hash = $1, enrollment_token_expires_at = $2, \
             credential_hash = NULL, public_key = NULL WHERE id = $3",
            table(kind)
        ))
        .bind(token.map(secrets::digest))
        .bind(token.map(|_| self.token_expiry(now_ms())))
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(what(kind)));
        }
        sqlx::query("DELETE FROM node_keys WHERE node_id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        self.commit_bumped(tx).await?;
        Ok(())
    }

    /// Makes `key` the node's public key in the `node_keys` table (inside `tx`); a key another
    /// node holds is a [`StoreError::KeyInUse`].
    async fn set_key(
        tx: &mut Transaction<'static, Any>,
        kind: NodeKind,
        id: Uuid,
        key: &WgPublicKey,
    ) -> Result<()> {
        let key = key.to_base64();
        let holder: Option<String> =
            sqlx::query_scalar("SELECT node_id FROM node_keys WHERE public_key = $1")
                .bind(&key)
                .fetch_optional(&mut **tx)
                .await?;
        match holder {
            Some(h) if h == id.to_string() => {}
            Some(_) => return Err(StoreError::KeyInUse),
            None => {
                sqlx::query("DELETE FROM node_keys WHERE node_id = $1")
                    .bind(id.to_string())
                    .execute(&mut **tx)
                    .await?;
                sqlx::query("INSERT INTO node_keys (public_key, node_id) VALUES ($1, $2)")
                    .bind(&key)
                    .bind(id.to_string())
                    .execute(&mut **tx)
                    .await
                    .map_err(|e| match StoreError::from(e) {
                        StoreError::Conflict(_) => StoreError::KeyInUse,
                        other => other,
                    })?;
            }
        }
        sqlx::query(&format!(
            "UPDATE {} SET public_key = $1 WHERE id = $2",
            table(kind)
        ))
        .bind(&key)
        .bind(id.to_string())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Trades a one-time enrollment token for a credential; stores the public key. The token is
    /// consumed whether or not the node was enrolled before; an expired token is refused, and so
    /// is a public key another node holds.
    pub async fn enroll(
        &self,
        kind: NodeKind,
        token: &Secret,
        public_key: &WgPublicKey,
    ) -> Result<EnrollResponse> {
        let id = secrets::embedded_id(secrets::ENROLL_TOKEN_PREFIX, token)
            .ok_or(StoreError::BadSecret)?;
        let t = table(kind);
        let row = sqlx::query(&format!(
            "SELECT enrollment_token_hash, enrollment_token_expires_at, overlay_address \
             FROM {t} WHERE id = $1"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::BadSecret)?;
        let hash: Option<String> = row.try_get("enrollment_token_hash")?;
        let expires: Option<i64> = row.try_get("enrollment_token_expires_at")?;
        let addr: String = row.try_get("overlay_address")?;
        let hash = hash.ok_or(StoreError::BadSecret)?;
        if !secrets::verify(&hash, token).await.ok() {
            return Err(StoreError::BadSecret);
        }
        if expires.is_some_and(|e| e <= now_ms()) {
            return Err(StoreError::Expired);
        }
        let credential = secrets::new_plain(secrets::CREDENTIAL_PREFIX);
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        // Compare-and-swap on the token hash: of two concurrent enrollments, one wins.
        let done = sqlx::query(&format!(
            "UPDATE {t} SET enrollment_token_hash = NULL, enrollment_token_expires_at = NULL, \
             credential_hash = $1 WHERE id = $2 AND enrollment_token_hash = $3"
        ))
        .bind(secrets::digest(&credential))
        .bind(id.to_string())
        .bind(&hash)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::BadSecret);
        }
        Self::set_key(&mut tx, kind, id, public_key).await?;
        self.commit_bumped(tx).await?;
        Ok(EnrollResponse {
            node_id: id,
            kind,
            credential,
            overlay_address: addr.parse().map_err(corrupt)?,
        })
    }

    /// Checks a node's credential; returns the stored credential digest it matched (after
    /// replacing a legacy argon2 hash with a digest), which sessions compare against later worlds.
    pub async fn authenticate_node(
        &self,
        kind: NodeKind,
        id: Uuid,
        credential: &Secret,
    ) -> Result<String> {
        let hash: Option<Option<String>> = sqlx::query_scalar(&format!(
            "SELECT credential_hash FROM {} WHERE id = $1",
            table(kind)
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        let Some(Some(hash)) = hash else {
            return Err(StoreError::BadSecret);
        };
        match secrets::verify(&hash, credential).await {
            secrets::Verified::Yes => Ok(hash),
            secrets::Verified::No => Err(StoreError::BadSecret),
            secrets::Verified::YesUpgrade => {
                let digest = secrets::digest(credential);
                sqlx::query(&format!(
                    "UPDATE {} SET credential_hash = $1 WHERE id = $2 AND credential_hash = $3",
                    table(kind)
                ))
                .bind(&digest)
                .bind(id.to_string())
                .bind(&hash)
                .execute(&self.pool)
                .await?;
                Ok(digest)
            }
        }
    }

    /// Makes `public_key` the node's key if it changed (bumping the config version); a key
    /// another node holds is a [`StoreError::KeyInUse`] and changes nothing.
    pub async fn claim_key(
        &self,
        kind: NodeKind,
        id: Uuid,
        public_key: &WgPublicKey,
    ) -> Result<()> {
        let current: Option<Option<String>> = sqlx::query_scalar(&format!(
            "SELECT public_key FROM {} WHERE id = $1",
            table(kind)
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        let Some(current) = current else {
            return Err(StoreError::NotFound(what(kind)));
        };
        if current.as_deref() == Some(public_key.to_base64().as_str()) {
            return Ok(());
        }
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        Self::set_key(&mut tx, kind, id, public_key).await?;
        self.commit_bumped(tx).await?;
        Ok(())
    }

    /// Writes coalesced node activity (see [`crate::activity`]) in one transaction.
    pub async fn record_activity(&self, batch: &[((NodeKind, Uuid), NodeActivity)]) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for ((kind, id), a) in batch {
            let (status, status_at) = match &a.status {
                Some((json, at)) => (Some(json.as_str()), Some(*at)),
                None => (None, None),
            };
            sqlx::query(&format!(
                "UPDATE {} SET last_seen_at = COALESCE($1, last_seen_at), \
                 applied_version = COALESCE($2, applied_version), \
                 software_version = COALESCE($3, software_version), \
                 last_status = COALESCE($4, last_status), \
                 last_status_at = COALESCE($5, last_status_at) WHERE id = $6",
                table(*kind)
            ))
            .bind(a.seen_at)
            .bind(
                a.applied_version
                    .map(|v| i64::try_from(v).unwrap_or(i64::MAX)),
            )
            .bind(a.software_version.as_deref())
            .bind(status)
            .bind(status_at)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    // ---------------------------------------------------------------- resources

    /// The site's organization; a site that does not exist, or (with `org`) belongs to another
    /// organization, is the same `Invalid`.
    async fn site_exists(
        tx: &mut Transaction<'static, Any>,
        site_id: Uuid,
        org: Option<Uuid>,
    ) -> Result<Uuid> {
        let found: Option<String> = sqlx::query_scalar("SELECT org_id FROM sites WHERE id = $1")
            .bind(site_id.to_string())
            .fetch_optional(&mut **tx)
            .await?;
        match found.map(|o| parse_uuid(&o)).transpose()? {
            Some(o) if org.is_none_or(|want| want == o) => Ok(o),
            _ => Err(StoreError::Invalid(format!(
                "site {site_id} does not exist"
            ))),
        }
    }

    async fn check_hostname_free(
        tx: &mut Transaction<'static, Any>,
        hostname: &str,
        except: Option<Uuid>,
    ) -> Result<()> {
        let other: Option<String> =
            sqlx::query_scalar("SELECT id FROM resources WHERE hostname = $1")
                .bind(hostname)
                .fetch_optional(&mut **tx)
                .await?;
        match other {
            Some(o) if Some(o.as_str()) != except.map(|e| e.to_string()).as_deref() => {
                Err(StoreError::Conflict(format!(
                    "hostname {hostname:?} is already used by a resource"
                )))
            }
            _ => Ok(()),
        }
    }

    /// The overlay port for a new resource of the site: the lowest free port above the highest
    /// one the site ever gave out (so a freed port is not reused while a gateway or an agent may
    /// still hold it), wrapping to the lowest free port once the range is used up.
    async fn free_port(tx: &mut Transaction<'static, Any>, site_id: Uuid) -> Result<u16> {
        let used: Vec<i64> = sqlx::query_scalar(
            "SELECT overlay_port FROM resources WHERE site_id = $1 \
                 UNION SELECT overlay_port FROM resource_targets WHERE site_id = $2",
        )
        .bind(site_id.to_string())
        .bind(site_id.to_string())
        .fetch_all(&mut **tx)
        .await?;
        let used: HashSet<i64> = used.into_iter().collect();
        let last: i64 = sqlx::query_scalar("SELECT last_overlay_port FROM sites WHERE id = $1")
            .bind(site_id.to_string())
            .fetch_optional(&mut **tx)
            .await?
            .unwrap_or(0);
        let start = u16::try_from(last.saturating_add(1))
            .unwrap_or(u16::MAX)
            .max(FIRST_OVERLAY_PORT);
        let port = (start..=u16::MAX)
            .chain(FIRST_OVERLAY_PORT..start)
            .find(|p| !used.contains(&i64::from(*p)))
            .ok_or_else(|| {
                StoreError::Exhausted(format!("site {site_id} has no free overlay port"))
            })?;
        sqlx::query("UPDATE sites SET last_overlay_port = $1 WHERE id = $2")
            .bind(i64::from(port))
            .bind(site_id.to_string())
            .execute(&mut **tx)
            .await?;
        Ok(port)
    }

    /// A TCP resource's public port: `wanted` if free, else a conflict; with none wanted, the
    /// lowest free port from [`FIRST_TCP_PORT`] to [`LAST_TCP_PORT`].
    async fn public_port(
        tx: &mut Transaction<'static, Any>,
        wanted: Option<u16>,
        except: Option<Uuid>,
    ) -> Result<u16> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT id, public_port FROM resources WHERE public_port IS NOT NULL")
                .fetch_all(&mut **tx)
                .await?;
        let except = except.map(|e| e.to_string());
        let used: HashSet<i64> = rows
            .into_iter()
            .filter(|(id, _)| Some(id) != except.as_ref())
            .map(|(_, p)| p)
            .collect();
        match wanted {
            Some(p) if used.contains(&i64::from(p)) => Err(StoreError::Conflict(format!(
                "public port {p} is already used by a resource"
            ))),
            Some(p) => Ok(p),
            None => (FIRST_TCP_PORT..=LAST_TCP_PORT)
                .find(|p| !used.contains(&i64::from(*p)))
                .ok_or_else(|| {
                    StoreError::Exhausted(format!(
                        "no free public port from {FIRST_TCP_PORT} to {LAST_TCP_PORT}"
                    ))
                }),
        }
    }

    /// Creates a resource on an existing site, with the next free overlay port there.
    pub async fn create_resource(&self, new: &NewResource) -> Result<Resource> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let org = Self::site_exists(&mut tx, new.site_id, None).await?;
        if new.sticky && new.protocol != RouteProtocol::Http {
            return Err(StoreError::Invalid(
                "sticky sessions are for HTTP resources".into(),
            ));
        }
        let (protocol, hostname, public_port) = match new.protocol {
            RouteProtocol::Http => {
                Self::check_hostname_free(&mut tx, &new.hostname, None).await?;
                ("http", Some(new.hostname.as_str()), None)
            }
            RouteProtocol::Tcp | RouteProtocol::Udp => {
                let p = Self::public_port(&mut tx, new.public_port, None).await?;
                let name = if new.protocol == RouteProtocol::Tcp {
                    "tcp"
                } else {
                    "udp"
                };
                (name, None, Some(i64::from(p)))
            }
        };
        if let Some(p) = new.policy_id {
            if new.protocol != RouteProtocol::Http {
                return Err(StoreError::Invalid(
                    "access policies are for HTTP resources".into(),
                ));
            }
            Self::policy_exists(&mut tx, org, p).await?;
        }
        let port = Self::free_port(&mut tx, new.site_id).await?;
        let id = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO resources (id, name, hostname, site_id, target, overlay_port, created_at, \
             protocol, public_port, redirect_https, hsts_max_age, balance, sticky, health_check, \
             limits, proxy_protocol, access, org_id, policy_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
             $18, $19)",
        )
        .bind(id.to_string())
        .bind(&new.name)
        .bind(hostname)
        .bind(new.site_id.to_string())
        .bind(&new.target)
        .bind(i64::from(port))
        .bind(now_ms())
        .bind(protocol)
        .bind(public_port)
        .bind(i64::from(new.redirect_https))
        .bind(new.hsts_max_age.map(i64::from))
        .bind(balance_name(new.balance))
        .bind(i64::from(new.sticky))
        .bind(health_json(&new.health_check)?)
        .bind(limits_json(&new.limits)?)
        .bind(i64::from(new.proxy_protocol))
        .bind(access_json(&new.access)?)
        .bind(org.to_string())
        .bind(new.policy_id.map(|p| p.to_string()))
        .execute(&mut *tx)
        .await?;
        for t in &new.more_targets {
            Self::insert_target(&mut tx, id, org, t).await?;
        }
        self.commit_bumped(tx).await?;
        self.get_resource(id).await
    }

    async fn insert_target(
        tx: &mut Transaction<'static, Any>,
        resource: Uuid,
        org: Uuid,
        new: &NewTarget,
    ) -> Result<ResourceTarget> {
        let site = new.site_id;
        Self::site_exists(tx, site, Some(org)).await?;
        let count: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM resource_targets WHERE resource_id = $1")
                .bind(resource.to_string())
                .fetch_one(&mut **tx)
                .await?;
        if count + 1 >= i64::from(MAX_TARGETS) {
            return Err(StoreError::Invalid(format!(
                "a resource has at most {MAX_TARGETS} targets"
            )));
        }
        // Targets list oldest first: one created in the same millisecond as the resource's
        // newest still sorts after it.
        let newest: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(created_at) FROM resource_targets WHERE resource_id = $1",
        )
        .bind(resource.to_string())
        .fetch_one(&mut **tx)
        .await?;
        let created_at = newest.map_or(now_ms(), |n| now_ms().max(n.saturating_add(1)));
        let port = Self::free_port(tx, site).await?;
        let t = ResourceTarget {
            id: Uuid::new_v4(),
            site_id: site,
            target: new.target.clone(),
            overlay_port: port,
            created_at,
            proxy_protocol: new.proxy_protocol,
        };
        sqlx::query(
            "INSERT INTO resource_targets (id, resource_id, site_id, target, overlay_port, \
             created_at, proxy_protocol) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(t.id.to_string())
        .bind(resource.to_string())
        .bind(site.to_string())
        .bind(&t.target)
        .bind(i64::from(port))
        .bind(t.created_at)
        .bind(t.proxy_protocol.map(i64::from))
        .execute(&mut **tx)
        .await?;
        Ok(t)
    }

    /// Adds a target to a resource, with an overlay port on its site.
    pub async fn add_resource_target(
        &self,
        resource: Uuid,
        new: &NewTarget,
    ) -> Result<ResourceTarget> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let found: Option<String> =
            sqlx::query_scalar("SELECT org_id FROM resources WHERE id = $1")
                .bind(resource.to_string())
                .fetch_optional(&mut *tx)
                .await?;
        let Some(org) = found else {
            return Err(StoreError::NotFound("resource"));
        };
        let org = parse_uuid(&org)?;
        let protocol: Option<String> =
            sqlx::query_scalar("SELECT protocol FROM resources WHERE id = $1")
                .bind(resource.to_string())
                .fetch_optional(&mut *tx)
                .await?;
        if new.proxy_protocol.is_some() && protocol.as_deref() != Some("tcp") {
            return Err(StoreError::Invalid(
                "proxy_protocol is for the targets of TCP resources".into(),
            ));
        }
        let t = Self::insert_target(&mut tx, resource, org, new).await?;
        self.commit_bumped(tx).await?;
        Ok(t)
    }

    /// Removes one of a resource's further targets.
    pub async fn delete_resource_target(&self, resource: Uuid, target: Uuid) -> Result<()> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM resource_targets WHERE id = $1 AND resource_id = $2")
            .bind(target.to_string())
            .bind(resource.to_string())
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound("target"));
        }
        self.commit_bumped(tx).await?;
        Ok(())
    }

    /// One resource.
    pub async fn get_resource(&self, id: Uuid) -> Result<Resource> {
        let row = sqlx::query(&format!("{RESOURCE_SELECT} WHERE r.id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound("resource"))?;
        let mut r = [resource_from_row(&row)?];
        let rows = sqlx::query("SELECT * FROM resource_targets WHERE resource_id = $1")
            .bind(id.to_string())
            .fetch_all(&self.pool)
            .await?;
        attach_targets(&mut r, &rows)?;
        let [r] = r;
        Ok(r)
    }

    /// All resources, oldest first.
    pub async fn list_resources(&self) -> Result<Vec<Resource>> {
        let rows = sqlx::query(&format!("{RESOURCE_SELECT} ORDER BY r.created_at, r.id"))
            .fetch_all(&self.pool)
            .await?;
        let mut all = rows
            .iter()
            .map(resource_from_row)
            .collect::<Result<Vec<_>>>()?;
        let targets = sqlx::query("SELECT * FROM resource_targets")
            .fetch_all(&self.pool)
            .await?;
        attach_targets(&mut all, &targets)?;
        Ok(all)
    }

    /// Changes a resource. Moving it to another site gives it a new overlay port there.
    pub async fn update_resource(&self, id: Uuid, patch: &ResourcePatch) -> Result<Resource> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!("{RESOURCE_SELECT} WHERE r.id = $1"))
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::NotFound("resource"))?;
        let mut r = resource_from_row(&row)?;
        if let Some(h) = &patch.hostname {
            if r.protocol != RouteProtocol::Http {
                return Err(StoreError::Invalid(
                    "a TCP or UDP resource has no hostname; change its public_port".into(),
                ));
            }
            Self::check_hostname_free(&mut tx, h, Some(id)).await?;
            r.hostname = h.clone();
        }
        if patch.redirect_https.is_some() || patch.hsts_max_age.is_some() {
            if r.protocol != RouteProtocol::Http {
                return Err(StoreError::Invalid(
                    "redirect_https and hsts_max_age are for HTTP resources".into(),
                ));
            }
            if let Some(v) = patch.redirect_https {
                r.redirect_https = v;
            }
            if let Some(v) = patch.hsts_max_age {
                r.hsts_max_age = v;
            }
        }
        if let Some(p) = patch.public_port {
            if r.protocol == RouteProtocol::Http {
                return Err(StoreError::Invalid(
                    "an HTTP resource has no public_port; change its hostname".into(),
                ));
            }
            r.public_port = Some(Self::public_port(&mut tx, Some(p), Some(id)).await?);
        }
        if let Some(site) = patch.site_id {
            if site != r.site_id {
                Self::site_exists(&mut tx, site, Some(r.org_id)).await?;
                r.overlay_port = Self::free_port(&mut tx, site).await?;
                r.site_id = site;
            }
        }
        if let Some(n) = &patch.name {
            r.name = n.clone();
        }
        if let Some(t) = &patch.target {
            r.target = t.clone();
        }
        if let Some(b) = patch.balance {
            r.balance = b;
        }
        if let Some(s) = patch.sticky {
            if r.protocol != RouteProtocol::Http && s {
                return Err(StoreError::Invalid(
                    "sticky sessions are for HTTP resources".into(),
                ));
            }
            r.sticky = s;
        }
        if let Some(h) = &patch.health_check {
            r.health_check = h.clone();
        }
        if let Some(l) = patch.limits {
            r.limits = l;
        }
        if let Some(p) = patch.proxy_protocol {
            if r.protocol != RouteProtocol::Tcp && p {
                return Err(StoreError::Invalid(
                    "proxy_protocol is for TCP resources".into(),
                ));
            }
            r.proxy_protocol = p;
        }
        if let Some(a) = &patch.access {
            if r.protocol != RouteProtocol::Http && a.is_some() {
                return Err(StoreError::Invalid(
                    "sign-in (access) is for HTTP resources".into(),
                ));
            }
            r.own_access = a.clone();
        }
        if let Some(p) = patch.policy_id {
            if r.protocol != RouteProtocol::Http && p.is_some() {
                return Err(StoreError::Invalid(
                    "access policies are for HTTP resources".into(),
                ));
            }
            if let Some(p) = p {
                Self::policy_exists(&mut tx, r.org_id, p).await?;
            }
            r.policy_id = p;
        }
        sqlx::query(
            "UPDATE resources SET name = $1, hostname = $2, site_id = $3, target = $4, \
             overlay_port = $5, public_port = $6, redirect_https = $7, hsts_max_age = $8, \
             balance = $9, sticky = $10, health_check = $11, limits = $12, proxy_protocol = $13, \
             access = $14, policy_id = $15 WHERE id = $16",
        )
        .bind(&r.name)
        .bind((r.protocol == RouteProtocol::Http).then_some(r.hostname.as_str()))
        .bind(r.site_id.to_string())
        .bind(&r.target)
        .bind(i64::from(r.overlay_port))
        .bind(r.public_port.map(i64::from))
        .bind(i64::from(r.redirect_https))
        .bind(r.hsts_max_age.map(i64::from))
        .bind(balance_name(r.balance))
        .bind(i64::from(r.sticky))
        .bind(health_json(&r.health_check)?)
        .bind(limits_json(&r.limits)?)
        .bind(i64::from(r.proxy_protocol))
        .bind(access_json(&r.own_access)?)
        .bind(r.policy_id.map(|p| p.to_string()))
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        self.commit_bumped(tx).await?;
        // Read back: the access it now has depends on its policy's.
        self.get_resource(id).await
    }

    /// Deletes a resource.
    pub async fn delete_resource(&self, id: Uuid) -> Result<()> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM resource_targets WHERE resource_id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query("DELETE FROM resources WHERE id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound("resource"));
        }
        self.commit_bumped(tx).await?;
        Ok(())
    }

    // ---------------------------------------------------------------- snapshots

    fn world_node(kind: NodeKind, row: &AnyRow) -> Result<WorldNode> {
        let id: String = row.try_get("id")?;
        let addr: String = row.try_get("overlay_address")?;
        let public_key: Option<String> = row.try_get("public_key")?;
        let org: String = row.try_get("org_id")?;
        Ok(WorldNode {
            id: parse_uuid(&id)?,
            org_id: parse_uuid(&org)?,
            name: row.try_get("name")?,
            overlay_address: Ipv4Addr::from_str(&addr).map_err(corrupt)?,
            endpoint: match kind {
                NodeKind::Gateway => Some(row.try_get::<String, _>("endpoint")?),
                NodeKind::Agent => None,
            },
            public_key: public_key
                .map(|k| WgPublicKey::from_base64(&k).map_err(corrupt))
                .transpose()?,
            credential_hash: row.try_get("credential_hash")?,
        })
    }

    /// Everything snapshots are built from, read in one transaction.
    pub async fn load_world(&self) -> Result<World> {
        let mut tx = self.pool.begin().await?;
        // The version is read first: the rows read after it are at least as new.
        let version: i64 = sqlx::query_scalar("SELECT version FROM config_state WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
        let columns = "id, name, overlay_address, public_key, credential_hash, org_id";
        let sites = sqlx::query(&format!(
            "SELECT {columns} FROM sites ORDER BY created_at, id"
        ))
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| Self::world_node(NodeKind::Agent, r))
        .collect::<Result<Vec<_>>>()?;
        let gateways = sqlx::query(&format!(
            "SELECT {columns}, endpoint FROM gateways ORDER BY created_at, id"
        ))
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| Self::world_node(NodeKind::Gateway, r))
        .collect::<Result<Vec<_>>>()?;
        let mut resources = sqlx::query(RESOURCE_SELECT)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(resource_from_row)
            .collect::<Result<Vec<_>>>()?;
        let targets = sqlx::query("SELECT * FROM resource_targets")
            .fetch_all(&mut *tx)
            .await?;
        attach_targets(&mut resources, &targets)?;
        let (certificates, challenges) = self.load_tls(&mut tx).await?;
        let mut identity = self.gateway_identity(&mut tx, self.session_life_ms).await?;
        identity.issuer.clone_from(&self.public_url);
        identity.sign_in_url = format!("{}/auth/sign-in", self.public_url);
        identity.api_keys = self
            .edge_api_keys(
                &mut tx,
                &resources,
                self.sessions_host.as_deref(),
                &self.public_url,
                self.session_life_ms,
            )
            .await?;
        let sessions = match &self.sessions_host {
            Some(host) => Some(self.sessions_world(&mut tx, host).await?),
            None => None,
        };
        tx.commit().await?;
        Ok(World::new(
            version.max(0) as u64,
            self.overlay.prefix_len(),
            sites,
            gateways,
            resources,
        )
        .with_tls(certificates, challenges)
        .with_identity(identity)
        .with_sessions(sessions))
    }

    /// Bumps the config version (every node gets its snapshot again), so that what is minted at
    /// each world (gateways' API-key assertions) is fresh; `false` when there was nothing to
    /// refresh.
    pub async fn refresh_edge_credentials(&self) -> Result<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM resources WHERE access LIKE '%\"api_keys\":true%' \
             OR access LIKE '%\"service_keys\":[%') + (SELECT COUNT(*) FROM access_policies \
             WHERE access LIKE '%\"api_keys\":true%' OR access LIKE '%\"service_keys\":[%')",
        )
        .fetch_one(&self.pool)
        .await?;
        if n == 0 && self.sessions_host.is_none() {
            return Ok(false);
        }
        let _w = self.write.lock().await;
        let tx = self.pool.begin().await?;
        self.commit_bumped(tx).await?;
        Ok(true)
    }

    /// The config snapshot for a node, or `None` if the node no longer exists (loads a whole
    /// world: sessions share one through [`crate::AppState::world`] instead).
    pub async fn snapshot(&self, kind: NodeKind, id: Uuid) -> Result<Option<ConfigSnapshot>> {
        Ok(self.load_world().await?.snapshot(kind, id))
    }

    /// Overwrites a node's stored credential hash, as an earlier version may have stored it
    /// (tests of the upgrade path only).
    #[doc(hidden)]
    pub async fn set_credential_hash_for_test(&self, kind: NodeKind, id: Uuid, hash: &str) {
        let _ = sqlx::query(&format!(
            "UPDATE {} SET credential_hash = $1 WHERE id = $2",
            table(kind)
        ))
        .bind(hash)
        .bind(id.to_string())
        .execute(&self.pool)
        .await;
    }
}
