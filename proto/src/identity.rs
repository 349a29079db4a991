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
            })
        );
        assert_eq!(serde_json::from_value::<GatewayIdentity>(v).unwrap(), g);
    }
}
