//! Generating, hashing and checking secrets: admin API keys (`kma_<id>_<secret>`), enrollment
//! tokens (`kme_<node id>_<secret>`) and node credentials (`kmc_<secret>`). Only argon2id hashes
//! are stored. Hashing is CPU-bound, so the async helpers run it on the blocking pool.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use kakuremichi_proto::Secret;
use rand::distributions::Alphanumeric;
use rand::Rng;
use uuid::Uuid;

/// Prefix of admin API keys.
pub const ADMIN_KEY_PREFIX: &str = "kma";
/// Prefix of enrollment tokens.
pub const ENROLL_TOKEN_PREFIX: &str = "kme";
/// Prefix of node credentials.
pub const CREDENTIAL_PREFIX: &str = "kmc";

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
    let rest = secret.expose().strip_prefix(prefix)?.strip_prefix('_')?;
    let (id, random) = rest.split_once('_')?;
    if random.is_empty() || id.len() != 32 {
        return None;
    }
    Uuid::try_parse(id).ok()
}

fn hash_sync(secret: &str) -> Result<String, HashError> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| HashError(e.to_string()))
}

fn verify_sync(hash: &str, secret: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(secret.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// The argon2id hash (PHC string) of a secret.
pub async fn hash(secret: &Secret) -> Result<String, HashError> {
    let s = secret.expose().to_owned();
    tokio::task::spawn_blocking(move || hash_sync(&s))
        .await
        .map_err(|e| HashError(e.to_string()))?
}

/// Whether `secret` matches the argon2 `hash`.
pub async fn verify(hash: &str, secret: &Secret) -> bool {
    let (h, s) = (hash.to_owned(), secret.expose().to_owned());
    tokio::task::spawn_blocking(move || verify_sync(&h, &s))
        .await
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip() {
        let id = Uuid::new_v4();
        let s = new_with_id(ENROLL_TOKEN_PREFIX, id);
        assert_eq!(embedded_id(ENROLL_TOKEN_PREFIX, &s), Some(id));
        assert_eq!(embedded_id(ADMIN_KEY_PREFIX, &s), None);
        assert_eq!(embedded_id("kme", &Secret::new("kme_abc_def")), None);
        let h = hash(&s).await.unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify(&h, &s).await);
        assert!(!verify(&h, &Secret::new("nope")).await);
        assert!(!verify("garbage", &s).await);
    }
}
