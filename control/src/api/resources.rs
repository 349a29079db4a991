//! `/resources`: public hostnames (HTTP) or public ports on every gateway (TCP, UDP) forwarded to
//! private targets through sites. A resource's own `site_id`/`target` is its primary target;
//! `/resources/{id}/targets` adds and removes further ones, which gateways balance over.

use crate::api::doc::ApiRouter;
use crate::api::doc::{delete, get, post};
use axum::extract::State;
use axum::http::StatusCode;
use kakuremichi_proto::identity::AccessPolicy;
use kakuremichi_proto::{Balance, HealthCheck, Limits, NodeKind, RouteProtocol};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{invalid, valid_opt, ApiJson, ApiPath, Org};
use crate::store::{
    NewResource, NewTarget, Resource, ResourcePatch, ResourceTarget, StoreError, MAX_TARGETS,
};
use crate::{validate, ApiError, AppState};

/// Body of `POST /resources`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateResource {
    /// Display name; defaults to the hostname (HTTP) or `tcp-<port>` (TCP).
    pub name: Option<String>,
    /// `http` (default), `tcp` or `udp`.
    #[serde(default)]
    pub protocol: Option<RouteProtocol>,
    /// HTTP: public hostname (lower-cased). TCP: must be absent.
    pub hostname: Option<String>,
    /// TCP: the port every gateway listens on (1-65535); absent: the lowest free from 20000.
    pub public_port: Option<u16>,
    /// HTTP: answer plain-HTTP requests with a 308 to HTTPS (default false).
    pub redirect_https: Option<bool>,
    /// HTTP: send `Strict-Transport-Security: max-age=<this>` over HTTPS (0 to 63072000).
    pub hsts_max_age: Option<u32>,
    /// The site whose agent reaches the target.
    pub site_id: Uuid,
    /// Private target, `host:port`.
    pub target: String,
    /// Further targets, on the same site or others.
    #[serde(default)]
    pub targets: Vec<TargetBody>,
    /// `round_robin` (default) or `least_outstanding`.
    pub balance: Option<Balance>,
    /// HTTP: a cookie keeps a client on the target it reached first (default false).
    pub sticky: Option<bool>,
    /// The health check agents run against every target.
    pub health_check: Option<HealthCheckBody>,
    /// Limits the gateways enforce for this resource, beside their own defaults.
    pub limits: Option<Limits>,
    /// TCP: send every target a PROXY protocol v2 header with the client's address (default
    /// false; a target may say otherwise).
    pub proxy_protocol: Option<bool>,
    /// HTTP: who may reach the resource (absent: public). `{}` means any signed-in user. With
    /// `policy_id`, the fields it sets are laid over the policy's.
    pub access: Option<AccessPolicy>,
    /// HTTP: a reusable access policy of the organization (`/policies`) the resource follows.
    pub policy_id: Option<Uuid>,
}

/// A target: `{site_id, target}` (body of `POST /resources/{id}/targets`).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetBody {
    /// The site whose agent reaches it.
    pub site_id: Uuid,
    /// `host:port`.
    pub target: String,
    /// TCP: PROXY protocol v2 to this target; absent: as the resource says.
    pub proxy_protocol: Option<bool>,
}

/// The longest `response_timeout_ms`: one hour.
pub const MAX_RESPONSE_TIMEOUT_MS: u32 = 3_600_000;
/// The longest `idle_timeout_ms`: one day.
pub const MAX_IDLE_TIMEOUT_MS: u32 = 86_400_000;
/// The largest `max_request_body_bytes`: 1 TiB.
pub const MAX_BODY_LIMIT: u64 = 1 << 40;

/// Checks `limits` for a resource of `protocol`.
fn check_limits(limits: &Limits, protocol: RouteProtocol) -> Result<(), ApiError> {
    if protocol != RouteProtocol::Http
        && (limits.max_request_body_bytes.is_some() || limits.response_timeout_ms.is_some())
    {
        return Err(invalid(
            "limits.max_request_body_bytes and limits.response_timeout_ms are for HTTP resources"
                .into(),
        ));
    }
    if limits
        .max_request_body_bytes
        .is_some_and(|b| b > MAX_BODY_LIMIT)
    {
        return Err(invalid(format!(
            "limits.max_request_body_bytes must be at most {MAX_BODY_LIMIT} (1 TiB)"
        )));
    }
    if limits
        .response_timeout_ms
        .is_some_and(|t| !(100..=MAX_RESPONSE_TIMEOUT_MS).contains(&t))
    {
        return Err(invalid(format!(
            "limits.response_timeout_ms must be from 100 to {MAX_RESPONSE_TIMEOUT_MS}"
        )));
    }
    if limits
        .idle_timeout_ms
        .is_some_and(|t| !(100..=MAX_IDLE_TIMEOUT_MS).contains(&t))
    {
        return Err(invalid(format!(
            "limits.idle_timeout_ms must be from 100 to {MAX_IDLE_TIMEOUT_MS}"
        )));
    }
    Ok(())
}

/// The most entries in each list of an access policy.
pub const MAX_ACCESS_ENTRIES: usize = 1000;

/// Checks and normalizes an access policy (lower-cased e-mail addresses and domains).
pub(crate) fn check_access(
    mut a: AccessPolicy,
    protocol: RouteProtocol,
) -> Result<AccessPolicy, ApiError> {
    if protocol != RouteProtocol::Http {
        return Err(invalid(
            "access (sign-in) is for HTTP resources: a TCP or UDP resource has no place to \
             sign in"
                .into(),
        ));
    }
    for (what, list) in [
        ("access.users", &a.users),
        ("access.roles", &a.roles),
        ("access.email_domains", &a.email_domains),
    ] {
        if list.len() > MAX_ACCESS_ENTRIES {
            return Err(invalid(format!(
                "{what} has more than {MAX_ACCESS_ENTRIES} entries"
            )));
        }
    }
    for u in &mut a.users {
        *u = validate::email(u).map_err(|e| invalid(format!("access.users: {e}")))?;
    }
    for d in &mut a.email_domains {
        *d = validate::hostname(d).map_err(|e| invalid(format!("access.email_domains: {e}")))?;
    }
    for r in &a.roles {
        validate::role(r).map_err(|e| invalid(format!("access.roles: {e}")))?;
    }
    if a.email_codes.len() > MAX_ACCESS_ENTRIES {
        return Err(invalid(format!(
            "access.email_codes has more than {MAX_ACCESS_ENTRIES} entries"
        )));
    }
    for p in &mut a.email_codes {
        let lower = p.trim().to_ascii_lowercase();
        let domain_ok = lower.rsplit_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && !domain.is_empty()
                && (domain == "*" || validate::hostname(domain.trim_start_matches("*.")).is_ok())
        });
        if lower.len() > 254 || !domain_ok || lower.chars().any(|c| c.is_whitespace()) {
            return Err(invalid(format!(
                "access.email_codes: {p:?} is not an address pattern such as \
                 ann@example.com or *@example.com"
            )));
        }
        *p = lower;
    }
    if a.service_keys.len() > MAX_ACCESS_ENTRIES {
        return Err(invalid(format!(
            "access.service_keys has more than {MAX_ACCESS_ENTRIES} entries"
        )));
    }
    if a.rules.len() > MAX_RULES {
        return Err(invalid(format!(
            "access.rules has more than {MAX_RULES} rules"
        )));
    }
    for (i, rule) in a.rules.iter_mut().enumerate() {
        let at = format!("access.rules[{i}]");
        if rule.paths.len() + rule.methods.len() + rule.cidrs.len() > MAX_ACCESS_ENTRIES {
            return Err(invalid(format!(
                "{at} has more than {MAX_ACCESS_ENTRIES} conditions"
            )));
        }
        for p in &rule.paths {
            if !(p.starts_with('/') || p.starts_with('*'))
                || p.len() > 1024
                || p.contains(['?', '#', '\\', '%'])
                || p.chars().any(char::is_control)
                || p.split('/').any(|seg| seg == "." || seg == "..")
            {
                return Err(invalid(format!(
                    "{at}.paths: {p:?} is not a path pattern: it starts with / or *, has no \
                     query, %, backslash or dot segment, and * stands for any run of characters"
                )));
            }
        }
        for m in &mut rule.methods {
            let upper = m.to_ascii_uppercase();
            if upper.is_empty()
                || upper.len() > 32
                || !upper
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
            {
                return Err(invalid(format!("{at}.methods: {m:?} is not a method")));
            }
            *m = upper;
        }
    }
    Ok(a)
}

/// The most rules in an access policy.
pub const MAX_RULES: usize = 100;

fn check_proxy_protocol(on: Option<bool>, protocol: RouteProtocol) -> Result<(), ApiError> {
    if on.is_some() && protocol != RouteProtocol::Tcp {
        return Err(invalid(
            "proxy_protocol is for TCP resources and their targets".into(),
        ));
    }
    Ok(())
}

/// A health check as the API takes it; absent fields get their defaults.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckBody {
    /// HTTP check: `GET` this path; absent: a TCP connect.
    pub path: Option<String>,
    /// HTTP check: the healthy status; absent: any 2xx or 3xx.
    pub expected_status: Option<u16>,
    /// Milliseconds between checks (default 5000, 200 to 3,600,000).
    pub interval_ms: Option<u32>,
    /// Milliseconds a check may take (at least 50, below the interval); default 2000, or half
    /// the interval when that is shorter.
    pub timeout_ms: Option<u32>,
    /// Failures in a row that take a target out (default 1, 1 to 10).
    pub unhealthy_threshold: Option<u8>,
    /// Successes in a row that bring it back (default 2, 1 to 10).
    pub healthy_threshold: Option<u8>,
}

impl HealthCheckBody {
    /// The validated check for a resource of `protocol`.
    fn check(self, protocol: RouteProtocol) -> Result<HealthCheck, ApiError> {
        if protocol == RouteProtocol::Udp {
            return Err(invalid(
                "a UDP resource has no health check: UDP answers nothing to a connect".into(),
            ));
        }
        if protocol == RouteProtocol::Tcp && (self.path.is_some() || self.expected_status.is_some())
        {
            return Err(invalid(
                "a TCP resource's health check is a connect: path and expected_status are for \
                 HTTP resources"
                    .into(),
            ));
        }
        let interval_ms = self.interval_ms.unwrap_or(5000);
        if !(200..=3_600_000).contains(&interval_ms) {
            return Err(invalid(
                "health_check.interval_ms must be from 200 to 3600000".into(),
            ));
        }
        let timeout_ms = self.timeout_ms.unwrap_or(2000.min(interval_ms / 2));
        if timeout_ms < 50 || timeout_ms >= interval_ms {
            return Err(invalid(
                "health_check.timeout_ms must be at least 50 and below interval_ms".into(),
            ));
        }
        let unhealthy_threshold = self.unhealthy_threshold.unwrap_or(1);
        let healthy_threshold = self.healthy_threshold.unwrap_or(2);
        if !(1..=10).contains(&unhealthy_threshold) || !(1..=10).contains(&healthy_threshold) {
            return Err(invalid(
                "health_check thresholds must be from 1 to 10".into(),
            ));
        }
        if let Some(path) = &self.path {
            if !path.starts_with('/')
                || path.len() > 1024
                || !path.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(invalid(
                    "health_check.path must start with / and be at most 1024 visible ASCII \
                     characters"
                        .into(),
                ));
            }
        }
        if let Some(st) = self.expected_status {
            if self.path.is_none() {
                return Err(invalid(
                    "health_check.expected_status needs a path: without one the check is a TCP \
                     connect"
                        .into(),
                ));
            }
            if !(100..=599).contains(&st) {
                return Err(invalid(
                    "health_check.expected_status must be from 100 to 599".into(),
                ));
            }
        }
        Ok(HealthCheck {
            path: self.path,
            expected_status: self.expected_status,
            interval_ms,
            timeout_ms,
            unhealthy_threshold,
            healthy_threshold,
        })
    }
}

/// Body of `PATCH /resources/{id}`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateResource {
    /// New name.
    pub name: Option<String>,
    /// New hostname (HTTP).
    pub hostname: Option<String>,
    /// New public port (TCP).
    pub public_port: Option<u16>,
    /// Redirect plain HTTP to HTTPS (HTTP).
    pub redirect_https: Option<bool>,
    /// New HSTS max-age; `null` turns HSTS off (HTTP).
    #[serde(default, deserialize_with = "present")]
    pub hsts_max_age: Option<Option<u32>>,
    /// New site (the resource gets a new overlay port there).
    pub site_id: Option<Uuid>,
    /// New target.
    pub target: Option<String>,
    /// New balancing.
    pub balance: Option<Balance>,
    /// Sticky sessions on or off (HTTP).
    pub sticky: Option<bool>,
    /// New health check; `null` removes it.
    #[serde(default, deserialize_with = "present")]
    pub health_check: Option<Option<HealthCheckBody>>,
    /// New limits, replacing the old ones whole (`{}` clears them).
    pub limits: Option<Limits>,
    /// PROXY protocol v2 on or off for the targets that do not say otherwise (TCP).
    pub proxy_protocol: Option<bool>,
    /// Who may reach the resource; `null` makes it public (HTTP), or leaves only its policy.
    #[serde(default, deserialize_with = "present")]
    pub access: Option<Option<AccessPolicy>>,
    /// The reusable access policy it follows; `null`: none (HTTP).
    #[serde(default, deserialize_with = "present")]
    pub policy_id: Option<Option<Uuid>>,
}

/// One target of a resource as the API shows it.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct TargetView {
    /// Id (the resource's own id for the primary target).
    pub id: Uuid,
    /// The site.
    pub site_id: Uuid,
    /// `host:port`.
    pub target: String,
    /// Port on the site's overlay address leading to it.
    pub overlay_port: u16,
    /// Whether it is the primary target (`site_id`/`target` of the resource).
    pub primary: bool,
    /// TCP: whether it gets a PROXY protocol v2 header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<bool>,
}

impl TargetView {
    fn of(t: ResourceTarget, protocol: RouteProtocol, resource_proxy_protocol: bool) -> Self {
        TargetView {
            id: t.id,
            site_id: t.site_id,
            target: t.target.clone(),
            overlay_port: t.overlay_port,
            primary: false,
            proxy_protocol: (protocol == RouteProtocol::Tcp)
                .then(|| t.proxy_protocol_or(resource_proxy_protocol)),
        }
    }
}

/// A resource as the API shows it.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ResourceView {
    /// Id.
    pub id: Uuid,
    /// Display name.
    pub name: String,
    /// `http` or `tcp`.
    pub protocol: RouteProtocol,
    /// HTTP: public hostname.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// TCP: the port every gateway listens on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_port: Option<u16>,
    /// HTTP: plain HTTP is redirected to HTTPS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect_https: Option<bool>,
    /// HTTP: HSTS max-age, if sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hsts_max_age: Option<u32>,
    /// The site.
    pub site_id: Uuid,
    /// Private target.
    pub target: String,
    /// Port on the site's overlay address leading to the target.
    pub overlay_port: u16,
    /// Creation time.
    #[serde(serialize_with = "crate::times::ms")]
    #[schemars(with = "crate::times::DateTime")]
    pub created_at: i64,
    /// How gateways spread requests over the targets.
    pub balance: Balance,
    /// HTTP: sticky sessions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sticky: Option<bool>,
    /// The health check, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Limits beside the gateways' defaults.
    pub limits: Limits,
    /// TCP: targets get a PROXY protocol v2 header unless they say otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<bool>,
    /// Every target, the primary first.
    pub targets: Vec<TargetView>,
    /// HTTP: who may reach it (absent: public): with a policy, the policy's fields with the
    /// resource's own laid over them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access: Option<AccessPolicy>,
    /// HTTP: the access policy it follows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_id: Option<Uuid>,
    /// HTTP, with a policy: the resource's own access fields, laid over the policy's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub own_access: Option<AccessPolicy>,
}

impl From<Resource> for ResourceView {
    fn from(r: Resource) -> Self {
        let mut targets = vec![TargetView {
            id: r.id,
            site_id: r.site_id,
            target: r.target.clone(),
            overlay_port: r.overlay_port,
            primary: true,
            proxy_protocol: (r.protocol == RouteProtocol::Tcp).then_some(r.proxy_protocol),
        }];
        let (protocol, pp) = (r.protocol, r.proxy_protocol);
        targets.extend(
            r.more_targets
                .into_iter()
                .map(|t| TargetView::of(t, protocol, pp)),
        );
        Self {
            own_access: r.policy_id.and(r.own_access),
            policy_id: r.policy_id,
            access: r.access,
            limits: r.limits,
            proxy_protocol: (r.protocol == RouteProtocol::Tcp).then_some(r.proxy_protocol),
            balance: r.balance,
            sticky: (r.protocol == RouteProtocol::Http).then_some(r.sticky),
            health_check: r.health_check,
            targets,
            id: r.id,
            name: r.name,
            protocol: r.protocol,
            hostname: (r.protocol == RouteProtocol::Http).then_some(r.hostname),
            public_port: r.public_port,
            redirect_https: (r.protocol == RouteProtocol::Http).then_some(r.redirect_https),
            hsts_max_age: r.hsts_max_age,
            site_id: r.site_id,
            target: r.target,
            overlay_port: r.overlay_port,
            created_at: r.created_at,
        }
    }
}

/// The resources router.
pub fn router() -> ApiRouter<AppState> {
    ApiRouter::new()
        .route(
            "/resources",
            get(list)
                .summary("resources")
                .paged()
                .returns::<Vec<ResourceView>>(200)
                .post(create)
                .summary("publishes an app of a site")
                .body::<CreateResource>()
                .returns::<ResourceView>(201),
        )
        .route(
            "/resources/{id}",
            get(one)
                .returns::<ResourceView>(200)
                .patch(update)
                .summary("changes the fields given; null clears an optional one")
                .body::<UpdateResource>()
                .returns::<ResourceView>(200)
                .delete(remove),
        )
        .route(
            "/resources/{id}/targets",
            post(add_target)
                .summary("adds a target to balance over")
                .body::<TargetBody>()
                .returns::<TargetView>(201),
        )
        .route("/resources/{id}/targets/{target_id}", delete(remove_target))
        .route(
            "/resources/oauth-grants",
            get(oauth_grants)
                .summary("what MCP and other OAuth clients were let reach, by whom")
                .paged()
                .returns::<Vec<crate::store::OAuthGrantInfo>>(200),
        )
        .route(
            "/resources/oauth-grants/{id}",
            delete(revoke_oauth_grant).summary(
                "revokes a grant: its refresh tokens get nothing and its access tokens are \
                 refused at every gateway",
            ),
        )
        .route(
            "/resources/stats",
            get(stats)
                .summary("each resource's requests per minute (last 30 minutes) and health")
                .paged()
                .returns::<Vec<ResourceStats>>(200),
        )
}

/// A resource's recent traffic at the gateways and the health of its targets.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ResourceStats {
    /// The resource's id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// HTTP: its hostname.
    pub hostname: Option<String>,
    /// TCP and UDP: its public port.
    pub public_port: Option<u16>,
    /// Requests answered per minute by the gateways connected to this control, the last 30
    /// minutes, oldest first (the current minute last).
    pub requests_per_minute: Vec<u64>,
    /// Of those, 5xx answers.
    pub errors_per_minute: Vec<u64>,
    /// Requests in the last 30 minutes.
    pub requests_30m: u64,
    /// 5xx answers in the last 30 minutes.
    pub errors_30m: u64,
    /// `healthy` (every target its agent tried answered), `unhealthy` (one failed),
    /// `offline` (its site's agent is not connected) or `unknown` (no report yet).
    pub health: String,
    /// The targets whose last check failed, with the agent's error.
    pub failing: Vec<FailingTarget>,
}

/// A target that failed its agent's last check.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct FailingTarget {
    /// The target.
    pub target: String,
    /// Why, as the agent saw it.
    pub error: Option<String>,
}

async fn oauth_grants(
    State(state): State<AppState>,
    org: Org,
    paged: super::page::Paged,
) -> Result<axum::response::Response, ApiError> {
    paged.page(state.store.oauth_grants(org.0).await?)
}

async fn revoke_oauth_grant(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    if !state.store.revoke_oauth_grant(org.0, id).await? {
        return Err(ApiError::NotFound("OAuth grant not found".into()));
    }
    tracing::info!(grant = %id, "OAuth grant revoked by an administrator");
    Ok(StatusCode::NO_CONTENT)
}

async fn stats(
    State(state): State<AppState>,
    org: Org,
    paged: super::page::Paged,
) -> Result<axum::response::Response, ApiError> {
    state.store.catch_up().await?;
    let (world, agents) = tokio::join!(state.world(), state.store.list_nodes(NodeKind::Agent));
    let (world, agents) = (world?, agents?);
    // What connected agents last reported of each resource's targets (a resource may have
    // targets on several sites), and which sites are connected.
    let mut online_sites = std::collections::HashSet::new();
    let mut reports: std::collections::HashMap<Uuid, Vec<kakuremichi_proto::TargetStatus>> =
        std::collections::HashMap::new();
    for n in agents.into_iter().filter(|n| n.org_id == org.0) {
        if !state.hub.is_online(n.id) {
            continue;
        }
        online_sites.insert(n.id);
        let n = super::nodes::fresh(&state, n);
        for t in n.last_status.map(|s| s.targets).unwrap_or_default() {
            reports.entry(t.resource_id).or_default().push(t);
        }
    }
    let now = crate::store::now_ms();
    let rows: Vec<ResourceStats> = world
        .resources
        .iter()
        .filter(|r| r.org_id == org.0)
        .map(|r| {
            let series = state.traffic.series(r.id, now);
            let mine = reports.get(&r.id).map(Vec::as_slice).unwrap_or_default();
            let failing: Vec<FailingTarget> = mine
                .iter()
                .filter(|t| !t.reachable)
                .map(|t| FailingTarget {
                    target: t.target.clone(),
                    error: t.error.clone(),
                })
                .collect();
            let health = if !failing.is_empty() {
                "unhealthy"
            } else if !mine.is_empty() {
                "healthy"
            } else if !online_sites.contains(&r.site_id) {
                "offline"
            } else {
                "unknown"
            };
            ResourceStats {
                id: r.id,
                name: r.name.clone(),
                hostname: (!r.hostname.is_empty()).then(|| r.hostname.clone()),
                public_port: r.public_port,
                requests_30m: series.requests.iter().sum(),
                errors_30m: series.errors.iter().sum(),
                requests_per_minute: series.requests,
                errors_per_minute: series.errors,
                health: health.to_owned(),
                failing,
            }
        })
        .collect();
    paged.page(rows)
}

async fn create(
    State(state): State<AppState>,
    org: Org,
    ApiJson(body): ApiJson<CreateResource>,
) -> Result<(StatusCode, ApiJson<ResourceView>), ApiError> {
    let protocol = body.protocol.unwrap_or(RouteProtocol::Http);
    let (hostname, public_port, default_name) = match protocol {
        RouteProtocol::Http => {
            if body.public_port.is_some() {
                return Err(invalid(
                    "public_port is for TCP resources; an HTTP resource has a hostname".into(),
                ));
            }
            let raw = body
                .hostname
                .as_deref()
                .ok_or_else(|| invalid("hostname is required for an HTTP resource".into()))?;
            let h = validate::hostname(raw).map_err(invalid)?;
            (h.clone(), None, h)
        }
        RouteProtocol::Tcp | RouteProtocol::Udp => {
            if body.hostname.is_some() {
                return Err(invalid(
                    "a TCP or UDP resource has no hostname: it is reached at public_port on \
                     every gateway"
                        .into(),
                ));
            }
            if body.redirect_https.is_some() || body.hsts_max_age.is_some() {
                return Err(invalid(
                    "redirect_https and hsts_max_age are for HTTP resources".into(),
                ));
            }
            if body.public_port == Some(0) {
                return Err(invalid("public_port must be from 1 to 65535".into()));
            }
            (String::new(), body.public_port, String::new())
        }
    };
    let name = match body.name.as_deref() {
        Some(n) => validate::name(n).map_err(invalid)?,
        None if protocol != RouteProtocol::Http => String::new(),
        None => validate::name(&default_name).map_err(invalid)?,
    };
    let target = validate::host_port(&body.target, "target").map_err(invalid)?;
    check_hsts(body.hsts_max_age)?;
    if body.targets.len() + 1 > usize::from(MAX_TARGETS) {
        return Err(invalid(format!(
            "a resource has at most {MAX_TARGETS} targets"
        )));
    }
    let more_targets = body
        .targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            check_proxy_protocol(t.proxy_protocol, protocol)?;
            validate::host_port(&t.target, &format!("targets[{i}].target"))
                .map(|v| NewTarget {
                    site_id: t.site_id,
                    target: v,
                    proxy_protocol: t.proxy_protocol,
                })
                .map_err(invalid)
        })
        .collect::<Result<Vec<_>, _>>()?;
    check_proxy_protocol(body.proxy_protocol, protocol)?;
    let limits = body.limits.unwrap_or_default();
    check_limits(&limits, protocol)?;
    if body.sticky == Some(true) && protocol != RouteProtocol::Http {
        return Err(invalid("sticky sessions are for HTTP resources".into()));
    }
    let health_check = body.health_check.map(|h| h.check(protocol)).transpose()?;
    // The resource joins its primary site's organization, which must be the caller's; the
    // store checks every further target's site against it.
    match state.store.get_node(NodeKind::Agent, body.site_id).await {
        Ok(site) if site.org_id == org.0 => {}
        Ok(_) | Err(StoreError::NotFound(_)) => {
            return Err(invalid(format!("site {} does not exist", body.site_id)))
        }
        Err(e) => return Err(e.into()),
    }
    let mut r = state
        .store
        .create_resource(&NewResource {
            name: name.clone(),
            protocol,
            hostname,
            public_port,
            redirect_https: body.redirect_https.unwrap_or(false),
            hsts_max_age: body.hsts_max_age,
            site_id: body.site_id,
            target,
            balance: body.balance.unwrap_or_default(),
            sticky: body.sticky.unwrap_or(false),
            health_check,
            limits,
            proxy_protocol: body.proxy_protocol.unwrap_or(false),
            more_targets,
            access: body.access.map(|a| check_access(a, protocol)).transpose()?,
            policy_id: body.policy_id,
        })
        .await?;
    if name.is_empty() {
        // A TCP resource's default name is its port, known once allocated.
        let port = r.public_port.unwrap_or_default();
        r = state
            .store
            .update_resource(
                r.id,
                &ResourcePatch {
                    name: Some(if protocol == RouteProtocol::Udp {
                        format!("udp-{port}")
                    } else {
                        format!("tcp-{port}")
                    }),
                    ..Default::default()
                },
            )
            .await?;
    }
    tracing::info!(resource_id = %r.id, site_id = %r.site_id, "resource created");
    Ok((StatusCode::CREATED, ApiJson(r.into())))
}

async fn list(
    State(state): State<AppState>,
    org: Org,
    paged: super::page::Paged,
) -> Result<axum::response::Response, ApiError> {
    // The resources of the newest config version, which control keeps loaded for its nodes (the
    // same rows the store would give, without reading them again per request). One small read
    // first: a change another replica just made is listed too.
    state.store.catch_up().await?;
    let world = state.world().await?;
    let mut mine: Vec<&Resource> = world
        .resources
        .iter()
        .filter(|r| r.org_id == org.0)
        .collect();
    mine.sort_by_key(|r| (r.created_at, r.id));
    let views: Vec<ResourceView> = mine.into_iter().cloned().map(Into::into).collect();
    paged.page(views)
}

/// The resource, if it belongs to `org`; another organization's is "not found" as well.
async fn owned(state: &AppState, org: Org, id: Uuid) -> Result<Resource, ApiError> {
    let r = state.store.get_resource(id).await?;
    org.owns(r.org_id, "resource")?;
    Ok(r)
}

async fn one(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiJson<ResourceView>, ApiError> {
    Ok(ApiJson(owned(&state, org, id).await?.into()))
}

async fn update(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<UpdateResource>,
) -> Result<ApiJson<ResourceView>, ApiError> {
    let protocol = owned(&state, org, id).await?.protocol;
    let health_check = match body.health_check {
        None => None,
        Some(None) => Some(None),
        Some(Some(h)) => Some(Some(h.check(protocol)?)),
    };
    if let Some(limits) = &body.limits {
        check_limits(limits, protocol)?;
    }
    check_proxy_protocol(body.proxy_protocol.filter(|on| *on), protocol)?;
    let patch = ResourcePatch {
        name: valid_opt(body.name.as_deref(), validate::name)?,
        hostname: valid_opt(body.hostname.as_deref(), validate::hostname)?,
        public_port: match body.public_port {
            Some(0) => return Err(invalid("public_port must be from 1 to 65535".into())),
            p => p,
        },
        redirect_https: body.redirect_https,
        hsts_max_age: {
            check_hsts(body.hsts_max_age.flatten())?;
            body.hsts_max_age
        },
        site_id: body.site_id,
        target: valid_opt(body.target.as_deref(), |t| validate::host_port(t, "target"))?,
        balance: body.balance,
        sticky: body.sticky,
        health_check,
        limits: body.limits,
        proxy_protocol: body.proxy_protocol,
        access: match body.access {
            None => None,
            Some(None) => Some(None),
            Some(Some(a)) => Some(Some(check_access(a, RouteProtocol::Http)?)),
        },
        policy_id: body.policy_id,
    };
    Ok(ApiJson(
        state.store.update_resource(id, &patch).await?.into(),
    ))
}

async fn remove(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    owned(&state, org, id).await?;
    state.store.delete_resource(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn add_target(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<TargetBody>,
) -> Result<(StatusCode, ApiJson<TargetView>), ApiError> {
    owned(&state, org, id).await?;
    let target = validate::host_port(&body.target, "target").map_err(invalid)?;
    let t = state
        .store
        .add_resource_target(
            id,
            &NewTarget {
                site_id: body.site_id,
                target,
                proxy_protocol: body.proxy_protocol,
            },
        )
        .await?;
    tracing::info!(resource_id = %id, site_id = %t.site_id, "target added");
    let r = state.store.get_resource(id).await?;
    Ok((
        StatusCode::CREATED,
        ApiJson(TargetView::of(t, r.protocol, r.proxy_protocol)),
    ))
}

async fn remove_target(
    State(state): State<AppState>,
    org: Org,
    ApiPath((id, target)): ApiPath<(Uuid, Uuid)>,
) -> Result<StatusCode, ApiError> {
    owned(&state, org, id).await?;
    if id == target {
        return Err(invalid(
            "the primary target cannot be removed: PATCH the resource's site_id and target, or \
             delete the resource"
                .into(),
        ));
    }
    state.store.delete_resource_target(id, target).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The longest HSTS max-age accepted: two years.
pub const MAX_HSTS_MAX_AGE: u32 = 63_072_000;

fn check_hsts(v: Option<u32>) -> Result<(), ApiError> {
    match v {
        Some(v) if v > MAX_HSTS_MAX_AGE => Err(invalid(format!(
            "hsts_max_age must be at most {MAX_HSTS_MAX_AGE} (two years)"
        ))),
        _ => Ok(()),
    }
}

/// A field that may be absent (keep), `null` (clear) or a value (set).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}
