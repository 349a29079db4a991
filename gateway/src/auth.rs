//! Sign-in at the edge: the gateway decides every request to a resource that needs sign-in from
//! its pushed config ([`EdgeIdentity`]) and the session token in the request, never by asking
//! control.
//!
//! - A browser without a session gets a nonce cookie and a redirect to control's sign-in page;
//!   control sends it back to `/.kakuremichi/auth/callback` on the resource's own hostname with a
//!   session token bound to that nonce (its `nonce` claim is the nonce's SHA-256), which becomes
//!   the session cookie. A stolen token is useless without the browser's HttpOnly nonce cookie.
//! - Other clients get 401 with `WWW-Authenticate`.
//! - A verified token is cached (keyed by its signature, compared whole), with the nonce cookie
//!   that matched it and the headers the app gets, so a request costs a hash lookup and two
//!   comparisons, not a signature check, a SHA-256 or building headers. Revocations and key
//!   changes come with every snapshot and apply to cached tokens too.
//! - The app gets the token as a signed assertion (`Kakuremichi-Jwt-Assertion`) and plain identity
//!   headers; a client's own copies of those headers are always removed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use kakuremichi_proto::identity::{
    embedded_id, normalize_path, secret_digest, AccessPolicy, GatewayIdentity, IdentityHeaders,
    RuleAction, SessionClaims, API_KEY_HEADER, API_KEY_PREFIX, ASSERTION_HEADER,
    CF_CLIENT_ID_HEADER, CF_CLIENT_SECRET_HEADER, CLIENT_ID_HEADER, CLIENT_SECRET_HEADER,
    GATEWAY_AUTH_PREFIX, GRANT_MAX_AGE_SECS, NONCE_COOKIE, PASSWORD_AMR, PIN_AMR, SERVICE_KEY_AMR,
    SESSION_COOKIE, SHARE_LINK_AMR,
};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq as _;
use uuid::Uuid;

/// Verified tokens kept at most (all forgotten at once when full).
const MAX_CACHED: usize = 50_000;
/// Clock skew allowed on `exp` and `iat`, in seconds.
const LEEWAY_SECS: u64 = 30;
/// How long a nonce cookie set before sign-in lives, in seconds.
const NONCE_LIFE_SECS: u64 = 600;

/// Why a token was refused (logged; the client sees a plain page).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a JWT, or not one of ours.
    #[error("malformed token")]
    Malformed,
    /// Signed by a key this gateway does not know (or no longer trusts).
    #[error("unknown signing key")]
    UnknownKey,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// Past its expiry.
    #[error("expired")]
    Expired,
    /// For another hostname.
    #[error("wrong audience")]
    WrongAudience,
    /// From another issuer.
    #[error("wrong issuer")]
    WrongIssuer,
    /// Its session was revoked, or its user signed out everywhere.
    #[error("revoked")]
    Revoked,
    /// Its user is disabled or deleted.
    #[error("user disabled")]
    Disabled,
    /// The browser's nonce cookie is missing or does not match the token.
    #[error("nonce cookie missing or wrong")]
    Nonce,
    /// A grant older than [`GRANT_MAX_AGE_SECS`].
    #[error("grant too old")]
    GrantTooOld,
}

/// What a gateway knows about identity, as of one snapshot.
pub struct EdgeIdentity {
    issuer: String,
    sign_in_url: String,
    keys: HashMap<String, DecodingKey>,
    jwks: Bytes,
    revoked: HashSet<Uuid>,
    cutoffs: HashMap<Uuid, (i64, bool)>,
    /// (key id, hostname) -> (the key's digest, the assertion for its requests).
    api_keys: HashMap<(Uuid, String), (String, String)>,
}

impl std::fmt::Debug for EdgeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeIdentity")
            .field("issuer", &self.issuer)
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

impl EdgeIdentity {
    /// From a snapshot's identity section (keys that do not decode are skipped, and logged).
    pub fn new(g: &GatewayIdentity) -> EdgeIdentity {
        let mut keys = HashMap::new();
        for k in &g.keys {
            match DecodingKey::from_ed_components(&k.x) {
                Ok(d) => {
                    keys.insert(k.kid.clone(), d);
                }
                Err(error) => {
                    tracing::warn!(kid = %k.kid, %error, "skipping an unreadable signing key")
                }
            }
        }
        let jwks = serde_json::json!({
            "keys": g.keys.iter().map(|k| serde_json::json!({
                "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": k.kid, "x": k.x
            })).collect::<Vec<_>>()
        });
        EdgeIdentity {
            issuer: g.issuer.clone(),
            sign_in_url: g.sign_in_url.clone(),
            keys,
            jwks: Bytes::from(jwks.to_string()),
            revoked: g.revoked_sessions.iter().copied().collect(),
            cutoffs: g
                .user_cutoffs
                .iter()
                .map(|c| (c.user, (c.not_before, c.disabled)))
                .collect(),
            api_keys: g
                .api_keys
                .iter()
                .map(|k| {
                    (
                        (k.id, k.host.to_ascii_lowercase()),
                        (k.digest.clone(), k.assertion.clone()),
                    )
                })
                .collect(),
        }
    }

    /// The JWKS document.
    pub fn jwks(&self) -> Bytes {
        self.jwks.clone()
    }

    /// Control's sign-in page.
    pub fn sign_in_url(&self) -> &str {
        &self.sign_in_url
    }

    /// Whether claims still count: session not revoked, user not disabled or cut off.
    fn live(&self, sid: Uuid, user: Uuid, iat: i64) -> Result<(), TokenError> {
        if self.revoked.contains(&sid) {
            return Err(TokenError::Revoked);
        }
        if let Some((not_before, disabled)) = self.cutoffs.get(&user) {
            if *disabled {
                return Err(TokenError::Disabled);
            }
            if iat < *not_before {
                return Err(TokenError::Revoked);
            }
        }
        Ok(())
    }
}

/// Headers to add to a request, built once.
type Headers = Box<[(HeaderName, HeaderValue)]>;

/// A verified token, with what every request that presents it needs, computed once: the ids
/// revocation is checked by, the nonce cookie that matched, the headers the app gets.
pub(crate) struct Cached {
    /// The token itself, also the assertion header's value (shared, not copied, by it).
    token: HeaderValue,
    claims: Arc<SessionClaims>,
    kid: String,
    /// `sid` and `sub` parsed (`None`: not a UUID, so the token is malformed).
    ids: Option<(Uuid, Uuid)>,
    /// The nonce cookie whose SHA-256 is the `nonce` claim, once a request showed it.
    nonce: OnceLock<Box<str>>,
    /// The identity headers of each [`IdentityHeaders`] style, built on first use.
    headers: [OnceLock<Headers>; 3],
}

impl Cached {
    /// Whether `nonce` (the nonce cookie) is the one the token is bound to: a SHA-256 the first
    /// time, then a comparison with the cookie that matched.
    fn nonce_matches(&self, nonce: Option<&str>) -> bool {
        let Some(n) = nonce else { return false };
        if let Some(known) = self.nonce.get() {
            return bool::from(known.as_bytes().ct_eq(n.as_bytes()));
        }
        let ok = nonce_matches(Some(n), &self.claims);
        if ok {
            let _ = self.nonce.set(n.into());
        }
        ok
    }

    /// The assertion and the plain identity headers of `style` for this token.
    fn identity_headers(&self, style: IdentityHeaders) -> &[(HeaderName, HeaderValue)] {
        let i = match style {
            IdentityHeaders::Remote => 0,
            IdentityHeaders::Oauth2Proxy => 1,
            IdentityHeaders::None => 2,
        };
        self.headers[i].get_or_init(|| {
            let mut h = HeaderMap::new();
            add_identity_headers(&mut h, style, &self.claims, "");
            h.insert(ASSERTION_HEADER, self.token.clone());
            h.into_iter()
                .filter_map(|(k, v)| Some((k?, v)))
                .collect::<Vec<_>>()
                .into_boxed_slice()
        })
    }
}

/// Tokens whose signatures were verified, with their claims, keyed by their signature part
/// (a short key to hash; the whole token is compared on a hit).
#[derive(Default)]
pub struct TokenCache {
    map: Mutex<HashMap<Box<str>, Arc<Cached>>>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache").finish_non_exhaustive()
    }
}

impl TokenCache {
    /// Verifies `token` for `host` at `now` (unix seconds): signature (once, then cached), key
    /// still trusted, issuer, audience, expiry, revocation.
    pub fn verify(
        &self,
        identity: &EdgeIdentity,
        token: &str,
        host: &str,
        now: i64,
    ) -> Result<Arc<SessionClaims>, TokenError> {
        self.verify_with(identity, token, now, |aud| aud.eq_ignore_ascii_case(host))
    }

    /// [`TokenCache::verify`] with another audience check (an OAuth access token's audience is
    /// the resource's URL: [`audience_names`]).
    pub fn verify_with(
        &self,
        identity: &EdgeIdentity,
        token: &str,
        now: i64,
        audience_ok: impl Fn(&str) -> bool,
    ) -> Result<Arc<SessionClaims>, TokenError> {
        self.verified(identity, token, now, audience_ok)
            .map(|c| Arc::clone(&c.claims))
    }

    /// [`TokenCache::verify_with`], answering the cache entry.
    pub(crate) fn verified(
        &self,
        identity: &EdgeIdentity,
        token: &str,
        now: i64,
        audience_ok: impl Fn(&str) -> bool,
    ) -> Result<Arc<Cached>, TokenError> {
        let key = token.rsplit_once('.').map_or(token, |(_, sig)| sig);
        let hit = self
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .filter(|c| c.token.as_bytes() == token.as_bytes())
            .cloned();
        let cached = match hit {
            Some(c) => c,
            None => {
                let c = Arc::new(Self::check_signature(identity, token)?);
                let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
                if map.len() >= MAX_CACHED {
                    map.clear();
                }
                map.insert(key.into(), Arc::clone(&c));
                c
            }
        };
        if !identity.keys.contains_key(&cached.kid) {
            return Err(TokenError::UnknownKey);
        }
        let c = &cached.claims;
        if c.iss != identity.issuer {
            return Err(TokenError::WrongIssuer);
        }
        if !audience_ok(&c.aud) {
            return Err(TokenError::WrongAudience);
        }
        if c.exp + LEEWAY_SECS as i64 <= now {
            return Err(TokenError::Expired);
        }
        let (sid, user) = cached.ids.ok_or(TokenError::Malformed)?;
        identity.live(sid, user, c.iat)?;
        Ok(cached)
    }

    fn check_signature(identity: &EdgeIdentity, token: &str) -> Result<Cached, TokenError> {
        if token.len() > 8192 {
            return Err(TokenError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::Malformed);
        }
        let kid = header.kid.ok_or(TokenError::Malformed)?;
        let key = identity.keys.get(&kid).ok_or(TokenError::UnknownKey)?;
        let mut v = Validation::new(Algorithm::EdDSA);
        // Audience, issuer and expiry are checked on every use, cached or not.
        v.validate_aud = false;
        v.validate_exp = false;
        v.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<SessionClaims>(token, key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                _ => TokenError::Malformed,
            }
        })?;
        let c = data.claims;
        let ids = Uuid::try_parse(&c.sid)
            .ok()
            .zip(Uuid::try_parse(&c.sub).ok());
        let token = HeaderValue::from_maybe_shared(Bytes::copy_from_slice(token.as_bytes()))
            .map_err(|_| TokenError::Malformed)?;
        Ok(Cached {
            token,
            claims: Arc::new(c),
            kid,
            ids,
            nonce: OnceLock::new(),
            headers: Default::default(),
        })
    }

    /// How many verified tokens are kept.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether an access token's audience, a resource URL (RFC 8707), names `host`.
pub fn audience_names(aud: &str, host: &str) -> bool {
    url::Url::parse(aud).is_ok_and(|u| {
        matches!(u.scheme(), "http" | "https")
            && u.host_str().is_some_and(|h| h.eq_ignore_ascii_case(host))
    })
}

/// Where a resource serves its protected-resource metadata (RFC 9728): this path, or this path
/// followed by the resource's own path.
pub const RESOURCE_METADATA_PATH: &str = "/.well-known/oauth-protected-resource";

/// What an OAuth access token says in `amr` (control's `oauth` module).
pub const OAUTH_AMR: &str = "oauth";

/// The scope an MCP resource's challenge names.
pub const MCP_SCOPE: &str = "mcp";

/// The metadata URL of the resource a request on an MCP resource is for (path form).
fn resource_metadata_url(ask: &Ask<'_>) -> String {
    let path = ask
        .path_and_query
        .split(['?', '#'])
        .next()
        .unwrap_or("/")
        .trim_end_matches('/');
    format!(
        "{}://{}{RESOURCE_METADATA_PATH}{path}",
        ask.proto, ask.authority
    )
}

/// The `WWW-Authenticate` challenge of an MCP resource (RFC 9728 §5.1, RFC 6750 §3).
fn mcp_challenge(ask: &Ask<'_>, error: Option<(&str, &str)>) -> String {
    let mut c = format!(
        "Bearer resource_metadata=\"{}\", scope=\"{MCP_SCOPE}\"",
        resource_metadata_url(ask)
    );
    if let Some((e, d)) = error {
        c.push_str(&format!(
            ", error=\"{e}\", error_description=\"{}\"",
            d.replace('"', "'")
        ));
    }
    c
}

/// The protected-resource metadata (RFC 9728 §3) of an MCP resource, for a request to
/// [`RESOURCE_METADATA_PATH`] (root form) or below it (path form: the resource is that path).
fn resource_metadata(identity: &EdgeIdentity, ask: &Ask<'_>, path: &str) -> AuthResponse {
    let suffix = path.strip_prefix(RESOURCE_METADATA_PATH).unwrap_or("");
    let doc = serde_json::json!({
        "resource": format!("{}://{}{suffix}", ask.proto, ask.authority),
        "authorization_servers": [identity.issuer],
        "scopes_supported": [MCP_SCOPE],
        "bearer_methods_supported": ["header"],
        "resource_name": ask.host,
    });
    let mut r = text(StatusCode::OK, String::new());
    *r.body_mut() = Bytes::from(doc.to_string());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=300"),
    );
    r
}

/// The answer to a request on an MCP resource that carries an OAuth bearer token: `None` when it
/// carries none (other ways in apply). The token is checked locally (control's signature, issuer,
/// expiry, revocation, audience = this hostname's URL, the policy's lists) and never reaches the
/// MCP server.
fn check_access_token(
    identity: &EdgeIdentity,
    cache: &TokenCache,
    policy: &AccessPolicy,
    headers: &mut HeaderMap,
    ask: &Ask<'_>,
) -> Option<Result<Arc<SessionClaims>, AuthResponse>> {
    let query = ask.path_and_query.split_once('?').map_or("", |(_, q)| q);
    if url::form_urlencoded::parse(query.as_bytes()).any(|(k, _)| k == "access_token") {
        return Some(Err(refusal(
            headers,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "an access token in the URL is refused: send it in the Authorization header",
        )));
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.starts_with(API_KEY_PREFIX))?
        .to_owned();
    let invalid = |headers: &HeaderMap, why: String| {
        let mut r = refusal(headers, StatusCode::UNAUTHORIZED, "invalid_token", &why);
        if let Ok(v) = HeaderValue::from_str(&mcp_challenge(ask, Some(("invalid_token", &why)))) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        mark(r, None, format!("access token refused: {why}"))
    };
    let claims = match cache.verify_with(identity, &token, ask.now, |aud| {
        audience_names(aud, ask.host)
    }) {
        Ok(c) => c,
        Err(e) => return Some(Err(invalid(headers, e.to_string()))),
    };
    if !claims.amr.iter().any(|a| a == OAUTH_AMR) {
        return Some(Err(invalid(headers, "not an access token".into())));
    }
    if !claims.scope.split(' ').any(|s| s == MCP_SCOPE) {
        // A valid token without the scope this server needs: the client asks again for it.
        let why = format!("the token's scope does not include {MCP_SCOPE}");
        let mut r = refusal(headers, StatusCode::FORBIDDEN, "insufficient_scope", &why);
        if let Ok(v) =
            HeaderValue::from_str(&mcp_challenge(ask, Some(("insufficient_scope", &why))))
        {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        return Some(Err(mark(r, Some(&who(&claims)), why)));
    }
    if !policy.allows_claims(&claims, ask.resource) {
        return Some(Err(denied(headers, ask, &claims)));
    }
    headers.remove(header::AUTHORIZATION);
    strip_own_cookies(headers);
    add_identity_headers(headers, policy.identity_headers, &claims, "");
    // The client's token is never passed on (MCP: no token passthrough).
    headers.remove(ASSERTION_HEADER);
    Some(Ok(claims))
}

/// base64url(SHA-256(nonce)).
pub fn nonce_hash(nonce: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(nonce.as_bytes()))
}

fn nonce_matches(nonce: Option<&str>, claims: &SessionClaims) -> bool {
    match nonce {
        Some(n) => bool::from(nonce_hash(n).as_bytes().ct_eq(claims.nonce.as_bytes())),
        None => false,
    }
}

/// The value of cookie `name` across the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|h| h.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

/// The gateway's own cookies in a request, found in one pass over its `Cookie` headers (the
/// first of each name counts, as in [`cookie`]).
struct OwnCookies<'a> {
    session: Option<&'a str>,
    nonce: Option<&'a str>,
    /// Whether the request carries any other cookie (or a header that is not text).
    others: bool,
}

impl<'a> OwnCookies<'a> {
    fn of(headers: &'a HeaderMap) -> OwnCookies<'a> {
        let mut own = OwnCookies {
            session: None,
            nonce: None,
            others: false,
        };
        for v in headers.get_all(header::COOKIE) {
            let Ok(h) = v.to_str() else {
                own.others = true;
                continue;
            };
            for pair in h.split(';') {
                let pair = pair.trim();
                if pair.is_empty() {
                    continue;
                }
                match pair.split_once('=') {
                    Some((SESSION_COOKIE, v)) => {
                        own.session.get_or_insert(v);
                    }
                    Some((NONCE_COOKIE, v)) => {
                        own.nonce.get_or_insert(v);
                    }
                    Some(_) => own.others = true,
                    None => own.others |= pair != SESSION_COOKIE && pair != NONCE_COOKIE,
                }
            }
        }
        own
    }
}

/// Removes the gateway's own cookies from what the app gets.
fn strip_own_cookies(headers: &mut HeaderMap) {
    let ours = |pair: &str| {
        let name = pair.split_once('=').map_or(pair, |(k, _)| k);
        name == SESSION_COOKIE || name == NONCE_COOKIE
    };
    let mut all = headers.get_all(header::COOKIE).iter().peekable();
    if all.peek().is_none() {
        return;
    }
    // Commonly the request carries only the gateway's own cookies: drop them, build nothing.
    let only_ours = all.all(|v| {
        v.to_str().is_ok_and(|h| {
            h.split(';')
                .map(str::trim)
                .all(|pair| pair.is_empty() || ours(pair))
        })
    });
    if only_ours {
        headers.remove(header::COOKIE);
        return;
    }
    let values: Vec<HeaderValue> = headers.get_all(header::COOKIE).iter().cloned().collect();
    let kept: Vec<&str> = values
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|h| h.split(';'))
        .map(str::trim)
        .filter(|pair| !pair.is_empty() && !ours(pair))
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
            headers.insert(header::COOKIE, v);
        }
    }
}

/// Removes every identity header a client sent (on every route, public or not).
pub fn strip_identity_headers(headers: &mut HeaderMap) {
    for name in IdentityHeaders::ALL {
        headers.remove(*name);
    }
}

fn insert(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

/// Adds the signed assertion and the plain identity headers the resource asks for.
fn add_identity_headers(
    headers: &mut HeaderMap,
    style: IdentityHeaders,
    claims: &SessionClaims,
    token: &str,
) {
    insert(headers, ASSERTION_HEADER, token);
    let groups = claims.roles.join(",");
    match style {
        IdentityHeaders::Remote => {
            // A service key has no e-mail address: it is named by its id.
            let user = if claims.email.is_empty() {
                &claims.sub
            } else {
                &claims.email
            };
            insert(headers, "remote-user", user);
            insert(headers, "remote-email", &claims.email);
            insert(headers, "remote-name", &claims.name);
            insert(headers, "remote-groups", &groups);
        }
        IdentityHeaders::Oauth2Proxy => {
            insert(headers, "x-forwarded-user", &claims.sub);
            insert(headers, "x-forwarded-email", &claims.email);
            insert(headers, "x-forwarded-preferred-username", &claims.name);
            insert(headers, "x-forwarded-groups", &groups);
        }
        IdentityHeaders::None => {}
    }
}

/// Marks a refusal worth auditing on the answer (read by the proxy, which knows the client).
#[derive(Debug, Clone)]
pub struct Refused {
    /// The user's e-mail address, when a valid token named one.
    pub user: Option<String>,
    /// Why.
    pub reason: String,
}

fn mark(mut r: AuthResponse, user: Option<&str>, reason: String) -> AuthResponse {
    r.extensions_mut().insert(Refused {
        user: user.map(str::to_owned),
        reason,
    });
    r
}

/// Distinct refusals kept between two status reports; more are only counted.
const MAX_REFUSALS: usize = 256;

/// Refusals since the last status report, counted by host, client, user and reason, for
/// control's audit log. Bounded: past [`MAX_REFUSALS`] distinct ones, the rest are counted.
#[derive(Debug, Default)]
pub struct Refusals {
    book: std::sync::Mutex<RefusalBook>,
}

type RefusalKey = (String, Option<std::net::IpAddr>, Option<String>, String);

#[derive(Debug, Default)]
struct RefusalBook {
    by: HashMap<RefusalKey, (i64, u32)>,
    dropped: u32,
    first_dropped_ms: i64,
}

impl Refusals {
    /// Counts one refusal.
    pub fn record(
        &self,
        host: &str,
        client: Option<std::net::IpAddr>,
        refused: &Refused,
        now_ms: i64,
    ) {
        let mut b = self.book.lock().unwrap_or_else(|e| e.into_inner());
        let key = (
            host.to_owned(),
            client,
            refused.user.clone(),
            refused.reason.clone(),
        );
        if let Some((_, n)) = b.by.get_mut(&key) {
            *n = n.saturating_add(1);
        } else if b.by.len() < MAX_REFUSALS {
            b.by.insert(key, (now_ms, 1));
        } else {
            if b.dropped == 0 {
                b.first_dropped_ms = now_ms;
            }
            b.dropped = b.dropped.saturating_add(1);
        }
    }

    /// Puts back what [`Refusals::take`] returned and could not be delivered, merged with what
    /// was counted since (still bounded).
    pub fn restore(&self, taken: Vec<kakuremichi_proto::AccessRefusal>) {
        let mut b = self.book.lock().unwrap_or_else(|e| e.into_inner());
        for r in taken {
            let client = r.client.as_deref().and_then(|c| c.parse().ok());
            let key = (r.host, client, r.user, r.reason);
            let fits = b.by.len() < MAX_REFUSALS;
            match b.by.get_mut(&key) {
                Some((at_ms, n)) => {
                    *at_ms = (*at_ms).min(r.at_ms);
                    *n = n.saturating_add(r.count);
                }
                None if key.0 != "*" && fits => {
                    b.by.insert(key, (r.at_ms, r.count));
                }
                None => {
                    if b.dropped == 0 || r.at_ms < b.first_dropped_ms {
                        b.first_dropped_ms = r.at_ms;
                    }
                    b.dropped = b.dropped.saturating_add(r.count);
                }
            }
        }
    }

    /// Everything counted since the last call, oldest first.
    pub fn take(&self) -> Vec<kakuremichi_proto::AccessRefusal> {
        let b = std::mem::take(&mut *self.book.lock().unwrap_or_else(|e| e.into_inner()));
        let mut out: Vec<_> =
            b.by.into_iter()
                .map(|((host, client, user, reason), (at_ms, count))| {
                    kakuremichi_proto::AccessRefusal {
                        at_ms,
                        host,
                        client: client.map(|c| c.to_string()),
                        user,
                        reason,
                        count,
                    }
                })
                .collect();
        if b.dropped > 0 {
            out.push(kakuremichi_proto::AccessRefusal {
                at_ms: b.first_dropped_ms,
                host: "*".into(),
                client: None,
                user: None,
                reason: format!(
                    "more than {MAX_REFUSALS} distinct refusals: the rest counted only"
                ),
                count: b.dropped,
            });
        }
        out.sort_by_key(|r| r.at_ms);
        out
    }
}

/// A gateway answer of its own (sign-in redirect, 401, 403, callback, JWKS).
pub type AuthResponse = Box<Response<Bytes>>;

fn text(status: StatusCode, body: String) -> AuthResponse {
    let mut r = Box::new(Response::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A refusal for a client that is not a browser: JSON (`{"error": {"code", "message"}}`, as
/// control's API answers) when it asks for JSON, plain text otherwise.
fn refusal(headers: &HeaderMap, status: StatusCode, code: &str, message: &str) -> AuthResponse {
    let json = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json") && !v.contains("text/html"));
    if !json {
        return text(status, format!("{message}\n"));
    }
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    let mut r = text(status, body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Text made safe inside HTML elements and double-quoted attributes.
pub(crate) fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn html(status: StatusCode, title: &str, body_html: &str) -> AuthResponse {
    let page = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;\
         padding:0 1rem}}</style></head><body><h1>{t}</h1>{body_html}<hr><p><small>kakuremichi \
         gateway</small></p></body></html>\n",
        t = html_escape(title)
    );
    let mut r = text(status, page);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"))
}

fn set_cookie(r: &mut AuthResponse, value: String) {
    if let Ok(v) = HeaderValue::from_str(&value) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
}

fn secure_attr(proto: &str) -> &'static str {
    if proto == "https" {
        "; Secure"
    } else {
        ""
    }
}

fn random_nonce() -> String {
    use rand::RngCore as _;
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// One request as the access check sees it.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// The resource hostname (lower case, no port).
    pub host: &'a str,
    /// `Host` as sent (with its port), for URLs back to this site.
    pub authority: &'a str,
    /// `http` or `https`.
    pub proto: &'static str,
    /// The method.
    pub method: &'a Method,
    /// Path and query.
    pub path_and_query: &'a str,
    /// Unix seconds.
    pub now: i64,
    /// Whether control is reachable (a new sign-in needs it).
    pub control_up: bool,
    /// The client's address (rules match it).
    pub client: std::net::IpAddr,
    /// The resource's id (a password or PIN session holds only for it).
    pub resource: uuid::Uuid,
    /// The resource is an MCP server: OAuth bearer tokens, protected-resource metadata.
    pub mcp: bool,
}

/// Decides a request to a resource with an access policy: its rules first (the first match
/// allows, denies or asks for sign-in), then sign-in. `Ok`: the request goes on, with the
/// gateway's cookies removed and identity headers added (`None`: a rule let it through without
/// an identity). `Err`: the gateway's own answer.
pub fn check(
    identity: Option<&EdgeIdentity>,
    cache: &TokenCache,
    policy: &AccessPolicy,
    headers: &mut HeaderMap,
    ask: &Ask<'_>,
) -> Result<Option<Arc<SessionClaims>>, AuthResponse> {
    if !policy.rules.is_empty() {
        let Ok(path) = normalize_path(ask.path_and_query) else {
            tracing::warn!(host = ask.host, "request refused: ambiguous path");
            return Err(mark(
                refusal(
                    headers,
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "the path has dot segments, backslashes or encoded separators; this resource \
                     does not take such paths",
                ),
                None,
                "ambiguous path".into(),
            ));
        };
        match policy.rule_for(ask.method.as_str(), &path, ask.client) {
            Some((_, rule)) if rule.action == RuleAction::Allow => {
                strip_own_cookies(headers);
                return Ok(None);
            }
            Some((i, rule)) if rule.action == RuleAction::Deny => {
                tracing::warn!(host = ask.host, rule = i, "request denied by a rule");
                let message = format!("{} refuses this request (rule {i}).", ask.host);
                let r = if wants_html(headers) {
                    html(
                        StatusCode::FORBIDDEN,
                        "403 Forbidden",
                        &format!("<p>{}</p>", html_escape(&message)),
                    )
                } else {
                    refusal(headers, StatusCode::FORBIDDEN, "forbidden", &message)
                };
                return Err(mark(r, None, format!("denied by rule {i}")));
            }
            _ => {}
        }
    }
    check_identity(identity, cache, policy, headers, ask).map(Some)
}

fn check_identity(
    identity: Option<&EdgeIdentity>,
    cache: &TokenCache,
    policy: &AccessPolicy,
    headers: &mut HeaderMap,
    ask: &Ask<'_>,
) -> Result<Arc<SessionClaims>, AuthResponse> {
    let Some(identity) = identity else {
        // A route that needs sign-in and no keys to check it with: refuse, never open up.
        tracing::warn!(
            host = ask.host,
            "sign-in needed but this gateway has no identity config"
        );
        return Err(refusal(
            headers,
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "sign-in is not available on this gateway yet; try again shortly",
        ));
    };
    if ask.mcp {
        if let Some(r) = check_access_token(identity, cache, policy, headers, ask) {
            return r;
        }
    }
    if policy.takes_keys() {
        if let Some(key) = presented_api_key(headers) {
            return check_api_key(identity, cache, policy, headers, ask, key);
        }
    }
    let own = OwnCookies::of(headers);
    let Some(token) = own.session else {
        return Err(sign_in_needed(identity, headers, ask, None));
    };
    let cached = match cache.verified(identity, token, ask.now, |aud| {
        aud.eq_ignore_ascii_case(ask.host)
    }) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(host = ask.host, reason = %e, "session token refused");
            let reason = format!("session token refused: {e}");
            return Err(mark(
                sign_in_needed(identity, headers, ask, Some(e)),
                None,
                reason,
            ));
        }
    };
    let claims = &cached.claims;
    if !cached.nonce_matches(own.nonce) {
        tracing::warn!(host = ask.host, user_id = %claims.sub, reason = %TokenError::Nonce, "session token refused");
        return Err(mark(
            sign_in_needed(identity, headers, ask, Some(TokenError::Nonce)),
            Some(&claims.email),
            format!("session token refused: {}", TokenError::Nonce),
        ));
    }
    if !policy.allows_claims(claims, ask.resource) {
        return Err(denied(headers, ask, claims));
    }
    if own.others {
        strip_own_cookies(headers);
    } else {
        headers.remove(header::COOKIE);
    }
    for (name, value) in cached.identity_headers(policy.identity_headers) {
        headers.insert(name.clone(), value.clone());
    }
    Ok(Arc::clone(claims))
}

/// The answer to an identity the resource's policy does not allow: a 403 naming the user.
fn denied(headers: &HeaderMap, ask: &Ask<'_>, claims: &SessionClaims) -> AuthResponse {
    tracing::warn!(host = ask.host, user_id = %claims.sub, "access denied by the resource's policy");
    let message = format!(
        "{} is signed in, but is not allowed to use {}. Ask an administrator for access.",
        who(claims),
        ask.host
    );
    let r = if wants_html(headers) {
        html(
            StatusCode::FORBIDDEN,
            "403 Forbidden",
            &format!(
                "<p>{}</p><p><a href=\"{GATEWAY_AUTH_PREFIX}sign-out\">Sign in as someone else</a></p>",
                html_escape(&message)
            ),
        )
    } else {
        refusal(headers, StatusCode::FORBIDDEN, "forbidden", &message)
    };
    mark(
        r,
        Some(&who(claims)),
        "not allowed by the resource's policy".into(),
    )
}

/// How an identity is named to people: its e-mail address, or a service key's name and id.
fn who(claims: &SessionClaims) -> String {
    if claims.amr.iter().any(|a| a == SERVICE_KEY_AMR) {
        format!("service key {} ({})", claims.name, claims.sub)
    } else if claims.amr.iter().any(|a| a == SHARE_LINK_AMR) {
        format!("share link {} ({})", claims.name, claims.sub)
    } else if claims.amr.iter().any(|a| a == PASSWORD_AMR) {
        "a visitor with the site's password".to_owned()
    } else if claims.amr.iter().any(|a| a == PIN_AMR) {
        "a visitor with the site's PIN".to_owned()
    } else {
        claims.email.clone()
    }
}

/// The API key a client sent (`Authorization: Bearer kmk_...`, `X-API-Key: kmk_...`, or a
/// service key as the client id and secret pair), if any: `Err` for a pair whose id is not the
/// secret's. Other bearer tokens are the app's business and pass untouched.
fn presented_api_key(headers: &HeaderMap) -> Option<Result<String, &'static str>> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let pair = [
        (CLIENT_ID_HEADER, CLIENT_SECRET_HEADER),
        (CF_CLIENT_ID_HEADER, CF_CLIENT_SECRET_HEADER),
    ]
    .into_iter()
    .find_map(|(id, secret)| Some((get(id)?, get(secret)?)));
    if let Some((id, secret)) = pair {
        let matches = Uuid::try_parse(id)
            .ok()
            .is_some_and(|id| embedded_id(API_KEY_PREFIX, secret) == Some(id));
        return Some(if matches {
            Ok(secret.to_owned())
        } else {
            Err("the client id is not the secret's")
        });
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    [bearer, get(API_KEY_HEADER)]
        .into_iter()
        .flatten()
        .map(str::trim)
        .find(|k| {
            k.strip_prefix(API_KEY_PREFIX)
                .is_some_and(|r| r.starts_with('_'))
        })
        .map(|k| Ok(k.to_owned()))
}

/// The claims of the API key a request carries (`X-API-Key` or `Authorization: Bearer`), if
/// control pushed that key for `host` (compared by digest in constant time) and its assertion
/// holds (signature, expiry, its user not disabled or cut off). For the agent-sessions
/// endpoint, which decides per session.
pub fn api_key_claims(
    identity: &EdgeIdentity,
    cache: &TokenCache,
    headers: &HeaderMap,
    host: &str,
    now: i64,
) -> Result<Arc<SessionClaims>, String> {
    let key = presented_api_key(headers)
        .ok_or("no API key")?
        .map_err(str::to_owned)?;
    let unknown = || "unknown, revoked, expired or not accepted here".to_owned();
    let id = embedded_id(API_KEY_PREFIX, &key).ok_or("malformed API key")?;
    let (digest, assertion) = identity
        .api_keys
        .get(&(id, host.to_owned()))
        .ok_or_else(unknown)?;
    if !bool::from(secret_digest(&key).as_bytes().ct_eq(digest.as_bytes())) {
        return Err(unknown());
    }
    cache
        .verify(identity, assertion, host, now)
        .map_err(|e| e.to_string())
}

/// Decides a request that carries an API key, on a resource that accepts keys: the key must be
/// one control pushed for this hostname (compared by digest, in constant time); its assertion is
/// checked as any session token (signature, expiry, the user not disabled or cut off) and the
/// policy applies to its user. The key itself never reaches the app.
fn check_api_key(
    identity: &EdgeIdentity,
    cache: &TokenCache,
    policy: &AccessPolicy,
    headers: &mut HeaderMap,
    ask: &Ask<'_>,
    key: Result<String, &'static str>,
) -> Result<Arc<SessionClaims>, AuthResponse> {
    let refused = |why: String| {
        tracing::warn!(host = ask.host, reason = %why, "API key refused");
        let description = format!("the API key was refused: {why}");
        let mut r = refusal(
            headers,
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            &description,
        );
        let challenge = format!(
            "Bearer realm=\"{}\", error=\"invalid_token\", error_description=\"{description}\"",
            ask.host
        );
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        mark(r, None, format!("API key refused: {why}"))
    };
    let unknown = "unknown, revoked, expired or not accepted here";
    let key = key.map_err(|why| refused(why.into()))?;
    let key = key.as_str();
    let Some(id) = embedded_id(API_KEY_PREFIX, key) else {
        return Err(refused("malformed".into()));
    };
    let Some((digest, assertion)) = identity.api_keys.get(&(id, ask.host.to_owned())) else {
        return Err(refused(unknown.into()));
    };
    if !bool::from(secret_digest(key).as_bytes().ct_eq(digest.as_bytes())) {
        return Err(refused(unknown.into()));
    }
    let claims = cache
        .verify(identity, assertion, ask.host, ask.now)
        .map_err(|e| refused(e.to_string()))?;
    let service = claims.amr.iter().any(|a| a == SERVICE_KEY_AMR);
    if !service && !policy.api_keys {
        return Err(refused(unknown.into()));
    }
    if !policy.allows_claims(&claims, ask.resource) {
        return Err(denied(headers, ask, &claims));
    }
    for name in [
        header::AUTHORIZATION.as_str(),
        API_KEY_HEADER,
        CLIENT_ID_HEADER,
        CLIENT_SECRET_HEADER,
        CF_CLIENT_ID_HEADER,
        CF_CLIENT_SECRET_HEADER,
    ] {
        headers.remove(name);
    }
    strip_own_cookies(headers);
    add_identity_headers(headers, policy.identity_headers, &claims, assertion);
    Ok(claims)
}

/// The answer to a request without a usable session: a browser is sent to sign in, anything else
/// gets 401.
fn sign_in_needed(
    identity: &EdgeIdentity,
    headers: &HeaderMap,
    ask: &Ask<'_>,
    why: Option<TokenError>,
) -> AuthResponse {
    let browser = wants_html(headers) && matches!(*ask.method, Method::GET | Method::HEAD);
    if !browser {
        let (error, description) = match &why {
            None => ("", "sign-in required".to_owned()),
            Some(e) => (
                "invalid_token",
                format!("the session token was refused: {e}"),
            ),
        };
        let mut r = refusal(
            headers,
            StatusCode::UNAUTHORIZED,
            if error.is_empty() {
                "unauthorized"
            } else {
                error
            },
            &format!(
                "{description}: open {}://{}/ in a browser to sign in",
                ask.proto, ask.authority
            ),
        );
        let challenge = if ask.mcp {
            mcp_challenge(
                ask,
                (!error.is_empty()).then_some((error, description.as_str())),
            )
        } else if error.is_empty() {
            format!("Bearer realm=\"{}\"", ask.host)
        } else {
            format!(
                "Bearer realm=\"{}\", error=\"{error}\", error_description=\"{description}\"",
                ask.host
            )
        };
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        return r;
    }
    if !ask.control_up {
        return html(
            StatusCode::SERVICE_UNAVAILABLE,
            "Sign-in is unavailable right now",
            &format!(
                "<p>{} needs you to sign in, and the sign-in service cannot be reached from here \
                 right now. People who are already signed in keep their access.</p>\
                 <p>Try again in a minute.</p>",
                html_escape(ask.host)
            ),
        );
    }
    // Keep the browser's nonce if it has one (several tabs signing in at once).
    let existing = cookie(headers, NONCE_COOKIE).filter(|n| n.len() == 43);
    let nonce = existing.map_or_else(random_nonce, str::to_owned);
    let rd = format!("{}://{}{}", ask.proto, ask.authority, ask.path_and_query);
    let location = format!(
        "{}?rd={}&n={}",
        identity.sign_in_url,
        url::form_urlencoded::byte_serialize(rd.as_bytes()).collect::<String>(),
        nonce_hash(&nonce)
    );
    let mut r = text(StatusCode::FOUND, format!("sign in at {location}\n"));
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    if existing.is_none() {
        set_cookie(
            &mut r,
            format!(
                "{NONCE_COOKIE}={nonce}; Path=/; Max-Age={NONCE_LIFE_SECS}; HttpOnly; SameSite=Lax{}",
                secure_attr(ask.proto)
            ),
        );
    }
    if why.is_some() {
        set_cookie(
            &mut r,
            format!(
                "{SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax{}",
                secure_attr(ask.proto)
            ),
        );
    }
    r
}

/// The gateway's own paths on a resource hostname: the sign-in callback, sign-out and the JWKS.
/// `None`: not one of them.
pub fn endpoint(
    identity: Option<&EdgeIdentity>,
    cache: &TokenCache,
    headers: &HeaderMap,
    ask: &Ask<'_>,
    form: Option<&[u8]>,
) -> Option<AuthResponse> {
    let (path, query) = ask
        .path_and_query
        .split_once('?')
        .unwrap_or((ask.path_and_query, ""));
    if ask.mcp
        && (path == RESOURCE_METADATA_PATH
            || path.starts_with(&format!("{RESOURCE_METADATA_PATH}/")))
    {
        let Some(identity) = identity else {
            return Some(text(
                StatusCode::SERVICE_UNAVAILABLE,
                "authorization is not configured on this gateway yet\n".into(),
            ));
        };
        return Some(resource_metadata(identity, ask, path));
    }
    if path == kakuremichi_proto::identity::JWKS_PATH {
        let identity = identity?;
        let mut r = text(StatusCode::OK, String::new());
        *r.body_mut() = identity.jwks();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r.headers_mut().insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=300"),
        );
        return Some(r);
    }
    let action = path.strip_prefix(GATEWAY_AUTH_PREFIX)?;
    let Some(identity) = identity else {
        return Some(text(
            StatusCode::NOT_FOUND,
            "sign-in is not configured for this site\n".into(),
        ));
    };
    if let Some(secret) = action.strip_prefix("share/") {
        if ask.method != Method::GET && ask.method != Method::HEAD {
            return Some(text(
                StatusCode::METHOD_NOT_ALLOWED,
                "open a share link with GET\n".into(),
            ));
        }
        return Some(open_share_link(identity, headers, ask, secret));
    }
    Some(match (action, ask.method) {
        ("callback", &Method::GET) => callback(identity, cache, headers, ask, query),
        ("sign-out", &Method::GET) => sign_out_page(headers),
        ("sign-out", &Method::POST) => sign_out(identity, headers, ask, form.unwrap_or_default()),
        _ => text(StatusCode::NOT_FOUND, "no such sign-in page\n".into()),
    })
}

/// A share link opened on this hostname: the browser gets a nonce cookie and goes to control,
/// which counts the use and sends it back to the callback with a session token bound to that
/// nonce. Opening a link needs control; a session it opened does not.
fn open_share_link(
    identity: &EdgeIdentity,
    headers: &HeaderMap,
    ask: &Ask<'_>,
    secret: &str,
) -> AuthResponse {
    if !ask.control_up {
        return html(
            StatusCode::SERVICE_UNAVAILABLE,
            "Share links are unavailable right now",
            &format!(
                "<p>This share link for {} cannot be checked right now: the sign-in service \
                 cannot be reached from here. People who already opened a link keep their \
                 access.</p><p>Try again in a minute.</p>",
                html_escape(ask.host)
            ),
        );
    }
    let existing = cookie(headers, NONCE_COOKIE).filter(|n| n.len() == 43);
    let nonce = existing.map_or_else(random_nonce, str::to_owned);
    let rd = format!("{}://{}/", ask.proto, ask.authority);
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let location = format!(
        "{}/auth/share?t={}&rd={}&n={}",
        identity.issuer.trim_end_matches('/'),
        enc(secret),
        enc(&rd),
        nonce_hash(&nonce)
    );
    let mut r = text(StatusCode::FOUND, "opening the share link\n".into());
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut().insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if existing.is_none() {
        set_cookie(
            &mut r,
            format!(
                "{NONCE_COOKIE}={nonce}; Path=/; Max-Age={NONCE_LIFE_SECS}; HttpOnly; SameSite=Lax{}",
                secure_attr(ask.proto)
            ),
        );
    }
    r
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    url::form_urlencoded::parse(query.as_bytes()).find_map(|(k, v)| (k == name).then_some(v))
}

/// A path on this site to return to: absolute, not protocol-relative.
fn local_path(rd: Option<&str>) -> String {
    match rd {
        Some(p)
            if p.starts_with('/')
                && !p.starts_with("//")
                && !p.contains('\\')
                && !p.starts_with(GATEWAY_AUTH_PREFIX)
                && !p.bytes().any(|b| b.is_ascii_control()) =>
        {
            p.to_owned()
        }
        _ => "/".to_owned(),
    }
}

fn callback(
    identity: &EdgeIdentity,
    cache: &TokenCache,
    headers: &HeaderMap,
    ask: &Ask<'_>,
    query: &str,
) -> AuthResponse {
    let rd = local_path(query_param(query, "rd").as_deref());
    let failed = |why: TokenError| {
        tracing::warn!(host = ask.host, reason = %why, "sign-in callback refused");
        let reason = format!("sign-in grant refused: {why}");
        let r = html(
            StatusCode::BAD_REQUEST,
            "Sign-in did not complete",
            &format!(
                "<p>This sign-in link is not valid here ({}). It may have expired, or been opened \
                 in another browser than the one that started signing in.</p>\
                 <p><a href=\"{}\">Try again</a></p>",
                html_escape(&why.to_string()),
                html_escape(&rd)
            ),
        );
        mark(r, None, reason)
    };
    let Some(token) = query_param(query, "token") else {
        return failed(TokenError::Malformed);
    };
    let claims = match cache.verify(identity, &token, ask.host, ask.now) {
        Ok(c) => c,
        Err(e) => return failed(e),
    };
    if ask.now - claims.iat > GRANT_MAX_AGE_SECS || claims.iat - ask.now > LEEWAY_SECS as i64 {
        return failed(TokenError::GrantTooOld);
    }
    let nonce = cookie(headers, NONCE_COOKIE);
    if !nonce_matches(nonce, &claims) {
        return failed(TokenError::Nonce);
    }
    let max_age = (claims.exp - ask.now).max(0);
    tracing::info!(host = ask.host, user_id = %claims.sub, "signed in to a resource");
    let mut r = text(StatusCode::FOUND, format!("signed in; continue at {rd}\n"));
    if let Ok(v) = HeaderValue::from_str(&rd) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    let secure = secure_attr(ask.proto);
    set_cookie(
        &mut r,
        format!(
            "{SESSION_COOKIE}={token}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}"
        ),
    );
    // The nonce lives as long as the session it binds.
    set_cookie(
        &mut r,
        format!(
            "{NONCE_COOKIE}={}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}",
            nonce.unwrap_or_default()
        ),
    );
    r
}

/// The sign-out form's CSRF token: derived from the browser's HttpOnly nonce cookie, which a
/// page on another site can neither read nor send from a cross-site POST (SameSite=Lax).
fn sign_out_token(headers: &HeaderMap) -> String {
    nonce_hash(&format!(
        "sign-out:{}",
        cookie(headers, NONCE_COOKIE).unwrap_or_default()
    ))
}

fn sign_out_page(headers: &HeaderMap) -> AuthResponse {
    html(
        StatusCode::OK,
        "Sign out",
        &format!(
            "<form method=\"post\" action=\"{GATEWAY_AUTH_PREFIX}sign-out\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <button type=\"submit\">Sign out of this site</button></form>",
            sign_out_token(headers)
        ),
    )
}

fn sign_out(
    identity: &EdgeIdentity,
    headers: &HeaderMap,
    ask: &Ask<'_>,
    form: &[u8],
) -> AuthResponse {
    let sent = url::form_urlencoded::parse(form)
        .find_map(|(k, v)| (k == "csrf").then(|| v.into_owned()))
        .unwrap_or_default();
    if cookie(headers, NONCE_COOKIE).is_none()
        || !bool::from(sent.as_bytes().ct_eq(sign_out_token(headers).as_bytes()))
    {
        tracing::warn!(
            host = ask.host,
            "sign-out refused: CSRF token missing or wrong"
        );
        return html(
            StatusCode::FORBIDDEN,
            "Sign out",
            &format!(
                "<p>This sign-out form expired.</p><p><a href=\"{GATEWAY_AUTH_PREFIX}sign-out\">Try again</a></p>"
            ),
        );
    }
    let control_sign_out = identity
        .sign_in_url
        .strip_suffix("/sign-in")
        .map(|base| format!("{base}/sign-out"))
        .unwrap_or_else(|| identity.sign_in_url.clone());
    let mut r = text(
        StatusCode::SEE_OTHER,
        format!("signed out of {}\n", ask.host),
    );
    if let Ok(v) = HeaderValue::from_str(&control_sign_out) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    let secure = secure_attr(ask.proto);
    for name in [SESSION_COOKIE, NONCE_COOKIE] {
        set_cookie(
            &mut r,
            format!("{name}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax{secure}"),
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use kakuremichi_proto::identity::{SigningKey, UserCutoff};
    use ring::signature::KeyPair as _;

    const HOST: &str = "app.localhost";
    const ISS: &str = "http://control.test";
    const NOW: i64 = 1_800_000_000;

    struct Key {
        kid: String,
        pkcs8: Vec<u8>,
        x: String,
    }

    fn key(kid: &str) -> Key {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        Key {
            kid: kid.into(),
            pkcs8: pkcs8.as_ref().to_vec(),
            x: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key()),
        }
    }

    fn identity(keys: &[&Key], revoked: Vec<Uuid>, cutoffs: Vec<UserCutoff>) -> EdgeIdentity {
        EdgeIdentity::new(&GatewayIdentity {
            issuer: ISS.into(),
            sign_in_url: format!("{ISS}/auth/sign-in"),
            keys: keys
                .iter()
                .map(|k| SigningKey {
                    kid: k.kid.clone(),
                    x: k.x.clone(),
                })
                .collect(),
            revoked_sessions: revoked,
            user_cutoffs: cutoffs,
            api_keys: vec![],
        })
    }

    fn claims(user: Uuid, sid: Uuid) -> SessionClaims {
        SessionClaims {
            iss: ISS.into(),
            sub: user.to_string(),
            aud: HOST.into(),
            iat: NOW,
            exp: NOW + 3600,
            sid: sid.to_string(),
            email: "ann@example.com".into(),
            name: "Ann".into(),
            roles: vec!["member".into()],
            nonce: nonce_hash("the-nonce"),
            amr: vec!["pwd".into()],
            scope: String::new(),
        }
    }

    fn sign(k: &Key, c: &SessionClaims) -> String {
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = Some(k.kid.clone());
        jsonwebtoken::encode(&h, c, &EncodingKey::from_ed_der(&k.pkcs8)).unwrap()
    }

    #[test]
    fn tokens_are_checked_for_key_issuer_audience_expiry_and_revocation() {
        let k1 = key("k1");
        let other = key("k2");
        let (user, sid) = (Uuid::new_v4(), Uuid::new_v4());
        let good = claims(user, sid);
        let id = identity(&[&k1], vec![], vec![]);
        let cache = TokenCache::default();
        let token = sign(&k1, &good);
        assert_eq!(*cache.verify(&id, &token, HOST, NOW).unwrap(), good);
        assert_eq!(cache.len(), 1, "verified once, then cached");
        assert_eq!(*cache.verify(&id, &token, HOST, NOW).unwrap(), good);
        assert_eq!(
            cache.verify(&id, &token, "other.localhost", NOW),
            Err(TokenError::WrongAudience)
        );
        assert_eq!(
            cache.verify(&id, &token, HOST, NOW + 3600 + 31),
            Err(TokenError::Expired)
        );
        assert_eq!(
            cache.verify(&id, &sign(&other, &good), HOST, NOW),
            Err(TokenError::UnknownKey)
        );
        // Another key under a trusted kid: the signature does not verify.
        let forged = sign(
            &Key {
                kid: "k1".into(),
                ..key("x")
            },
            &good,
        );
        assert_eq!(
            cache.verify(&id, &forged, HOST, NOW),
            Err(TokenError::BadSignature)
        );
        let mut bad_iss = good.clone();
        bad_iss.iss = "http://evil".into();
        assert_eq!(
            cache.verify(&id, &sign(&k1, &bad_iss), HOST, NOW),
            Err(TokenError::WrongIssuer)
        );
        assert_eq!(
            cache.verify(&id, "a.b.c", HOST, NOW),
            Err(TokenError::Malformed)
        );
        assert_eq!(cache.verify(&id, "", HOST, NOW), Err(TokenError::Malformed));
        let unsigned = format!("eyJhbGciOiJub25lIn0.{}.", token.split('.').nth(1).unwrap());
        assert_eq!(
            cache.verify(&id, &unsigned, HOST, NOW),
            Err(TokenError::Malformed)
        );

        // Revocations arrive with the next snapshot and apply to cached tokens too.
        let revoked = identity(&[&k1], vec![sid], vec![]);
        assert_eq!(
            cache.verify(&revoked, &token, HOST, NOW),
            Err(TokenError::Revoked)
        );
        let cut = identity(
            &[&k1],
            vec![],
            vec![UserCutoff {
                user,
                not_before: NOW + 1,
                disabled: false,
            }],
        );
        assert_eq!(
            cache.verify(&cut, &token, HOST, NOW),
            Err(TokenError::Revoked)
        );
        let later = identity(
            &[&k1],
            vec![],
            vec![UserCutoff {
                user,
                not_before: NOW,
                disabled: false,
            }],
        );
        assert!(
            cache.verify(&later, &token, HOST, NOW).is_ok(),
            "issued at the cutoff second"
        );
        let disabled = identity(
            &[&k1],
            vec![],
            vec![UserCutoff {
                user,
                not_before: 0,
                disabled: true,
            }],
        );
        assert_eq!(
            cache.verify(&disabled, &token, HOST, NOW),
            Err(TokenError::Disabled)
        );
        // A key dropped from the config stops verifying its cached tokens.
        let rotated = identity(&[&other], vec![], vec![]);
        assert_eq!(
            cache.verify(&rotated, &token, HOST, NOW),
            Err(TokenError::UnknownKey)
        );
        // Key rotation with overlap: both keys verify.
        let both = identity(&[&other, &k1], vec![], vec![]);
        assert!(cache.verify(&both, &token, HOST, NOW).is_ok());
        assert!(cache.verify(&both, &sign(&other, &good), HOST, NOW).is_ok());
    }

    fn ask<'a>(method: &'a Method, path: &'a str, control_up: bool) -> Ask<'a> {
        Ask {
            host: HOST,
            authority: "app.localhost:8080",
            proto: "http",
            method,
            path_and_query: path,
            now: NOW,
            control_up,
            client: std::net::Ipv4Addr::LOCALHOST.into(),
            resource: uuid::Uuid::nil(),
            mcp: false,
        }
    }

    /// A browser's request with `token` and `nonce` as its cookies, and one cookie of the app's.
    fn signed_in(token: &str, nonce: &str) -> HeaderMap {
        headers(&[(
            "cookie",
            &format!("{SESSION_COOKIE}={token}; app=1; {NONCE_COOKIE}={nonce}"),
        )])
    }

    /// A gateway's identity config, its token cache, a member's session token (bound to the
    /// nonce `the-nonce`) and a policy that lets members in.
    fn a_member_signed_in() -> (EdgeIdentity, TokenCache, String, AccessPolicy) {
        let k1 = key("k1");
        let id = identity(&[&k1], vec![], vec![]);
        let token = sign(&k1, &claims(Uuid::new_v4(), Uuid::new_v4()));
        let policy = AccessPolicy {
            roles: vec!["member".into()],
            ..Default::default()
        };
        (id, TokenCache::default(), token, policy)
    }

    #[test]
    fn a_cached_session_still_needs_its_own_nonce_and_gets_the_headers_of_each_style() {
        let (id, cache, token, mut policy) = a_member_signed_in();
        let get = Method::GET;
        let run = |policy: &AccessPolicy, nonce: &str| {
            let mut h = signed_in(&token, nonce);
            check(Some(&id), &cache, policy, &mut h, &ask(&get, "/", true)).map(|_| h)
        };
        for _ in 0..2 {
            let h = run(&policy, "the-nonce").expect("signed in");
            assert_eq!(h[ASSERTION_HEADER], token.as_str());
            assert_eq!(h["remote-user"], "ann@example.com");
            assert_eq!(h["remote-name"], "Ann");
            assert_eq!(h["remote-groups"], "member");
            assert_eq!(
                h["cookie"], "app=1",
                "the gateway's own cookies never reach the app"
            );
            // Once a nonce matched, another one is still refused (the cache remembers the
            // right one, not "checked").
            assert!(run(&policy, "another-nonce").is_err());
            assert!(run(&policy, "the-nonc").is_err());
            assert!(run(&policy, "").is_err());
        }
        policy.identity_headers = IdentityHeaders::Oauth2Proxy;
        let h = run(&policy, "the-nonce").expect("signed in");
        assert_eq!(h["x-forwarded-email"], "ann@example.com");
        assert!(h.get("remote-user").is_none());
        policy.identity_headers = IdentityHeaders::None;
        let h = run(&policy, "the-nonce").expect("signed in");
        assert_eq!(h[ASSERTION_HEADER], token.as_str());
        assert!(h.get("x-forwarded-email").is_none() && h.get("remote-user").is_none());
        // Only the gateway's cookies: the header goes.
        let mut h = headers(&[(
            "cookie",
            &format!("{SESSION_COOKIE}={token}; {NONCE_COOKIE}=the-nonce"),
        )]);
        check(Some(&id), &cache, &policy, &mut h, &ask(&get, "/", true)).expect("signed in");
        assert!(h.get("cookie").is_none());
        assert_eq!(cache.len(), 1);
    }

    /// What a signed-in request costs the gateway's check, printed:
    /// `cargo test --release -p kakuremichi-gateway --lib auth::tests::check_cost -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore]
    fn check_cost() {
        let (id, cache, token, policy) = a_member_signed_in();
        let get = Method::GET;
        // As a browser sends them: the gateway's two cookies only.
        let base = headers(&[(
            "cookie",
            &format!("{SESSION_COOKIE}={token}; {NONCE_COOKIE}=the-nonce"),
        )]);
        const N: u32 = 200_000;
        let t = std::time::Instant::now();
        for _ in 0..N {
            let h = std::hint::black_box(base.clone());
            drop(h);
        }
        let copy = t.elapsed() / N;
        let t = std::time::Instant::now();
        for _ in 0..N {
            let mut h = base.clone();
            check(Some(&id), &cache, &policy, &mut h, &ask(&get, "/", true)).unwrap();
            drop(std::hint::black_box(h));
        }
        println!(
            "check: {:?} per request (beside {copy:?} to copy and drop the headers)",
            t.elapsed() / N - copy
        );
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn api_keys_reach_resources_that_accept_them_as_their_user_and_never_reach_the_app() {
        let k1 = key("k1");
        let user = Uuid::from_u128(1);
        let key_id = Uuid::from_u128(0x4b);
        let secret = format!("kmk_{}_thesecretpart", key_id.simple());
        let mut c = claims(user, key_id);
        c.nonce = String::new();
        c.amr = vec!["api_key".into()];
        let assertion = sign(&k1, &c);
        let mut g = GatewayIdentity {
            issuer: ISS.into(),
            sign_in_url: format!("{ISS}/auth/sign-in"),
            keys: vec![SigningKey {
                kid: k1.kid.clone(),
                x: k1.x.clone(),
            }],
            revoked_sessions: vec![],
            user_cutoffs: vec![],
            api_keys: vec![kakuremichi_proto::identity::EdgeApiKey {
                id: key_id,
                host: HOST.into(),
                digest: secret_digest(&secret),
                assertion: assertion.clone(),
            }],
        };
        let id = EdgeIdentity::new(&g);
        let cache = TokenCache::default();
        let mut policy = AccessPolicy {
            roles: vec!["member".into()],
            api_keys: true,
            ..Default::default()
        };
        let get = Method::GET;
        let bearer = format!("Bearer {secret}");
        for sent in [
            ("authorization", bearer.as_str()),
            ("x-api-key", secret.as_str()),
        ] {
            let mut h = headers(&[sent, ("cookie", "a=b")]);
            let got = check(Some(&id), &cache, &policy, &mut h, &ask(&get, "/x", true))
                .unwrap()
                .unwrap();
            assert_eq!(got.sub, user.to_string());
            assert_eq!(h[ASSERTION_HEADER], assertion.as_str());
            assert_eq!(h["remote-user"], "ann@example.com");
            assert!(
                !h.contains_key("authorization") && !h.contains_key("x-api-key"),
                "{h:?}"
            );
        }
        let refused = |policy: &AccessPolicy, id: &EdgeIdentity, sent: &str| {
            let mut h = headers(&[("authorization", sent)]);
            check(Some(id), &cache, policy, &mut h, &ask(&get, "/x", true)).unwrap_err()
        };
        // A wrong secret, another key, a malformed one: 401 invalid_token, never a redirect.
        let wrong = format!("Bearer kmk_{}_notthesecret", key_id.simple());
        let other = format!("Bearer kmk_{}_thesecretpart", Uuid::from_u128(9).simple());
        for sent in [wrong.as_str(), other.as_str(), "Bearer kmk_short_x"] {
            let r = refused(&policy, &id, sent);
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{sent}");
            assert!(r.headers()[header::WWW_AUTHENTICATE]
                .to_str()
                .unwrap()
                .contains("invalid_token"));
            assert!(r.extensions().get::<Refused>().is_some());
        }
        // The policy applies to the key's user.
        let strict = AccessPolicy {
            roles: vec!["admin".into()],
            api_keys: true,
            ..Default::default()
        };
        assert_eq!(
            refused(&strict, &id, &bearer).status(),
            StatusCode::FORBIDDEN
        );
        // A disabled user's key stops, as their sessions do.
        g.user_cutoffs = vec![UserCutoff {
            user,
            not_before: 0,
            disabled: true,
        }];
        let off = EdgeIdentity::new(&g);
        assert_eq!(
            refused(&policy, &off, &bearer).status(),
            StatusCode::UNAUTHORIZED
        );
        // A resource that does not accept keys ignores them: sign in as usual (401 for a script).
        policy.api_keys = false;
        let r = refused(&policy, &id, &bearer);
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(!r.headers()[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .contains("invalid_token"));
        // The assertion is no session cookie: it has no nonce to match.
        let jar = format!("kakuremichi_session={assertion}; kakuremichi_nonce=x");
        let mut h = headers(&[("cookie", jar.as_str())]);
        assert!(check(Some(&id), &cache, &policy, &mut h, &ask(&get, "/x", true)).is_err());
    }

    #[test]
    fn service_keys_reach_resources_that_name_them_by_bearer_or_the_header_pair() {
        let k1 = key("k1");
        let key_id = Uuid::from_u128(0x5e);
        let secret = format!("kmk_{}_machine", key_id.simple());
        let mut c = claims(key_id, key_id);
        c.nonce = String::new();
        c.email = String::new();
        c.name = "ci deploy".into();
        c.roles = vec![];
        c.amr = vec![SERVICE_KEY_AMR.into()];
        let assertion = sign(&k1, &c);
        let g = GatewayIdentity {
            issuer: ISS.into(),
            sign_in_url: format!("{ISS}/auth/sign-in"),
            keys: vec![SigningKey {
                kid: k1.kid.clone(),
                x: k1.x.clone(),
            }],
            revoked_sessions: vec![],
            user_cutoffs: vec![],
            api_keys: vec![kakuremichi_proto::identity::EdgeApiKey {
                id: key_id,
                host: HOST.into(),
                digest: secret_digest(&secret),
                assertion: assertion.clone(),
            }],
        };
        let id = EdgeIdentity::new(&g);
        let cache = TokenCache::default();
        let policy = AccessPolicy {
            roles: vec!["admin".into()],
            service_keys: vec![key_id],
            ..Default::default()
        };
        let get = Method::GET;
        let bearer = format!("Bearer {secret}");
        let key_text = key_id.to_string();
        let simple = key_id.simple().to_string();
        for sent in [
            vec![("authorization", bearer.as_str())],
            vec![
                ("kakuremichi-access-client-id", key_text.as_str()),
                ("kakuremichi-access-client-secret", secret.as_str()),
            ],
            vec![
                ("cf-access-client-id", simple.as_str()),
                ("cf-access-client-secret", secret.as_str()),
            ],
        ] {
            let mut h = headers(&sent);
            let got = check(Some(&id), &cache, &policy, &mut h, &ask(&get, "/x", true))
                .unwrap()
                .unwrap();
            assert_eq!(got.sub, key_text);
            assert_eq!(h[ASSERTION_HEADER], assertion.as_str());
            assert_eq!(h["remote-user"], key_text.as_str());
            assert_eq!(h["remote-name"], "ci deploy");
            for (name, _) in &sent {
                assert!(!h.contains_key(*name), "{name} reached the app");
            }
        }
        let try_with = |policy: &AccessPolicy, sent: &[(&'static str, &str)]| {
            let mut h = headers(sent);
            check(Some(&id), &cache, policy, &mut h, &ask(&get, "/x", true))
        };
        // A pair whose id is not the secret's: refused, as is the right id with a wrong secret.
        let other = Uuid::from_u128(7).to_string();
        let wrong = format!("kmk_{}_guess", key_id.simple());
        for sent in [
            [
                ("kakuremichi-access-client-id", other.as_str()),
                ("kakuremichi-access-client-secret", secret.as_str()),
            ],
            [
                ("kakuremichi-access-client-id", key_text.as_str()),
                ("kakuremichi-access-client-secret", wrong.as_str()),
            ],
        ] {
            let r = try_with(&policy, &sent).unwrap_err();
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{sent:?}");
        }
        // A policy that does not name the key: 403 naming the key; it is no personal key
        // either, even where personal keys are taken.
        let personal_only = AccessPolicy {
            api_keys: true,
            ..Default::default()
        };
        let r = try_with(&personal_only, &[("authorization", &bearer)]).unwrap_err();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(r
            .extensions()
            .get::<Refused>()
            .unwrap()
            .user
            .as_deref()
            .unwrap()
            .contains("ci deploy"));
    }

    #[test]
    fn a_share_link_goes_to_control_with_a_nonce_and_needs_control_only_to_open() {
        let k1 = key("k1");
        let id = identity(&[&k1], vec![], vec![]);
        let cache = TokenCache::default();
        let get = Method::GET;
        let path = "/.kakuremichi/auth/share/kml_0123_secret";
        let r = endpoint(
            Some(&id),
            &cache,
            &HeaderMap::new(),
            &ask(&get, path, true),
            None,
        )
        .unwrap();
        assert_eq!(r.status(), StatusCode::FOUND);
        let to = r.headers()[header::LOCATION].to_str().unwrap();
        assert!(
            to.starts_with(&format!(
                "{ISS}/auth/share?t=kml_0123_secret&rd=http%3A%2F%2Fapp.localhost%3A8080%2F&n="
            )),
            "{to}"
        );
        let set = r.headers()[header::SET_COOKIE].to_str().unwrap();
        assert!(
            set.starts_with("kakuremichi_nonce=") && set.contains("HttpOnly"),
            "{set}"
        );
        let nonce = set.split(['=', ';']).nth(1).unwrap();
        assert!(to.ends_with(&nonce_hash(nonce)));
        let down = endpoint(
            Some(&id),
            &cache,
            &HeaderMap::new(),
            &ask(&get, path, false),
            None,
        )
        .unwrap();
        assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
        let post = Method::POST;
        let r = endpoint(
            Some(&id),
            &cache,
            &HeaderMap::new(),
            &ask(&post, path, true),
            None,
        )
        .unwrap();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        // A session the link opened passes any policy of the resource it was made for.
        let mut c = claims(Uuid::new_v4(), Uuid::new_v4());
        c.amr = vec![SHARE_LINK_AMR.into()];
        c.email = String::new();
        let strict = AccessPolicy {
            roles: vec!["admin".into()],
            ..Default::default()
        };
        assert!(strict.allows_claims(&c, uuid::Uuid::nil()));
    }

    #[test]
    fn rules_allow_deny_or_ask_for_sign_in_by_path_method_and_client() {
        use kakuremichi_proto::identity::AccessRule;
        let k1 = key("k1");
        let id = identity(&[&k1], vec![], vec![]);
        let cache = TokenCache::default();
        let policy = AccessPolicy {
            rules: vec![
                AccessRule {
                    action: RuleAction::Deny,
                    paths: vec![],
                    methods: vec![],
                    cidrs: vec!["192.0.2.0/24".parse().unwrap()],
                },
                AccessRule {
                    action: RuleAction::Allow,
                    paths: vec!["/hooks/*".into()],
                    methods: vec!["POST".into()],
                    cidrs: vec![],
                },
            ],
            ..Default::default()
        };
        let post = Method::POST;
        let get = Method::GET;
        let run = |method: &Method, path: &str, client: &str, pairs: &[(&'static str, &str)]| {
            let mut h = headers(pairs);
            let mut a = ask(method, path, true);
            a.client = client.parse().unwrap();
            check(Some(&id), &cache, &policy, &mut h, &a).map(|c| (c, h))
        };
        // The webhook passes without a cookie, and the app gets none of the gateway's cookies.
        let (who, h) = run(
            &post,
            "/hooks/github?x=1",
            "203.0.113.1",
            &[("cookie", "kakuremichi_session=x; a=1")],
        )
        .unwrap();
        assert!(who.is_none());
        assert_eq!(h["cookie"], "a=1");
        // Elsewhere, or with another method: sign-in as usual.
        for (m, p) in [(&get, "/hooks/github"), (&post, "/admin")] {
            assert_eq!(
                run(m, p, "203.0.113.1", &[]).unwrap_err().status(),
                StatusCode::UNAUTHORIZED
            );
        }
        // A path that could mean another one: 400, never a bypass.
        for p in ["/hooks/../admin", "/hooks/%2e%2e/admin", "/hooks%2fx"] {
            let r = run(&post, p, "203.0.113.1", &[]).unwrap_err();
            assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{p}");
        }
        // A deny rule by address wins over a signed-in user.
        let token = sign(&k1, &claims(Uuid::new_v4(), Uuid::new_v4()));
        let jar = format!("kakuremichi_session={token}; kakuremichi_nonce=the-nonce");
        assert!(run(&get, "/", "203.0.113.1", &[("cookie", &jar)])
            .unwrap()
            .0
            .is_some());
        let r = run(&get, "/", "192.0.2.9", &[("cookie", &jar)]).unwrap_err();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            r.extensions().get::<Refused>().unwrap().reason,
            "denied by rule 0"
        );
        // A client that asks for JSON gets its refusals as JSON, in control's API's shape.
        let json = [("accept", "application/json")];
        for (client, path, status, code) in [
            ("192.0.2.9", "/", StatusCode::FORBIDDEN, "forbidden"),
            (
                "203.0.113.1",
                "/admin",
                StatusCode::UNAUTHORIZED,
                "unauthorized",
            ),
            (
                "203.0.113.1",
                "/a/../b",
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
        ] {
            let r = run(&get, path, client, &json).unwrap_err();
            assert_eq!(r.status(), status);
            assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
            let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
            assert_eq!(v["error"]["code"], code, "{v}");
            assert!(v["error"]["message"].as_str().unwrap().len() > 10, "{v}");
        }
    }

    #[test]
    fn the_access_check_redirects_browsers_challenges_others_and_adds_identity() {
        let k1 = key("k1");
        let id = identity(&[&k1], vec![], vec![]);
        let cache = TokenCache::default();
        let policy = AccessPolicy {
            roles: vec!["member".into()],
            ..Default::default()
        };
        let get = Method::GET;

        // A browser: redirected to sign in with a fresh nonce cookie bound by its hash.
        let mut h = headers(&[("accept", "text/html")]);
        let r = check(
            Some(&id),
            &cache,
            &policy,
            &mut h,
            &ask(&get, "/x?y=1", true),
        )
        .unwrap_err();
        assert_eq!(r.status(), StatusCode::FOUND);
        let location = r.headers()[header::LOCATION].to_str().unwrap();
        let set = r.headers()[header::SET_COOKIE].to_str().unwrap();
        let nonce = set
            .strip_prefix("kakuremichi_nonce=")
            .unwrap()
            .split(';')
            .next()
            .unwrap();
        assert_eq!(
            location,
            format!(
                "{ISS}/auth/sign-in?rd=http%3A%2F%2Fapp.localhost%3A8080%2Fx%3Fy%3D1&n={}",
                nonce_hash(nonce)
            )
        );
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Lax"),
            "{set}"
        );
        // With control out of reach: a clear page instead.
        let r = check(Some(&id), &cache, &policy, &mut h, &ask(&get, "/", false)).unwrap_err();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        // Not a browser: 401 with a challenge.
        let mut h = headers(&[("accept", "*/*")]);
        let r = check(Some(&id), &cache, &policy, &mut h, &ask(&get, "/", true)).unwrap_err();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            r.headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"app.localhost\""
        );
        // No identity config at all: refused, never let through.
        let r = check(None, &cache, &policy, &mut h, &ask(&get, "/", true)).unwrap_err();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);

        // A session: identity headers added, own cookies removed, others kept.
        let (user, sid) = (Uuid::new_v4(), Uuid::new_v4());
        let token = sign(&k1, &claims(user, sid));
        let cookies = format!("a=1; kakuremichi_session={token}; kakuremichi_nonce=the-nonce; b=2");
        let mut h = headers(&[("cookie", &cookies), ("remote-user", "mallory")]);
        strip_identity_headers(&mut h);
        let c = check(Some(&id), &cache, &policy, &mut h, &ask(&get, "/", true))
            .unwrap()
            .unwrap();
        assert_eq!(c.email, "ann@example.com");
        assert_eq!(h["cookie"], "a=1; b=2");
        assert_eq!(h["remote-user"], "ann@example.com");
        assert_eq!(h["remote-groups"], "member");
        assert_eq!(h[ASSERTION_HEADER], token.as_str());
        // The same token with another nonce cookie: refused.
        let mut h = headers(&[(
            "cookie",
            &format!("kakuremichi_session={token}; kakuremichi_nonce=x"),
        )]);
        let r = check(Some(&id), &cache, &policy, &mut h, &ask(&get, "/", true)).unwrap_err();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        // A role the policy does not allow: 403.
        let strict = AccessPolicy {
            roles: vec!["admin".into()],
            ..Default::default()
        };
        let mut h = headers(&[("cookie", &cookies), ("accept", "text/html")]);
        let r = check(Some(&id), &cache, &strict, &mut h, &ask(&get, "/", true)).unwrap_err();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn the_callback_sets_the_session_only_for_a_fresh_grant_and_the_right_nonce() {
        let k1 = key("k1");
        let id = identity(&[&k1], vec![], vec![]);
        let cache = TokenCache::default();
        let token = sign(&k1, &claims(Uuid::new_v4(), Uuid::new_v4()));
        let get = Method::GET;
        let path = format!("{GATEWAY_AUTH_PREFIX}callback?token={token}&rd=%2Fdeep%3Fq%3D1");
        let h = headers(&[("cookie", "kakuremichi_nonce=the-nonce")]);
        let r = endpoint(Some(&id), &cache, &h, &ask(&get, &path, true), None).unwrap();
        assert_eq!(r.status(), StatusCode::FOUND);
        assert_eq!(r.headers()[header::LOCATION], "/deep?q=1");
        let cookies: Vec<_> = r
            .headers()
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        assert!(
            cookies[0].starts_with(&format!(
                "kakuremichi_session={token}; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax"
            )),
            "{cookies:?}"
        );
        // Wrong nonce, no nonce, a stale grant, an open redirect.
        let wrong = headers(&[("cookie", "kakuremichi_nonce=other")]);
        let r = endpoint(Some(&id), &cache, &wrong, &ask(&get, &path, true), None).unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let r = endpoint(
            Some(&id),
            &cache,
            &HeaderMap::new(),
            &ask(&get, &path, true),
            None,
        )
        .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let mut late = ask(&get, &path, true);
        late.now = NOW + GRANT_MAX_AGE_SECS + 1;
        let r = endpoint(Some(&id), &cache, &h, &late, None).unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        for rd in ["%2F%2Fevil.com", "https%3A%2F%2Fevil.com", "%2F%5Cevil.com"] {
            let p = format!("{GATEWAY_AUTH_PREFIX}callback?token={token}&rd={rd}");
            let r = endpoint(Some(&id), &cache, &h, &ask(&get, &p, true), None).unwrap();
            assert_eq!(r.headers()[header::LOCATION], "/", "{rd}");
        }
        // Sign-out needs the form token derived from the nonce.
        let post = Method::POST;
        let so = format!("{GATEWAY_AUTH_PREFIX}sign-out");
        let r = endpoint(
            Some(&id),
            &cache,
            &h,
            &ask(&post, &so, true),
            Some(b"csrf=nope"),
        )
        .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let form = format!("csrf={}", sign_out_token(&h));
        let r = endpoint(
            Some(&id),
            &cache,
            &h,
            &ask(&post, &so, true),
            Some(form.as_bytes()),
        )
        .unwrap();
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert_eq!(
            r.headers()[header::LOCATION],
            format!("{ISS}/auth/sign-out")
        );
        // Other paths are not the gateway's.
        assert!(endpoint(Some(&id), &cache, &h, &ask(&get, "/app", true), None).is_none());
    }

    #[test]
    fn refusals_are_counted_by_host_client_user_and_reason_and_bounded() {
        let book = Refusals::default();
        let ip = Some(std::net::IpAddr::from([10, 0, 0, 1]));
        let bad = Refused {
            user: None,
            reason: "session token refused: bad signature".into(),
        };
        book.record("app.localhost", ip, &bad, 1000);
        book.record("app.localhost", ip, &bad, 2000);
        let other = Refused {
            user: Some("bob@example.com".into()),
            reason: "not allowed by the resource's policy".into(),
        };
        book.record("app.localhost", ip, &other, 1500);
        let taken = book.take();
        assert_eq!(taken.len(), 2);
        assert_eq!((taken[0].count, taken[0].at_ms), (2, 1000));
        assert_eq!(taken[1].user.as_deref(), Some("bob@example.com"));
        assert!(book.take().is_empty(), "taken once");
        for i in 0..(MAX_REFUSALS + 10) {
            let r = Refused {
                user: None,
                reason: format!("r{i}"),
            };
            book.record("app.localhost", ip, &r, 5000);
        }
        let taken = book.take();
        assert_eq!(taken.len(), MAX_REFUSALS + 1);
        assert_eq!(
            taken.last().map(|r| (r.host.as_str(), r.count)),
            Some(("*", 10))
        );
    }

    #[test]
    fn undelivered_refusals_go_back_and_merge_with_new_ones() {
        let book = Refusals::default();
        let ip = Some(std::net::IpAddr::from([10, 0, 0, 1]));
        let bad = Refused {
            user: None,
            reason: "session token refused: bad signature".into(),
        };
        book.record("app.localhost", ip, &bad, 2000);
        book.record("app.localhost", None, &bad, 2500);
        let lost = book.take();
        // Counted again while the report was on its way, then the report fails.
        book.record("app.localhost", ip, &bad, 3000);
        book.restore(lost);
        let taken = book.take();
        assert_eq!(taken.len(), 2, "{taken:?}");
        assert_eq!(
            (taken[0].client.as_deref(), taken[0].count, taken[0].at_ms),
            (Some("10.0.0.1"), 2, 2000)
        );
        assert_eq!((taken[1].client.as_deref(), taken[1].count), (None, 1));

        // Past the bound, restored ones are counted only, and the "*" line merges.
        for i in 0..(MAX_REFUSALS + 3) {
            let r = Refused {
                user: None,
                reason: format!("r{i}"),
            };
            book.record("app.localhost", ip, &r, 5000);
        }
        let lost = book.take();
        book.record("app.localhost", ip, &bad, 6000);
        book.restore(lost);
        let taken = book.take();
        assert_eq!(taken.len(), MAX_REFUSALS + 1);
        let star = taken.iter().find(|r| r.host == "*").unwrap();
        assert_eq!((star.count, star.at_ms), (4, 5000));
        assert_eq!(
            taken.iter().map(|r| u64::from(r.count)).sum::<u64>(),
            MAX_REFUSALS as u64 + 4
        );
    }

    #[test]
    fn an_mcp_resource_challenges_serves_its_metadata_and_takes_only_its_access_tokens() {
        let k1 = key("k1");
        let id = identity(&[&k1], vec![], vec![]);
        let cache = TokenCache::default();
        let policy = AccessPolicy {
            roles: vec!["member".into()],
            mcp: true,
            ..Default::default()
        };
        let post = Method::POST;
        let mut ask = ask(&post, "/mcp", true);
        ask.mcp = true;

        // No token: 401 naming the metadata (path form) and the scope.
        let mut h = headers(&[("accept", "application/json, text/event-stream")]);
        let r = check(Some(&id), &cache, &policy, &mut h, &ask).unwrap_err();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let challenge = r.headers()[header::WWW_AUTHENTICATE].to_str().unwrap();
        assert_eq!(
            challenge,
            "Bearer resource_metadata=\"http://app.localhost:8080/.well-known/oauth-protected-resource/mcp\", scope=\"mcp\""
        );

        // Metadata, path and root forms.
        let get = Method::GET;
        for (path, resource) in [
            (
                "/.well-known/oauth-protected-resource/mcp",
                "http://app.localhost:8080/mcp",
            ),
            (
                "/.well-known/oauth-protected-resource",
                "http://app.localhost:8080",
            ),
        ] {
            let mut a = super::tests::ask(&get, path, true);
            a.mcp = true;
            let r = endpoint(Some(&id), &cache, &HeaderMap::new(), &a, None).unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            let doc: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
            assert_eq!(doc["resource"], resource);
            assert_eq!(doc["authorization_servers"], serde_json::json!([ISS]));
            assert_eq!(
                doc["bearer_methods_supported"],
                serde_json::json!(["header"])
            );
        }

        // A token for this resource: in, without the token, without an assertion.
        let user = Uuid::new_v4();
        let mut c = claims(user, Uuid::new_v4());
        c.aud = "http://app.localhost:8080/mcp".into();
        c.amr = vec![OAUTH_AMR.into()];
        c.roles = vec!["member".into()];
        c.nonce = String::new();
        c.scope = "profile mcp".into();
        let token = sign(&k1, &c);
        let mut h = headers(&[("authorization", &format!("Bearer {token}"))]);
        let got = check(Some(&id), &cache, &policy, &mut h, &ask)
            .unwrap()
            .unwrap();
        assert_eq!(got.sub, user.to_string());
        assert!(h.get(header::AUTHORIZATION).is_none());
        assert!(h.get(ASSERTION_HEADER).is_none());
        assert_eq!(h["remote-user"], c.email.as_str());

        // Refused, each with 401 invalid_token: another resource's token, a session token (its
        // audience is a hostname), a token without the oauth method.
        let mut other = c.clone();
        other.aud = "http://other.localhost:8080/mcp".into();
        let mut session = c.clone();
        session.aud = HOST.into();
        let mut not_oauth = c.clone();
        not_oauth.amr = vec!["pwd".into()];
        for bad in [other, session, not_oauth] {
            let mut h = headers(&[("authorization", &format!("Bearer {}", sign(&k1, &bad)))]);
            let r = check(Some(&id), &cache, &policy, &mut h, &ask).unwrap_err();
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{bad:?}");
            let challenge = r.headers()[header::WWW_AUTHENTICATE].to_str().unwrap();
            assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
            assert!(
                challenge.starts_with("Bearer resource_metadata="),
                "{challenge}"
            );
        }
        // A valid token without the scope: 403 insufficient_scope, naming it.
        let mut narrow = c.clone();
        narrow.scope = "profile".into();
        let mut h = headers(&[("authorization", &format!("Bearer {}", sign(&k1, &narrow)))]);
        let r = check(Some(&id), &cache, &policy, &mut h, &ask).unwrap_err();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let challenge = r.headers()[header::WWW_AUTHENTICATE].to_str().unwrap();
        assert!(
            challenge.starts_with("Bearer resource_metadata=")
                && challenge.contains("scope=\"mcp\"")
                && challenge.contains("error=\"insufficient_scope\""),
            "{challenge}"
        );
        // A user the policy does not allow: 403.
        let mut stranger = c.clone();
        stranger.roles = vec![];
        let mut h = headers(&[("authorization", &format!("Bearer {}", sign(&k1, &stranger)))]);
        let r = check(Some(&id), &cache, &policy, &mut h, &ask).unwrap_err();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        // A token in the query string: 400, even a good one.
        let q = format!("/mcp?access_token={token}");
        let mut a = super::tests::ask(&post, &q, true);
        a.mcp = true;
        let mut h = HeaderMap::new();
        let r = check(Some(&id), &cache, &policy, &mut h, &a).unwrap_err();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }
}
