//! Pure certificate logic: reading a chain (names, validity, public key), checking that a key
//! belongs to it, which names a certificate covers, and when to try again (renewal at two thirds
//! of the lifetime, exponential backoff after failures, with injected jitter).

use std::time::Duration;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer as _, X509Certificate};

/// A chain or key could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// No certificate could be read.
    #[error("chain_pem: {0}")]
    Chain(String),
    /// No key could be read.
    #[error("key_pem: {0}")]
    Key(String),
    /// The key is not the certificate's.
    #[error("key_pem does not match the first certificate of chain_pem")]
    Mismatch,
}

/// What control needs to know of a chain's end-entity certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainInfo {
    /// DNS names (subject alternative names; the common name if there are none), lower case.
    pub names: Vec<String>,
    /// Validity start (unix ms).
    pub not_before_ms: i64,
    /// Expiry (unix ms).
    pub not_after_ms: i64,
    /// The subject public key info, DER.
    pub spki: Vec<u8>,
}

/// Reads the first certificate of a PEM chain.
pub fn chain_info(chain_pem: &str) -> Result<ChainInfo, CertError> {
    let mut blocks = x509_parser::pem::Pem::iter_from_buffer(chain_pem.as_bytes());
    let first = blocks
        .next()
        .ok_or_else(|| CertError::Chain("no PEM certificate found".into()))?
        .map_err(|e| CertError::Chain(e.to_string()))?;
    if first.label != "CERTIFICATE" {
        return Err(CertError::Chain(format!(
            "expected a CERTIFICATE, found {}",
            first.label
        )));
    }
    let (_, cert) =
        X509Certificate::from_der(&first.contents).map_err(|e| CertError::Chain(e.to_string()))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        for cn in cert.subject().iter_common_name() {
            if let Ok(s) = cn.as_str() {
                names.push(s.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        return Err(CertError::Chain("the certificate names no DNS name".into()));
    }
    let validity = cert.validity();
    Ok(ChainInfo {
        names,
        not_before_ms: validity.not_before.timestamp().saturating_mul(1000),
        not_after_ms: validity.not_after.timestamp().saturating_mul(1000),
        spki: cert.public_key().raw.to_vec(),
    })
}

/// Checks that `key_pem` is the private key of the chain's first certificate.
pub fn check_key(info: &ChainInfo, key_pem: &str) -> Result<(), CertError> {
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| CertError::Key(e.to_string()))?;
    if rcgen::PublicKeyData::subject_public_key_info(&key) != info.spki {
        return Err(CertError::Mismatch);
    }
    Ok(())
}

/// Whether a certificate for `names` serves `host` (a `*.` name covers one label).
pub fn covers(names: &[String], host: &str) -> bool {
    names.iter().any(|n| match n.strip_prefix("*.") {
        Some(parent) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
        None => n == host,
    })
}

/// When to renew a certificate valid from `not_before` to `not_after` (unix ms): after two thirds
/// of its lifetime.
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    let life = (not_after - not_before).max(0);
    not_before + life / 3 * 2
}

/// First retry delay after a failure.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(5);
/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(6 * 3600);

/// The delay before the next attempt after `failures` failures in a row (1 or more): doubling from
/// [`FIRST_BACKOFF`] to [`MAX_BACKOFF`], then scaled by `jitter` (in 0.5..=1.0, injected) so that
/// replicas and certificates spread out. A certificate still valid retries at the latest shortly
/// before it expires.
pub fn retry_at(now: i64, failures: u32, jitter: f64, not_after: Option<i64>) -> i64 {
    let exp = failures.saturating_sub(1).min(20);
    let base = FIRST_BACKOFF
        .saturating_mul(1u32 << exp)
        .min(MAX_BACKOFF)
        .as_millis() as f64;
    let delay = (base * jitter.clamp(0.5, 1.0)) as i64;
    let at = now + delay.max(1000);
    match not_after {
        // Leave a last chance a minute before expiry (or now, when that has passed).
        Some(end) if at > end - 60_000 => (end - 60_000).max(now + 1000).min(at),
        _ => at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem(names: &[&str]) -> (String, String) {
        let made = rcgen::generate_simple_self_signed(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .expect("rcgen");
        (made.cert.pem(), made.signing_key.serialize_pem())
    }

    #[test]
    fn a_chain_tells_its_names_and_validity_and_its_key_is_checked() {
        let (chain, key) = pem(&["App.Example.com", "*.apps.example.com"]);
        let info = chain_info(&chain).expect("parses");
        assert_eq!(info.names, vec!["app.example.com", "*.apps.example.com"]);
        assert!(info.not_after_ms > info.not_before_ms);
        check_key(&info, &key).expect("matches");
        let (_, other) = pem(&["x.example"]);
        assert_eq!(check_key(&info, &other), Err(CertError::Mismatch));
        assert!(matches!(check_key(&info, "junk"), Err(CertError::Key(_))));
        assert!(matches!(chain_info("junk"), Err(CertError::Chain(_))));
        assert!(matches!(chain_info(&key), Err(CertError::Chain(_))));
        let broken = chain.replace('M', "A");
        assert!(chain_info(&broken).is_err());
    }

    #[test]
    fn wildcards_cover_one_label() {
        let names = vec!["*.apps.example".to_owned(), "www.example".to_owned()];
        assert!(covers(&names, "a.apps.example"));
        assert!(covers(&names, "www.example"));
        assert!(!covers(&names, "apps.example"));
        assert!(!covers(&names, "a.b.apps.example"));
        assert!(!covers(&names, ".apps.example"));
        assert!(!covers(&names, "example"));
    }

    #[test]
    fn renewal_at_two_thirds_and_backoff_doubles_to_a_cap_before_expiry() {
        assert_eq!(renew_at(0, 90_000), 60_000);
        assert_eq!(renew_at(1000, 1000), 1000);
        assert_eq!(retry_at(0, 1, 1.0, None), 5_000);
        assert_eq!(retry_at(0, 2, 1.0, None), 10_000);
        assert_eq!(retry_at(0, 3, 0.5, None), 10_000);
        assert_eq!(retry_at(0, 40, 1.0, None), 6 * 3600 * 1000);
        // Jitter outside the range is clamped.
        assert_eq!(retry_at(0, 1, 7.0, None), 5_000);
        // Close to expiry: the retry comes a minute before it, not after.
        assert_eq!(retry_at(0, 10, 1.0, Some(600_000)), 540_000);
        // Past that point: soon, not in the past.
        assert_eq!(retry_at(1_000_000, 10, 1.0, Some(600_000)), 1_001_000);
    }
}
