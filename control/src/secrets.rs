//! Generating, hashing and checking secrets: admin API keys (`kma_<id>_<secret>`), enrollment
//! tokens (`kme_<node id>_<secret>`) and node credentials (`kmc_<secret>`).
//!
//! These secrets carry 238 random bits (40 alphanumerics), so a slow password hash buys nothing:
//! nobody can guess one, with or without its hash. They are stored as a SHA-256 digest
//! (`sha256$<base64url>`, with a domain prefix), found by the id next to them and compared in
//! constant time. That costs a microsecond and no memory, where argon2id cost 19 MiB and tens of
//! milliseconds per check and let a crowd of hellos take control down.
//!
//! Argon2id stays for what people choose (passwords) and for hashes stored by earlier versions:
//! [`verify`] still accepts a `$argon2id$` hash, with at most [`ARGON2_IN_FLIGHT`] checks at a time,
//! and tells the caller to replace it with a digest.

use std::sync::LazyLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::Engine as _;
use kakuremichi_proto::Secret;
use rand::distributions::Alphanumeric;
use rand::Rng;
use subtle::ConstantTimeEq as _;
use tokio::sync::Semaphore;
use uuid::Uuid;

/// Prefix of admin API keys.
pub const ADMIN_KEY_PREFIX: &str = "kma";
/// Prefix of enrollment tokens.
pub const ENROLL_TOKEN_PREFIX: &str = "kme";
/// Prefix of node credentials.
pub const CREDENTIAL_PREFIX: &str = "kmc";
/// Prefix of share links' secrets.
pub const SHARE_LINK_PREFIX: &str = "kml";

/// How many argon2id computations run at once, process-wide (19 MiB each).
pub const ARGON2_IN_FLIGHT: usize = 2;

use kakuremichi_proto::identity::SECRET_DIGEST_PREFIX as DIGEST_PREFIX;

static ARGON2_PERMITS: LazyLock<Semaphore> = LazyLock::new(|| Semaphore::new(ARGON2_IN_FLIGHT));

/// Hashing failed (should not happen with valid parameters).
#[derive(Debug, thiserror::Error)]
#[error("password hashing failed: {0}")]
pub struct HashError(String);

fn random_secret() -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(40)
        .map(char::from)
        .collect()
}

/// A new secret `<prefix>_<id simple>_<random>`.
pub fn new_with_id(prefix: &str, id: Uuid) -> Secret {
    Secret::new(format!("{prefix}_{}_{}", id.simple(), random_secret()))
}

/// A new secret `<prefix>_<random>`.
pub fn new_plain(prefix: &str) -> Secret {
    Secret::new(format!("{prefix}_{}", random_secret()))
}

/// The id embedded in `<prefix>_<id simple>_<random>`, if the secret has that shape.
pub fn embedded_id(prefix: &str, secret: &Secret) -> Option<Uuid> {
    kakuremichi_proto::identity::embedded_id(prefix, secret.expose())
}

fn raw_digest(secret: &Secret) -> [u8; 32] {
    kakuremichi_proto::identity::secret_digest_bytes(secret.expose())
}

/// The stored form of a high-entropy secret: `sha256$<base64url of SHA-256(domain, secret)>`.
pub fn digest(secret: &Secret) -> String {
    kakuremichi_proto::identity::secret_digest(secret.expose())
}

/// How a secret compared with its stored hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// It matches a digest.
    Yes,
    /// It matches an argon2 hash from an earlier version: store [`digest`] in its place.
    YesUpgrade,
    /// It does not match (or the stored value is unreadable).
    No,
}

impl Verified {
    /// Whether the secret matched.
    pub fn ok(self) -> bool {
        self != Verified::No
    }
}

/// Checks `secret` against a stored digest (constant time) or a legacy argon2 hash (bounded).
pub async fn verify(stored: &str, secret: &Secret) -> Verified {
    if let Some(b64) = stored.strip_prefix(DIGEST_PREFIX) {
        let Ok(want) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(b64) else {
            return Verified::No;
        };
        return if bool::from(want.as_slice().ct_eq(&raw_digest(secret))) {
            Verified::Yes
        } else {
            Verified::No
        };
    }
    if stored.starts_with("$argon2") {
        return if verify_argon2(stored, secret).await {
            Verified::YesUpgrade
        } else {
            Verified::No
        };
    }
    Verified::No
}

fn argon2_hash_sync(secret: &str) -> Result<String, HashError> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| HashError(e.to_string()))
}

fn argon2_verify_sync(hash: &str, secret: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(secret.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// The argon2id hash (PHC string) of a low-entropy secret such as a password; at most
/// [`ARGON2_IN_FLIGHT`] run at a time, on the blocking pool.
pub async fn hash_password(password: &Secret) -> Result<String, HashError> {
    let _permit = ARGON2_PERMITS
        .acquire()
        .await
        .map_err(|e| HashError(e.to_string()))?;
    let s = password.expose().to_owned();
    tokio::task::spawn_blocking(move || argon2_hash_sync(&s))
        .await
        .map_err(|e| HashError(e.to_string()))?
}

/// Whether `password` matches the argon2 `hash`; bounded like [`hash_password`].
pub async fn verify_argon2(hash: &str, password: &Secret) -> bool {
    let Ok(_permit) = ARGON2_PERMITS.acquire().await else {
        return false;
    };
    let (h, s) = (hash.to_owned(), password.expose().to_owned());
    tokio::task::spawn_blocking(move || argon2_verify_sync(&h, &s))
        .await
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ids_digests_and_legacy_hashes() {
        let id = Uuid::new_v4();
        let s = new_with_id(ENROLL_TOKEN_PREFIX, id);
        assert_eq!(embedded_id(ENROLL_TOKEN_PREFIX, &s), Some(id));
        assert_eq!(embedded_id(ADMIN_KEY_PREFIX, &s), None);
        assert_eq!(embedded_id("kme", &Secret::new("kme_abc_def")), None);

        let d = digest(&s);
        assert!(d.starts_with("sha256$"), "{d}");
        assert!(!d.contains(s.expose()));
        assert_eq!(verify(&d, &s).await, Verified::Yes);
        assert_eq!(verify(&d, &Secret::new("nope")).await, Verified::No);
        assert_eq!(verify("sha256$!!", &s).await, Verified::No);
        assert_eq!(verify("sha256$", &s).await, Verified::No);
        assert_eq!(verify("garbage", &s).await, Verified::No);

        let legacy = hash_password(&s).await.unwrap();
        assert!(legacy.starts_with("$argon2id$"));
        assert_eq!(verify(&legacy, &s).await, Verified::YesUpgrade);
        assert_eq!(verify(&legacy, &Secret::new("nope")).await, Verified::No);
    }

    #[test]
    fn digests_differ_per_secret_and_are_stable() {
        let a = Secret::new("kmc_aaaa");
        let b = Secret::new("kmc_aaab");
        assert_eq!(digest(&a), digest(&a));
        assert_ne!(digest(&a), digest(&b));
    }
}
