//! The route table (hostname -> agent overlay address and port) and `Host` normalization.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use http::{HeaderMap, Uri};
use kakuremichi_proto::identity::AccessPolicy;
use kakuremichi_proto::{AcmeChallenge, Balance, Limits, Route, RouteProtocol, StreamKind};
use uuid::Uuid;

/// Where requests for one hostname (or connections to one public port) go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTarget {
    /// The resource's id (for logs and metrics).
    pub resource_id: Uuid,
    /// The first target: the agent's overlay address and the port leading to the target.
    pub addr: SocketAddrV4,
    /// Every target (`addr` first), balanced by [`crate::balance::BackendPool`].
    pub backends: Vec<SocketAddrV4>,
    /// How requests are spread over the backends.
    pub balance: Balance,
    /// A cookie keeps a client on one backend.
    pub sticky: bool,
    /// What the stream carries: an HTTP exchange or a raw TCP flow.
    pub kind: StreamKind,
    /// Plain-HTTP requests get a redirect to HTTPS.
    pub redirect_https: bool,
    /// HSTS max-age sent over HTTPS.
    pub hsts_max_age: Option<u32>,
    /// The resource's own limits (absent ones are the gateway's).
    pub limits: Limits,
    /// TCP: the backends that expect a PROXY protocol v2 header.
    pub proxy_protocol: Vec<SocketAddrV4>,
    /// HTTP: who may reach the resource; `None` is public.
    pub access: Option<AccessPolicy>,
}

impl RouteTarget {
    /// The target of a route, for streams of `kind`.
    pub fn from_route(r: &Route, kind: StreamKind) -> RouteTarget {
        let addr = SocketAddrV4::new(r.overlay_address, r.port);
        let tcp = kind == StreamKind::Tcp;
        let mut backends = vec![addr];
        let mut proxy_protocol = Vec::new();
        if r.proxy_protocol && tcp {
            proxy_protocol.push(addr);
        }
        for b in &r.more_backends {
            let a = SocketAddrV4::new(b.overlay_address, b.port);
            if !backends.contains(&a) {
                backends.push(a);
                if b.proxy_protocol && tcp {
                    proxy_protocol.push(a);
                }
            }
        }
        RouteTarget {
            resource_id: r.resource_id,
            addr,
            backends,
            balance: r.balance,
            sticky: r.sticky && kind == StreamKind::Http,
            kind,
            redirect_https: r.redirect_https && kind == StreamKind::Http,
            hsts_max_age: r.hsts_max_age.filter(|_| kind == StreamKind::Http),
            limits: r.limits,
            proxy_protocol,
            access: r.access.clone().filter(|_| kind == StreamKind::Http),
        }
    }

    /// Whether `backend` expects a PROXY protocol v2 header.
    pub fn wants_proxy_protocol(&self, backend: SocketAddrV4) -> bool {
        self.proxy_protocol.contains(&backend)
    }

    /// The resource's idle timeout, or `default`.
    pub fn idle_timeout_or(&self, default: std::time::Duration) -> std::time::Duration {
        self.limits.idle_timeout_ms.map_or(default, |ms| {
            std::time::Duration::from_millis(u64::from(ms))
        })
    }

    /// A stream of this route to one of its backends.
    pub fn dial(&self, backend: SocketAddrV4) -> Dial {
        Dial {
            resource_id: self.resource_id,
            addr: backend,
            kind: self.kind,
        }
    }
}

/// One stream to open: to which agent and port, carrying what, for which resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dial {
    /// The resource (nil for health streams).
    pub resource_id: Uuid,
    /// The agent's overlay address and port (0 for health streams).
    pub addr: SocketAddrV4,
    /// What the stream carries.
    pub kind: StreamKind,
}

impl Dial {
    /// The health stream to an agent.
    pub fn health(agent: Ipv4Addr) -> Dial {
        Dial {
            resource_id: Uuid::nil(),
            addr: SocketAddrV4::new(agent, 0),
            kind: StreamKind::Health,
        }
    }
}

/// Hostname (lower case, no port) -> target. Replaced as a whole on every snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    by_host: HashMap<String, Arc<RouteTarget>>,
    acme_http01: HashMap<String, String>,
}

impl RouteTable {
    /// Builds the table from a snapshot's routes.
    pub fn from_routes(routes: &[Route]) -> Self {
        let by_host = routes
            .iter()
            .filter(|r| r.protocol == RouteProtocol::Http)
            .filter_map(|r| {
                let host = normalize_host(&r.hostname)?;
                Some((host, Arc::new(RouteTarget::from_route(r, StreamKind::Http))))
            })
            .collect();
        Self {
            by_host,
            acme_http01: HashMap::new(),
        }
    }

    /// The same table answering these HTTP-01 challenges (token -> key authorization).
    pub fn with_acme_http01(mut self, challenges: &[AcmeChallenge]) -> Self {
        self.acme_http01 = challenges
            .iter()
            .filter_map(|c| match c {
                AcmeChallenge::Http01 {
                    token,
                    key_authorization,
                } => Some((token.clone(), key_authorization.clone())),
                AcmeChallenge::TlsAlpn01 { .. } => None,
            })
            .collect();
        self
    }

    /// The key authorization answering an HTTP-01 token, while control validates it.
    pub fn acme_http01(&self, token: &str) -> Option<&str> {
        self.acme_http01.get(token).map(String::as_str)
    }

    /// The target of a normalized hostname.
    pub fn lookup(&self, host: &str) -> Option<Arc<RouteTarget>> {
        self.by_host.get(host).cloned()
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.by_host.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.by_host.is_empty()
    }
}

/// Lower-cases a hostname and strips a port and a trailing dot. `None` if nothing is left.
pub fn normalize_host(raw: &str) -> Option<String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return None;
    }
    let host = match raw.parse::<http::uri::Authority>() {
        Ok(authority) => authority.host().to_owned(),
        Err(_) => return None,
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() {
        None
    } else {
        Some(host)
    }
}

/// The request's host: the authority of an absolute-form URI wins over the `Host` header
/// (RFC 9112 §3.2.2). `None` when there is neither, or it is not a valid authority.
pub fn request_host(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    if let Some(authority) = uri.authority() {
        return normalize_host(authority.as_str());
    }
    let value = headers.get(http::header::HOST)?.to_str().ok()?;
    normalize_host(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(host: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(host) = host {
            h.insert(http::header::HOST, HeaderValue::from_str(host).unwrap());
        }
        h
    }

    #[test]
    fn host_header_is_normalized() {
        let uri: Uri = "/path?q=1".parse().unwrap();
        assert_eq!(
            request_host(&uri, &headers(Some("Demo.Example.COM"))).as_deref(),
            Some("demo.example.com")
        );
        assert_eq!(
            request_host(&uri, &headers(Some("demo.localhost:8080"))).as_deref(),
            Some("demo.localhost")
        );
        assert_eq!(
            request_host(&uri, &headers(Some("demo.localhost."))).as_deref(),
            Some("demo.localhost")
        );
        assert_eq!(
            request_host(&uri, &headers(Some("[::1]:8080"))).as_deref(),
            Some("[::1]")
        );
        assert_eq!(request_host(&uri, &headers(None)), None);
        assert_eq!(request_host(&uri, &headers(Some(""))), None);
        assert_eq!(request_host(&uri, &headers(Some("a b"))), None);
    }

    #[test]
    fn absolute_form_authority_wins() {
        let uri: Uri = "http://App.Example.com:80/x".parse().unwrap();
        assert_eq!(
            request_host(&uri, &headers(Some("other.example.com"))).as_deref(),
            Some("app.example.com")
        );
    }

    fn table_route(id: Uuid) -> Route {
        Route {
            resource_id: id,
            hostname: "Demo.Localhost".into(),
            protocol: RouteProtocol::Http,
            site_id: Uuid::from_u128(2),
            overlay_address: Ipv4Addr::new(100, 64, 0, 2),
            port: 10000,
            public_port: None,
            redirect_https: false,
            hsts_max_age: None,
            more_backends: vec![
                kakuremichi_proto::Backend {
                    site_id: Uuid::from_u128(3),
                    overlay_address: Ipv4Addr::new(100, 64, 0, 3),
                    port: 10004,
                    proxy_protocol: true,
                },
                kakuremichi_proto::Backend {
                    site_id: Uuid::from_u128(2),
                    overlay_address: Ipv4Addr::new(100, 64, 0, 2),
                    port: 10000,
                    proxy_protocol: false,
                },
            ],
            balance: Balance::LeastOutstanding,
            sticky: true,
            limits: Default::default(),
            proxy_protocol: false,
            access: None,
        }
    }

    #[test]
    fn table_lookup() {
        let id = Uuid::from_u128(1);
        let table = RouteTable::from_routes(&[table_route(id)]);
        assert_eq!(table.len(), 1);
        let t = table.lookup("demo.localhost").unwrap();
        assert_eq!(t.resource_id, id);
        assert_eq!(t.addr, "100.64.0.2:10000".parse().unwrap());
        assert_eq!(
            t.backends,
            vec![
                "100.64.0.2:10000".parse().unwrap(),
                "100.64.0.3:10004".parse().unwrap()
            ],
            "the primary first, duplicates dropped"
        );
        assert_eq!(t.balance, Balance::LeastOutstanding);
        assert!(t.sticky);
        assert!(
            t.proxy_protocol.is_empty(),
            "PROXY protocol is for TCP routes only"
        );
        assert!(table.lookup("other.localhost").is_none());
        let tcp = RouteTarget::from_route(
            &Route {
                protocol: RouteProtocol::Tcp,
                public_port: Some(20000),
                proxy_protocol: false,
                ..table_route(id)
            },
            StreamKind::Tcp,
        );
        assert!(!tcp.wants_proxy_protocol("100.64.0.2:10000".parse().unwrap()));
        assert!(tcp.wants_proxy_protocol("100.64.0.3:10004".parse().unwrap()));
    }
}
