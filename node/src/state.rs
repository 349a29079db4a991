//! The node's on-disk state: `state.json` (identity and WireGuard private key, mode 0600) and
//! `config.json` (the last applied config snapshot). Both are written atomically: a temporary file
//! in the same folder, fsync, then rename.

use std::fmt;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use kakuremichi_proto::{ConfigSnapshot, NodeKind, Secret, WgPublicKey};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// File name of the node state in the data dir.
pub const STATE_FILE: &str = "state.json";
/// File name of the config cache in the data dir.
pub const CONFIG_FILE: &str = "config.json";

/// Reading or writing a file of the data dir failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file exists but is not what this build expects.
    #[error("{path} is corrupt: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
}

/// A WireGuard private key. Its `Debug` prints a mask; on disk it is base64.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey(pub [u8; 32]);

impl PrivateKey {
    /// The matching public key.
    pub fn public_key(&self) -> WgPublicKey {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        WgPublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }

    /// A fresh random key.
    pub fn generate() -> Self {
        use rand::RngCore as _;
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        // Clamp as X25519 does, so the stored form is canonical.
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        Self(bytes)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(***)")
    }
}

impl Serialize for PrivateKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl<'de> Deserialize<'de> for PrivateKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(serde::de::Error::custom)?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom("private key must be 32 bytes"))?;
        Ok(Self(arr))
    }
}

/// Who this node is, as enrolled: kept in `<data-dir>/state.json` (mode 0600).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeState {
    /// The node's id (the site's or gateway's id in the API).
    pub node_id: Uuid,
    /// Gateway or agent.
    pub kind: NodeKind,
    /// Credential for the control channel hello.
    pub credential: Secret,
    /// The WireGuard private key; never leaves the node.
    pub private_key: PrivateKey,
    /// The control URL the node enrolled with.
    pub control_url: String,
    /// The overlay address given at enrollment (the snapshot's address wins when they differ).
    #[serde(default)]
    pub overlay_address: Option<Ipv4Addr>,
}

impl NodeState {
    /// Path of the state file in `data_dir`.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(STATE_FILE)
    }

    /// Loads the state, or `None` if the node never enrolled.
    pub fn load(data_dir: &Path) -> Result<Option<Self>, StateError> {
        read_json(&Self::path(data_dir))
    }

    /// Saves the state atomically with mode 0600.
    pub fn save(&self, data_dir: &Path) -> Result<(), StateError> {
        let path = Self::path(data_dir);
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| StateError::Corrupt {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &bytes)
    }
}

/// The last applied config snapshot, kept in `<data-dir>/config.json`.
#[derive(Debug, Clone)]
pub struct ConfigCache {
    path: PathBuf,
}

impl ConfigCache {
    /// The cache in `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            path: data_dir.join(CONFIG_FILE),
        }
    }

    /// The cache file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cached snapshot, if any.
    pub fn load(&self) -> Result<Option<ConfigSnapshot>, StateError> {
        read_json(&self.path)
    }

    /// Replaces the cached snapshot atomically.
    pub fn store(&self, snapshot: &ConfigSnapshot) -> Result<(), StateError> {
        let bytes = serde_json::to_vec_pretty(snapshot).map_err(|source| StateError::Corrupt {
            path: self.path.clone(),
            source,
        })?;
        write_atomic(&self.path, &bytes)
    }
}

/// Reads a JSON file; a missing file is `None`.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| StateError::Corrupt {
            path: path.to_owned(),
            source,
        })
}

/// Creates `dir` (and parents) if missing, mode 0700 for new folders.
pub fn ensure_dir(dir: &Path) -> Result<(), StateError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| StateError::Io {
        path: dir.to_owned(),
        source,
    })
}

/// Writes `bytes` to `path` atomically (temporary file in the same folder, fsync, rename), with
/// mode 0600. Readers see the old or the new content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let io_err = |source| StateError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    ensure_dir(&dir)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(
        ".{file_name}.tmp-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kakuremichi_proto::OverlayConfig;

    fn state() -> NodeState {
        NodeState {
            node_id: Uuid::from_u128(7),
            kind: NodeKind::Agent,
            credential: Secret::new("kmn_very_secret"),
            private_key: PrivateKey([9; 32]),
            control_url: "http://127.0.0.1:3000".into(),
            overlay_address: Some(Ipv4Addr::new(100, 64, 0, 2)),
        }
    }

    #[test]
    fn state_roundtrip_and_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(NodeState::load(dir.path()).unwrap(), None);
        state().save(dir.path()).unwrap();
        assert_eq!(NodeState::load(dir.path()).unwrap(), Some(state()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(NodeState::path(dir.path()))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Overwrite leaves no temp files behind.
        state().save(dir.path()).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(STATE_FILE)]);
    }

    #[test]
    fn secrets_are_masked_in_debug() {
        let s = format!("{:?}", state());
        assert!(!s.contains("kmn_very_secret"));
        assert!(
            !s.contains("CQkJ"),
            "base64 of the key must not appear: {s}"
        );
    }

    #[test]
    fn corrupt_state_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(NodeState::path(dir.path()), b"{nope").unwrap();
        let err = NodeState::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("state.json is corrupt"), "{err}");
    }

    #[test]
    fn config_cache_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ConfigCache::new(&dir.path().join("sub"));
        assert_eq!(cache.load().unwrap(), None);
        let snap = ConfigSnapshot {
            sessions: Vec::new(),
            sessions_endpoint: None,
            version: 3,
            node_id: Uuid::from_u128(1),
            kind: NodeKind::Gateway,
            overlay: OverlayConfig {
                address: Ipv4Addr::new(100, 64, 0, 1),
                prefix_len: 10,
                mtu: 1420,
            },
            peers: vec![],
            routes: vec![],
            targets: vec![],
            certificates: vec![],
            acme_challenges: vec![],
            identity: None,
        };
        cache.store(&snap).unwrap();
        assert_eq!(cache.load().unwrap(), Some(snap));
    }

    #[test]
    fn public_key_matches_x25519() {
        let k = PrivateKey::generate();
        let again = PrivateKey(k.0);
        assert_eq!(k.public_key(), again.public_key());
        assert_ne!(k.public_key().0, [0; 32]);
    }
}
