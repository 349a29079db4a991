//! The agent-sessions endpoint: a hostname serving agentapi-proxy's API.
//!
//! - `/{id}/*`: with an API key (`X-API-Key` or `Authorization: Bearer`) that control pushed
//!   for this hostname, whose user may reach the session, the request goes through the tunnel
//!   to the session's agentapi on its agent ([`StreamKind::Session`]), the `/{id}` prefix
//!   stripped; responses stream as they come (SSE is never buffered).
//! - `/s/{token}/*`: a share link, read-only (`GET`/`HEAD`), no sign-in, until it expires
//!   (410) or is revoked.
//! - `/{id}/.kakuremichi/log`: the session's output, answered by its agent (not on share
//!   links).
//! - `/health` here; everything else (`/start`, `/search`, `/sessions/...`) goes to control's
//!   `/api/v1/sessions`, which decides it.
//!
//! Decisions are local: with control down, live sessions stay reachable by the keys and links
//! of the last snapshot.

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::TryStreamExt as _;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, BodyStream, StreamBody};
use kakuremichi_proto::identity::secret_digest;
use kakuremichi_proto::{SessionRoute, SessionsEndpoint, StreamKind};
use tracing::Instrument as _;
use uuid::Uuid;

use super::{full, BoxError, Proxy, ProxyBody, ProxyError, RequestBody};
use crate::body::Guarded;
use crate::routing::RouteTarget;

/// The endpoint as of one snapshot.
#[derive(Debug)]
pub struct SessionsTable {
    hostname: String,
    control_url: String,
    by_id: HashMap<Uuid, SessionRoute>,
    /// Share digest -> session.
    shares: HashMap<String, Uuid>,
}

impl SessionsTable {
    /// From a snapshot's endpoint.
    pub fn new(e: &SessionsEndpoint) -> SessionsTable {
        SessionsTable {
            hostname: e.hostname.to_ascii_lowercase(),
            control_url: e.control_url.trim_end_matches('/').to_owned(),
            shares: e
                .sessions
                .iter()
                .filter_map(|s| Some((s.share.as_ref()?.digest.clone(), s.id)))
                .collect(),
            by_id: e.sessions.iter().map(|s| (s.id, s.clone())).collect(),
        }
    }

    /// The hostname.
    pub fn hostname(&self) -> &str {
        &self.hostname
    }
}

fn message(status: StatusCode, msg: &str) -> Response<ProxyBody> {
    let mut r = Response::new(full(serde_json::json!({ "message": msg }).to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn cors(r: &mut Response<ProxyBody>) {
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Content-Type, Authorization, X-API-Key, Accept, Last-Event-ID"),
    );
}

/// The session id and the rest of the path of `/{id}/rest`, if the first segment is an id.
fn session_path(path: &str) -> Option<(Uuid, &str)> {
    let p = path.strip_prefix('/')?;
    let (id, rest) = match p.find('/') {
        Some(i) => (&p[..i], &p[i..]),
        None => (p, ""),
    };
    Some((Uuid::try_parse(id).ok()?, rest))
}

impl Proxy {
    /// Sets the sessions endpoint (from each snapshot).
    pub fn set_sessions(&self, endpoint: Option<&SessionsEndpoint>) {
        *self.sessions.write().unwrap_or_else(|e| e.into_inner()) =
            endpoint.map(|e| Arc::new(SessionsTable::new(e)));
    }

    /// The sessions endpoint, if `host` is its hostname.
    pub(super) fn sessions_for(&self, host: &str) -> Option<Arc<SessionsTable>> {
        self.sessions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|t| t.hostname == host)
            .cloned()
    }

    /// Answers one request to the sessions hostname.
    pub(super) async fn handle_sessions(
        &self,
        mut req: Request<RequestBody>,
        client: SocketAddr,
        proto: &'static str,
        table: Arc<SessionsTable>,
    ) -> Response<ProxyBody> {
        let mut r = if req.method() == Method::OPTIONS {
            let mut r = Response::new(full(String::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        } else {
            let path = req.uri().path().to_owned();
            if path == "/health" {
                message(StatusCode::OK, "ok").map(|_| full(r#"{"status":"ok"}"#.into()))
            } else if let Some(rest) = path.strip_prefix("/s/") {
                self.shared(req, client, proto, &table, rest).await
            } else if let Some((id, rest)) = session_path(&path) {
                auth::strip_identity_headers(req.headers_mut());
                match self.session_user(&req, &table) {
                    Err(why) => {
                        tracing::debug!(session_id = %id, %why, "session request refused");
                        message(StatusCode::UNAUTHORIZED, "Authentication required")
                    }
                    Ok(user) => match table.by_id.get(&id).filter(|s| s.users.contains(&user)) {
                        None => message(StatusCode::NOT_FOUND, "Session not found"),
                        Some(s) => {
                            for name in [header::AUTHORIZATION.as_str(), "x-api-key"] {
                                req.headers_mut().remove(name);
                            }
                            let rest = rest.to_owned();
                            self.to_session(req, client, proto, &table, s, &rest).await
                        }
                    },
                }
            } else {
                self.to_control(req, client, &table).await
            }
        };
        cors(&mut r);
        r
    }

    /// The user an API key on the request acts as, if control pushed it for this hostname.
    fn session_user(
        &self,
        req: &Request<RequestBody>,
        table: &SessionsTable,
    ) -> Result<Uuid, String> {
        let identity = self.identity().ok_or("no identity settings yet")?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let claims =
            auth::api_key_claims(&identity, &self.tokens, req.headers(), &table.hostname, now)?;
        Uuid::try_parse(&claims.sub).map_err(|_| "the key belongs to no user".to_owned())
    }

    async fn shared(
        &self,
        mut req: Request<RequestBody>,
        client: SocketAddr,
        proto: &'static str,
        table: &SessionsTable,
        rest: &str,
    ) -> Response<ProxyBody> {
        let (token, tail) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let id = table.shares.get(&secret_digest(token)).copied();
        let Some(s) = id.and_then(|id| table.by_id.get(&id)) else {
            return message(StatusCode::NOT_FOUND, "Invalid share token");
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        if s.share
            .as_ref()
            .and_then(|sh| sh.expires_at_ms)
            .is_some_and(|e| e <= now)
        {
            return message(StatusCode::GONE, "Share link has expired");
        }
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return message(StatusCode::FORBIDDEN, "Shared sessions are read-only");
        }
        if tail.starts_with("/.kakuremichi/") {
            // The agent's own paths (the session's output) are for its owner only.
            return message(StatusCode::NOT_FOUND, "Not found");
        }
        auth::strip_identity_headers(req.headers_mut());
        for name in [header::AUTHORIZATION.as_str(), "x-api-key", "cookie"] {
            req.headers_mut().remove(name);
        }
        req.headers_mut()
            .insert("x-shared-session", HeaderValue::from_static("true"));
        let tail = tail.to_owned();
        self.to_session(req, client, proto, table, s, &tail).await
    }

    /// Forwards a request through the tunnel to a session's agentapi, at `rest`.
    async fn to_session(
        &self,
        mut req: Request<RequestBody>,
        client: SocketAddr,
        proto: &'static str,
        table: &SessionsTable,
        s: &SessionRoute,
        rest: &str,
    ) -> Response<ProxyBody> {
        let accept = req.headers().get(header::ACCEPT).cloned();
        let path = if rest.is_empty() { "/" } else { rest };
        let pq = match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_owned(),
        };
        let Ok(uri) = pq.parse::<http::Uri>() else {
            return message(StatusCode::BAD_REQUEST, "invalid path");
        };
        // Host stays the sessions hostname here (the agent sets the session's own).
        if req.headers().get(header::HOST).is_none() {
            if let Ok(v) = HeaderValue::from_str(&table.hostname) {
                req.headers_mut().insert(header::HOST, v);
            }
        }
        *req.uri_mut() = uri;
        let addr = SocketAddrV4::new(s.overlay_address, 0);
        let target = RouteTarget {
            resource_id: s.id,
            addr,
            backends: vec![addr],
            balance: Default::default(),
            sticky: false,
            kind: StreamKind::Session,
            redirect_https: false,
            hsts_max_age: None,
            limits: Default::default(),
            proxy_protocol: Vec::new(),
            access: None,
        };
        let (head, body) = req.into_parts();
        let (guarded, tripped) = Guarded::new(body, None, Some(self.timeouts.body));
        let req = Request::from_parts(head, guarded.boxed_unsync());
        let span = tracing::debug_span!("session", session_id = %s.id, site_id = %s.site_id);
        match self
            .forward(req, client, proto, &table.hostname, &target, &tripped)
            .instrument(span)
            .await
        {
            Ok(r) => r,
            Err(ProxyError::Offline(_))
            | Err(ProxyError::Timeout(_))
            | Err(ProxyError::Busy(_)) => message(
                StatusCode::BAD_GATEWAY,
                "Bad Gateway: the session's agent cannot be reached",
            ),
            Err(e) => e.response(accept.as_ref()),
        }
    }

    /// Forwards a management request to control's `/api/v1/sessions`, streaming both ways.
    async fn to_control(
        &self,
        req: Request<RequestBody>,
        client: SocketAddr,
        table: &SessionsTable,
    ) -> Response<ProxyBody> {
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let url = format!("{}/api/v1/sessions{pq}", table.control_url);
        let (parts, body) = req.into_parts();
        let mut out = self.control_http.request(parts.method.clone(), &url);
        for (name, value) in &parts.headers {
            if matches!(
                name.as_str(),
                "host"
                    | "connection"
                    | "keep-alive"
                    | "transfer-encoding"
                    | "te"
                    | "upgrade"
                    | "x-forwarded-for"
            ) {
                continue;
            }
            out = out.header(name, value);
        }
        out = out.header("x-forwarded-for", client.ip().to_string());
        let stream = BodyStream::new(body)
            .try_filter_map(|f| async move { Ok(f.into_data().ok()) })
            .map_err(|e: BoxError| e);
        let out = out.body(reqwest::Body::wrap_stream(stream));
        match out.send().await {
            Ok(resp) => {
                let mut r = Response::builder().status(resp.status().as_u16());
                for (name, value) in resp.headers() {
                    if matches!(
                        name.as_str(),
                        "connection"
                            | "keep-alive"
                            | "transfer-encoding"
                            | "access-control-allow-origin"
                    ) {
                        continue;
                    }
                    r = r.header(name.as_str(), value.as_bytes());
                }
                let body = StreamBody::new(
                    resp.bytes_stream()
                        .map_ok(|b: Bytes| hyper::body::Frame::data(b))
                        .map_err(|e| Box::new(e) as BoxError),
                );
                r.body(body.boxed_unsync())
                    .unwrap_or_else(|_| message(StatusCode::BAD_GATEWAY, "Bad Gateway"))
            }
            Err(e) => {
                tracing::warn!(error = %e, "control cannot be reached for a sessions request");
                message(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "control cannot be reached right now; sessions already started stay reachable",
                )
            }
        }
    }
}

use crate::auth;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_paths() {
        let id = Uuid::from_u128(7);
        let p = format!("/{id}/messages");
        assert_eq!(session_path(&p), Some((id, "/messages")));
        assert_eq!(session_path(&format!("/{id}")), Some((id, "")));
        assert_eq!(session_path("/start"), None);
        assert_eq!(session_path("/sessions/x"), None);
    }
}
