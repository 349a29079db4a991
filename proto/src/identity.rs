//! Identity at the edge, as control pushes it to gateways: who may reach a resource
//! ([`AccessPolicy`]), which keys sign session tokens ([`SigningKey`]), which sessions and users no
//! longer count ([`GatewayIdentity`]), and the claims of the tokens themselves ([`SessionClaims`]).
//!
//! Gateways decide every request from this and a signed token, never by asking control.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The cookie holding a resource's session token, on the resource's own hostname.
pub const SESSION_COOKIE: &str = "kakuremichi_session";
/// The cookie holding the browser's nonce that a session token is bound to.
pub const NONCE_COOKIE: &str = "kakuremichi_nonce";
/// The header carrying the signed identity assertion (a JWT) to the app.
pub const ASSERTION_HEADER: &str = "kakuremichi-jwt-assertion";
/// Paths under this prefix, on every resource hostname, belong to the gateway.
pub const GATEWAY_AUTH_PREFIX: &str = "/.kakuremichi/auth/";
/// Where the JWKS is served, by control and on every resource hostname.
pub const JWKS_PATH: &str = "/.well-known/kakuremichi/jwks.json";
/// How long a grant may take from control's redirect to the gateway's callback, in seconds.
pub const GRANT_MAX_AGE_SECS: i64 = 120;
/// Prefix of scoped API keys: `kmk_<id>_<secret>`.
pub const API_KEY_PREFIX: &str = "kmk";
/// The header that carries an API key beside `Authorization: Bearer`.
pub const API_KEY_HEADER: &str = "x-api-key";
/// What an assertion minted for an API key says in `amr`.
pub const API_KEY_AMR: &str = "api_key";

/// The prefix of [`secret_digest`]'s answer.
pub const SECRET_DIGEST_PREFIX: &str = "sha256$";
const SECRET_DIGEST_DOMAIN: &[u8] = b"kakuremichi secret v1\0";

/// SHA-256 of a high-entropy secret (an API key, a credential, a session cookie) with a domain
/// prefix: what control stores, and what gateways compare API keys with.
pub fn secret_digest_bytes(secret: &str) -> [u8; 32] {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    h.update(SECRET_DIGEST_DOMAIN);
    h.update(secret.as_bytes());
    h.finalize().into()
}

/// The stored form of a high-entropy secret: `sha256$<base64url of [`secret_digest_bytes`]>`.
pub fn secret_digest(secret: &str) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret_digest_bytes(secret));
    format!("{SECRET_DIGEST_PREFIX}{b64}")
}

/// The id inside a secret shaped `<prefix>_<id, 32 hex>_<random>`, if it has that shape.
pub fn embedded_id(prefix: &str, secret: &str) -> Option<Uuid> {
    let rest = secret.strip_prefix(prefix)?.strip_prefix('_')?;
    let (id, random) = rest.split_once('_')?;
    if random.is_empty() || id.len() != 32 {
        return None;
    }
    Uuid::try_parse(id).ok()
}

/// Who may reach an HTTP resource. A route without one is public.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessPolicy {
    /// Users allowed by e-mail address (lower case). Empty lists together mean "any signed-in
    /// user"; otherwise a user matching any list is allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// Roles allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// E-mail domains allowed (`example.com`, lower case).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub email_domains: Vec<String>,
    /// Plain identity headers sent to the app beside the signed assertion.
    #[serde(default, skip_serializing_if = "IdentityHeaders::is_default")]
    pub identity_headers: IdentityHeaders,
    /// Personal API keys (`Authorization: Bearer kmk_...` or `X-API-Key`) with the
    /// `resource:access` permission reach the resource as their user, for scripts and clients
    /// that cannot sign in with a browser; the lists above still decide which users.
    #[serde(default, skip_serializing_if = "crate::is_false")]
    pub api_keys: bool,
}

impl AccessPolicy {
    /// Whether a signed-in identity may reach the resource.
    pub fn allows(&self, email: &str, roles: &[String]) -> bool {
        if self.users.is_empty() && self.roles.is_empty() && self.email_domains.is_empty() {
            return true;
        }
        let email = email.to_ascii_lowercase();
        let domain = email.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
        self.users.contains(&email)
            || self.email_domains.iter().any(|d| d == domain)
            || self.roles.iter().any(|r| roles.contains(r))
    }
}

/// Which plain headers name the user to the app (the signed assertion is always sent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityHeaders {
    /// `Remote-User`, `Remote-Email`, `Remote-Name`, `Remote-Groups`.
    #[default]
    Remote,
    /// oauth2-proxy's `X-Forwarded-User`, `X-Forwarded-Email`, `X-Forwarded-Preferred-Username`,
    /// `X-Forwarded-Groups`.
    Oauth2Proxy,
    /// Only the signed assertion.
    None,
}

impl IdentityHeaders {
    fn is_default(&self) -> bool {
        *self == IdentityHeaders::Remote
    }

    /// Every plain identity header name of every style: a client's copies are always stripped.
    pub const ALL: &'static [&'static str] = &[
        "remote-user",
        "remote-email",
        "remote-name",
        "remote-groups",
        "x-forwarded-user",
        "x-forwarded-email",
        "x-forwarded-preferred-username",
        "x-forwarded-groups",
        ASSERTION_HEADER,
    ];
}

/// A public key that signs session tokens (Ed25519, as in a JWK: `kty` OKP, `crv` Ed25519).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningKey {
    /// The key id (`kid` of the tokens it signs).
    pub kid: String,
    /// The 32-byte public key, base64url without padding (a JWK's `x`).
    pub x: String,
}

/// What a gateway needs to decide requests to resources that need sign-in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayIdentity {
    /// The tokens' issuer (control's public URL).
    pub issuer: String,
    /// Control's sign-in page, where browsers without a session are sent.
    pub sign_in_url: String,
    /// Keys whose tokens are accepted: the current one and those still in their overlap.
    pub keys: Vec<SigningKey>,
    /// Sessions revoked before their tokens expire.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_sessions: Vec<Uuid>,
    /// Users whose tokens issued before a time no longer count (signed out everywhere), or
    /// none of whose tokens count (disabled).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_cutoffs: Vec<UserCutoff>,
    /// API keys accepted on resources that allow them, each for one hostname.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<EdgeApiKey>,
}

/// A personal API key a gateway accepts on one resource hostname, with the assertion the app
/// gets for its requests.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeApiKey {
    /// The key's id (inside the key: `kmk_<id>_<secret>`).
    pub id: Uuid,
    /// The resource hostname.
    pub host: String,
    /// The key's [`secret_digest`]: the gateway compares the key a client sends with it.
    pub digest: String,
    /// A session token (JWT) control signed for the key's user and this hostname, with
    /// `sid` = the key's id and `amr` = [`API_KEY_AMR`]: checked like any session token, and sent
    /// to the app as the assertion.
    pub assertion: String,
}

impl std::fmt::Debug for EdgeApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeApiKey")
            .field("id", &self.id)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// Tokens of `user` issued before `not_before` (unix seconds) are refused; `disabled` refuses
/// all of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserCutoff {
    /// The user.
    pub user: Uuid,
    /// Unix seconds.
    pub not_before: i64,
    /// The user is disabled.
    #[serde(default, skip_serializing_if = "crate::is_false")]
    pub disabled: bool,
}

/// The claims of a session token: a JWT signed by control (EdDSA), for one resource hostname.
///
/// It serves three purposes: the grant in the callback URL (accepted only within
/// [`GRANT_MAX_AGE_SECS`] of `iat`, and only with the nonce cookie whose SHA-256 is `nonce`),
/// the session cookie on that hostname (again only with the nonce cookie), and the assertion the
/// app receives (which the app checks against the JWKS, `aud` and `iss`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionClaims {
    /// Control's public URL.
    pub iss: String,
    /// The user's id.
    pub sub: String,
    /// The resource hostname.
    pub aud: String,
    /// Issued at (unix seconds).
    pub iat: i64,
    /// Expires at (unix seconds).
    pub exp: i64,
    /// Control's session the token belongs to.
    pub sid: String,
    /// The user's e-mail address.
    pub email: String,
    /// The user's display name.
    #[serde(default)]
    pub name: String,
    /// The user's roles (their groups, to apps).
    #[serde(default)]
    pub roles: Vec<String>,
    /// base64url(SHA-256(nonce cookie)), binding the token to one browser.
    pub nonce: String,
    /// How the user signed in (`pwd`, `otp`, `hwk`, `sso`).
    #[serde(default)]
    pub amr: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn policy_golden_and_decisions() {
        let p: AccessPolicy = serde_json::from_value(json!({
            "roles": ["admin"], "email_domains": ["example.com"], "identity_headers": "oauth2_proxy"
        }))
        .unwrap();
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!({"roles": ["admin"], "email_domains": ["example.com"],
                   "identity_headers": "oauth2_proxy"})
        );
        assert!(p.allows("Ann@Example.com", &[]));
        assert!(p.allows("bob@other.org", &["admin".into()]));
        assert!(!p.allows("bob@other.org", &["member".into()]));
        assert!(!p.allows("bob@example.com.evil", &[]));
        assert!(AccessPolicy::default().allows("anyone@x", &[]));
        assert_eq!(
            serde_json::to_value(AccessPolicy::default()).unwrap(),
            json!({})
        );
        assert!(serde_json::from_value::<AccessPolicy>(json!({"rolez": []})).is_err());
    }

    #[test]
    fn gateway_identity_golden() {
        let id = Uuid::from_u128(7);
        let g = GatewayIdentity {
            issuer: "http://127.0.0.1:3000".into(),
            sign_in_url: "http://127.0.0.1:3000/auth/sign-in".into(),
            keys: vec![SigningKey {
                kid: "k1".into(),
                x: "AAAA".into(),
            }],
            revoked_sessions: vec![id],
            user_cutoffs: vec![UserCutoff {
                user: id,
                not_before: 5,
                disabled: true,
            }],
            api_keys: vec![EdgeApiKey {
                id,
                host: "app.example".into(),
                digest: secret_digest("kmk_x"),
                assertion: "a.b.c".into(),
            }],
        };
        let v = serde_json::to_value(&g).unwrap();
        assert_eq!(
            v,
            json!({
                "issuer": "http://127.0.0.1:3000",
                "sign_in_url": "http://127.0.0.1:3000/auth/sign-in",
                "keys": [{"kid": "k1", "x": "AAAA"}],
                "revoked_sessions": ["00000000-0000-0000-0000-000000000007"],
                "user_cutoffs": [{"user": "00000000-0000-0000-0000-000000000007",
                                  "not_before": 5, "disabled": true}],
                "api_keys": [{"id": "00000000-0000-0000-0000-000000000007",
                              "host": "app.example",
                              "digest": "sha256$RjUx2u2tc_dbPhghO-un_mRE1k9THERxoyOfsqgIQv0",
                              "assertion": "a.b.c"}],
            })
        );
        assert_eq!(serde_json::from_value::<GatewayIdentity>(v).unwrap(), g);
        assert!(
            !format!("{:?}", g.api_keys[0]).contains("sha256"),
            "a digest in Debug"
        );
    }

    #[test]
    fn api_keys_are_found_by_their_id() {
        let id = Uuid::from_u128(0xabc);
        let key = format!("{API_KEY_PREFIX}_{}_secretpart", id.simple());
        assert_eq!(embedded_id(API_KEY_PREFIX, &key), Some(id));
        assert_eq!(embedded_id("kma", &key), None);
        assert_eq!(embedded_id(API_KEY_PREFIX, "kmk_nothex_x"), None);
        assert_eq!(
            embedded_id(API_KEY_PREFIX, &format!("kmk_{}_", id.simple())),
            None
        );
    }
}
