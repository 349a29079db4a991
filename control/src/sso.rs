//! Single sign-on at control: generic OpenID Connect (discovery, PKCE S256, state, nonce, issuer
//! and audience checks, by the `openidconnect` crate) and GitHub OAuth (github.com or a GitHub
//! Enterprise server), with group-to-role mapping and provisioning.
//!
//! `GET /auth/sso/<provider>?rd=..&n=..` starts a sign-in: the state, nonce, PKCE verifier and
//! where to return travel in a sealed, HttpOnly cookie scoped to `/auth/sso`, valid ten minutes.
//! `GET /auth/sso/<provider>/callback` checks them, asks the provider who signed in, finds or
//! provisions the user and then goes on exactly as a password sign-in does
//! ([`crate::auth::finish`]): a control session, and a grant for the resource.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::header::{LOCATION, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine as _;
use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata};
use openidconnect::{
    AuthorizationCode, ClientId, ClientSecret, CsrfToken, IssuerUrl, Nonce, OAuth2TokenResponse,
    PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope, TokenResponse,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use subtle::ConstantTimeEq as _;
use uuid::Uuid;

use crate::auth::{audit, check_return, cookie_value, error_page, finish, secure, ReturnQuery};
use crate::store::{
    now_ms, ExternalAccount, IdentityProvider, ProviderKind, StoreError, DEFAULT_ORG,
};
use crate::AppState;

/// The cookie carrying a sign-in in progress (sealed).
const FLOW_COOKIE: &str = "kakuremichi_sso";
/// Purpose the flow cookie is sealed under.
const FLOW_PURPOSE: &str = "sso-flow";
/// How long a sign-in at a provider may take.
const FLOW_LIFE_SECS: i64 = 600;
/// How long a provider's discovery document is kept.
const DISCOVERY_TTL: Duration = Duration::from_secs(300);

/// HTTP client and discovery cache for identity providers.
#[derive(Debug)]
pub struct SsoClients {
    http: reqwest::Client,
    discovered: Mutex<HashMap<Uuid, (Instant, Arc<CoreProviderMetadata>)>>,
}

impl Default for SsoClients {
    fn default() -> Self {
        let http = reqwest::Client::builder()
            // Following redirects would open control to SSRF through a provider.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .user_agent("kakuremichi")
            .build()
            .unwrap_or_default();
        Self {
            http,
            discovered: Mutex::default(),
        }
    }
}

impl SsoClients {
    /// Forgets what was discovered about a provider (it was removed or changed).
    pub fn forget(&self, id: Uuid) {
        self.discovered.lock().remove(&id);
    }

    async fn metadata(&self, p: &IdentityProvider) -> Result<Arc<CoreProviderMetadata>, String> {
        if let Some((at, m)) = self.discovered.lock().get(&p.id) {
            if at.elapsed() < DISCOVERY_TTL {
                return Ok(m.clone());
            }
        }
        let issuer = IssuerUrl::new(p.issuer.clone()).map_err(|e| e.to_string())?;
        let m = CoreProviderMetadata::discover_async(issuer, &self.http)
            .await
            .map_err(|e| error_chain(&e))?;
        let m = Arc::new(m);
        self.discovered
            .lock()
            .insert(p.id, (Instant::now(), m.clone()));
        Ok(m)
    }
}

/// An error and its sources, joined by `: `.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A sign-in in progress, sealed into [`FLOW_COOKIE`].
#[derive(Serialize, Deserialize)]
struct Flow {
    /// Provider name.
    p: String,
    /// OAuth state.
    s: String,
    /// OIDC nonce.
    nonce: String,
    /// PKCE verifier.
    v: String,
    /// Where to return, as on the sign-in page.
    rd: Option<String>,
    n: Option<String>,
    /// Expiry (unix seconds).
    exp: i64,
}

/// The single sign-on routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/auth/sso/{provider}", get(start))
        .route("/auth/sso/{provider}/callback", get(callback))
}

fn redirect_uri(state: &AppState, p: &IdentityProvider) -> String {
    format!(
        "{}/auth/sso/{}/callback",
        state.store.public_url().trim_end_matches('/'),
        p.name
    )
}

/// GitHub's API: api.github.com for github.com, `<base>/api/v3` for GitHub Enterprise.
fn github_api(base: &str) -> String {
    match url::Url::parse(base) {
        Ok(u) if u.host_str() == Some("github.com") => "https://api.github.com".into(),
        _ => format!("{}/api/v3", base.trim_end_matches('/')),
    }
}

fn unavailable(what: &str) -> Response {
    error_page(
        StatusCode::BAD_GATEWAY,
        "Cannot sign in",
        &format!("{what} is not answering right now; try again shortly, or sign in another way"),
    )
}

async fn start(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<ReturnQuery>,
) -> Response {
    let p = match state.store.identity_provider_by_name(&name).await {
        Ok(Some((p, _))) => p,
        Ok(None) => {
            return error_page(
                StatusCode::NOT_FOUND,
                "Cannot sign in",
                "there is no such way to sign in here",
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read an identity provider");
            return unavailable("sign-in");
        }
    };
    if let Err(m) = check_return(&state, &q).await {
        return error_page(StatusCode::BAD_REQUEST, "Cannot sign in", &m);
    }
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let csrf = CsrfToken::new_random();
    let nonce = Nonce::new_random();
    let redirect = redirect_uri(&state, &p);
    let location = match p.kind {
        ProviderKind::Oidc => {
            let m = match state.sso.metadata(&p).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(provider = %p.name, error = %e, "OIDC discovery failed");
                    return unavailable(&p.display_name);
                }
            };
            let Ok(redirect) = RedirectUrl::new(redirect) else {
                return unavailable("sign-in");
            };
            let client = CoreClient::from_provider_metadata(
                (*m).clone(),
                ClientId::new(p.client_id.clone()),
                None,
            )
            .set_redirect_uri(redirect);
            let (csrf, nonce) = (csrf.clone(), nonce.clone());
            let mut req = client.authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                move || csrf,
                move || nonce,
            );
            for s in p.scopes.iter().filter(|s| *s != "openid") {
                req = req.add_scope(Scope::new(s.clone()));
            }
            req.set_pkce_challenge(challenge).url().0.to_string()
        }
        ProviderKind::Github => {
            let mut u = match url::Url::parse(&format!("{}/login/oauth/authorize", p.issuer)) {
                Ok(u) => u,
                Err(_) => return unavailable("sign-in"),
            };
            u.query_pairs_mut()
                .append_pair("client_id", &p.client_id)
                .append_pair("redirect_uri", &redirect)
                .append_pair("scope", &p.scopes.join(" "))
                .append_pair("state", csrf.secret())
                .append_pair("code_challenge", challenge.as_str())
                .append_pair("code_challenge_method", "S256")
                .append_pair("allow_signup", "false");
            u.to_string()
        }
    };
    let flow = Flow {
        p: p.name.clone(),
        s: csrf.secret().clone(),
        nonce: nonce.secret().clone(),
        v: verifier.secret().clone(),
        rd: q.rd,
        n: q.n,
        exp: now_ms() / 1000 + FLOW_LIFE_SECS,
    };
    let sealed = match serde_json::to_vec(&flow)
        .map_err(|e| e.to_string())
        .and_then(|j| {
            state
                .store
                .seal_blob(FLOW_PURPOSE, &j)
                .map_err(|e| e.to_string())
        }) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot seal a sign-in in progress");
            return unavailable("sign-in");
        }
    };
    tracing::info!(provider = %p.name, "sending a browser to sign in at an identity provider");
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(LOCATION, v);
    }
    // SameSite=Lax: the provider sends the browser back with a top-level GET.
    let c = format!(
        "{FLOW_COOKIE}={sealed}; Path=/auth/sso; Max-Age={FLOW_LIFE_SECS}; HttpOnly; SameSite=Lax{}",
        secure(&state)
    );
    if let Ok(v) = HeaderValue::from_str(&c) {
        r.headers_mut().append(SET_COOKIE, v);
    }
    r
}

/// The query a provider sends the browser back with.
#[derive(Debug, Deserialize)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// A refused callback: logged, audited, and shown as a clear page.
struct Refusal {
    status: StatusCode,
    /// For the log and the audit line.
    reason: String,
    /// For the person.
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

async fn callback(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Query(q): Query<CallbackQuery>,
) -> Response {
    let outcome = sign_in_at(&state, &name, &headers, q).await;
    // The flow cookie is spent either way.
    let clear = format!(
        "{FLOW_COOKIE}=; Path=/auth/sso; Max-Age=0; HttpOnly; SameSite=Lax{}",
        secure(&state)
    );
    let mut r = match outcome {
        Ok((p, account, flow)) => match state.store.sso_user(&p, &account).await {
            Ok(user) if user.disabled => {
                refuse(
                    &state,
                    &peer,
                    &name,
                    &account.email,
                    Refusal::new(
                        StatusCode::FORBIDDEN,
                        "user disabled",
                        "this account is disabled: ask an administrator",
                    ),
                )
                .await
            }
            Ok(user) => {
                let rq = ReturnQuery {
                    rd: flow.rd,
                    n: flow.n,
                };
                match check_return(&state, &rq).await {
                    Ok(ret) => {
                        let amr = match p.kind {
                            ProviderKind::Oidc => "oidc",
                            ProviderKind::Github => "github",
                        };
                        // A provider of the default organization vouches everywhere; any
                        // other only for its own organization.
                        let scope = (p.org_id != DEFAULT_ORG).then_some(p.org_id);
                        finish(&state, &peer, &headers, &user, &[amr], scope, ret).await
                    }
                    Err(m) => error_page(StatusCode::BAD_REQUEST, "Cannot sign in", &m),
                }
            }
            Err(StoreError::Invalid(m)) => {
                refuse(
                    &state,
                    &peer,
                    &name,
                    &account.email,
                    Refusal::new(StatusCode::FORBIDDEN, m.clone(), m),
                )
                .await
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot find or create a user for a sign-in");
                unavailable("sign-in")
            }
        },
        Err(refusal) => refuse(&state, &peer, &name, "", refusal).await,
    };
    if let Ok(v) = HeaderValue::from_str(&clear) {
        r.headers_mut().append(SET_COOKIE, v);
    }
    r
}

async fn refuse(
    state: &AppState,
    peer: &SocketAddr,
    provider: &str,
    email: &str,
    r: Refusal,
) -> Response {
    tracing::warn!(client = %peer.ip(), provider, reason = %r.reason, "single sign-on refused");
    let target = if email.is_empty() { provider } else { email };
    audit(
        state,
        peer,
        "sign_in",
        format!("sso:{provider}"),
        target,
        "denied",
        Some(&r.reason),
    )
    .await;
    error_page(r.status, "Cannot sign in", &r.message)
}

/// Checks a provider's callback against the flow cookie and asks the provider who signed in.
async fn sign_in_at(
    state: &AppState,
    name: &str,
    headers: &HeaderMap,
    q: CallbackQuery,
) -> Result<(IdentityProvider, ExternalAccount, Flow), Refusal> {
    let again = "start again from the site you wanted to reach";
    let flow = cookie_value(headers, FLOW_COOKIE)
        .and_then(|c| state.store.open_blob(FLOW_PURPOSE, c).ok())
        .and_then(|j| serde_json::from_slice::<Flow>(&j).ok())
        .ok_or_else(|| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "no valid sign-in cookie",
                format!("this sign-in was not started in this browser, or it was changed: {again}"),
            )
        })?;
    if flow.exp < now_ms() / 1000 {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "sign-in took too long",
            format!("this sign-in took more than ten minutes: {again}"),
        ));
    }
    if flow.p != name {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "callback for another provider",
            format!(
                "this answer is from another identity provider than the one you chose: {again}"
            ),
        ));
    }
    let sent_state = q.state.as_deref().unwrap_or("");
    if !bool::from(sent_state.as_bytes().ct_eq(flow.s.as_bytes())) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "wrong state",
            format!(
                "the identity provider's answer does not belong to this sign-in (state): {again}"
            ),
        ));
    }
    let (p, secret) = match state.store.identity_provider_by_name(name).await {
        Ok(Some(found)) => found,
        Ok(None) => {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "provider removed",
                "this way to sign in no longer exists",
            ))
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read an identity provider");
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store unavailable",
                "sign-in is unavailable right now; try again shortly",
            ));
        }
    };
    if let Some(err) = q.error.as_deref() {
        let detail = q.error_description.as_deref().unwrap_or("");
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!("provider answered {err}"),
            format!(
                "{} did not sign you in ({err}{}{detail})",
                p.display_name,
                if detail.is_empty() { "" } else { ": " }
            ),
        ));
    }
    let code = q
        .code
        .filter(|c| !c.is_empty() && c.len() < 4096)
        .ok_or_else(|| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "no code",
                format!("the identity provider's answer has no code: {again}"),
            )
        })?;
    let account = match p.kind {
        ProviderKind::Oidc => oidc_account(state, &p, secret, code, &flow).await?,
        ProviderKind::Github => github_account(state, &p, secret, code, &flow).await?,
    };
    Ok((p, account, flow))
}

fn provider_failed(p: &IdentityProvider, reason: String) -> Refusal {
    Refusal::new(
        StatusCode::BAD_GATEWAY,
        reason,
        format!(
            "{} did not complete the sign-in; try again shortly",
            p.display_name
        ),
    )
}

async fn oidc_account(
    state: &AppState,
    p: &IdentityProvider,
    secret: kakuremichi_proto::Secret,
    code: String,
    flow: &Flow,
) -> Result<ExternalAccount, Refusal> {
    let m = state
        .sso
        .metadata(p)
        .await
        .map_err(|e| provider_failed(p, format!("discovery: {e}")))?;
    let redirect =
        RedirectUrl::new(redirect_uri(state, p)).map_err(|e| provider_failed(p, e.to_string()))?;
    let client = CoreClient::from_provider_metadata(
        (*m).clone(),
        ClientId::new(p.client_id.clone()),
        Some(ClientSecret::new(secret.expose().to_owned())),
    )
    .set_redirect_uri(redirect);
    let tokens = client
        .exchange_code(AuthorizationCode::new(code))
        .map_err(|e| provider_failed(p, format!("token endpoint: {e}")))?
        .set_pkce_verifier(PkceCodeVerifier::new(flow.v.clone()))
        .request_async(&state.sso.http)
        .await
        .map_err(|e| provider_failed(p, format!("code exchange: {}", error_chain(&e))))?;
    let id_token = tokens
        .id_token()
        .ok_or_else(|| provider_failed(p, "no ID token in the token response".into()))?;
    let verifier = client.id_token_verifier();
    // Signature, issuer, audience, expiry and nonce.
    let claims = id_token
        .claims(&verifier, &Nonce::new(flow.nonce.clone()))
        .map_err(|e| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("ID token refused: {e}"),
                format!(
                    "{}'s answer did not pass the checks for this sign-in ({e}): start again \
                     from the site you wanted to reach",
                    p.display_name
                ),
            )
        })?;
    let subject = claims.subject().to_string();
    // Every claim of the (verified) ID token, then what the userinfo endpoint adds.
    let mut all = id_token
        .to_string()
        .split('.')
        .nth(1)
        .and_then(|b| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(b)
                .ok()
        })
        .and_then(|j| serde_json::from_slice::<serde_json::Map<String, Value>>(&j).ok())
        .unwrap_or_default();
    if let Some(ui) = m.userinfo_endpoint() {
        let info = state
            .sso
            .http
            .get(ui.url().clone())
            .bearer_auth(tokens.access_token().secret())
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| provider_failed(p, format!("userinfo: {e}")))?
            .json::<serde_json::Map<String, Value>>()
            .await
            .map_err(|e| provider_failed(p, format!("userinfo: {e}")))?;
        if info.get("sub").and_then(Value::as_str) != Some(subject.as_str()) {
            return Err(provider_failed(
                p,
                "userinfo is about another subject".into(),
            ));
        }
        for (k, v) in info {
            all.entry(k).or_insert(v);
        }
    }
    let email = all
        .get("email")
        .and_then(Value::as_str)
        .map(str::to_ascii_lowercase)
        .filter(|e| crate::validate::email(e).is_ok())
        .ok_or_else(|| {
            Refusal::new(
                StatusCode::FORBIDDEN,
                "no e-mail address",
                format!(
                    "{} did not share an e-mail address: allow it, then try again",
                    p.display_name
                ),
            )
        })?;
    let email_verified = match all.get("email_verified") {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "true",
        _ => false,
    };
    let name = ["name", "preferred_username"]
        .iter()
        .find_map(|k| all.get(*k).and_then(Value::as_str))
        .and_then(|n| crate::validate::name(n).ok())
        .unwrap_or_else(|| email.clone());
    let mapped_roles = (!p.role_map.is_empty()).then(|| {
        let groups = p
            .role_claim
            .as_deref()
            .map(|c| claim_values(&all, c))
            .unwrap_or_default();
        map_roles(p, &groups)
    });
    Ok(ExternalAccount {
        subject,
        email,
        email_verified,
        name,
        mapped_roles,
    })
}

/// The string values at a dotted claim path: a string, or an array of strings.
fn claim_values(claims: &serde_json::Map<String, Value>, path: &str) -> Vec<String> {
    let mut parts = path.split('.');
    let Some(first) = parts.next() else {
        return Vec::new();
    };
    let mut v = claims.get(first);
    for part in parts {
        v = v.and_then(|x| x.get(part));
    }
    match v {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// The roles `groups` map to.
fn map_roles(p: &IdentityProvider, groups: &[String]) -> Vec<String> {
    let mut roles: Vec<String> = Vec::new();
    for g in groups {
        for r in p.role_map.get(g).into_iter().flatten() {
            if !roles.contains(r) {
                roles.push(r.clone());
            }
        }
    }
    roles
}

#[derive(Deserialize)]
struct GithubToken {
    access_token: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

#[derive(Deserialize)]
struct GithubUser {
    id: u64,
    login: String,
    name: Option<String>,
}

#[derive(Deserialize)]
struct GithubEmail {
    email: String,
    primary: bool,
    verified: bool,
}

#[derive(Deserialize)]
struct GithubOrg {
    login: String,
}

#[derive(Deserialize)]
struct GithubTeam {
    slug: String,
    organization: GithubOrg,
}

async fn github_account(
    state: &AppState,
    p: &IdentityProvider,
    secret: kakuremichi_proto::Secret,
    code: String,
    flow: &Flow,
) -> Result<ExternalAccount, Refusal> {
    let http = &state.sso.http;
    let token: GithubToken = http
        .post(format!("{}/login/oauth/access_token", p.issuer))
        .header("accept", "application/json")
        .form(&[
            ("client_id", p.client_id.as_str()),
            ("client_secret", secret.expose()),
            ("code", code.as_str()),
            ("redirect_uri", redirect_uri(state, p).as_str()),
            ("code_verifier", flow.v.as_str()),
        ])
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| provider_failed(p, format!("code exchange: {e}")))?
        .json()
        .await
        .map_err(|e| provider_failed(p, format!("code exchange: {e}")))?;
    let access = match (token.access_token, token.error) {
        (Some(t), None) => t,
        (_, err) => {
            let err = err.unwrap_or_else(|| "no access token".into());
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("code exchange refused: {err}"),
                format!(
                    "{} refused this sign-in ({err}{}): start again from the site you wanted \
                     to reach",
                    p.display_name,
                    token
                        .error_description
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default()
                ),
            ));
        }
    };
    let api = github_api(&p.issuer);
    let get = |path: &str| {
        http.get(format!("{api}{path}"))
            .bearer_auth(&access)
            .header("accept", "application/vnd.github+json")
            .header("x-github-api-version", "2022-11-28")
    };
    async fn json<T: serde::de::DeserializeOwned>(
        p: &IdentityProvider,
        what: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<T, Refusal> {
        req.send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| provider_failed(p, format!("{what}: {e}")))?
            .json()
            .await
            .map_err(|e| provider_failed(p, format!("{what}: {e}")))
    }
    let user: GithubUser = json(p, "GET /user", get("/user")).await?;
    let emails: Vec<GithubEmail> = json(p, "GET /user/emails", get("/user/emails")).await?;
    let email = emails
        .iter()
        .find(|e| e.primary && e.verified)
        .map(|e| e.email.to_ascii_lowercase())
        .filter(|e| crate::validate::email(e).is_ok())
        .ok_or_else(|| {
            Refusal::new(
                StatusCode::FORBIDDEN,
                "no verified primary e-mail",
                format!(
                    "your {} account has no verified primary e-mail address: verify one, then \
                     try again",
                    p.display_name
                ),
            )
        })?;
    let mapped_roles = if p.role_map.is_empty() {
        None
    } else {
        let orgs: Vec<GithubOrg> =
            json(p, "GET /user/orgs", get("/user/orgs?per_page=100")).await?;
        let teams: Vec<GithubTeam> =
            json(p, "GET /user/teams", get("/user/teams?per_page=100")).await?;
        let mut groups: Vec<String> = orgs.into_iter().map(|o| o.login).collect();
        groups.extend(
            teams
                .into_iter()
                .map(|t| format!("{}/{}", t.organization.login, t.slug)),
        );
        Some(map_roles(p, &groups))
    };
    let name = user
        .name
        .as_deref()
        .and_then(|n| crate::validate::name(n).ok())
        .unwrap_or_else(|| user.login.clone());
    Ok(ExternalAccount {
        subject: user.id.to_string(),
        email,
        email_verified: true,
        name,
        mapped_roles,
    })
}

/// The sign-in buttons for the providers configured, carrying where to return.
pub(crate) async fn buttons(state: &AppState, q: &ReturnQuery) -> String {
    let providers = match state.store.list_identity_providers().await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list identity providers");
            return String::new();
        }
    };
    if providers.is_empty() {
        return String::new();
    }
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    if let Some(rd) = &q.rd {
        query.append_pair("rd", rd);
    }
    if let Some(n) = &q.n {
        query.append_pair("n", n);
    }
    let query = query.finish();
    let mut out = String::from("<p>or</p>");
    for p in providers {
        out.push_str(&format!(
            "<p><a class=\"sso\" href=\"/auth/sso/{}{}{}\">Sign in with {}</a></p>",
            p.name,
            if query.is_empty() { "" } else { "?" },
            crate::auth::escape(&query),
            crate::auth::escape(&p.display_name)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(map: &[(&str, &[&str])]) -> IdentityProvider {
        IdentityProvider {
            org_id: DEFAULT_ORG,
            id: Uuid::nil(),
            name: "op".into(),
            kind: ProviderKind::Oidc,
            display_name: "OP".into(),
            issuer: "http://127.0.0.1:1".into(),
            client_id: "c".into(),
            scopes: vec!["openid".into()],
            role_claim: Some("groups".into()),
            role_map: map
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.iter().map(|r| (*r).to_owned()).collect()))
                .collect(),
            default_roles: vec![],
            auto_provision: true,
            created_at: 0,
        }
    }

    #[test]
    fn claim_values_follow_dotted_paths_and_take_strings_or_arrays() {
        let claims: serde_json::Map<String, Value> = serde_json::from_str(
            r#"{"groups":["a","b",3],"realm_access":{"roles":["x"]},"team":"t"}"#,
        )
        .unwrap();
        assert_eq!(claim_values(&claims, "groups"), ["a", "b"]);
        assert_eq!(claim_values(&claims, "realm_access.roles"), ["x"]);
        assert_eq!(claim_values(&claims, "team"), ["t"]);
        assert!(claim_values(&claims, "missing.path").is_empty());
    }

    #[test]
    fn groups_map_to_each_role_once() {
        let p = provider(&[("eng", &["member", "deployer"]), ("ops", &["member"])]);
        let groups = ["eng".to_owned(), "ops".to_owned(), "sales".to_owned()];
        assert_eq!(map_roles(&p, &groups), ["member", "deployer"]);
        assert!(map_roles(&p, &["sales".to_owned()]).is_empty());
    }

    #[test]
    fn github_enterprise_api_lives_under_api_v3() {
        assert_eq!(github_api("https://github.com"), "https://api.github.com");
        assert_eq!(
            github_api("https://ghe.example.com"),
            "https://ghe.example.com/api/v3"
        );
    }
}
