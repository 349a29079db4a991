//! Identity logic without I/O: minting session tokens, the per-address sign-in rate limit
//! (a token bucket fed with `now`), the account lockout policy, and cookie parsing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use kakuremichi_proto::identity::SessionClaims;
use std::sync::Mutex;

use crate::store::Signer;

/// Wrong passwords in a row that lock an account.
pub const LOCKOUT_AFTER: u32 = 10;
/// How long a locked account stays locked.
pub const LOCKOUT_FOR: Duration = Duration::from_secs(15 * 60);
/// Most client addresses tracked by the rate limit before the oldest are forgotten.
const MAX_TRACKED: usize = 100_000;

/// A session token could not be signed.
#[derive(Debug, thiserror::Error)]
#[error("cannot sign a session token: {0}")]
pub struct SignError(String);

/// Signs `claims` with `signer` (EdDSA, `kid` in the header).
pub fn mint(signer: &Signer, claims: &SessionClaims) -> Result<String, SignError> {
    mint_as(signer, claims, "JWT")
}

/// Signs any claims with the JOSE header type `typ` (`at+jwt` for OAuth access tokens, RFC 9068).
pub fn mint_as<C: serde::Serialize>(
    signer: &Signer,
    claims: &C,
    typ: &str,
) -> Result<String, SignError> {
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(signer.kid.clone());
    header.typ = Some(typ.into());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ed_der(&signer.pkcs8))
        .map_err(|e| SignError(e.to_string()))
}

/// The sign-in rate limit: a token bucket per client address, in this process. Control counts in
/// the store ([`crate::store::Store::take_sign_in`]), shared by every replica, and falls back to
/// this one only when the store cannot answer.
#[derive(Debug)]
pub struct SignInLimits {
    per_minute: u32,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl Default for SignInLimits {
    fn default() -> Self {
        Self::new(crate::config::DEFAULT_SIGN_IN_PER_MINUTE)
    }
}

impl SignInLimits {
    /// A limit of `per_minute` attempts per address (bursts of as many).
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute: per_minute.max(1),
            buckets: Mutex::default(),
        }
    }

    /// The limit, per minute.
    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }

    /// Takes one attempt for `ip` at `now`; `Err(wait)` when none is left.
    pub fn take(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let cap = f64::from(self.per_minute);
        let rate = cap / 60.0;
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&ip) {
            // Full buckets are the ones that cost nothing to forget.
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * rate < cap
            });
            if buckets.len() >= MAX_TRACKED {
                buckets.clear();
            }
        }
        let (tokens, at) = buckets.entry(ip).or_insert((cap, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * rate).min(cap);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / rate))
        }
    }
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limit_allows_a_burst_then_refills_with_time() {
        let limits = SignInLimits::new(6);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..6 {
            assert!(limits.take(ip, t0).is_ok());
        }
        let wait = limits.take(ip, t0).unwrap_err();
        assert!(wait <= Duration::from_secs(10) && wait > Duration::from_secs(9));
        assert!(limits.take(other, t0).is_ok(), "addresses are separate");
        assert!(limits.take(ip, t0 + Duration::from_secs(5)).is_err());
        assert!(limits.take(ip, t0 + Duration::from_secs(10)).is_ok());
        assert!(limits.take(ip, t0 + Duration::from_secs(10)).is_err());
    }

    #[test]
    fn cookies_are_found_by_exact_name() {
        let h = "a=1; kakuremichi_session=tok; kakuremichi_session_x=no";
        assert_eq!(cookie(h, "kakuremichi_session"), Some("tok"));
        assert_eq!(cookie(h, "a"), Some("1"));
        assert_eq!(cookie(h, "b"), None);
    }
}
