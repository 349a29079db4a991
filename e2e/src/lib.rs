//! The one harness for kakuremichi's end-to-end tests, quickstart and benchmarks.
//!
//! It starts the real binaries (`kakuremichi-control`, `-gateway`, `-agent` and the demo app) as
//! child processes, each with its own data folder and log file, optionally inside a network
//! namespace, and talks to control's REST API like an admin would. It never links the crates it
//! tests: what runs is what ships. Processes are killed when their handle drops.

#![allow(clippy::print_stdout)]

pub mod acme;
pub mod dashboard;
pub mod fleet;
pub mod identity;
pub mod load;
pub mod netns;
pub mod sso;

use std::fmt;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

/// The admin key every harness-started control is seeded with.
pub const TEST_ADMIN_KEY: &str =
    "kma_00000000000000000000000000000e2e_harness0123456789abcdef0123456789";

/// Where the release binaries are: `$KAKUREMICHI_BIN_DIR`, else `<workspace>/target/release`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KAKUREMICHI_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("release")
}

/// Path of one binary; fails with the command to build it when it is missing.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir().join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build the binaries first with `cargo build --release --workspace --bins` \
             (or set KAKUREMICHI_BIN_DIR)",
            path.display()
        );
    }
    Ok(path)
}

/// Ports this process has handed out: a port is bound, released and given to a process that
/// binds it later, so the kernel may offer the same one again before then (a gateway's metrics
/// port once came back as control's listen port). No port is handed out twice.
static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// Where test ports are picked: below the kernel's ephemeral range (32768 and up), so that no
/// outgoing connection of any process takes one as its source port between the pick and the bind.
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// Claims of ports across test processes: nextest runs each test in a process of its own, and a
/// port picked by one (bound, released) could otherwise be picked by another before the first
/// one's server binds it. A claim is a file named after the port holding the claimer's pid; it
/// holds while that process lives.
fn claims_dir() -> PathBuf {
    std::env::temp_dir().join("kakuremichi-e2e-ports")
}

fn claim(port: u16) -> bool {
    claim_name(&port.to_string())
}

/// Claims `name` (a port, or another resource tests share, such as a subnet) for this process
/// while it lives; false if a live process holds it.
pub(crate) fn claim_name(name: &str) -> bool {
    let dir = claims_dir();
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(name);
    for _ in 0..2 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                use std::io::Write as _;
                return f
                    .write_all(std::process::id().to_string().as_bytes())
                    .is_ok();
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let alive = holder
                    .trim()
                    .parse::<u32>()
                    .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
                // An empty file is a claim being written: leave it to its writer.
                if alive || holder.is_empty() {
                    return false;
                }
                let _ = std::fs::remove_file(&path);
            }
            Err(_) => return false,
        }
    }
    false
}

/// Gives up this process's claim of `name`, if it holds it.
pub(crate) fn release_name(name: &str) {
    let path = claims_dir().join(name);
    let holder = std::fs::read_to_string(&path).unwrap_or_default();
    if holder.trim() == std::process::id().to_string() {
        let _ = std::fs::remove_file(&path);
    }
}

fn fresh_port() -> u16 {
    use rand::Rng as _;
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = rand::thread_rng();
    for _ in 0..10_000 {
        let port = rng.gen_range(TEST_PORTS);
        if handed.contains(&port) {
            continue;
        }
        // Free for both TCP and UDP on loopback and on every address.
        let free = TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("0.0.0.0", port)).is_ok()
            && UdpSocket::bind(("127.0.0.1", port)).is_ok()
            && UdpSocket::bind(("0.0.0.0", port)).is_ok();
        if free && claim(port) {
            handed.push(port);
            return port;
        }
    }
    0
}

/// A free TCP port on loopback, never one handed out before to this or another running test
/// process, and outside the ephemeral range.
pub fn free_tcp_port() -> u16 {
    fresh_port()
}

/// A free UDP port on loopback, never one handed out before to this or another running test
/// process, and outside the ephemeral range.
pub fn free_udp_port() -> u16 {
    fresh_port()
}

/// A child process that is killed when dropped. Its stdout and stderr go to `log`.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl fmt::Debug for Proc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proc")
            .field("name", &self.name)
            .field("log", &self.log)
            .finish()
    }
}

impl Proc {
    /// Starts `program args...`, in network namespace `netns` if given, logging to `log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        envs: &[(&str, String)],
        netns: Option<&str>,
        log: PathBuf,
    ) -> anyhow::Result<Proc> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .env(
                "RUST_LOG",
                std::env::var("KAKUREMICHI_E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            log,
        })
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Resident memory of the process in KiB (VmRSS), while it runs.
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.pid()?)
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (SIGTERM, SIGHUP, ...) to the process, if it runs.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = self.pid().context("the process is not running")?;
        let pid = i32::try_from(pid).context("pid out of range")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
            .with_context(|| format!("sending {signal:?} to {}", self.name))
    }

    /// Waits (polling every 5 ms, for at most `timeout`) until the process ends, and returns
    /// its exit status; `None` if it still runs.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Everything the process logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The last lines of the process's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let start = all.len().saturating_sub(lines);
        format!(
            "--- {} ({}) ---\n{}",
            self.name,
            self.log.display(),
            all[start..].join("\n")
        )
    }

    /// Path of the log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Resident memory of process `pid` in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Waits until `f` returns `Ok(Some(_))`, polling every 50 ms, for at most `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            match last_err {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}: last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A REST client for control's admin API.
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    key: String,
    http: reqwest::Client,
}

/// A site or gateway just created: its id and one-time enrollment token.
#[derive(Debug, Clone)]
pub struct Created {
    /// The new object's id.
    pub id: String,
    /// The enrollment token, shown once.
    pub token: String,
    /// The whole answer.
    pub body: Value,
}

impl Api {
    /// A client for control at `base` (e.g. `http://127.0.0.1:3000`).
    pub fn new(base: &str, key: &str) -> Api {
        Api {
            base: base.trim_end_matches('/').to_string(),
            key: key.to_string(),
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
        }
    }

    /// Control's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request with the admin key; returns status and JSON body (Null when empty).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{}", self.base, path))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, value))
    }

    async fn expect(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        want: u16,
    ) -> anyhow::Result<Value> {
        let (status, value) = self.call(method.clone(), path, body).await?;
        if status != want {
            bail!("{method} {path}: expected {want}, got {status}: {value}");
        }
        Ok(value)
    }

    fn created(body: Value) -> anyhow::Result<Created> {
        let id = body["id"].as_str().context("no id in answer")?.to_string();
        let token = body["enrollment_token"]
            .as_str()
            .context("no enrollment_token in answer")?
            .to_string();
        Ok(Created { id, token, body })
    }

    /// Creates a site (an agent's identity).
    pub async fn create_site(&self, name: &str) -> anyhow::Result<Created> {
        let body = self
            .expect(
                reqwest::Method::POST,
                "/api/v1/sites",
                Some(json!({"name": name})),
                201,
            )
            .await?;
        Self::created(body)
    }

    /// Creates a gateway whose WireGuard endpoint agents dial.
    pub async fn create_gateway(&self, name: &str, endpoint: &str) -> anyhow::Result<Created> {
        let body = self
            .expect(
                reqwest::Method::POST,
                "/api/v1/gateways",
                Some(json!({"name": name, "endpoint": endpoint})),
                201,
            )
            .await?;
        Self::created(body)
    }

    /// Creates an HTTP resource; returns its id.
    pub async fn create_resource(
        &self,
        hostname: &str,
        site_id: &str,
        target: &str,
    ) -> anyhow::Result<String> {
        let body = self
            .expect(
                reqwest::Method::POST,
                "/api/v1/resources",
                Some(json!({"hostname": hostname, "site_id": site_id, "target": target})),
                201,
            )
            .await?;
        Ok(body["id"].as_str().context("no id")?.to_string())
    }

    /// Creates a TCP or UDP resource (`protocol`) on `public_port` of every gateway; returns
    /// control's answer.
    pub async fn create_port_resource(
        &self,
        protocol: &str,
        public_port: u16,
        site_id: &str,
        target: &str,
    ) -> anyhow::Result<Value> {
        self.expect(
            reqwest::Method::POST,
            "/api/v1/resources",
            Some(json!({
                "protocol": protocol,
                "public_port": public_port,
                "site_id": site_id,
                "target": target,
            })),
            201,
        )
        .await
    }

    /// Deletes a resource.
    pub async fn delete_resource(&self, id: &str) -> anyhow::Result<()> {
        let (status, body) = self
            .call(
                reqwest::Method::DELETE,
                &format!("/api/v1/resources/{id}"),
                None,
            )
            .await?;
        if !(200..300).contains(&status) {
            bail!("DELETE resource {id}: {status} {body}");
        }
        Ok(())
    }

    /// PATCH a path with a JSON body, expecting 200.
    pub async fn patch(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.expect(reqwest::Method::PATCH, path, Some(body), 200)
            .await
    }

    /// GET a path, expecting 200.
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.expect(reqwest::Method::GET, path, None, 200).await
    }

    /// The current config version.
    pub async fn config_version(&self) -> anyhow::Result<u64> {
        let v = self.get("/api/v1/config/version").await?;
        v["version"].as_u64().context("no version")
    }
}

/// Where a node or app of a [`Stack`] runs.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// Network namespace, or the harness's own.
    pub netns: Option<String>,
}

/// Options for a [`Stack`].
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Address control listens on.
    pub control_listen: SocketAddr,
    /// URL the test uses for control.
    pub control_url_for_test: String,
    /// URL nodes use for control.
    pub control_url_for_nodes: String,
    /// Where control runs.
    pub control_at: Placement,
    /// Gateway HTTP listen address.
    pub gateway_http_listen: SocketAddr,
    /// Gateway HTTP address as the test reaches it.
    pub gateway_http_for_test: SocketAddr,
    /// Gateway WireGuard listen address.
    pub gateway_wg_listen: SocketAddr,
    /// The WireGuard endpoint agents are told to dial.
    pub gateway_endpoint: String,
    /// Where the gateway runs.
    pub gateway_at: Placement,
    /// Where the agent and the demo app run.
    pub agent_at: Placement,
    /// The agent's WireGuard UDP address (ephemeral when `None`).
    pub agent_wg_listen: Option<SocketAddr>,
    /// Demo app listen address (its target as the agent dials it).
    pub app_listen: SocketAddr,
    /// Extra gateway arguments.
    pub gateway_args: Vec<String>,
    /// Extra control arguments.
    pub control_args: Vec<String>,
    /// Extra agent arguments.
    pub agent_args: Vec<String>,
    /// The admin key control is seeded with.
    pub admin_key: String,
}

impl StackOptions {
    /// Control and the gateway in the lab's public namespace, the agent and the app in its LAN
    /// behind the NAT.
    pub fn in_lab(lab: &netns::NatLab) -> StackOptions {
        let gw_public = std::net::Ipv4Addr::from(netns::GW_PUBLIC);
        let gw_harness = std::net::Ipv4Addr::from(netns::GW_FROM_HARNESS);
        let lan = std::net::Ipv4Addr::from(netns::LAN_HOST);
        StackOptions {
            control_listen: SocketAddr::from(([0, 0, 0, 0], 3000)),
            control_url_for_test: format!("http://{gw_harness}:3000"),
            control_url_for_nodes: format!("http://{gw_public}:3000"),
            control_at: Placement {
                netns: Some(lab.gw_ns.clone()),
            },
            gateway_http_listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            gateway_http_for_test: SocketAddr::from((gw_harness, 8080)),
            gateway_wg_listen: SocketAddr::from(([0, 0, 0, 0], 51820)),
            gateway_endpoint: format!("{gw_public}:51820"),
            gateway_at: Placement {
                netns: Some(lab.gw_ns.clone()),
            },
            agent_at: Placement {
                netns: Some(lab.lan_ns.clone()),
            },
            agent_wg_listen: None,
            app_listen: SocketAddr::from((lan, 9000)),
            gateway_args: Vec::new(),
            control_args: Vec::new(),
            agent_args: Vec::new(),
            admin_key: TEST_ADMIN_KEY.to_string(),
        }
    }

    /// Everything on loopback with fresh ports.
    pub fn loopback() -> StackOptions {
        let control_port = free_tcp_port();
        let http_port = free_tcp_port();
        let wg_port = free_udp_port();
        let app_port = free_tcp_port();
        let control_url = format!("http://127.0.0.1:{control_port}");
        StackOptions {
            control_listen: SocketAddr::from(([127, 0, 0, 1], control_port)),
            control_url_for_test: control_url.clone(),
            control_url_for_nodes: control_url,
            control_at: Placement::default(),
            gateway_http_listen: SocketAddr::from(([127, 0, 0, 1], http_port)),
            gateway_http_for_test: SocketAddr::from(([127, 0, 0, 1], http_port)),
            gateway_wg_listen: SocketAddr::from(([127, 0, 0, 1], wg_port)),
            gateway_endpoint: format!("127.0.0.1:{wg_port}"),
            gateway_at: Placement::default(),
            agent_at: Placement::default(),
            agent_wg_listen: None,
            app_listen: SocketAddr::from(([127, 0, 0, 1], app_port)),
            gateway_args: Vec::new(),
            control_args: Vec::new(),
            agent_args: Vec::new(),
            admin_key: TEST_ADMIN_KEY.to_string(),
        }
    }
}

/// A whole system: control, one gateway, one agent, the demo app, and resource `demo.localhost`.
#[derive(Debug)]
pub struct Stack {
    /// Options it was started with.
    pub opts: StackOptions,
    /// Temporary folder holding data folders and logs.
    pub dir: tempfile::TempDir,
    /// Control's process.
    pub control: Proc,
    /// The gateway's process.
    pub gateway: Proc,
    /// The agent's process.
    pub agent: Proc,
    /// The demo app's process.
    pub app: Proc,
    /// Admin API client.
    pub api: Api,
    /// The site's id.
    pub site_id: String,
    /// The gateway's id.
    pub gateway_id: String,
    /// The gateway's enrollment token.
    pub gateway_token: String,
    /// The site's enrollment token.
    pub site_token: String,
    /// The demo resource's id.
    pub resource_id: String,
    http: reqwest::Client,
}

/// The demo resource's hostname.
pub const DEMO_HOST: &str = "demo.localhost";

impl Stack {
    /// Starts everything on loopback and waits until `demo.localhost` answers through the tunnel.
    pub async fn start() -> anyhow::Result<Stack> {
        Self::start_with(StackOptions::loopback()).await
    }

    /// Starts everything as `opts` says and waits until `demo.localhost` answers.
    pub async fn start_with(opts: StackOptions) -> anyhow::Result<Stack> {
        // KAKUREMICHI_E2E_KEEP=1 keeps the data folders and logs for a look after the test.
        let dir = tempfile::Builder::new()
            .prefix("kakuremichi-e2e")
            .disable_cleanup(std::env::var_os("KAKUREMICHI_E2E_KEEP").is_some())
            .tempdir()?;
        let control = start_control(&opts, dir.path())?;
        let api = Api::new(&opts.control_url_for_test, &opts.admin_key);
        wait_healthy(&api, &control).await?;

        let app = start_demo_app_with(
            opts.app_listen,
            &[
                "--jwks-url".to_owned(),
                format!(
                    "{}/.well-known/kakuremichi/jwks.json",
                    opts.control_url_for_nodes
                ),
            ],
            opts.agent_at.netns.as_deref(),
            dir.path(),
        )?;
        let gw = api.create_gateway("edge", &opts.gateway_endpoint).await?;
        let site = api.create_site("home").await?;
        let resource_id = api
            .create_resource(DEMO_HOST, &site.id, &opts.app_listen.to_string())
            .await?;
        let gateway = start_gateway(&opts, dir.path(), Some(&gw.token))?;
        let agent = start_agent(&opts, dir.path(), Some(&site.token))?;
        let stack = Stack {
            http: test_http_client(),
            opts,
            dir,
            control,
            gateway,
            agent,
            app,
            api,
            site_id: site.id,
            gateway_id: gw.id,
            gateway_token: gw.token,
            site_token: site.token,
            resource_id,
        };
        stack.wait_serving(Duration::from_secs(20)).await?;
        Ok(stack)
    }

    /// Restarts the gateway process (same data folder; the token is not needed again).
    pub fn restart_gateway(&mut self) -> anyhow::Result<()> {
        self.gateway.kill();
        self.gateway = start_gateway(&self.opts, self.dir.path(), None)?;
        Ok(())
    }

    /// Restarts the agent process (same data folder).
    pub fn restart_agent(&mut self) -> anyhow::Result<()> {
        self.agent.kill();
        self.agent = start_agent(&self.opts, self.dir.path(), None)?;
        Ok(())
    }

    /// Starts one more agent, with its own data folder `agent-<name>`, enrolled with `token`
    /// (on loopback, beside the stack's own agent).
    pub fn start_another_agent(&self, name: &str, token: &str) -> anyhow::Result<Proc> {
        start_agent_named(
            &self.opts,
            self.dir.path(),
            &format!("agent-{name}"),
            Some(token),
        )
    }

    /// [`Stack::start_another_agent`] with `agent_args` in place of the stack's own extra agent
    /// arguments.
    pub fn start_another_agent_with(
        &self,
        name: &str,
        token: &str,
        agent_args: &[String],
    ) -> anyhow::Result<Proc> {
        let mut opts = self.opts.clone();
        opts.agent_args = agent_args.to_vec();
        start_agent_named(
            &opts,
            self.dir.path(),
            &format!("agent-{name}"),
            Some(token),
        )
    }

    /// Stops control.
    pub fn stop_control(&mut self) {
        self.control.kill();
    }

    /// Starts control again on the same store.
    pub async fn start_control_again(&mut self) -> anyhow::Result<()> {
        self.control = start_control(&self.opts, self.dir.path())?;
        wait_healthy(&self.api, &self.control).await
    }

    /// `GET path` on the gateway with `Host: host`.
    pub async fn get(&self, host: &str, path: &str) -> anyhow::Result<reqwest::Response> {
        self.request(reqwest::Method::GET, host, path).await
    }

    /// A request builder aimed at the gateway with `Host: host`.
    pub fn request_builder(
        &self,
        method: reqwest::Method,
        host: &str,
        path: &str,
    ) -> reqwest::RequestBuilder {
        self.http
            .request(
                method,
                format!("http://{}{}", self.opts.gateway_http_for_test, path),
            )
            .header(reqwest::header::HOST, host)
    }

    /// Sends `method path` to the gateway with `Host: host`.
    pub async fn request(
        &self,
        method: reqwest::Method,
        host: &str,
        path: &str,
    ) -> anyhow::Result<reqwest::Response> {
        Ok(self.request_builder(method, host, path).send().await?)
    }

    /// Waits until `GET /` for the demo host returns the app's page.
    pub async fn wait_serving(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let res = wait_for(
            "the demo resource to answer through the tunnel",
            timeout,
            || async {
                let resp = self.get(DEMO_HOST, "/").await?;
                if resp.status() == 200 && resp.text().await?.contains("kakuremichi demo app") {
                    Ok(Some(()))
                } else {
                    Ok(None)
                }
            },
        )
        .await;
        match res {
            Ok(()) => Ok(started.elapsed()),
            Err(e) => Err(e.context(format!("{}\n{}", self.logs(), self.diagnosis()))),
        }
    }

    /// Whether each process still runs (its state in `/proc`: `Z` once it has ended) and the
    /// sockets on the gateway's and the app's ports, for failure messages.
    pub fn diagnosis(&self) -> String {
        let mut out = String::from("--- processes ---\n");
        for p in [&self.control, &self.gateway, &self.agent, &self.app] {
            let state = p
                .pid()
                .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
                .and_then(|stat| {
                    stat.rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_owned))
                })
                .unwrap_or_else(|| "gone".into());
            out.push_str(&format!("{} pid {:?}: state {state}\n", p.name, p.pid()));
        }
        let ports = [
            self.opts.gateway_http_listen.port(),
            self.opts.app_listen.port(),
        ];
        if let Ok(ss) = Command::new("ss").args(["-tanpH"]).output() {
            out.push_str("--- sockets on those ports ---\n");
            for line in String::from_utf8_lossy(&ss.stdout).lines() {
                if ports.iter().any(|p| line.contains(&format!(":{p} "))) {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out
    }

    /// Every line every process logged so far.
    pub fn logs_full(&self) -> String {
        [&self.control, &self.gateway, &self.agent, &self.app]
            .iter()
            .map(|p| std::fs::read_to_string(p.log_path()).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The tails of every process's log.
    pub fn logs(&self) -> String {
        [&self.control, &self.gateway, &self.agent, &self.app]
            .iter()
            .map(|p| p.log_tail(40))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// An HTTP client for talking to the gateway: no proxy, no pooling surprises.
pub fn test_http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap_or_default()
}

async fn wait_healthy(api: &Api, control: &Proc) -> anyhow::Result<()> {
    let url = format!("{}/healthz", api.base());
    let http = test_http_client();
    wait_for("control to be healthy", Duration::from_secs(20), || async {
        Ok(http
            .get(&url)
            .send()
            .await
            .ok()
            .filter(|r| r.status() == 200)
            .map(|_| ()))
    })
    .await
    .map_err(|e| e.context(control.log_tail(40)))
}

fn start_control(opts: &StackOptions, dir: &Path) -> anyhow::Result<Proc> {
    let data = dir.join("control");
    std::fs::create_dir_all(&data)?;
    let mut args = vec![
        "--listen".into(),
        opts.control_listen.to_string(),
        "--data-dir".into(),
        data.display().to_string(),
    ];
    args.extend(opts.control_args.iter().cloned());
    Proc::spawn(
        "control",
        &bin("kakuremichi-control")?,
        &args,
        &[("KAKUREMICHI_INITIAL_ADMIN_KEY", opts.admin_key.clone())],
        opts.control_at.netns.as_deref(),
        dir.join("control.log"),
    )
}

/// `--allow-insecure-control` when nodes reach control over plain `http://` at a host that is not
/// loopback (the NAT lab, where control is at its public-side address), nothing otherwise: loopback
/// stacks start nodes without the flag, so they keep proving the default accepts them. (The harness
/// does not link the node crate, so this mirrors its rule rather than calling it.)
pub fn insecure_control_args(control_url: &str) -> Vec<String> {
    let insecure = reqwest::Url::parse(control_url)
        .is_ok_and(|url| url.scheme() == "http" && !url.host_str().is_some_and(is_loopback_host));
    if insecure {
        vec!["--allow-insecure-control".into()]
    } else {
        Vec::new()
    }
}

fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => bare == "localhost" || bare.ends_with(".localhost"),
    }
}

pub fn start_gateway(opts: &StackOptions, dir: &Path, token: Option<&str>) -> anyhow::Result<Proc> {
    let data = dir.join("gateway");
    std::fs::create_dir_all(&data)?;
    let mut args = vec![
        "--control".into(),
        opts.control_url_for_nodes.clone(),
        "--data-dir".into(),
        data.display().to_string(),
        "--http-listen".into(),
        opts.gateway_http_listen.to_string(),
        "--wg-listen".into(),
        opts.gateway_wg_listen.to_string(),
    ];
    args.extend(insecure_control_args(&opts.control_url_for_nodes));
    if let Some(t) = token {
        args.extend(["--token".into(), t.to_string()]);
    }
    args.extend(opts.gateway_args.iter().cloned());
    Proc::spawn(
        "gateway",
        &bin("kakuremichi-gateway")?,
        &args,
        &[],
        opts.gateway_at.netns.as_deref(),
        dir.join("gateway.log"),
    )
}

pub fn start_agent(opts: &StackOptions, dir: &Path, token: Option<&str>) -> anyhow::Result<Proc> {
    start_agent_named(opts, dir, "agent", token)
}

fn start_agent_named(
    opts: &StackOptions,
    dir: &Path,
    name: &str,
    token: Option<&str>,
) -> anyhow::Result<Proc> {
    let data = dir.join(name);
    std::fs::create_dir_all(&data)?;
    let mut args = vec![
        "--control".into(),
        opts.control_url_for_nodes.clone(),
        "--data-dir".into(),
        data.display().to_string(),
    ];
    args.extend(insecure_control_args(&opts.control_url_for_nodes));
    if let Some(t) = token {
        args.extend(["--token".into(), t.to_string()]);
    }
    if let Some(wg) = opts.agent_wg_listen {
        args.extend(["--wg-listen".into(), wg.to_string()]);
    }
    args.extend(opts.agent_args.iter().cloned());
    Proc::spawn(
        name,
        &bin("kakuremichi-agent")?,
        &args,
        &[],
        opts.agent_at.netns.as_deref(),
        dir.join(format!("{name}.log")),
    )
}

/// Starts the demo app on `listen`.
pub fn start_demo_app(listen: SocketAddr, netns: Option<&str>, dir: &Path) -> anyhow::Result<Proc> {
    start_demo_app_with(listen, &[], netns, dir)
}

/// Starts a demo app with more flags (e.g. `--udp-echo ADDR`); its log is `demo-app-PORT.log`.
pub fn start_demo_app_with(
    listen: SocketAddr,
    extra: &[String],
    netns: Option<&str>,
    dir: &Path,
) -> anyhow::Result<Proc> {
    let mut args = vec!["--listen".to_owned(), listen.to_string()];
    args.extend_from_slice(extra);
    let log = if extra.is_empty() {
        dir.join("demo-app.log")
    } else {
        dir.join(format!("demo-app-{}.log", listen.port()))
    };
    Proc::spawn(
        "demo-app",
        &bin("kakuremichi-demo-app")?,
        &args,
        &[],
        netns,
        log,
    )
}

/// The value of the first line of `127.0.0.1:port/metrics` that starts with `name` (a metric
/// and its labels), 0 when there is none. Panics when the metrics cannot be fetched.
pub async fn metric(port: u16, name: &str) -> u64 {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .and_then(|r| r.error_for_status())
        .expect("fetching /metrics")
        .text()
        .await
        .expect("reading /metrics");
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The byte at offset `i` of the demo app's `/bytes/{n}` bodies.
pub fn demo_pattern(i: u64) -> u8 {
    (i % 251) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_off_loopback_gets_the_insecure_flag() {
        let lab = StackOptions {
            control_url_for_nodes: format!(
                "http://{}:3000",
                std::net::Ipv4Addr::from(netns::GW_PUBLIC)
            ),
            ..StackOptions::loopback()
        };
        assert_eq!(
            insecure_control_args(&lab.control_url_for_nodes),
            vec!["--allow-insecure-control".to_owned()]
        );
        for url in [
            StackOptions::loopback().control_url_for_nodes,
            "http://127.0.0.1:3000".into(),
            "http://[::1]:3000".into(),
            "http://localhost:3000".into(),
            "https://10.0.0.1:3000".into(),
        ] {
            assert!(insecure_control_args(&url).is_empty(), "{url}");
        }
    }
}
