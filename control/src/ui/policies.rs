//! The UI's access policies: a list, and each policy's page with who may sign in (roles, users,
//! e-mail domains, e-mail codes, API keys) and an ordered rule editor. Rules are rows of one
//! form: "Move up", "Move down", "Remove" and "Add a rule" redraw the form with the change (not
//! yet saved, and said so); "Save policy" sends the whole policy to the API, whose validation
//! messages come back beside what was typed.

use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{api, api_failure, redirect, render, role_choices, Caller, Fields, Posted, St};
use crate::AppState;

/// `GET /ui/policies`.
pub(crate) async fn policies(State(state): St, caller: Caller) -> Response {
    policies_page(&state, &caller, StatusCode::OK, "", None).await
}

async fn policies_page(
    state: &AppState,
    caller: &Caller,
    status: StatusCode,
    name: &str,
    error: Option<String>,
) -> Response {
    let list = api(state, caller, Method::GET, "/policies", None).await;
    if !list.status.is_success() {
        return api_failure(caller, "/ui/policies", &list);
    }
    render(
        caller,
        status,
        "/ui/policies",
        "policies.html",
        "Access policies",
        minijinja::context! {
            rows => list.body,
            form_name => name,
            error,
            can_write => caller.may("resource:write"),
        },
    )
}

/// `POST /ui/policies`: a policy by name (any signed-in user until its page says more).
pub(crate) async fn create_policy(
    State(state): St,
    caller: Caller,
    Posted(form): Posted,
) -> Response {
    let name = form.one("name").trim();
    let a = api(
        &state,
        &caller,
        Method::POST,
        "/policies",
        Some(json!({ "name": name, "access": {} })),
    )
    .await;
    if a.status == StatusCode::CREATED {
        if let Some(id) = a.body["id"].as_str() {
            return redirect(&format!("/ui/policies/{id}"));
        }
    }
    if a.status.is_client_error() && a.status != StatusCode::FORBIDDEN {
        return policies_page(
            &state,
            &caller,
            StatusCode::BAD_REQUEST,
            name,
            Some(a.error()),
        )
        .await;
    }
    api_failure(&caller, "/ui/policies", &a)
}

/// Words of a list field: split on commas, spaces and new lines.
fn words(text: &str) -> Vec<String> {
    text.split([',', ' ', '\n', '\r', '\t'])
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A list as the form shows it.
fn joined(v: &Value) -> String {
    v.as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One row of the rule editor.
#[derive(Debug, Clone, serde::Serialize)]
struct RuleRow {
    action: String,
    paths: String,
    methods: String,
    cidrs: String,
}

impl RuleRow {
    fn from_api(r: &Value) -> RuleRow {
        RuleRow {
            action: r["action"].as_str().unwrap_or("allow").to_owned(),
            paths: joined(&r["paths"]),
            methods: joined(&r["methods"]),
            cidrs: joined(&r["cidrs"]),
        }
    }

    fn to_api(&self) -> Value {
        let mut r = json!({ "action": self.action });
        for (k, v) in [
            ("paths", &self.paths),
            ("methods", &self.methods),
            ("cidrs", &self.cidrs),
        ] {
            let w = words(v);
            if !w.is_empty() {
                r[k] = if k == "methods" {
                    w.iter()
                        .map(|m| m.to_ascii_uppercase())
                        .collect::<Vec<_>>()
                        .into()
                } else {
                    w.into()
                };
            }
        }
        r
    }
}

/// The policy's page as the form holds it.
#[derive(Debug, Clone, serde::Serialize)]
struct Draft {
    name: String,
    roles: Vec<String>,
    users: String,
    email_domains: String,
    email_codes: String,
    api_keys: bool,
    rules: Vec<RuleRow>,
}

impl Draft {
    fn from_api(p: &Value) -> Draft {
        let a = &p["access"];
        Draft {
            name: p["name"].as_str().unwrap_or("").to_owned(),
            roles: a["roles"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            users: joined(&a["users"]),
            email_domains: joined(&a["email_domains"]),
            email_codes: joined(&a["email_codes"]),
            api_keys: a["api_keys"] == true,
            rules: a["rules"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(RuleRow::from_api)
                .collect(),
        }
    }

    fn from_form(form: &Fields) -> Draft {
        let (actions, paths, methods, cidrs) = (
            form.each("rule_action"),
            form.each("rule_paths"),
            form.each("rule_methods"),
            form.each("rule_cidrs"),
        );
        let rules = actions
            .iter()
            .enumerate()
            .map(|(i, action)| RuleRow {
                action: action.clone(),
                paths: paths.get(i).cloned().unwrap_or_default(),
                methods: methods.get(i).cloned().unwrap_or_default(),
                cidrs: cidrs.get(i).cloned().unwrap_or_default(),
            })
            .collect();
        Draft {
            name: form.one("name").trim().to_owned(),
            roles: form.all("role"),
            users: form.one("users").to_owned(),
            email_domains: form.one("email_domains").to_owned(),
            email_codes: form.one("email_codes").to_owned(),
            api_keys: form.one("api_keys") == "on",
            rules,
        }
    }

    /// The policy as the API takes it (`PATCH /policies/{id}`).
    fn to_api(&self) -> Value {
        let mut access = json!({});
        if !self.roles.is_empty() {
            access["roles"] = self.roles.clone().into();
        }
        for (k, v) in [
            ("users", &self.users),
            ("email_domains", &self.email_domains),
            ("email_codes", &self.email_codes),
        ] {
            let w = words(v);
            if !w.is_empty() {
                access[k] = w.into();
            }
        }
        if self.api_keys {
            access["api_keys"] = true.into();
        }
        if !self.rules.is_empty() {
            access["rules"] = self.rules.iter().map(RuleRow::to_api).collect();
        }
        json!({ "name": self.name, "access": access })
    }

    /// Applies an editor button (`up:2`, `down:0`, `remove:1`, `add`); whether it was one.
    fn apply(&mut self, op: &str) -> bool {
        let n = self.rules.len();
        let at = |s: &str| s.parse::<usize>().ok().filter(|i| *i < n);
        match op.split_once(':') {
            Some(("up", i)) => {
                if let Some(i) = at(i).filter(|i| *i > 0) {
                    self.rules.swap(i - 1, i);
                }
            }
            Some(("down", i)) => {
                if let Some(i) = at(i).filter(|i| i + 1 < n) {
                    self.rules.swap(i, i + 1);
                }
            }
            Some(("remove", i)) => {
                if let Some(i) = at(i) {
                    self.rules.remove(i);
                }
            }
            None if op == "add" => self.rules.push(RuleRow {
                action: "allow".into(),
                paths: String::new(),
                methods: String::new(),
                cidrs: String::new(),
            }),
            _ => return false,
        }
        true
    }
}

/// `GET /ui/policies/{id}`.
pub(crate) async fn policy(State(state): St, caller: Caller, Path(id): Path<Uuid>) -> Response {
    let a = api(
        &state,
        &caller,
        Method::GET,
        &format!("/policies/{id}"),
        None,
    )
    .await;
    if !a.status.is_success() {
        return api_failure(&caller, "/ui/policies", &a);
    }
    let draft = Draft::from_api(&a.body);
    policy_page(
        &state,
        &caller,
        StatusCode::OK,
        id,
        &a.body,
        &draft,
        None,
        false,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn policy_page(
    state: &AppState,
    caller: &Caller,
    status: StatusCode,
    id: Uuid,
    saved: &Value,
    draft: &Draft,
    error: Option<String>,
    unsaved: bool,
) -> Response {
    let roles = api(state, caller, Method::GET, "/roles", None).await;
    render(
        caller,
        status,
        "/ui/policies",
        "policy.html",
        &format!("Access policy {}", saved["name"].as_str().unwrap_or("")),
        minijinja::context! {
            id,
            draft,
            last => draft.rules.len().saturating_sub(1),
            resources => saved["resources"].clone(),
            roles => role_choices(&roles.body, &draft.roles),
            error,
            unsaved,
            can_write => caller.may("resource:write"),
        },
    )
}

/// `POST /ui/policies/{id}`: an editor button (`op`) redraws the form; otherwise it is saved.
pub(crate) async fn update_policy(
    State(state): St,
    caller: Caller,
    Path(id): Path<Uuid>,
    Posted(form): Posted,
) -> Response {
    let path = format!("/policies/{id}");
    let saved = api(&state, &caller, Method::GET, &path, None).await;
    if !saved.status.is_success() {
        return api_failure(&caller, "/ui/policies", &saved);
    }
    let mut draft = Draft::from_form(&form);
    let op = form.one("op");
    if !op.is_empty() {
        if !draft.apply(op) {
            return super::message(
                StatusCode::BAD_REQUEST,
                "Unknown action",
                "This form sent an action the page does not know. Reload the page.",
            );
        }
        return policy_page(
            &state,
            &caller,
            StatusCode::OK,
            id,
            &saved.body,
            &draft,
            None,
            true,
        )
        .await;
    }
    let a = api(&state, &caller, Method::PATCH, &path, Some(draft.to_api())).await;
    if a.status.is_success() {
        return redirect(&format!("/ui/policies/{id}"));
    }
    if a.status.is_client_error() && a.status != StatusCode::FORBIDDEN {
        return policy_page(
            &state,
            &caller,
            StatusCode::BAD_REQUEST,
            id,
            &saved.body,
            &draft,
            Some(a.error()),
            true,
        )
        .await;
    }
    api_failure(&caller, "/ui/policies", &a)
}

/// `GET /ui/policies/{id}/delete`: the confirmation.
pub(crate) async fn confirm_delete_policy(
    State(state): St,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Response {
    let a = api(
        &state,
        &caller,
        Method::GET,
        &format!("/policies/{id}"),
        None,
    )
    .await;
    if !a.status.is_success() {
        return api_failure(&caller, "/ui/policies", &a);
    }
    let name = a.body["name"].as_str().unwrap_or("");
    render(
        &caller,
        StatusCode::OK,
        "/ui/policies",
        "confirm.html",
        &format!("Delete the access policy {name}?"),
        minijinja::context! {
            what => "policy",
            name,
            action => format!("/ui/policies/{id}/delete"),
            back => format!("/ui/policies/{id}"),
            note => "Control refuses while a resource still follows it.",
            also => Vec::<String>::new(),
        },
    )
}

super::confirmed_delete!(
    /// `POST /ui/policies/{id}/delete`.
    delete_policy,
    "/policies",
    "/ui/policies"
);

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(n: usize) -> Draft {
        Draft {
            name: "p".into(),
            roles: vec![],
            users: String::new(),
            email_domains: String::new(),
            email_codes: String::new(),
            api_keys: false,
            rules: (0..n)
                .map(|i| RuleRow {
                    action: "allow".into(),
                    paths: format!("/{i}"),
                    methods: String::new(),
                    cidrs: String::new(),
                })
                .collect(),
        }
    }

    fn paths(d: &Draft) -> Vec<&str> {
        d.rules.iter().map(|r| r.paths.as_str()).collect()
    }

    #[test]
    fn editor_buttons_move_remove_and_add_rules_and_ignore_what_is_out_of_range() {
        let mut d = draft(3);
        assert!(d.apply("up:2"));
        assert_eq!(paths(&d), ["/0", "/2", "/1"]);
        assert!(d.apply("down:0"));
        assert_eq!(paths(&d), ["/2", "/0", "/1"]);
        assert!(d.apply("up:0") && d.apply("down:2") && d.apply("remove:9"));
        assert_eq!(paths(&d), ["/2", "/0", "/1"]);
        assert!(d.apply("remove:1"));
        assert_eq!(paths(&d), ["/2", "/1"]);
        assert!(d.apply("add"));
        assert_eq!(paths(&d), ["/2", "/1", ""]);
        assert!(!d.apply("explode:1"));
        assert!(d.apply("up:x"));
        assert_eq!(paths(&d), ["/2", "/1", ""]);
    }

    #[test]
    fn a_draft_becomes_the_api_body_with_lists_split_and_methods_upper_case() {
        let mut d = draft(1);
        d.users = "Ann@example.com, bob@example.com\ncarol@example.com".into();
        d.rules[0].methods = "get post".into();
        d.rules[0].cidrs = "10.0.0.0/8".into();
        assert_eq!(
            d.to_api(),
            json!({"name": "p", "access": {
                "users": ["Ann@example.com", "bob@example.com", "carol@example.com"],
                "rules": [{"action": "allow", "paths": ["/0"], "methods": ["GET", "POST"],
                           "cidrs": ["10.0.0.0/8"]}],
            }})
        );
        let back = Draft::from_api(&d.to_api());
        assert_eq!(back.rules[0].methods, "GET, POST");
    }
}
