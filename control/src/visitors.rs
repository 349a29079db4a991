//! Ways into one resource for visitors without an account, shown on the sign-in page of the
//! resource's hostname beside the account form:
//!
//! - its **password or PIN** (`POST /auth/passcode`): checked against the argon2id hash on the
//!   blocking pool, rate limited per client and resource and per resource (buckets in the store,
//!   shared by every replica). The token it gets has `sub` = the resource, `sid` = the passcode
//!   (replacing or removing it ends those sessions), `amr` = `resource_password`/`resource_pin`.
//! - a **one-time code by e-mail** (`POST /auth/email-code`, then `/auth/email-code/verify`) to
//!   an address the policy's `email_codes` list matches, sent by SMTP. The answer is the same
//!   whether or not the address may have one; the token names the address (`email`,
//!   `amr` = `email_code`) and the gateway re-checks the list on every request.
//!
//! Either way the browser goes back to the gateway's callback with a token bound to its nonce,
//! exactly like a signed-in user, so the gateway decides from that token alone while control is
//! down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, State};
use axum::http::header::{RETRY_AFTER, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::{Form, Router};
use kakuremichi_proto::identity::{SessionClaims, EMAIL_CODE_AMR, PASSWORD_AMR, PIN_AMR};
use kakuremichi_proto::Secret;
use lettre::{AsyncSmtpTransport, AsyncTransport as _, Tokio1Executor};
use serde::Deserialize;
use uuid::Uuid;

use crate::auth::{
    check_return, csrf_ok, csrf_token, error_page, escape, page, sign, to_callback, Return,
    ReturnQuery,
};
use crate::store::{now_ms, AuditEntry, PasscodeKind};
use crate::{secrets, AppState};

/// Default wrong-or-right passcode attempts per minute from one client on one resource (the
/// resource as a whole takes [`RESOURCE_FACTOR`] times as many), and e-mail code requests per
/// minute from one client and to one address.
pub const DEFAULT_ATTEMPTS_PER_MINUTE: u32 = 5;
/// How many times a client's limit one resource takes from all clients together.
pub const RESOURCE_FACTOR: u32 = 10;
/// How long an e-mailed code works.
pub const EMAIL_CODE_LIFE: Duration = Duration::from_secs(10 * 60);

/// Visitor settings: rate limits and the mail relay.
#[derive(Debug)]
pub struct Visitors {
    /// Attempts per minute per client and resource ([`DEFAULT_ATTEMPTS_PER_MINUTE`]).
    pub per_minute: u32,
    /// Sends e-mailed codes; none: resources offer no codes.
    pub mailer: Option<Mailer>,
}

impl Default for Visitors {
    fn default() -> Self {
        Self {
            per_minute: DEFAULT_ATTEMPTS_PER_MINUTE,
            mailer: None,
        }
    }
}

/// An SMTP relay and the sender address of codes.
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: lettre::message::Mailbox,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The transport holds the relay's credentials.
        f.debug_struct("Mailer")
            .field("from", &self.from.to_string())
            .finish_non_exhaustive()
    }
}

/// The mail settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum MailerError {
    /// The relay URL.
    #[error(
        "the SMTP URL is not valid (smtp://host:port, smtp://user:pass@host:587?tls=required, \
         smtps://host:465): {0}"
    )]
    Url(String),
    /// The sender address.
    #[error("the sender address {0:?} is not an e-mail address")]
    From(String),
}

impl Mailer {
    /// A relay at `url` (`smtp://`, `smtps://`, with `?tls=required` or `opportunistic`)
    /// sending from `from`.
    pub fn new(url: &Secret, from: &str) -> Result<Self, MailerError> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url.expose())
            .map_err(|e| MailerError::Url(e.to_string().replace(url.expose(), "<url>")))?
            .timeout(Some(Duration::from_secs(20)))
            .build();
        let from = from
            .parse()
            .map_err(|_| MailerError::From(from.to_owned()))?;
        Ok(Self { transport, from })
    }

    async fn send_code(&self, to: &str, host: &str, code: &str) -> Result<(), String> {
        let to: lettre::message::Mailbox = to.parse().map_err(|e| format!("{e}"))?;
        let minutes = EMAIL_CODE_LIFE.as_secs() / 60;
        let message = lettre::Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(format!("Your code for {host}: {code}"))
            .body(format!(
                "Your code to open {host} is\n\n    {code}\n\nIt works once, for {minutes} \
                 minutes. If you did not ask for it, ignore this e-mail.\n"
            ))
            .map_err(|e| e.to_string())?;
        self.transport
            .send(message)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// The visitor routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/auth/passcode", post(enter_passcode))
        .route("/auth/email-code", post(request_email_code))
        .route("/auth/email-code/verify", post(verify_email_code))
}

fn hidden(q: &ReturnQuery) -> String {
    [("rd", &q.rd), ("n", &q.n)]
        .iter()
        .filter_map(|(name, v)| {
            v.as_ref().map(|v| {
                format!(
                    "<input type=\"hidden\" name=\"{name}\" value=\"{}\">",
                    escape(v)
                )
            })
        })
        .collect()
}

fn error_line(error: Option<&str>) -> String {
    error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(e)))
        .unwrap_or_default()
}

fn passcode_form(kind: PasscodeKind, csrf: &str, q: &ReturnQuery, error: Option<&str>) -> String {
    let (label, input) = match kind {
        PasscodeKind::Password => (
            "This site's password",
            "type=\"password\" autocomplete=\"current-password\"",
        ),
        PasscodeKind::Pin => (
            "This site's PIN",
            "type=\"password\" inputmode=\"numeric\" pattern=\"[0-9]{6}\" maxlength=\"6\" \
             autocomplete=\"off\"",
        ),
    };
    format!(
        "<section id=\"passcode\">{}<form method=\"post\" action=\"/auth/passcode\">\
         <label>{label} <input name=\"passcode\" {input} required></label>\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">{}\
         <button type=\"submit\">Open</button></form></section>",
        error_line(error),
        escape(csrf),
        hidden(q),
    )
}

fn email_form(csrf: &str, q: &ReturnQuery, error: Option<&str>) -> String {
    format!(
        "<section id=\"email-code\">{}<form method=\"post\" action=\"/auth/email-code\">\
         <label>Your e-mail address, for a one-time code <input name=\"email\" type=\"email\" \
         autocomplete=\"email\" required></label>\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">{}\
         <button type=\"submit\">Send me a code</button></form></section>",
        error_line(error),
        escape(csrf),
        hidden(q),
    )
}

fn code_form(
    csrf: &str,
    q: &ReturnQuery,
    pending: &str,
    email: &str,
    error: Option<&str>,
) -> String {
    format!(
        "{}<p>If {} may open this site, a code is on its way to it.</p>\
         <form method=\"post\" action=\"/auth/email-code/verify\">\
         <label>Code <input name=\"code\" inputmode=\"numeric\" autocomplete=\"one-time-code\" \
         maxlength=\"6\" required autofocus></label>\
         <input type=\"hidden\" name=\"pending\" value=\"{}\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">{}\
         <button type=\"submit\">Open</button></form>",
        error_line(error),
        escape(email),
        escape(pending),
        escape(csrf),
        hidden(q),
    )
}

/// The visitor forms for the resource a sign-in page returns to (none for other sign-ins).
pub(crate) async fn forms(state: &AppState, q: &ReturnQuery, csrf: &str) -> String {
    let Ok(Some(ret)) = check_return(state, q).await else {
        return String::new();
    };
    let mut out = String::new();
    match state.store.live_passcode(ret.resource).await {
        Ok(Some(p)) => out.push_str(&passcode_form(p.kind, csrf, q, None)),
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "cannot read a resource's passcode"),
    }
    if !ret.access.email_codes.is_empty() && state.visitors.mailer.is_some() {
        out.push_str(&email_form(csrf, q, None));
    }
    if !out.is_empty() {
        out.push_str("<h2>Or sign in with your account</h2>");
    }
    out
}

/// Records a visitor's attempt on `ret`'s resource in its organization's audit log.
async fn record(
    state: &AppState,
    peer: &SocketAddr,
    ret: &Return,
    action: &str,
    actor: String,
    outcome: &str,
    detail: Option<&str>,
) {
    state
        .audit(AuditEntry {
            at: now_ms(),
            actor,
            action: action.to_owned(),
            target: Some(ret.host.clone()),
            outcome: outcome.to_owned(),
            client: Some(peer.ip().to_string()),
            detail: detail.map(str::to_owned),
            org_id: Some(ret.org),
        })
        .await;
}

/// Takes one attempt from the store's bucket `key`; `Err`: the refusal to send.
async fn take(state: &AppState, key: &str, per_minute: u32, title: &str) -> Result<(), Response> {
    match state.store.take_sign_in(key, per_minute, now_ms()).await {
        Ok(None) => Ok(()),
        Ok(Some(ms)) => {
            let secs = (ms.max(1) + 999) / 1000;
            let mut r = error_page(
                StatusCode::TOO_MANY_REQUESTS,
                title,
                &format!("too many attempts; try again in {secs} s"),
            );
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                r.headers_mut().insert(RETRY_AFTER, v);
            }
            Err(r)
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot count a visitor's attempt");
            Err(error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                title,
                "this is unavailable right now; try again shortly",
            ))
        }
    }
}

/// The title of every visitor page.
const TITLE: &str = "Open this site";

/// The hidden fields of every visitor form.
#[derive(Deserialize)]
struct Hidden {
    #[serde(default)]
    rd: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    csrf: String,
}

/// The checks every visitor form starts with: its CSRF token and where it returns to.
async fn start(
    state: &AppState,
    headers: &HeaderMap,
    hidden: &Hidden,
) -> Result<(Return, ReturnQuery), Response> {
    if !csrf_ok(headers, &hidden.csrf) {
        return Err(error_page(
            StatusCode::FORBIDDEN,
            TITLE,
            "this form expired; go back to the site and try again",
        ));
    }
    let q = ReturnQuery {
        rd: hidden.rd.clone(),
        n: hidden.n.clone(),
    };
    match check_return(state, &q).await {
        Ok(Some(r)) => Ok((r, q)),
        Ok(None) => Err(error_page(
            StatusCode::BAD_REQUEST,
            TITLE,
            "this form is incomplete: go back to the site and try again",
        )),
        Err(m) => Err(error_page(StatusCode::BAD_REQUEST, TITLE, &m)),
    }
}

/// A session token for a visitor, back to the gateway's callback.
async fn admit(state: &AppState, ret: &Return, claims: SessionClaims, title: &str) -> Response {
    match sign(state, &claims, title).await {
        Ok(token) => to_callback(ret, &token),
        Err(page) => page,
    }
}

fn visitor_claims(state: &AppState, ret: &Return, sub: String, sid: Uuid) -> SessionClaims {
    let now = now_ms();
    SessionClaims {
        iss: state.store.public_url().to_owned(),
        sub,
        aud: ret.host.clone(),
        iat: now / 1000,
        exp: (now + state.store.session_life_ms()) / 1000,
        sid: sid.to_string(),
        email: String::new(),
        name: String::new(),
        roles: Vec::new(),
        nonce: ret.nonce.clone(),
        amr: Vec::new(),
        scope: String::new(),
    }
}

#[derive(Deserialize)]
struct PasscodeForm {
    #[serde(default)]
    passcode: String,
    #[serde(flatten)]
    hidden: Hidden,
}

async fn enter_passcode(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<PasscodeForm>,
) -> Response {
    let (ret, q) = match start(&state, &headers, &form.hidden).await {
        Ok(r) => r,
        Err(page) => return page,
    };
    let per_client = format!("passcode:{}:{}", ret.resource, peer.ip());
    let per_resource = format!("passcode:{}", ret.resource);
    let limited = match take(&state, &per_client, state.visitors.per_minute, TITLE).await {
        Ok(()) => {
            take(
                &state,
                &per_resource,
                state.visitors.per_minute.saturating_mul(RESOURCE_FACTOR),
                TITLE,
            )
            .await
        }
        Err(r) => Err(r),
    };
    if let Err(r) = limited {
        tracing::warn!(client = %peer.ip(), resource_id = %ret.resource, "passcode refused: too many attempts");
        record(
            &state,
            &peer,
            &ret,
            "passcode",
            "anonymous".into(),
            "denied",
            Some("rate limited"),
        )
        .await;
        return r;
    }
    let live = match state.store.live_passcode(ret.resource).await {
        Ok(Some(p)) => p,
        Ok(None) => {
            return error_page(
                StatusCode::BAD_REQUEST,
                TITLE,
                "this site has no password or PIN (any more): go back to the site and sign in",
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read a resource's passcode");
            return error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                TITLE,
                "this is unavailable right now; try again shortly",
            );
        }
    };
    let typed = Secret::new(form.passcode.trim());
    let right = typed.expose().len() <= 256 && secrets::verify_argon2(&live.hash, &typed).await;
    if !right {
        tracing::info!(client = %peer.ip(), resource_id = %ret.resource, "wrong passcode");
        record(
            &state,
            &peer,
            &ret,
            "passcode",
            "anonymous".into(),
            "denied",
            Some("wrong passcode"),
        )
        .await;
        let (csrf, set) = csrf_token(&state, &headers);
        let what = match live.kind {
            PasscodeKind::Password => "password",
            PasscodeKind::Pin => "PIN",
        };
        let mut r = page(
            StatusCode::UNAUTHORIZED,
            TITLE,
            &passcode_form(
                live.kind,
                &csrf,
                &q,
                Some(&format!("wrong {what}; try again")),
            ),
        );
        if let Some(c) = set {
            r.headers_mut().append(SET_COOKIE, c);
        }
        return r;
    }
    let mut claims = visitor_claims(&state, &ret, ret.resource.to_string(), live.id);
    claims.amr = vec![match live.kind {
        PasscodeKind::Password => PASSWORD_AMR,
        PasscodeKind::Pin => PIN_AMR,
    }
    .to_owned()];
    tracing::info!(client = %peer.ip(), resource_id = %ret.resource, "visitor opened a resource with its passcode");
    record(
        &state,
        &peer,
        &ret,
        "passcode",
        format!("visitor:{}", ret.resource),
        "ok",
        None,
    )
    .await;
    admit(&state, &ret, claims, TITLE).await
}

#[derive(Deserialize)]
struct EmailForm {
    #[serde(default)]
    email: String,
    #[serde(flatten)]
    hidden: Hidden,
}

fn random_code() -> String {
    use rand::Rng as _;
    format!("{:06}", rand::thread_rng().gen_range(0..1_000_000u32))
}

async fn request_email_code(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<EmailForm>,
) -> Response {
    let (ret, q) = match start(&state, &headers, &form.hidden).await {
        Ok(r) => r,
        Err(page) => return page,
    };
    let Ok(email) = crate::validate::email(&form.email) else {
        return page(
            StatusCode::BAD_REQUEST,
            TITLE,
            &email_form(&form.hidden.csrf, &q, Some("that is not an e-mail address")),
        );
    };
    if state.visitors.mailer.is_none() {
        return error_page(
            StatusCode::NOT_FOUND,
            TITLE,
            "this site does not send codes by e-mail",
        );
    }
    // Per client address, and per recipient (no mail bombing one inbox from many addresses).
    for bucket in [
        format!("email-code:{}", peer.ip()),
        format!("email-code-to:{email}"),
    ] {
        if let Err(r) = take(&state, &bucket, state.visitors.per_minute, TITLE).await {
            record(
                &state,
                &peer,
                &ret,
                "email_code",
                email.clone(),
                "denied",
                Some("rate limited"),
            )
            .await;
            return r;
        }
    }
    // The page is the same whether or not the address may have a code; only a listed one gets
    // a code, sent after the answer so that timing tells nothing either.
    let pending = if ret.access.allows_email_code(&email) {
        let code = random_code();
        let expires = now_ms() + EMAIL_CODE_LIFE.as_millis() as i64;
        match state
            .store
            .create_email_code(ret.resource, &email, &code, expires)
            .await
        {
            Ok(id) => {
                let (to, host) = (email.clone(), ret.host.clone());
                let transport = Arc::clone(&state.visitors);
                tokio::spawn(async move {
                    let Some(mailer) = transport.mailer.as_ref() else {
                        return;
                    };
                    match mailer.send_code(&to, &host, &code).await {
                        Ok(()) => tracing::info!(%host, "sent an e-mail code"),
                        Err(e) => tracing::warn!(%host, error = %e, "cannot send an e-mail code"),
                    }
                });
                record(
                    &state,
                    &peer,
                    &ret,
                    "email_code",
                    email.clone(),
                    "ok",
                    Some("code sent"),
                )
                .await;
                id
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot record an e-mail code");
                return error_page(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TITLE,
                    "codes cannot be sent right now; try again shortly",
                );
            }
        }
    } else {
        record(
            &state,
            &peer,
            &ret,
            "email_code",
            email.clone(),
            "denied",
            Some("address not allowed"),
        )
        .await;
        Uuid::new_v4()
    };
    page(
        StatusCode::OK,
        TITLE,
        &code_form(&form.hidden.csrf, &q, &pending.to_string(), &email, None),
    )
}

#[derive(Deserialize)]
struct CodeForm {
    #[serde(default)]
    code: String,
    #[serde(default)]
    pending: String,
    #[serde(flatten)]
    hidden: Hidden,
}

/// A stable id for an address signed in by code (the same every time, never a user's).
fn email_subject(email: &str) -> Uuid {
    let d = kakuremichi_proto::identity::secret_digest_bytes(&format!("email-code:{email}"));
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    uuid::Builder::from_random_bytes(b).into_uuid()
}

async fn verify_email_code(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<CodeForm>,
) -> Response {
    let (ret, q) = match start(&state, &headers, &form.hidden).await {
        Ok(r) => r,
        Err(page) => return page,
    };
    if let Err(r) = take(
        &state,
        &format!("email-code:{}", peer.ip()),
        state.visitors.per_minute,
        TITLE,
    )
    .await
    {
        return r;
    }
    let code = form.code.trim();
    let redeemed = match Uuid::try_parse(&form.pending) {
        Ok(id) if code.len() <= 16 => {
            state
                .store
                .redeem_email_code(id, ret.resource, code, now_ms())
                .await
        }
        _ => Ok(Err(crate::store::EmailCodeRefusal::Wrong)),
    };
    let email = match redeemed {
        Ok(Ok(email)) => email,
        Ok(Err(why)) => {
            record(
                &state,
                &peer,
                &ret,
                "email_code",
                "anonymous".into(),
                "denied",
                Some(&why.to_string()),
            )
            .await;
            return page(
                StatusCode::UNAUTHORIZED,
                TITLE,
                &format!(
                    "{}{}",
                    code_form(
                        &form.hidden.csrf,
                        &q,
                        &form.pending,
                        "your address",
                        Some(&why.to_string())
                    ),
                    email_form(&form.hidden.csrf, &q, None)
                ),
            );
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot check an e-mail code");
            return error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                TITLE,
                "codes cannot be checked right now; try again shortly",
            );
        }
    };
    // The list may have changed since the code was sent.
    if !ret.access.allows_email_code(&email) {
        return error_page(
            StatusCode::FORBIDDEN,
            TITLE,
            &format!("{email} may no longer open {}", ret.host),
        );
    }
    let sid = Uuid::new_v4();
    let mut claims = visitor_claims(&state, &ret, email_subject(&email).to_string(), sid);
    claims.email = email.clone();
    claims.name = email.clone();
    claims.amr = vec![EMAIL_CODE_AMR.to_owned()];
    tracing::info!(client = %peer.ip(), resource_id = %ret.resource, "visitor opened a resource with an e-mail code");
    record(
        &state,
        &peer,
        &ret,
        "email_code",
        email,
        "ok",
        Some("signed in"),
    )
    .await;
    admit(&state, &ret, claims, TITLE).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_six_digits_and_subjects_stable() {
        for _ in 0..100 {
            let c = random_code();
            assert_eq!(c.len(), 6);
            assert!(c.bytes().all(|b| b.is_ascii_digit()));
        }
        assert_eq!(email_subject("a@b.c"), email_subject("a@b.c"));
        assert_ne!(email_subject("a@b.c"), email_subject("a@b.d"));
    }

    #[test]
    fn a_bad_smtp_url_is_a_clear_error_without_the_url() {
        let e = Mailer::new(&Secret::new("ftp://user:hunter2@x"), "k@example.com").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = Mailer::new(&Secret::new("smtp://127.0.0.1:25"), "not an address").unwrap_err();
        assert!(matches!(e, MailerError::From(_)), "{e}");
        let m = Mailer::new(
            &Secret::new("smtp://u:hunter2@127.0.0.1:25"),
            "k@example.com",
        )
        .unwrap();
        assert!(!format!("{m:?}").contains("hunter2"));
    }
}
