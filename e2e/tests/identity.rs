//! Identity end to end, with the real binaries: a password sign-in that goes gateway -> control ->
//! gateway callback on the resource's own hostname, the signed assertion the app gets (checked
//! against control's JWKS), a clear 403 for a user without the role, 401 for clients without a
//! session, refused forged and tampered tokens, sign-out everywhere reaching the gateway within
//! 2 s, signed-in users keeping access while control is down, and the account lockout.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use kakuremichi_e2e::identity::{client, hidden, protect_demo, Browser, Page};
use kakuremichi_e2e::{wait_for, Stack, DEMO_HOST};
use reqwest::header::{COOKIE, HOST, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const ANN: &str = "ann@example.com";
const BOB: &str = "bob@example.com";
const PASSWORD: &str = "correct horse battery";

async fn create_user(stack: &Stack, email: &str, roles: &[&str]) -> anyhow::Result<String> {
    let (status, body) = stack
        .api
        .call(
            Method::POST,
            "/api/v1/users",
            Some(json!({"email": email, "password": PASSWORD, "roles": roles})),
        )
        .await?;
    if status != 201 {
        bail!("create user {email}: {status} {body}");
    }
    Ok(body["id"].as_str().context("no id")?.to_owned())
}

/// Protects the demo resource (members only) and waits until the gateway enforces it.
async fn protect(stack: &Stack) -> anyhow::Result<()> {
    protect_demo(stack, json!({"roles": ["member"]})).await
}

fn demo_url(stack: &Stack, path: &str) -> String {
    format!(
        "http://{DEMO_HOST}:{}{path}",
        stack.opts.gateway_http_for_test.port()
    )
}

/// Checks an assertion as an app would: signature against control's JWKS, `aud`, `iss`, `exp`.
async fn verify_assertion(stack: &Stack, token: &str) -> anyhow::Result<Value> {
    let jwks: jsonwebtoken::jwk::JwkSet = client()
        .get(format!(
            "{}/.well-known/kakuremichi/jwks.json",
            stack.opts.control_url_for_test
        ))
        .send()
        .await?
        .json()
        .await?;
    let header = jsonwebtoken::decode_header(token)?;
    let kid = header.kid.context("no kid")?;
    let jwk = jwks.find(&kid).context("kid not in the JWKS")?;
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk)?;
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    v.set_audience(&[DEMO_HOST]);
    v.set_issuer(&[stack.opts.control_url_for_test.as_str()]);
    Ok(jsonwebtoken::decode::<Value>(token, &key, &v)?.claims)
}

/// Audit lines of refusals summed by detail (`denied` counts one, `denied xN` N).
fn refusal_counts(lines: &[Value]) -> std::collections::BTreeMap<String, u32> {
    let mut counts = std::collections::BTreeMap::new();
    for e in lines {
        let outcome = e["outcome"].as_str().unwrap_or_default();
        let n = match outcome.strip_prefix("denied x") {
            Some(n) => n.parse().unwrap_or(0),
            None => u32::from(outcome == "denied"),
        };
        *counts
            .entry(e["detail"].as_str().unwrap_or_default().to_owned())
            .or_insert(0) += n;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_sign_in_at_the_gateway_asserts_identity_to_the_app_and_revokes_within_2s() {
    let mut stack = Stack::start().await.expect("stack");
    let ann = create_user(&stack, ANN, &["member"]).await.unwrap();
    create_user(&stack, BOB, &["viewer"]).await.unwrap();
    protect(&stack).await.unwrap();

    // A client without a session: 401 with a challenge, not a redirect.
    let mut curl = Browser::new();
    let plain = stack
        .request_builder(Method::GET, DEMO_HOST, "/headers")
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 401);
    assert!(plain.headers()[WWW_AUTHENTICATE]
        .to_str()
        .unwrap()
        .starts_with("Bearer realm=\"demo.localhost\""));

    // Ann signs in and reaches the app, which gets a verifiable assertion and her headers.
    let mut browser = Browser::new();
    let page = browser
        .sign_in(&stack, &demo_url(&stack, "/headers"), ANN, PASSWORD)
        .await
        .unwrap();
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let headers: Value = serde_json::from_str(&page.body).unwrap();
    assert_eq!(headers["remote-user"], ANN);
    assert_eq!(headers["remote-groups"], "member");
    let cookie = headers["cookie"].as_str().unwrap_or_default();
    assert!(
        !cookie.contains("kakuremichi_"),
        "own cookies reach the app: {cookie}"
    );
    let token = headers["kakuremichi-jwt-assertion"]
        .as_str()
        .expect("assertion header")
        .to_owned();
    let claims = verify_assertion(&stack, &token).await.unwrap();
    assert_eq!(claims["sub"], ann.as_str());
    assert_eq!(claims["email"], ANN);
    assert_eq!(claims["amr"], json!(["pwd"]));
    // The app itself verifies it against the JWKS.
    let app = browser
        .go(&stack, Method::GET, &demo_url(&stack, "/identity"), None)
        .await
        .unwrap();
    assert_eq!(app.status, StatusCode::OK, "{}", app.body);
    let app: Value = serde_json::from_str(&app.body).unwrap();
    assert_eq!(app["verified"], true);
    assert_eq!(app["claims"]["email"], ANN);

    // Identity headers a client sends are replaced, never passed on.
    let forged = browser
        .http
        .request(
            Method::GET,
            format!("http://{}/headers", stack.opts.gateway_http_for_test),
        )
        .header(HOST, DEMO_HOST)
        .header(
            COOKIE,
            format!(
                "kakuremichi_session={}; kakuremichi_nonce={}",
                browser.cookie(DEMO_HOST, "kakuremichi_session").unwrap(),
                browser.cookie(DEMO_HOST, "kakuremichi_nonce").unwrap()
            ),
        )
        .header("remote-user", "mallory@example.com")
        .header("x-forwarded-email", "mallory@example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 200);
    let seen: Value = forged.json().await.unwrap();
    assert_eq!(seen["remote-user"], ANN);
    assert!(seen.get("x-forwarded-email").is_none());

    // The token alone, without the browser's nonce cookie, is refused (a leaked URL or log line
    // is not a session); a tampered one too.
    let without_nonce = curl
        .http
        .get(format!(
            "http://{}/headers",
            stack.opts.gateway_http_for_test
        ))
        .header(HOST, DEMO_HOST)
        .header(COOKIE, format!("kakuremichi_session={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(without_nonce.status(), 401);
    // The signature's first character carries six bits of it, so changing it always breaks the
    // signature. (Its last carries only two, and the four padding bits beside them make some
    // changes of it a base64 error instead: a malformed token, not a bad signature.)
    let sig_at = token.rfind('.').unwrap() + 1;
    let mut tampered = token.clone();
    let first = tampered.remove(sig_at);
    tampered.insert(sig_at, if first == 'A' { 'B' } else { 'A' });
    let nonce = browser
        .cookie(DEMO_HOST, "kakuremichi_nonce")
        .unwrap()
        .clone();
    for (what, bad) in [
        ("tampered signature", tampered),
        ("not a token", "garbage".to_owned()),
        (
            "forged header",
            format!("eyJhbGciOiJub25lIn0.{}.", token.split('.').nth(1).unwrap()),
        ),
    ] {
        let r = curl
            .http
            .get(format!(
                "http://{}/headers",
                stack.opts.gateway_http_for_test
            ))
            .header(HOST, DEMO_HOST)
            .header(
                COOKIE,
                format!("kakuremichi_session={bad}; kakuremichi_nonce={nonce}"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{what}");
        let challenge = r.headers()[WWW_AUTHENTICATE].to_str().unwrap().to_owned();
        assert!(challenge.contains("invalid_token"), "{what}: {challenge}");
    }
    // The gateway's refusals reach control's audit log with its next status report.
    let audited = wait_for(
        "the gateway's refusals in the audit log",
        Duration::from_secs(15),
        || async {
            let a = stack.api.get("/api/v1/audit?action=access").await?;
            let found: Vec<Value> = a
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|e| {
                    e["detail"]
                        .as_str()
                        .is_some_and(|d| d.starts_with("session token refused"))
                })
                .collect();
            Ok((refusal_counts(&found).values().sum::<u32>() >= 3).then_some(found))
        },
    )
    .await
    .unwrap();
    // Counted by reason (a report holds one line per distinct reason, with its count; two
    // reports may split them): a bad signature, and two malformed tokens.
    assert_eq!(
        refusal_counts(&audited),
        std::collections::BTreeMap::from([
            ("session token refused: bad signature".to_owned(), 1),
            ("session token refused: malformed token".to_owned(), 2),
        ]),
        "{audited:?}"
    );
    for e in &audited {
        assert_eq!(e["target"], DEMO_HOST, "{e}");
        assert!(e["actor"].as_str().unwrap().starts_with("gateway:"), "{e}");
        assert!(e["outcome"].as_str().unwrap().starts_with("denied"), "{e}");
        assert_eq!(e["client"], "127.0.0.1", "{e}");
    }

    // A token for demo.localhost presented to another protected hostname: wrong audience.
    let (status, body) = stack
        .api
        .call(
            Method::POST,
            "/api/v1/resources",
            Some(
                json!({"hostname": "other.localhost", "site_id": stack.site_id,
                        "target": stack.opts.app_listen.to_string(), "access": {}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let session = browser
        .cookie(DEMO_HOST, "kakuremichi_session")
        .unwrap()
        .clone();
    wait_for(
        "the other resource to ask for sign-in",
        Duration::from_secs(10),
        || {
            let http = curl.http.clone();
            let url = format!("http://{}/headers", stack.opts.gateway_http_for_test);
            let cookie = format!("kakuremichi_session={session}; kakuremichi_nonce={nonce}");
            async move {
                let r = http
                    .get(url)
                    .header(HOST, "other.localhost")
                    .header(COOKIE, cookie)
                    .send()
                    .await?;
                if r.status() != 401 {
                    return Ok(None);
                }
                let challenge = r.headers()[WWW_AUTHENTICATE].to_str()?.to_owned();
                Ok(Some(challenge))
            }
        },
    )
    .await
    .map(|c| assert!(c.contains("wrong audience"), "{c}"))
    .unwrap();

    // Bob is signed in but lacks the role: a clear 403 page.
    let mut bob = Browser::new();
    let denied = bob
        .sign_in(&stack, &demo_url(&stack, "/headers"), BOB, PASSWORD)
        .await
        .unwrap();
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    assert!(
        denied.body.contains("is not allowed to use demo.localhost"),
        "{}",
        denied.body
    );

    // A callback with another browser's nonce (the grant link replayed elsewhere) is refused.
    let replay = curl
        .go(
            &stack,
            Method::GET,
            &format!(
                "{}?token={token}&rd=/",
                demo_url(&stack, "/.kakuremichi/auth/callback")
            ),
            None,
        )
        .await
        .unwrap();
    assert_eq!(replay.status, StatusCode::BAD_REQUEST);
    assert!(replay.body.contains("not valid here"), "{}", replay.body);

    // The JWKS is served on the resource hostname too.
    let jwks = browser
        .go(
            &stack,
            Method::GET,
            &demo_url(&stack, "/.well-known/kakuremichi/jwks.json"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(jwks.status, StatusCode::OK);
    assert!(jwks.body.contains(token_kid(&token).as_str()));

    // Sign-out everywhere: the gateway refuses Ann's session within 2 s.
    let revoked_at = Instant::now();
    let (status, _) = stack
        .api
        .call(Method::POST, &format!("/api/v1/users/{ann}/sign-out"), None)
        .await
        .unwrap();
    assert_eq!(status, 204);
    loop {
        let p = browser
            .go(&stack, Method::GET, &demo_url(&stack, "/headers"), None)
            .await
            .unwrap();
        if p.status == StatusCode::FOUND {
            break;
        }
        assert_eq!(p.status, StatusCode::OK);
        assert!(
            revoked_at.elapsed() < Duration::from_secs(2),
            "a revoked session still works after {:?}",
            revoked_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "sign-out everywhere reached the gateway in {:?}",
        revoked_at.elapsed()
    );

    // Ann signs in again; with control down she keeps access, and a new browser gets a clear
    // page instead of a sign-in redirect that cannot work.
    let mut again = Browser::new();
    let page = again
        .sign_in(&stack, &demo_url(&stack, "/headers"), ANN, PASSWORD)
        .await
        .unwrap();
    assert_eq!(page.status, StatusCode::OK);
    stack.stop_control();
    wait_for(
        "the gateway to notice control is gone",
        Duration::from_secs(10),
        || async {
            let p = Browser::new()
                .go(&stack, Method::GET, &demo_url(&stack, "/"), None)
                .await?;
            Ok((p.status == StatusCode::SERVICE_UNAVAILABLE).then_some(p))
        },
    )
    .await
    .map(|p| {
        assert!(
            p.body.contains("Sign-in is unavailable right now"),
            "{}",
            p.body
        )
    })
    .unwrap();
    for _ in 0..5 {
        let p = again
            .go(&stack, Method::GET, &demo_url(&stack, "/headers"), None)
            .await
            .unwrap();
        assert_eq!(
            p.status,
            StatusCode::OK,
            "a signed-in user lost access with control down"
        );
    }
    stack.start_control_again().await.unwrap();

    // Nothing secret in any log line.
    let logs = stack.logs_full();
    for (what, secret) in [
        ("password", PASSWORD.to_owned()),
        ("token", token.clone()),
        ("nonce", nonce.clone()),
        ("signature", token.rsplit('.').next().unwrap().to_owned()),
    ] {
        assert!(!logs.contains(&secret), "the {what} appears in a log");
    }
}

/// Posts the right password, waiting out the rate limit.
async fn right_password(stack: &Stack, browser: &mut Browser, sign_in: &str, csrf: &str) -> Page {
    loop {
        let p = browser
            .go(
                stack,
                Method::POST,
                sign_in,
                Some(&[("email", ANN), ("password", PASSWORD), ("csrf", csrf)]),
            )
            .await
            .expect("control answers");
        if p.status != StatusCode::TOO_MANY_REQUESTS {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn token_kid(token: &str) -> String {
    jsonwebtoken::decode_header(token)
        .expect("a JWT header")
        .kid
        .expect("a kid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_are_rate_limited_and_lock_the_account_until_an_admin_unlocks_it() {
    let stack = Stack::start().await.expect("stack");
    let ann = create_user(&stack, ANN, &["member"]).await.unwrap();
    protect(&stack).await.unwrap();
    let mut browser = Browser::new();
    let sign_in = format!("{}/auth/sign-in", stack.opts.control_url_for_test);
    let form = browser
        .go(&stack, Method::GET, &sign_in, None)
        .await
        .unwrap();
    let csrf = hidden(&form.body, "csrf").unwrap();
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for _ in 0..100 {
        let p = browser
            .go(
                &stack,
                Method::POST,
                &sign_in,
                Some(&[
                    ("email", ANN),
                    ("password", "wrong password!"),
                    ("csrf", &csrf),
                ]),
            )
            .await
            .unwrap();
        *by_status.entry(p.status.as_u16()).or_default() += 1;
    }
    println!("100 wrong passwords: {by_status:?}");
    assert!(
        by_status.get(&429).copied().unwrap_or(0) >= 75,
        "{by_status:?}"
    );
    assert!(
        by_status.get(&403).copied().unwrap_or(0) >= 1,
        "never locked: {by_status:?}"
    );
    let user = stack
        .api
        .get(&format!("/api/v1/users/{ann}"))
        .await
        .unwrap();
    assert!(user["locked_until"].as_str().is_some(), "{user}");

    // The right password fails while locked (once the rate limit lets an attempt through).
    let p = right_password(&stack, &mut browser, &sign_in, &csrf).await;
    assert_eq!(p.status, StatusCode::FORBIDDEN, "{}", p.body);
    assert!(p.body.contains("locked"), "{}", p.body);
    stack
        .api
        .patch(&format!("/api/v1/users/{ann}"), json!({"unlock": true}))
        .await
        .unwrap();
    let p = right_password(&stack, &mut browser, &sign_in, &csrf).await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.body);
    assert!(
        p.body.contains("You are signed in as ann@example.com"),
        "{}",
        p.body
    );

    // The audit log has every attempt, the lockout, the unlock and the success.
    let denied = stack
        .api
        .get("/api/v1/audit?action=sign_in&outcome=denied&limit=1000")
        .await
        .unwrap();
    assert!(denied.as_array().unwrap().len() >= 101, "{denied}");
    assert!(denied
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["detail"] == "rate limited"));
    assert!(denied
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["detail"] == "locked"));
    let locked = stack
        .api
        .get("/api/v1/audit?action=account_locked")
        .await
        .unwrap();
    assert_eq!(locked[0]["target"], ANN, "{locked}");
    let ok = stack
        .api
        .get("/api/v1/audit?action=sign_in&outcome=ok")
        .await
        .unwrap();
    assert_eq!(ok[0]["actor"], format!("user:{ann}"), "{ok}");
    let unlock = stack.api.get("/api/v1/audit?action=PATCH*").await.unwrap();
    assert_eq!(
        unlock[0]["action"],
        format!("PATCH /api/v1/users/{ann}"),
        "{unlock}"
    );
    assert_eq!(unlock[0]["outcome"], "200");
    assert!(unlock[0]["actor"]
        .as_str()
        .unwrap()
        .starts_with("admin-key:"));
    for bad in ["?limit=lots", "?nope=1"] {
        let (status, body) = stack
            .api
            .call(Method::GET, &format!("/api/v1/audit{bad}"), None)
            .await
            .unwrap();
        assert_eq!(status, 400, "{bad}: {body}");
    }

    // A form without the CSRF cookie's token is refused.
    let p = Browser::new()
        .go(
            &stack,
            Method::POST,
            &sign_in,
            Some(&[("email", ANN), ("password", PASSWORD), ("csrf", &csrf)]),
        )
        .await
        .unwrap();
    assert_eq!(p.status, StatusCode::FORBIDDEN);
    assert!(p.body.contains("form expired"), "{}", p.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totp_is_asked_after_the_password_and_a_code_works_once() {
    let stack = Stack::start().await.expect("stack");
    let ann = create_user(&stack, ANN, &["member"]).await.unwrap();
    let (status, totp) = stack
        .api
        .call(Method::POST, &format!("/api/v1/users/{ann}/totp"), None)
        .await
        .unwrap();
    assert_eq!(status, 201, "{totp}");
    assert!(totp["otpauth_url"]
        .as_str()
        .unwrap()
        .starts_with("otpauth://totp/kakuremichi%3Aann%40example.com?secret="));
    let secret = totp_rs::Secret::Encoded(totp["secret"].as_str().unwrap().to_owned())
        .to_bytes()
        .unwrap();
    let generator = totp_rs::TOTP::new(totp_rs::Algorithm::SHA1, 6, 1, 30, secret).unwrap();
    protect(&stack).await.unwrap();

    // Password first: control then asks for a code instead of starting a session.
    let mut browser = Browser::new();
    let (csrf, pending) = password_step_of(&stack, &mut browser).await;
    let page = browser
        .go(
            &stack,
            Method::POST,
            &format!("{}/auth/sign-in/totp", stack.opts.control_url_for_test),
            Some(&[("code", "12345x"), ("csrf", &csrf), ("pending", &pending)]),
        )
        .await
        .unwrap();
    assert_eq!(page.status, StatusCode::UNAUTHORIZED, "{}", page.body);
    assert!(
        page.body.contains("that code is not valid"),
        "{}",
        page.body
    );
    let mut tampered = pending.clone();
    tampered.replace_range(10..11, if &tampered[10..11] == "A" { "B" } else { "A" });
    let page = browser
        .go(
            &stack,
            Method::POST,
            &format!("{}/auth/sign-in/totp", stack.opts.control_url_for_test),
            Some(&[("code", "123456"), ("csrf", &csrf), ("pending", &tampered)]),
        )
        .await
        .unwrap();
    assert_eq!(page.status, StatusCode::BAD_REQUEST, "{}", page.body);

    let code = generator.generate_current().unwrap();
    let app = code_step(&stack, &mut browser, &csrf, &pending, &code).await;
    assert_eq!(app.status, StatusCode::OK, "{}", app.body);
    let headers: Value = serde_json::from_str(&app.body).unwrap();
    let claims = verify_assertion(
        &stack,
        headers["kakuremichi-jwt-assertion"].as_str().unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(claims["amr"], json!(["pwd", "otp"]));

    // The same code again, from another browser with the right password: refused.
    let mut other = Browser::new();
    let (csrf, pending) = password_step_of(&stack, &mut other).await;
    let page = other
        .go(
            &stack,
            Method::POST,
            &format!("{}/auth/sign-in/totp", stack.opts.control_url_for_test),
            Some(&[("code", &code), ("csrf", &csrf), ("pending", &pending)]),
        )
        .await
        .unwrap();
    assert_eq!(page.status, StatusCode::UNAUTHORIZED, "a code worked twice");
    let denied = stack
        .api
        .get("/api/v1/audit?action=sign_in&outcome=denied")
        .await
        .unwrap();
    assert!(
        denied
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["detail"] == "TOTP code used before"),
        "{denied}"
    );
}

/// Posts a TOTP code to the second step of a sign-in and follows control's redirect through the
/// gateway's callback; returns the app's page.
async fn code_step(
    stack: &Stack,
    browser: &mut Browser,
    csrf: &str,
    pending: &str,
    code: &str,
) -> Page {
    let page = browser
        .go(
            stack,
            Method::POST,
            &format!("{}/auth/sign-in/totp", stack.opts.control_url_for_test),
            Some(&[("code", code), ("csrf", csrf), ("pending", pending)]),
        )
        .await
        .expect("control answers");
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    let back = browser
        .go(
            stack,
            Method::GET,
            &page.location.expect("a callback"),
            None,
        )
        .await
        .expect("the gateway answers");
    assert_eq!(back.status, StatusCode::FOUND, "{}", back.body);
    browser
        .go(stack, Method::GET, &back.location.expect("the app"), None)
        .await
        .expect("the app answers")
}

/// Opens the protected app, follows it to control's sign-in page and posts the right password;
/// returns the CSRF token and the sealed pending sign-in of the TOTP form that follows.
async fn password_step_of(stack: &Stack, browser: &mut Browser) -> (String, String) {
    let (page, csrf) = post_password(stack, browser, ANN).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let pending = hidden(&page.body, "pending").expect("a TOTP form");
    (csrf, pending)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_run_set_up_creates_the_owner_once_with_the_admin_key() {
    let stack = Stack::start().await.expect("stack");
    let setup = format!("{}/setup", stack.opts.control_url_for_test);
    let mut browser = Browser::new();
    let form = browser.go(&stack, Method::GET, &setup, None).await.unwrap();
    assert_eq!(form.status, StatusCode::OK, "{}", form.body);
    let csrf = hidden(&form.body, "csrf").unwrap();
    let wrong = browser
        .go(
            &stack,
            Method::POST,
            &setup,
            Some(&[
                ("admin_key", "kma_00000000000000000000000000000000_nope"),
                ("email", "owner@example.com"),
                ("password", PASSWORD),
                ("csrf", &csrf),
            ]),
        )
        .await
        .unwrap();
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED, "{}", wrong.body);
    let done = browser
        .go(
            &stack,
            Method::POST,
            &setup,
            Some(&[
                ("admin_key", stack.opts.admin_key.as_str()),
                ("email", "Owner@Example.com"),
                ("name", "The Owner"),
                ("password", PASSWORD),
                ("csrf", &csrf),
            ]),
        )
        .await
        .unwrap();
    // Set-up lands in the admin console, signed in as the owner.
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
    let console = done.location.clone().unwrap();
    assert!(console.ends_with("/ui"), "{console}");
    let console = browser
        .go(&stack, Method::GET, &console, None)
        .await
        .unwrap();
    assert_eq!(console.status, StatusCode::OK, "{}", console.body);
    assert!(
        console.body.contains("owner@example.com") && console.body.contains("<h1>Dashboard</h1>"),
        "{}",
        console.body
    );
    let users = stack.api.get("/api/v1/users").await.unwrap();
    assert_eq!(users[0]["email"], "owner@example.com");
    assert_eq!(users[0]["roles"], json!(["owner"]));
    let again = Browser::new()
        .go(&stack, Method::GET, &setup, None)
        .await
        .unwrap();
    assert_eq!(again.status, StatusCode::CONFLICT, "set-up runs once");
    let logs = stack.logs_full();
    assert!(
        !logs.contains(&stack.opts.admin_key),
        "the admin key appears in a log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_is_refused_at_the_gateway_with_a_clear_answer() {
    let mut opts = kakuremichi_e2e::StackOptions::loopback();
    opts.control_args = vec!["--session-life".into(), "2s".into()];
    let stack = Stack::start_with(opts).await.expect("stack");
    create_user(&stack, ANN, &["member"]).await.unwrap();
    protect(&stack).await.unwrap();
    let mut browser = Browser::new();
    let page = browser
        .sign_in(&stack, &demo_url(&stack, "/headers"), ANN, PASSWORD)
        .await
        .unwrap();
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let token = browser
        .cookie(DEMO_HOST, "kakuremichi_session")
        .unwrap()
        .clone();
    let claims = verify_assertion(&stack, &token).await.unwrap();
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap(),
        claims["exp"].as_i64().unwrap(),
    );
    assert!(exp - iat <= 3, "the session life is not 2 s: {claims}");
    // Past the expiry and the gateway's 30 s allowance for clock skew: refused, with why.
    let wait = u64::try_from(exp + 31 - iat).unwrap();
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let refused = browser
        .go(&stack, Method::GET, &demo_url(&stack, "/headers"), None)
        .await
        .unwrap();
    assert_eq!(
        refused.status,
        StatusCode::FOUND,
        "a browser is sent to sign in again"
    );
    let nonce = browser
        .cookie(DEMO_HOST, "kakuremichi_nonce")
        .cloned()
        .unwrap_or_default();
    let r = client()
        .get(format!(
            "http://{}/headers",
            stack.opts.gateway_http_for_test
        ))
        .header(HOST, DEMO_HOST)
        .header(
            COOKIE,
            format!("kakuremichi_session={token}; kakuremichi_nonce={nonce}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let challenge = r.headers()[WWW_AUTHENTICATE].to_str().unwrap().to_owned();
    assert!(
        challenge.contains("invalid_token") && challenge.contains("expired"),
        "{challenge}"
    );
    assert!(
        stack
            .logs_full()
            .lines()
            .any(|l| l.contains("session token refused") && l.contains("expired")),
        "the refusal is not logged"
    );
}

/// Signs in at control from the protected demo app's redirect; returns control's answer to the
/// posted password (a redirect to the gateway when a token was granted) and the form's CSRF token.
async fn post_password(stack: &Stack, browser: &mut Browser, email: &str) -> (Page, String) {
    let first = browser
        .go(stack, Method::GET, &demo_url(stack, "/headers"), None)
        .await
        .expect("the gateway answers");
    let form = browser
        .go(
            stack,
            Method::GET,
            &first.location.expect("a redirect to sign in"),
            None,
        )
        .await
        .expect("control answers");
    let field = |name: &str| hidden(&form.body, name).expect("a sign-in form");
    let page = browser
        .go(
            stack,
            Method::POST,
            &format!("{}/auth/sign-in", stack.opts.control_url_for_test),
            Some(&[
                ("email", email),
                ("password", PASSWORD),
                ("csrf", &field("csrf")),
                ("rd", &field("rd")),
                ("n", &field("n")),
            ]),
        )
        .await
        .expect("control answers");
    (page, field("csrf"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_organizations_user_is_refused_and_an_organization_can_require_a_second_factor() {
    let stack = Stack::start().await.expect("stack");
    protect(&stack).await.unwrap();
    // Organization beta, with its own owner, made by the instance's admin key.
    let (status, beta) = stack
        .api
        .call(Method::POST, "/api/v1/orgs", Some(json!({"name": "beta"})))
        .await
        .unwrap();
    assert_eq!(status, 201, "{beta}");
    let beta_key = beta["admin_key"].as_str().unwrap();
    let made = client()
        .post(format!("{}/api/v1/users", stack.opts.control_url_for_test))
        .bearer_auth(beta_key)
        .json(&json!({"email": "eve@beta.example", "password": PASSWORD, "roles": ["owner"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(made.status(), 201);
    // Beta's key does not see the demo resource of the default organization.
    let listed: Value = client()
        .get(format!(
            "{}/api/v1/resources",
            stack.opts.control_url_for_test
        ))
        .bearer_auth(beta_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed, json!([]));

    // Beta's owner signs in with the right password, and gets no token for the demo app.
    let mut eve = Browser::new();
    let (page, _) = post_password(&stack, &mut eve, "eve@beta.example").await;
    assert_eq!(page.status, StatusCode::FORBIDDEN, "{}", page.body);
    assert!(
        page.body
            .contains("not a member of the organization that runs"),
        "{}",
        page.body
    );
    let again = eve
        .go(&stack, Method::GET, &demo_url(&stack, "/headers"), None)
        .await
        .unwrap();
    assert_eq!(again.status, StatusCode::FOUND, "the gateway let eve in");

    // The default organization now requires a second factor: a password alone is not enough.
    let orgs = stack.api.get("/api/v1/orgs").await.unwrap();
    let default = orgs
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "default")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = stack
        .api
        .call(
            Method::PATCH,
            &format!("/api/v1/orgs/{default}"),
            Some(json!({"require_second_factor": true})),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let ann = create_user(&stack, ANN, &["member"]).await.unwrap();
    let mut browser = Browser::new();
    let (page, _) = post_password(&stack, &mut browser, ANN).await;
    assert_eq!(page.status, StatusCode::FORBIDDEN, "{}", page.body);
    assert!(
        page.body.contains("requires a second factor"),
        "{}",
        page.body
    );
    // Ann adds an authenticator app herself, on her account page (she holds a control session
    // from the password sign-in), proving a first code.
    let control = stack.opts.control_url_for_test.clone();
    let account = browser
        .go(&stack, Method::GET, &format!("{control}/account"), None)
        .await
        .unwrap();
    assert_eq!(account.status, StatusCode::OK, "{}", account.body);
    let csrf = hidden(&account.body, "csrf").unwrap();
    let started = browser
        .go(
            &stack,
            Method::POST,
            &format!("{control}/account/totp"),
            Some(&[("csrf", &csrf)]),
        )
        .await
        .unwrap();
    assert_eq!(started.status, StatusCode::OK, "{}", started.body);
    let secret = started
        .body
        .split("id=\"totp-secret\">")
        .nth(1)
        .and_then(|r| r.split('<').next())
        .unwrap()
        .to_owned();
    let pending = hidden(&started.body, "pending").unwrap();
    let bytes = totp_rs::Secret::Encoded(secret).to_bytes().unwrap();
    let generator = totp_rs::TOTP::new(totp_rs::Algorithm::SHA1, 6, 1, 30, bytes).unwrap();
    let wrong = browser
        .go(
            &stack,
            Method::POST,
            &format!("{control}/account/totp/confirm"),
            Some(&[("csrf", &csrf), ("pending", &pending), ("code", "000000x")]),
        )
        .await
        .unwrap();
    assert_eq!(
        wrong.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        wrong.body
    );
    let code = generator.generate_current().unwrap();
    let added = browser
        .go(
            &stack,
            Method::POST,
            &format!("{control}/account/totp/confirm"),
            Some(&[("csrf", &csrf), ("pending", &pending), ("code", &code)]),
        )
        .await
        .unwrap();
    assert_eq!(added.status, StatusCode::OK, "{}", added.body);
    let user = stack
        .api
        .get(&format!("/api/v1/users/{ann}"))
        .await
        .unwrap();
    assert_eq!(user["has_totp"], true, "{user}");
    // The account page's sign-out-everywhere form works (its CSRF cookie reaches /account).
    let out = browser
        .go(
            &stack,
            Method::POST,
            &format!("{control}/account/sign-out-everywhere"),
            Some(&[("csrf", &csrf)]),
        )
        .await
        .unwrap();
    assert_eq!(out.status, StatusCode::OK, "{}", out.body);

    // With the password and a code (the next step's: the first one is used up), ann is in.
    let mut browser = Browser::new();
    let (csrf, pending) = password_step_of(&stack, &mut browser).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let code = generator.generate((now / 30 + 1) * 30);
    let app = code_step(&stack, &mut browser, &csrf, &pending, &code).await;
    assert_eq!(app.status, StatusCode::OK, "{}", app.body);

    // Ann removes the app herself, proving it is her with her password (a wrong one changes
    // nothing).
    let account = browser
        .go(&stack, Method::GET, &format!("{control}/account"), None)
        .await
        .unwrap();
    assert!(
        account.body.contains("Remove the authenticator app"),
        "{}",
        account.body
    );
    let csrf = hidden(&account.body, "csrf").unwrap();
    let remove = |password: &'static str| {
        let (stack, control, csrf) = (&stack, control.clone(), csrf.clone());
        let browser = &browser;
        async move {
            let mut b = Browser {
                http: browser.http.clone(),
                jar: browser.jar.clone(),
            };
            b.go(
                stack,
                Method::POST,
                &format!("{control}/account/totp/remove"),
                Some(&[("csrf", &csrf), ("password", password), ("code", "")]),
            )
            .await
            .unwrap()
        }
    };
    let refused = remove("not her password").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    let user = stack
        .api
        .get(&format!("/api/v1/users/{ann}"))
        .await
        .unwrap();
    assert_eq!(user["has_totp"], true, "{user}");
    let removed = remove(PASSWORD).await;
    assert_eq!(removed.status, StatusCode::OK, "{}", removed.body);
    let user = stack
        .api
        .get(&format!("/api/v1/users/{ann}"))
        .await
        .unwrap();
    assert_eq!(user["has_totp"], false, "{user}");
}

/// A request to the demo app through the gateway with `key` in `header`.
async fn with_key(stack: &Stack, path: &str, header: &str, key: &str) -> reqwest::Response {
    stack
        .request_builder(Method::GET, DEMO_HOST, path)
        .header(header, key)
        .send()
        .await
        .expect("the gateway answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_personal_api_key_reaches_a_resource_that_accepts_keys_and_the_app_verifies_its_assertion(
) {
    let stack = Stack::start().await.expect("stack");
    let ann = create_user(&stack, ANN, &["member"]).await.unwrap();
    protect_demo(&stack, json!({"roles": ["member"], "api_keys": true}))
        .await
        .unwrap();
    let key = |scopes: Value| {
        let stack = &stack;
        let ann = ann.clone();
        async move {
            let (status, body) = stack
                .api
                .call(
                    Method::POST,
                    "/api/v1/api-keys",
                    Some(json!({"name": "script", "scopes": scopes, "user_id": ann})),
                )
                .await
                .unwrap();
            assert_eq!(status, 201, "{body}");
            (
                body["id"].as_str().unwrap().to_owned(),
                body["secret"].as_str().unwrap().to_owned(),
            )
        }
    };
    let (id, secret) = key(json!(["resource:access"])).await;
    let bearer = format!("Bearer {secret}");
    // The gateway accepts it within a config push.
    wait_for(
        "the gateway to accept the key",
        Duration::from_secs(5),
        || async {
            let r = with_key(&stack, "/identity", "authorization", &bearer).await;
            Ok((r.status() == 200).then_some(()))
        },
    )
    .await
    .unwrap();
    // The app verifies the assertion against control's JWKS, as for a signed-in user.
    let shown: Value = with_key(&stack, "/identity", "authorization", &bearer)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(shown["verified"], true, "{shown}");
    assert_eq!(shown["claims"]["amr"], json!(["api_key"]));
    assert_eq!(shown["claims"]["email"], ANN);
    assert_eq!(shown["claims"]["sub"], ann.as_str());
    assert_eq!(shown["claims"]["roles"], json!(["member"]));
    let claims = verify_assertion(
        &stack,
        with_key(&stack, "/headers", "x-api-key", &secret)
            .await
            .json::<Value>()
            .await
            .unwrap()["kakuremichi-jwt-assertion"]
            .as_str()
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(claims["sid"], id.as_str());
    // The key itself never reaches the app.
    let headers: Value = with_key(&stack, "/headers", "x-api-key", &secret)
        .await
        .json()
        .await
        .unwrap();
    assert!(headers.get("x-api-key").is_none() && headers.get("authorization").is_none());
    assert!(!headers.to_string().contains(&secret), "{headers}");
    // A key without resource:access, and a made-up one: 401 invalid_token.
    let (_, reader) = key(json!(["resource:read"])).await;
    let made_up = format!("Bearer kmk_{}_x", uuid::Uuid::new_v4().simple());
    for sent in [format!("Bearer {reader}"), made_up] {
        let r = with_key(&stack, "/headers", "authorization", &sent).await;
        assert_eq!(r.status(), 401);
        assert!(r.headers()[WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .contains("invalid_token"));
    }
    // Revoked: refused at the gateway within 2 s.
    let (status, body) = stack
        .api
        .call(Method::DELETE, &format!("/api/v1/api-keys/{id}"), None)
        .await
        .unwrap();
    assert_eq!(status, 204, "{body}");
    let revoked_at = Instant::now();
    wait_for(
        "the gateway to refuse the key",
        Duration::from_secs(2),
        || async {
            let r = with_key(&stack, "/headers", "authorization", &bearer).await;
            Ok((r.status() == 401).then_some(()))
        },
    )
    .await
    .unwrap();
    println!("revoked key refused after {:?}", revoked_at.elapsed());
    assert!(
        !stack.logs_full().contains(&secret),
        "the API key reached a log line"
    );
    // The refusals reach the audit log with the gateway's next status report.
    wait_for(
        "the refusals in the audit log",
        Duration::from_secs(15),
        || async {
            let log = stack.api.get("/api/v1/audit?action=access").await?;
            Ok(log.to_string().contains("API key refused").then_some(()))
        },
    )
    .await
    .unwrap();
}

/// Machines and webhooks on a protected resource: an organization service key as the header
/// pair (Kakuremichi's and Cloudflare's names) reaches the app as itself; a bypass rule lets
/// `POST /echo` through without a cookie while the rest of the hostname stays protected; a deny
/// rule by client address wins over a signed-in user; a revoked service key stops within 2 s;
/// the key never reaches a log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_key_pair_and_rules_let_machines_and_webhooks_in_and_a_deny_rule_wins() {
    let mut stack = Stack::start().await.expect("stack");
    create_user(&stack, ANN, &["member"]).await.unwrap();
    let service_key = |name: &'static str| {
        let stack = &stack;
        async move {
            let (status, key) = stack
                .api
                .call(
                    Method::POST,
                    "/api/v1/api-keys",
                    Some(json!({"name": name, "scopes": ["resource:access"], "service": true})),
                )
                .await
                .unwrap();
            assert_eq!(status, 201, "{key}");
            (
                key["id"].as_str().unwrap().to_owned(),
                key["secret"].as_str().unwrap().to_owned(),
            )
        }
    };
    let (key_id, secret) = service_key("ci deploy").await;
    let (kept_id, kept_secret) = service_key("monitor").await;
    protect_demo(
        &stack,
        json!({
            "roles": ["member"],
            "service_keys": [key_id, kept_id],
            "rules": [
                {"action": "deny", "cidrs": ["127.0.0.2/32"]},
                {"action": "bypass", "paths": ["/echo"], "methods": ["POST"]},
            ],
        }),
    )
    .await
    .unwrap();
    const OURS: (&str, &str) = (
        "Kakuremichi-Access-Client-Id",
        "Kakuremichi-Access-Client-Secret",
    );
    const CLOUDFLARE: (&str, &str) = ("CF-Access-Client-Id", "CF-Access-Client-Secret");
    wait_for(
        "the gateway to accept the service key",
        Duration::from_secs(5),
        || async {
            Ok((with_pair(&stack, OURS, &key_id, &secret, "/identity")
                .await
                .status()
                == 200)
                .then_some(()))
        },
    )
    .await
    .unwrap();
    let shown: Value = with_pair(&stack, CLOUDFLARE, &key_id, &secret, "/identity")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(shown["verified"], true, "{shown}");
    assert_eq!(shown["claims"]["amr"], json!(["service_key"]));
    assert_eq!(shown["claims"]["sub"], key_id.as_str());
    assert_eq!(shown["claims"]["name"], "ci deploy");
    let headers: Value = with_pair(&stack, OURS, &key_id, &secret, "/headers")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(headers["remote-user"], key_id.as_str(), "{headers}");
    assert!(!headers.to_string().contains(&secret), "{headers}");
    // A pair whose id is not the secret's.
    let r = stack
        .request_builder(Method::GET, DEMO_HOST, "/headers")
        .header(OURS.0, uuid::Uuid::new_v4().to_string())
        .header(OURS.1, &secret)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // The webhook path passes without a cookie; the rest of the hostname does not.
    let hook = stack
        .request_builder(Method::POST, DEMO_HOST, "/echo")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(hook.status(), 200);
    assert_eq!(hook.text().await.unwrap(), "payload");
    assert_eq!(
        stack.get(DEMO_HOST, "/headers").await.unwrap().status(),
        401
    );
    let r = stack
        .request_builder(Method::GET, DEMO_HOST, "/echo")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the rule is for POST only");

    // A signed-in user reaches the app from 127.0.0.1, and is refused from 127.0.0.2.
    let mut browser = Browser::new();
    let page = browser
        .sign_in(&stack, &demo_url(&stack, "/headers"), ANN, PASSWORD)
        .await
        .unwrap();
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let jar = browser.jar[DEMO_HOST]
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("; ");
    let from = |local: [u8; 4], method: Method, path: &'static str| {
        from_address(&stack, &jar, local, method, path)
    };
    assert_eq!(
        from([127, 0, 0, 1], Method::GET, "/headers").await.status(),
        200
    );
    let denied = from([127, 0, 0, 2], Method::GET, "/headers").await;
    assert_eq!(denied.status(), 403);
    assert!(denied.text().await.unwrap().contains("rule 0"));
    assert_eq!(
        from([127, 0, 0, 2], Method::POST, "/echo").await.status(),
        403
    );

    // Revoked: the service key stops within 2 s.
    let (status, body) = stack
        .api
        .call(Method::DELETE, &format!("/api/v1/api-keys/{key_id}"), None)
        .await
        .unwrap();
    assert_eq!(status, 204, "{body}");
    wait_for(
        "the gateway to refuse the revoked service key",
        Duration::from_secs(2),
        || async {
            let r = with_pair(&stack, OURS, &key_id, &secret, "/headers").await;
            Ok((r.status() == 401).then_some(()))
        },
    )
    .await
    .unwrap();
    // The denial by rule reaches the audit log with its reason.
    wait_for(
        "the rule's denial in the audit log",
        Duration::from_secs(15),
        || async {
            let log = stack.api.get("/api/v1/audit?action=access").await?;
            Ok(log.to_string().contains("denied by rule 0").then_some(()))
        },
    )
    .await
    .unwrap();

    // Control stopped: the other service key, the bypass rule, the deny rule and the signed-in
    // user are decided as before, by the gateway alone.
    stack.stop_control();
    wait_for(
        "the gateway to notice control is gone",
        Duration::from_secs(10),
        || async {
            let p = Browser::new()
                .go(&stack, Method::GET, &demo_url(&stack, "/"), None)
                .await?;
            Ok((p.status == StatusCode::SERVICE_UNAVAILABLE).then_some(()))
        },
    )
    .await
    .unwrap();
    let kept = with_pair(&stack, OURS, &kept_id, &kept_secret, "/headers").await;
    assert_eq!(kept.status(), 200);
    let revoked = with_pair(&stack, OURS, &key_id, &secret, "/headers").await;
    assert_eq!(revoked.status(), 401, "the revoked key");
    let hook = stack
        .request_builder(Method::POST, DEMO_HOST, "/echo")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(hook.status(), 200);
    let allowed = from_address(&stack, &jar, [127, 0, 0, 1], Method::GET, "/headers").await;
    assert_eq!(allowed.status(), 200);
    let denied = from_address(&stack, &jar, [127, 0, 0, 2], Method::GET, "/headers").await;
    assert_eq!(denied.status(), 403);
    let logs = stack.logs_full();
    for key in [&secret, &kept_secret] {
        assert!(
            !logs.contains(key.as_str()),
            "a service key reached a log line"
        );
    }
}

/// A request through the gateway with a service key as the client id and secret pair.
async fn with_pair(
    stack: &Stack,
    names: (&str, &str),
    id: &str,
    secret: &str,
    path: &str,
) -> reqwest::Response {
    stack
        .request_builder(Method::GET, DEMO_HOST, path)
        .header(names.0, id)
        .header(names.1, secret)
        .send()
        .await
        .expect("the gateway answers")
}

/// A request through the gateway from the local address `local`, with the cookies `jar`.
async fn from_address(
    stack: &Stack,
    jar: &str,
    local: [u8; 4],
    method: Method,
    path: &str,
) -> reqwest::Response {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(std::net::IpAddr::from(local))
        .build()
        .expect("an HTTP client")
        .request(
            method,
            format!("http://{}{path}", stack.opts.gateway_http_for_test),
        )
        .header(HOST, DEMO_HOST)
        .header(COOKIE, jar)
        .send()
        .await
        .expect("the gateway answers")
}

/// Share links through the gateway: a link opens the resource for whoever follows it, without an
/// account, and the app gets an assertion naming the link; it stops after its last use, after its
/// expiry, and at revocation (which also ends the sessions it opened, within 2 s); with control
/// down, sessions it opened keep working and a new opening gets a clear page; no link's secret
/// reaches a log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_link_stops_after_its_last_use_its_expiry_and_its_revocation() {
    let mut stack = Stack::start().await.expect("stack");
    protect_demo(&stack, json!({"roles": ["admin"]}))
        .await
        .unwrap();
    let link = |body: Value| {
        let stack = &stack;
        async move {
            let (status, v) = stack
                .api
                .call(
                    Method::POST,
                    &format!("/api/v1/resources/{}/share-links", stack.resource_id),
                    Some(body),
                )
                .await
                .unwrap();
            assert_eq!(status, 201, "{v}");
            (
                v["id"].as_str().unwrap().to_owned(),
                demo_url(stack, v["path"].as_str().unwrap()),
                v["secret"].as_str().unwrap().to_owned(),
                kakuremichi_proto::time::parse_time_ms(v["expires_at"].as_str().unwrap()).unwrap(),
            )
        }
    };
    let (twice_id, twice, twice_secret, _) =
        link(json!({"name": "reviewers", "max_uses": 2})).await;
    let (_, kept, kept_secret, _) = link(json!({"name": "kept"})).await;

    // Two people open the link and reach the app, which verifies the assertion.
    let mut first = Browser::new();
    let page = first.follow(&stack, &twice).await.unwrap();
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let shown: Value = serde_json::from_str(
        &first
            .go(&stack, Method::GET, &demo_url(&stack, "/identity"), None)
            .await
            .unwrap()
            .body,
    )
    .unwrap();
    assert_eq!(shown["verified"], true, "{shown}");
    assert_eq!(shown["claims"]["amr"], json!(["share_link"]));
    assert_eq!(shown["claims"]["sub"], twice_id.as_str());
    assert_eq!(shown["claims"]["name"], "reviewers");
    let mut second = Browser::new();
    assert_eq!(
        second.follow(&stack, &twice).await.unwrap().status,
        StatusCode::OK
    );
    // A third gets a clear refusal.
    let third = Browser::new().follow(&stack, &twice).await.unwrap();
    assert_eq!(third.status, StatusCode::FORBIDDEN);
    assert!(
        third.body.contains("used as many times as it allows"),
        "{}",
        third.body
    );
    let (_, listed) = stack
        .api
        .call(
            Method::GET,
            &format!("/api/v1/resources/{}/share-links", stack.resource_id),
            None,
        )
        .await
        .unwrap();
    let entry = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["id"] == twice_id.as_str())
        .unwrap()
        .clone();
    assert_eq!(entry["uses"], 2, "{entry}");
    assert!(!listed.to_string().contains(&twice_secret));

    // The brief link opens before its expiry, and not after.
    let (_, brief, brief_secret, expires_at) =
        link(json!({"name": "brief", "expires_in_seconds": 5})).await;
    assert_eq!(
        Browser::new().follow(&stack, &brief).await.unwrap().status,
        StatusCode::OK
    );
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    tokio::time::sleep(Duration::from_millis(
        (expires_at - now_ms).max(0) as u64 + 100,
    ))
    .await;
    let late = Browser::new().follow(&stack, &brief).await.unwrap();
    assert_eq!(late.status, StatusCode::FORBIDDEN);
    assert!(late.body.contains("expired"), "{}", late.body);

    // A made-up or tampered link opens nothing.
    let tampered = twice.replace(&twice_secret, &format!("{twice_secret}x"));
    assert_eq!(
        Browser::new()
            .follow(&stack, &tampered)
            .await
            .unwrap()
            .status,
        StatusCode::FORBIDDEN
    );

    // Revoked: it opens nothing more, and the sessions it opened end at the gateway in 2 s.
    let (status, body) = stack
        .api
        .call(
            Method::DELETE,
            &format!(
                "/api/v1/resources/{}/share-links/{twice_id}",
                stack.resource_id
            ),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 204, "{body}");
    let revoked_at = Instant::now();
    // The browser keeps its cookies between tries, so `wait_for` (which takes a `Fn`) is not
    // used here.
    loop {
        let p = first
            .go(&stack, Method::GET, &demo_url(&stack, "/headers"), None)
            .await
            .unwrap();
        if p.status != StatusCode::OK {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(2),
            "the revoked link's session still works after 2 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "revoked link's session ended after {:?}",
        revoked_at.elapsed()
    );
    let again = Browser::new().follow(&stack, &twice).await.unwrap();
    assert_eq!(again.status, StatusCode::FORBIDDEN);
    assert!(again.body.contains("revoked"), "{}", again.body);

    // Control down: a session a link opened keeps working; opening a link needs control.
    let mut guest = Browser::new();
    assert_eq!(
        guest.follow(&stack, &kept).await.unwrap().status,
        StatusCode::OK
    );
    stack.stop_control();
    wait_for(
        "the gateway to notice control is gone",
        Duration::from_secs(10),
        || async {
            let p = Browser::new().follow(&stack, &kept).await?;
            Ok((p.status == StatusCode::SERVICE_UNAVAILABLE).then_some(p))
        },
    )
    .await
    .map(|p| {
        assert!(
            p.body.contains("Share links are unavailable right now"),
            "{}",
            p.body
        )
    })
    .unwrap();
    for _ in 0..3 {
        let p = guest
            .go(&stack, Method::GET, &demo_url(&stack, "/headers"), None)
            .await
            .unwrap();
        assert_eq!(
            p.status,
            StatusCode::OK,
            "a guest lost access with control down"
        );
    }
    let logs = stack.logs_full();
    for secret in [&twice_secret, &brief_secret, &kept_secret] {
        assert!(
            !logs.contains(secret.as_str()),
            "a share link reached a log line"
        );
    }
}

/// A reusable policy at the gateway: the demo resource follows it and is protected; a change to
/// the policy (a bypass rule) reaches the gateway with one push; unfollowing makes the resource
/// public again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_follows_a_reusable_policy_and_a_change_to_it_reaches_the_gateway() {
    let stack = Stack::start().await.expect("stack");
    let (status, policy) = stack
        .api
        .call(
            Method::POST,
            "/api/v1/policies",
            Some(json!({"name": "staff", "access": {"roles": ["admin"]}})),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{policy}");
    let policy_id = policy["id"].as_str().unwrap().to_owned();
    let resource = format!("/api/v1/resources/{}", stack.resource_id);
    let status_of = |path: &'static str| {
        let stack = &stack;
        async move { Ok::<_, anyhow::Error>(stack.get(DEMO_HOST, path).await?.status()) }
    };
    let expect = |what: &'static str, path: &'static str, want: u16| {
        let status_of = &status_of;
        async move {
            wait_for(what, Duration::from_secs(5), || async {
                Ok((status_of(path).await? == want).then_some(()))
            })
            .await
            .unwrap()
        }
    };
    stack
        .api
        .patch(&resource, json!({"policy_id": policy_id}))
        .await
        .unwrap();
    expect("the resource to need sign-in", "/headers", 401).await;
    stack
        .api
        .patch(
            &format!("/api/v1/policies/{policy_id}"),
            json!({"access": {"roles": ["admin"],
                              "rules": [{"action": "bypass", "paths": ["/whoami"]}]}}),
        )
        .await
        .unwrap();
    expect("the policy's new rule at the gateway", "/whoami", 200).await;
    assert_eq!(status_of("/headers").await.unwrap(), 401);
    stack
        .api
        .patch(&resource, json!({"policy_id": null}))
        .await
        .unwrap();
    expect("the resource to be public again", "/headers", 200).await;
    let (status, _) = stack
        .api
        .call(
            Method::DELETE,
            &format!("/api/v1/policies/{policy_id}"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 204);
}
