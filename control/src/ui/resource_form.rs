//! The UI's form that publishes an app: HTTP by hostname, or TCP and UDP by public port; the
//! primary target and further ones (on the same site or others), load balancing, stickiness, a
//! health check, limits, HTTPS redirect and HSTS, and the PROXY protocol for TCP. Numbers are
//! checked here (a word where a number goes is named beside its field); everything else is the
//! API's to say, beside the field it is about, with what was typed kept.

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use axum::Form;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{api, api_failure, csrf_refusal, redirect, render, Caller, St};
use crate::AppState;

/// The form as posted: every field text, as typed.
#[derive(Debug, Default, Deserialize, serde::Serialize)]
#[serde(default)]
pub(crate) struct ResourceForm {
    #[serde(skip_serializing)]
    csrf: String,
    protocol: String,
    name: String,
    hostname: String,
    public_port: String,
    site_id: String,
    target: String,
    /// One further target a line: `host:port` (the same site) or `<site> host:port`.
    more_targets: String,
    balance: String,
    sticky: String,
    redirect_https: String,
    hsts_max_age: String,
    proxy_protocol: String,
    health_check: String,
    hc_path: String,
    hc_status: String,
    hc_interval: String,
    hc_timeout: String,
    hc_unhealthy: String,
    hc_healthy: String,
    max_body: String,
    response_timeout: String,
    idle_timeout: String,
}

/// A field's message.
struct Refusal {
    field: &'static str,
    message: String,
}

fn refuse(field: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        field,
        message: message.into(),
    }
}

/// A number field: absent when empty; a clear message naming it otherwise.
fn number<T: std::str::FromStr>(
    text: &str,
    field: &'static str,
    what: &str,
) -> Result<Option<T>, Refusal> {
    let t = text.trim().replace(['_', ','], "");
    if t.is_empty() {
        return Ok(None);
    }
    t.parse().map(Some).map_err(|_| {
        refuse(
            field,
            format!("{what}: {:?} is not a whole number", text.trim()),
        )
    })
}

impl ResourceForm {
    fn protocol(&self) -> &str {
        match self.protocol.as_str() {
            "tcp" => "tcp",
            "udp" => "udp",
            _ => "http",
        }
    }

    /// The API body; `sites` are (id, name) to resolve further targets' sites by name.
    fn body(&self, sites: &[(String, String)]) -> Result<Value, Refusal> {
        let protocol = self.protocol();
        let http = protocol == "http";
        let site: Uuid = self
            .site_id
            .parse()
            .map_err(|_| refuse("site_id", "choose the site the app runs next to"))?;
        let mut body =
            json!({ "protocol": protocol, "site_id": site, "target": self.target.trim() });
        if !self.name.trim().is_empty() {
            body["name"] = self.name.trim().into();
        }
        if http {
            if !self.hostname.trim().is_empty() {
                body["hostname"] = self.hostname.trim().into();
            }
            if self.redirect_https == "on" {
                body["redirect_https"] = true.into();
            }
            if let Some(h) = number::<u32>(&self.hsts_max_age, "hsts_max_age", "HSTS max-age")? {
                body["hsts_max_age"] = h.into();
            }
            if self.sticky == "on" {
                body["sticky"] = true.into();
            }
        } else if let Some(p) = number::<u16>(&self.public_port, "public_port", "public port")? {
            body["public_port"] = p.into();
        }
        if protocol == "tcp" && self.proxy_protocol == "on" {
            body["proxy_protocol"] = true.into();
        }
        let mut targets = Vec::new();
        for (n, line) in self.more_targets.lines().enumerate() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let (site_id, target) = match words.as_slice() {
                [] => continue,
                [target] => (site.to_string(), *target),
                [name, target] => {
                    let id = sites
                        .iter()
                        .find(|(id, s)| s == name || id == name)
                        .map(|(id, _)| id.clone())
                        .ok_or_else(|| {
                            refuse(
                                "more_targets",
                                format!("further targets, line {}: no site {name:?}", n + 1),
                            )
                        })?;
                    (id, *target)
                }
                _ => {
                    return Err(refuse(
                        "more_targets",
                        format!(
                            "further targets, line {}: write `host:port` or `site host:port`",
                            n + 1
                        ),
                    ))
                }
            };
            targets.push(json!({ "site_id": site_id, "target": target }));
        }
        if !targets.is_empty() {
            body["targets"] = targets.into();
        }
        if self.balance == "least_outstanding" {
            body["balance"] = "least_outstanding".into();
        }
        if self.health_check == "on" && protocol != "udp" {
            let mut hc = json!({});
            if http && !self.hc_path.trim().is_empty() {
                hc["path"] = self.hc_path.trim().into();
            }
            for (text, key, field, what) in [
                (
                    &self.hc_status,
                    "expected_status",
                    "hc_status",
                    "expected status",
                ),
                (&self.hc_interval, "interval_ms", "hc_interval", "interval"),
                (&self.hc_timeout, "timeout_ms", "hc_timeout", "timeout"),
                (
                    &self.hc_unhealthy,
                    "unhealthy_threshold",
                    "hc_unhealthy",
                    "failures",
                ),
                (
                    &self.hc_healthy,
                    "healthy_threshold",
                    "hc_healthy",
                    "successes",
                ),
            ] {
                if key == "expected_status" && !http {
                    continue;
                }
                if let Some(v) = number::<u32>(text, field, what)? {
                    hc[key] = v.into();
                }
            }
            body["health_check"] = hc;
        }
        let mut limits = json!({});
        if http {
            if let Some(v) = number::<u64>(&self.max_body, "max_body", "largest request body")? {
                limits["max_request_body_bytes"] = v.into();
            }
            if let Some(v) = number::<u32>(
                &self.response_timeout,
                "response_timeout",
                "response timeout",
            )? {
                limits["response_timeout_ms"] = v.into();
            }
        }
        if let Some(v) = number::<u32>(&self.idle_timeout, "idle_timeout", "idle timeout")? {
            limits["idle_timeout_ms"] = v.into();
        }
        if limits.as_object().is_some_and(|l| !l.is_empty()) {
            body["limits"] = limits;
        }
        Ok(body)
    }
}

/// Which form field an API message is about (for the message beside it).
fn field_of(message: &str) -> &'static str {
    let m = message.to_lowercase();
    [
        ("public_port", "public_port"),
        ("public port", "public_port"),
        ("hostname", "hostname"),
        ("hsts", "hsts_max_age"),
        ("health_check", "health_check"),
        ("health check", "health_check"),
        ("max_request_body", "max_body"),
        ("response_timeout", "response_timeout"),
        ("idle_timeout", "idle_timeout"),
        ("targets", "more_targets"),
        ("target", "target"),
        ("site", "site_id"),
        ("name", "name"),
    ]
    .into_iter()
    .find(|(needle, _)| m.contains(needle))
    .map_or("", |(_, f)| f)
}

/// `GET /ui/resources/new`: the form that publishes an app.
pub(crate) async fn new_resource(State(state): St, caller: Caller) -> Response {
    page(
        &state,
        &caller,
        StatusCode::OK,
        &ResourceForm::default(),
        None,
    )
    .await
}

async fn page(
    state: &AppState,
    caller: &Caller,
    status: StatusCode,
    form: &ResourceForm,
    error: Option<Refusal>,
) -> Response {
    let mut sites = match super::site_names(state, caller).await {
        Ok(n) => n,
        Err(e) => return super::unavailable(&e),
    };
    sites.sort_by_cached_key(|a| a.1.to_lowercase());
    let sites: Vec<Value> = sites
        .into_iter()
        .map(|(id, name)| json!({ "id": id, "name": name }))
        .collect();
    let (field, message) = error.map(|r| (r.field, r.message)).unzip();
    render(
        caller,
        status,
        "/ui/resources",
        "resource_new.html",
        "New resource",
        minijinja::context! {
            sites,
            form,
            protocol => form.protocol(),
            field,
            error => message,
        },
    )
}

/// `POST /ui/resources`.
pub(crate) async fn create_resource(
    State(state): St,
    headers: HeaderMap,
    caller: Caller,
    Form(form): Form<ResourceForm>,
) -> Response {
    if let Some(r) = csrf_refusal(&headers, &form.csrf) {
        return r;
    }
    let sites = super::site_names(&state, &caller).await.unwrap_or_default();
    let body = match form.body(&sites) {
        Ok(b) => b,
        Err(r) => return page(&state, &caller, StatusCode::BAD_REQUEST, &form, Some(r)).await,
    };
    let a = api(&state, &caller, Method::POST, "/resources", Some(body)).await;
    if a.status == StatusCode::CREATED {
        let id = a.body.get("id").and_then(Value::as_str).unwrap_or("");
        return redirect(&format!("/ui/resources/{id}"));
    }
    if a.status.is_client_error() && a.status != StatusCode::FORBIDDEN {
        let message = a.error();
        let field = field_of(&message);
        return page(
            &state,
            &caller,
            StatusCode::BAD_REQUEST,
            &form,
            Some(Refusal { field, message }),
        )
        .await;
    }
    api_failure(&caller, "/ui/resources", &a)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SITE: &str = "00000000-0000-0000-0000-000000000001";

    fn form() -> ResourceForm {
        ResourceForm {
            site_id: SITE.into(),
            target: "127.0.0.1:8080".into(),
            ..ResourceForm::default()
        }
    }

    #[test]
    fn an_http_form_with_everything_becomes_the_api_body() {
        let f = ResourceForm {
            hostname: "app.example.com".into(),
            more_targets: "127.0.0.1:8081\n\nbackup 10.0.0.2:80\n".into(),
            balance: "least_outstanding".into(),
            sticky: "on".into(),
            redirect_https: "on".into(),
            hsts_max_age: "31536000".into(),
            health_check: "on".into(),
            hc_path: "/healthz".into(),
            hc_status: "204".into(),
            hc_interval: "1_000".into(),
            max_body: "1048576".into(),
            idle_timeout: "60000".into(),
            public_port: "9999".into(),
            ..form()
        };
        let sites = [(
            "00000000-0000-0000-0000-000000000002".to_owned(),
            "backup".to_owned(),
        )];
        assert_eq!(
            f.body(&sites).ok().unwrap(),
            json!({
                "protocol": "http", "site_id": SITE, "target": "127.0.0.1:8080",
                "hostname": "app.example.com", "redirect_https": true, "hsts_max_age": 31536000,
                "sticky": true, "balance": "least_outstanding",
                "targets": [
                    {"site_id": SITE, "target": "127.0.0.1:8081"},
                    {"site_id": "00000000-0000-0000-0000-000000000002", "target": "10.0.0.2:80"},
                ],
                "health_check": {"path": "/healthz", "expected_status": 204, "interval_ms": 1000},
                "limits": {"max_request_body_bytes": 1048576, "idle_timeout_ms": 60000},
            })
        );
    }

    #[test]
    fn tcp_and_udp_forms_leave_out_what_is_for_http() {
        let f = ResourceForm {
            protocol: "tcp".into(),
            public_port: "2222".into(),
            hostname: "ignored.example.com".into(),
            proxy_protocol: "on".into(),
            health_check: "on".into(),
            hc_path: "/ignored".into(),
            max_body: "5".into(),
            ..form()
        };
        assert_eq!(
            f.body(&[]).ok().unwrap(),
            json!({"protocol": "tcp", "site_id": SITE, "target": "127.0.0.1:8080",
                   "public_port": 2222, "proxy_protocol": true, "health_check": {}})
        );
        let f = ResourceForm {
            protocol: "udp".into(),
            health_check: "on".into(),
            proxy_protocol: "on".into(),
            ..form()
        };
        assert_eq!(
            f.body(&[]).ok().unwrap(),
            json!({"protocol": "udp", "site_id": SITE, "target": "127.0.0.1:8080"})
        );
    }

    #[test]
    fn words_where_numbers_go_and_unknown_sites_are_named_beside_their_fields() {
        let f = ResourceForm {
            protocol: "tcp".into(),
            public_port: "ssh".into(),
            ..form()
        };
        let r = f.body(&[]).err().unwrap();
        assert_eq!(r.field, "public_port");
        assert!(
            r.message.contains("\"ssh\" is not a whole number"),
            "{}",
            r.message
        );
        let f = ResourceForm {
            more_targets: "127.0.0.1:1\nnowhere 10.0.0.1:80".into(),
            ..form()
        };
        let r = f.body(&[]).err().unwrap();
        assert_eq!(r.field, "more_targets");
        assert!(
            r.message.contains("line 2: no site \"nowhere\""),
            "{}",
            r.message
        );
        let r = ResourceForm::default().body(&[]).err().unwrap();
        assert_eq!(r.field, "site_id");
        assert_eq!(field_of("public_port 80 is already used"), "public_port");
        assert_eq!(field_of("targets[1].target: not host:port"), "more_targets");
        assert_eq!(field_of("target must be host:port"), "target");
    }
}
