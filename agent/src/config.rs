//! Command line and config file of the agent binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use kakuremichi_proto::Secret;
use serde::Deserialize;

/// The kakuremichi agent: publishes private apps through kakuremichi gateways.
#[derive(Debug, Parser)]
#[command(name = "kakuremichi-agent", version, about)]
pub struct Cli {
    /// TOML file with the same settings (command line and environment win).
    #[arg(long, env = "KAKUREMICHI_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Control's base URL, e.g. http://127.0.0.1:3000 (defaults to the enrolled one).
    #[arg(long, env = "KAKUREMICHI_AGENT_CONTROL")]
    pub control: Option<String>,
    /// One-time enrollment token (first start only).
    #[arg(long, env = "KAKUREMICHI_AGENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Folder for state.json and config.json [default: ./kakuremichi-agent].
    #[arg(long, env = "KAKUREMICHI_AGENT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// WireGuard UDP bind address; port 0 picks an ephemeral port [default: 0.0.0.0:0].
    #[arg(long, env = "KAKUREMICHI_AGENT_WG_LISTEN")]
    pub wg_listen: Option<SocketAddr>,
}

/// The `--config` file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    control: Option<String>,
    token: Option<String>,
    data_dir: Option<PathBuf>,
    wg_listen: Option<SocketAddr>,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Control URL if given (else the enrolled one).
    pub control: Option<String>,
    /// Enrollment token.
    pub token: Option<Secret>,
    /// Data dir.
    pub data_dir: PathBuf,
    /// WireGuard bind address.
    pub wg_listen: SocketAddr,
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

impl Cli {
    /// Merges the command line (and environment) over the config file, applies defaults and
    /// validates.
    pub fn resolve(self) -> Result<Settings, ConfigError> {
        let file = match &self.config {
            None => FileConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.clone(),
                    source: Box::new(source),
                })?
            }
        };
        let control = self.control.or(file.control);
        if let Some(url) = &control {
            kakuremichi_node::enroll::normalize_control_url(url)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        Ok(Settings {
            control,
            token: self
                .token
                .or(file.token)
                .filter(|t| !t.trim().is_empty())
                .map(Secret::new),
            data_dir: self
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("kakuremichi-agent")),
            wg_listen: self
                .wg_listen
                .or(file.wg_listen)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_keys() {
        let s = Cli::parse_from(["kakuremichi-agent", "--control", "http://c:3000"])
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
}
