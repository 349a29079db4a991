//! Command line and config file of the agent binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use kakuremichi_node::relay::FallbackSettings;
use kakuremichi_node::settings::{
    parse_secret, read_config_file, ControlArgs, ControlFile, QuicArgs, QuicFile,
};
use kakuremichi_node::NodeSettings;
use kakuremichi_proto::Secret;
use kakuremichi_telemetry::TracesEndpoint;
use kakuremichi_tunnel::PathSettings;
use serde::Deserialize;

pub use kakuremichi_node::ConfigError;

use crate::sessions::{HostConfig, DEFAULT_COMMAND};

/// The kakuremichi agent: publishes private apps through kakuremichi gateways.
#[derive(Debug, Clone, Parser)]
#[command(name = "kakuremichi-agent", version, about)]
pub struct Cli {
    /// TOML file with the same settings (command line and environment win).
    #[arg(long, env = "KAKUREMICHI_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Control's base URL, e.g. https://control.example.com (defaults to the enrolled one), or a
    /// comma-separated list of the URLs of several control replicas
    /// (https://c1.example.com,https://c2.example.com); plain http:// only to loopback, unless
    /// --allow-insecure-control.
    #[arg(long, env = "KAKUREMICHI_AGENT_CONTROL")]
    pub control: Option<String>,
    /// One-time enrollment token (first start only); see also --token-file.
    #[arg(
        long,
        env = "KAKUREMICHI_AGENT_TOKEN",
        hide_env_values = true,
        value_parser = parse_secret
    )]
    pub token: Option<Secret>,
    /// How to reach control: --token-file, --allow-insecure-control.
    #[command(flatten)]
    pub control_access: ControlArgs,
    /// --log-format.
    #[command(flatten)]
    pub log: kakuremichi_node::settings::LogArgs,
    /// --worker-threads.
    #[command(flatten)]
    pub runtime: kakuremichi_node::settings::RuntimeArgs,
    /// --shutdown-grace.
    #[command(flatten)]
    pub shutdown: kakuremichi_node::reload::ShutdownArgs,
    /// Folder for state.json and config.json [default: ./kakuremichi-agent].
    #[arg(long, env = "KAKUREMICHI_AGENT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// WireGuard UDP bind address; port 0 picks an ephemeral port [default: 0.0.0.0:0].
    #[arg(long, env = "KAKUREMICHI_AGENT_WG_LISTEN")]
    pub wg_listen: Option<SocketAddr>,
    /// Serve Prometheus metrics at /metrics on this address (e.g. 127.0.0.1:9102).
    #[arg(long, env = "KAKUREMICHI_AGENT_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// QUIC sizes inside the tunnel.
    #[command(flatten)]
    pub quic: QuicArgs,
    /// The gateways' HTTPS port: when UDP to a gateway gets no answer (blocked by a firewall),
    /// WireGuard is carried over a WebSocket there, and UDP is tried again every few seconds.
    /// 0 turns the fallback off [default: 443].
    #[arg(long, env = "KAKUREMICHI_AGENT_UDP_FALLBACK_PORT")]
    pub udp_fallback_port: Option<u16>,
    /// Agent sessions.
    #[command(flatten)]
    pub sessions: SessionArgs,
}

/// How the agent runs agent sessions.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SessionArgs {
    /// The session command; {port}, {id} and {dir} are replaced in each word
    /// [default: agentapi server --port {port} -- claude].
    #[arg(long, env = "KAKUREMICHI_AGENT_SESSION_COMMAND")]
    pub session_command: Option<String>,
    /// Where sessions' working folders are made [default: DATA_DIR/sessions].
    #[arg(long, env = "KAKUREMICHI_AGENT_SESSION_DIR")]
    pub session_dir: Option<PathBuf>,
    /// The folder of default.env and <role>.env, merged into sessions' environment.
    #[arg(long, env = "KAKUREMICHI_AGENT_SESSION_ENV_DIR")]
    pub session_env_dir: Option<PathBuf>,
    /// A shell script file run first in each session's folder (e.g. to clone a repository).
    #[arg(long, env = "KAKUREMICHI_AGENT_SESSION_STARTUP_SCRIPT")]
    pub session_startup_script: Option<PathBuf>,
    /// The ports sessions listen on, FIRST-LAST [default: 3284-3383].
    #[arg(long, env = "KAKUREMICHI_AGENT_SESSION_PORTS")]
    pub session_ports: Option<String>,
    /// The user sessions run as (a name or uid; only when the agent runs as root).
    #[arg(long, env = "KAKUREMICHI_AGENT_SESSION_USER")]
    pub session_user: Option<String>,
    /// Sessions alive at once at most [default: 100].
    #[arg(long, env = "KAKUREMICHI_AGENT_MAX_SESSIONS")]
    pub max_sessions: Option<usize>,
    /// The command for a session that was running when the agent stopped without ending it
    /// (it crashed or was killed), started again in its folder, e.g.
    /// "agentapi server --port {port} -- claude --continue" [default: the session command].
    #[arg(long, env = "KAKUREMICHI_AGENT_SESSION_RESUME_COMMAND")]
    pub session_resume_command: Option<String>,
    /// Sessions begun longer ago than this are not resumed (they fail): 30m, 12h, 7d
    /// [default: 24h].
    #[arg(long, env = "KAKUREMICHI_AGENT_SESSION_RESUME_MAX_AGE")]
    pub session_resume_max_age: Option<String>,
    /// Address space of each session process at most, in MiB (RLIMIT_AS).
    #[arg(long, env = "KAKUREMICHI_AGENT_SESSION_MEMORY_MIB")]
    pub session_memory_mib: Option<u64>,
    /// CPU time of each session process at most, in seconds (RLIMIT_CPU).
    #[arg(long, env = "KAKUREMICHI_AGENT_SESSION_CPU_SECS")]
    pub session_cpu_secs: Option<u64>,
    /// Processes of the sessions' user at most (RLIMIT_NPROC; per session with --session-user
    /// and one user per session, else shared).
    #[arg(long, env = "KAKUREMICHI_AGENT_SESSION_MAX_PROCESSES")]
    pub session_max_processes: Option<u64>,
    /// A label of this agent, KEY=VALUE (repeat it, or commas in the variable): a new session
    /// whose tags hold KEY=VALUE runs on an agent with that label (the most such tags wins).
    #[arg(
        long = "session-label",
        env = "KAKUREMICHI_AGENT_SESSION_LABELS",
        value_delimiter = ','
    )]
    pub session_labels: Vec<String>,
}

/// The `--config` file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    control: Option<String>,
    token: Option<Secret>,
    token_file: Option<PathBuf>,
    allow_insecure_control: Option<bool>,
    data_dir: Option<PathBuf>,
    wg_listen: Option<SocketAddr>,
    metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    quic: QuicFile,
    udp_fallback_port: Option<u16>,
    session_command: Option<String>,
    session_dir: Option<PathBuf>,
    session_env_dir: Option<PathBuf>,
    session_startup_script: Option<PathBuf>,
    session_ports: Option<String>,
    session_user: Option<String>,
    max_sessions: Option<usize>,
    session_resume_command: Option<String>,
    session_resume_max_age: Option<String>,
    session_memory_mib: Option<u64>,
    session_cpu_secs: Option<u64>,
    session_max_processes: Option<u64>,
    /// `[session_labels]`: KEY = "VALUE".
    #[serde(default)]
    session_labels: std::collections::BTreeMap<String, String>,
    otlp_endpoint: Option<String>,
    shutdown_grace: Option<String>,
}

/// Validated node settings: those every node has.
pub type Settings = NodeSettings;

/// Everything the agent's command line and file say, validated.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// What every node has.
    pub node: Settings,
    /// How sessions run.
    pub sessions: HostConfig,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Where traces go (`--otlp-endpoint`), if anywhere.
    pub otlp: Option<TracesEndpoint>,
    /// How long streams in flight may take to finish after SIGTERM.
    pub shutdown_grace: std::time::Duration,
}

impl Cli {
    /// Merges the command line (and environment) over the config file, applies defaults and
    /// validates.
    pub fn resolve(self) -> Result<Settings, ConfigError> {
        self.resolve_all().map(|all| all.node)
    }

    /// The UDP-blocked fallback (`None`: off), from the command line or the config file.
    pub fn resolve_fallback(&self) -> Result<Option<FallbackSettings>, ConfigError> {
        let file: FileConfig = read_config_file(self.config.as_deref())?;
        let port = self
            .udp_fallback_port
            .or(file.udp_fallback_port)
            .unwrap_or(443);
        Ok((port != 0).then(|| FallbackSettings {
            port,
            path: PathSettings::default(),
        }))
    }

    /// [`Cli::resolve`], how sessions run, the metrics address and where traces go
    /// (`--otlp-endpoint`), if anywhere.
    pub fn resolve_all(self) -> Result<AgentSettings, ConfigError> {
        let file: FileConfig = read_config_file(self.config.as_deref())?;
        let metrics_listen = self.metrics_listen.or(file.metrics_listen);
        let otlp = self.log.traces(file.otlp_endpoint.as_deref())?;
        let shutdown_grace = self.shutdown.resolve(file.shutdown_grace.as_deref())?;
        let sessions_args = self.sessions.clone();
        let control = self.control_access.resolve(
            self.control,
            self.token,
            ControlFile {
                control: file.control,
                token: file.token,
                token_file: file.token_file,
                allow_insecure_control: file.allow_insecure_control,
            },
        )?;
        let node = Settings {
            control: control.control,
            token: control.token,
            allow_insecure_control: control.allow_insecure_control,
            data_dir: self
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("kakuremichi-agent")),
            wg_listen: self
                .wg_listen
                .or(file.wg_listen)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            quic: self.quic.resolve(file.quic)?,
        };
        let a = sessions_args;
        let sessions = session_config(
            SessionArgs {
                session_command: a.session_command.or(file.session_command),
                session_dir: a.session_dir.or(file.session_dir),
                session_env_dir: a.session_env_dir.or(file.session_env_dir),
                session_startup_script: a.session_startup_script.or(file.session_startup_script),
                session_ports: a.session_ports.or(file.session_ports),
                session_user: a.session_user.or(file.session_user),
                max_sessions: a.max_sessions.or(file.max_sessions),
                session_resume_command: a.session_resume_command.or(file.session_resume_command),
                session_resume_max_age: a.session_resume_max_age.or(file.session_resume_max_age),
                session_memory_mib: a.session_memory_mib.or(file.session_memory_mib),
                session_cpu_secs: a.session_cpu_secs.or(file.session_cpu_secs),
                session_max_processes: a.session_max_processes.or(file.session_max_processes),
                session_labels: if a.session_labels.is_empty() {
                    file.session_labels
                        .into_iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect()
                } else {
                    a.session_labels
                },
            },
            &node.data_dir,
        )?;
        Ok(AgentSettings {
            node,
            sessions,
            metrics_listen,
            otlp,
            shutdown_grace,
        })
    }
}

/// `90s`, `30m`, `12h`, `7d` (not zero).
fn parse_age(s: &str) -> Option<std::time::Duration> {
    let s = s.trim();
    let i = s.find(|c: char| !c.is_ascii_digit())?;
    let n: u64 = s[..i].parse().ok()?;
    let unit = match &s[i..] {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    Some(std::time::Duration::from_secs(n.checked_mul(unit)?)).filter(|d| !d.is_zero())
}

/// Validates the session settings.
fn session_config(a: SessionArgs, data_dir: &std::path::Path) -> Result<HostConfig, ConfigError> {
    let bad = |m: String| ConfigError::Invalid(m);
    let command = a.session_command.as_deref().unwrap_or(DEFAULT_COMMAND);
    let mut config = HostConfig::new(
        command,
        a.session_dir.unwrap_or_else(|| data_dir.join("sessions")),
    );
    if config.command.is_empty() {
        return Err(bad("--session-command is empty".into()));
    }
    config.env_dir = a.session_env_dir;
    if let Some(path) = a.session_startup_script {
        let script = std::fs::read_to_string(&path).map_err(|e| {
            bad(format!(
                "cannot read the session start-up script {}: {e}",
                path.display()
            ))
        })?;
        config.startup_script = Some(script);
    }
    if let Some(ports) = a.session_ports {
        let range = ports
            .split_once('-')
            .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)))
            .filter(|(a, b)| *a > 0 && a <= b)
            .ok_or_else(|| {
                bad(format!(
                    "--session-ports {ports:?} is not FIRST-LAST, e.g. 3284-3383"
                ))
            })?;
        config.limits.first_port = range.0;
        config.limits.ports = range.1 - range.0 + 1;
    }
    if let Some(resume) = &a.session_resume_command {
        let words: Vec<String> = resume.split_whitespace().map(str::to_owned).collect();
        if words.is_empty() {
            return Err(bad("--session-resume-command is empty".into()));
        }
        config.resume_command = Some(words);
    }
    if let Some(age) = &a.session_resume_max_age {
        config.resume_max_age = parse_age(age).ok_or_else(|| {
            bad(format!(
                "--session-resume-max-age {age:?} is not a duration such as 30m, 12h or 7d"
            ))
        })?;
    }
    for (name, v) in [
        ("--session-memory-mib", a.session_memory_mib),
        ("--session-cpu-secs", a.session_cpu_secs),
        ("--session-max-processes", a.session_max_processes),
    ] {
        if v == Some(0) {
            return Err(bad(format!("{name} must be at least 1")));
        }
    }
    config.rlimits = crate::sessions::SessionLimits {
        memory_bytes: a.session_memory_mib.map(|m| m.saturating_mul(1 << 20)),
        cpu_secs: a.session_cpu_secs,
        processes: a.session_max_processes,
    };
    if config.rlimits != Default::default() {
        let found = std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join("prlimit").is_file()));
        if !found {
            return Err(bad(
                "session limits need util-linux's prlimit on PATH (apt install util-linux)".into(),
            ));
        }
    }
    for label in &a.session_labels {
        let (k, v) = label
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim()))
            .filter(|(k, v)| !k.is_empty() && k.len() <= 128 && v.len() <= 1024)
            .ok_or_else(|| {
                bad(format!(
                    "--session-label {label:?} is not KEY=VALUE (a key of 1 to 128 bytes)"
                ))
            })?;
        config.labels.insert(k.to_owned(), v.to_owned());
    }
    if let Some(n) = a.max_sessions {
        if n == 0 {
            return Err(bad("--max-sessions must be at least 1".into()));
        }
        config.limits.max_sessions = n;
    }
    if let Some(user) = a.session_user {
        if !nix::unistd::geteuid().is_root() {
            return Err(bad(
                "--session-user needs the agent to run as root (it runs sessions as that user)"
                    .into(),
            ));
        }
        let found = match user.parse::<u32>() {
            Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)),
            Err(_) => nix::unistd::User::from_name(&user),
        };
        let u = found
            .ok()
            .flatten()
            .ok_or_else(|| bad(format!("--session-user {user:?}: no such user")))?;
        config.run_as = Some((u.uid.as_raw(), u.gid.as_raw()));
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_keys() {
        let s = Cli::parse_from(["kakuremichi-agent", "--control", "http://127.0.0.1:3000"])
            .resolve()
            .unwrap();
        assert_eq!(s.wg_listen, "0.0.0.0:0".parse().unwrap());
        assert_eq!(s.data_dir, PathBuf::from("kakuremichi-agent"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(&path, "control = \"http://c\"\nbogus = 1\n").unwrap();
        let err = Cli::parse_from(["kakuremichi-agent", "--config", path.to_str().unwrap()])
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn insecure_control_needs_the_flag_or_the_file_key() {
        let err = Cli::parse_from(["kakuremichi-agent", "--control", "http://10.0.0.1:3000"])
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("is not HTTPS"), "{err}");
        let s = Cli::parse_from([
            "kakuremichi-agent",
            "--control",
            "http://10.0.0.1:3000",
            "--allow-insecure-control",
        ])
        .resolve()
        .unwrap();
        assert!(s.allow_insecure_control);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(
            &path,
            "control = \"http://10.0.0.1:3000\"\nallow_insecure_control = true\n",
        )
        .unwrap();
        let s = Cli::parse_from(["kakuremichi-agent", "--config", path.to_str().unwrap()])
            .resolve()
            .unwrap();
        assert!(s.allow_insecure_control);
        assert!(
            Cli::parse_from(["kakuremichi-agent", "--control", "https://c.example"])
                .resolve()
                .is_ok()
        );
    }

    #[test]
    fn token_file_from_flag_or_file_and_never_in_debug() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "kme_site_secret\n").unwrap();
        let cli = Cli::parse_from([
            "kakuremichi-agent",
            "--control",
            "http://127.0.0.1:3000",
            "--token-file",
            token.to_str().unwrap(),
        ]);
        let s = cli.resolve().unwrap();
        assert_eq!(
            s.token.as_ref().map(Secret::expose),
            Some("kme_site_secret")
        );
        assert!(!format!("{s:?}").contains("kme_site_secret"), "{s:?}");

        let path = dir.path().join("a.toml");
        std::fs::write(
            &path,
            format!("token_file = {:?}\n", token.to_str().unwrap()),
        )
        .unwrap();
        let s = Cli::parse_from(["kakuremichi-agent", "--config", path.to_str().unwrap()])
            .resolve()
            .unwrap();
        assert_eq!(
            s.token.as_ref().map(Secret::expose),
            Some("kme_site_secret")
        );

        let cli = Cli::parse_from([
            "kakuremichi-agent",
            "--token",
            "kme_inline_secret",
            "--token-file",
            token.to_str().unwrap(),
        ]);
        assert!(!format!("{cli:?}").contains("kme_inline_secret"), "{cli:?}");
        let err = cli.resolve().unwrap_err();
        assert!(
            err.to_string().contains("--token and --token-file"),
            "{err}"
        );
        assert!(!err.to_string().contains("secret"), "{err}");

        let err = Cli::parse_from(["kakuremichi-agent", "--token-file", "/nonexistent/token"])
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/token"), "{err}");
    }

    #[test]
    fn shared_flags_read_their_environment_variables() {
        use clap::CommandFactory as _;
        let cmd = Cli::command();
        let env = |id: &str| {
            cmd.get_arguments()
                .find(|a| a.get_id() == id)
                .and_then(|a| a.get_env())
                .and_then(|e| e.to_str())
                .map(str::to_owned)
        };
        assert_eq!(env("token_file").as_deref(), Some("KAKUREMICHI_TOKEN_FILE"));
        assert_eq!(
            env("allow_insecure_control").as_deref(),
            Some("KAKUREMICHI_ALLOW_INSECURE_CONTROL")
        );
    }

    #[test]
    fn metrics_listen_from_flag_or_file_and_a_bad_one_is_refused() {
        let s = Cli::parse_from(["kakuremichi-agent", "--metrics-listen", "127.0.0.1:9102"])
            .resolve_all()
            .unwrap();
        assert_eq!(s.metrics_listen, Some("127.0.0.1:9102".parse().unwrap()));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(&path, "metrics_listen = \"[::1]:9102\"\n").unwrap();
        let s = Cli::parse_from(["kakuremichi-agent", "--config", path.to_str().unwrap()])
            .resolve_all()
            .unwrap();
        assert_eq!(s.metrics_listen, Some("[::1]:9102".parse().unwrap()));
        std::fs::write(&path, "metrics_listen = \"nowhere\"\n").unwrap();
        let err = Cli::parse_from(["kakuremichi-agent", "--config", path.to_str().unwrap()])
            .resolve_all()
            .unwrap_err();
        assert!(err.to_string().contains("metrics_listen"), "{err}");
        assert!(Cli::try_parse_from(["kakuremichi-agent", "--metrics-listen", "nowhere"]).is_err());
        use clap::CommandFactory as _;
        let env = Cli::command()
            .get_arguments()
            .find(|a| a.get_id() == "metrics_listen")
            .and_then(|a| a.get_env())
            .and_then(|e| e.to_str())
            .map(str::to_owned);
        assert_eq!(env.as_deref(), Some("KAKUREMICHI_AGENT_METRICS_LISTEN"));
    }

    #[test]
    fn session_settings_default_and_refuse_bad_values() {
        let AgentSettings {
            node,
            sessions: s,
            metrics_listen,
            ..
        } = Cli::parse_from(["kakuremichi-agent", "--control", "http://127.0.0.1:3000"])
            .resolve_all()
            .unwrap();
        assert_eq!(metrics_listen, None, "no metrics unless asked");
        assert_eq!(
            s.command,
            ["agentapi", "server", "--port", "{port}", "--", "claude"]
        );
        assert_eq!(s.work_dir, node.data_dir.join("sessions"));
        assert_eq!((s.limits.first_port, s.limits.ports), (3284, 100));
        let s = Cli::parse_from([
            "kakuremichi-agent",
            "--session-ports",
            "4000-4009",
            "--session-command",
            "my-agent --listen {port}",
            "--max-sessions",
            "3",
            "--session-label",
            "repo=api,gpu = yes",
            "--session-label",
            "zone=",
        ])
        .resolve_all()
        .unwrap()
        .sessions;
        assert_eq!(
            s.labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
            ["gpu=yes", "repo=api", "zone="]
        );
        assert_eq!(
            (s.limits.first_port, s.limits.ports, s.limits.max_sessions),
            (4000, 10, 3)
        );
        assert_eq!(s.command, ["my-agent", "--listen", "{port}"]);
        for bad in [
            &["--session-ports", "4009-4000"][..],
            &["--session-ports", "nope"],
            &["--max-sessions", "0"],
            &["--session-command", "  "],
            &["--session-startup-script", "/nonexistent/script.sh"],
            &["--session-user", "no-such-user-here"],
            &["--session-label", "no-equals-sign"],
            &["--session-label", "=value"],
        ] {
            let args = std::iter::once("kakuremichi-agent").chain(bad.iter().copied());
            assert!(Cli::parse_from(args).resolve_all().is_err(), "{bad:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(
            &path,
            "session_ports = \"5000-5001\"\n[session_labels]\nrepo = \"web\"\n",
        )
        .unwrap();
        let s = Cli::parse_from(["kakuremichi-agent", "--config", path.to_str().unwrap()])
            .resolve_all()
            .unwrap()
            .sessions;
        assert_eq!((s.limits.first_port, s.limits.ports), (5000, 2));
        assert_eq!(s.labels.get("repo").map(String::as_str), Some("web"));
    }

    #[test]
    fn the_otlp_endpoint_comes_from_the_flag_over_the_file_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(&path, "otlp_endpoint = \"http://file:4318\"\n").unwrap();
        let config = path.to_str().unwrap();
        let otlp = Cli::parse_from(["kakuremichi-agent", "--config", config])
            .resolve_all()
            .unwrap()
            .otlp;
        assert_eq!(
            otlp,
            Some(TracesEndpoint::Url("http://file:4318/v1/traces".into()))
        );
        let otlp = Cli::parse_from([
            "kakuremichi-agent",
            "--config",
            config,
            "--otlp-endpoint",
            "https://flag/",
        ])
        .resolve_all()
        .unwrap()
        .otlp;
        assert_eq!(
            otlp,
            Some(TracesEndpoint::Url("https://flag/v1/traces".into()))
        );
        assert!(
            Cli::parse_from(["kakuremichi-agent", "--otlp-endpoint", "flag:4318"])
                .resolve_all()
                .is_err()
        );
    }
}
