//! Secrets at rest: what control must keep but a copy of the database must not reveal (certificate
//! private keys, the ACME account key) is sealed with ChaCha20-Poly1305 under a 32-byte key that
//! lives outside the database (`--secrets-key-file`).
//!
//! A sealed value is `v1.<base64url(nonce || ciphertext || tag)>` with a random 96-bit nonce; the
//! row's purpose is bound in as associated data, so a value moved to another column does not open.

use std::path::Path;

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

const PREFIX: &str = "v1.";

/// Sealing or opening failed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The key file could not be read, written or parsed.
    #[error("secrets key file {path}: {message}")]
    KeyFile {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// A sealed value was not made with this key (or was altered).
    #[error("a sealed value does not open with this secrets key")]
    Open,
    /// The system random source failed.
    #[error("no randomness available")]
    Random,
}

/// Seals and opens values with one key. Its `Debug` shows nothing of the key.
pub struct Sealer {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(***)")
    }
}

impl Sealer {
    /// A sealer with these 32 key bytes.
    pub fn new(key: [u8; 32]) -> Sealer {
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &key)
            .unwrap_or_else(|_| unreachable!("a 32-byte key always fits ChaCha20-Poly1305"));
        Sealer {
            key: LessSafeKey::new(unbound),
            rng: SystemRandom::new(),
        }
    }

    /// Reads the key (base64 of 32 bytes) from `path`; if the file does not exist and `create`,
    /// makes a new random key there, readable by its owner only.
    pub fn from_file(path: &Path, create: bool) -> Result<Sealer, SealError> {
        let err = |message: String| SealError::KeyFile {
            path: path.display().to_string(),
            message,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(text.trim())
                    .map_err(|_| err("not base64".into()))?;
                let key: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| err("expected 32 bytes of key in base64".into()))?;
                Ok(Sealer::new(key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let mut key = [0u8; 32];
                SystemRandom::new()
                    .fill(&mut key)
                    .map_err(|_| SealError::Random)?;
                write_private(path, &base64::engine::general_purpose::STANDARD.encode(key))
                    .map_err(|e| err(e.to_string()))?;
                tracing::info!(path = %path.display(), "made a new secrets key");
                Ok(Sealer::new(key))
            }
            Err(e) => Err(err(e.to_string())),
        }
    }

    /// Seals `plain` for `purpose`.
    pub fn seal(&self, purpose: &str, plain: &[u8]) -> Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| SealError::Random)?;
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(purpose.as_bytes()),
                &mut buf,
            )
            .map_err(|_| SealError::Random)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(out)
        ))
    }

    /// Opens a value sealed for `purpose`.
    pub fn open(&self, purpose: &str, sealed: &str) -> Result<Vec<u8>, SealError> {
        let body = sealed.strip_prefix(PREFIX).ok_or(SealError::Open)?;
        let mut bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| SealError::Open)?;
        if bytes.len() < NONCE_LEN {
            return Err(SealError::Open);
        }
        let mut ciphertext = bytes.split_off(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(&bytes).map_err(|_| SealError::Open)?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(purpose.as_bytes()), &mut ciphertext)
            .map_err(|_| SealError::Open)?;
        Ok(plain.to_vec())
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_purpose() {
        let a = Sealer::new([7; 32]);
        let sealed = a
            .seal("certificate key", b"-----BEGIN PRIVATE KEY-----")
            .expect("seal");
        assert!(sealed.starts_with("v1."));
        assert!(!sealed.contains("PRIVATE"));
        assert_eq!(
            a.open("certificate key", &sealed).expect("open"),
            b"-----BEGIN PRIVATE KEY-----"
        );
        // Another nonce each time.
        assert_ne!(
            sealed,
            a.seal("certificate key", b"-----BEGIN PRIVATE KEY-----")
                .expect("seal")
        );
        assert!(matches!(
            a.open("acme account", &sealed),
            Err(SealError::Open)
        ));
        assert!(matches!(
            Sealer::new([8; 32]).open("certificate key", &sealed),
            Err(SealError::Open)
        ));
        let mut tampered = sealed.clone();
        tampered.pop();
        assert!(a.open("certificate key", &tampered).is_err());
        assert!(a.open("certificate key", "v1.").is_err());
        assert!(a.open("certificate key", "plain text").is_err());
    }

    #[test]
    fn a_key_file_is_made_once_private_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secrets.key");
        assert!(Sealer::from_file(&path, false).is_err());
        let made = Sealer::from_file(&path, true).expect("made");
        let sealed = made.seal("p", b"x").expect("seal");
        let again = Sealer::from_file(&path, true).expect("read");
        assert_eq!(again.open("p", &sealed).expect("open"), b"x");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o077, 0, "{mode:o}");
        }
        std::fs::write(&path, "short").expect("write");
        let e = Sealer::from_file(&path, false).unwrap_err();
        assert!(e.to_string().contains("secrets key file"), "{e}");
        assert_eq!(format!("{made:?}"), "Sealer(***)");
    }
}
