//! A fleet simulator: many simulated nodes in one process, each speaking the real control-channel
//! protocol to a real control, for measuring control at fleet scale (issue 6).
//!
//! A simulated node is one tokio task and one WebSocket with small buffers (a few KiB), so a
//! thousand of them cost this process some tens of MiB. Each mirrors the real node's channel
//! client (`node/src/channel.rs`, not linked: what is measured is control, and the simulator must
//! stay cheap): it sends a [`NodeMessage::Hello`], waits for [`ControlMessage::Welcome`], answers
//! every [`ControlMessage::Config`] with [`NodeMessage::Applied`] and every
//! [`ControlMessage::Ping`] with a [`NodeMessage::Pong`], sends an empty [`StatusReport`] every
//! 5 s and pings control every 15 s. A lost session is retried with the real node's backoff
//! (equal jitter, 100 ms doubling to 2 s, reset after a welcome); `busy` is retried after
//! `retry_after_ms` plus up to half again as long; other refusals after 30 s. Connecting and the
//! hello/welcome exchange each have the real node's 10 s timeout.
//!
//! What a test or the `kakuremichi-fleet` bench uses:
//! - [`FleetControl`]: a control process on a fixed port and data dir that can be SIGKILLed,
//!   SIGTERMed and started again; [`PgSchema`] for a fresh PostgreSQL schema.
//! - [`enroll_fleet`]: creates sites and gateways through the API and enrolls each with a random
//!   key, with bounded concurrency, timed.
//! - [`Fleet`]: starts one task per enrolled node and observes them: [`Fleet::wait_connected`],
//!   [`Fleet::wait_version`] (fan-out latencies of a change), [`Fleet::wait_reconnected`] (after a
//!   control restart), and [`Counters`] (handshake attempts, timeouts, refusals, busy answers).
//! - [`BadCrowd`]: a crowd of WebSockets sending hellos with wrong credentials at once.
//! - [`RssSampler`] and [`cpu_ticks`]: control's memory peak and CPU time.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::{SinkExt as _, StreamExt as _, TryStreamExt as _};
use kakuremichi_proto::{
    check_protocol_version, ControlMessage, EnrollRequest, EnrollResponse, NodeKind, NodeMessage,
    Secret, StatusReport, WgPublicKey, ENROLL_PATH, NODE_WS_PATH, PROTOCOL_VERSION,
};
use rand::Rng as _;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::{watch, Barrier};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

use crate::{bin, free_tcp_port, rss_kib, Api, Proc, TEST_ADMIN_KEY};

/// The software version simulated nodes announce.
pub const SIM_SOFTWARE_VERSION: &str = concat!("fleet-sim/", env!("CARGO_PKG_VERSION"));

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The node socket URL for a control base URL (`http://` → `ws://`, `https://` → `wss://`).
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

/// Small buffers: a simulated node reads small snapshots and writes small messages.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

async fn connect_ws(url: &str) -> Result<Ws, String> {
    tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true)
        .await
        .map(|(ws, _)| ws)
        .map_err(|e| e.to_string())
}

fn encode(msg: &NodeMessage) -> Message {
    // A NodeMessage always serializes (no maps with non-string keys, no failing impls).
    Message::Text(serde_json::to_string(msg).unwrap_or_default().into())
}

/// The wire name of a refusal reason (`bad_credential`, `busy`, ...).
fn reason_name<T: serde::Serialize>(reason: &T) -> String {
    serde_json::to_value(reason)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

// ------------------------------------------------------------------------------------------------
// Timing

/// The channel client's timing; [`Timing::default`] is the real node's.
#[derive(Debug, Clone)]
pub struct Timing {
    /// Timeout of connecting, and separately of the hello → welcome exchange (10 s).
    pub handshake_timeout: Duration,
    /// How often a status report is sent (5 s; the first right after the welcome).
    pub status_interval: Duration,
    /// How often control is pinged (15 s).
    pub ping_interval: Duration,
    /// Reconnect when control said nothing for this long (45 s).
    pub idle_timeout: Duration,
    /// First reconnect delay ceiling (100 ms).
    pub backoff_base: Duration,
    /// Longest reconnect delay (2 s).
    pub backoff_max: Duration,
    /// Delay before retrying after a refusal other than `busy` (30 s).
    pub refused_retry: Duration,
    /// `busy` without `retry_after_ms`: wait this long (1 s), plus jitter.
    pub busy_default: Duration,
    /// Before its first connect, each node waits a random delay up to this (0: all at once).
    pub start_spread: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            handshake_timeout: Duration::from_secs(10),
            status_interval: Duration::from_secs(5),
            ping_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            refused_retry: Duration::from_secs(30),
            busy_default: Duration::from_secs(1),
            start_spread: Duration::ZERO,
        }
    }
}

/// Equal-jitter exponential backoff, as the real node's: the n-th delay is uniform in
/// `[d/2, d]` with `d = min(max, base * 2^n)`.
#[derive(Debug, Clone)]
struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        let ceiling = self
            .base
            .saturating_mul(factor)
            .min(self.max.max(self.base));
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::thread_rng().gen_range(nanos / 2..=nanos))
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// `after` plus up to half again as long (the real node's answer to `busy`).
fn busy_delay(after: Duration) -> Duration {
    let ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
    after + Duration::from_millis(rand::thread_rng().gen_range(0..=ms / 2))
}

// ------------------------------------------------------------------------------------------------
// Control process

/// How to start a control for the fleet.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    /// Where control listens (kept across restarts).
    pub listen: SocketAddr,
    /// Its data dir (kept across restarts).
    pub data_dir: PathBuf,
    /// Its log file (appended to across restarts).
    pub log: PathBuf,
    /// `KAKUREMICHI_DATABASE_URL`; `None` is SQLite in the data dir.
    pub database_url: Option<String>,
    /// The admin key it is seeded with.
    pub admin_key: String,
    /// `KAKUREMICHI_SECRETS_KEY_FILE`: replicas on one database share it. `None`: in the data dir.
    pub secrets_key_file: Option<PathBuf>,
    /// Further flags.
    pub args: Vec<String>,
}

impl ControlOptions {
    /// A free loopback port, data dir `dir/control`, log `dir/control.log`, SQLite.
    pub fn in_dir(dir: &Path) -> ControlOptions {
        ControlOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], free_tcp_port())),
            data_dir: dir.join("control"),
            log: dir.join("control.log"),
            database_url: None,
            admin_key: TEST_ADMIN_KEY.to_string(),
            secrets_key_file: None,
            args: Vec::new(),
        }
    }
}

/// A control process for the fleet: killed when dropped, restartable on the same port and data.
#[derive(Debug)]
pub struct FleetControl {
    opts: ControlOptions,
    proc: Proc,
    /// The admin API client.
    pub api: Api,
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap_or_default()
}

fn spawn_control(opts: &ControlOptions) -> anyhow::Result<Proc> {
    std::fs::create_dir_all(&opts.data_dir)
        .with_context(|| format!("creating {}", opts.data_dir.display()))?;
    let mut envs = vec![("KAKUREMICHI_INITIAL_ADMIN_KEY", opts.admin_key.clone())];
    if let Some(url) = &opts.database_url {
        envs.push(("KAKUREMICHI_DATABASE_URL", url.clone()));
    }
    if let Some(file) = &opts.secrets_key_file {
        envs.push(("KAKUREMICHI_SECRETS_KEY_FILE", file.display().to_string()));
    }
    let mut args = vec![
        "--listen".into(),
        opts.listen.to_string(),
        "--data-dir".into(),
        opts.data_dir.display().to_string(),
    ];
    args.extend(opts.args.iter().cloned());
    Proc::spawn(
        "control",
        &bin("kakuremichi-control")?,
        &args,
        &envs,
        None,
        opts.log.clone(),
    )
}

impl FleetControl {
    /// Starts control and waits (up to 30 s) until `/healthz` answers.
    pub async fn start(opts: ControlOptions) -> anyhow::Result<FleetControl> {
        let proc = spawn_control(&opts)?;
        let api = Api::new(&format!("http://{}", opts.listen), &opts.admin_key);
        let control = FleetControl { opts, proc, api };
        control.wait_healthy(Duration::from_secs(30)).await?;
        Ok(control)
    }

    /// Control's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.opts.listen)
    }

    /// The options it runs with.
    pub fn options(&self) -> &ControlOptions {
        &self.opts
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// Resident memory in KiB, while it runs.
    pub fn rss_kib(&self) -> Option<u64> {
        self.proc.rss_kib()
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// SIGKILL, and waits for the process.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// SIGTERM (graceful shutdown); waits up to `timeout` for the exit, then SIGKILLs. Returns
    /// how long the shutdown took, or an error when it did not finish in time.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let Some(pid) = self.proc.pid() else {
            return Ok(Duration::ZERO);
        };
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .context("running kill -TERM")?;
        if !status.success() {
            bail!("kill -TERM {pid} failed: {status}");
        }
        while self.proc.is_running() {
            if started.elapsed() > timeout {
                self.proc.kill();
                bail!(
                    "control did not exit within {timeout:?} of SIGTERM; killed it\n{}",
                    self.proc.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let took = started.elapsed();
        self.proc.kill(); // reaps the handle
        Ok(took)
    }

    /// Starts control again with the same options, without waiting for it.
    pub fn spawn_again(&mut self) -> anyhow::Result<()> {
        self.proc.kill();
        self.proc = spawn_control(&self.opts)?;
        Ok(())
    }

    /// Waits until `/healthz` answers 200; returns how long that took.
    pub async fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let url = format!("{}/healthz", self.url());
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap_or_default();
        loop {
            if let Ok(r) = http.get(&url).send().await {
                if r.status() == 200 {
                    return Ok(started.elapsed());
                }
            }
            if started.elapsed() > timeout {
                bail!(
                    "control did not become healthy within {timeout:?}\n{}",
                    self.proc.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The last lines of control's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        self.proc.log_tail(lines)
    }
}

/// A fresh PostgreSQL schema, for control's `KAKUREMICHI_DATABASE_URL`. Drop it with
/// [`PgSchema::drop_schema`].
#[derive(Debug, Clone)]
pub struct PgSchema {
    base_url: String,
    /// The schema's name.
    pub schema: String,
}

impl PgSchema {
    /// Creates schema `fleet_<random>` in the database at `base_url`.
    pub async fn create(base_url: &str) -> anyhow::Result<PgSchema> {
        use sqlx::Connection as _;
        let schema = format!("fleet_{}", Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(base_url)
            .await
            .with_context(|| format!("PostgreSQL at {base_url} is unreachable"))?;
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&mut conn)
            .await
            .with_context(|| format!("creating schema {schema}"))?;
        conn.close().await.ok();
        Ok(PgSchema {
            base_url: base_url.to_string(),
            schema,
        })
    }

    /// The database URL with the schema as `search_path`.
    pub fn url(&self) -> String {
        let sep = if self.base_url.contains('?') {
            '&'
        } else {
            '?'
        };
        format!(
            "{}{sep}options=-c%20search_path%3D{}",
            self.base_url, self.schema
        )
    }

    /// Drops the schema and everything in it.
    pub async fn drop_schema(&self) -> anyhow::Result<()> {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(&self.base_url).await?;
        sqlx::query(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema))
            .execute(&mut conn)
            .await?;
        conn.close().await.ok();
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// Enrollment

/// What a simulated node needs to connect: what a real node keeps in its state file.
#[derive(Debug, Clone)]
pub struct SimIdentity {
    /// Display name in the API.
    pub name: String,
    /// Gateway or agent.
    pub kind: NodeKind,
    /// The node id (the site's or gateway's id in the API).
    pub node_id: Uuid,
    /// The credential from enrollment.
    pub credential: Secret,
    /// The (random) WireGuard public key it enrolled with.
    pub public_key: WgPublicKey,
}

/// Enrolled gateways and sites, and how long it took.
#[derive(Debug)]
pub struct Enrollment {
    /// The gateways, in creation order.
    pub gateways: Vec<SimIdentity>,
    /// The sites (agents), in creation order.
    pub sites: Vec<SimIdentity>,
    /// Wall time of the admin `POST /sites` and `POST /gateways` calls.
    pub create_time: Duration,
    /// Wall time of the nodes' `POST /enroll` calls.
    pub enroll_time: Duration,
}

impl Enrollment {
    /// Creation plus enrollment.
    pub fn elapsed(&self) -> Duration {
        self.create_time + self.enroll_time
    }

    /// Every identity: gateways first, then sites.
    pub fn all(&self) -> Vec<SimIdentity> {
        self.gateways
            .iter()
            .chain(self.sites.iter())
            .cloned()
            .collect()
    }
}

/// A random WireGuard public key (any 32 bytes will do: the simulator never speaks WireGuard).
pub fn random_public_key() -> WgPublicKey {
    WgPublicKey(rand::thread_rng().gen())
}

/// Enrolls one node with `token` and a random key.
pub async fn enroll_one(
    http: &reqwest::Client,
    control_url: &str,
    kind: NodeKind,
    token: &str,
) -> anyhow::Result<(EnrollResponse, WgPublicKey)> {
    let public_key = random_public_key();
    let req = EnrollRequest {
        protocol_version: PROTOCOL_VERSION,
        kind,
        token: Secret::new(token),
        public_key,
    };
    let url = format!("{}{ENROLL_PATH}", control_url.trim_end_matches('/'));
    let resp = http
        .post(&url)
        .json(&req)
        .send()
        .await
        .with_context(|| format!("POST {ENROLL_PATH}"))?;
    let status = resp.status();
    let text = resp.text().await?;
    if status != 200 {
        bail!("POST {ENROLL_PATH} ({kind}): {status}: {text}");
    }
    let answer: EnrollResponse = serde_json::from_str(&text)
        .with_context(|| format!("POST {ENROLL_PATH}: unreadable answer {text}"))?;
    Ok((answer, public_key))
}

/// Creates `gateways` gateways (endpoints `127.0.0.1:20000+i`, never dialled) and `sites`
/// sites through the admin API, then enrolls each, at most `concurrency` calls at a time.
pub async fn enroll_fleet(
    api: &Api,
    sites: usize,
    gateways: usize,
    concurrency: usize,
) -> anyhow::Result<Enrollment> {
    let concurrency = concurrency.max(1);
    let run = Uuid::new_v4().simple().to_string();
    let run = &run[..8];
    let started = Instant::now();
    let specs: Vec<(NodeKind, String)> = (0..gateways)
        .map(|i| (NodeKind::Gateway, format!("fleet-{run}-gw-{i}")))
        .chain((0..sites).map(|i| (NodeKind::Agent, format!("fleet-{run}-site-{i}"))))
        .collect();
    let created: Vec<(NodeKind, String, String)> =
        futures_util::stream::iter(specs.into_iter().enumerate())
            .map(|(i, (kind, name))| async move {
                let c = match kind {
                    NodeKind::Gateway => {
                        api.create_gateway(&name, &format!("127.0.0.1:{}", 20000 + i))
                            .await?
                    }
                    NodeKind::Agent => api.create_site(&name).await?,
                };
                anyhow::Ok((kind, name, c.token))
            })
            .buffered(concurrency)
            .try_collect()
            .await?;
    let create_time = started.elapsed();

    let started = Instant::now();
    let http = http_client();
    let base = api.base().to_string();
    let identities: Vec<SimIdentity> = futures_util::stream::iter(created)
        .map(|(kind, name, token)| {
            let http = &http;
            let base = &base;
            async move {
                let (answer, public_key) = enroll_one(http, base, kind, &token)
                    .await
                    .with_context(|| format!("enrolling {name}"))?;
                anyhow::Ok(SimIdentity {
                    name,
                    kind,
                    node_id: answer.node_id,
                    credential: answer.credential,
                    public_key,
                })
            }
        })
        .buffered(concurrency)
        .try_collect()
        .await?;
    let enroll_time = started.elapsed();
    let (gateways, sites) = identities
        .into_iter()
        .partition(|n| n.kind == NodeKind::Gateway);
    Ok(Enrollment {
        gateways,
        sites,
        create_time,
        enroll_time,
    })
}

// ------------------------------------------------------------------------------------------------
// Counters

/// What simulated nodes saw, for one node or summed over a fleet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Nodes connected (welcomed, session open) now.
    pub connected: u64,
    /// Handshakes started (connection attempts).
    pub attempts: u64,
    /// Welcomes received.
    pub welcomes: u64,
    /// Connects that did not finish within the handshake timeout, plus hellos without an answer
    /// within it ("no welcome within 10 s").
    pub handshake_timeouts: u64,
    /// Handshakes that failed otherwise: connection refused or reset, closed before the welcome,
    /// an unexpected first message.
    pub handshake_errors: u64,
    /// `busy` answers to a hello.
    pub busy: u64,
    /// Refusals other than `busy`, by reason (`bad_credential`, `replaced`, ...; also
    /// `incompatible_protocol_version` when control's welcome named a version this build does not
    /// speak).
    pub refusals: BTreeMap<String, u64>,
    /// Welcomed sessions that ended (control closed, reset or went silent).
    pub sessions_lost: u64,
    /// Config snapshots received.
    pub snapshots: u64,
    /// Messages that did not parse as this build's `ControlMessage` (read leniently instead).
    pub unreadable: u64,
}

impl Counters {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Counters) {
        self.connected += other.connected;
        self.attempts += other.attempts;
        self.welcomes += other.welcomes;
        self.handshake_timeouts += other.handshake_timeouts;
        self.handshake_errors += other.handshake_errors;
        self.busy += other.busy;
        for (k, v) in &other.refusals {
            *self.refusals.entry(k.clone()).or_default() += v;
        }
        self.sessions_lost += other.sessions_lost;
        self.snapshots += other.snapshots;
        self.unreadable += other.unreadable;
    }

    /// What happened since `earlier` (a snapshot of the same counters); `connected` is now's.
    pub fn since(&self, earlier: &Counters) -> Counters {
        let mut refusals = BTreeMap::new();
        for (k, v) in &self.refusals {
            let d = v.saturating_sub(earlier.refusals.get(k).copied().unwrap_or(0));
            if d > 0 {
                refusals.insert(k.clone(), d);
            }
        }
        Counters {
            connected: self.connected,
            attempts: self.attempts.saturating_sub(earlier.attempts),
            welcomes: self.welcomes.saturating_sub(earlier.welcomes),
            handshake_timeouts: self
                .handshake_timeouts
                .saturating_sub(earlier.handshake_timeouts),
            handshake_errors: self
                .handshake_errors
                .saturating_sub(earlier.handshake_errors),
            busy: self.busy.saturating_sub(earlier.busy),
            refusals,
            sessions_lost: self.sessions_lost.saturating_sub(earlier.sessions_lost),
            snapshots: self.snapshots.saturating_sub(earlier.snapshots),
            unreadable: self.unreadable.saturating_sub(earlier.unreadable),
        }
    }

    /// All refusals other than `busy`.
    pub fn refusals_total(&self) -> u64 {
        self.refusals.values().sum()
    }

    /// The refusals as `reason=n, ...` (`none` when there were none).
    pub fn refusals_text(&self) -> String {
        if self.refusals.is_empty() {
            return "none".into();
        }
        self.refusals
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "connected {}, handshake attempts {}, welcomes {}, handshake timeouts {}, handshake \
             errors {}, busy {}, refusals {}, sessions lost {}, snapshots {}, unreadable {}",
            self.connected,
            self.attempts,
            self.welcomes,
            self.handshake_timeouts,
            self.handshake_errors,
            self.busy,
            self.refusals_text(),
            self.sessions_lost,
            self.snapshots,
            self.unreadable
        )
    }
}

// ------------------------------------------------------------------------------------------------
// Simulated nodes

#[derive(Debug, Default)]
struct NodeLog {
    refusals: BTreeMap<String, u64>,
    last_welcome: Option<Instant>,
    /// Each config version received, with when it first arrived, in arrival order.
    versions: Vec<(u64, Instant)>,
    /// The last snapshot received (a reconnect brings the same version again).
    last_snapshot: Option<(u64, Instant)>,
    last_error: Option<String>,
}

/// One simulated node: its identity and what it observed.
#[derive(Debug)]
pub struct SimNode {
    /// Who it is.
    pub identity: SimIdentity,
    connected: AtomicBool,
    attempts: AtomicU64,
    welcomes: AtomicU64,
    handshake_timeouts: AtomicU64,
    handshake_errors: AtomicU64,
    busy: AtomicU64,
    sessions_lost: AtomicU64,
    snapshots: AtomicU64,
    unreadable: AtomicU64,
    /// Which of the fleet's control URLs it uses now (several: control replicas).
    control: std::sync::atomic::AtomicUsize,
    log: Mutex<NodeLog>,
}

/// At most this many versions are remembered per node (the oldest are dropped).
const MAX_VERSIONS: usize = 4096;

impl SimNode {
    fn new(identity: SimIdentity) -> SimNode {
        SimNode {
            identity,
            connected: AtomicBool::new(false),
            attempts: AtomicU64::new(0),
            welcomes: AtomicU64::new(0),
            handshake_timeouts: AtomicU64::new(0),
            handshake_errors: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            sessions_lost: AtomicU64::new(0),
            snapshots: AtomicU64::new(0),
            unreadable: AtomicU64::new(0),
            control: std::sync::atomic::AtomicUsize::new(0),
            log: Mutex::new(NodeLog::default()),
        }
    }

    fn log(&self) -> std::sync::MutexGuard<'_, NodeLog> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn note_error(&self, error: impl Into<String>) {
        self.log().last_error = Some(error.into());
    }

    fn note_refusal(&self, reason: String, message: &str) {
        let mut log = self.log();
        *log.refusals.entry(reason.clone()).or_default() += 1;
        log.last_error = Some(format!("refused ({reason}): {message}"));
    }

    fn note_welcome(&self) {
        self.welcomes.fetch_add(1, Ordering::Relaxed);
        self.log().last_welcome = Some(Instant::now());
        self.connected.store(true, Ordering::SeqCst);
    }

    fn note_version(&self, version: u64) {
        let now = Instant::now();
        self.snapshots.fetch_add(1, Ordering::Relaxed);
        let mut log = self.log();
        log.last_snapshot = Some((version, now));
        if log.versions.iter().rev().any(|(v, _)| *v == version) {
            return;
        }
        if log.versions.len() >= MAX_VERSIONS {
            log.versions.remove(0);
        }
        log.versions.push((version, now));
    }

    /// The index, among the fleet's control URLs, of the one it uses now.
    pub fn control_index(&self) -> usize {
        self.control.load(Ordering::SeqCst)
    }

    /// Whether it has a welcomed session now.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// When it was last welcomed.
    pub fn last_welcome(&self) -> Option<Instant> {
        self.log().last_welcome
    }

    /// Each config version received, with the Instant it first arrived, in arrival order.
    pub fn versions(&self) -> Vec<(u64, Instant)> {
        self.log().versions.clone()
    }

    /// The highest config version received.
    pub fn latest_version(&self) -> Option<u64> {
        self.log().versions.iter().map(|(v, _)| *v).max()
    }

    /// When it first received a snapshot with a version `>= version`.
    pub fn received_at_least(&self, version: u64) -> Option<Instant> {
        self.log()
            .versions
            .iter()
            .find(|(v, _)| *v >= version)
            .map(|(_, at)| *at)
    }

    /// The version and arrival of the last snapshot received.
    pub fn last_snapshot(&self) -> Option<(u64, Instant)> {
        self.log().last_snapshot
    }

    /// When it first received, at or after `since`, a snapshot with a version `>= version`.
    pub fn received_since(&self, version: u64, since: Instant) -> Option<Instant> {
        let log = self.log();
        log.versions
            .iter()
            .find(|(v, at)| *v >= version && *at >= since)
            .map(|(_, at)| *at)
            .or_else(|| {
                log.last_snapshot
                    .filter(|(v, at)| *v >= version && *at >= since)
                    .map(|(_, at)| at)
            })
    }

    /// The last handshake error or refusal, for failure messages.
    pub fn last_error(&self) -> Option<String> {
        self.log().last_error.clone()
    }

    /// Its counters.
    pub fn counters(&self) -> Counters {
        Counters {
            connected: u64::from(self.is_connected()),
            attempts: self.attempts.load(Ordering::Relaxed),
            welcomes: self.welcomes.load(Ordering::Relaxed),
            handshake_timeouts: self.handshake_timeouts.load(Ordering::Relaxed),
            handshake_errors: self.handshake_errors.load(Ordering::Relaxed),
            busy: self.busy.load(Ordering::Relaxed),
            refusals: self.log().refusals.clone(),
            sessions_lost: self.sessions_lost.load(Ordering::Relaxed),
            snapshots: self.snapshots.load(Ordering::Relaxed),
            unreadable: self.unreadable.load(Ordering::Relaxed),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} {} ({}): connected {}, latest version {:?}, last error {:?}",
            self.identity.kind,
            self.identity.name,
            self.identity.node_id,
            self.is_connected(),
            self.latest_version(),
            self.last_error()
        )
    }
}

/// A control message as the simulator needs it.
#[derive(Debug)]
enum Incoming {
    Welcome {
        protocol_version: u32,
    },
    Refused {
        reason: String,
        message: String,
        retry_after_ms: Option<u64>,
    },
    Config {
        version: u64,
    },
    Ping {
        nonce: u64,
    },
    Other(String),
}

impl Incoming {
    fn name(&self) -> &str {
        match self {
            Incoming::Welcome { .. } => "welcome",
            Incoming::Refused { .. } => "refused",
            Incoming::Config { .. } => "config",
            Incoming::Ping { .. } => "ping",
            Incoming::Other(name) => name,
        }
    }
}

/// Any control message, read leniently (unknown fields and types allowed).
#[derive(Debug, Deserialize)]
struct LenientMessage {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    protocol_version: Option<u32>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    retry_after_ms: Option<u64>,
    #[serde(default)]
    version: Option<u64>,
    #[serde(default)]
    nonce: Option<u64>,
}

/// Reads a control message with this build's types; falls back to a lenient reading (and says
/// so with `false`) when control sends something they refuse.
fn decode(text: &str) -> Result<(Incoming, bool), String> {
    match serde_json::from_str::<ControlMessage>(text) {
        Ok(msg) => Ok((
            match msg {
                ControlMessage::Welcome {
                    protocol_version, ..
                } => Incoming::Welcome { protocol_version },
                ControlMessage::Refused {
                    reason,
                    message,
                    retry_after_ms,
                } => Incoming::Refused {
                    reason: reason_name(&reason),
                    message,
                    retry_after_ms,
                },
                ControlMessage::Config(snapshot) => Incoming::Config {
                    version: snapshot.version,
                },
                ControlMessage::Ping { nonce } => Incoming::Ping { nonce },
                ControlMessage::Pong { .. } => Incoming::Other("pong".into()),
            },
            true,
        )),
        Err(strict) => {
            let m: LenientMessage = serde_json::from_str(text)
                .map_err(|_| format!("control sent an unreadable message: {strict}"))?;
            let msg = match (m.kind.as_str(), m.version, m.nonce) {
                ("welcome", _, _) => Incoming::Welcome {
                    protocol_version: m.protocol_version.unwrap_or(0),
                },
                ("refused", _, _) => Incoming::Refused {
                    reason: m.reason.unwrap_or_else(|| "unknown".into()),
                    message: m.message.unwrap_or_default(),
                    retry_after_ms: m.retry_after_ms,
                },
                ("config", Some(version), _) => Incoming::Config { version },
                ("ping", _, Some(nonce)) => Incoming::Ping { nonce },
                (other, _, _) => Incoming::Other(other.to_owned()),
            };
            Ok((msg, false))
        }
    }
}

enum SessionEnd {
    /// Could not connect or the hello failed.
    Failed,
    /// A welcomed session ended.
    Lost,
    /// Control refused the node (not `busy`).
    Refused,
    /// Control is busy; retry after about this long.
    Busy(Duration),
}

/// The first text message, or why there was none.
async fn first_text(ws: &mut Ws) -> Result<String, String> {
    loop {
        match ws.next().await {
            None => return Err("control closed the socket before welcome".into()),
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(Message::Text(text))) => return Ok(text.as_str().to_owned()),
            Some(Ok(Message::Close(frame))) => {
                return Err(format!(
                    "control closed the socket before welcome{}",
                    frame.map(|f| format!(": {}", f.reason)).unwrap_or_default()
                ))
            }
            Some(Ok(_)) => continue,
        }
    }
}

async fn handshake(
    node: &SimNode,
    url: &str,
    t: &Timing,
    applied: Option<u64>,
) -> Result<Ws, SessionEnd> {
    node.attempts.fetch_add(1, Ordering::Relaxed);
    let mut ws = match tokio::time::timeout(t.handshake_timeout, connect_ws(url)).await {
        Err(_) => {
            node.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
            node.note_error("connect timed out");
            return Err(SessionEnd::Failed);
        }
        Ok(Err(e)) => {
            node.handshake_errors.fetch_add(1, Ordering::Relaxed);
            node.note_error(format!("connect: {e}"));
            return Err(SessionEnd::Failed);
        }
        Ok(Ok(ws)) => ws,
    };
    let id = &node.identity;
    let hello = NodeMessage::Hello {
        protocol_version: PROTOCOL_VERSION,
        kind: id.kind,
        node_id: id.node_id,
        credential: id.credential.clone(),
        public_key: id.public_key,
        software_version: SIM_SOFTWARE_VERSION.into(),
        applied_version: applied,
    };
    if let Err(e) = ws.send(encode(&hello)).await {
        node.handshake_errors.fetch_add(1, Ordering::Relaxed);
        node.note_error(format!("sending hello: {e}"));
        return Err(SessionEnd::Failed);
    }
    let text = match tokio::time::timeout(t.handshake_timeout, first_text(&mut ws)).await {
        Err(_) => {
            node.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
            node.note_error(format!("no welcome within {:?}", t.handshake_timeout));
            return Err(SessionEnd::Failed);
        }
        Ok(Err(e)) => {
            node.handshake_errors.fetch_add(1, Ordering::Relaxed);
            node.note_error(e);
            return Err(SessionEnd::Failed);
        }
        Ok(Ok(text)) => text,
    };
    let msg = match decode(&text) {
        Ok((msg, strict)) => {
            if !strict {
                node.unreadable.fetch_add(1, Ordering::Relaxed);
            }
            msg
        }
        Err(e) => {
            node.handshake_errors.fetch_add(1, Ordering::Relaxed);
            node.note_error(e);
            return Err(SessionEnd::Failed);
        }
    };
    match msg {
        Incoming::Welcome { protocol_version } => {
            if let Err(e) = check_protocol_version(protocol_version) {
                node.note_refusal("incompatible_protocol_version".into(), &e.to_string());
                let _ = ws.close(None).await;
                return Err(SessionEnd::Refused);
            }
            Ok(ws)
        }
        Incoming::Refused {
            reason,
            retry_after_ms,
            ..
        } if reason == "busy" => {
            node.busy.fetch_add(1, Ordering::Relaxed);
            let after = retry_after_ms
                .map(Duration::from_millis)
                .unwrap_or(t.busy_default)
                .min(Duration::from_secs(60));
            Err(SessionEnd::Busy(after))
        }
        Incoming::Refused {
            reason, message, ..
        } => {
            node.note_refusal(reason, &message);
            Err(SessionEnd::Refused)
        }
        other => {
            node.handshake_errors.fetch_add(1, Ordering::Relaxed);
            node.note_error(format!("expected welcome, got {}", other.name()));
            Err(SessionEnd::Failed)
        }
    }
}

/// One session: handshake, then serve until it ends. Sets `welcomed` once welcomed.
async fn session(
    node: &SimNode,
    url: &str,
    t: &Timing,
    applied: &mut Option<u64>,
    welcomed: &mut bool,
) -> SessionEnd {
    let mut ws = match handshake(node, url, t, *applied).await {
        Ok(ws) => ws,
        Err(end) => return end,
    };
    *welcomed = true;
    node.note_welcome();

    let mut last_rx = tokio::time::Instant::now();
    let mut status_tick = tokio::time::interval(t.status_interval);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ping_tick = tokio::time::interval_at(
        tokio::time::Instant::now() + t.ping_interval,
        t.ping_interval,
    );
    ping_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let idle_check = t
        .idle_timeout
        .min(t.status_interval)
        .max(Duration::from_millis(10));
    let mut idle_tick = tokio::time::interval(idle_check);
    let mut nonce: u64 = rand::random();

    loop {
        let outgoing: Option<NodeMessage> = tokio::select! {
            frame = ws.next() => {
                last_rx = tokio::time::Instant::now();
                match frame {
                    None => {
                        node.note_error("control closed the socket");
                        return SessionEnd::Lost;
                    }
                    Some(Err(e)) => {
                        node.note_error(format!("session: {e}"));
                        return SessionEnd::Lost;
                    }
                    Some(Ok(Message::Close(frame))) => {
                        node.note_error(format!(
                            "control closed the socket{}",
                            frame.map(|f| format!(": {}", f.reason)).unwrap_or_default()
                        ));
                        return SessionEnd::Lost;
                    }
                    Some(Ok(Message::Text(text))) => match decode(text.as_str()) {
                        Err(e) => {
                            node.unreadable.fetch_add(1, Ordering::Relaxed);
                            node.note_error(e);
                            None
                        }
                        Ok((msg, strict)) => {
                            if !strict {
                                node.unreadable.fetch_add(1, Ordering::Relaxed);
                            }
                            match msg {
                                Incoming::Config { version } => {
                                    node.note_version(version);
                                    *applied = Some(version);
                                    Some(NodeMessage::Applied { version })
                                }
                                Incoming::Ping { nonce } => Some(NodeMessage::Pong { nonce }),
                                Incoming::Refused { reason, message, .. } => {
                                    node.note_refusal(reason, &message);
                                    return SessionEnd::Refused;
                                }
                                Incoming::Welcome { .. } | Incoming::Other(_) => None,
                            }
                        }
                    },
                    Some(Ok(_)) => None,
                }
            }
            _ = status_tick.tick() => Some(NodeMessage::Status(StatusReport {
                session_accesses: Vec::new(),
                session_labels: Default::default(),
                traffic: Vec::new(),
                sessions: Vec::new(),
                applied_version: applied.unwrap_or(0),
                peers: Vec::new(),
                targets: Vec::new(),
                refusals: Vec::new(),
            })),
            _ = ping_tick.tick() => {
                nonce = nonce.wrapping_add(1);
                Some(NodeMessage::Ping { nonce })
            }
            _ = idle_tick.tick() => {
                if last_rx.elapsed() > t.idle_timeout {
                    node.note_error(format!("control silent for {:?}", t.idle_timeout));
                    return SessionEnd::Lost;
                }
                None
            }
        };
        if let Some(msg) = outgoing {
            if let Err(e) = ws.send(encode(&msg)).await {
                node.note_error(format!("sending to control: {e}"));
                return SessionEnd::Lost;
            }
        }
    }
}

/// A simulated node's life: sessions forever, with the real node's delays between them.
async fn run_node(node: Arc<SimNode>, urls: Arc<[Arc<str>]>, t: Arc<Timing>) {
    if !t.start_spread.is_zero() {
        let spread = u64::try_from(t.start_spread.as_millis()).unwrap_or(u64::MAX);
        let wait = rand::thread_rng().gen_range(0..=spread);
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
    let mut backoff = Backoff {
        base: t.backoff_base,
        max: t.backoff_max,
        attempt: 0,
    };
    let mut applied: Option<u64> = None;
    // URLs failed in a row in this outage.
    let mut failed_in_a_row = 0usize;
    loop {
        let mut welcomed = false;
        let index = node.control.load(Ordering::SeqCst) % urls.len().max(1);
        let end = session(&node, &urls[index], &t, &mut applied, &mut welcomed).await;
        if node.connected.swap(false, Ordering::SeqCst) {
            node.sessions_lost.fetch_add(1, Ordering::Relaxed);
        }
        if welcomed {
            backoff.reset();
            failed_in_a_row = 0;
        }
        let delay = match end {
            SessionEnd::Failed | SessionEnd::Lost if urls.len() > 1 => {
                node.control
                    .store((index + 1) % urls.len(), Ordering::SeqCst);
                failed_in_a_row += 1;
                if failed_in_a_row < urls.len() {
                    let base = u64::try_from(t.backoff_base.as_millis()).unwrap_or(100);
                    Duration::from_millis(rand::thread_rng().gen_range(0..=base))
                } else {
                    backoff.next_delay()
                }
            }
            SessionEnd::Failed | SessionEnd::Lost => backoff.next_delay(),
            SessionEnd::Busy(after) => busy_delay(after),
            SessionEnd::Refused => t.refused_retry,
        };
        tokio::time::sleep(delay).await;
    }
}

/// Which nodes a wait is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Select {
    /// Every node.
    All,
    /// Agents (sites) only: e.g. a gateway's endpoint changed, which touches every agent's
    /// snapshot and no gateway's.
    Agents,
    /// Gateways only.
    Gateways,
}

impl Select {
    fn matches(self, kind: NodeKind) -> bool {
        match self {
            Select::All => true,
            Select::Agents => kind == NodeKind::Agent,
            Select::Gateways => kind == NodeKind::Gateway,
        }
    }
}

/// p50, p99 and max of some durations (nearest rank).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// How many.
    pub count: usize,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest.
    pub max: Duration,
}

impl Summary {
    /// The summary of `durations` (all zero when empty).
    pub fn of(durations: &[Duration]) -> Summary {
        let mut sorted = durations.to_vec();
        sorted.sort();
        let rank = |q: f64| -> Duration {
            if sorted.is_empty() {
                return Duration::ZERO;
            }
            let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
            sorted[i]
        };
        Summary {
            count: sorted.len(),
            p50: rank(0.50),
            p99: rank(0.99),
            max: sorted.last().copied().unwrap_or_default(),
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50 {} / p99 {} / max {} (n={})",
            ms(self.p50),
            ms(self.p99),
            ms(self.max),
            self.count
        )
    }
}

/// A duration as milliseconds with one decimal (`12.3 ms`).
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Per-node latencies of one change, in the order of the selected nodes.
#[derive(Debug, Clone)]
pub struct Latencies {
    /// The version waited for.
    pub version: u64,
    /// For each selected node: its id and how long after `since` it received the version.
    pub per_node: Vec<(Uuid, Duration)>,
}

impl Latencies {
    /// p50, p99 and max.
    pub fn summary(&self) -> Summary {
        Summary::of(&self.durations())
    }

    /// The latencies alone.
    pub fn durations(&self) -> Vec<Duration> {
        self.per_node.iter().map(|(_, d)| *d).collect()
    }
}

/// Simulated nodes, one tokio task each, connected to one control. Dropping it stops them.
#[derive(Debug)]
pub struct Fleet {
    nodes: Vec<Arc<SimNode>>,
    tasks: Vec<JoinHandle<()>>,
    started: Instant,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// How often waits look at the nodes (the latencies come from the nodes' own receipt times).
const POLL: Duration = Duration::from_millis(20);

impl Fleet {
    /// Starts one task per identity against control at `control_url` (`http://host:port`).
    /// Must be called within a tokio runtime.
    pub fn start(control_url: &str, identities: Vec<SimIdentity>, timing: Timing) -> Fleet {
        Self::start_over(&[control_url.to_owned()], identities, timing)
    }

    /// Starts one task per identity against several control replicas: node `i` starts with
    /// `control_urls[i % n]` and, as the real node does, moves to the next URL when its session
    /// fails or is lost (after a short jitter while some URL is untried in the outage, with the
    /// backoff once all failed).
    pub fn start_over(
        control_urls: &[String],
        identities: Vec<SimIdentity>,
        timing: Timing,
    ) -> Fleet {
        let urls: Arc<[Arc<str>]> = control_urls
            .iter()
            .map(|u| Arc::<str>::from(ws_url(u)))
            .collect();
        let timing = Arc::new(timing);
        let started = Instant::now();
        let nodes: Vec<Arc<SimNode>> = identities
            .into_iter()
            .map(|id| Arc::new(SimNode::new(id)))
            .collect();
        let tasks = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                n.control.store(i % urls.len().max(1), Ordering::SeqCst);
                tokio::spawn(run_node(n.clone(), urls.clone(), timing.clone()))
            })
            .collect();
        Fleet {
            nodes,
            tasks,
            started,
        }
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The nodes.
    pub fn nodes(&self) -> &[Arc<SimNode>] {
        &self.nodes
    }

    /// How many are connected now.
    pub fn connected_count(&self) -> usize {
        self.nodes.iter().filter(|n| n.is_connected()).count()
    }

    /// The counters summed over every node.
    pub fn counters(&self) -> Counters {
        let mut c = Counters::default();
        for n in &self.nodes {
            c.add(&n.counters());
        }
        c
    }

    fn examples(&self, bad: impl Fn(&SimNode) -> bool) -> String {
        let bad: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| bad(n))
            .take(3)
            .map(|n| format!("\n  {}", n.describe()))
            .collect();
        bad.concat()
    }

    /// Waits until every node has been welcomed since the fleet started and is connected; returns
    /// the time from the start to the last welcome.
    pub async fn wait_connected(&self, timeout: Duration) -> anyhow::Result<Duration> {
        self.wait_reconnected(self.started, timeout).await
    }

    /// Waits until every node is connected in a session welcomed at or after `since` (e.g. the
    /// Instant control was restarted); returns the time from `since` to the last such welcome.
    pub async fn wait_reconnected(
        &self,
        since: Instant,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + timeout;
        let back = |n: &SimNode| n.is_connected() && n.last_welcome().is_some_and(|w| w >= since);
        loop {
            if self.nodes.iter().all(|n| back(n)) {
                let last = self
                    .nodes
                    .iter()
                    .filter_map(|n| n.last_welcome())
                    .max()
                    .unwrap_or(since);
                return Ok(last.saturating_duration_since(since));
            }
            if Instant::now() >= deadline {
                let n_back = self.nodes.iter().filter(|n| back(n)).count();
                bail!(
                    "after {timeout:?}, only {n_back} of {} simulated nodes were connected in a \
                     session welcomed since {:?} ago (fleet: {}); for example:{}",
                    self.nodes.len(),
                    since.elapsed(),
                    self.counters(),
                    self.examples(|n| !back(n))
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until every selected node is connected and has received, at or after `since`, a
    /// snapshot with a version `>= version`; returns each one's latency from `since`. For a
    /// change, `since` is the Instant it was made; after a restart, the restart's (a reconnected
    /// node gets its current snapshot again).
    pub async fn wait_version(
        &self,
        select: Select,
        version: u64,
        since: Instant,
        timeout: Duration,
    ) -> anyhow::Result<Latencies> {
        let deadline = Instant::now() + timeout;
        let chosen: Vec<&Arc<SimNode>> = self
            .nodes
            .iter()
            .filter(|n| select.matches(n.identity.kind))
            .collect();
        loop {
            let got: Vec<Option<Instant>> = chosen
                .iter()
                .map(|n| {
                    if n.is_connected() {
                        n.received_since(version, since)
                    } else {
                        None
                    }
                })
                .collect();
            if got.iter().all(Option::is_some) {
                let per_node = chosen
                    .iter()
                    .zip(got)
                    .map(|(n, at)| {
                        (
                            n.identity.node_id,
                            at.unwrap_or(since).saturating_duration_since(since),
                        )
                    })
                    .collect();
                return Ok(Latencies { version, per_node });
            }
            if Instant::now() >= deadline {
                let missing = got.iter().filter(|g| g.is_none()).count();
                let lacking = |n: &SimNode| {
                    select.matches(n.identity.kind)
                        && !(n.is_connected() && n.received_since(version, since).is_some())
                };
                bail!(
                    "after {timeout:?}, {missing} of {} simulated {} had not received config \
                     version {version} or later since {:?} ago (or were not connected) (fleet: \
                     {}); for example:{}",
                    chosen.len(),
                    match select {
                        Select::All => "nodes",
                        Select::Agents => "agents",
                        Select::Gateways => "gateways",
                    },
                    since.elapsed(),
                    self.counters(),
                    self.examples(lacking)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The bad crowd

/// What a crowd of wrong hellos got back.
#[derive(Debug, Clone, Default)]
pub struct BadCrowdReport {
    /// Sockets tried.
    pub count: usize,
    /// Sockets that could not be opened (error or no upgrade within the timeout).
    pub connect_failed: usize,
    /// Hellos sent.
    pub sent: usize,
    /// Answers by kind: the refusal reason (`bad_credential`, `busy`, ...), `welcome` (which
    /// would be a bug) or `other:<type>`.
    pub answers: BTreeMap<String, usize>,
    /// Sockets control closed (or reset) without answering.
    pub closed_without_answer: usize,
    /// Hellos with no answer within the timeout.
    pub no_answer: usize,
    /// Time from hello to answer, over the answered ones.
    pub answer_latency: Summary,
    /// Time from opening the first socket to the last answer or timeout.
    pub elapsed: Duration,
}

impl BadCrowdReport {
    /// How many hellos were answered.
    pub fn answered(&self) -> usize {
        self.answers.values().sum()
    }

    /// How many were answered with `reason`.
    pub fn answered_with(&self, reason: &str) -> usize {
        self.answers.get(reason).copied().unwrap_or(0)
    }

    /// The answers as `reason=n, ...`.
    pub fn answers_text(&self) -> String {
        if self.answers.is_empty() {
            return "none".into();
        }
        self.answers
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for BadCrowdReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} sockets: {} failed to open, {} hellos sent; answers {}; closed without answer {}; \
             no answer within the timeout {}; answer latency {}; took {}",
            self.count,
            self.connect_failed,
            self.sent,
            self.answers_text(),
            self.closed_without_answer,
            self.no_answer,
            self.answer_latency,
            ms(self.elapsed)
        )
    }
}

enum CrowdOutcome {
    ConnectFailed,
    Answer(String, Duration),
    Closed,
    NoAnswer,
}

/// A crowd of WebSockets sending hellos with wrong credentials (random node ids, random
/// `kmc_` credentials) at once, running in the background.
#[derive(Debug)]
pub struct BadCrowd {
    sent: watch::Receiver<bool>,
    handle: JoinHandle<BadCrowdReport>,
}

impl BadCrowd {
    /// Opens `count` sockets to control at `control_url` at once; when all are open (or failed),
    /// each sends its hello and waits up to `timeout` for an answer. Connecting has its own
    /// `timeout` too.
    pub fn launch(control_url: &str, count: usize, timeout: Duration) -> BadCrowd {
        let url: Arc<str> = ws_url(control_url).into();
        let (tx, rx) = watch::channel(false);
        let sent = Arc::new(tx);
        if count == 0 {
            sent.send_replace(true);
        }
        let handle = tokio::spawn(async move {
            let started = Instant::now();
            let barrier = Arc::new(Barrier::new(count.max(1)));
            let tasks: Vec<JoinHandle<CrowdOutcome>> = (0..count)
                .map(|_| {
                    let (url, barrier, sent) = (url.clone(), barrier.clone(), sent.clone());
                    tokio::spawn(wrong_hello(url, barrier, sent, timeout))
                })
                .collect();
            let mut report = BadCrowdReport {
                count,
                ..BadCrowdReport::default()
            };
            let mut latencies = Vec::with_capacity(count);
            for t in tasks {
                match t.await.unwrap_or(CrowdOutcome::NoAnswer) {
                    CrowdOutcome::ConnectFailed => report.connect_failed += 1,
                    CrowdOutcome::Answer(kind, latency) => {
                        report.sent += 1;
                        *report.answers.entry(kind).or_default() += 1;
                        latencies.push(latency);
                    }
                    CrowdOutcome::Closed => {
                        report.sent += 1;
                        report.closed_without_answer += 1;
                    }
                    CrowdOutcome::NoAnswer => {
                        report.sent += 1;
                        report.no_answer += 1;
                    }
                }
            }
            report.answer_latency = Summary::of(&latencies);
            report.elapsed = started.elapsed();
            report
        });
        BadCrowd { sent: rx, handle }
    }

    /// Waits until the hellos have been sent (all sockets open or failed).
    pub async fn hellos_sent(&mut self) {
        let _ = self.sent.wait_for(|s| *s).await;
    }

    /// Whether every socket is done.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Waits for every answer or timeout.
    pub async fn finish(self) -> BadCrowdReport {
        self.handle.await.unwrap_or_default()
    }
}

/// Runs a crowd of `count` wrong hellos to completion (see [`BadCrowd::launch`]).
pub async fn bad_crowd(control_url: &str, count: usize, timeout: Duration) -> BadCrowdReport {
    BadCrowd::launch(control_url, count, timeout).finish().await
}

fn random_credential() -> Secret {
    let s: String = rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(40)
        .map(char::from)
        .collect();
    Secret::new(format!("kmc_{s}"))
}

async fn wrong_hello(
    url: Arc<str>,
    barrier: Arc<Barrier>,
    sent: Arc<watch::Sender<bool>>,
    timeout: Duration,
) -> CrowdOutcome {
    let ws = tokio::time::timeout(timeout, connect_ws(&url)).await;
    // Every socket is open (or failed) before any hello goes out.
    if barrier.wait().await.is_leader() {
        sent.send_replace(true);
    }
    let Ok(Ok(mut ws)) = ws else {
        return CrowdOutcome::ConnectFailed;
    };
    let hello = NodeMessage::Hello {
        protocol_version: PROTOCOL_VERSION,
        kind: NodeKind::Agent,
        node_id: Uuid::new_v4(),
        credential: random_credential(),
        public_key: random_public_key(),
        software_version: SIM_SOFTWARE_VERSION.into(),
        applied_version: None,
    };
    let sent = Instant::now();
    if ws.send(encode(&hello)).await.is_err() {
        return CrowdOutcome::Closed;
    }
    match tokio::time::timeout(timeout, first_text(&mut ws)).await {
        Err(_) => CrowdOutcome::NoAnswer,
        Ok(Err(_)) => CrowdOutcome::Closed,
        Ok(Ok(text)) => {
            let kind = match decode(&text) {
                Ok((Incoming::Refused { reason, .. }, _)) => reason,
                Ok((Incoming::Welcome { .. }, _)) => "welcome".into(),
                Ok((other, _)) => format!("other:{}", other.name()),
                Err(_) => "other:unreadable".into(),
            };
            CrowdOutcome::Answer(kind, sent.elapsed())
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Process measurements

/// Samples a process's VmRSS every `every` in the background, keeping the peak.
#[derive(Debug)]
pub struct RssSampler {
    peak: Arc<AtomicU64>,
    samples: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

/// What an [`RssSampler`] saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RssSamples {
    /// The highest VmRSS sampled, in KiB.
    pub peak_kib: u64,
    /// How many samples were taken.
    pub samples: u64,
}

impl RssSampler {
    /// Starts sampling process `pid` every `every` (samples are skipped while it does not run).
    pub fn start(pid: u32, every: Duration) -> RssSampler {
        let peak = Arc::new(AtomicU64::new(0));
        let samples = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (peak, samples, stop) = (peak.clone(), samples.clone(), stop.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    if let Some(kib) = rss_kib(pid) {
                        peak.fetch_max(kib, Ordering::Relaxed);
                        samples.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        RssSampler {
            peak,
            samples,
            stop,
            handle,
        }
    }

    /// The peak so far, in KiB.
    pub fn peak_kib(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Stops sampling; returns the peak and the number of samples.
    pub async fn stop(self) -> RssSamples {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.await;
        RssSamples {
            peak_kib: self.peak.load(Ordering::Relaxed),
            samples: self.samples.load(Ordering::Relaxed),
        }
    }
}

/// CPU time of process `pid` so far (utime + stime from `/proc/PID/stat`), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces; the first
    // field after it is the 3rd (state); utime and stime are the 14th and 15th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second of `/proc/PID/stat` times (`getconf CLK_TCK`, else 100).
pub fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// Process `pid`'s CPU use over `window`, in percent of one core.
pub async fn cpu_percent(pid: u32, window: Duration) -> Option<f64> {
    let hz = clock_ticks_per_second() as f64;
    let before = cpu_ticks(pid)?;
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let after = cpu_ticks(pid)?;
    let wall = started.elapsed().as_secs_f64();
    Some((after.saturating_sub(before)) as f64 / hz / wall * 100.0)
}

/// Changes a gateway's endpoint (which touches every agent's snapshot); returns the Instant the
/// call was made and the config version after it.
pub async fn touch_every_agent(
    api: &Api,
    gateway_id: Uuid,
    endpoint: &str,
) -> anyhow::Result<(Instant, u64)> {
    let since = Instant::now();
    api.patch(
        &format!("/api/v1/gateways/{gateway_id}"),
        json!({ "endpoint": endpoint }),
    )
    .await?;
    let version = api.config_version().await?;
    Ok((since, version))
}

// ------------------------------------------------------------------------------------------------
// A PostgreSQL of the test's own

/// A PostgreSQL server of one test's own (initdb in a temporary folder, on a free loopback port,
/// run as user `postgres`), which the test may stop and start again: the machine's shared
/// PostgreSQL serves every other test at the same time and is never restarted. Stopped when
/// dropped.
#[derive(Debug)]
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl PrivatePostgres {
    /// Makes a new cluster (trust auth, user `postgres`, no fsync) and starts it.
    pub fn start_new() -> anyhow::Result<PrivatePostgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL's server is needed (package postgresql; scripts/setup)")?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("pg_ctl").exists())
            .max()
            .context("no /usr/lib/postgresql/*/bin/pg_ctl")?;
        let dir = tempfile::Builder::new()
            .prefix("kakuremichi-pg")
            .tempdir()?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let pg = PrivatePostgres {
            dir,
            bin,
            port: free_tcp_port(),
        };
        let status = std::process::Command::new("chown")
            .args(["postgres:", &pg.dir.path().display().to_string()])
            .status()
            .context("chown")?;
        if !status.success() {
            bail!("cannot give {} to user postgres", pg.dir.path().display());
        }
        pg.as_postgres(&[
            &pg.bin.join("initdb").display().to_string(),
            "-D",
            &pg.data().display().to_string(),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ])?;
        pg.start()?;
        Ok(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn as_postgres(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .context("runuser (package util-linux)")?;
        if !out.status.success() {
            bail!(
                "{args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        self.as_postgres(&[
            &self.bin.join("pg_ctl").display().to_string(),
            "-D",
            &self.data().display().to_string(),
            "-o",
            &options,
            "-l",
            &self.dir.path().join("server.log").display().to_string(),
            "-w",
            "start",
        ])
    }

    /// Stops the server at once, as a crash would (`pg_ctl stop -m immediate`): open connections
    /// break, and it recovers from its log at the next start.
    pub fn stop_immediate(&self) -> anyhow::Result<()> {
        self.as_postgres(&[
            &self.bin.join("pg_ctl").display().to_string(),
            "-D",
            &self.data().display().to_string(),
            "-m",
            "immediate",
            "-w",
            "stop",
        ])
    }

    /// Its URL (database `postgres`).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.stop_immediate();
    }
}
