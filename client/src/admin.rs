//! Control's admin REST API (`/api/v1`) for the `kakuremichi` CLI: a thin JSON client, the
//! saved login, and the table each kind of object prints as.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::ClientError;

/// A client of control's `/api/v1` with one API key.
#[derive(Clone)]
pub struct Admin {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// A saved login: control's URL and a key.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Login {
    /// Control's URL (`https://control.example.com`).
    pub control: String,
    /// The API key.
    pub api_key: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("control", &self.control)
            .field("api_key", &"<redacted>")
            .finish()
    }
}

impl Login {
    /// Where the login is kept: `$KAKUREMICHI_CONFIG_DIR`, else `$XDG_CONFIG_HOME/kakuremichi`,
    /// else `~/.config/kakuremichi`; the file is `login.json`.
    pub fn path() -> Option<PathBuf> {
        let dir = std::env::var_os("KAKUREMICHI_CONFIG_DIR")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("XDG_CONFIG_HOME").map(|d| PathBuf::from(d).join("kakuremichi"))
            })
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/kakuremichi"))
            })?;
        Some(dir.join("login.json"))
    }

    /// The saved login, if any.
    pub fn load() -> Result<Option<Login>, ClientError> {
        let Some(path) = Self::path() else {
            return Ok(None);
        };
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| ClientError::Invalid(format!("{} is damaged: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ClientError::Invalid(format!(
                "cannot read {}: {e}",
                path.display()
            ))),
        }
    }

    /// Saves it, readable by its owner only (0600).
    pub fn save(&self) -> Result<PathBuf, ClientError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = Self::path()
            .ok_or_else(|| ClientError::Invalid("no home folder to keep the login in".into()))?;
        let io = |e: std::io::Error| ClientError::Invalid(format!("{}: {e}", path.display()));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = path.with_extension("json.new");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(&serde_json::to_vec_pretty(self).unwrap_or_default())
            .map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok(path)
    }

    /// Forgets it; whether there was one.
    pub fn forget() -> Result<bool, ClientError> {
        let Some(path) = Self::path() else {
            return Ok(false);
        };
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(ClientError::Invalid(format!("{}: {e}", path.display()))),
        }
    }
}

impl Admin {
    /// A client of control at `control` with `key`.
    pub fn new(control: &str, key: &str) -> Result<Admin, ClientError> {
        let url = reqwest::Url::parse(control)
            .map_err(|e| ClientError::Invalid(format!("control URL {control:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ClientError::Invalid(format!(
                "control URL {control:?}: use http:// or https://"
            )));
        }
        if key.trim().is_empty() {
            return Err(ClientError::Invalid("the API key is empty".into()));
        }
        Ok(Admin {
            base: format!("{}/api/v1", control.trim_end_matches('/')),
            key: key.trim().to_owned(),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .timeout(Duration::from_secs(60))
                .build()?,
        })
    }

    /// `method path` with an optional JSON body: the answer's JSON (`null` for 204), or control's
    /// error message.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or(text);
            return Err(ClientError::Api {
                status: status.as_u16(),
                message,
            });
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call(reqwest::Method::GET, path, None).await
    }
}

/// A kind of object the CLI manages.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    /// Its collection under `/api/v1`, e.g. `/sites`.
    pub path: &'static str,
    /// One of them, for messages.
    pub one: &'static str,
    /// The field `create NAME` sets.
    pub name_field: &'static str,
    /// The table's columns: header and field.
    pub columns: &'static [(&'static str, &'static str)],
}

/// Sites, gateways, resources, policies, users, API keys, roles.
pub const KINDS: &[(&str, Kind)] = &[
    (
        "sites",
        Kind {
            path: "/sites",
            one: "site",
            name_field: "name",
            columns: &[
                ("ID", "id"),
                ("NAME", "name"),
                ("ONLINE", "online"),
                ("ADDRESS", "overlay_address"),
                ("VERSION", "software_version"),
                ("LAST SEEN", "last_seen_at"),
            ],
        },
    ),
    (
        "gateways",
        Kind {
            path: "/gateways",
            one: "gateway",
            name_field: "name",
            columns: &[
                ("ID", "id"),
                ("NAME", "name"),
                ("ONLINE", "online"),
                ("ENDPOINT", "endpoint"),
                ("VERSION", "software_version"),
                ("LAST SEEN", "last_seen_at"),
            ],
        },
    ),
    (
        "resources",
        Kind {
            path: "/resources",
            one: "resource",
            name_field: "hostname",
            columns: &[
                ("ID", "id"),
                ("NAME", "name"),
                ("PROTOCOL", "protocol"),
                ("HOSTNAME", "hostname"),
                ("PORT", "public_port"),
                ("TARGET", "target"),
            ],
        },
    ),
    (
        "policies",
        Kind {
            path: "/policies",
            one: "policy",
            name_field: "name",
            columns: &[("ID", "id"), ("NAME", "name"), ("RESOURCES", "resources")],
        },
    ),
    (
        "users",
        Kind {
            path: "/users",
            one: "user",
            name_field: "email",
            columns: &[
                ("ID", "id"),
                ("EMAIL", "email"),
                ("ROLES", "roles"),
                ("DISABLED", "disabled"),
                ("CREATED", "created_at"),
            ],
        },
    ),
    (
        "keys",
        Kind {
            path: "/api-keys",
            one: "API key",
            name_field: "name",
            columns: &[
                ("ID", "id"),
                ("NAME", "name"),
                ("SCOPES", "scopes"),
                ("EXPIRES", "expires_at"),
                ("LAST USED", "last_used_at"),
            ],
        },
    ),
    (
        "roles",
        Kind {
            path: "/roles",
            one: "role",
            name_field: "name",
            columns: &[("NAME", "name"), ("PERMISSIONS", "permissions")],
        },
    ),
];

/// The kind named `name` (`sites`, ...).
pub fn kind(name: &str) -> Option<Kind> {
    KINDS.iter().find(|(n, _)| *n == name).map(|(_, k)| *k)
}

/// A cell: strings (times among them: control answers RFC 3339) as they are, lists joined by
/// commas, nothing as `-`.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => {
            let parts: Vec<String> = a.iter().map(cell).collect();
            if parts.is_empty() {
                "-".into()
            } else {
                parts.join(",")
            }
        }
        other => other.to_string(),
    }
}

/// A table of `rows` with `columns`, aligned.
pub fn table(columns: &[(&str, &str)], rows: &[Value]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|(_, f)| cell(&r[*f])).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (h, _))| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |parts: Vec<&str>| {
        parts
            .iter()
            .zip(&widths)
            .map(|(p, w)| format!("{p:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = vec![line(columns.iter().map(|(h, _)| *h).collect())];
    for r in &cells {
        out.push(line(r.iter().map(String::as_str).collect()));
    }
    out.join("\n")
}

/// `KEY=VALUE` (a string) or `KEY:=JSON` (any JSON value) into `body`.
pub fn set(body: &mut serde_json::Map<String, Value>, pair: &str) -> Result<(), ClientError> {
    if let Some((k, v)) = pair.split_once(":=") {
        if !k.is_empty() && !k.contains('=') {
            let v = serde_json::from_str(v).map_err(|e| {
                ClientError::Invalid(format!("--set {pair:?}: the value is not JSON: {e}"))
            })?;
            body.insert(k.to_owned(), v);
            return Ok(());
        }
    }
    match pair.split_once('=') {
        Some((k, v)) if !k.is_empty() => {
            body.insert(k.to_owned(), Value::String(v.to_owned()));
            Ok(())
        }
        _ => Err(ClientError::Invalid(format!(
            "--set {pair:?} is not KEY=VALUE or KEY:=JSON"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cells_tables_and_sets() {
        // Control answers times as RFC 3339: shown as they are.
        assert_eq!(
            cell(&json!("2026-05-02T12:00:00.000Z")),
            "2026-05-02T12:00:00.000Z"
        );
        assert_eq!(cell(&json!(["a", "b"])), "a,b");
        assert_eq!(cell(&Value::Null), "-");
        assert_eq!(cell(&json!(true)), "true");
        let t = table(
            &[("ID", "id"), ("NAME", "name")],
            &[json!({"id": "1", "name": "home"}), json!({"id": "22"})],
        );
        assert_eq!(t, "ID  NAME\n1   home\n22  -");
        let mut body = serde_json::Map::new();
        set(&mut body, "name=a=b").unwrap();
        set(&mut body, "scopes:=[\"site:read\"]").unwrap();
        set(&mut body, "n:=5").unwrap();
        assert_eq!(
            Value::Object(body.clone()),
            json!({"name": "a=b", "scopes": ["site:read"], "n": 5})
        );
        assert!(set(&mut body, "novalue").is_err());
        assert!(set(&mut body, "x:={oops").is_err());
        assert!(kind("sites").is_some() && kind("nope").is_none());
    }
}
