//! Visitors without an account, end to end with the real binaries: a resource's password and
//! another's PIN typed into Debian's Chromium (wrong ones rate limited), the sessions they open
//! surviving control's outage and ending when the passcode is replaced; and a one-time code sent
//! through a real SMTP server on loopback (aiosmtpd) that signs a listed address in, while an
//! address outside the list gets no mail.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use kakuremichi_e2e::identity::{protect_demo, Browser, PRIVATE_HOST};
use kakuremichi_e2e::sso::run_script;
use kakuremichi_e2e::{free_tcp_port, wait_for, Stack, StackOptions, DEMO_HOST};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const PASSWORD: &str = "open sesame 42";
const PIN: &str = "482915";

fn url(stack: &Stack, host: &str, path: &str) -> String {
    format!(
        "http://{host}:{}{path}",
        stack.opts.gateway_http_for_test.port()
    )
}

async fn set_passcode(stack: &Stack, resource: &str, body: Value) -> (u16, Value) {
    let (status, v) = stack
        .api
        .call(
            Method::PUT,
            &format!("/api/v1/resources/{resource}/passcode"),
            Some(body),
        )
        .await
        .unwrap();
    (status, v)
}

/// The JSON the demo app's `/identity` answered, from a page's text.
fn shown(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| panic!("not the app's JSON: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_and_a_pin_open_their_resources_in_chromium_and_wrong_ones_are_rate_limited() {
    let mut opts = StackOptions::loopback();
    opts.control_args = vec!["--passcode-attempts-per-minute".into(), "3".into()];
    let mut stack = Stack::start_with(opts).await.expect("stack");
    // Only admins may sign in with an account; the passcodes are the visitors' way in.
    protect_demo(&stack, json!({"roles": ["admin"]}))
        .await
        .unwrap();
    let (status, v) = set_passcode(
        &stack,
        &stack.resource_id,
        json!({"kind": "password", "value": PASSWORD}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["kind"], "password");
    let (status, created) = stack
        .api
        .call(
            Method::POST,
            "/api/v1/resources",
            Some(json!({
                "hostname": PRIVATE_HOST, "site_id": stack.site_id,
                "target": stack.opts.app_listen.to_string(), "access": {"roles": ["admin"]}
            })),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{created}");
    let private_id = created["id"].as_str().unwrap().to_owned();
    let (status, v) = set_passcode(&stack, &private_id, json!({"kind": "pin", "value": PIN})).await;
    assert_eq!(status, 200, "{v}");
    wait_for(
        "the gateway to protect the PIN resource",
        Duration::from_secs(10),
        || async {
            let r = stack.get(PRIVATE_HOST, "/identity").await?;
            Ok((r.status() == 401).then_some(()))
        },
    )
    .await
    .unwrap();

    // Chromium: a wrong password, then the right one; the right PIN; then a visitor guessing
    // PINs is stopped by the limit (3 a minute from one client on one resource), even when the
    // next guess is right.
    let out = run_script(
        "passcode.mjs",
        &json!({"visits": [
            {"url": url(&stack, DEMO_HOST, "/identity"), "values": ["wrong password", PASSWORD]},
            {"url": url(&stack, PRIVATE_HOST, "/identity"), "values": [PIN]},
            {"url": url(&stack, PRIVATE_HOST, "/identity"), "values": ["000000", "111111", PIN]},
        ]}),
    )
    .await
    .unwrap();
    let visits = out["visits"].as_array().unwrap();
    assert!(
        visits[0]["form"].as_str().unwrap().contains("password"),
        "{out:#}"
    );
    let steps = &visits[0]["steps"];
    assert_eq!(steps[0]["status"], 401, "{out:#}");
    assert!(
        steps[0]["text"]
            .as_str()
            .unwrap()
            .contains("wrong password"),
        "{out:#}"
    );
    assert_eq!(steps[1]["status"], 200, "{out:#}");
    let app = shown(steps[1]["text"].as_str().unwrap());
    assert_eq!(app["verified"], true, "{app:#}");
    assert_eq!(app["claims"]["amr"], json!(["resource_password"]));
    assert_eq!(app["claims"]["sub"], stack.resource_id.as_str());

    assert!(
        visits[1]["form"].as_str().unwrap().contains("PIN"),
        "{out:#}"
    );
    let pin = &visits[1]["steps"][0];
    assert_eq!(pin["status"], 200, "{out:#}");
    let app = shown(pin["text"].as_str().unwrap());
    assert_eq!(app["claims"]["amr"], json!(["resource_pin"]));
    assert_eq!(app["claims"]["sub"], private_id.as_str());
    assert_eq!(app["claims"]["aud"], PRIVATE_HOST);

    let guesses = visits[2]["steps"].as_array().unwrap();
    let statuses: Vec<_> = guesses.iter().map(|s| s["status"].clone()).collect();
    assert_eq!(statuses, [json!(401), json!(401), json!(429)], "{out:#}");
    assert!(
        guesses[2]["text"]
            .as_str()
            .unwrap()
            .contains("too many attempts"),
        "{out:#}"
    );

    // The audit log says why each was refused.
    let (_, audit) = stack
        .api
        .call(Method::GET, "/api/v1/audit?action=passcode", None)
        .await
        .unwrap();
    let details: Vec<_> = audit["entries"]
        .as_array()
        .or(audit.as_array())
        .unwrap()
        .iter()
        .map(|e| e["detail"].as_str().unwrap_or("ok").to_owned())
        .collect();
    assert!(details.iter().any(|d| d == "wrong passcode"), "{audit}");
    assert!(details.iter().any(|d| d == "rate limited"), "{audit}");

    // A script's session with the password survives control's outage...
    let mut script = Browser::new();
    let (page, fields) = script
        .sign_in_page(&stack, &url(&stack, DEMO_HOST, "/identity"))
        .await
        .unwrap();
    assert!(
        page.body.contains("action=\"/auth/passcode\""),
        "{}",
        page.body
    );
    let posted = script
        .post_sign_in_form(&stack, "/auth/passcode", &fields, &[("passcode", PASSWORD)])
        .await
        .unwrap();
    let app = script.back_to_app(&stack, posted).await.unwrap();
    assert_eq!(app.status, StatusCode::OK, "{}", app.body);
    // (The app's /identity fetches control's JWKS, so /headers shows what the app got.)
    stack.stop_control();
    let during = script
        .go(
            &stack,
            Method::GET,
            &url(&stack, DEMO_HOST, "/headers"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(during.status, StatusCode::OK, "{}", during.body);
    assert!(
        during.body.contains("kakuremichi-jwt-assertion"),
        "{}",
        during.body
    );
    stack.start_control_again().await.unwrap();

    // ...and ends at the gateway when the password is replaced (here by a PIN).
    let (status, _) = set_passcode(
        &stack,
        &stack.resource_id,
        json!({"kind": "pin", "value": "135790"}),
    )
    .await;
    assert_eq!(status, 200);
    wait_for(
        "the replaced password's session to end",
        Duration::from_secs(10),
        || async {
            let page = script
                .clone()
                .go(
                    &stack,
                    Method::GET,
                    &url(&stack, DEMO_HOST, "/identity"),
                    None,
                )
                .await?;
            Ok((page.status == StatusCode::FOUND).then_some(()))
        },
    )
    .await
    .unwrap();

    // Bad input, each a clear refusal: PINs and passwords of the wrong shape, unknown fields,
    // a public resource, a form without its CSRF token, and a form for another site.
    for (body, says) in [
        (json!({"kind": "pin", "value": "12345"}), "6 digits"),
        (json!({"kind": "password", "value": "short"}), "8 to 256"),
        (
            json!({"kind": "pin", "value": "123456", "hint": "x"}),
            "unknown field",
        ),
        (
            json!({"kind": "phrase", "value": "123456"}),
            "unknown variant",
        ),
    ] {
        let (status, v) = set_passcode(&stack, &private_id, body).await;
        assert_eq!(status, 400, "{v}");
        assert!(v.to_string().contains(says), "{says}: {v}");
    }
    let (status, v) = stack
        .api
        .call(
            Method::PATCH,
            &format!("/api/v1/resources/{private_id}"),
            Some(json!({"access": null})),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    let (status, v) = set_passcode(&stack, &private_id, json!({"kind": "pin", "value": PIN})).await;
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("public"), "{v}");
    let http = kakuremichi_e2e::identity::client();
    let r = http
        .post(format!("{}/auth/passcode", stack.opts.control_url_for_test))
        .form(&[("passcode", PASSWORD), ("rd", &fields.rd), ("n", &fields.n)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let elsewhere = script
        .post_sign_in_form(
            &stack,
            "/auth/passcode",
            &kakuremichi_e2e::identity::SignInFields {
                rd: "http://elsewhere.example/".into(),
                ..fields.clone()
            },
            &[("passcode", PASSWORD)],
        )
        .await
        .unwrap();
    assert_eq!(
        elsewhere.status,
        StatusCode::BAD_REQUEST,
        "{}",
        elsewhere.body
    );
    assert!(
        elsewhere.body.contains("not a site that needs sign-in"),
        "{}",
        elsewhere.body
    );
}

/// A real SMTP server on loopback (Debian's `python3-aiosmtpd`), printing each message it gets
/// to a file.
struct SmtpSink {
    port: u16,
    log: std::path::PathBuf,
    _child: tokio::process::Child,
}

impl SmtpSink {
    async fn start(dir: &Path) -> SmtpSink {
        let port = free_tcp_port();
        let log = dir.join("smtp.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = tokio::process::Command::new("/usr/bin/python3")
            .args(["-u", "-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .expect("python3 -m aiosmtpd (scripts/setup installs python3-aiosmtpd)");
        wait_for("aiosmtpd to listen", Duration::from_secs(20), || async {
            Ok(tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ()))
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}: {}",
                std::fs::read_to_string(dir.join("smtp.log")).unwrap_or_default()
            )
        });
        SmtpSink {
            port,
            log,
            _child: child,
        }
    }

    fn received(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emailed_code_signs_a_listed_address_in_and_an_unlisted_one_gets_no_mail() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = SmtpSink::start(dir.path()).await;
    let mut opts = StackOptions::loopback();
    opts.control_args = vec![
        "--smtp-url".into(),
        format!("smtp://127.0.0.1:{}", smtp.port),
        "--smtp-from".into(),
        "access@kakuremichi.example".into(),
    ];
    let mut stack = Stack::start_with(opts).await.expect("stack");
    protect_demo(
        &stack,
        json!({"roles": ["admin"], "email_codes": ["*@example.com", "dan@partner.org"]}),
    )
    .await
    .unwrap();
    let target = url(&stack, DEMO_HOST, "/identity");

    let ask = |browser: &mut Browser, email: &'static str| {
        let stack = &stack;
        let target = target.clone();
        let mut b = std::mem::take(browser);
        async move {
            let (page, fields) = b.sign_in_page(stack, &target).await.unwrap();
            assert!(
                page.body.contains("action=\"/auth/email-code\""),
                "{}",
                page.body
            );
            let sent = b
                .post_sign_in_form(stack, "/auth/email-code", &fields, &[("email", email)])
                .await
                .unwrap();
            assert_eq!(sent.status, StatusCode::OK, "{}", sent.body);
            assert!(sent.body.contains("a code is on its way"), "{}", sent.body);
            let pending = kakuremichi_e2e::identity::hidden(&sent.body, "pending").unwrap();
            (b, fields, pending)
        }
    };

    // An address outside the list gets the same page, and no mail.
    let (mut stranger, fields, pending) = ask(&mut Browser::new(), "eve@evil.example").await;
    // A listed one gets a code at the SMTP server...
    let (mut carol, carol_fields, carol_pending) =
        ask(&mut Browser::new(), "carol@example.com").await;
    let code = wait_for(
        "the code to arrive by SMTP",
        Duration::from_secs(20),
        || async {
            let mail = smtp.received();
            Ok(mail
                .lines()
                .find_map(|l| l.strip_prefix("Subject: Your code for demo.localhost: "))
                .map(|c| c.trim().to_owned()))
        },
    )
    .await
    .unwrap();
    let mail = smtp.received();
    assert!(mail.contains("carol@example.com"), "{mail}");
    assert!(mail.contains("access@kakuremichi.example"), "{mail}");
    assert!(!mail.contains("eve@evil.example"), "{mail}");
    let refused = stranger
        .post_sign_in_form(
            &stack,
            "/auth/email-code/verify",
            &fields,
            &[("pending", &pending), ("code", &code)],
        )
        .await
        .unwrap();
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{}", refused.body);

    // ...a wrong code is refused, the right one signs her in, once.
    let wrong = if code == "000000" { "000001" } else { "000000" };
    let page = carol
        .post_sign_in_form(
            &stack,
            "/auth/email-code/verify",
            &carol_fields,
            &[("pending", &carol_pending), ("code", wrong)],
        )
        .await
        .unwrap();
    assert_eq!(page.status, StatusCode::UNAUTHORIZED, "{}", page.body);
    assert!(page.body.contains("not right"), "{}", page.body);
    let posted = carol
        .post_sign_in_form(
            &stack,
            "/auth/email-code/verify",
            &carol_fields,
            &[("pending", &carol_pending), ("code", &code)],
        )
        .await
        .unwrap();
    let app = carol.back_to_app(&stack, posted).await.unwrap();
    assert_eq!(app.status, StatusCode::OK, "{}", app.body);
    let app = shown(&app.body);
    assert_eq!(app["verified"], true, "{app:#}");
    assert_eq!(app["claims"]["email"], "carol@example.com");
    assert_eq!(app["claims"]["amr"], json!(["email_code"]));
    let again = Browser::new()
        .post_sign_in_form(
            &stack,
            "/auth/email-code/verify",
            &carol_fields,
            &[("pending", &carol_pending), ("code", &code)],
        )
        .await
        .unwrap();
    assert_ne!(again.status, StatusCode::SEE_OTHER, "a code works once");

    // Control down: her session keeps working.
    stack.stop_control();
    let during = carol
        .go(
            &stack,
            Method::GET,
            &url(&stack, DEMO_HOST, "/headers"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(during.status, StatusCode::OK, "{}", during.body);
    assert!(during.body.contains("carol@example.com"), "{}", during.body);
    stack.start_control_again().await.unwrap();

    // Taken off the list, her session stops at the gateway.
    protect_demo(
        &stack,
        json!({"roles": ["admin"], "email_codes": ["dan@partner.org"]}),
    )
    .await
    .unwrap();
    wait_for(
        "her session to be refused",
        Duration::from_secs(10),
        || async {
            let page = carol.clone().go(&stack, Method::GET, &target, None).await?;
            Ok((page.status == StatusCode::FORBIDDEN).then_some(()))
        },
    )
    .await
    .unwrap();
    let mail = smtp.received();
    assert!(
        !mail.contains("eve@evil.example"),
        "no mail to an unlisted address: {mail}"
    );
}
