//! The settings every node binary has (control URL, enrollment token, data dir, WireGuard
//! address) and the helpers both binaries use to merge their command line over a TOML file.
//!
//! The command line itself stays in each binary: flags, environment variable names, defaults
//! and the file's keys are part of each binary's interface.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use kakuremichi_proto::Secret;
use serde::de::DeserializeOwned;

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
