//! The settings every node binary has (control URL, enrollment token, data dir, WireGuard
//! address) and the helpers both binaries use to merge their command line over a TOML file.
//!
//! The command line itself stays in each binary: flags, environment variable names, defaults
//! and the file's keys are part of each binary's interface.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use kakuremichi_proto::Secret;
use kakuremichi_tunnel::QuicSettings;
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// The settings shared by gateways and agents, validated.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// Control URL if given (else the enrolled one).
    pub control: Option<String>,
    /// Enrollment token.
    pub token: Option<Secret>,
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
}

/// The same sizes in the `--config` file, as a `[quic]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuicFile {
    stream_window_kib: Option<u32>,
    connection_window_kib: Option<u32>,
    max_streams: Option<u32>,
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
            ..d
        };
        settings
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Ok(settings)
    }
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

/// Checks a control URL's scheme, if one was given; the URL is kept as written.
pub fn check_control_url(control: Option<String>) -> Result<Option<String>, ConfigError> {
    if let Some(url) = &control {
        crate::enroll::normalize_control_url(url)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
    }
    Ok(control)
}

/// The enrollment token, if one was given and is not blank.
pub fn token_secret(token: Option<String>) -> Option<Secret> {
    token.filter(|t| !t.trim().is_empty()).map(Secret::new)
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

    #[test]
    fn control_url_and_token_checks() {
        assert!(check_control_url(Some("ftp://x".into()))
            .unwrap_err()
            .to_string()
            .contains("http://"));
        assert_eq!(
            check_control_url(Some("http://c:3000/".into())).unwrap(),
            Some("http://c:3000/".to_owned())
        );
        assert_eq!(check_control_url(None).unwrap(), None);
        assert!(token_secret(Some("  ".into())).is_none());
        assert_eq!(
            token_secret(Some("kmt_x".into())).map(|s| s.expose().to_owned()),
            Some("kmt_x".to_owned())
        );
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
}
