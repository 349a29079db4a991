//! Client ID metadata documents (draft-ietf-oauth-client-id-metadata-document, as the MCP
//! authorization specification of 2025-11-25 uses them): an MCP client whose `client_id` is an
//! `https` URL publishes its metadata there, and control fetches it instead of asking the client
//! to register.
//!
//! Fetching a URL a stranger names is a server-side request forgery risk, so the fetch is narrow:
//! `https` only, no redirects, 5 s at most, 64 KiB at most, a handful at a time, and by default
//! only to public addresses (the host is resolved by a resolver that drops loopback, private,
//! link-local, shared and other special addresses, so a name that resolves inward fails too).
//! Documents are cached as their `Cache-Control: max-age` says, between a minute and a day.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Deserialize;

/// The longest document fetched.
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;
/// How long one fetch may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Documents kept at most.
pub const MAX_CACHED: usize = 1000;
/// Fetches in flight at most.
pub const MAX_FETCHES: usize = 16;
/// Cache time without (or below) `max-age`.
const MIN_TTL: Duration = Duration::from_secs(60);
/// Cache time without `max-age`.
const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// Cache time at most.
const MAX_TTL: Duration = Duration::from_secs(86_400);

/// Which addresses control fetches documents from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reach {
    /// Public addresses only (the default).
    #[default]
    Public,
    /// Any address, loopback and private ones too (a lab, a test).
    Any,
    /// No document is fetched: clients register (RFC 7591) instead.
    Off,
}

impl std::str::FromStr for Reach {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "public" => Ok(Reach::Public),
            "any" => Ok(Reach::Any),
            "off" => Ok(Reach::Off),
            _ => Err(format!("{s:?} is not one of public, any, off")),
        }
    }
}

/// Why a client's metadata cannot be used; each says so plainly to the person at the browser.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    /// This control does not fetch documents.
    #[error("this server does not take URL client IDs; the application must register")]
    Off,
    /// The `client_id` is not a URL a document may be at.
    #[error("the client_id URL is not valid: {0}")]
    BadUrl(String),
    /// The URL's host is, or resolves to, an address control does not fetch from.
    #[error("the client_id URL's host is not on a public address")]
    Blocked,
    /// The fetch failed.
    #[error("the client's metadata could not be fetched: {0}")]
    Fetch(String),
    /// The document is not acceptable.
    #[error("the client's metadata is not valid: {0}")]
    Invalid(String),
}

/// A checked document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientDocument {
    /// The URL, equal to the document's own `client_id`.
    pub client_id: String,
    /// `client_name`, else the URL's host.
    pub client_name: String,
    /// Its redirect URIs (each allowed by [`crate::oauth::check_redirect_uri`]).
    pub redirect_uris: Vec<String>,
}

/// The fetcher and its cache (one per control process).
pub struct ClientMetadata {
    reach: Reach,
    http: Option<reqwest::Client>,
    cache: Mutex<HashMap<String, (Instant, Arc<ClientDocument>)>>,
    fetches: tokio::sync::Semaphore,
}

impl std::fmt::Debug for ClientMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientMetadata")
            .field("reach", &self.reach)
            .field("cached", &self.cache.lock().len())
            .finish()
    }
}

impl Default for ClientMetadata {
    fn default() -> Self {
        Self::new(Reach::default(), &[]).unwrap_or_else(|_| Self::off())
    }
}

impl ClientMetadata {
    /// A fetcher reaching `reach`, trusting the web PKI and `extra_roots` (PEM certificates).
    pub fn new(reach: Reach, extra_roots: &[reqwest::Certificate]) -> Result<Self, String> {
        if reach == Reach::Off {
            return Ok(Self::off());
        }
        let mut b = reqwest::Client::builder()
            .https_only(true)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            .user_agent("kakuremichi")
            .no_proxy();
        for c in extra_roots {
            b = b.add_root_certificate(c.clone());
        }
        if reach == Reach::Public {
            b = b.dns_resolver(Arc::new(PublicOnly));
        }
        let http = b.build().map_err(|e| e.to_string())?;
        Ok(Self {
            reach,
            http: Some(http),
            cache: Mutex::default(),
            fetches: tokio::sync::Semaphore::new(MAX_FETCHES),
        })
    }

    fn off() -> Self {
        Self {
            reach: Reach::Off,
            http: None,
            cache: Mutex::default(),
            fetches: tokio::sync::Semaphore::new(MAX_FETCHES),
        }
    }

    /// Whether documents are fetched (the authorization server metadata says so).
    pub fn enabled(&self) -> bool {
        self.reach != Reach::Off
    }

    /// The checked document at `client_id`, from the cache or fetched.
    pub async fn get(&self, client_id: &str) -> Result<Arc<ClientDocument>, MetadataError> {
        let Some(http) = &self.http else {
            return Err(MetadataError::Off);
        };
        let url = check_client_id(client_id)?;
        if self.reach == Reach::Public {
            if let Some(ip) = host_ip(&url) {
                if !is_public(ip) {
                    return Err(MetadataError::Blocked);
                }
            }
        }
        if let Some((until, doc)) = self.cache.lock().get(client_id) {
            if Instant::now() < *until {
                return Ok(doc.clone());
            }
        }
        let _slot = self
            .fetches
            .try_acquire()
            .map_err(|_| MetadataError::Fetch("too many fetches in progress; try again".into()))?;
        let (doc, ttl) = fetch(http, url, client_id).await?;
        let doc = Arc::new(doc);
        let now = Instant::now();
        let mut cache = self.cache.lock();
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, (until, _)| *until > now);
        }
        if cache.len() >= MAX_CACHED {
            if let Some(oldest) = cache
                .iter()
                .min_by_key(|(_, (u, _))| *u)
                .map(|(k, _)| k.clone())
            {
                cache.remove(&oldest);
            }
        }
        cache.insert(client_id.to_owned(), (now + ttl, doc.clone()));
        Ok(doc)
    }
}

/// Whether a `client_id` names a metadata document rather than a registered client.
pub fn is_url(client_id: &str) -> bool {
    client_id.starts_with("https://")
}

/// Checks a `client_id` URL: `https`, a host, a path other than `/`, no fragment, user info or
/// dot segments, in its normal form (so that "equal" means equal), at most 2000 characters.
pub fn check_client_id(client_id: &str) -> Result<url::Url, MetadataError> {
    let bad = |why: &str| Err(MetadataError::BadUrl(why.to_owned()));
    if client_id.len() > 2000 {
        return bad("longer than 2000 characters");
    }
    let Ok(u) = url::Url::parse(client_id) else {
        return bad("not an absolute URL");
    };
    if u.scheme() != "https" {
        return bad("not https");
    }
    if u.host().is_none() {
        return bad("no host");
    }
    if !u.username().is_empty() || u.password().is_some() || u.fragment().is_some() {
        return bad("it has user info or a fragment");
    }
    if u.path() == "/" || u.path().is_empty() {
        return bad("it needs a path (the document's, not the site's root)");
    }
    let raw_path = client_id
        .split_once("://")
        .and_then(|(_, rest)| rest.find('/').map(|i| &rest[i..]))
        .unwrap_or("");
    let raw_path = raw_path.split(['?', '#']).next().unwrap_or("");
    if raw_path.split('/').any(|s| {
        let s = s.to_ascii_lowercase();
        matches!(s.as_str(), "." | ".." | "%2e" | "%2e%2e" | ".%2e" | "%2e.")
    }) {
        return bad("it has . or .. path segments");
    }
    if u.as_str() != client_id {
        return bad("it is not in normal form (lower-case host, no default port, escaped path)");
    }
    Ok(u)
}

fn host_ip(u: &url::Url) -> Option<IpAddr> {
    match u.host()? {
        url::Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
        url::Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
        url::Host::Domain(_) => None,
    }
}

/// Whether `ip` is an address on the public internet: not loopback, private (RFC 1918, ULA),
/// link-local, shared (RFC 6598, the overlay's default range), unspecified, broadcast,
/// multicast, documentation, benchmarking or reserved; an IPv4-mapped or NAT64 IPv6 address is
/// judged by its IPv4 one.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            if s[0] == 0x64 && s[1] == 0xff9b {
                // 64:ff9b::/96 (NAT64) and 64:ff9b:1::/48 (local NAT64).
                if s[2] == 1 {
                    return false;
                }
                let o = v6.octets();
                return is_public_v4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
            }
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x2001 && s[1] < 0x0200) // IETF protocol assignments (Teredo, ...)
                || s[0] == 0x0100 && s[1] == 0 && s[2] == 0 && s[3] == 0 // discard-only
                || s[0] == 0x2002 // 6to4 wraps any IPv4 address
                || v6.to_ipv4().is_some()) // IPv4-compatible ::a.b.c.d
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || o[0] == 0 // "this network"
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // shared address space, RFC 6598
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking
        || o[0] >= 240) // reserved
}

/// A resolver that answers only public addresses: a name that resolves to an inward one fails,
/// so DNS cannot point control at itself or its network.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = all.into_iter().filter(|a| is_public(a.ip())).collect();
            if public.is_empty() {
                return Err(Box::new(std::io::Error::other(format!(
                    "{host} has no public address"
                )))
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The document as published (RFC 7591 client metadata).
#[derive(Debug, Deserialize)]
struct Published {
    client_id: String,
    #[serde(default)]
    client_name: Option<String>,
    #[serde(default)]
    redirect_uris: Vec<String>,
    #[serde(default)]
    token_endpoint_auth_method: Option<String>,
    #[serde(default)]
    grant_types: Option<Vec<String>>,
    #[serde(default)]
    response_types: Option<Vec<String>>,
    #[serde(default)]
    client_secret: Option<serde_json::Value>,
    #[serde(default)]
    client_secret_expires_at: Option<serde_json::Value>,
}

async fn fetch(
    http: &reqwest::Client,
    url: url::Url,
    client_id: &str,
) -> Result<(ClientDocument, Duration), MetadataError> {
    let fetch_err = |e: reqwest::Error| {
        let chain = crate::sso::error_chain(&e);
        if chain.contains("has no public address") {
            MetadataError::Blocked
        } else {
            MetadataError::Fetch(chain)
        }
    };
    let mut resp = http
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(fetch_err)?;
    let status = resp.status();
    if status.is_redirection() {
        return Err(MetadataError::Fetch(format!(
            "it answered {status}; redirects are not followed"
        )));
    }
    if status != reqwest::StatusCode::OK {
        return Err(MetadataError::Fetch(format!("it answered {status}")));
    }
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_DOCUMENT_BYTES as u64)
    {
        return Err(MetadataError::Invalid(format!(
            "larger than {} KiB",
            MAX_DOCUMENT_BYTES / 1024
        )));
    }
    let ttl = ttl_of(resp.headers());
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(fetch_err)? {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(MetadataError::Invalid(format!(
                "larger than {} KiB",
                MAX_DOCUMENT_BYTES / 1024
            )));
        }
        body.extend_from_slice(&chunk);
    }
    let doc = check_document(client_id, &body)?;
    Ok((doc, ttl))
}

/// How long a document may be kept: its `max-age`, between a minute and a day.
fn ttl_of(h: &reqwest::header::HeaderMap) -> Duration {
    let Some(cc) = h
        .get(reqwest::header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
    else {
        return DEFAULT_TTL;
    };
    let mut ttl = None;
    for d in cc.split(',').map(str::trim) {
        let d = d.to_ascii_lowercase();
        if d == "no-store" || d == "no-cache" {
            return MIN_TTL;
        }
        if let Some(v) = d.strip_prefix("max-age=") {
            ttl = v
                .trim_matches('"')
                .parse::<u64>()
                .ok()
                .map(Duration::from_secs);
        }
    }
    ttl.unwrap_or(DEFAULT_TTL).clamp(MIN_TTL, MAX_TTL)
}

/// Checks a fetched document against the URL it came from.
pub fn check_document(client_id: &str, body: &[u8]) -> Result<ClientDocument, MetadataError> {
    let invalid = |why: String| Err(MetadataError::Invalid(why));
    let doc: Published = match serde_json::from_slice(body) {
        Ok(d) => d,
        Err(e) => return invalid(format!("not a JSON object with a client_id: {e}")),
    };
    if doc.client_id != client_id {
        return invalid(format!(
            "its client_id {:?} is not the URL it is published at",
            doc.client_id
        ));
    }
    if doc.client_secret.is_some() || doc.client_secret_expires_at.is_some() {
        return invalid("it holds a client secret, which a published document must not".into());
    }
    if doc
        .token_endpoint_auth_method
        .as_deref()
        .is_some_and(|m| m != "none")
    {
        return invalid(
            "token_endpoint_auth_method must be none here (public clients with PKCE)".into(),
        );
    }
    if doc.redirect_uris.is_empty() || doc.redirect_uris.len() > crate::oauth::MAX_REDIRECT_URIS {
        return invalid(format!(
            "redirect_uris needs 1 to {} URIs",
            crate::oauth::MAX_REDIRECT_URIS
        ));
    }
    for u in &doc.redirect_uris {
        crate::oauth::check_redirect_uri(u).map_err(MetadataError::Invalid)?;
    }
    if doc.grant_types.as_ref().is_some_and(|g| {
        g.iter()
            .any(|g| g != "authorization_code" && g != "refresh_token")
    }) {
        return invalid("grant_types may hold authorization_code and refresh_token only".into());
    }
    if doc
        .response_types
        .as_ref()
        .is_some_and(|r| r.iter().any(|r| r != "code"))
    {
        return invalid("response_types may hold code only".into());
    }
    let host = url::Url::parse(client_id)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default();
    let name = doc
        .client_name
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .unwrap_or(&host);
    Ok(ClientDocument {
        client_id: doc.client_id,
        client_name: name.chars().filter(|c| !c.is_control()).take(100).collect(),
        redirect_uris: doc.redirect_uris,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_id_urls_are_https_with_a_path_in_normal_form() {
        for ok in [
            "https://app.example.com/oauth/client.json",
            "https://app.example.com:8443/c?v=1",
            "https://127.0.0.1:9443/client.json",
        ] {
            assert!(check_client_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://app.example.com/client.json",
            "https://app.example.com",
            "https://app.example.com/",
            "https://user@app.example.com/c",
            "https://app.example.com/c#frag",
            "https://app.example.com/a/../c",
            "https://app.example.com/a/%2E%2E/c",
            "https://app.example.com/./c",
            "https://APP.example.com/c",
            "https://app.example.com:443/c",
            "not a url",
        ] {
            assert!(
                matches!(check_client_id(bad), Err(MetadataError::BadUrl(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn only_public_addresses_pass() {
        for inward in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "2001:db8::1",
            "ff02::1",
        ] {
            let ip: IpAddr = inward.parse().unwrap();
            assert!(!is_public(ip), "{inward}");
        }
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            let ip: IpAddr = public.parse().unwrap();
            assert!(is_public(ip), "{public}");
        }
    }

    #[tokio::test]
    async fn an_inward_host_is_refused_before_any_fetch() {
        let m = ClientMetadata::new(Reach::Public, &[]).unwrap();
        assert_eq!(
            m.get("https://127.0.0.1:1/client.json").await,
            Err(MetadataError::Blocked)
        );
        assert_eq!(
            m.get("https://[::1]:1/client.json").await,
            Err(MetadataError::Blocked)
        );
        // A name that resolves inward fails in the resolver, before connecting.
        assert_eq!(
            m.get("https://localhost:1/client.json").await,
            Err(MetadataError::Blocked)
        );
        let off = ClientMetadata::new(Reach::Off, &[]).unwrap();
        assert!(!off.enabled());
        assert_eq!(
            off.get("https://app.example.com/c").await,
            Err(MetadataError::Off)
        );
    }

    #[test]
    fn documents_must_name_their_url_and_hold_no_secret() {
        let id = "https://app.example.com/client.json";
        let good = serde_json::json!({"client_id": id, "client_name": "App",
            "redirect_uris": ["http://127.0.0.1/cb"], "token_endpoint_auth_method": "none"});
        let doc = check_document(id, good.to_string().as_bytes()).unwrap();
        assert_eq!(doc.client_name, "App");
        assert_eq!(doc.redirect_uris, ["http://127.0.0.1/cb"]);
        let unnamed =
            serde_json::json!({"client_id": id, "redirect_uris": ["https://app.example.com/cb"]});
        assert_eq!(
            check_document(id, unnamed.to_string().as_bytes())
                .unwrap()
                .client_name,
            "app.example.com"
        );
        for (why, body) in [
            ("other id", serde_json::json!({"client_id": "https://evil.example/c", "redirect_uris": ["http://127.0.0.1/cb"]}).to_string()),
            ("no redirect", serde_json::json!({"client_id": id}).to_string()),
            ("bad redirect", serde_json::json!({"client_id": id, "redirect_uris": ["http://evil.example/cb"]}).to_string()),
            ("secret", serde_json::json!({"client_id": id, "redirect_uris": ["http://127.0.0.1/cb"], "client_secret": "s"}).to_string()),
            ("auth method", serde_json::json!({"client_id": id, "redirect_uris": ["http://127.0.0.1/cb"], "token_endpoint_auth_method": "client_secret_basic"}).to_string()),
            ("grant", serde_json::json!({"client_id": id, "redirect_uris": ["http://127.0.0.1/cb"], "grant_types": ["client_credentials"]}).to_string()),
            ("not json", "<html>".to_owned()),
            ("array", "[]".to_owned()),
        ] {
            assert!(
                matches!(check_document(id, body.as_bytes()), Err(MetadataError::Invalid(_))),
                "{why}"
            );
        }
    }

    #[test]
    fn cache_time_follows_max_age_within_bounds() {
        let h = |v: &str| {
            let mut m = reqwest::header::HeaderMap::new();
            m.insert(reqwest::header::CACHE_CONTROL, v.parse().unwrap());
            m
        };
        assert_eq!(ttl_of(&reqwest::header::HeaderMap::new()), DEFAULT_TTL);
        assert_eq!(
            ttl_of(&h("public, max-age=3600")),
            Duration::from_secs(3600)
        );
        assert_eq!(ttl_of(&h("max-age=5")), MIN_TTL);
        assert_eq!(ttl_of(&h("max-age=999999")), MAX_TTL);
        assert_eq!(ttl_of(&h("no-store")), MIN_TTL);
    }
}
