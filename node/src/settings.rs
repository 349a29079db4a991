//! The settings every node binary has (control URL, or a comma-separated list of them for several
//! control replicas; enrollment token, data dir, WireGuard address) and the helpers both binaries use to merge their command line over a TOML file.
//!
//! The command line itself stays in each binary: flags, environment variable names, defaults
//! and the file's keys are part of each binary's interface. Flags that are the same on both
//! binaries, environment variable included, live here as `clap::Args` to flatten: the QUIC sizes
//! ([`QuicArgs`]) and how the node reaches control ([`ControlArgs`]: `--token-file`,
//! `--allow-insecure-control`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kakuremichi_proto::Secret;
use kakuremichi_tunnel::QuicSettings;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::control_url::{check_control_urls, ControlUrlError};

/// The settings shared by gateways and agents, validated.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// Control URL if given (else the enrolled one); may be a comma-separated list of the URLs of
    /// several control replicas.
    pub control: Option<String>,
    /// Enrollment token (from `--token` or `--token-file`).
    pub token: Option<Secret>,
    /// Whether plain `http://` to a control that is not on loopback is allowed
    /// (`--allow-insecure-control`); see [`crate::control_url`].
    pub allow_insecure_control: bool,
    /// Data dir.
    pub data_dir: PathBuf,
    /// WireGuard listen (gateway) or bind (agent) address.
    pub wg_listen: SocketAddr,
    /// QUIC windows and limits inside the tunnel.
    pub quic: QuicSettings,
}

/// The tunnel's QUIC sizes on the command line: the same flags and environment variables on the
/// gateway and the agent (`#[command(flatten)]`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct QuicArgs {
    /// Receive window of one stream inside the tunnel, in KiB [default: 16384, 1 Gbit/s at 100 ms].
    #[arg(long, env = "KAKUREMICHI_QUIC_STREAM_WINDOW_KIB")]
    pub quic_stream_window_kib: Option<u32>,
    /// Receive window of all streams of one peer, in KiB [default: 32768].
    #[arg(long, env = "KAKUREMICHI_QUIC_CONNECTION_WINDOW_KIB")]
    pub quic_connection_window_kib: Option<u32>,
    /// Streams a peer may have open towards this node at once; more wait, then get 503
    /// [default: 10000].
    #[arg(long, env = "KAKUREMICHI_QUIC_MAX_STREAMS")]
    pub quic_max_streams: Option<u32>,
    /// A tunnel connection that hears nothing for this long is lost and its requests fail (502),
    /// in milliseconds; the smaller of the two ends' values applies [default: 5000, 1000 to
    /// 600000].
    #[arg(long, env = "KAKUREMICHI_QUIC_IDLE_TIMEOUT_MS")]
    pub quic_idle_timeout_ms: Option<u64>,
    /// How often an idle tunnel connection is probed, in milliseconds; on agents this is also
    /// what keeps NAT mappings fresh and finds a moved one [default: 1000, below the idle
    /// timeout].
    #[arg(long, env = "KAKUREMICHI_QUIC_KEEP_ALIVE_MS")]
    pub quic_keep_alive_ms: Option<u64>,
}

/// The same sizes in the `--config` file, as a `[quic]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuicFile {
    stream_window_kib: Option<u32>,
    connection_window_kib: Option<u32>,
    max_streams: Option<u32>,
    idle_timeout_ms: Option<u64>,
    keep_alive_ms: Option<u64>,
}

impl QuicArgs {
    /// The command line over the file over the defaults, validated.
    pub fn resolve(self, file: QuicFile) -> Result<QuicSettings, ConfigError> {
        let d = QuicSettings::default();
        let kib = |v: Option<u32>, name: &str, default: u32| -> Result<u32, ConfigError> {
            match v {
                None => Ok(default),
                Some(k) => k
                    .checked_mul(1024)
                    .ok_or_else(|| ConfigError::Invalid(format!("{name}: {k} KiB is too large"))),
            }
        };
        let settings = QuicSettings {
            stream_window: kib(
                self.quic_stream_window_kib.or(file.stream_window_kib),
                "quic stream window",
                d.stream_window,
            )?,
            connection_window: kib(
                self.quic_connection_window_kib
                    .or(file.connection_window_kib),
                "quic connection window",
                d.connection_window,
            )?,
            max_streams: self
                .quic_max_streams
                .or(file.max_streams)
                .unwrap_or(d.max_streams),
            idle_timeout: self
                .quic_idle_timeout_ms
                .or(file.idle_timeout_ms)
                .map_or(d.idle_timeout, Duration::from_millis),
            keep_alive: self
                .quic_keep_alive_ms
                .or(file.keep_alive_ms)
                .map_or(d.keep_alive, Duration::from_millis),
            ..d
        };
        if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&settings.idle_timeout) {
            return Err(ConfigError::Invalid(format!(
                "quic idle timeout: {} ms is outside 1000 to 600000",
                settings.idle_timeout.as_millis()
            )));
        }
        settings
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Ok(settings)
    }
}

/// How the node reaches control, on the command line: the flags both binaries share, with the same
/// environment variables (`#[command(flatten)]`). `--control` and `--token` stay in each binary,
/// as their environment variables name it; [`ControlArgs::resolve`] takes them.
/// How the binary logs: human-readable lines or one JSON object a line, for log shippers
/// (`--log-format`, `KAKUREMICHI_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object a line: timestamp, level, target, message, fields and spans.
    Json,
}

/// The logging flags of both binaries (`#[command(flatten)]`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogArgs {
    /// Log lines as text or as JSON objects (the filter is RUST_LOG, default info).
    #[arg(long, env = "KAKUREMICHI_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Export traces over OTLP/HTTP (protobuf) to this collector, e.g. http://127.0.0.1:4318
    /// (/v1/traces is appended). Without it (nor the standard OTEL_EXPORTER_OTLP_ENDPOINT),
    /// nothing is exported.
    #[arg(long, env = "KAKUREMICHI_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

impl LogArgs {
    /// Where traces go: `--otlp-endpoint` (or `otlp_endpoint` from the `--config` file, given here),
    /// else the standard `OTEL_EXPORTER_OTLP_*ENDPOINT` variables, else nowhere.
    pub fn traces(
        &self,
        file: Option<&str>,
    ) -> Result<Option<kakuremichi_telemetry::TracesEndpoint>, ConfigError> {
        kakuremichi_telemetry::traces_endpoint(self.otlp_endpoint.as_deref().or(file))
            .map_err(|e| ConfigError::Invalid(e.to_string()))
    }
}

/// The runtime's size on both binaries (`#[command(flatten)]`). Only on the command line or in
/// the environment: the runtime starts before the `--config` file is read.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RuntimeArgs {
    /// Threads that run the node's tasks [default: half the CPUs, at least 1]. The other half is
    /// left to the kernel's network stack, which does a large part of the work of every
    /// request, and to the apps next to an agent. One thread is also the cheapest per request:
    /// no task moves between threads and the tunnel is never locked by two at once.
    #[arg(long, env = "KAKUREMICHI_WORKER_THREADS")]
    pub worker_threads: Option<std::num::NonZeroUsize>,
}

impl RuntimeArgs {
    /// The number of worker threads to start.
    pub fn worker_threads(&self) -> usize {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        worker_threads(self.worker_threads, cpus)
    }
}

/// `asked` threads, else half of `cpus` (at least one).
fn worker_threads(asked: Option<std::num::NonZeroUsize>, cpus: usize) -> usize {
    asked.map_or((cpus / 2).max(1), std::num::NonZeroUsize::get)
}

#[derive(Debug, Clone, Default, clap::Args)]
pub struct ControlArgs {
    /// Read the one-time enrollment token from this file (trimmed) instead of --token, so it stays
    /// out of the command line and the environment.
    #[arg(long, env = "KAKUREMICHI_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Allow a plain http:// control URL whose host is not loopback. The enrollment token and the
    /// node credential then travel in clear text: for a lab only.
    #[arg(
        long,
        env = "KAKUREMICHI_ALLOW_INSECURE_CONTROL",
        value_parser = parse_switch
    )]
    pub allow_insecure_control: bool,
}

/// The same settings as the `--config` file gives them: top-level keys `control`, `token`,
/// `token_file` and `allow_insecure_control` of each binary's file, which copies them here.
#[derive(Debug, Clone, Default)]
pub struct ControlFile {
    /// `control` (one URL, or several separated by commas).
    pub control: Option<String>,
    /// `token`.
    pub token: Option<Secret>,
    /// `token_file`.
    pub token_file: Option<PathBuf>,
    /// `allow_insecure_control`.
    pub allow_insecure_control: Option<bool>,
}

/// Where control is and how to enroll with it, validated.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    /// The control URL, if given (else the enrolled one is used, and checked at start): one URL
    /// or a comma-separated list of them (control replicas), as written.
    pub control: Option<String>,
    /// The enrollment token, if given.
    pub token: Option<Secret>,
    /// Plain `http://` to a host that is not loopback is allowed.
    pub allow_insecure_control: bool,
}

impl ControlArgs {
    /// The command line (`control` and `token` are the binary's own `--control` and `--token`)
    /// over the file, validated: each control URL of the comma-separated list (one or more) must be
    /// HTTPS unless it is on loopback or insecure control is allowed (by the flag, its environment
    /// variable or the file), and the token
    /// comes from `--token` or `--token-file`, never both. The command line wins over the file for
    /// the token as a whole: `--token-file` there overrides `token` in the file.
    pub fn resolve(
        self,
        control: Option<String>,
        token: Option<Secret>,
        file: ControlFile,
    ) -> Result<ControlSettings, ConfigError> {
        let allow_insecure_control =
            self.allow_insecure_control || file.allow_insecure_control.unwrap_or(false);
        let control = control.or(file.control);
        if let Some(url) = &control {
            check_control_urls(url, allow_insecure_control)?;
        }
        let token = match enrollment_token(token, self.token_file, "--token and --token-file")? {
            Some(token) => Some(token),
            None => enrollment_token(
                file.token,
                file.token_file,
                "token and token_file in the --config file",
            )?,
        };
        Ok(ControlSettings {
            control,
            token,
            allow_insecure_control,
        })
    }
}

/// The token of one layer (command line or file): given inline or read from a file, not both.
fn enrollment_token(
    token: Option<Secret>,
    file: Option<PathBuf>,
    both: &'static str,
) -> Result<Option<Secret>, ConfigError> {
    let token = token.filter(|t| !t.expose().trim().is_empty());
    match (token, file) {
        (Some(_), Some(_)) => Err(ConfigError::TokenTwice(both)),
        (Some(token), None) => Ok(Some(token)),
        (None, Some(path)) => read_token_file(&path).map(Some),
        (None, None) => Ok(None),
    }
}

/// Reads an enrollment token file: its contents, trimmed; unreadable or blank is an error naming
/// the file (never its contents).
pub fn read_token_file(path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::TokenFile {
        path: path.to_owned(),
        error,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(ConfigError::EmptyTokenFile {
            path: path.to_owned(),
        });
    }
    Ok(Secret::new(token))
}

/// Parses the value of an on/off switch from its environment variable (`--flag` alone is `true`):
/// `1`, `true`, `yes`, `on` (any case) or `0`, `false`, `no`, `off` and empty; anything else is an
/// error rather than a guess, as these switches loosen security.
pub fn parse_switch(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "" | "0" | "false" | "no" | "off" => Ok(false),
        _ => Err("expected true or false (or 1/0, yes/no, on/off)".to_owned()),
    }
}

/// Parses a secret flag (`--token`) straight into a [`Secret`], so that no `String` copy of it
/// sits in a `Debug`-printable command line.
pub fn parse_secret(s: &str) -> Result<Secret, std::convert::Infallible> {
    Ok(Secret::new(s))
}

/// The settings are invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this binary.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: Box<toml::de::Error>,
    },
    /// A value is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The control URL is unusable or would carry credentials in clear text.
    #[error(transparent)]
    ControlUrl(#[from] ControlUrlError),
    /// The token was given inline and as a file.
    #[error("{0} are both given: use one (--token-file keeps the token out of the command line and the environment)")]
    TokenTwice(&'static str),
    /// The token file could not be read.
    #[error("cannot read the token file {path}: {error}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// The cause (shown in the message, not chained, so it is printed once).
        error: std::io::Error,
    },
    /// The token file holds nothing but white space.
    #[error("the token file {path} is empty: put the enrollment token in it")]
    EmptyTokenFile {
        /// The file.
        path: PathBuf,
    },
}

/// Reads the `--config` TOML file, or the defaults (all unset) without one.
pub fn read_config_file<T: DeserializeOwned + Default>(
    path: Option<&Path>,
) -> Result<T, ConfigError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct File {
        control: Option<String>,
    }

    #[test]
    fn worker_threads_are_half_the_cpus_unless_asked() {
        use std::num::NonZeroUsize;
        assert_eq!(worker_threads(None, 1), 1);
        assert_eq!(worker_threads(None, 2), 1);
        assert_eq!(worker_threads(None, 3), 1);
        assert_eq!(worker_threads(None, 16), 8);
        assert_eq!(worker_threads(NonZeroUsize::new(3), 2), 3);
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            runtime: RuntimeArgs,
        }
        let cli = Cli::try_parse_from(["node", "--worker-threads", "4"]).unwrap();
        assert_eq!(cli.runtime.worker_threads(), 4);
        assert!(Cli::try_parse_from(["node", "--worker-threads", "0"]).is_err());
    }

    #[test]
    fn config_file_is_optional_and_strict() {
        assert_eq!(read_config_file::<File>(None).unwrap(), File::default());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml");
        std::fs::write(&path, "control = \"http://c\"\n").unwrap();
        let file: File = read_config_file(Some(&path)).unwrap();
        assert_eq!(file.control.as_deref(), Some("http://c"));
        std::fs::write(&path, "bogus = 1\n").unwrap();
        let err = read_config_file::<File>(Some(&path)).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let err = read_config_file::<File>(Some(&dir.path().join("missing.toml"))).unwrap_err();
        assert!(err.to_string().starts_with("cannot read"), "{err}");
    }

    fn resolve(
        args: ControlArgs,
        control: Option<&str>,
        token: Option<&str>,
        file: ControlFile,
    ) -> Result<ControlSettings, ConfigError> {
        args.resolve(control.map(Into::into), token.map(Secret::new), file)
    }

    #[test]
    fn control_url_is_checked_and_kept_as_written() {
        let ok = resolve(
            ControlArgs::default(),
            Some("http://127.0.0.1:3000/"),
            None,
            ControlFile::default(),
        )
        .unwrap();
        assert_eq!(ok.control.as_deref(), Some("http://127.0.0.1:3000/"));
        assert!(!ok.allow_insecure_control);
        let none = resolve(ControlArgs::default(), None, None, ControlFile::default()).unwrap();
        assert_eq!(none.control, None);
        let err = resolve(
            ControlArgs::default(),
            Some("ftp://x"),
            None,
            ControlFile::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("http://"), "{err}");
        let err = resolve(
            ControlArgs::default(),
            Some("not a url"),
            None,
            ControlFile::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("is not a valid URL"), "{err}");
    }

    #[test]
    fn a_list_of_control_urls_is_checked_url_by_url() {
        let list = "https://c1.example.com/, http://127.0.0.1:3000";
        let ok = resolve(
            ControlArgs::default(),
            Some(list),
            None,
            ControlFile::default(),
        )
        .unwrap();
        assert_eq!(ok.control.as_deref(), Some(list));
        // From the file too.
        let file = ControlFile {
            control: Some("https://c1.example.com,https://c2.example.com".into()),
            ..Default::default()
        };
        assert!(resolve(ControlArgs::default(), None, None, file).is_ok());
        let err = resolve(
            ControlArgs::default(),
            Some("https://c1.example.com,http://c2.example.com:3000"),
            None,
            ControlFile::default(),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("control URL http://c2.example.com:3000 is not HTTPS"),
            "{err}"
        );
        let err = resolve(
            ControlArgs::default(),
            Some(" , "),
            None,
            ControlFile::default(),
        )
        .unwrap_err();
        assert!(
            matches!(err, ConfigError::ControlUrl(ControlUrlError::Empty { .. })),
            "{err}"
        );
    }

    #[test]
    fn insecure_control_is_refused_unless_allowed_by_flag_or_file() {
        let lab = Some("http://10.0.0.1:3000");
        let err = resolve(ControlArgs::default(), lab, None, ControlFile::default()).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::ControlUrl(ControlUrlError::Insecure { .. })
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("--allow-insecure-control"),
            "{err}"
        );
        // The URL from the file is checked the same way.
        let file = ControlFile {
            control: lab.map(Into::into),
            ..Default::default()
        };
        assert!(resolve(ControlArgs::default(), None, None, file).is_err());

        let flag = ControlArgs {
            allow_insecure_control: true,
            ..Default::default()
        };
        assert!(
            resolve(flag, lab, None, ControlFile::default())
                .unwrap()
                .allow_insecure_control
        );
        let file = ControlFile {
            allow_insecure_control: Some(true),
            ..Default::default()
        };
        let s = resolve(ControlArgs::default(), lab, None, file).unwrap();
        assert!(s.allow_insecure_control);
        assert_eq!(s.control.as_deref(), lab);
        let file = ControlFile {
            allow_insecure_control: Some(false),
            ..Default::default()
        };
        assert!(resolve(ControlArgs::default(), lab, None, file).is_err());
    }

    #[test]
    fn token_inline_or_from_a_file_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  kme_from_file\n\n").unwrap();
        let args = ControlArgs {
            token_file: Some(path.clone()),
            ..Default::default()
        };
        let s = resolve(args, None, None, ControlFile::default()).unwrap();
        assert_eq!(s.token.as_ref().map(Secret::expose), Some("kme_from_file"));
        assert!(!format!("{s:?}").contains("kme_from_file"), "{s:?}");

        let s = resolve(
            ControlArgs::default(),
            None,
            Some("kme_inline"),
            ControlFile::default(),
        )
        .unwrap();
        assert_eq!(s.token.as_ref().map(Secret::expose), Some("kme_inline"));
        // A blank --token is no token (and does not clash with a token file).
        let s = resolve(
            ControlArgs::default(),
            None,
            Some("  "),
            ControlFile::default(),
        )
        .unwrap();
        assert!(s.token.is_none());
        let args = ControlArgs {
            token_file: Some(path.clone()),
            ..Default::default()
        };
        let s = resolve(args, None, Some(""), ControlFile::default()).unwrap();
        assert_eq!(s.token.as_ref().map(Secret::expose), Some("kme_from_file"));

        // The file's token_file, and the command line over the file.
        let file = ControlFile {
            token_file: Some(path.clone()),
            ..Default::default()
        };
        let s = resolve(ControlArgs::default(), None, None, file.clone()).unwrap();
        assert_eq!(s.token.as_ref().map(Secret::expose), Some("kme_from_file"));
        let s = resolve(ControlArgs::default(), None, Some("kme_inline"), file).unwrap();
        assert_eq!(s.token.as_ref().map(Secret::expose), Some("kme_inline"));
        let file = ControlFile {
            token: Some(Secret::new("kme_in_toml")),
            ..Default::default()
        };
        let args = ControlArgs {
            token_file: Some(path),
            ..Default::default()
        };
        let s = resolve(args, None, None, file).unwrap();
        assert_eq!(s.token.as_ref().map(Secret::expose), Some("kme_from_file"));
    }

    #[test]
    fn token_twice_or_a_bad_token_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "kme_from_file").unwrap();
        let args = ControlArgs {
            token_file: Some(path.clone()),
            ..Default::default()
        };
        let err = resolve(args, None, Some("kme_inline"), ControlFile::default()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--token and --token-file are both given"),
            "{err}"
        );
        assert!(!err.to_string().contains("kme_"), "{err}");
        let file = ControlFile {
            token: Some(Secret::new("kme_in_toml")),
            token_file: Some(path),
            ..Default::default()
        };
        let err = resolve(ControlArgs::default(), None, None, file).unwrap_err();
        assert!(
            err.to_string()
                .contains("token and token_file in the --config file"),
            "{err}"
        );

        let missing = dir.path().join("missing");
        let args = ControlArgs {
            token_file: Some(missing.clone()),
            ..Default::default()
        };
        let err = resolve(args, None, None, ControlFile::default()).unwrap_err();
        assert!(matches!(err, ConfigError::TokenFile { .. }), "{err}");
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );

        let empty = dir.path().join("empty");
        std::fs::write(&empty, " \n\t\n").unwrap();
        let args = ControlArgs {
            token_file: Some(empty.clone()),
            ..Default::default()
        };
        let err = resolve(args, None, None, ControlFile::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "the token file {} is empty: put the enrollment token in it",
                empty.display()
            )
        );
        // A folder is unreadable as a token file.
        let err = read_token_file(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("cannot read the token file"),
            "{err}"
        );
    }

    #[test]
    fn switches_parse_strictly() {
        for on in ["1", "true", "TRUE", "yes", "on"] {
            assert_eq!(parse_switch(on), Ok(true), "{on}");
        }
        for off in ["", " ", "0", "false", "No", "off"] {
            assert_eq!(parse_switch(off), Ok(false), "{off:?}");
        }
        assert!(parse_switch("flase").is_err());
    }

    #[test]
    fn secret_flags_parse_into_secrets() {
        let s = parse_secret("kme_x").unwrap();
        assert_eq!(s.expose(), "kme_x");
        assert!(!format!("{s:?}").contains("kme_x"));
    }
}

#[cfg(test)]
mod quic_tests {
    use super::*;

    #[test]
    fn quic_sizes_merge_flags_over_file_and_are_validated() {
        let file: QuicFile = toml::from_str("stream_window_kib = 1024\nmax_streams = 50").unwrap();
        let args = QuicArgs {
            quic_max_streams: Some(100),
            ..Default::default()
        };
        let s = args.resolve(file).unwrap();
        assert_eq!(s.stream_window, 1024 * 1024);
        assert_eq!(s.max_streams, 100);
        assert_eq!(
            s.connection_window,
            QuicSettings::default().connection_window
        );
        let tiny = QuicArgs {
            quic_stream_window_kib: Some(1),
            ..Default::default()
        };
        assert!(matches!(
            tiny.resolve(QuicFile::default()),
            Err(ConfigError::Invalid(_))
        ));
        assert!(toml::from_str::<QuicFile>("stream_window = 1").is_err());
    }

    #[test]
    fn quic_timers_come_from_flags_or_the_file_and_keep_alive_stays_below_idle() {
        let file: QuicFile =
            toml::from_str("idle_timeout_ms = 15000\nkeep_alive_ms = 3000").unwrap();
        let s = QuicArgs::default().resolve(file.clone()).unwrap();
        assert_eq!(s.idle_timeout, Duration::from_secs(15));
        assert_eq!(s.keep_alive, Duration::from_secs(3));
        let flags = QuicArgs {
            quic_idle_timeout_ms: Some(2500),
            quic_keep_alive_ms: Some(500),
            ..Default::default()
        };
        let s = flags.resolve(file).unwrap();
        assert_eq!(s.idle_timeout, Duration::from_millis(2500));
        assert_eq!(s.keep_alive, Duration::from_millis(500));
        for (idle, keep_alive) in [(Some(3000), Some(3000)), (Some(500), None), (None, Some(0))] {
            let bad = QuicArgs {
                quic_idle_timeout_ms: idle,
                quic_keep_alive_ms: keep_alive,
                ..Default::default()
            };
            let err = bad.resolve(QuicFile::default()).unwrap_err();
            assert!(
                matches!(err, ConfigError::Invalid(_)),
                "{idle:?} {keep_alive:?}"
            );
        }
        assert_eq!(
            QuicArgs::default().resolve(QuicFile::default()).unwrap(),
            QuicSettings::default()
        );
    }
}
