//! Agent sessions: agentapi-proxy's API under `/api/v1/sessions`, so that its clients work
//! unchanged with `https://<control>/api/v1/sessions` (or the gateways' sessions hostname) as
//! their endpoint.
//!
//! `POST /start` stores a session and picks the site whose agent runs it (the one named, else
//! the online site with the fewest live sessions); the agent gets it in its next snapshot and
//! reports its phase, which `/search`, `/sessions/status/stream` and the long polls show.
//! `/{id}/*` is served by gateways only (control is never on the data path): here it is a
//! redirect to the sessions hostname.
//!
//! Who sees what: a personal session its owner and the organization's admins; a team session
//! (`team_id` = a role name in the organization) the members holding that role, and admins.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use crate::api::doc::ApiRouter;
use crate::api::doc::{any, get, post};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::Stream;
use kakuremichi_proto::NodeKind;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::api::ApiPath;
use crate::store::{AgentSession, ApiKey, NewAgentSession, Node};
use crate::{ApiError, AppState};

/// How often the status stream sends a heartbeat comment.
pub const HEARTBEAT: Duration = Duration::from_secs(30);
/// The most environment variables a start request may set.
const MAX_ENV: usize = 200;
/// The most tags a session may carry.
const MAX_TAGS: usize = 64;

/// Session changes as they happen, for the status stream and the long polls.
#[derive(Debug)]
pub struct SessionEvents {
    tx: broadcast::Sender<AgentSession>,
}

impl Default for SessionEvents {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(1024).0,
        }
    }
}

impl SessionEvents {
    /// Tells every listener of a session's new state.
    pub fn publish(&self, s: AgentSession) {
        let _ = self.tx.send(s);
    }

    /// A receiver of every change published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<AgentSession> {
        self.tx.subscribe()
    }
}

/// Records an agent's report of its sessions and tells listeners what changed.
pub async fn on_report(state: &AppState, site: Uuid, states: &[kakuremichi_proto::SessionState]) {
    match state.store.record_session_states(site, states).await {
        Ok(changed) => {
            for s in changed {
                tracing::info!(session_id = %s.id, site_id = %site, status = %s.status, "agent session changed");
                state.session_changed(s).await;
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, site_id = %site, "cannot record agent sessions' states")
        }
    }
}

/// Writes a gateway's counted session accesses to the audit log: one line per session, user
/// and client (`session_access`, outcome `ok` or `ok xN`), in the session's organization.
pub async fn audit_accesses(
    state: &AppState,
    gateway: Uuid,
    accesses: Vec<kakuremichi_proto::SessionAccess>,
) {
    let world = state.world().await.ok();
    for a in accesses.into_iter().take(1000) {
        let org_id = world.as_ref().and_then(|w| {
            w.sessions
                .as_ref()?
                .sessions
                .iter()
                .find(|(s, _)| s.id == a.session_id)
                .map(|(s, _)| s.org_id)
                .or_else(|| w.node(NodeKind::Gateway, gateway).map(|g| g.org_id))
        });
        state
            .audit(crate::store::AuditEntry {
                at: a.first_at_ms,
                actor: match a.user {
                    Some(u) => format!("user:{u}"),
                    None => "share-link".into(),
                },
                action: "session_access".into(),
                target: Some(a.session_id.to_string()),
                outcome: if a.count > 1 {
                    format!("ok x{}", a.count)
                } else {
                    "ok".into()
                },
                client: a.client.map(|c| c.to_string()),
                detail: Some(format!("through gateway:{gateway}")),
                org_id,
            })
            .await;
    }
}

/// The routes under `/api/v1/sessions` that need an API key.
pub fn router() -> ApiRouter<AppState> {
    ApiRouter::new()
        .route("/sessions/start", post(start))
        .route("/sessions/search", get(search))
        .route("/sessions/sessions/status/stream", get(status_stream))
        .route("/sessions/sessions/status/wait", get(status_wait))
        .route("/sessions/sessions/{id}", crate::api::doc::delete(delete))
        .route("/sessions/sessions/{id}/messages/wait", get(messages_wait))
        .route(
            "/sessions/sessions/{id}/share",
            post(share_create).get(share_get).delete(share_delete),
        )
        .route("/sessions/{id}/{*rest}", any(to_gateway))
        .route("/sessions/s/{token}/{*rest}", any(to_gateway_share))
}

/// The routes under `/api/v1/sessions` open to anyone.
pub fn public_router() -> ApiRouter<AppState> {
    ApiRouter::new().route(
        "/sessions/health",
        get(|| async { Json(json!({"status": "ok"})) }),
    )
}

/// The permission a request under `/api/v1/sessions` needs (`rest` after `/sessions`).
pub fn permission(method: &Method, rest: &str) -> &'static str {
    let parts: Vec<&str> = rest.trim_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (_, ["start"]) => "session:create",
        (_, ["search"]) | (_, ["sessions", "status", _]) => "session:list",
        (&Method::DELETE, ["sessions", _]) => "session:delete",
        (&Method::POST | &Method::DELETE, ["sessions", _, "share"]) => "session:create",
        _ => "session:access",
    }
}

/// Who is asking, as far as sessions go.
struct Caller {
    org: Uuid,
    user: Option<Uuid>,
    roles: Vec<String>,
    admin: bool,
    name: String,
}

impl Caller {
    async fn of(state: &AppState, key: &ApiKey) -> Result<Caller, ApiError> {
        let roles = match key.user_id {
            Some(u) => state
                .store
                .member_roles(key.org_id, u)
                .await?
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let admin = match key.user_id {
            // An organization key (not a user's): admin when it holds every permission.
            None => key.scopes.is_none(),
            Some(_) => roles.iter().any(|r| r == "owner" || r == "admin"),
        };
        Ok(Caller {
            org: key.org_id,
            user: key.user_id,
            roles,
            admin,
            name: match key.user_id {
                Some(u) => format!("user:{u}"),
                None => format!("api-key:{}", key.id),
            },
        })
    }

    fn in_team(&self, team: &str) -> bool {
        self.roles.iter().any(|r| r == team)
    }

    /// Whether the caller may see (and use the API on) a session.
    fn sees(&self, s: &AgentSession) -> bool {
        if s.org_id != self.org {
            return false;
        }
        if self.admin {
            return true;
        }
        match &s.team_id {
            Some(team) => self.in_team(team),
            None => s.user_id.is_some() && s.user_id == self.user,
        }
    }

    /// Whether the caller manages a session's share link (its owner, or an admin).
    fn owns(&self, s: &AgentSession) -> bool {
        self.admin || (s.user_id.is_some() && s.user_id == self.user)
    }
}

/// The caller and a session they own (its owner, or an admin), for managing its share link.
async fn owned(
    state: &AppState,
    key: &ApiKey,
    id: &str,
    doing: &str,
) -> Result<(Caller, AgentSession), ApiError> {
    let caller = Caller::of(state, key).await?;
    let s = visible(state, &caller, id).await?;
    if !caller.owns(&s) {
        return Err(ApiError::Forbidden(format!(
            "only the session's owner or an admin may {doing} its share link"
        )));
    }
    Ok((caller, s))
}

async fn visible(state: &AppState, caller: &Caller, id: &str) -> Result<AgentSession, ApiError> {
    let not_found = || ApiError::NotFound("Session not found".into());
    let id = Uuid::parse_str(id).map_err(|_| not_found())?;
    let s = state
        .store
        .agent_session(caller.org, id)
        .await?
        .ok_or_else(not_found)?;
    if caller.sees(&s) {
        Ok(s)
    } else {
        Err(not_found())
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRequest {
    #[serde(default)]
    environment: BTreeMap<String, String>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    #[serde(default)]
    params: serde_json::Map<String, Value>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    team_id: Option<String>,
    /// The site (id or name) to run on; otherwise the least loaded online one.
    #[serde(default)]
    site: Option<String>,
    /// agentapi-proxy's memory tags: accepted, unused.
    #[serde(default)]
    #[allow(dead_code)]
    memory_key: Option<BTreeMap<String, String>>,
    /// agentapi-proxy's session profile: accepted, unused.
    #[serde(default)]
    #[allow(dead_code)]
    session_profile_id: Option<String>,
}

/// Parses a Go duration (`48h`, `1h30m`, `90s`, `500ms`) into seconds (at least 1).
pub fn go_duration_secs(s: &str) -> Option<u64> {
    let mut total_ms: u128 = 0;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let n: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let ms = match &rest[..unit_len] {
            "ms" => 1.0,
            "s" => 1000.0,
            "m" => 60_000.0,
            "h" => 3_600_000.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total_ms += (n * ms) as u128;
    }
    u64::try_from(total_ms.div_ceil(1000))
        .ok()
        .filter(|&s| s > 0)
}

fn check_start(req: &StartRequest) -> Result<(), ApiError> {
    let bad = |m: String| Err(ApiError::BadRequest(m));
    if req.environment.len() > MAX_ENV {
        return bad(format!("environment: at most {MAX_ENV} variables"));
    }
    for (k, v) in &req.environment {
        let valid = !k.is_empty()
            && k.len() <= 256
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return bad(format!("environment: {k:?} is not a valid variable name"));
        }
        if k.starts_with("KAKUREMICHI_") {
            return bad(format!("environment: {k} is reserved"));
        }
        if v.contains('\0') || v.len() > 32 * 1024 {
            return bad(format!(
                "environment: the value of {k} holds a NUL or is over 32 KiB"
            ));
        }
    }
    if req.tags.len() > MAX_TAGS {
        return bad(format!("tags: at most {MAX_TAGS}"));
    }
    for (k, v) in &req.tags {
        if k.is_empty() || k.len() > 128 || v.len() > 1024 {
            return bad(format!(
                "tags: {k:?}: keys 1 to 128 bytes, values up to 1 KiB"
            ));
        }
    }
    for (name, want) in [
        ("message", "a string"),
        ("agent_type", "a string"),
        ("session_ttl", "a string"),
        ("oneshot", "a boolean"),
    ] {
        let Some(v) = req.params.get(name) else {
            continue;
        };
        let ok = if name == "oneshot" {
            v.is_boolean()
        } else {
            v.is_string() || v.is_null()
        };
        if !ok {
            return bad(format!("params.{name} must be {want}"));
        }
    }
    Ok(())
}

async fn start(
    State(state): State<AppState>,
    Extension(key): Extension<ApiKey>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let caller = Caller::of(&state, &key).await?;
    if caller.user.is_none() && !caller.admin {
        // Nobody could see or reach it: a session belongs to a user (or a team of users).
        return Err(ApiError::Forbidden(
            "sessions are started with a user's API key (or an organization key holding every permission)"
                .into(),
        ));
    }
    let req: StartRequest = if body.iter().all(u8::is_ascii_whitespace) {
        StartRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("invalid start request: {e}")))?
    };
    check_start(&req)?;
    let scope = req.scope.as_deref().unwrap_or("user");
    let team_id = match scope {
        "user" => None,
        "team" => {
            let team = req
                .team_id
                .clone()
                .filter(|t| !t.is_empty())
                .ok_or_else(|| ApiError::BadRequest("team_id is required for team scope".into()))?;
            if !(caller.admin || caller.in_team(&team)) {
                return Err(ApiError::Forbidden(format!(
                    "you are not a member of the team {team}"
                )));
            }
            Some(team)
        }
        other => {
            return Err(ApiError::BadRequest(format!(
                "scope must be \"user\" or \"team\", not {other:?}"
            )))
        }
    };
    let ttl_secs = match req.params.get("session_ttl").and_then(Value::as_str) {
        None | Some("") => None,
        Some(t) => Some(go_duration_secs(t).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "params.session_ttl: {t:?} is not a duration such as 48h or 30m"
            ))
        })?),
    };
    let site = choose_site(&state, caller.org, req.site.as_deref(), &req.tags).await?;
    let session = state
        .store
        .create_agent_session(
            NewAgentSession {
                org_id: caller.org,
                user_id: caller.user,
                scope: scope.to_owned(),
                team_id,
                site_id: site,
                tags: req.tags,
                params: Value::Object(req.params),
                ttl_secs: ttl_secs.map(|t| i64::try_from(t).unwrap_or(i64::MAX)),
            },
            &req.environment,
        )
        .await?;
    tracing::info!(session_id = %session.id, site_id = %site, by = %caller.name, "agent session started");
    let id = session.id;
    state.session_changed(session).await;
    Ok(Json(json!({ "session_id": id })))
}

/// The site to run a new session on: the one named (by id or name; it must be online), else
/// of the organization's online sites the one whose labels match most of the session's tags,
/// then the one with the fewest live sessions.
async fn choose_site(
    state: &AppState,
    org: Uuid,
    named: Option<&str>,
    tags: &BTreeMap<String, String>,
) -> Result<Uuid, ApiError> {
    let sites: Vec<_> = state
        .store
        .list_nodes(NodeKind::Agent)
        .await?
        .into_iter()
        .filter(|s| s.org_id == org)
        .map(|s| crate::api::nodes::fresh(state, s))
        .collect();
    if let Some(name) = named.filter(|n| !n.is_empty()) {
        let site = sites
            .iter()
            .find(|s| s.name == name || s.id.to_string() == name)
            .ok_or_else(|| ApiError::NotFound(format!("site {name} not found")))?;
        if !state.hub.is_online(site.id) {
            return Err(ApiError::Conflict(format!(
                "site {} is offline: its agent is not connected",
                site.name
            )));
        }
        return Ok(site.id);
    }
    let load = state.store.live_sessions_per_site().await?;
    let online: Vec<&Node> = sites.iter().filter(|s| state.hub.is_online(s.id)).collect();
    pick_site(&online, tags, &load)
        .ok_or_else(|| ApiError::Conflict("no site is online to run the session".into()))
}

/// Of `sites`, the one whose session labels (from its agent's status reports) match most of
/// the session's `tags`, then the one running the fewest live sessions, then by name.
fn pick_site(
    sites: &[&Node],
    tags: &BTreeMap<String, String>,
    load: &BTreeMap<Uuid, i64>,
) -> Option<Uuid> {
    let matches = |site: &Node| {
        site.last_status.as_ref().map_or(0, |st| {
            st.session_labels
                .iter()
                .filter(|(k, v)| tags.get(*k) == Some(*v))
                .count()
        })
    };
    sites
        .iter()
        .min_by_key(|s| {
            (
                std::cmp::Reverse(matches(s)),
                load.get(&s.id).copied().unwrap_or(0),
                s.name.clone(),
            )
        })
        .map(|s| s.id)
}

pub use crate::times::{parse_time_ms, rfc3339};

/// agentapi-proxy's `SessionResponse`.
fn session_json(s: &AgentSession) -> Value {
    let description = s
        .tags
        .get("description")
        .cloned()
        .or_else(|| {
            s.params
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let mut v = json!({
        "session_id": s.id,
        "user_id": s.user_id.map(|u| u.to_string()).unwrap_or_default(),
        "scope": s.scope,
        "team_id": s.team_id.clone().unwrap_or_default(),
        "status": s.status,
        "started_at": rfc3339(s.started_at),
        "updated_at": rfc3339(s.updated_at),
        "last_message_at": rfc3339(s.last_message_at),
        "addr": "",
        "tags": s.tags,
        "metadata": {"description": description},
        "site_id": s.site_id,
    });
    if let Some(r) = &s.reason {
        v["reason"] = json!(r);
    }
    if let Some(p) = s.port.filter(|p| *p > 0) {
        // The old API's field: the session's port on its agent's loopback.
        v["port"] = json!(p);
    }
    // Ours: whether a share link that has not expired exists (its token only from `/share`).
    let now = crate::store::now_ms();
    if s.share
        .as_ref()
        .is_some_and(|sh| sh.expires_at.is_none_or(|e| e > now))
    {
        v["shared"] = json!(true);
    }
    v
}

async fn search(
    State(state): State<AppState>,
    Extension(key): Extension<ApiKey>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<Value>, ApiError> {
    let caller = Caller::of(&state, &key).await?;
    let mut status = None;
    let mut scope = None;
    let mut team = None;
    let mut tags = Vec::new();
    for (k, v) in &query {
        match k.as_str() {
            "status" => status = Some(v.as_str()),
            "scope" => scope = Some(v.as_str()),
            "team_id" => team = Some(v.as_str()),
            // agentapi-proxy ignores other parameters; so does this.
            k => {
                if let Some(t) = k.strip_prefix("tag.") {
                    tags.push((t, v.as_str()));
                }
            }
        }
    }
    if let Some(s) = scope.filter(|s| !matches!(*s, "user" | "team")) {
        return Err(ApiError::BadRequest(format!(
            "scope must be \"user\" or \"team\", not {s:?}"
        )));
    }
    let want_team = scope == Some("team") || team.is_some();
    let hidden_asked = tags.iter().any(|(k, _)| *k == "hidden");
    let sessions: Vec<Value> = state
        .store
        .agent_sessions(caller.org)
        .await?
        .iter()
        .filter(|s| caller.sees(s))
        .filter(|s| {
            if want_team {
                s.scope == "team" && team.is_none_or(|t| s.team_id.as_deref() == Some(t))
            } else {
                s.scope == "user"
            }
        })
        .filter(|s| status.is_none_or(|st| s.status == st))
        .filter(|s| {
            tags.iter()
                .all(|(k, v)| s.tags.get(*k).map(String::as_str) == Some(v))
        })
        .filter(|s| hidden_asked || s.tags.get("hidden").map(String::as_str) != Some("true"))
        .map(session_json)
        .collect();
    Ok(Json(json!({ "sessions": sessions })))
}

async fn delete(
    State(state): State<AppState>,
    Extension(key): Extension<ApiKey>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let caller = Caller::of(&state, &key).await?;
    let s = visible(&state, &caller, &id).await?;
    let reason = format!("deleted by {}", caller.name);
    if state
        .store
        .end_agent_session(caller.org, s.id, "stopped", Some(&reason))
        .await?
    {
        if let Some(s) = state.store.agent_session(caller.org, s.id).await? {
            state.session_changed(s).await;
        }
    }
    tracing::info!(session_id = %s.id, by = %caller.name, "agent session deleted");
    Ok(Json(json!({
        "message": "Session terminated successfully",
        "session_id": s.id,
        "status": "terminated",
    })))
}

fn status_event(s: &AgentSession) -> Value {
    json!({"session_id": s.id, "status": s.status, "timestamp": rfc3339(s.updated_at)})
}

async fn status_stream(
    State(state): State<AppState>,
    Extension(key): Extension<ApiKey>,
) -> Result<Response, ApiError> {
    let caller = Caller::of(&state, &key).await?;
    let rx = state.session_events.subscribe();
    // The stream ends when control shuts down (a graceful shutdown waits for open streams).
    let shutdown = state.shutdown_signal();
    let stream = futures_util::stream::unfold(
        (rx, caller, shutdown),
        |(mut rx, caller, mut shutdown)| async move {
            loop {
                let next = tokio::select! {
                    n = rx.recv() => n,
                    () = crate::until_set(&mut shutdown) => return None,
                };
                match next {
                    Ok(s) if caller.sees(&s) => {
                        let event = Event::default().data(status_event(&s).to_string());
                        return Some((Ok::<_, Infallible>(event), (rx, caller, shutdown)));
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    );
    Ok(sse(stream, state.session_heartbeat))
}

fn sse(
    stream: impl Stream<Item = Result<Event, Infallible>> + Send + 'static,
    heartbeat: Duration,
) -> Response {
    let mut r = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(heartbeat).text("heartbeat"))
        .into_response();
    r.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-cache"),
    );
    r.headers_mut().insert(
        "x-accel-buffering",
        axum::http::HeaderValue::from_static("no"),
    );
    r
}

#[derive(Debug, Deserialize)]
struct WaitQuery {
    timeout: Option<String>,
    since: Option<String>,
}

fn wait_for(q: &WaitQuery) -> Result<Duration, ApiError> {
    let secs = match q.timeout.as_deref() {
        None | Some("") => 30,
        Some(t) => t.parse::<u64>().map_err(|_| {
            ApiError::BadRequest(format!("timeout: {t:?} is not a number of seconds"))
        })?,
    };
    Ok(Duration::from_secs(secs.clamp(1, 60)))
}

async fn status_wait(
    State(state): State<AppState>,
    Extension(key): Extension<ApiKey>,
    Query(q): Query<WaitQuery>,
) -> Result<Json<Value>, ApiError> {
    let caller = Caller::of(&state, &key).await?;
    let limit = wait_for(&q)?;
    let mut rx = state.session_events.subscribe();
    let next = async {
        loop {
            match rx.recv().await {
                Ok(s) if caller.sees(&s) => return Some(s),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    };
    match tokio::time::timeout(limit, next).await {
        Ok(Some(s)) => Ok(Json(status_event(&s))),
        _ => Ok(Json(json!({"events": []}))),
    }
}

/// Waits until the session changes after `since` (its agent starts or finishes answering, or
/// it ends): `{"updated": true, ...}`, or `{"updated": false}` at the timeout.
async fn messages_wait(
    State(state): State<AppState>,
    Extension(key): Extension<ApiKey>,
    ApiPath(id): ApiPath<String>,
    Query(q): Query<WaitQuery>,
) -> Result<Json<Value>, ApiError> {
    let caller = Caller::of(&state, &key).await?;
    let limit = wait_for(&q)?;
    let since = match q.since.as_deref() {
        None | Some("") => None,
        Some(t) => Some(parse_time_ms(t).ok_or_else(|| {
            ApiError::BadRequest(format!("since: {t:?} is neither Unix ms nor RFC 3339"))
        })?),
    };
    let mut rx = state.session_events.subscribe();
    let s = visible(&state, &caller, &id).await?;
    let updated = |s: &AgentSession| json!({"updated": true, "session_id": s.id, "timestamp": rfc3339(s.updated_at.max(s.last_message_at))});
    if since.is_some_and(|t| s.updated_at.max(s.last_message_at) > t) {
        return Ok(Json(updated(&s)));
    }
    let next = async {
        loop {
            match rx.recv().await {
                Ok(e) if e.id == s.id => return Some(e),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    };
    match tokio::time::timeout(limit, next).await {
        Ok(Some(e)) => Ok(Json(updated(&e))),
        _ => Ok(Json(json!({"updated": false}))),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShareQuery {
    /// Seconds until the link stops working (none: until revoked or the session ends).
    expires_in: Option<u64>,
}

fn share_json(s: &AgentSession, now: i64) -> Result<Value, ApiError> {
    let share = s
        .share
        .as_ref()
        .ok_or_else(|| ApiError::NotFound("Share not found".into()))?;
    let token = share
        .token
        .clone()
        .ok_or_else(|| ApiError::Internal("cannot open a stored share token".into()))?;
    Ok(json!({
        "token": token,
        "session_id": s.id,
        "share_url": format!("/s/{token}/"),
        "created_by": share.created_by,
        "created_at": rfc3339(share.created_at),
        "expires_at": share.expires_at.map(rfc3339),
        "is_expired": share.expires_at.is_some_and(|e| e <= now),
    }))
}

async fn share_create(
    State(state): State<AppState>,
    Extension(key): Extension<ApiKey>,
    ApiPath(id): ApiPath<String>,
    q: Result<Query<ShareQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let (caller, s) = owned(&state, &key, &id, "make").await?;
    let now = crate::store::now_ms();
    if s.share
        .as_ref()
        .is_some_and(|sh| sh.expires_at.is_none_or(|e| e > now) && sh.token.is_some())
        && q.expires_in.is_none()
    {
        return Ok((StatusCode::OK, Json(share_json(&s, now)?)));
    }
    let expires_at = q.expires_in.map(|secs| {
        now.saturating_add(i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX))
    });
    let token = crate::secrets::new_plain("kms");
    state
        .store
        .set_session_share(caller.org, s.id, token.expose(), &caller.name, expires_at)
        .await?;
    let s = visible(&state, &caller, &id).await?;
    Ok((StatusCode::CREATED, Json(share_json(&s, now)?)))
}

async fn share_get(
    State(state): State<AppState>,
    Extension(key): Extension<ApiKey>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let (_, s) = owned(&state, &key, &id, "see").await?;
    Ok(Json(share_json(&s, crate::store::now_ms())?))
}

async fn share_delete(
    State(state): State<AppState>,
    Extension(key): Extension<ApiKey>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let (caller, s) = owned(&state, &key, &id, "revoke").await?;
    if !state.store.delete_session_share(caller.org, s.id).await? {
        return Err(ApiError::NotFound("Share not found".into()));
    }
    Ok(Json(
        json!({"message": "Share revoked successfully", "session_id": s.id}),
    ))
}

/// `/{id}/*` reaches a session through a gateway only: a redirect to the sessions hostname.
async fn to_gateway(
    State(state): State<AppState>,
    Extension(key): Extension<ApiKey>,
    ApiPath((id, _rest)): ApiPath<(String, String)>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let caller = Caller::of(&state, &key).await?;
    visible(&state, &caller, &id).await?;
    redirect(&state, &uri)
}

async fn to_gateway_share(State(state): State<AppState>, uri: Uri) -> Result<Response, ApiError> {
    redirect(&state, &uri)
}

fn redirect(state: &AppState, uri: &Uri) -> Result<Response, ApiError> {
    let host = state.store.sessions_host().ok_or_else(|| {
        ApiError::NotFound("sessions are reached through a gateway; none serves them".into())
    })?;
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .strip_prefix("/api/v1/sessions")
        .unwrap_or("/");
    let mut headers = HeaderMap::new();
    if let Ok(v) = axum::http::HeaderValue::from_str(&format!("https://{host}{path}")) {
        headers.insert(axum::http::header::LOCATION, v);
    }
    Ok((StatusCode::TEMPORARY_REDIRECT, headers).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(n: u128, name: &str, labels: &[(&str, &str)]) -> Node {
        Node {
            id: Uuid::from_u128(n),
            kind: NodeKind::Agent,
            org_id: Uuid::nil(),
            name: name.into(),
            overlay_address: std::net::Ipv4Addr::new(100, 64, 0, n as u8),
            endpoint: None,
            public_key: None,
            has_credential: true,
            last_seen_at: None,
            applied_version: None,
            software_version: None,
            last_status: (!labels.is_empty()).then(|| kakuremichi_proto::StatusReport {
                applied_version: 1,
                peers: Vec::new(),
                targets: Vec::new(),
                refusals: Vec::new(),
                sessions: Vec::new(),
                session_accesses: Vec::new(),
                traffic: Vec::new(),
                session_labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            }),
            last_status_at: None,
            created_at: 0,
        }
    }

    #[test]
    fn the_site_is_the_one_matching_most_tags_then_the_least_loaded() {
        let a = site(1, "a", &[]);
        let b = site(2, "b", &[("repo", "api"), ("gpu", "yes")]);
        let c = site(3, "c", &[("repo", "web")]);
        let sites = [&a, &b, &c];
        let tags = |t: &[(&str, &str)]| -> BTreeMap<String, String> {
            t.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let mut load = BTreeMap::new();
        // No tags, no load: by name.
        assert_eq!(pick_site(&sites, &tags(&[]), &load), Some(a.id));
        load.insert(a.id, 3);
        load.insert(b.id, 5);
        // The least loaded.
        assert_eq!(pick_site(&sites, &tags(&[]), &load), Some(c.id));
        // A matching tag beats load; a tag no site has changes nothing.
        assert_eq!(
            pick_site(&sites, &tags(&[("repo", "api"), ("team", "x")]), &load),
            Some(b.id)
        );
        assert_eq!(
            pick_site(&sites, &tags(&[("repo", "web")]), &load),
            Some(c.id)
        );
        // The most matches wins.
        let d = site(4, "d", &[("repo", "api")]);
        assert_eq!(
            pick_site(
                &[&a, &b, &c, &d],
                &tags(&[("repo", "api"), ("gpu", "yes")]),
                &load
            ),
            Some(b.id)
        );
        assert_eq!(pick_site(&[], &tags(&[]), &load), None);
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration_secs("48h"), Some(48 * 3600));
        assert_eq!(go_duration_secs("1h30m"), Some(5400));
        assert_eq!(go_duration_secs("90s"), Some(90));
        assert_eq!(go_duration_secs("500ms"), Some(1));
        assert_eq!(go_duration_secs("1.5h"), Some(5400));
        assert_eq!(go_duration_secs("h"), None);
        assert_eq!(go_duration_secs("10"), None);
        assert_eq!(go_duration_secs("10d"), None);
        assert_eq!(go_duration_secs(""), None);
        assert_eq!(go_duration_secs("0s"), None);
    }

    #[test]
    fn times_round_trip() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_777_723_200_000), "2026-05-02T12:00:00Z");
        assert_eq!(
            parse_time_ms("2026-05-02T12:00:00Z"),
            Some(1_777_723_200_000)
        );
        assert_eq!(
            parse_time_ms("2026-05-02T14:00:00.250+02:00"),
            Some(1_777_723_200_250)
        );
        assert_eq!(parse_time_ms("1777723200000"), Some(1_777_723_200_000));
        assert_eq!(parse_time_ms("yesterday"), None);
        for ms in [951_782_400_000_i64, 1_709_210_096_000, 4_102_444_800_000] {
            assert_eq!(parse_time_ms(&rfc3339(ms)), Some(ms));
        }
    }

    #[test]
    fn permissions_by_route() {
        assert_eq!(permission(&Method::POST, "/start"), "session:create");
        assert_eq!(permission(&Method::GET, "/search"), "session:list");
        assert_eq!(
            permission(&Method::GET, "/sessions/status/stream"),
            "session:list"
        );
        assert_eq!(permission(&Method::DELETE, "/sessions/x"), "session:delete");
        assert_eq!(
            permission(&Method::POST, "/sessions/x/share"),
            "session:create"
        );
        assert_eq!(
            permission(&Method::GET, "/sessions/x/share"),
            "session:access"
        );
        assert_eq!(
            permission(&Method::GET, "/sessions/x/messages/wait"),
            "session:access"
        );
        assert_eq!(permission(&Method::POST, "/x/message"), "session:access");
    }
}
