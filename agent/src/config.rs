//! Command line and config file of the agent binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use kakuremichi_node::settings::{
    parse_secret, read_config_file, ControlArgs, ControlFile, QuicArgs, QuicFile,
};
use kakuremichi_node::NodeSettings;
use kakuremichi_proto::Secret;
use serde::Deserialize;

pub use kakuremichi_node::ConfigError;

/// The kakuremichi agent: publishes private apps through kakuremichi gateways.
#[derive(Debug, Parser)]
#[command(name = "kakuremichi-agent", version, about)]
pub struct Cli {
    /// TOML file with the same settings (command line and environment win).
    #[arg(long, env = "KAKUREMICHI_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Control's base URL, e.g. https://control.example.com (defaults to the enrolled one); plain
    /// http:// only to loopback, unless --allow-insecure-control.
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
    token: Option<Secret>,
    token_file: Option<PathBuf>,
    allow_insecure_control: Option<bool>,
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
        Ok(Settings {
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
        })
    }
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
}
