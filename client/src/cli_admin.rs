//! The object commands of the CLI: `login`, and `list|get|create|update|rm|token` of each kind.

use anyhow::{bail, Context as _};
use kakuremichi_client::admin::{self, Admin, Kind, Login};
use serde_json::Value;

use super::{ObjectArgs, Verb};

/// `kakuremichi login`: checks the key, then keeps it.
pub async fn login(control: &str, key: &str) -> anyhow::Result<()> {
    let api = Admin::new(control, key)?;
    // Any answer but 401 means the key is good (a scoped key may not read sites).
    match api.get("/sites").await {
        Ok(_) | Err(kakuremichi_client::ClientError::Api { status: 403, .. }) => {}
        Err(e) => return Err(e).context("control refused the key"),
    }
    let path = Login {
        control: control.trim_end_matches('/').to_owned(),
        api_key: key.trim().to_owned(),
    }
    .save()?;
    println!("logged in to {control} (kept in {})", path.display());
    Ok(())
}

fn client(a: &ObjectArgs) -> anyhow::Result<Admin> {
    client_of(a.control.clone(), a.api_key.clone())
}

fn client_of(control: Option<String>, api_key: Option<String>) -> anyhow::Result<Admin> {
    let saved = Login::load()?;
    let control = control
        .or_else(|| saved.as_ref().map(|l| l.control.clone()))
        .context("no control URL: run `kakuremichi login --control URL --api-key KEY` first")?;
    let key = api_key
        .or_else(|| saved.as_ref().map(|l| l.api_key.clone()))
        .context("no API key: run `kakuremichi login --control URL --api-key KEY` first")?;
    Ok(Admin::new(&control, &key)?)
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

/// The id of the object of `kind` whose id, name or name field is `id`.
async fn resolve(api: &Admin, kind: &Kind, id: &str) -> anyhow::Result<String> {
    if kind.path == "/roles" || is_uuid(id) {
        return Ok(id.to_owned());
    }
    let all = api.get(kind.path).await?;
    let found: Vec<&Value> = all
        .as_array()
        .into_iter()
        .flatten()
        .filter(|o| o["name"] == id || o[kind.name_field] == id)
        .collect();
    match found.as_slice() {
        [one] => Ok(one["id"].as_str().unwrap_or_default().to_owned()),
        [] => bail!("no {} named {id:?}", kind.one),
        _ => bail!("several {}s are named {id:?}: use its id", kind.one),
    }
}

async fn body(
    api: &Admin,
    data: Option<&str>,
    set: &[String],
) -> anyhow::Result<serde_json::Map<String, Value>> {
    let mut body = match data {
        None => serde_json::Map::new(),
        Some(d) => match serde_json::from_str(d).context("--data is not JSON")? {
            Value::Object(m) => m,
            _ => bail!("--data must be a JSON object"),
        },
    };
    for pair in set {
        admin::set(&mut body, pair)?;
    }
    // A site by its name.
    if let Some(Value::String(site)) = body.get("site_id").cloned() {
        let sites = admin::kind("sites").context("sites")?;
        body.insert(
            "site_id".into(),
            Value::String(resolve(api, &sites, &site).await?),
        );
    }
    Ok(body)
}

fn show(kind: &Kind, v: &Value, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    match v {
        Value::Array(rows) => println!("{}", admin::table(kind.columns, rows)),
        Value::Null => {}
        one => {
            println!("{}", admin::table(kind.columns, std::slice::from_ref(one)));
            for (field, label) in [
                ("enrollment_token", "enrollment token (shown once)"),
                ("secret", "secret (shown once)"),
                ("install_command", "install on the host"),
            ] {
                if let Some(s) = one[field].as_str() {
                    println!("{label}: {s}");
                }
            }
        }
    }
    Ok(())
}

/// `kakuremichi <kind> <verb>`.
pub async fn run(name: &str, a: ObjectArgs) -> anyhow::Result<()> {
    let kind = admin::kind(name).with_context(|| format!("no such kind {name}"))?;
    let api = client(&a)?;
    let json = a.json;
    match &a.verb {
        Verb::List => show(&kind, &api.get(kind.path).await?, json),
        Verb::Get { id } => {
            let id = resolve(&api, &kind, id).await?;
            show(&kind, &api.get(&format!("{}/{id}", kind.path)).await?, json)
        }
        Verb::Create { name, set, data } => {
            let mut b = body(&api, data.as_deref(), set).await?;
            if let Some(n) = name {
                b.insert(kind.name_field.into(), Value::String(n.clone()));
            }
            let made = api
                .call(reqwest::Method::POST, kind.path, Some(&Value::Object(b)))
                .await?;
            show(&kind, &made, json)
        }
        Verb::Update { id, set, data } => {
            let id = resolve(&api, &kind, id).await?;
            let b = body(&api, data.as_deref(), set).await?;
            if b.is_empty() {
                bail!("nothing to change: give --set KEY=VALUE or --data JSON");
            }
            let changed = api
                .call(
                    reqwest::Method::PATCH,
                    &format!("{}/{id}", kind.path),
                    Some(&Value::Object(b)),
                )
                .await?;
            show(&kind, &changed, json)
        }
        Verb::Rm { id } => {
            let rid = resolve(&api, &kind, id).await?;
            api.call(
                reqwest::Method::DELETE,
                &format!("{}/{rid}", kind.path),
                None,
            )
            .await?;
            println!("deleted {} {id}", kind.one);
            Ok(())
        }
        Verb::Token { id } => {
            if !matches!(kind.path, "/sites" | "/gateways") {
                bail!("only sites and gateways have enrollment tokens");
            }
            let rid = resolve(&api, &kind, id).await?;
            let t = api
                .call(
                    reqwest::Method::POST,
                    &format!("{}/{rid}/enrollment-token", kind.path),
                    None,
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                println!(
                    "enrollment token (shown once; the old credential is revoked): {}",
                    t["enrollment_token"].as_str().unwrap_or_default()
                );
                if let Some(c) = t["install_command"].as_str() {
                    println!("install on the host: {c}");
                }
            }
            Ok(())
        }
    }
}

fn list(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a,
        _ => Vec::new(),
    }
}

/// `kakuremichi apply` (`run`) and `kakuremichi diff`.
pub async fn apply(
    path: &str,
    prune: bool,
    control: Option<String>,
    api_key: Option<String>,
    run: bool,
) -> anyhow::Result<()> {
    use kakuremichi_client::apply::{self, Current, Step};
    let text = if path == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?
    };
    let file = apply::parse(&text).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
    let api = client_of(control, api_key)?;
    let mut current = Current {
        roles: if file.roles.is_some() {
            list(api.get("/roles").await?)
        } else {
            Vec::new()
        },
        users: if file.users.is_some() {
            list(api.get("/users").await?)
        } else {
            Vec::new()
        },
        sites: list(api.get("/sites").await?),
        gateways: list(api.get("/gateways").await?),
        policies: list(api.get("/policies").await?),
        resources: list(api.get("/resources").await?),
    };
    let steps = apply::plan(&file, &current, prune);
    if steps.is_empty() {
        println!("no changes: control matches {path}");
        return Ok(());
    }
    for s in &steps {
        println!("{s}");
    }
    if !run {
        return Ok(());
    }
    let id_by_name = |objects: &[Value], name: &str| -> Option<String> {
        objects
            .iter()
            .find(|o| o["name"] == name)
            .and_then(|o| o["id"].as_str().map(str::to_owned))
    };
    for step in &steps {
        match step {
            Step::Create { kind, name, body }
            | Step::Update {
                kind, name, body, ..
            } => {
                let mut body = body.clone();
                if let Some(Value::String(site)) = body.remove("site") {
                    let id = id_by_name(&current.sites, &site)
                        .with_context(|| format!("{kind} {name:?}: no site named {site:?}"))?;
                    body.insert("site_id".into(), Value::String(id));
                }
                if let Some(Value::String(policy)) = body.remove("policy") {
                    let id = id_by_name(&current.policies, &policy)
                        .with_context(|| format!("{kind} {name:?}: no policy named {policy:?}"))?;
                    body.insert("policy_id".into(), Value::String(id));
                }
                let body = Value::Object(body);
                let made = match step {
                    Step::Update { id, .. } => {
                        api.call(
                            reqwest::Method::PATCH,
                            &format!("/{kind}/{id}"),
                            Some(&body),
                        )
                        .await
                    }
                    _ => {
                        api.call(reqwest::Method::POST, &format!("/{kind}"), Some(&body))
                            .await
                    }
                }
                .with_context(|| format!("{step}"))?;
                println!("done: {step}");
                if let Some(t) = made["install_command"].as_str() {
                    println!("  install site {name:?} on its host: {t}");
                } else if let Some(t) = made["enrollment_token"].as_str() {
                    println!("  enrollment token of {kind} {name:?} (shown once): {t}");
                }
                match *kind {
                    "sites" => current.sites.push(made),
                    "policies" => current.policies.push(made),
                    _ => {}
                }
            }
            Step::Delete { kind, id, .. } => {
                api.call(reqwest::Method::DELETE, &format!("/{kind}/{id}"), None)
                    .await
                    .with_context(|| format!("{step}"))?;
                println!("done: {step}");
            }
        }
    }
    Ok(())
}
