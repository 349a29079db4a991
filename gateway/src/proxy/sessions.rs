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
//! - `POST /mcp`: an MCP server (streamable HTTP, JSON answers) with the tools
//!   `list_sessions`, `create_session`, `send_message`, `get_messages`, `delete_session`, for the
//!   key's user: the first two and the last through control, messages through the tunnel.
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

/// Requests that reached sessions, counted per (session, user, client) until the next status
/// report takes them (control writes them to the audit log).
#[derive(Debug, Default)]
pub struct SessionAccessBook {
    by: std::sync::Mutex<HashMap<AccessKey, (i64, u32)>>,
}

type AccessKey = (Uuid, Option<Uuid>, Option<std::net::IpAddr>);

/// At most this many distinct entries wait for a report; more are dropped (and logged).
const MAX_ACCESS_ENTRIES: usize = 4096;

impl SessionAccessBook {
    fn record(&self, session: Uuid, user: Option<Uuid>, client: std::net::IpAddr) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.add(session, user, Some(client), now, 1);
    }

    fn add(
        &self,
        session: Uuid,
        user: Option<Uuid>,
        client: Option<std::net::IpAddr>,
        at: i64,
        n: u32,
    ) {
        let mut by = self.by.lock().unwrap_or_else(|e| e.into_inner());
        let full = by.len() >= MAX_ACCESS_ENTRIES;
        match by.get_mut(&(session, user, client)) {
            Some((first, count)) => {
                *first = (*first).min(at);
                *count = count.saturating_add(n);
            }
            None if full => {
                tracing::warn!(session_id = %session, "too many session accesses waiting for a report: one not audited")
            }
            None => {
                by.insert((session, user, client), (at, n));
            }
        }
    }

    /// Takes what was counted.
    pub fn take(&self) -> Vec<kakuremichi_proto::SessionAccess> {
        let by = std::mem::take(&mut *self.by.lock().unwrap_or_else(|e| e.into_inner()));
        let mut out: Vec<_> = by
            .into_iter()
            .map(|((session_id, user, client), (first_at_ms, count))| {
                kakuremichi_proto::SessionAccess {
                    session_id,
                    user,
                    client,
                    count,
                    first_at_ms,
                }
            })
            .collect();
        out.sort_by_key(|a| (a.first_at_ms, a.session_id));
        out
    }

    /// Puts back what a report could not deliver.
    pub fn restore(&self, list: Vec<kakuremichi_proto::SessionAccess>) {
        for a in list {
            self.add(a.session_id, a.user, a.client, a.first_at_ms, a.count);
        }
    }
}

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
    /// Requests that reached sessions since the last report.
    pub fn session_accesses(&self) -> &SessionAccessBook {
        &self.session_accesses
    }

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
            } else if path == "/mcp" {
                self.mcp(req, client, proto, &table).await
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
                            self.to_session(req, client, proto, &table, s, &rest, Some(user))
                                .await
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

    /// `/mcp`: one JSON-RPC message per `POST`, answered as JSON (a notification: 202).
    async fn mcp(
        &self,
        req: Request<RequestBody>,
        client: SocketAddr,
        proto: &'static str,
        table: &SessionsTable,
    ) -> Response<ProxyBody> {
        if req.method() != Method::POST {
            let mut r = message(StatusCode::METHOD_NOT_ALLOWED, "POST a JSON-RPC message");
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return r;
        }
        let user = match self.session_user(&req, table) {
            Ok(u) => u,
            Err(why) => {
                tracing::debug!(%why, "MCP request refused");
                let mut r = message(StatusCode::UNAUTHORIZED, "Authentication required");
                let challenge = format!("Bearer realm=\"{}\"", table.hostname);
                if let Ok(v) = HeaderValue::from_str(&challenge) {
                    r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
                return r;
            }
        };
        let auth = req
            .headers()
            .get(header::AUTHORIZATION)
            .cloned()
            .or_else(|| {
                let key = req.headers().get("x-api-key")?.to_str().ok()?;
                HeaderValue::from_str(&format!("Bearer {key}")).ok()
            });
        let Some(auth) = auth else {
            return message(StatusCode::UNAUTHORIZED, "Authentication required");
        };
        // An empty body, or one over 1 MiB (read as empty), is a parse error.
        let body = super::read_small_body(req.into_body(), 1 << 20).await;
        let msg: serde_json::Value = match serde_json::from_slice(&body) {
            Ok(v @ serde_json::Value::Object(_)) => v,
            Ok(_) | Err(_) => {
                let e = serde_json::json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": "parse error: one JSON-RPC object per request, at most 1 MiB"}});
                return json_response(StatusCode::BAD_REQUEST, &e);
            }
        };
        let api = EdgeSessions {
            proxy: self,
            table,
            auth,
            user,
            client,
            proto,
        };
        let handled: std::pin::Pin<
            Box<dyn std::future::Future<Output = Option<serde_json::Value>> + Send + '_>,
        > = Box::pin(kakuremichi_client::mcp::handle(&api, &msg));
        match handled.await {
            Some(answer) => json_response(StatusCode::OK, &answer),
            None => {
                let mut r = Response::new(full(String::new()));
                *r.status_mut() = StatusCode::ACCEPTED;
                r
            }
        }
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
        self.to_session(req, client, proto, table, s, &tail, None)
            .await
    }

    /// Forwards a request through the tunnel to a session's agentapi, at `rest`.
    #[allow(clippy::too_many_arguments)] // The request, where it came from, and where it goes.
    async fn to_session(
        &self,
        mut req: Request<RequestBody>,
        client: SocketAddr,
        proto: &'static str,
        table: &SessionsTable,
        s: &SessionRoute,
        rest: &str,
        user: Option<Uuid>,
    ) -> Response<ProxyBody> {
        self.session_accesses.record(s.id, user, client.ip());
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
        let (guarded, tripped) = Guarded::new(body, None, Some(self.timeouts().body));
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

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<ProxyBody> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The sessions API as the gateway serves it to one user: management through control (with the
/// user's own key, so control decides), a session's agentapi through the tunnel (decided here).
struct EdgeSessions<'a> {
    proxy: &'a Proxy,
    table: &'a SessionsTable,
    auth: HeaderValue,
    user: Uuid,
    client: SocketAddr,
    proto: &'static str,
}

type ApiResult<T> = Result<T, kakuremichi_client::ClientError>;

impl EdgeSessions<'_> {
    async fn control(
        &self,
        method: Method,
        path: &str,
        query: &[(String, String)],
        body: Option<serde_json::Value>,
    ) -> ApiResult<serde_json::Value> {
        let url = format!("{}/api/v1/sessions{path}", self.table.control_url);
        let mut r = self
            .proxy
            .control_http
            .request(method, url)
            .header(header::AUTHORIZATION, self.auth.clone())
            .query(query);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await?;
        let status = resp.status().as_u16();
        let v: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
        api_result(status, v)
    }

    async fn session(
        &self,
        method: Method,
        id: &str,
        rest: &str,
        body: Option<String>,
    ) -> ApiResult<serde_json::Value> {
        let s = Uuid::try_parse(id)
            .ok()
            .and_then(|id| self.table.by_id.get(&id))
            .filter(|s| s.users.contains(&self.user))
            .ok_or_else(|| kakuremichi_client::ClientError::Api {
                status: 404,
                message: "Session not found".into(),
            })?;
        let body = full(body.unwrap_or_default());
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = http::Uri::from_static("/");
        req.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        // Boxed as a `Send` future here, where its lifetimes are concrete: the trait's `Send`
        // bound cannot be proved through `forward`'s future otherwise (rust-lang/rust#100013).
        let forwarded: std::pin::Pin<
            Box<dyn std::future::Future<Output = Response<ProxyBody>> + Send + '_>,
        > = Box::pin(self.proxy.to_session(
            req,
            self.client,
            self.proto,
            self.table,
            s,
            rest,
            Some(self.user),
        ));
        let resp = forwarded.await;
        let status = resp.status().as_u16();
        let bytes = super::read_small_body(resp.into_body(), 16 << 20).await;
        let v = serde_json::from_slice(&bytes).unwrap_or_else(
            |_| serde_json::json!({"message": String::from_utf8_lossy(&bytes).trim().to_owned()}),
        );
        api_result(status, v)
    }
}

fn api_result(status: u16, v: serde_json::Value) -> ApiResult<serde_json::Value> {
    if (200..300).contains(&status) {
        return Ok(v);
    }
    let message = v["message"]
        .as_str()
        .or_else(|| v["detail"].as_str())
        .unwrap_or("the request failed")
        .to_owned();
    Err(kakuremichi_client::ClientError::Api { status, message })
}

fn decode<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> ApiResult<T> {
    serde_json::from_value(v).map_err(|e| kakuremichi_client::ClientError::Decode(e.to_string()))
}

impl kakuremichi_client::mcp::Sessions for EdgeSessions<'_> {
    async fn search(
        &self,
        query: &[(String, String)],
    ) -> ApiResult<Vec<kakuremichi_client::Session>> {
        let v = self.control(Method::GET, "/search", query, None).await?;
        decode(v["sessions"].clone())
    }

    async fn start(&self, req: &kakuremichi_client::StartRequest) -> ApiResult<String> {
        let body = serde_json::to_value(req)
            .map_err(|e| kakuremichi_client::ClientError::Invalid(e.to_string()))?;
        let v = self
            .control(Method::POST, "/start", &[], Some(body))
            .await?;
        v["session_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| kakuremichi_client::ClientError::Decode("no session_id".into()))
    }

    async fn send(&self, id: &str, content: &str) -> ApiResult<()> {
        let body = serde_json::json!({"content": content, "type": "user"}).to_string();
        self.session(Method::POST, id, "/message", Some(body))
            .await
            .map(|_| ())
    }

    async fn messages(&self, id: &str) -> ApiResult<Vec<kakuremichi_client::Message>> {
        let v = self.session(Method::GET, id, "/messages", None).await?;
        decode(v["messages"].clone())
    }

    async fn delete(&self, id: &str) -> ApiResult<()> {
        let id = Uuid::try_parse(id).map_err(|_| kakuremichi_client::ClientError::Api {
            status: 404,
            message: "Session not found".into(),
        })?;
        self.control(Method::DELETE, &format!("/sessions/{id}"), &[], None)
            .await
            .map(|_| ())
    }
}

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
