//! What control leaves on disk: a generated admin key goes to a file only its user can read (the
//! terminal gets the path, never the key), the data folder is 0700 and the database 0600.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use kakuremichi_e2e::{bin, free_tcp_port, wait_for, Api, Proc};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn a_generated_admin_key_is_written_to_a_private_file_and_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_tcp_port();
    let log = dir.path().join("control.log");
    let _control = Proc::spawn(
        "control",
        &bin("kakuremichi-control").unwrap(),
        &[
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--data-dir".into(),
            data.display().to_string(),
        ],
        &[],
        None,
        log.clone(),
    )
    .unwrap();
    let key_file = data.join("admin-key");
    let http = kakuremichi_e2e::test_http_client();
    wait_for("control to be healthy", Duration::from_secs(20), || async {
        Ok(http
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .ok()
            .filter(|r| r.status() == 200)
            .map(|_| ()))
    })
    .await
    .unwrap();

    let key = std::fs::read_to_string(&key_file).unwrap();
    let key = key.trim();
    assert!(key.starts_with("kma_"), "not an admin key: {key:?}");
    assert_eq!(mode(&key_file), 0o600, "admin key file mode");
    assert_eq!(mode(&data), 0o700, "data folder mode");
    assert_eq!(mode(&data.join("control.db")), 0o600, "database mode");
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(
        output.contains(&key_file.display().to_string()),
        "the path of the key file is not printed:\n{output}"
    );
    assert!(!output.contains(key), "the admin key reached the output");
    // The key in the file works.
    let api = Api::new(&format!("http://127.0.0.1:{port}"), key);
    api.get("/api/v1/sites").await.unwrap();
}

/// Runs `kakuremichi <args>` with its login kept in `config`: (success, stdout, stderr).
fn kakuremichi(config: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(bin("kakuremichi").unwrap())
        .args(args)
        .env("KAKUREMICHI_CONFIG_DIR", config)
        .env_remove("KAKUREMICHI_CONTROL")
        .env_remove("KAKUREMICHI_API_KEY")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_logs_in_once_and_manages_sites_resources_and_keys_of_a_real_control() {
    let stack = kakuremichi_e2e::Stack::start().await.unwrap();
    let config = tempfile::tempdir().unwrap();
    let control = stack.opts.control_url_for_test.clone();
    let cfg = config.path();

    // Without a login: a clear error; a wrong key is refused and nothing is kept.
    let (ok, _, err) = kakuremichi(cfg, &["sites", "list"]);
    assert!(!ok && err.contains("kakuremichi login"), "{err}");
    let (ok, _, err) = kakuremichi(
        cfg,
        &["login", "--control", &control, "--api-key", "kma_wrong"],
    );
    assert!(!ok && err.contains("401"), "{err}");
    assert!(!cfg.join("login.json").exists());
    let (ok, out, err) = kakuremichi(
        cfg,
        &[
            "login",
            "--control",
            &control,
            "--api-key",
            &stack.opts.admin_key,
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("logged in"), "{out}");
    assert_eq!(mode(&cfg.join("login.json")), 0o600);

    // Sites: a table, then JSON; a new one with its one-line install.
    let (ok, out, err) = kakuremichi(cfg, &["sites", "list"]);
    assert!(ok, "{err}");
    let mut lines = out.lines();
    assert!(lines.next().unwrap().starts_with("ID"), "{out}");
    assert!(out.contains(&stack.site_id), "{out}");
    let (ok, out, err) = kakuremichi(cfg, &["sites", "create", "branch-office"]);
    assert!(ok, "{err}");
    assert!(out.contains("enrollment token (shown once): "), "{out}");
    assert!(out.contains("install on the host: curl -fsSL"), "{out}");
    let (ok, out, _) = kakuremichi(cfg, &["sites", "get", "branch-office", "--json"]);
    assert!(ok);
    let site: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(site["name"], "branch-office");
    assert_eq!(site["online"], false);

    // A resource by the site's name, served through the gateway.
    let stack_site = stack
        .api
        .get(&format!("/api/v1/sites/{}", stack.site_id))
        .await
        .unwrap();
    let site_name = stack_site["name"].as_str().unwrap();
    let target = stack.opts.app_listen.to_string();
    let (ok, out, err) = kakuremichi(
        cfg,
        &[
            "resources",
            "create",
            "cli.localhost",
            "--set",
            &format!("site_id={site_name}"),
            "--set",
            &format!("target={target}"),
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("cli.localhost"), "{out}");
    wait_for(
        "the CLI's resource to serve",
        Duration::from_secs(15),
        || async {
            let r = stack.get("cli.localhost", "/").await?;
            Ok((r.status() == 200).then_some(()))
        },
    )
    .await
    .unwrap();
    let (ok, out, err) = kakuremichi(
        cfg,
        &[
            "resources",
            "update",
            "cli.localhost",
            "--set",
            "name=from the CLI",
        ],
    );
    assert!(ok && out.contains("from the CLI"), "{out}{err}");

    // A scoped key, its secret shown once; then gone.
    let (ok, out, err) = kakuremichi(
        cfg,
        &["keys", "create", "ci", "--set", "scopes:=[\"site:read\"]"],
    );
    assert!(ok, "{err}");
    let secret = out
        .lines()
        .find_map(|l| l.strip_prefix("secret (shown once): "))
        .unwrap_or_default();
    assert!(secret.len() > 20, "{out}");
    let (ok, _, err) = kakuremichi(cfg, &["keys", "rm", "ci"]);
    assert!(ok, "{err}");
    let (_, out, _) = kakuremichi(cfg, &["keys", "list", "--json"]);
    assert!(!out.contains("\"ci\""), "{out}");

    // Bad input: clear errors, nothing changed.
    let (ok, _, err) = kakuremichi(cfg, &["sites", "get", "nowhere"]);
    assert!(!ok && err.contains("no site named \"nowhere\""), "{err}");
    let (ok, _, err) = kakuremichi(
        cfg,
        &["resources", "create", "x.localhost", "--set", "target"],
    );
    assert!(!ok && err.contains("is not KEY=VALUE"), "{err}");
    let (ok, _, err) = kakuremichi(
        cfg,
        &[
            "resources",
            "create",
            "bad host!",
            "--set",
            &format!("site_id={site_name}"),
            "--set",
            "target=127.0.0.1:1",
        ],
    );
    assert!(!ok && err.contains("400"), "{err}");
    let (ok, _, _) = kakuremichi(cfg, &["resources", "rm", "cli.localhost"]);
    assert!(ok);
    let (ok, _, _) = kakuremichi(cfg, &["sites", "rm", "branch-office"]);
    assert!(ok);
    let (ok, out, _) = kakuremichi(cfg, &["logout"]);
    assert!(ok && out.contains("logged out"));
    assert!(!cfg.join("login.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_makes_control_match_a_file_twice_changes_nothing_and_prune_removes_the_rest() {
    let stack = kakuremichi_e2e::Stack::start().await.unwrap();
    let config = tempfile::tempdir().unwrap();
    let cfg = config.path();
    let control = stack.opts.control_url_for_test.clone();
    let (ok, _, err) = kakuremichi(
        cfg,
        &[
            "login",
            "--control",
            &control,
            "--api-key",
            &stack.opts.admin_key,
        ],
    );
    assert!(ok, "{err}");
    let site = stack
        .api
        .get(&format!("/api/v1/sites/{}", stack.site_id))
        .await
        .unwrap();
    let site = site["name"].as_str().unwrap().to_owned();
    let app = stack.opts.app_listen.to_string();
    let file = cfg.join("kakuremichi.yaml");
    let yaml = format!(
        "# yaml-language-server: $schema=../docs/kakuremichi.schema.json
roles:
  - name: auditor
    description: reads the log
    permissions: [user:read, audit:read]
users:
  - email: Ann@Example.com
    name: Ann
    roles: [auditor, member]
sites:
  - name: {site}
  - name: branch
policies:
  - name: staff
    access: {{roles: [member]}}
resources:
  - hostname: declared.localhost
    site: {site}
    target: {app}
  - hostname: guarded.localhost
    site: {site}
    target: {app}
    policy: staff
"
    );
    std::fs::write(&file, &yaml).unwrap();
    let f = file.to_str().unwrap();
    let resources = || async {
        stack
            .api
            .get("/api/v1/resources")
            .await
            .unwrap()
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(resources().await, 1);

    // diff: the plan, nothing changed.
    let (ok, out, err) = kakuremichi(cfg, &["diff", "-f", f]);
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "+ create roles \"auditor\" (description, name, permissions)",
            "+ create users \"ann@example.com\" (email, name, roles)",
            "+ create sites \"branch\" (name)",
            "+ create policies \"staff\" (access, name)",
            "+ create resources \"declared.localhost\" (hostname, site, target)",
            "+ create resources \"guarded.localhost\" (hostname, policy, site, target)",
        ],
        "{out}"
    );
    assert_eq!(resources().await, 1);

    // apply: made, served; the new site's install line printed.
    let (ok, out, err) = kakuremichi(cfg, &["apply", "-f", f]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("install site \"branch\" on its host: curl -fsSL"),
        "{out}"
    );
    assert_eq!(resources().await, 3);
    wait_for(
        "the declared resource to serve",
        Duration::from_secs(15),
        || async {
            let r = stack.get("declared.localhost", "/").await?;
            Ok((r.status() == 200).then_some(()))
        },
    )
    .await
    .unwrap();
    wait_for(
        "the guarded one to ask for sign-in",
        Duration::from_secs(15),
        || async {
            let r = stack.get("guarded.localhost", "/").await?;
            Ok((r.status() != 200 && r.status() != 404 && r.status() != 502).then_some(()))
        },
    )
    .await
    .unwrap();
    let ann = stack.api.get("/api/v1/users?q=ann").await.unwrap();
    assert_eq!(ann[0]["name"], "Ann", "{ann}");
    let auditor = stack.api.get("/api/v1/roles/auditor").await.unwrap();
    assert_eq!(auditor["description"], "reads the log", "{auditor}");
    // Twice: nothing to do.
    let (ok, out, err) = kakuremichi(cfg, &["apply", "-f", f]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), format!("no changes: control matches {f}"));

    // A change: one update.
    std::fs::write(
        &file,
        yaml.replace(
            "  - hostname: declared.localhost\n",
            "  - hostname: declared.localhost\n    name: Declared app\n",
        ),
    )
    .unwrap();
    let (ok, out, err) = kakuremichi(cfg, &["apply", "-f", f]);
    assert!(ok, "{err}");
    assert!(
        out.contains("~ update resources \"declared.localhost\": name"),
        "{out}"
    );
    let (_, out, _) = kakuremichi(cfg, &["apply", "-f", f]);
    assert!(out.starts_with("no changes"), "{out}");

    // Gone from the file: kept without --prune, deleted with it (with everything else of the
    // kinds the file lists that it does not name: the stack's demo resource).
    let fewer: String = yaml
        .split("  - hostname: guarded.localhost")
        .next()
        .unwrap()
        .to_owned();
    std::fs::write(&file, &fewer).unwrap();
    let (_, out, _) = kakuremichi(cfg, &["apply", "-f", f]);
    assert!(out.starts_with("no changes"), "{out}");
    assert_eq!(resources().await, 3);
    let (ok, out, err) = kakuremichi(cfg, &["apply", "-f", f, "--prune"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("- delete resources \"guarded.localhost\""),
        "{out}"
    );
    assert!(
        out.contains("- delete resources \"demo.localhost\""),
        "{out}"
    );
    assert_eq!(resources().await, 1);
    let (_, out, _) = kakuremichi(cfg, &["apply", "-f", f, "--prune"]);
    assert!(out.starts_with("no changes"), "{out}");

    // A bad file: its line, nothing done.
    std::fs::write(&file, "sites:\n  - name: x\n    nmae: y\n").unwrap();
    let (ok, _, err) = kakuremichi(cfg, &["apply", "-f", f]);
    assert!(
        !ok && err.contains("line 3") && err.contains("nmae"),
        "{err}"
    );
    std::fs::write(&file, "sites: [ {name: x}\n").unwrap();
    let (ok, _, err) = kakuremichi(cfg, &["apply", "-f", f]);
    assert!(!ok && err.contains("line"), "{err}");
    assert_eq!(resources().await, 1);
}

/// The OpenAPI description a running control serves, without a key, passes an OpenAPI 3.1
/// validator from npm (@seriousme/openapi-schema-validator: the official schema of the version,
/// then every `$ref` resolved), and control's real answers match the schemas it gives them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_control_serves_validates_as_openapi_3_1() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_tcp_port();
    let _control = Proc::spawn(
        "control",
        &bin("kakuremichi-control").unwrap(),
        &[
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--data-dir".into(),
            dir.path().join("data").display().to_string(),
        ],
        &[],
        None,
        dir.path().join("control.log"),
    )
    .unwrap();
    let http = kakuremichi_e2e::test_http_client();
    let doc = wait_for(
        "control's OpenAPI document",
        Duration::from_secs(20),
        || async {
            let Ok(r) = http
                .get(format!("http://127.0.0.1:{port}/api/v1/openapi.json"))
                .send()
                .await
            else {
                return Ok(None);
            };
            anyhow::ensure!(r.status() == 200, "{}", r.status());
            Ok(Some(r.text().await?))
        },
    )
    .await
    .unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, &doc).unwrap();

    // Real answers, each checked against the schema the document gives it.
    let key = std::fs::read_to_string(dir.path().join("data/admin-key")).unwrap();
    let api = Api::new(&format!("http://127.0.0.1:{port}"), key.trim());
    let mut samples = Vec::new();
    let mut ask = async |method: reqwest::Method, described: &str, path: &str, body| {
        let (status, answer) = api
            .call(method.clone(), &format!("/api/v1{path}"), body)
            .await
            .unwrap();
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {answer}"
        );
        samples.push(serde_json::json!({
            "method": method.as_str(), "path": described, "status": status, "body": answer,
        }));
        answer
    };
    use reqwest::Method as M;
    use serde_json::json;
    let site = ask(M::POST, "/sites", "/sites", Some(json!({"name": "home"}))).await;
    let site_id = site["id"].as_str().unwrap().to_owned();
    ask(M::GET, "/sites", "/sites", None).await;
    ask(M::GET, "/sites", "/sites?limit=1", None).await;
    let gw = json!({"name": "edge", "endpoint": "127.0.0.1:51820"});
    ask(M::POST, "/gateways", "/gateways", Some(gw)).await;
    ask(M::GET, "/gateways", "/gateways", None).await;
    let policy = json!({"name": "staff", "access": {
        "email_domains": ["example.com"],
        "rules": [{"action": "allow", "paths": ["/health"], "cidrs": ["10.0.0.0/8"]}],
    }});
    let policy = ask(M::POST, "/policies", "/policies", Some(policy)).await;
    ask(M::GET, "/policies", "/policies", None).await;
    let resource = json!({"name": "app", "hostname": "app.example.com", "site_id": site_id,
        "target": "127.0.0.1:8080", "policy_id": policy["id"]});
    let resource = ask(M::POST, "/resources", "/resources", Some(resource)).await;
    let rid = resource["id"].as_str().unwrap().to_owned();
    let tcp = json!({"protocol": "tcp", "public_port": 15432, "site_id": site_id,
        "target": "127.0.0.1:5432", "health_check": {"interval_ms": 5000}});
    ask(M::POST, "/resources", "/resources", Some(tcp)).await;
    ask(M::GET, "/resources", "/resources", None).await;
    ask(
        M::GET,
        "/resources/{id}",
        &format!("/resources/{rid}"),
        None,
    )
    .await;
    let patch = json!({"name": "app2", "policy_id": null, "access": {"users": ["a@example.com"]}});
    ask(
        M::PATCH,
        "/resources/{id}",
        &format!("/resources/{rid}"),
        Some(patch),
    )
    .await;
    let target = json!({"site_id": site_id, "target": "127.0.0.1:8081"});
    let path = format!("/resources/{rid}/targets");
    ask(M::POST, "/resources/{id}/targets", &path, Some(target)).await;
    let user = json!({"email": "ann@example.com", "roles": ["member"]});
    let user = ask(M::POST, "/users", "/users", Some(user)).await;
    let path = format!("/users/{}", user["id"].as_str().unwrap());
    ask(M::GET, "/users/{id}", &path, None).await;
    ask(M::GET, "/users", "/users", None).await;
    let k = json!({"name": "ci", "scopes": ["site:read"], "expires_in_days": 30});
    ask(M::POST, "/api-keys", "/api-keys", Some(k)).await;
    ask(M::GET, "/api-keys", "/api-keys", None).await;
    let path = format!("/sites/{site_id}/enrollment-token");
    ask(M::POST, "/sites/{id}/enrollment-token", &path, None).await;
    let path = format!("/sites/{site_id}/revoke");
    ask(M::POST, "/sites/{id}/revoke", &path, None).await;
    ask(M::GET, "/sites/{id}", &format!("/sites/{site_id}"), None).await;

    let out = kakuremichi_e2e::sso::run_script(
        "openapi.mjs",
        &json!({"file": file.display().to_string(), "samples": samples}),
    )
    .await
    .unwrap();
    assert_eq!(out["valid"], true, "{out}");
    assert_eq!(out["version"], "3.1", "{out}");
    assert_eq!(out["checked"], samples.len(), "{out}");
}
