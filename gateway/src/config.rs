//! Command line and config file of the gateway binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use kakuremichi_node::settings::{
    parse_secret, read_config_file, ControlArgs, ControlFile, QuicArgs, QuicFile,
};
use kakuremichi_node::NodeSettings;
use kakuremichi_proto::Secret;
use serde::Deserialize;

pub use kakuremichi_node::ConfigError;

/// The kakuremichi gateway: public HTTP reverse proxy into the WireGuard overlay.
#[derive(Debug, Parser)]
#[command(name = "kakuremichi-gateway", version, about)]
pub struct Cli {
    /// TOML file with the same settings (command line and environment win).
    #[arg(long, env = "KAKUREMICHI_GATEWAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Control's base URL, e.g. https://control.example.com (defaults to the enrolled one); plain
    /// http:// only to loopback, unless --allow-insecure-control.
    #[arg(long, env = "KAKUREMICHI_GATEWAY_CONTROL")]
    pub control: Option<String>,
    /// One-time enrollment token (first start only); see also --token-file.
    #[arg(
        long,
        env = "KAKUREMICHI_GATEWAY_TOKEN",
        hide_env_values = true,
        value_parser = parse_secret
    )]
    pub token: Option<Secret>,
    /// How to reach control: --token-file, --allow-insecure-control.
    #[command(flatten)]
    pub control_access: ControlArgs,
    /// Folder for state.json, config.json and peers.json.
    #[arg(long, env = "KAKUREMICHI_GATEWAY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Public HTTP listen address [default: 0.0.0.0:8080].
    #[arg(long, env = "KAKUREMICHI_GATEWAY_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// WireGuard UDP listen address [default: 0.0.0.0:51820].
    #[arg(long, env = "KAKUREMICHI_GATEWAY_WG_LISTEN")]
    pub wg_listen: Option<SocketAddr>,
    /// Serve Prometheus metrics at /metrics on this address.
    #[arg(long, env = "KAKUREMICHI_GATEWAY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// How long to wait for a response head from a site, e.g. 60s [default: 60s].
    #[arg(long, env = "KAKUREMICHI_GATEWAY_UPSTREAM_TIMEOUT", value_parser = parse_duration)]
    pub upstream_timeout: Option<Duration>,
    /// How long to wait for a connection to a site, e.g. 10s [default: 10s].
    #[arg(long, env = "KAKUREMICHI_GATEWAY_CONNECT_TIMEOUT", value_parser = parse_duration)]
    pub connect_timeout: Option<Duration>,
    /// QUIC sizes inside the tunnel.
    #[command(flatten)]
    pub quic: QuicArgs,
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
    http_listen: Option<SocketAddr>,
    wg_listen: Option<SocketAddr>,
    metrics_listen: Option<SocketAddr>,
    upstream_timeout: Option<String>,
    connect_timeout: Option<String>,
    #[serde(default)]
    quic: QuicFile,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Control URL, token, data dir and WireGuard listen address.
    pub node: NodeSettings,
    /// HTTP listen address.
    pub http_listen: SocketAddr,
    /// Metrics listen address.
    pub metrics_listen: Option<SocketAddr>,
    /// Response timeout.
    pub upstream_timeout: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
}

/// Parses `60`, `60s`, `500ms`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (examples: 60s, 500ms, 2m)"))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => {
            return Err(format!(
                "{s:?} is not a duration (examples: 60s, 500ms, 2m)"
            ))
        }
    };
    if d.is_zero() {
        return Err("a timeout must be greater than zero".into());
    }
    Ok(d)
}

impl Cli {
    /// Merges the command line (and environment) over the config file, applies defaults and
    /// validates.
    pub fn resolve(self) -> Result<Settings, ConfigError> {
        let file: FileConfig = read_config_file(self.config.as_deref())?;
        let file_duration = |v: Option<String>,
                             name: &str|
         -> Result<Option<Duration>, ConfigError> {
            v.map(|s| parse_duration(&s).map_err(|e| ConfigError::Invalid(format!("{name}: {e}"))))
                .transpose()
        };
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
        let data_dir = self.data_dir.or(file.data_dir).ok_or_else(|| {
            ConfigError::Invalid(
                "--data-dir is required (KAKUREMICHI_GATEWAY_DATA_DIR or data_dir in --config)"
                    .into(),
            )
        })?;
        Ok(Settings {
            node: NodeSettings {
                control: control.control,
                token: control.token,
                allow_insecure_control: control.allow_insecure_control,
                data_dir,
                wg_listen: self
                    .wg_listen
                    .or(file.wg_listen)
                    .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 51820))),
                quic: self.quic.resolve(file.quic)?,
            },
            http_listen: self
                .http_listen
                .or(file.http_listen)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080))),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            upstream_timeout: match self.upstream_timeout {
                Some(d) => d,
                None => file_duration(file.upstream_timeout, "upstream_timeout")?
                    .unwrap_or(Duration::from_secs(60)),
            },
            connect_timeout: match self.connect_timeout {
                Some(d) => d,
                None => file_duration(file.connect_timeout, "connect_timeout")?
                    .unwrap_or(Duration::from_secs(10)),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn file_and_flags_merge_and_unknown_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(
            &path,
            "control = \"http://127.0.0.1:3000\"\ndata_dir = \"/tmp/gw\"\nhttp_listen = \"127.0.0.1:9999\"\nupstream_timeout = \"5s\"\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "kakuremichi-gateway",
            "--config",
            path.to_str().unwrap(),
            "--http-listen",
            "127.0.0.1:8081",
        ]);
        let s = cli.resolve().unwrap();
        assert_eq!(s.http_listen, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(s.upstream_timeout, Duration::from_secs(5));
        assert_eq!(s.node.wg_listen, "0.0.0.0:51820".parse().unwrap());
        assert_eq!(s.node.data_dir, PathBuf::from("/tmp/gw"));

        std::fs::write(&path, "data_dir = \"/tmp\"\nlisten = \"x\"\n").unwrap();
        let err = Cli::parse_from(["kakuremichi-gateway", "--config", path.to_str().unwrap()])
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");

        let err = Cli::parse_from([
            "kakuremichi-gateway",
            "--control",
            "ftp://x",
            "--data-dir",
            "/tmp",
        ])
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("http://"), "{err}");
    }

    #[test]
    fn insecure_control_and_token_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = Cli::parse_from([
            "kakuremichi-gateway",
            "--control",
            "http://example.com",
            "--data-dir",
            "/tmp",
        ])
        .resolve()
        .unwrap_err();
        assert!(
            err.to_string().contains("--allow-insecure-control"),
            "{err}"
        );

        let token = dir.path().join("token");
        std::fs::write(&token, "\tkme_gw_secret \n").unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(
            &path,
            format!(
                "control = \"http://example.com\"\ndata_dir = \"/tmp\"\nallow_insecure_control = true\ntoken_file = {:?}\n",
                token.to_str().unwrap()
            ),
        )
        .unwrap();
        let s = Cli::parse_from(["kakuremichi-gateway", "--config", path.to_str().unwrap()])
            .resolve()
            .unwrap();
        assert!(s.node.allow_insecure_control);
        assert_eq!(
            s.node.token.as_ref().map(Secret::expose),
            Some("kme_gw_secret")
        );
        assert!(!format!("{s:?}").contains("kme_gw_secret"), "{s:?}");

        let cli = Cli::parse_from([
            "kakuremichi-gateway",
            "--data-dir",
            "/tmp",
            "--token",
            "kme_gw_inline",
            "--token-file",
            token.to_str().unwrap(),
        ]);
        assert!(!format!("{cli:?}").contains("kme_gw_inline"), "{cli:?}");
        let err = cli.resolve().unwrap_err();
        assert!(err.to_string().contains("both given"), "{err}");

        std::fs::write(&token, "").unwrap();
        let err = Cli::parse_from([
            "kakuremichi-gateway",
            "--data-dir",
            "/tmp",
            "--token-file",
            token.to_str().unwrap(),
        ])
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("is empty"), "{err}");
        assert!(err.to_string().contains(token.to_str().unwrap()), "{err}");
    }
}
