//! Command line and config file of the agent binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use kakuremichi_node::settings::{
    check_control_url, read_config_file, token_secret, QuicArgs, QuicFile,
};
use kakuremichi_node::NodeSettings;
use serde::Deserialize;

pub use kakuremichi_node::ConfigError;

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
    /// QUIC sizes inside the tunnel.
    #[command(flatten)]
    pub quic: QuicArgs,
}

/// The `--config` file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    control: Option<String>,
    token: Option<String>,
    data_dir: Option<PathBuf>,
    wg_listen: Option<SocketAddr>,
    #[serde(default)]
    quic: QuicFile,
}

/// Validated settings: the agent has only those every node has.
pub type Settings = NodeSettings;

impl Cli {
    /// Merges the command line (and environment) over the config file, applies defaults and
    /// validates.
    pub fn resolve(self) -> Result<Settings, ConfigError> {
        let file: FileConfig = read_config_file(self.config.as_deref())?;
        Ok(Settings {
            control: check_control_url(self.control.or(file.control))?,
            token: token_secret(self.token.or(file.token)),
            data_dir: self
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("kakuremichi-agent")),
            wg_listen: self
                .wg_listen
                .or(file.wg_listen)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            quic: self.quic.resolve(file.quic)?,
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
