//! Declarative configuration: a YAML (or JSON) file naming roles, users, sites, gateways,
//! policies and resources, and the plan that makes control match it (`kakuremichi diff` prints
//! it, `kakuremichi apply` carries it out). Objects are matched by name (a resource by its
//! hostname, else its name; a user by e-mail); only the fields the file gives are compared (lists
//! of names, such as a role's permissions, in any order), so applying the same file twice changes
//! nothing. With `prune`, an object of a kind the file lists but does not name is deleted, except
//! built-in roles and users: a user is never deleted by a file (`disabled: true` stops them).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "kakuremichi declarative configuration")]
pub struct ConfigFile {
    /// Custom roles, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<RoleSpec>>,
    /// Users, by e-mail address (never deleted by `--prune`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<Vec<UserSpec>>,
    /// Sites (agents), by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sites: Option<Vec<SiteSpec>>,
    /// Gateways, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateways: Option<Vec<GatewaySpec>>,
    /// Reusable access policies, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policies: Option<Vec<PolicySpec>>,
    /// Resources, by hostname (HTTP) or name (TCP, UDP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Vec<ResourceSpec>>,
}

/// A custom role.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleSpec {
    /// Its name (`a-z 0-9 _ - : .`, not a built-in one).
    pub name: String,
    /// What it is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The permissions it gives (`resource:read`, `audit:read`, ...).
    pub permissions: Vec<String>,
}

/// A user. A password is never in a file: users without one sign in by single sign-on, or
/// get one from an administrator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    /// E-mail address (what identifies the user).
    pub email: String,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Roles (built-in or custom).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<String>>,
    /// Disabled: every session ends and sign-in is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
}

/// A site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SiteSpec {
    /// Its name.
    pub name: String,
}

/// A gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GatewaySpec {
    /// Its name.
    pub name: String,
    /// The `host:port` agents dial (its WireGuard endpoint).
    pub endpoint: String,
}

/// An access policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Its name.
    pub name: String,
    /// Who may in (as a resource's `access`: roles, email_domains, rules, ...).
    pub access: Value,
}

/// A resource: the API's fields, with `site` and `policy` by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourceSpec {
    /// HTTP: its hostname (what identifies it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Its name (what identifies a TCP or UDP resource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The site (by name) its target is reached from.
    pub site: String,
    /// `host:port` as the site reaches it.
    pub target: String,
    /// `http` (default), `tcp` or `udp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// TCP, UDP: the port every gateway listens on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_port: Option<u16>,
    /// The access policy (by name) it follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Its own access (over the policy's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<Value>,
    /// Plain HTTP redirected to HTTPS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_https: Option<bool>,
    /// HSTS max-age, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsts_max_age: Option<u32>,
    /// `round_robin` or `least_outstanding`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<String>,
    /// Sticky sessions (HTTP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<bool>,
    /// The health check the agents run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<Value>,
    /// Body size and time limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Value>,
    /// TCP: PROXY protocol v2 to the targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<bool>,
}

/// The JSON Schema of the file (for editors: `# yaml-language-server: $schema=...`).
pub fn schema() -> Value {
    serde_json::to_value(schemars::schema_for!(ConfigFile)).unwrap_or(Value::Null)
}

/// Why a file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Not YAML, or not this shape: the message names the line.
    #[error("{0}")]
    Parse(String),
    /// Two entries of a kind with one name.
    #[error("{kind}: {name:?} is named twice")]
    Duplicate {
        /// The kind.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// An entry with nothing to match it by.
    #[error("resources: an entry has neither hostname nor name")]
    Unnamed,
}

/// Reads a file's text (YAML; JSON is YAML too).
pub fn parse(text: &str) -> Result<ConfigFile, FileError> {
    let file: ConfigFile = serde_yaml::from_str(text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!("line {} column {}: ", l.line(), l.column()))
            .unwrap_or_default();
        FileError::Parse(format!("{at}{e}"))
    })?;
    let mut seen = BTreeMap::new();
    let names = [
        (
            "roles",
            file.roles
                .iter()
                .flatten()
                .map(|r| r.name.clone())
                .collect::<Vec<_>>(),
        ),
        (
            "users",
            file.users
                .iter()
                .flatten()
                .map(|u| u.email.to_lowercase())
                .collect::<Vec<_>>(),
        ),
        (
            "sites",
            file.sites
                .iter()
                .flatten()
                .map(|s| s.name.clone())
                .collect::<Vec<_>>(),
        ),
        (
            "gateways",
            file.gateways
                .iter()
                .flatten()
                .map(|s| s.name.clone())
                .collect(),
        ),
        (
            "policies",
            file.policies
                .iter()
                .flatten()
                .map(|s| s.name.clone())
                .collect(),
        ),
        (
            "resources",
            file.resources
                .iter()
                .flatten()
                .map(|r| resource_key(r).ok_or(FileError::Unnamed))
                .collect::<Result<_, _>>()?,
        ),
    ];
    for (kind, list) in names {
        for name in list {
            if seen.insert((kind, name.clone()), ()).is_some() {
                return Err(FileError::Duplicate { kind, name });
            }
        }
    }
    Ok(file)
}

fn resource_key(r: &ResourceSpec) -> Option<String> {
    r.hostname.clone().or_else(|| r.name.clone())
}

/// What control holds now: each kind's objects as the API lists them.
#[derive(Debug, Clone, Default)]
pub struct Current {
    /// `GET /roles` (built-in ones too).
    pub roles: Vec<Value>,
    /// `GET /users`.
    pub users: Vec<Value>,
    /// `GET /sites`.
    pub sites: Vec<Value>,
    /// `GET /gateways`.
    pub gateways: Vec<Value>,
    /// `GET /policies`.
    pub policies: Vec<Value>,
    /// `GET /resources`.
    pub resources: Vec<Value>,
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// `POST` `body` to the kind's collection.
    Create {
        /// `roles`, `users`, `sites`, `gateways`, `policies`, `resources`.
        kind: &'static str,
        /// Its name.
        name: String,
        /// The body; `site` and `policy` are still names (`site_id` / `policy_id` are filled in
        /// when the step runs, once what it names exists).
        body: Map<String, Value>,
    },
    /// `PATCH` the fields that differ.
    Update {
        /// The kind.
        kind: &'static str,
        /// Its name.
        name: String,
        /// Its id.
        id: String,
        /// The changed fields.
        body: Map<String, Value>,
    },
    /// `DELETE` (with prune).
    Delete {
        /// The kind.
        kind: &'static str,
        /// Its name.
        name: String,
        /// Its id.
        id: String,
    },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Create { kind, name, body } => {
                write!(f, "+ create {kind} {name:?}")?;
                let fields: Vec<&String> = body.keys().collect();
                if !fields.is_empty() {
                    write!(f, " ({})", join(fields))?;
                }
                Ok(())
            }
            Step::Update {
                kind, name, body, ..
            } => write!(
                f,
                "~ update {kind} {name:?}: {}",
                join(body.keys().collect())
            ),
            Step::Delete { kind, name, .. } => write!(f, "- delete {kind} {name:?}"),
        }
    }
}

fn join(v: Vec<&String>) -> String {
    v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
}

/// Whether `current` holds everything `want` says (objects: every key of `want`, recursively;
/// anything else: equal).
pub fn holds(current: &Value, want: &Value) -> bool {
    match (current, want) {
        (Value::Object(c), Value::Object(w)) => w
            .iter()
            .all(|(k, v)| holds(c.get(k).unwrap_or(&Value::Null), v)),
        (c, w) => c == w,
    }
}

fn by_name<'a>(list: &'a [Value], field: &str, name: &str) -> Option<&'a Value> {
    list.iter().find(|o| o[field] == name)
}

/// What the API's path names an object by: its id, or a role's name.
fn id_of(v: &Value) -> String {
    v["id"]
        .as_str()
        .or_else(|| v["name"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// Whether two lists of names hold the same names, in any order.
fn same_set(current: &Value, want: &Value) -> bool {
    let names = |v: &Value| -> Option<std::collections::BTreeSet<String>> {
        v.as_array()?
            .iter()
            .map(|x| x.as_str().map(str::to_lowercase))
            .collect()
    };
    match (names(current), names(want)) {
        (Some(c), Some(w)) => c == w,
        _ => current == want,
    }
}

fn name_of(list: &[Value], id: &Value) -> Option<String> {
    list.iter()
        .find(|o| &o["id"] == id)
        .and_then(|o| o["name"].as_str().map(str::to_owned))
}

/// The fields of a wanted object that the current one does not hold.
type Compare<'a> = dyn Fn(&Value, &Map<String, Value>) -> Map<String, Value> + 'a;

/// The steps that make `current` match `file`: creates and updates in dependency order (sites,
/// gateways, policies, then resources), then with `prune` the deletes in the reverse order.
pub fn plan(file: &ConfigFile, current: &Current, prune: bool) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut deletes = Vec::new();
    let mut kind_steps = |kind: &'static str,
                          field: &str,
                          wanted: Vec<(String, Map<String, Value>)>,
                          have: &[Value],
                          listed: bool,
                          compare: &Compare<'_>| {
        for (name, body) in &wanted {
            match by_name(have, field, name) {
                None => steps.push(Step::Create {
                    kind,
                    name: name.clone(),
                    body: body.clone(),
                }),
                Some(cur) => {
                    let diff = compare(cur, body);
                    if !diff.is_empty() {
                        steps.push(Step::Update {
                            kind,
                            name: name.clone(),
                            id: id_of(cur),
                            body: diff,
                        });
                    }
                }
            }
        }
        if prune && listed && kind != "users" {
            for cur in have.iter().filter(|c| c["built_in"] != true) {
                let name = cur[field]
                    .as_str()
                    .or_else(|| cur["name"].as_str())
                    .unwrap_or_default()
                    .to_owned();
                if !wanted.iter().any(|(n, _)| *n == name) {
                    deletes.push(Step::Delete {
                        kind,
                        name,
                        id: id_of(cur),
                    });
                }
            }
        }
    };
    let plain = |cur: &Value, want: &Map<String, Value>| -> Map<String, Value> {
        want.iter()
            .filter(|(k, v)| *k != "name" && !holds(&cur[k.as_str()], v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let obj = |v: Value| match v {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    // Roles and users: lists of names compare in any order.
    let sets = |cur: &Value, want: &Map<String, Value>| -> Map<String, Value> {
        want.iter()
            .filter(|(k, v)| {
                let c = &cur[k.as_str()];
                match k.as_str() {
                    "name" | "email" => false,
                    "permissions" | "roles" => !same_set(c, v),
                    _ => !holds(c, v),
                }
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    kind_steps(
        "roles",
        "name",
        file.roles
            .iter()
            .flatten()
            .map(|r| {
                (
                    r.name.clone(),
                    obj(serde_json::to_value(r).unwrap_or_default()),
                )
            })
            .collect(),
        &current.roles,
        file.roles.is_some(),
        &sets,
    );
    let users: Vec<Value> = current
        .users
        .iter()
        .map(|u| {
            let mut u = u.clone();
            if let Some(e) = u["email"].as_str().map(str::to_lowercase) {
                u["email"] = e.into();
            }
            u
        })
        .collect();
    kind_steps(
        "users",
        "email",
        file.users
            .iter()
            .flatten()
            .map(|u| {
                let mut u = u.clone();
                u.email = u.email.to_lowercase();
                (
                    u.email.clone(),
                    obj(serde_json::to_value(&u).unwrap_or_default()),
                )
            })
            .collect(),
        &users,
        file.users.is_some(),
        &sets,
    );
    kind_steps(
        "sites",
        "name",
        file.sites
            .iter()
            .flatten()
            .map(|s| (s.name.clone(), obj(serde_json::json!({"name": s.name}))))
            .collect(),
        &current.sites,
        file.sites.is_some(),
        &plain,
    );
    kind_steps(
        "gateways",
        "name",
        file.gateways
            .iter()
            .flatten()
            .map(|g| {
                (
                    g.name.clone(),
                    obj(serde_json::to_value(g).unwrap_or_default()),
                )
            })
            .collect(),
        &current.gateways,
        file.gateways.is_some(),
        &plain,
    );
    kind_steps(
        "policies",
        "name",
        file.policies
            .iter()
            .flatten()
            .map(|p| {
                (
                    p.name.clone(),
                    obj(serde_json::to_value(p).unwrap_or_default()),
                )
            })
            .collect(),
        &current.policies,
        file.policies.is_some(),
        &plain,
    );
    // Resources: `site` and `policy` are names; compared with the names of what the current
    // one points at.
    let resource = |cur: &Value, want: &Map<String, Value>| -> Map<String, Value> {
        let mut out = Map::new();
        for (k, v) in want {
            let same = match k.as_str() {
                "site" => {
                    name_of(&current.sites, &cur["site_id"]).as_ref()
                        == v.as_str().map(str::to_owned).as_ref()
                }
                "policy" => {
                    name_of(&current.policies, &cur["policy_id"]).as_ref()
                        == v.as_str().map(str::to_owned).as_ref()
                }
                // With a policy, the resource's own fields are `own_access`.
                "access" if !cur["policy_id"].is_null() => holds(&cur["own_access"], v),
                // Fixed at creation.
                "protocol" | "hostname" => true,
                _ => holds(&cur[k.as_str()], v),
            };
            if !same {
                out.insert(k.clone(), v.clone());
            }
        }
        out
    };
    let wanted_resources: Vec<(String, Map<String, Value>)> = file
        .resources
        .iter()
        .flatten()
        .filter_map(|r| Some((resource_key(r)?, obj(serde_json::to_value(r).ok()?))))
        .collect();
    // A resource is found by hostname, or by name when it has none.
    let have: Vec<Value> = current
        .resources
        .iter()
        .map(|r| {
            let mut r = r.clone();
            if r["hostname"].is_null() {
                r["hostname"] = r["name"].clone();
            }
            r
        })
        .collect();
    kind_steps(
        "resources",
        "hostname",
        wanted_resources,
        &have,
        file.resources.is_some(),
        &resource,
    );
    deletes.reverse();
    steps.extend(deletes);
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const FILE: &str = "\
sites:
  - name: home
policies:
  - name: staff
    access: {roles: [member]}
resources:
  - hostname: app.example.com
    site: home
    target: 127.0.0.1:9000
    policy: staff
";

    #[test]
    fn a_file_is_planned_then_nothing_is_left_to_do() {
        let file = parse(FILE).unwrap();
        let steps = plan(&file, &Current::default(), false);
        let text: Vec<String> = steps.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "+ create sites \"home\" (name)",
                "+ create policies \"staff\" (access, name)",
                "+ create resources \"app.example.com\" (hostname, policy, site, target)",
            ]
        );
        // As control shows it once applied (with fields of its own).
        let now = Current {
            sites: vec![json!({"id": "s1", "name": "home", "online": false})],
            gateways: vec![],
            policies: vec![
                json!({"id": "p1", "name": "staff", "access": {"roles": ["member"], "api_keys": false}}),
            ],
            resources: vec![json!({
                "id": "r1", "name": "app.example.com", "hostname": "app.example.com",
                "site_id": "s1", "policy_id": "p1", "target": "127.0.0.1:9000", "balance": "round_robin",
            })],
            ..Current::default()
        };
        assert_eq!(plan(&file, &now, true), []);
        // A change: one update of the changed fields; a removal: a delete only with prune.
        let changed = parse(&FILE.replace("127.0.0.1:9000", "127.0.0.1:9001").replace(
            "sites:\n  - name: home\n",
            "sites:\n  - name: home\n  - name: lab\n",
        ))
        .unwrap();
        assert_eq!(
            plan(&changed, &now, false)
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            [
                "+ create sites \"lab\" (name)",
                "~ update resources \"app.example.com\": target"
            ]
        );
        let fewer = parse("sites:\n  - name: home\nresources: []\n").unwrap();
        assert_eq!(plan(&fewer, &now, false), []);
        assert_eq!(
            plan(&fewer, &now, true),
            [Step::Delete {
                kind: "resources",
                name: "app.example.com".into(),
                id: "r1".into()
            }]
        );
    }

    #[test]
    fn roles_and_users_compare_lists_in_any_order_and_prune_spares_built_ins_and_users() {
        let file = parse(
            "roles:\n  - name: auditor\n    permissions: [user:read, audit:read]\n\
             users:\n  - email: Ann@Example.com\n    roles: [member, auditor]\n",
        )
        .unwrap();
        assert_eq!(
            plan(&file, &Current::default(), true)
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            [
                "+ create roles \"auditor\" (name, permissions)",
                "+ create users \"ann@example.com\" (email, roles)",
            ]
        );
        let now = Current {
            roles: vec![
                json!({"name": "owner", "built_in": true, "permissions": ["site:read"]}),
                json!({"name": "auditor", "built_in": false, "permissions": ["audit:read", "user:read"]}),
                json!({"name": "old", "built_in": false, "permissions": []}),
            ],
            users: vec![
                json!({"id": "u1", "email": "ann@example.com", "roles": ["auditor", "member"], "disabled": false}),
                json!({"id": "u2", "email": "owner@example.com", "roles": ["owner"]}),
            ],
            ..Current::default()
        };
        // Only the custom role the file does not name goes; no user, no built-in role.
        assert_eq!(
            plan(&file, &now, true),
            [Step::Delete {
                kind: "roles",
                name: "old".into(),
                id: "old".into()
            }]
        );
        let disabled = parse("users:\n  - email: ann@example.com\n    disabled: true\n").unwrap();
        assert_eq!(
            plan(&disabled, &now, true)
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["~ update users \"ann@example.com\": disabled"]
        );
        let e = parse("users:\n  - email: a@x.io\n  - email: A@x.io\n")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "users: \"a@x.io\" is named twice");
    }

    #[test]
    fn bad_files_name_their_line() {
        let e = parse("sites:\n  - name: home\n    nmae: x\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 3") && e.contains("unknown field `nmae`"),
            "{e}"
        );
        let e = parse("sites: [ {name: a}\n").unwrap_err().to_string();
        assert!(e.contains("line"), "{e}");
        let e = parse("sites:\n  - name: a\n  - name: a\n")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "sites: \"a\" is named twice");
        let e = parse("resources:\n  - site: a\n    target: b:1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("neither hostname nor name"), "{e}");
        let e = parse("resources:\n  - hostname: a\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `site`"), "{e}");
    }

    #[test]
    fn the_published_schema_is_the_generated_one() {
        let published: Value =
            serde_json::from_str(include_str!("../../docs/kakuremichi.schema.json")).unwrap();
        assert_eq!(
            published,
            schema(),
            "docs/kakuremichi.schema.json is stale: `kakuremichi schema > docs/kakuremichi.schema.json`"
        );
    }
}
