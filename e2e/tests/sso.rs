//! Single sign-on end to end, with real parts: an OpenID Provider (npm `oidc-provider` on
//! loopback) signs people in through Debian's Chromium (driven by `playwright-core`) to a resource
//! behind an agent. A user whose groups map to the resource's role reaches it, and the app
//! verifies the signed assertion against the JWKS; a user without the role gets a clear 403 page;
//! a client without a cookie gets 401; a tampered state or nonce is refused with a clear page,
//! logged and audited; an unverified e-mail address never takes over an existing account; and no
//! secret reaches a log line. GitHub sign-in (against a stand-in at a GitHub Enterprise style base
//! URL, as no GitHub is reachable here) maps an organization's team to a role. A passkey added
//! through Chromium's virtual authenticator (CDP WebAuthn) signs its user in alone.

use kakuremichi_e2e::identity::{protect_demo, Browser};
use kakuremichi_e2e::sso::{browse, run_script, FakeGithub, Op};
use kakuremichi_e2e::{Stack, StackOptions, DEMO_HOST};
use reqwest::header::WWW_AUTHENTICATE;
use reqwest::Method;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_sign_in_through_chromium_maps_groups_to_roles_and_refuses_tampering() {
    let stack = Stack::start().await.expect("stack");
    let control = stack.opts.control_url_for_test.clone();
    let op = Op::start(stack.dir.path(), &format!("{control}/auth/sso/op/callback"))
        .await
        .expect("the OpenID Provider");

    // Bad input first: a provider without an issuer, an unknown field.
    for bad in [
        json!({"name": "x", "kind": "oidc", "client_id": "c", "client_secret": "s"}),
        json!({"name": "x", "kind": "oidc", "issuer": op.issuer, "client_id": "c",
               "client_secret": "s", "colour": "blue"}),
        json!({"name": "Not A Slug", "kind": "github", "client_id": "c", "client_secret": "s"}),
    ] {
        let (status, body) = stack
            .api
            .call(Method::POST, "/api/v1/identity-providers", Some(bad))
            .await
            .unwrap();
        assert_eq!(status, 400, "{body}");
        assert!(body["error"]["message"].as_str().is_some(), "{body}");
    }
    let (status, body) = stack
        .api
        .call(
            Method::POST,
            "/api/v1/identity-providers",
            Some(json!({
                "name": "op",
                "kind": "oidc",
                "display_name": "Test OP",
                "issuer": op.issuer,
                "client_id": op.client_id,
                "client_secret": op.client_secret,
                "scopes": ["openid", "email", "profile", "groups"],
                "role_claim": "groups",
                "role_map": {"engineers": ["member"]},
            })),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    assert!(
        !body.to_string().contains(&op.client_secret),
        "the API shows the client secret: {body}"
    );
    // Mallory has a local account; the provider has not verified her address.
    let (status, body) = stack
        .api
        .call(
            Method::POST,
            "/api/v1/users",
            Some(json!({"email": "mallory@example.com", "roles": ["member"]})),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    protect_demo(&stack, json!({"roles": ["member"]}))
        .await
        .unwrap();

    // curl without a cookie: 401 with a challenge.
    let plain = stack
        .request_builder(Method::GET, DEMO_HOST, "/identity")
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 401);
    assert!(plain.headers().contains_key(WWW_AUTHENTICATE));

    let url = format!(
        "http://{DEMO_HOST}:{}/identity",
        stack.opts.gateway_http_for_test.port()
    );
    let run = |login: &str, tamper: Option<&str>| json!({"url": url, "op": op.issuer, "login": login, "tamper": tamper});

    // Alice (group engineers -> member) reaches the app, which verifies her assertion.
    let alice = browse(&run("alice", None)).await.unwrap();
    assert_eq!(alice["status"], 200, "{alice:#}");
    let shown: Value = serde_json::from_str(alice["text"].as_str().unwrap()).unwrap();
    assert_eq!(shown["verified"], true, "{shown:#}");
    let claims = &shown["claims"];
    assert_eq!(claims["email"], "alice@example.com");
    assert_eq!(claims["name"], "Alice Liddell");
    assert_eq!(claims["roles"], json!(["member"]));
    assert_eq!(claims["amr"], json!(["oidc"]));
    assert_eq!(claims["aud"], DEMO_HOST);
    let cookies = alice["cookies"].as_array().unwrap();
    let session = cookies
        .iter()
        .find(|c| c["name"] == "kakuremichi_session")
        .unwrap_or_else(|| panic!("no gateway session cookie: {cookies:?}"));
    assert_eq!(session["domain"], DEMO_HOST);
    assert_eq!(session["httpOnly"], true);
    assert_eq!(session["sameSite"], "Lax");
    // Provisioned at first sign-in, with the mapped role.
    let users = stack.api.get("/api/v1/users").await.unwrap();
    let provisioned = users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["email"] == "alice@example.com")
        .expect("alice provisioned");
    assert_eq!(provisioned["roles"], json!(["member"]));
    assert_eq!(provisioned["has_password"], false);

    // Bob's group maps to no role: a clear 403 page naming him.
    let bob = browse(&run("bob", None)).await.unwrap();
    assert_eq!(bob["status"], 403, "{bob:#}");
    let text = bob["text"].as_str().unwrap();
    assert!(
        text.contains("bob@example.com is signed in, but is not allowed"),
        "{text}"
    );

    // Mallory's unverified address does not take over the local account.
    let mallory = browse(&run("mallory", None)).await.unwrap();
    assert_eq!(mallory["landed"]["status"], 403, "{mallory:#}");
    assert!(
        mallory["landed"]["text"]
            .as_str()
            .unwrap()
            .contains("has not verified that address"),
        "{mallory:#}"
    );
    let sent_to_sign_in = format!("{control}/auth/sign-in?");
    assert!(
        mallory["url"]
            .as_str()
            .unwrap()
            .starts_with(&sent_to_sign_in),
        "{mallory:#}"
    );

    // A tampered state, and a tampered nonce: refused with a clear page.
    let state = browse(&run("alice", Some("state"))).await.unwrap();
    assert_eq!(state["landed"]["status"], 400, "{state:#}");
    assert!(
        state["landed"]["text"]
            .as_str()
            .unwrap()
            .contains("does not belong to this sign-in (state)"),
        "{state:#}"
    );
    let nonce = browse(&run("alice", Some("nonce"))).await.unwrap();
    assert_eq!(nonce["landed"]["status"], 400, "{nonce:#}");
    let text = nonce["landed"]["text"].as_str().unwrap();
    assert!(
        text.contains("did not pass the checks") && text.to_lowercase().contains("nonce"),
        "{text}"
    );
    assert!(
        nonce["url"].as_str().unwrap().starts_with(&sent_to_sign_in),
        "a refused sign-in gave access: {nonce:#}"
    );

    // Each refusal is in the audit log, and in control's log.
    let audit = stack
        .api
        .get("/api/v1/audit?action=sign_in&outcome=denied")
        .await
        .unwrap();
    let details: Vec<String> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["detail"].as_str().map(str::to_owned))
        .collect();
    for want in ["wrong state", "ID token refused", "not verified"] {
        assert!(
            details.iter().any(|d| d.contains(want)),
            "no audit line with {want:?}: {details:?}"
        );
    }
    let oks = stack
        .api
        .get("/api/v1/audit?action=sign_in&outcome=ok")
        .await
        .unwrap();
    assert!(
        oks.as_array()
            .unwrap()
            .iter()
            .any(|e| e["target"] == "alice@example.com" && e["detail"] == "oidc"),
        "{oks:#}"
    );
    let logs = stack.logs_full();
    assert!(logs.contains("single sign-on refused"), "no refusal logged");
    assert!(
        !logs.contains(&op.client_secret),
        "the client secret reached a log line"
    );
    for line in logs.lines() {
        assert!(
            !line.contains("kms_") && !line.contains("code_verifier"),
            "a secret reached a log line: {line}"
        );
    }
}

/// The "Sign in with" link on control's sign-in page, made absolute.
fn sso_link(stack: &Stack, html: &str) -> String {
    let marker = "class=\"sso\" href=\"";
    let start = html
        .find(marker)
        .expect("a sign-in button for the provider")
        + marker.len();
    let end = html[start..].find('"').expect("the link's end") + start;
    format!(
        "{}{}",
        stack.opts.control_url_for_test,
        html[start..end].replace("&amp;", "&")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_sign_in_maps_a_team_to_a_role_at_an_enterprise_base_url() {
    let stack = Stack::start().await.expect("stack");
    let gh = FakeGithub::start().await.unwrap();
    let (status, body) = stack
        .api
        .call(
            Method::POST,
            "/api/v1/identity-providers",
            Some(json!({
                "name": "gh",
                "kind": "github",
                "display_name": "GitHub Enterprise",
                "issuer": gh.base,
                "client_id": gh.client_id,
                "client_secret": gh.client_secret,
                "role_map": {"acme/platform": ["member"], "other-org": ["admin"]},
            })),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        body["scopes"],
        json!(["read:user", "user:email", "read:org"])
    );
    protect_demo(&stack, json!({"roles": ["member"]}))
        .await
        .unwrap();

    let url = format!(
        "http://{DEMO_HOST}:{}/identity",
        stack.opts.gateway_http_for_test.port()
    );
    let mut browser = Browser::new();
    let sign_in = browser.follow(&stack, &url).await.unwrap();
    assert_eq!(sign_in.status, 200, "{}", sign_in.body);
    assert!(sign_in.body.contains("Sign in with GitHub Enterprise"));
    let link = sso_link(&stack, &sign_in.body);

    // A callback with a forged state is refused before the code is used.
    let start = browser.go(&stack, Method::GET, &link, None).await.unwrap();
    assert_eq!(start.status, 303);
    let authorize = start.location.unwrap();
    assert!(authorize.starts_with(&format!("{}/login/oauth/authorize?", gh.base)));
    assert!(authorize.contains("code_challenge_method=S256"));
    let forged = browser
        .go(
            &stack,
            Method::GET,
            &format!(
                "{}/auth/sso/gh/callback?code=stolen&state=forged",
                stack.opts.control_url_for_test
            ),
            None,
        )
        .await
        .unwrap();
    assert_eq!(forged.status, 400, "{}", forged.body);
    assert!(forged.body.contains("(state)"), "{}", forged.body);

    // The whole flow, as a browser follows it.
    let app = browser.follow(&stack, &link).await.unwrap();
    assert_eq!(app.status, 200, "{}", app.body);
    let shown: Value = serde_json::from_str(&app.body).unwrap();
    assert_eq!(shown["verified"], true, "{shown:#}");
    assert_eq!(shown["claims"]["email"], "octocat@example.com");
    assert_eq!(shown["claims"]["name"], "The Octocat");
    assert_eq!(shown["claims"]["roles"], json!(["member"]));
    assert_eq!(shown["claims"]["amr"], json!(["github"]));
    assert!(
        gh.refused.lock().is_empty(),
        "the stand-in refused: {:?}",
        gh.refused.lock()
    );

    // Signing in again finds the same user by GitHub's id, not a second one.
    let mut again = Browser::new();
    let page = again.follow(&stack, &url).await.unwrap();
    let page = again
        .follow(&stack, &sso_link(&stack, &page.body))
        .await
        .unwrap();
    assert_eq!(page.status, 200, "{}", page.body);
    let users = stack.api.get("/api/v1/users").await.unwrap();
    let octos = users
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u["email"] == "octocat@example.com")
        .count();
    assert_eq!(octos, 1, "{users:#}");
    assert!(!stack.logs_full().contains(&gh.client_secret));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passkey_from_chromiums_virtual_authenticator_signs_in_to_a_protected_resource() {
    // Browsers allow WebAuthn on host names only: control's public URL is http://localhost:<port>.
    let mut opts = StackOptions::loopback();
    let public = format!("http://localhost:{}", opts.control_listen.port());
    opts.control_args = vec!["--public-url".into(), public.clone()];
    let stack = Stack::start_with(opts).await.expect("stack");
    let (status, body) = stack
        .api
        .call(
            Method::POST,
            "/api/v1/users",
            Some(
                json!({"email": "pat@example.com", "password": "correct horse battery",
                        "roles": ["member"]}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    protect_demo(&stack, json!({"roles": ["member"]}))
        .await
        .unwrap();
    let url = format!(
        "http://{DEMO_HOST}:{}/identity",
        stack.opts.gateway_http_for_test.port()
    );
    let out = run_script(
        "passkey.mjs",
        &json!({"control": public, "url": url, "email": "pat@example.com",
                "password": "correct horse battery"}),
    )
    .await
    .unwrap();
    assert_eq!(out["added"], "Passkey added.", "{out:#}");
    assert!(
        out["listed"].as_str().unwrap().contains("this device"),
        "{out:#}"
    );
    assert!(
        out["sign_in_url"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{public}/auth/sign-in?")),
        "{out:#}"
    );
    assert_eq!(out["status"], 200, "{out:#}");
    let shown: Value = serde_json::from_str(out["text"].as_str().unwrap()).unwrap();
    assert_eq!(shown["verified"], true, "{shown:#}");
    assert_eq!(shown["claims"]["email"], "pat@example.com");
    assert_eq!(shown["claims"]["amr"], json!(["passkey"]));
    assert!(
        out["account"]
            .as_str()
            .unwrap()
            .contains("signed in with passkey"),
        "{out:#}"
    );
    // The authenticator signed twice at most (no replays), at least once for the sign-in.
    assert!(out["sign_count"][0].as_u64().unwrap() >= 1, "{out:#}");

    // Bad input at the passkey endpoints: no CSRF token, a malformed answer, an unknown
    // challenge: each refused with a clear answer, never a 500.
    let http = kakuremichi_e2e::identity::client();
    let control = &stack.opts.control_url_for_test;
    let r = http
        .post(format!("{control}/auth/passkeys/sign-in/options"))
        .json(&json!({"email": "pat@example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let mut browser = Browser::new();
    let page = browser
        .go(
            &stack,
            Method::GET,
            &format!("{control}/auth/sign-in"),
            None,
        )
        .await
        .unwrap();
    let csrf = kakuremichi_e2e::identity::hidden(&page.body, "csrf").unwrap();
    for (challenge, credential) in [
        ("not-a-uuid", "{}"),
        ("4b7c2b7e-0d0c-4a54-9a8e-1c1f3f0a2b3c", "{\"id\": 5}"),
        (
            "4b7c2b7e-0d0c-4a54-9a8e-1c1f3f0a2b3c",
            "{\"id\":\"AA\",\"rawId\":\"AA\",\"type\":\"public-key\",\"response\":\
             {\"authenticatorData\":\"AA\",\"clientDataJSON\":\"AA\",\"signature\":\"AA\"}}",
        ),
    ] {
        let refused = browser
            .go(
                &stack,
                Method::POST,
                &format!("{control}/auth/passkeys/sign-in"),
                Some(&[
                    ("challenge_id", challenge),
                    ("credential", credential),
                    ("csrf", &csrf),
                ]),
            )
            .await
            .unwrap();
        assert_eq!(refused.status, 401, "{}", refused.body);
        assert!(
            refused.body.contains("the passkey sign-in did not succeed"),
            "{}",
            refused.body
        );
    }
    let audit = stack
        .api
        .get("/api/v1/audit?action=sign_in&outcome=denied")
        .await
        .unwrap();
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["detail"].as_str().unwrap_or("").starts_with("passkey:")),
        "{audit:#}"
    );
}
