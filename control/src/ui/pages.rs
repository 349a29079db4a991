//! The UI's pages: each reads or changes through the API ([`super::api`]) and renders a template.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Form;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{api, api_failure, csrf_refusal, redirect, render, Answer, Caller, St};
use crate::AppState;

/// A list page's query: search, sort, cursor.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ListQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    sort: String,
    #[serde(default)]
    cursor: String,
}

/// Rows a list page shows at once.
const PAGE: usize = 50;

impl ListQuery {
    fn api_query(&self, default_sort: &str) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        q.append_pair("limit", &PAGE.to_string());
        q.append_pair(
            "sort",
            if self.sort.is_empty() {
                default_sort
            } else {
                &self.sort
            },
        );
        if !self.q.trim().is_empty() {
            q.append_pair("q", self.q.trim());
        }
        if !self.cursor.is_empty() {
            q.append_pair("cursor", &self.cursor);
        }
        q.finish()
    }

    /// The link to the next page, when there is one.
    fn next(&self, base: &str, a: &Answer) -> Option<String> {
        let cursor = a.next_cursor()?;
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        if !self.q.is_empty() {
            q.append_pair("q", &self.q);
        }
        if !self.sort.is_empty() {
            q.append_pair("sort", &self.sort);
        }
        q.append_pair("cursor", &cursor);
        Some(format!("{base}?{}", q.finish()))
    }
}

fn list(a: &Answer) -> Vec<Value> {
    a.body.as_array().cloned().unwrap_or_default()
}

/// Adds `who` to audit rows: the e-mail of the user an actor names (`user:<id> ...`), when the
/// caller may read users.
async fn name_actors(state: &AppState, caller: &Caller, rows: &mut [Value]) {
    if !caller.may("user:read") || rows.is_empty() {
        return;
    }
    let users = api(state, caller, Method::GET, "/users", None).await;
    let emails: HashMap<String, String> = list(&users)
        .into_iter()
        .filter_map(|u| {
            Some((
                u.get("id")?.as_str()?.to_owned(),
                u.get("email")?.as_str()?.to_owned(),
            ))
        })
        .collect();
    for r in rows {
        let who = r
            .get("actor")
            .and_then(Value::as_str)
            .and_then(|a| a.strip_prefix("user:"))
            .map(|a| a.split(' ').next().unwrap_or(a))
            .and_then(|id| emails.get(id))
            .cloned();
        if let (Some(o), Some(w)) = (r.as_object_mut(), who) {
            o.insert("who".into(), w.into());
        }
    }
}

/// `GET /ui`: the dashboard.
pub(crate) async fn dashboard(State(state): St, caller: Caller) -> Response {
    let get = |path: &'static str, perm: &'static str| {
        let (state, caller) = (&state, &caller);
        async move {
            if caller.may(perm) {
                Some(api(state, caller, Method::GET, path, None).await)
            } else {
                None
            }
        }
    };
    let (sites, gateways, resources, audit, certificates) = tokio::join!(
        get("/sites?limit=10&sort=online", "site:read"),
        get("/gateways?limit=10&sort=online", "gateway:read"),
        get(
            "/resources/stats?limit=10&sort=-requests_30m",
            "resource:read"
        ),
        get("/audit?limit=10", "audit:read"),
        get("/certificates", "certificate:read"),
    );
    let now = crate::store::now_ms();
    let soon = now + 21 * 24 * 3600 * 1000;
    let expiring: Vec<Value> = certificates
        .as_ref()
        .map(list)
        .unwrap_or_default()
        .into_iter()
        .filter(|c| {
            c.get("not_after")
                .and_then(Value::as_str)
                .and_then(crate::times::parse_time_ms)
                .is_some_and(|t| t < soon)
        })
        .collect();
    let section = |a: &Option<Answer>| {
        a.as_ref().map(|a| {
            json!({ "rows": list(a), "total": a.total(), "error": (!a.status.is_success()).then(|| a.error()) })
        })
    };
    let mut resources = section(&resources);
    if let Some(rows) = resources
        .as_mut()
        .and_then(|a| a.get_mut("rows"))
        .and_then(Value::as_array_mut)
    {
        for r in rows {
            let per_minute: Vec<u64> = r["requests_per_minute"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .filter_map(Value::as_u64)
                .collect();
            r["spark"] = sparkline(&per_minute).into();
            r["peak"] = per_minute.iter().max().copied().unwrap_or(0).into();
        }
    }
    let mut audit = section(&audit);
    if let Some(rows) = audit
        .as_mut()
        .and_then(|a| a.get_mut("rows"))
        .and_then(Value::as_array_mut)
    {
        name_actors(&state, &caller, rows).await;
    }
    let live: Vec<String> = [&sites, &gateways]
        .into_iter()
        .flatten()
        .flat_map(list)
        .filter_map(|n| n.get("id").and_then(Value::as_str).map(str::to_owned))
        .collect();
    render(
        &caller,
        StatusCode::OK,
        "/ui",
        "dashboard.html",
        "Dashboard",
        minijinja::context! {
            sites => section(&sites),
            gateways => section(&gateways),
            resources,
            audit,
            expiring,
            live => live.join(","),
        },
    )
}

/// The points of a sparkline of `values` in a 120 x 24 box (SVG `polyline`), the highest
/// value at the top; all zeros make a flat line at the bottom.
fn sparkline(values: &[u64]) -> String {
    let (w, h) = (120.0_f64, 24.0_f64);
    let peak = values.iter().max().copied().unwrap_or(0).max(1) as f64;
    let step = if values.len() > 1 {
        w / (values.len() - 1) as f64
    } else {
        0.0
    };
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let y = 1.0 + (h - 2.0) * (1.0 - *v as f64 / peak);
            format!("{:.1},{:.1}", i as f64 * step, y)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `GET /ui/sites`.
pub(crate) async fn sites(
    State(state): St,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Response {
    sites_page(&state, &caller, &q, StatusCode::OK, "", None).await
}

async fn sites_page(
    state: &AppState,
    caller: &Caller,
    q: &ListQuery,
    status: StatusCode,
    name: &str,
    error: Option<String>,
) -> Response {
    nodes_page(state, caller, q, status, "sites", (name, ""), error).await
}

/// `GET /ui/gateways`.
pub(crate) async fn gateways(
    State(state): St,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Response {
    nodes_page(
        &state,
        &caller,
        &q,
        StatusCode::OK,
        "gateways",
        ("", ""),
        None,
    )
    .await
}

/// The gateways list with the creation form as typed (`name`, `endpoint`) and its error.
pub(crate) async fn gateways_page(
    state: &AppState,
    caller: &Caller,
    status: StatusCode,
    typed: (&str, &str),
    error: Option<String>,
) -> Response {
    let q = ListQuery::default();
    nodes_page(state, caller, &q, status, "gateways", typed, error).await
}

async fn nodes_page(
    state: &AppState,
    caller: &Caller,
    q: &ListQuery,
    status: StatusCode,
    kind: &str,
    (name, endpoint): (&str, &str),
    error: Option<String>,
) -> Response {
    let base = format!("/ui/{kind}");
    let a = api(
        state,
        caller,
        Method::GET,
        &format!("/{kind}?{}", q.api_query("name")),
        None,
    )
    .await;
    if !a.status.is_success() {
        return api_failure(caller, &base, &a);
    }
    let rows = list(&a);
    let live: Vec<&str> = rows
        .iter()
        .filter_map(|n| n.get("id").and_then(Value::as_str))
        .collect();
    let write = if kind == "sites" {
        "site:write"
    } else {
        "gateway:write"
    };
    render(
        caller,
        status,
        &base,
        "nodes.html",
        if kind == "sites" { "Sites" } else { "Gateways" },
        minijinja::context! {
            kind,
            rows => &rows,
            total => a.total(),
            q => &q.q,
            sort => &q.sort,
            next => q.next(&base, &a),
            live => live.join(","),
            can_create => caller.may(write),
            name,
            endpoint,
            error,
        },
    )
}

/// A form with only its CSRF token.
#[derive(Debug, Deserialize)]
pub(crate) struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// The site creation form.
#[derive(Debug, Deserialize)]
pub(crate) struct SiteForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
}

/// `POST /ui/sites`: creates a site and shows its install page with the new token.
pub(crate) async fn create_site(
    State(state): St,
    headers: HeaderMap,
    caller: Caller,
    Form(form): Form<SiteForm>,
) -> Response {
    if let Some(r) = csrf_refusal(&headers, &form.csrf) {
        return r;
    }
    let a = api(
        &state,
        &caller,
        Method::POST,
        "/sites",
        Some(json!({ "name": form.name })),
    )
    .await;
    if a.status == StatusCode::CREATED {
        return site_view(&caller, StatusCode::CREATED, &a.body, true);
    }
    if a.status.is_client_error() && a.status != StatusCode::FORBIDDEN {
        let q = ListQuery::default();
        return sites_page(
            &state,
            &caller,
            &q,
            StatusCode::BAD_REQUEST,
            &form.name,
            Some(a.error()),
        )
        .await;
    }
    api_failure(&caller, "/ui/sites", &a)
}

/// `GET /ui/sites/{id}`.
pub(crate) async fn site(State(state): St, caller: Caller, Path(id): Path<Uuid>) -> Response {
    let a = api(&state, &caller, Method::GET, &format!("/sites/{id}"), None).await;
    if !a.status.is_success() {
        return api_failure(&caller, "/ui/sites", &a);
    }
    site_view(&caller, StatusCode::OK, &a.body, false)
}

/// `POST /ui/sites/{id}/token`: a new install command (the old credential stops working).
pub(crate) async fn site_token(
    State(state): St,
    headers: HeaderMap,
    caller: Caller,
    Path(id): Path<Uuid>,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(r) = csrf_refusal(&headers, &form.csrf) {
        return r;
    }
    let t = api(
        &state,
        &caller,
        Method::POST,
        &format!("/sites/{id}/enrollment-token"),
        None,
    )
    .await;
    if !t.status.is_success() {
        return api_failure(&caller, "/ui/sites", &t);
    }
    let a = api(&state, &caller, Method::GET, &format!("/sites/{id}"), None).await;
    if !a.status.is_success() {
        return api_failure(&caller, "/ui/sites", &a);
    }
    let mut site = a.body;
    if let (Some(s), Some(t)) = (site.as_object_mut(), t.body.as_object()) {
        for k in ["enrollment_token", "install_command"] {
            if let Some(v) = t.get(k) {
                s.insert(k.into(), v.clone());
            }
        }
    }
    site_view(&caller, StatusCode::OK, &site, true)
}

fn site_view(caller: &Caller, status: StatusCode, site: &Value, fresh: bool) -> Response {
    let name = site.get("name").and_then(Value::as_str).unwrap_or("site");
    let token = site.get("enrollment_token").and_then(Value::as_str);
    let control = site
        .get("install_command")
        .and_then(Value::as_str)
        .and_then(|c| c.strip_prefix("curl -fsSL "))
        .and_then(|c| c.split("/install.sh").next())
        .map(str::to_owned);
    let systemd = token
        .zip(control.as_deref())
        .map(|(t, c)| snippets::systemd(c, t, snippets::Program::Agent));
    let container = token
        .zip(control.as_deref())
        .map(|(t, c)| snippets::container(c, t, snippets::Program::Agent));
    render(
        caller,
        status,
        "/ui/sites",
        "site.html",
        name,
        minijinja::context! {
            site,
            fresh,
            systemd,
            container,
            can_write => caller.may("site:write"),
            live => site.get("id").and_then(Value::as_str).unwrap_or(""),
        },
    )
}

/// The install pages' snippets for those who install by hand: the agent's and a gateway's.
pub(crate) mod snippets {
    /// The units the one-liner (agent) and the gateway page install.
    const AGENT_UNIT: &str = include_str!("../../../deploy/systemd/kakuremichi-agent.service");
    const GATEWAY_UNIT: &str = include_str!("../../../deploy/systemd/kakuremichi-gateway.service");

    /// Which program: `agent` or `gateway`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Program {
        Agent,
        Gateway,
    }

    impl Program {
        fn name(self) -> &'static str {
            match self {
                Program::Agent => "agent",
                Program::Gateway => "gateway",
            }
        }

        fn env(self) -> &'static str {
            match self {
                Program::Agent => "AGENT",
                Program::Gateway => "GATEWAY",
            }
        }

        fn unit(self) -> &'static str {
            match self {
                Program::Agent => AGENT_UNIT,
                Program::Gateway => GATEWAY_UNIT,
            }
        }
    }

    fn insecure(control: &str) -> &'static str {
        if control.starts_with("http://") {
            " --allow-insecure-control"
        } else {
            ""
        }
    }

    fn fetch(control: &str, p: Program) -> String {
        let n = p.name();
        format!(
            "sudo curl -fsSL -o /usr/local/bin/kakuremichi-{n} \\\n  \
             {control}/download/kakuremichi-{n}-linux-$(uname -m)\n\
             sudo chmod 0755 /usr/local/bin/kakuremichi-{n}\n"
        )
    }

    /// The binary, the token in a 0600 file, the unit, started.
    pub(crate) fn systemd(control: &str, token: &str, p: Program) -> String {
        let (n, e) = (p.name(), p.env());
        let data = format!("--data-dir /var/lib/kakuremichi-{n}");
        let unit = p
            .unit()
            .replace(&data, &format!("{data}{}", insecure(control)));
        format!(
            "{}sudo install -d -m 0700 /etc/kakuremichi\n\
             printf 'KAKUREMICHI_{e}_CONTROL=%s\\nKAKUREMICHI_{e}_TOKEN=%s\\n' \\\n  \
             '{control}' '{token}' | sudo tee /etc/kakuremichi/{n}.env >/dev/null\n\
             sudo chmod 0600 /etc/kakuremichi/{n}.env\n\
             sudo tee /etc/systemd/system/kakuremichi-{n}.service >/dev/null <<'UNIT'\n\
             {unit}UNIT\n\
             sudo systemctl daemon-reload\n\
             sudo systemctl enable --now kakuremichi-{n}",
            fetch(control, p)
        )
    }

    /// The binary, run in a container with its state in a volume.
    pub(crate) fn container(control: &str, token: &str, p: Program) -> String {
        let (n, e) = (p.name(), p.env());
        format!(
            "{}docker run -d --name kakuremichi-{n} --restart unless-stopped --network host \\\n  \
             -e KAKUREMICHI_{e}_CONTROL='{control}' -e KAKUREMICHI_{e}_TOKEN='{token}' \\\n  \
             -v kakuremichi-{n}:/var/lib/kakuremichi-{n} \\\n  \
             -v /usr/local/bin/kakuremichi-{n}:/usr/local/bin/kakuremichi-{n}:ro \\\n  \
             debian:stable-slim kakuremichi-{n} --data-dir /var/lib/kakuremichi-{n}{}",
            fetch(control, p),
            insecure(control)
        )
    }
}

/// `GET /ui/sites/{id}/delete`: what deleting takes with it, and the button.
pub(crate) async fn confirm_delete_site(
    State(state): St,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Response {
    let a = api(&state, &caller, Method::GET, &format!("/sites/{id}"), None).await;
    if !a.status.is_success() {
        return api_failure(&caller, "/ui/sites", &a);
    }
    let r = api(&state, &caller, Method::GET, "/resources", None).await;
    let id_s = id.to_string();
    let resources: Vec<Value> = list(&r)
        .into_iter()
        .filter(|x| x.get("site_id").and_then(Value::as_str) == Some(id_s.as_str()))
        .collect();
    let name = a.body.get("name").and_then(Value::as_str).unwrap_or("");
    render(
        &caller,
        StatusCode::OK,
        "/ui/sites",
        "confirm.html",
        &format!("Delete site {name}?"),
        minijinja::context! {
            what => "site",
            name,
            action => format!("/ui/sites/{id}/delete"),
            back => format!("/ui/sites/{id}"),
            also => resources.iter().filter_map(|r| r.get("name").and_then(Value::as_str)).collect::<Vec<_>>(),
        },
    )
}

/// `POST /ui/sites/{id}/delete`.
pub(crate) async fn delete_site(
    State(state): St,
    headers: HeaderMap,
    caller: Caller,
    Path(id): Path<Uuid>,
    Form(form): Form<CsrfForm>,
) -> Response {
    delete(&state, &headers, &caller, &form, "sites", id).await
}

async fn delete(
    state: &AppState,
    headers: &HeaderMap,
    caller: &Caller,
    form: &CsrfForm,
    kind: &str,
    id: Uuid,
) -> Response {
    if let Some(r) = csrf_refusal(headers, &form.csrf) {
        return r;
    }
    let a = api(
        state,
        caller,
        Method::DELETE,
        &format!("/{kind}/{id}"),
        None,
    )
    .await;
    if !a.status.is_success() {
        return api_failure(caller, &format!("/ui/{kind}"), &a);
    }
    redirect(&format!("/ui/{kind}"))
}

/// `GET /ui/resources`.
pub(crate) async fn resources(
    State(state): St,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Response {
    resources_page(&state, &caller, &q, StatusCode::OK).await
}

async fn resources_page(
    state: &AppState,
    caller: &Caller,
    q: &ListQuery,
    status: StatusCode,
) -> Response {
    let path = format!("/resources?{}", q.api_query("name"));
    let a = api(state, caller, Method::GET, &path, None).await;
    if !a.status.is_success() {
        return api_failure(caller, "/ui/resources", &a);
    }
    let names: HashMap<String, String> = match super::site_names(state, caller).await {
        Ok(n) => n.into_iter().collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the config snapshot for site names");
            HashMap::new()
        }
    };
    let rows: Vec<Value> = list(&a)
        .into_iter()
        .map(|mut r| {
            let site = r
                .get("site_id")
                .and_then(Value::as_str)
                .and_then(|s| names.get(s))
                .cloned();
            if let (Some(o), Some(s)) = (r.as_object_mut(), site) {
                o.insert("site_name".into(), s.into());
            }
            r
        })
        .collect();
    render(
        caller,
        status,
        "/ui/resources",
        "resources.html",
        "Resources",
        minijinja::context! {
            rows,
            total => a.total(),
            q => &q.q,
            sort => &q.sort,
            next => q.next("/ui/resources", &a),
            can_create => caller.may("resource:write"),
        },
    )
}

/// `GET /ui/resources/{id}`.
pub(crate) async fn resource(State(state): St, caller: Caller, Path(id): Path<Uuid>) -> Response {
    resource_page(&state, &caller, id, StatusCode::OK, ShareNotice::default()).await
}

/// What the share links part of a resource's page says after a form: a link just made (shown
/// once) or why none was.
#[derive(Debug, Default)]
pub(crate) struct ShareNotice {
    pub created: Option<Value>,
    pub error: Option<String>,
}

/// A resource's page.
pub(crate) async fn resource_page(
    state: &AppState,
    caller: &Caller,
    id: Uuid,
    status: StatusCode,
    share: ShareNotice,
) -> Response {
    let a = api(
        state,
        caller,
        Method::GET,
        &format!("/resources/{id}"),
        None,
    )
    .await;
    if !a.status.is_success() {
        return api_failure(caller, "/ui/resources", &a);
    }
    let links = if a.body["protocol"] == "http" && caller.may("resource:write") {
        let l = api(
            state,
            caller,
            Method::GET,
            &format!("/resources/{id}/share-links"),
            None,
        )
        .await;
        list(&l)
    } else {
        Vec::new()
    };
    let site_id = a.body.get("site_id").and_then(Value::as_str).unwrap_or("");
    let site_path = format!("/sites/{site_id}");
    let (site, roles, policies) = tokio::join!(
        api(state, caller, Method::GET, &site_path, None),
        api(state, caller, Method::GET, "/roles", None),
        api(state, caller, Method::GET, "/policies", None),
    );
    let followed = a.body.get("policy_id").and_then(Value::as_str);
    let policies: Vec<Value> = list(&policies)
        .iter()
        .filter_map(|p| {
            let id = p.get("id")?.as_str()?;
            Some(json!({ "id": id, "name": p.get("name")?, "selected": Some(id) == followed }))
        })
        .collect();
    let access = a.body.get("access").filter(|v| v.is_object());
    let strings = |field: &str| -> Vec<String> {
        access
            .and_then(|x| x.get(field))
            .and_then(Value::as_array)
            .map(|v| {
                v.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let (access_roles, access_domains) = (strings("roles"), strings("email_domains"));
    let roles = super::role_choices(&roles.body, &access_roles);
    let name = a
        .body
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("resource");
    render(
        caller,
        status,
        "/ui/resources",
        "resource.html",
        name,
        minijinja::context! {
            resource => &a.body,
            site => site.status.is_success().then_some(&site.body),
            details => serde_json::to_string_pretty(&a.body).unwrap_or_default(),
            can_write => caller.may("resource:write"),
            live => site_id,
            protected => access.is_some(),
            policy => followed.is_some(),
            mcp => access.and_then(|x| x.get("mcp")) == Some(&Value::Bool(true)),
            api_keys => access.and_then(|x| x.get("api_keys")) == Some(&Value::Bool(true)),
            policies,
            roles,
            domains => access_domains.join(", "),
            links,
            link_created => share.created,
            link_error => share.error,
        },
    )
}

/// `GET /ui/resources/{id}/delete`.
pub(crate) async fn confirm_delete_resource(
    State(state): St,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Response {
    let a = api(
        &state,
        &caller,
        Method::GET,
        &format!("/resources/{id}"),
        None,
    )
    .await;
    if !a.status.is_success() {
        return api_failure(&caller, "/ui/resources", &a);
    }
    let name = a.body.get("name").and_then(Value::as_str).unwrap_or("");
    render(
        &caller,
        StatusCode::OK,
        "/ui/resources",
        "confirm.html",
        &format!("Delete resource {name}?"),
        minijinja::context! {
            what => "resource",
            name,
            action => format!("/ui/resources/{id}/delete"),
            back => format!("/ui/resources/{id}"),
            also => Vec::<String>::new(),
        },
    )
}

/// `POST /ui/resources/{id}/delete`.
pub(crate) async fn delete_resource(
    State(state): St,
    headers: HeaderMap,
    caller: Caller,
    Path(id): Path<Uuid>,
    Form(form): Form<CsrfForm>,
) -> Response {
    delete(&state, &headers, &caller, &form, "resources", id).await
}

/// The audit page's filters (the API's).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct AuditQuery {
    #[serde(default)]
    action: String,
    #[serde(default)]
    actor: String,
    #[serde(default)]
    outcome: String,
    #[serde(default)]
    since: String,
}

/// `GET /ui/audit`.
pub(crate) async fn audit(
    State(state): St,
    caller: Caller,
    Query(f): Query<AuditQuery>,
) -> Response {
    let path = {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        q.append_pair("limit", "200");
        for (k, v) in [
            ("action", &f.action),
            ("actor", &f.actor),
            ("outcome", &f.outcome),
            ("since", &f.since),
        ] {
            if !v.trim().is_empty() {
                q.append_pair(k, v.trim());
            }
        }
        format!("/audit?{}", q.finish())
    };
    let a = api(&state, &caller, Method::GET, &path, None).await;
    let (mut rows, error) = if a.status.is_success() {
        (list(&a), None)
    } else if a.status == StatusCode::BAD_REQUEST {
        (Vec::new(), Some(a.error()))
    } else {
        return api_failure(&caller, "/ui/audit", &a);
    };
    name_actors(&state, &caller, &mut rows).await;
    render(
        &caller,
        if error.is_some() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::OK
        },
        "/ui/audit",
        "audit.html",
        "Audit log",
        minijinja::context! {
            rows,
            error,
            action => &f.action,
            actor => &f.actor,
            outcome => &f.outcome,
            since => &f.since,
        },
    )
}

/// The organization switcher's form.
#[derive(Debug, Deserialize)]
pub(crate) struct OrgForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    org: String,
}

/// `POST /ui/org`: acts in another of the user's organizations from now on.
pub(crate) async fn switch_org(
    State(state): St,
    headers: HeaderMap,
    caller: Caller,
    Form(form): Form<OrgForm>,
) -> Response {
    if let Some(r) = csrf_refusal(&headers, &form.csrf) {
        return r;
    }
    let Some(org) = caller.orgs.iter().find(|o| o.id.to_string() == form.org) else {
        return super::message(
            StatusCode::BAD_REQUEST,
            "No such organization",
            "You are not a member of that organization.",
        );
    };
    let mut r = redirect("/ui");
    if let Ok(c) = axum::http::HeaderValue::from_str(&format!(
        "{}={}; Path=/; HttpOnly; SameSite=Lax{}",
        super::ORG_COOKIE,
        org.id,
        crate::auth::secure(&state)
    )) {
        r.headers_mut().append(axum::http::header::SET_COOKIE, c);
    }
    r
}

/// `GET /ui/events?nodes=<id>,...`: Server-Sent Events, one `node` event (`{"id", "online"}`)
/// each time a listed site or gateway of the caller's organization comes online or goes
/// offline, the current state first.
#[derive(Debug, Deserialize)]
pub(crate) struct EventsQuery {
    #[serde(default)]
    nodes: String,
}

/// The most nodes one event stream follows.
const MAX_FOLLOWED: usize = 200;

/// `GET /ui/events`.
pub(crate) async fn events(
    State(state): St,
    caller: Caller,
    Query(q): Query<EventsQuery>,
) -> Response {
    let wanted: Vec<Uuid> = q
        .nodes
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .take(MAX_FOLLOWED)
        .collect();
    // Only the caller's organization's nodes, and only what their roles let them read.
    let mut followed = Vec::new();
    for id in wanted {
        for (kind, perm) in [
            (kakuremichi_proto::NodeKind::Agent, "site:read"),
            (kakuremichi_proto::NodeKind::Gateway, "gateway:read"),
        ] {
            if let Ok(n) = state.store.get_node(kind, id).await {
                if n.org_id == caller.web.org && caller.may(perm) {
                    followed.push(id);
                }
                break;
            }
        }
    }
    let mut changes = state.hub.watch_online();
    changes.mark_changed();
    let shutdown = state.shutdown_signal();
    let stream = futures_util::stream::unfold(
        (
            state,
            changes,
            shutdown,
            followed,
            HashMap::<Uuid, bool>::new(),
        ),
        |(state, mut changes, mut shutdown, followed, mut known)| async move {
            loop {
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return None },
                    // A stream never holds control's graceful exit.
                    () = crate::until_set(&mut shutdown) => return None,
                }
                let mut events = Vec::new();
                for id in &followed {
                    let online = state.hub.is_online(*id);
                    if known.insert(*id, online) != Some(online) {
                        events.push(json!({ "id": id, "online": online }));
                    }
                }
                if !events.is_empty() {
                    let ev = Event::default()
                        .event("nodes")
                        .data(Value::from(events).to_string());
                    return Some((
                        Ok::<_, Infallible>(ev),
                        (state, changes, shutdown, followed, known),
                    ));
                }
            }
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}
