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
/// What an assertion minted for an organization service key says in `amr` (its `sub` is the
/// key's id, its `name` the key's name, its `email` empty).
pub const SERVICE_KEY_AMR: &str = "service_key";
/// What a session token opened by a share link says in `amr` (its `sub` and `sid` are the
/// link's id, its `name` the link's name, its `email` empty).
pub const SHARE_LINK_AMR: &str = "share_link";
/// What a session token opened with a resource's password says in `amr` (its `sub` is the
/// resource's id, its `sid` the password's id, its `email` empty).
pub const PASSWORD_AMR: &str = "resource_password";
/// As [`PASSWORD_AMR`], for a resource's PIN.
pub const PIN_AMR: &str = "resource_pin";
/// What a session token opened with a one-time code sent by e-mail says in `amr` (its `email`
/// is the address the code went to; the policy's [`AccessPolicy::email_codes`] must still match
/// it).
pub const EMAIL_CODE_AMR: &str = "email_code";
/// The header naming a service key's id, beside [`CLIENT_SECRET_HEADER`].
pub const CLIENT_ID_HEADER: &str = "kakuremichi-access-client-id";
/// The header carrying a service key (`kmk_<id>_<secret>`), beside [`CLIENT_ID_HEADER`].
pub const CLIENT_SECRET_HEADER: &str = "kakuremichi-access-client-secret";
/// Cloudflare Access's names for the same pair, accepted so machines move over unchanged.
pub const CF_CLIENT_ID_HEADER: &str = "cf-access-client-id";
/// See [`CF_CLIENT_ID_HEADER`].
pub const CF_CLIENT_SECRET_HEADER: &str = "cf-access-client-secret";

/// Whether `path` matches `pattern`, where `*` stands for any run of characters (`/` included)
/// and everything else for itself.
pub fn glob_matches(pattern: &str, path: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else {
        return false;
    };
    let Some(mut rest) = path.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*`: an exact match.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Why a path cannot be matched against rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// A `.` or `..` segment, a backslash, or an encoded one of those or of `/` or NUL: an app
    /// could read it as another path than the rules saw.
    #[error("the path has dot segments or encoded separators")]
    Ambiguous,
}

/// The path rules are matched against: percent-decoded, repeated slashes collapsed. A path an
/// app might resolve differently (dot segments, backslashes, an encoded `/`, `\` or NUL, bytes
/// that are not UTF-8) is an error, so a rule can never be slipped past with `/open/../admin`.
pub fn normalize_path(raw: &str) -> Result<String, PathError> {
    let raw = raw.split(['?', '#']).next().unwrap_or("");
    let mut bytes = Vec::with_capacity(raw.len());
    let b = raw.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            match (
                b.get(i + 1).and_then(|c| hex(*c)),
                b.get(i + 2).and_then(|c| hex(*c)),
            ) {
                (Some(h), Some(l)) => {
                    let c = (h * 16 + l) as u8;
                    if matches!(c, b'/' | b'\\' | 0) {
                        return Err(PathError::Ambiguous);
                    }
                    bytes.push(c);
                    i += 3;
                    continue;
                }
                _ => return Err(PathError::Ambiguous),
            }
        }
        bytes.push(b[i]);
        i += 1;
    }
    let s = String::from_utf8(bytes).map_err(|_| PathError::Ambiguous)?;
    if s.contains('\\') {
        return Err(PathError::Ambiguous);
    }
    let mut out = String::with_capacity(s.len() + 1);
    for seg in s.split('/').filter(|seg| !seg.is_empty()) {
        if seg == "." || seg == ".." {
            return Err(PathError::Ambiguous);
        }
        out.push('/');
        out.push_str(seg);
    }
    if out.is_empty() || s.ends_with('/') {
        out.push('/');
    }
    Ok(out)
}

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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
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
    /// Organization service keys (by id) that reach the resource, for machines: sent as
    /// `Authorization: Bearer`, `X-API-Key`, or the header pair [`CLIENT_ID_HEADER`] and
    /// [`CLIENT_SECRET_HEADER`] (Cloudflare's `CF-Access-Client-Id`/`-Secret` also work). Each
    /// needs `resource:access` among its scopes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_keys: Vec<Uuid>,
    /// Rules tried in order before sign-in; the first that matches a request decides it. None
    /// matching: sign-in as above.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<AccessRule>,
    /// Addresses that may sign in with a one-time code sent by e-mail, without an account
    /// (lower case; `*` stands for any run of characters: `*@example.com`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub email_codes: Vec<String>,
    /// The resource is an MCP server (or any API) whose clients authorize by OAuth 2.1 with
    /// control as the authorization server: control issues access tokens for it (audience =
    /// its URL) to users the lists above allow.
    #[serde(default, skip_serializing_if = "crate::is_false")]
    pub mcp: bool,
}

/// What a matching [`AccessRule`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    /// The request passes without sign-in (webhooks, health checks, native apps); the app gets
    /// no identity, and a client's identity headers are still removed.
    #[serde(alias = "bypass")]
    Allow,
    /// The request is refused (403), whoever is signed in.
    Deny,
    /// The request needs sign-in and the policy's lists (to protect a path inside a broader
    /// `allow`).
    SignIn,
}

/// One rule of an [`AccessPolicy`]: it matches a request when every condition given matches
/// (an empty list matches anything).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// What a match does.
    pub action: RuleAction,
    /// Path patterns: `*` stands for any run of characters, `/` included (`/hooks/*`,
    /// `*.png`); matched against the normalized path without the query.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Methods, upper case (`POST`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Client address ranges (`203.0.113.0/24`, `::1/128`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<String>")]
    pub cidrs: Vec<ipnet::IpNet>,
}

impl AccessRule {
    /// Whether the rule matches a request; `path` is normalized (see [`normalize_path`]).
    pub fn matches(&self, method: &str, path: &str, client: std::net::IpAddr) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| m == method))
            && (self.paths.is_empty() || self.paths.iter().any(|p| glob_matches(p, path)))
            && (self.cidrs.is_empty() || self.cidrs.iter().any(|c| c.contains(&client)))
    }
}

impl AccessPolicy {
    /// The first rule matching a request, if any.
    pub fn rule_for(
        &self,
        method: &str,
        path: &str,
        client: std::net::IpAddr,
    ) -> Option<(usize, &AccessRule)> {
        self.rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.matches(method, path, client))
    }

    /// Whether the identity in verified claims may reach resource `resource` (whose hostname the
    /// token's audience already matched): a service key when the policy names it, a share link
    /// or the resource's own password or PIN always (revoking them ends their sessions), an
    /// e-mail code when [`AccessPolicy::email_codes`] still matches its address, anyone else by
    /// [`AccessPolicy::allows`].
    pub fn allows_claims(&self, c: &SessionClaims, resource: Uuid) -> bool {
        if c.amr.iter().any(|a| a == PASSWORD_AMR || a == PIN_AMR) {
            // Only for the resource it was entered on: not another one given the same hostname.
            return Uuid::try_parse(&c.sub).is_ok_and(|id| id == resource);
        }
        if c.amr.iter().any(|a| a == EMAIL_CODE_AMR) {
            return self.allows_email_code(&c.email);
        }
        if c.amr.iter().any(|a| a == SERVICE_KEY_AMR) {
            return Uuid::try_parse(&c.sub).is_ok_and(|id| self.service_keys.contains(&id));
        }
        if c.amr.iter().any(|a| a == SHARE_LINK_AMR) {
            // A link an administrator made for this resource (the token's audience).
            return true;
        }
        self.allows(&c.email, &c.roles)
    }

    /// This policy with `own`'s fields laid over it: each field `own` sets (a non-empty list,
    /// `api_keys: true`, identity headers other than the default) replaces this one's.
    pub fn overlaid_with(&self, own: Option<&AccessPolicy>) -> AccessPolicy {
        let Some(own) = own else {
            return self.clone();
        };
        fn pick<T: Clone>(own: &[T], base: &[T]) -> Vec<T> {
            if own.is_empty() { base } else { own }.to_vec()
        }
        AccessPolicy {
            users: pick(&own.users, &self.users),
            roles: pick(&own.roles, &self.roles),
            email_domains: pick(&own.email_domains, &self.email_domains),
            identity_headers: if own.identity_headers == IdentityHeaders::default() {
                self.identity_headers
            } else {
                own.identity_headers
            },
            api_keys: own.api_keys || self.api_keys,
            service_keys: pick(&own.service_keys, &self.service_keys),
            rules: pick(&own.rules, &self.rules),
            email_codes: pick(&own.email_codes, &self.email_codes),
            mcp: own.mcp || self.mcp,
        }
    }

    /// Whether `email` may sign in with a code sent to it.
    pub fn allows_email_code(&self, email: &str) -> bool {
        let email = email.trim().to_ascii_lowercase();
        !email.is_empty()
            && self
                .email_codes
                .iter()
                .any(|p| glob_matches(&p.to_ascii_lowercase(), &email))
    }

    /// Whether the resource takes keys at all (personal or service).
    pub fn takes_keys(&self) -> bool {
        self.api_keys || !self.service_keys.is_empty()
    }

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
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema,
)]
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
    /// OAuth access tokens only: the granted scope (space-separated).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scope: String,
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
    fn rules_match_by_glob_method_and_cidr_in_order() {
        assert!(glob_matches("/hooks/*", "/hooks/github"));
        assert!(glob_matches("/hooks/*", "/hooks/"));
        assert!(!glob_matches("/hooks/*", "/hooks"));
        assert!(glob_matches("*.png", "/a/b.png"));
        assert!(!glob_matches("*.png", "/a/b.png.exe"));
        assert!(glob_matches("/a/*/c/*", "/a/x/y/c/z"));
        assert!(glob_matches("/exact", "/exact"));
        assert!(!glob_matches("/exact", "/exact/more"));
        assert!(glob_matches("*", "/anything"));
        assert!(glob_matches("/a*a", "/aa"));
        assert!(!glob_matches("/a*a", "/a"));

        let p: AccessPolicy = serde_json::from_value(json!({
            "rules": [
                {"action": "deny", "cidrs": ["10.0.0.0/8"]},
                {"action": "bypass", "paths": ["/hooks/*"], "methods": ["POST"]},
                {"action": "sign_in", "paths": ["/public/secret*"]},
                {"action": "allow", "paths": ["/public/*"]},
            ],
            "service_keys": ["00000000-0000-0000-0000-000000000009"],
        }))
        .unwrap();
        let out: std::net::IpAddr = "203.0.113.5".parse().unwrap();
        let inside: std::net::IpAddr = "10.1.2.3".parse().unwrap();
        let act = |m: &str, path: &str, ip| p.rule_for(m, path, ip).map(|(i, r)| (i, r.action));
        assert_eq!(act("POST", "/hooks/x", out), Some((1, RuleAction::Allow)));
        assert_eq!(act("GET", "/hooks/x", out), None);
        assert_eq!(act("POST", "/hooks/x", inside), Some((0, RuleAction::Deny)));
        assert_eq!(
            act("GET", "/public/secret/a", out),
            Some((2, RuleAction::SignIn))
        );
        assert_eq!(act("GET", "/public/a", out), Some((3, RuleAction::Allow)));
        assert_eq!(
            serde_json::to_value(&p.rules[1]).unwrap(),
            json!({"action": "allow", "paths": ["/hooks/*"], "methods": ["POST"]})
        );
        assert!(serde_json::from_value::<AccessRule>(
            json!({"action": "allow", "cidrs": ["10.0.0.0/33"]})
        )
        .is_err());
        assert!(serde_json::from_value::<AccessRule>(json!({"action": "maybe"})).is_err());
        assert!(
            serde_json::from_value::<AccessRule>(json!({"action": "deny", "path": ["/"]})).is_err()
        );

        let mut c = SessionClaims {
            iss: "i".into(),
            sub: "00000000-0000-0000-0000-000000000009".into(),
            aud: "a".into(),
            iat: 0,
            exp: 1,
            sid: "s".into(),
            email: String::new(),
            name: "ci".into(),
            roles: vec![],
            nonce: String::new(),
            amr: vec![SERVICE_KEY_AMR.into()],
            scope: String::new(),
        };
        assert!(p.allows_claims(&c, Uuid::nil()));
        c.sub = "00000000-0000-0000-0000-000000000008".into();
        assert!(
            !p.allows_claims(&c, Uuid::nil()),
            "a service key the policy does not name"
        );
        c.amr = vec![API_KEY_AMR.into()];
        c.email = "a@b.c".into();
        assert!(
            p.allows_claims(&c, Uuid::nil()),
            "no lists: any signed-in user"
        );
        assert!(p.takes_keys());
    }

    #[test]
    fn passcodes_hold_for_their_resource_and_email_codes_for_listed_addresses() {
        let resource = Uuid::from_u128(7);
        let p: AccessPolicy = serde_json::from_value(json!({
            "users": ["ann@example.com"],
            "email_codes": ["*@Example.com", "bob@other.org"],
        }))
        .unwrap();
        let mut c = SessionClaims {
            iss: "i".into(),
            sub: resource.to_string(),
            aud: "a".into(),
            iat: 0,
            exp: 1,
            sid: "s".into(),
            email: String::new(),
            name: String::new(),
            roles: vec![],
            nonce: String::new(),
            amr: vec![PIN_AMR.into()],
            scope: String::new(),
        };
        assert!(p.allows_claims(&c, resource));
        assert!(
            !p.allows_claims(&c, Uuid::from_u128(8)),
            "a PIN entered on another resource that had the same hostname"
        );
        c.amr = vec![PASSWORD_AMR.into()];
        c.sub = "not a uuid".into();
        assert!(!p.allows_claims(&c, resource));

        c.amr = vec![EMAIL_CODE_AMR.into()];
        for (email, ok) in [
            ("carol@example.com", true),
            ("Bob@Other.org", true),
            ("bob@other.org.evil", false),
            ("carol@example.com.evil", false),
            ("", false),
        ] {
            c.email = email.into();
            assert_eq!(p.allows_claims(&c, resource), ok, "{email}");
        }
        let own = AccessPolicy {
            email_codes: vec!["dan@x.io".into()],
            ..Default::default()
        };
        assert_eq!(p.overlaid_with(Some(&own)).email_codes, own.email_codes);
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!({"users": ["ann@example.com"], "email_codes": ["*@Example.com", "bob@other.org"]})
        );
    }

    #[test]
    fn a_resource_lays_its_own_fields_over_its_policy() {
        let base: AccessPolicy = serde_json::from_value(json!({
            "roles": ["member"], "email_domains": ["example.com"],
            "rules": [{"action": "deny", "cidrs": ["10.0.0.0/8"]}],
            "identity_headers": "oauth2_proxy",
        }))
        .unwrap();
        assert_eq!(base.overlaid_with(None), base);
        let own: AccessPolicy =
            serde_json::from_value(json!({"roles": ["admin"], "api_keys": true})).unwrap();
        let got = base.overlaid_with(Some(&own));
        assert_eq!(
            serde_json::to_value(&got).unwrap(),
            json!({"roles": ["admin"], "email_domains": ["example.com"],
                   "rules": [{"action": "deny", "cidrs": ["10.0.0.0/8"]}],
                   "identity_headers": "oauth2_proxy", "api_keys": true})
        );
        assert_eq!(base.overlaid_with(Some(&AccessPolicy::default())), base);
    }

    #[test]
    fn paths_are_normalized_or_refused_before_rules_see_them() {
        assert_eq!(normalize_path("/a//b/?x=1").unwrap(), "/a/b/");
        assert_eq!(normalize_path("/hooks/%67ithub").unwrap(), "/hooks/github");
        assert_eq!(normalize_path("").unwrap(), "/");
        assert_eq!(normalize_path("/file%2Etxt").unwrap(), "/file.txt");
        for bad in [
            "/open/../admin",
            "/open/%2e%2e/admin",
            "/open/./x",
            "/open%2fadmin",
            "/open%5cadmin",
            "/a\\b",
            "/%00",
            "/%zz",
            "/%ff",
        ] {
            assert_eq!(normalize_path(bad), Err(PathError::Ambiguous), "{bad}");
        }
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
