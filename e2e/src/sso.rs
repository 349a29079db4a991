//! Real parts for the single sign-on tests: an OpenID Provider (npm `oidc-provider`, on loopback)
//! and Debian's Chromium driven by npm `playwright-core`, both from `e2e/js` (installed by
//! `scripts/setup`). A missing part is an error, never a skipped test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::{free_tcp_port, wait_for, Proc};

/// The folder with the JavaScript parts and their `node_modules`.
pub fn js_dir() -> anyhow::Result<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("js");
    for need in [
        "node_modules/oidc-provider",
        "node_modules/playwright-core",
        "node_modules/@modelcontextprotocol/sdk",
    ] {
        if !dir.join(need).exists() {
            bail!(
                "{} is missing: run scripts/setup (it installs the OpenID Provider and \
                 playwright-core with npm, and Chromium with apt)",
                dir.join(need).display()
            );
        }
    }
    if !Path::new("/usr/bin/chromium").exists() {
        bail!("/usr/bin/chromium is missing: run scripts/setup");
    }
    Ok(dir)
}

/// An OpenID Provider on loopback, with accounts `alice` (groups `engineers`), `bob` (`sales`)
/// and `mallory` (an unverified e-mail address).
#[derive(Debug)]
pub struct Op {
    /// Its process.
    pub proc: Proc,
    /// Its issuer URL.
    pub issuer: String,
    /// The client control uses.
    pub client_id: String,
    /// That client's secret.
    pub client_secret: String,
}

impl Op {
    /// Starts the provider with one client whose redirect URI is `redirect_uri`.
    pub async fn start(dir: &Path, redirect_uri: &str) -> anyhow::Result<Op> {
        Op::start_on(dir, std::net::Ipv4Addr::LOCALHOST, redirect_uri).await
    }

    /// Starts the provider listening on `host` (an address of this namespace), its issuer named
    /// by that address.
    pub async fn start_on(
        dir: &Path,
        host: std::net::Ipv4Addr,
        redirect_uri: &str,
    ) -> anyhow::Result<Op> {
        let js = js_dir()?;
        let port = free_tcp_port();
        let client_id = "kakuremichi".to_owned();
        let client_secret = format!("op-secret-{:016x}", rand::random::<u64>());
        let proc = Proc::spawn(
            "oidc-provider",
            Path::new("node"),
            &[
                js.join("op.mjs").display().to_string(),
                port.to_string(),
                client_id.clone(),
                client_secret.clone(),
                redirect_uri.to_owned(),
                host.to_string(),
            ],
            &[],
            None,
            dir.join("op.log"),
        )?;
        let issuer = format!("http://{host}:{port}");
        let discovery = format!("{issuer}/.well-known/openid-configuration");
        let http = crate::identity::client();
        wait_for(
            "the OpenID Provider to answer",
            Duration::from_secs(20),
            || async {
                Ok(http
                    .get(&discovery)
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status() == 200)
                    .map(|_| ()))
            },
        )
        .await
        .map_err(|e| e.context(proc.log_tail(30)))?;
        Ok(Op {
            proc,
            issuer,
            client_id,
            client_secret,
        })
    }
}

/// Runs `e2e/js/browser.mjs` (Chromium through a sign-in at the provider) and returns what it
/// printed: `landed` (where the sign-in ended), `status`/`text` (the resource loaded again).
pub async fn browse(args: &Value) -> anyhow::Result<Value> {
    run_script("browser.mjs", args).await
}

/// Runs `e2e/js/<script>` with Chromium and returns the JSON line it printed.
pub async fn run_script(script: &str, args: &Value) -> anyhow::Result<Value> {
    let js = js_dir()?;
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new("node")
            .arg(js.join(script))
            .arg(args.to_string())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("the browser took more than 90 s")?
    .context("starting node")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let v: Value = serde_json::from_str(line).with_context(|| {
        format!(
            "{script} printed no result: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(e) = v.get("error") {
        bail!("the browser failed: {e}");
    }
    Ok(v)
}

/// A stand-in for GitHub's OAuth and REST API (no real GitHub is reachable from a test), at a
/// GitHub Enterprise style base URL: `/login/oauth/authorize` approves at once for the one user
/// `octocat` (id 583231, e-mail `octocat@example.com` verified and primary, member of org `acme`
/// and team `acme/platform`); `/login/oauth/access_token` checks the client, the code (once),
/// the redirect URI and the PKCE S256 verifier; `/api/v3/user`, `/user/emails`, `/user/orgs` and
/// `/user/teams` need the token it issued.
#[derive(Debug)]
pub struct FakeGithub {
    /// Base URL, e.g. `http://127.0.0.1:port`.
    pub base: String,
    /// Client id it accepts.
    pub client_id: String,
    /// Client secret it accepts.
    pub client_secret: String,
    /// Requests it refused, with why.
    pub refused: std::sync::Arc<parking_lot::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeGithub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Default)]
struct GithubState {
    /// code -> (challenge, redirect_uri)
    codes: std::collections::HashMap<String, (String, String)>,
    token: Option<String>,
}

impl FakeGithub {
    /// Starts it on a free loopback port.
    pub async fn start() -> anyhow::Result<FakeGithub> {
        use axum::extract::{Form, Query};
        use axum::http::{HeaderMap, StatusCode};
        use axum::response::{IntoResponse, Redirect};
        use axum::routing::{get, post};
        use axum::Json;
        use base64::Engine as _;
        use parking_lot::Mutex;
        use sha2::Digest as _;
        use std::collections::HashMap;
        use std::sync::Arc;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let client_id = "Iv1.kakuremichi".to_owned();
        let client_secret = format!("gh-secret-{:016x}", rand::random::<u64>());
        let state: Arc<Mutex<GithubState>> = Arc::default();
        let refused: Arc<Mutex<Vec<String>>> = Arc::default();

        let (st, cid, rf) = (state.clone(), client_id.clone(), refused.clone());
        let authorize = move |Query(q): Query<HashMap<String, String>>| {
            let (st, cid, rf) = (st.clone(), cid.clone(), rf.clone());
            async move {
                let get = |k: &str| q.get(k).cloned().unwrap_or_default();
                if get("client_id") != cid || get("code_challenge_method") != "S256" {
                    rf.lock().push("authorize: client or PKCE method".into());
                    return (StatusCode::BAD_REQUEST, "bad authorize request").into_response();
                }
                let code = format!("code{:016x}", rand::random::<u64>());
                st.lock()
                    .codes
                    .insert(code.clone(), (get("code_challenge"), get("redirect_uri")));
                let mut back = match url::Url::parse(&get("redirect_uri")) {
                    Ok(u) => u,
                    Err(_) => return (StatusCode::BAD_REQUEST, "bad redirect_uri").into_response(),
                };
                back.query_pairs_mut()
                    .append_pair("code", &code)
                    .append_pair("state", &get("state"));
                Redirect::to(back.as_str()).into_response()
            }
        };
        let (st, cid, secret, rf) = (
            state.clone(),
            client_id.clone(),
            client_secret.clone(),
            refused.clone(),
        );
        let token = move |Form(f): Form<HashMap<String, String>>| {
            let (st, cid, secret, rf) = (st.clone(), cid.clone(), secret.clone(), rf.clone());
            async move {
                let get = |k: &str| f.get(k).cloned().unwrap_or_default();
                let refuse = |why: &str| {
                    rf.lock().push(format!("token: {why}"));
                    Json(serde_json::json!({"error": "bad_verification_code",
                        "error_description": why}))
                };
                if get("client_id") != cid || get("client_secret") != secret {
                    return refuse("client");
                }
                let mut s = st.lock();
                let Some((challenge, redirect)) = s.codes.remove(&get("code")) else {
                    return refuse("unknown or used code");
                };
                let computed = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .encode(sha2::Sha256::digest(get("code_verifier").as_bytes()));
                if computed != challenge {
                    return refuse("PKCE verifier");
                }
                if redirect != get("redirect_uri") {
                    return refuse("redirect_uri");
                }
                let t = format!("gho_{:016x}", rand::random::<u64>());
                s.token = Some(t.clone());
                Json(
                    serde_json::json!({"access_token": t, "token_type": "bearer",
                    "scope": "read:user,user:email,read:org"}),
                )
            }
        };
        let api = move |body: serde_json::Value| {
            let st = state.clone();
            move |h: HeaderMap| {
                let (st, body) = (st.clone(), body.clone());
                async move {
                    let want = st.lock().token.clone();
                    let sent = h
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Bearer "))
                        .map(str::to_owned);
                    if want.is_none() || sent != want {
                        return (StatusCode::UNAUTHORIZED, "Bad credentials").into_response();
                    }
                    Json(body).into_response()
                }
            }
        };
        let app = axum::Router::new()
            .route("/login/oauth/authorize", get(authorize))
            .route("/login/oauth/access_token", post(token))
            .route(
                "/api/v3/user",
                get(api(
                    serde_json::json!({"id": 583231, "login": "octocat", "name": "The Octocat"}),
                )),
            )
            .route(
                "/api/v3/user/emails",
                get(api(serde_json::json!([
                    {"email": "octo@old.example.com", "primary": false, "verified": true},
                    {"email": "octocat@example.com", "primary": true, "verified": true}
                ]))),
            )
            .route(
                "/api/v3/user/orgs",
                get(api(serde_json::json!([{"login": "acme"}]))),
            )
            .route(
                "/api/v3/user/teams",
                get(api(
                    serde_json::json!([{"slug": "platform", "organization": {"login": "acme"}}]),
                )),
            );
        let task = tokio::spawn(async move {
            let _: Result<(), _> = axum::serve(listener, app).await;
        });
        Ok(FakeGithub {
            base,
            client_id,
            client_secret,
            refused,
            task,
        })
    }
}
