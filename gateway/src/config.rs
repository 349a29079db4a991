//! Command line and config file of the gateway binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ipnet::IpNet;
use kakuremichi_node::settings::{
    parse_secret, read_config_file, ControlArgs, ControlFile, QuicArgs, QuicFile,
};
use kakuremichi_node::NodeSettings;
use kakuremichi_proto::Secret;
use serde::Deserialize;

use crate::listener::ListenerLimits;

pub use kakuremichi_node::ConfigError;

/// The kakuremichi gateway: public HTTP reverse proxy into the WireGuard overlay.
#[derive(Debug, Clone, Parser)]
#[command(name = "kakuremichi-gateway", version, about)]
pub struct Cli {
    /// TOML file with the same settings (command line and environment win).
    #[arg(long, env = "KAKUREMICHI_GATEWAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Control's base URL, e.g. https://control.example.com (defaults to the enrolled one), or a
    /// comma-separated list of the URLs of several control replicas
    /// (https://c1.example.com,https://c2.example.com); plain http:// only to loopback, unless
    /// --allow-insecure-control.
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
    /// --log-format.
    #[command(flatten)]
    pub log: kakuremichi_node::settings::LogArgs,
    /// --worker-threads.
    #[command(flatten)]
    pub runtime: kakuremichi_node::settings::RuntimeArgs,
    /// --shutdown-grace.
    #[command(flatten)]
    pub shutdown: kakuremichi_node::reload::ShutdownArgs,
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
    /// How long to wait for a response head from a site once the whole request is sent, e.g.
    /// 60s [default: 60s; a resource's limits.response_timeout_ms wins].
    #[arg(long, env = "KAKUREMICHI_GATEWAY_UPSTREAM_TIMEOUT", value_parser = parse_duration)]
    pub upstream_timeout: Option<Duration>,
    /// The longest silence inside a client's request body before the request is answered 408,
    /// e.g. 60s [default: 60s; a resource's limits.idle_timeout_ms wins].
    #[arg(long, env = "KAKUREMICHI_GATEWAY_BODY_TIMEOUT", value_parser = parse_duration)]
    pub body_timeout: Option<Duration>,
    /// How long to wait for a connection to a site, e.g. 10s [default: 10s].
    #[arg(long, env = "KAKUREMICHI_GATEWAY_CONNECT_TIMEOUT", value_parser = parse_duration)]
    pub connect_timeout: Option<Duration>,
    /// QUIC sizes inside the tunnel.
    #[command(flatten)]
    pub quic: QuicArgs,
    /// Proxies in front of this gateway (comma-separated addresses or CIDRs) whose
    /// X-Forwarded-For/-Proto/-Host are believed; from anyone else they are replaced.
    #[arg(
        long,
        env = "KAKUREMICHI_GATEWAY_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Option<Vec<String>>,
    /// Time a client has to send a request head; also the longest idle keep-alive [default: 20s].
    #[arg(long, env = "KAKUREMICHI_GATEWAY_HEADER_READ_TIMEOUT", value_parser = parse_duration)]
    pub header_read_timeout: Option<Duration>,
    /// Open client connections at most [default: 20000].
    #[arg(long, env = "KAKUREMICHI_GATEWAY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Open connections from one client IPv4 address or IPv6 /64 at most [default: 512].
    #[arg(long, env = "KAKUREMICHI_GATEWAY_MAX_CONNECTIONS_PER_CLIENT")]
    pub max_connections_per_client: Option<usize>,
    /// Address the public ports of TCP resources are bound on [default: 0.0.0.0].
    #[arg(long, env = "KAKUREMICHI_GATEWAY_TCP_LISTEN_IP")]
    pub tcp_listen_ip: Option<std::net::IpAddr>,
    /// Public HTTPS listen address (HTTP/1.1 and HTTP/2 over TLS); off unless given.
    #[arg(long, env = "KAKUREMICHI_GATEWAY_HTTPS_LISTEN")]
    pub https_listen: Option<SocketAddr>,
    /// Folder of certificates for HTTPS: NAME.crt (or NAME.pem) chains with their NAME.key; the
    /// names each serves are read from the certificate (wildcards too).
    #[arg(long, env = "KAKUREMICHI_GATEWAY_TLS_CERT_DIR")]
    pub tls_cert_dir: Option<PathBuf>,
    /// Also serve HTTP/3 (QUIC) on the HTTPS port's UDP twin, advertised with Alt-Svc.
    #[arg(long, env = "KAKUREMICHI_GATEWAY_HTTP3")]
    pub http3: bool,
    /// Development: make a self-signed certificate for every published hostname no file covers.
    #[arg(long, env = "KAKUREMICHI_GATEWAY_TLS_SELF_SIGNED")]
    pub tls_self_signed: bool,
    /// Largest request head in bytes; bigger heads get 431 [default: 65536, at least 8192].
    #[arg(long, env = "KAKUREMICHI_GATEWAY_MAX_HEADER_BYTES")]
    pub max_header_bytes: Option<usize>,
    /// HTTP/3 handshakes in progress at most; past half of it a client proves its address with a
    /// stateless Retry first [default: 512].
    #[arg(long, env = "KAKUREMICHI_GATEWAY_MAX_QUIC_HANDSHAKES")]
    pub max_quic_handshakes: Option<usize>,
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
    body_timeout: Option<String>,
    connect_timeout: Option<String>,
    #[serde(default)]
    quic: QuicFile,
    trusted_proxies: Option<Vec<String>>,
    https_listen: Option<SocketAddr>,
    tcp_listen_ip: Option<std::net::IpAddr>,
    tls_cert_dir: Option<PathBuf>,
    tls_self_signed: Option<bool>,
    http3: Option<bool>,
    header_read_timeout: Option<String>,
    max_connections: Option<usize>,
    max_connections_per_client: Option<usize>,
    max_header_bytes: Option<usize>,
    max_quic_handshakes: Option<usize>,
    otlp_endpoint: Option<String>,
    shutdown_grace: Option<String>,
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
    /// Request-body progress timeout.
    pub body_timeout: Duration,
    /// Limits of the public listener.
    pub limits: ListenerLimits,
    /// Proxies whose forwarded headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// HTTPS, if on.
    pub https: Option<HttpsSettings>,
    /// Where TCP resources' public ports are bound.
    pub tcp_listen_ip: std::net::IpAddr,
    /// Where traces go (`--otlp-endpoint`), if anywhere.
    pub otlp: Option<kakuremichi_telemetry::TracesEndpoint>,
    /// How long requests in flight may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
}

/// The HTTPS listener's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsSettings {
    /// Listen address.
    pub listen: SocketAddr,
    /// Certificate folder.
    pub cert_dir: Option<PathBuf>,
    /// Self-signed development certificates for published hostnames.
    pub self_signed: bool,
    /// HTTP/3 on the same port (UDP).
    pub http3: bool,
}

/// Parses addresses (`192.0.2.1`, `2001:db8::1`) and networks (`10.0.0.0/8`).
pub fn parse_trusted_proxies(list: &[String]) -> Result<Vec<IpNet>, ConfigError> {
    list.iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    ConfigError::Invalid(format!(
                        "trusted proxies: {s:?} is not an IP address or a CIDR such as 10.0.0.0/8"
                    ))
                })
        })
        .collect()
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
        let otlp = self.log.traces(file.otlp_endpoint.as_deref())?;
        let shutdown_grace = self.shutdown.resolve(file.shutdown_grace.as_deref())?;
        Ok(Settings {
            otlp,
            shutdown_grace,
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
            body_timeout: match self.body_timeout {
                Some(d) => d,
                None => file_duration(file.body_timeout, "body_timeout")?
                    .unwrap_or(Duration::from_secs(60)),
            },
            connect_timeout: match self.connect_timeout {
                Some(d) => d,
                None => file_duration(file.connect_timeout, "connect_timeout")?
                    .unwrap_or(Duration::from_secs(10)),
            },
            limits: {
                let d = ListenerLimits::default();
                let positive = |v: Option<usize>, name: &str, default: usize| match v {
                    Some(0) => Err(ConfigError::Invalid(format!("{name} must be at least 1"))),
                    v => Ok(v.unwrap_or(default)),
                };
                let max_header_bytes = positive(
                    self.max_header_bytes.or(file.max_header_bytes),
                    "max header bytes",
                    d.max_header_bytes,
                )?;
                if max_header_bytes < 8192 {
                    return Err(ConfigError::Invalid(
                        "max header bytes must be at least 8192".into(),
                    ));
                }
                ListenerLimits {
                    header_read_timeout: match self.header_read_timeout {
                        Some(t) => t,
                        None => file_duration(file.header_read_timeout, "header_read_timeout")?
                            .unwrap_or(d.header_read_timeout),
                    },
                    max_connections: positive(
                        self.max_connections.or(file.max_connections),
                        "max connections",
                        d.max_connections,
                    )?,
                    max_connections_per_client: positive(
                        self.max_connections_per_client
                            .or(file.max_connections_per_client),
                        "max connections per client",
                        d.max_connections_per_client,
                    )?,
                    max_header_bytes,
                    max_quic_handshakes: positive(
                        self.max_quic_handshakes.or(file.max_quic_handshakes),
                        "max QUIC handshakes",
                        d.max_quic_handshakes,
                    )?,
                }
            },
            tcp_listen_ip: self
                .tcp_listen_ip
                .or(file.tcp_listen_ip)
                .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            https: {
                let cert_dir = self.tls_cert_dir.or(file.tls_cert_dir);
                let self_signed = self.tls_self_signed || file.tls_self_signed.unwrap_or(false);
                let http3 = self.http3 || file.http3.unwrap_or(false);
                match self.https_listen.or(file.https_listen) {
                    None => None,
                    Some(_) if cert_dir.is_none() && !self_signed => {
                        return Err(ConfigError::Invalid(
                            "--https-listen needs certificates: --tls-cert-dir DIR, or \
                             --tls-self-signed for development"
                                .into(),
                        ))
                    }
                    Some(listen) => Some(HttpsSettings {
                        listen,
                        cert_dir,
                        self_signed,
                        http3,
                    }),
                }
            },
            trusted_proxies: parse_trusted_proxies(
                &self
                    .trusted_proxies
                    .or(file.trusted_proxies)
                    .unwrap_or_default(),
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_limits_and_trusted_proxies() {
        let cli = Cli::parse_from([
            "kakuremichi-gateway",
            "--data-dir",
            "/tmp/gw",
            "--trusted-proxies",
            "10.0.0.0/8, 192.0.2.1",
            "--header-read-timeout",
            "2s",
            "--max-connections-per-client",
            "7",
            "--max-quic-handshakes",
            "64",
        ]);
        let s = cli.resolve().unwrap();
        assert_eq!(s.trusted_proxies.len(), 2);
        assert!(s.trusted_proxies[1].contains(&"192.0.2.1".parse::<std::net::IpAddr>().unwrap()));
        assert_eq!(s.limits.header_read_timeout, Duration::from_secs(2));
        assert_eq!(s.limits.max_connections_per_client, 7);
        assert_eq!(s.limits.max_connections, 20_000);
        assert_eq!(s.limits.max_quic_handshakes, 64);
        assert_eq!(s.body_timeout, Duration::from_secs(60));
        assert!(s.https.is_none());
        let s = Cli::parse_from([
            "kakuremichi-gateway",
            "--data-dir",
            "/tmp/gw",
            "--https-listen",
            "127.0.0.1:8443",
            "--tls-self-signed",
        ])
        .resolve()
        .unwrap();
        assert!(s.https.unwrap().self_signed);
        for bad in [
            vec!["--https-listen", "127.0.0.1:8443"],
            vec!["--trusted-proxies", "nope"],
            vec!["--max-connections", "0"],
            vec!["--max-header-bytes", "100"],
            vec!["--max-quic-handshakes", "0"],
        ] {
            let mut args = vec!["kakuremichi-gateway", "--data-dir", "/tmp/gw"];
            args.extend(bad.iter().copied());
            assert!(Cli::parse_from(args).resolve().is_err(), "{bad:?} accepted");
        }
    }

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
            "control = \"http://127.0.0.1:3000\"\ndata_dir = \"/tmp/gw\"\nhttp_listen = \"127.0.0.1:9999\"\nupstream_timeout = \"5s\"\nbody_timeout = \"7s\"\n",
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
        assert_eq!(s.body_timeout, Duration::from_secs(7));
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
