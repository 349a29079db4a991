//! The admin web UI over real HTTP: set-up and sign-in journeys into it, pages that act through
//! the API as the signed-in user (their roles, the API's validation and audit), CSRF on every
//! form, the CSP on every page, markup in names shown as text.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{self, hidden, Client, ADMIN_KEY};

async fn start() -> (Client, common::TestDb) {
    let db = common::sqlite().await;
    let store =
        db.store
            .clone()
            .with_sealer(std::sync::Arc::new(kakuremichi_control::seal::Sealer::new(
                [5; 32],
            )));
    store
        .ensure_admin_key(Some(&kakuremichi_proto::Secret::new(ADMIN_KEY)))
        .await
        .unwrap();
    store.ensure_signing_key().await.unwrap();
    let state = kakuremichi_control::AppState::new(store);
    let c = Client {
        base: format!("http://{}", common::serve(state).await),
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        jar: Default::default(),
    };
    (c, db)
}

fn fresh(c: &Client) -> Client {
    Client {
        base: c.base.clone(),
        http: c.http.clone(),
        jar: Default::default(),
    }
}

async fn get(c: &mut Client, path: &str) -> (StatusCode, Option<String>, String) {
    let url = format!("{}{path}", c.base);
    c.send(c.http.get(url)).await
}

async fn post(
    c: &mut Client,
    path: &str,
    form: &[(&str, &str)],
) -> (StatusCode, Option<String>, String) {
    let url = format!("{}{path}", c.base);
    c.send(c.http.post(url).form(form)).await
}

/// Sets up the owner through `/setup` as a browser does; the browser is signed in after.
async fn set_up_owner(c: &mut Client) {
    let (s, to, _) = get(c, "/ui").await;
    assert_eq!((s, to.as_deref()), (StatusCode::SEE_OTHER, Some("/setup")));
    let (s, _, page) = get(c, "/setup").await;
    assert_eq!(s, StatusCode::OK);
    let csrf = hidden(&page, "csrf");
    let (s, to, body) = post(
        c,
        "/setup",
        &[
            ("admin_key", ADMIN_KEY),
            ("email", "owner@example.com"),
            ("name", "Owner"),
            ("password", "correct horse battery"),
            ("csrf", &csrf),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER, "{body}");
    assert_eq!(to.as_deref(), Some("/ui"), "set-up lands in the console");
}

async fn sign_in(c: &mut Client, email: &str) -> (StatusCode, Option<String>) {
    let (_, _, page) = get(c, "/auth/sign-in").await;
    let csrf = hidden(&page, "csrf");
    let (s, to, _) = post(
        c,
        "/auth/sign-in",
        &[
            ("email", email),
            ("password", "correct horse battery"),
            ("csrf", &csrf),
        ],
    )
    .await;
    (s, to)
}

#[tokio::test]
async fn a_new_control_sends_the_browser_to_set_up_then_sign_in_brings_it_back_to_the_page() {
    let (mut c, _db) = start().await;
    let (s, to, _) = get(&mut c, "/").await;
    assert_eq!((s, to.as_deref()), (StatusCode::SEE_OTHER, Some("/ui")));
    set_up_owner(&mut c).await;
    let r = c
        .http
        .get(format!("{}/ui", c.base))
        .header(reqwest::header::COOKIE, c.cookies())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["content-security-policy"],
        kakuremichi_control::ui::CSP
    );
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    let page = r.text().await.unwrap();
    assert!(!page.contains("<script>"), "no inline script: {page}");
    assert!(!page.contains("style="), "no inline style: {page}");
    for link in ["/ui/sites", "/ui/gateways", "/ui/resources", "/ui/audit"] {
        assert!(page.contains(&format!("href=\"{link}\"")), "{link}: {page}");
    }
    for asset in ["/ui/app.css", "/ui/app.js"] {
        let (s, _, body) = get(&mut c, asset).await;
        assert_eq!(s, StatusCode::OK);
        assert!(body.len() > 500, "{asset}");
    }

    // Another browser, not signed in: to the sign-in page, then back to where it was going.
    let mut other = fresh(&c);
    let (s, to, _) = get(&mut other, "/ui/resources?q=x").await;
    assert_eq!(
        (s, to.as_deref()),
        (StatusCode::SEE_OTHER, Some("/auth/sign-in"))
    );
    let (s, to) = sign_in(&mut other, "owner@example.com").await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert_eq!(to.as_deref(), Some("/ui/resources?q=x"));
    let (s, _, page) = get(&mut other, "/ui/resources?q=x").await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("No resource matches"), "{page}");
}

#[tokio::test]
async fn pages_act_through_the_api_as_the_signed_in_user_with_csrf_and_escaping() {
    let (mut c, _db) = start().await;
    set_up_owner(&mut c).await;
    let (_, _, page) = get(&mut c, "/ui/sites").await;
    assert!(page.contains("No site yet"), "an empty state: {page}");
    let csrf = hidden(&page, "csrf");

    // Without the CSRF token: refused, nothing made.
    let (s, _, body) = post(&mut c, "/ui/sites", &[("name", "sneaky")]).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    let (s, _, body) = post(&mut c, "/ui/sites", &[("name", "sneaky"), ("csrf", "x")]).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    let sites = c.api(Method::GET, "/sites", Value::Null).await;
    assert_eq!(sites, json!([]));

    // Bad input: the API's message beside the field, what was typed kept.
    let (s, _, page) = post(&mut c, "/ui/sites", &[("name", "  "), ("csrf", &csrf)]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(page.contains("name must not be empty"), "{page}");
    assert!(page.contains("aria-invalid=\"true\""), "{page}");

    // A name that is markup is text; the page shows the one-line install once.
    let name = "<script>alert(1)</script>";
    let (s, _, page) = post(&mut c, "/ui/sites", &[("name", name), ("csrf", &csrf)]).await;
    assert_eq!(s, StatusCode::CREATED, "{page}");
    assert!(!page.contains(name), "{page}");
    assert!(page.contains("<h1>&lt;script&gt;alert(1)&lt;"), "{page}");
    assert!(
        page.replace("&#x2f;", "/").contains(&format!(
            "curl -fsSL {}/install.sh | sh -s -- --token kme_",
            c.base
        )),
        "{page}"
    );
    assert!(
        page.contains("systemctl enable --now kakuremichi-agent"),
        "{page}"
    );
    let site = c.api(Method::GET, "/sites", Value::Null).await[0].clone();
    let site_id = site["id"].as_str().unwrap().to_owned();
    let (s, _, page) = get(&mut c, &format!("/ui/sites/{site_id}")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        !page.contains("--token"),
        "the token is shown only once: {page}"
    );
    assert!(page.contains(&format!("data-live=\"{site_id}\"")), "{page}");

    // A resource: a bad target is refused with the API's words beside its field.
    let (_, _, page) = get(&mut c, "/ui/resources").await;
    assert!(page.contains("href=\"/ui/resources/new\""), "{page}");
    let (_, _, page) = get(&mut c, "/ui/resources/new").await;
    let form = |target: &'static str| {
        let (csrf, site_id) = (csrf.clone(), site_id.clone());
        move || {
            vec![
                ("csrf", csrf.clone()),
                ("hostname", "app.example.com".to_owned()),
                ("site_id", site_id.clone()),
                ("target", target.to_owned()),
            ]
        }
    };
    assert!(page.contains("Create resource"), "{page}");
    let bad = form("not a target")();
    let bad: Vec<(&str, &str)> = bad.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (s, _, page) = post(&mut c, "/ui/resources", &bad).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("id=\"error-target\""), "{page}");
    assert!(page.contains("value=\"app.example.com\""), "kept: {page}");
    let good = form("127.0.0.1:8080")();
    let good: Vec<(&str, &str)> = good.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (s, to, page) = post(&mut c, "/ui/resources", &good).await;
    assert_eq!(s, StatusCode::SEE_OTHER, "{page}");
    let to = to.unwrap();
    assert!(to.starts_with("/ui/resources/"), "{to}");
    let (s, _, page) = get(&mut c, &to).await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("app.example.com"), "{page}");

    // The API audited the changes as the user, through the web session.
    let audit = c.api(Method::GET, "/audit?action=POST*", Value::Null).await;
    let actors: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["actor"].as_str().unwrap())
        .collect();
    assert!(
        actors
            .iter()
            .any(|a| a.starts_with("user:") && a.contains(" web-session:")),
        "{audit}"
    );
    let (s, _, page) = get(&mut c, "/ui/audit?action=POST*").await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("POST /api/v1/resources"), "{page}");
    let (s, _, page) = get(&mut c, "/ui/audit?since=yesterday").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(page.contains("role=\"alert\""), "{page}");

    // Deleting asks first, names what goes with it, and needs the token.
    let (s, _, page) = get(&mut c, &format!("/ui/sites/{site_id}/delete")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("app.example.com"), "{page}");
    let (s, _, _) = post(&mut c, &format!("/ui/sites/{site_id}/delete"), &[]).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, to, _) = post(
        &mut c,
        &format!("/ui/sites/{site_id}/delete"),
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(
        (s, to.as_deref()),
        (StatusCode::SEE_OTHER, Some("/ui/sites"))
    );
    assert_eq!(c.api(Method::GET, "/sites", Value::Null).await, json!([]));
    assert_eq!(
        c.api(Method::GET, "/resources", Value::Null).await,
        json!([])
    );
}

#[tokio::test]
async fn a_user_sees_and_does_only_what_their_roles_give() {
    let (mut c, _db) = start().await;
    set_up_owner(&mut c).await;
    c.api(Method::POST, "/sites", json!({"name": "home"})).await;
    c.api(
        Method::POST,
        "/roles",
        json!({"name": "visitor", "permissions": ["resource:access"]}),
    )
    .await;
    for (email, role) in [("vi@example.com", "viewer"), ("me@example.com", "visitor")] {
        c.api(
            Method::POST,
            "/users",
            json!({"email": email, "password": "correct horse battery", "roles": [role]}),
        )
        .await;
    }
    // A viewer reads the fleet, cannot change it, and never sees the audit log.
    let mut viewer = fresh(&c);
    sign_in(&mut viewer, "vi@example.com").await;
    let (s, _, page) = get(&mut viewer, "/ui").await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("href=\"/ui/sites\""), "{page}");
    assert!(!page.contains("href=\"/ui/audit\""), "{page}");
    let (s, _, page) = get(&mut viewer, "/ui/sites").await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("home"), "{page}");
    assert!(!page.contains("Create site"), "{page}");
    let csrf = hidden(&page, "csrf");
    let (s, _, page) = post(
        &mut viewer,
        "/ui/sites",
        &[("name", "mine"), ("csrf", &csrf)],
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{page}");
    assert!(page.contains("site:write"), "the API's reason: {page}");
    let (s, _, _) = get(&mut viewer, "/ui/audit").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // A visitor (reaches resources, reads nothing): no fleet in the navigation.
    let mut member = fresh(&c);
    sign_in(&mut member, "me@example.com").await;
    let (s, _, page) = get(&mut member, "/ui").await;
    assert_eq!(s, StatusCode::OK);
    assert!(!page.contains("href=\"/ui/sites\""), "{page}");
    let (s, _, _) = get(&mut member, "/ui/sites").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Sign-out ends the UI too.
    let (_, _, page) = get(&mut member, "/ui").await;
    let csrf = hidden(&page, "csrf");
    post(&mut member, "/auth/sign-out", &[("csrf", &csrf)]).await;
    let (s, to, _) = get(&mut member, "/ui").await;
    assert_eq!(
        (s, to.as_deref()),
        (StatusCode::SEE_OTHER, Some("/auth/sign-in"))
    );
}

#[tokio::test]
async fn users_are_made_disabled_and_enabled_and_a_resource_is_protected_from_its_page() {
    let (mut c, _db) = start().await;
    set_up_owner(&mut c).await;
    let (s, _, page) = get(&mut c, "/ui/users").await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("owner@example.com"), "{page}");
    let csrf = hidden(&page, "csrf");

    // Bad input: the API's message, what was typed and ticked kept.
    let (s, _, page) = post(
        &mut c,
        "/ui/users",
        &[
            ("csrf", &csrf),
            ("email", "not-an-address"),
            ("role", "viewer"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("value=\"not-an-address\""), "{page}");
    assert!(page.contains("value=\"viewer\" checked"), "{page}");
    // Two roles, from repeated checkboxes.
    let (s, to, page) = post(
        &mut c,
        "/ui/users",
        &[
            ("csrf", &csrf),
            ("email", "ann@example.com"),
            ("password", "correct horse battery"),
            ("role", "member"),
            ("role", "viewer"),
        ],
    )
    .await;
    assert_eq!(
        (s, to.as_deref()),
        (StatusCode::SEE_OTHER, Some("/ui/users")),
        "{page}"
    );
    let users = c.api(Method::GET, "/users?q=ann", Value::Null).await;
    let ann = users[0].clone();
    let mut roles: Vec<&str> = ann["roles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    roles.sort_unstable();
    assert_eq!(roles, ["member", "viewer"]);
    let ann_id = ann["id"].as_str().unwrap().to_owned();
    let state_path = format!("/ui/users/{ann_id}/state");
    let (s, _, _) = post(&mut c, &state_path, &[("disabled", "true")]).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "no CSRF token");
    let (s, _, _) = post(
        &mut c,
        &state_path,
        &[("csrf", &csrf), ("disabled", "true")],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let ann = c
        .api(Method::GET, &format!("/users/{ann_id}"), Value::Null)
        .await;
    assert_eq!(ann["disabled"], true);
    let mut as_ann = fresh(&c);
    let (s, _) = sign_in(&mut as_ann, "ann@example.com").await;
    assert_ne!(s, StatusCode::SEE_OTHER, "a disabled user cannot sign in");
    let (s, _, _) = post(
        &mut c,
        &state_path,
        &[("csrf", &csrf), ("disabled", "false")],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let ann = c
        .api(Method::GET, &format!("/users/{ann_id}"), Value::Null)
        .await;
    assert_eq!(ann["disabled"], false);

    // A resource's access, from its page: sign-in with roles and domains, then public again.
    let site = c.api(Method::POST, "/sites", json!({"name": "home"})).await;
    let r = c
        .api(
            Method::POST,
            "/resources",
            json!({"hostname": "app.example.com", "site_id": site["id"], "target": "127.0.0.1:1"}),
        )
        .await;
    let id = r["id"].as_str().unwrap();
    let (_, _, page) = get(&mut c, &format!("/ui/resources/{id}")).await;
    assert!(page.contains("Who may reach it"), "{page}");
    assert!(page.contains("value=\"public\" checked"), "{page}");
    let access = format!("/ui/resources/{id}/access");
    let (s, _, _) = post(&mut c, &access, &[("mode", "sign-in")]).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "no CSRF token");
    let (s, to, _) = post(
        &mut c,
        &access,
        &[
            ("csrf", &csrf),
            ("mode", "sign-in"),
            ("role", "member"),
            ("email_domains", "example.com, corp.example"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert_eq!(to.as_deref(), Some(format!("/ui/resources/{id}").as_str()));
    let r = c
        .api(Method::GET, &format!("/resources/{id}"), Value::Null)
        .await;
    assert_eq!(r["access"]["roles"], json!(["member"]));
    assert_eq!(
        r["access"]["email_domains"],
        json!(["example.com", "corp.example"])
    );
    let (_, _, page) = get(&mut c, &format!("/ui/resources/{id}")).await;
    assert!(page.contains("value=\"sign-in\" checked"), "{page}");
    assert!(page.contains("value=\"member\" checked"), "{page}");
    let (s, _, _) = post(&mut c, &access, &[("csrf", &csrf), ("mode", "public")]).await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let r = c
        .api(Method::GET, &format!("/resources/{id}"), Value::Null)
        .await;
    assert!(r["access"].is_null(), "{r}");
}

#[tokio::test]
async fn a_single_sign_on_provider_is_added_from_its_page_and_deleted_after_confirming() {
    let (mut c, _db) = start().await;
    set_up_owner(&mut c).await;
    let (s, _, page) = get(&mut c, "/ui/providers").await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("No provider yet"), "{page}");
    let csrf = hidden(&page, "csrf");
    let mut form = vec![
        ("csrf", csrf.as_str()),
        ("kind", "oidc"),
        ("name", "corp"),
        ("display_name", "Corp SSO"),
        ("issuer", "https://id.example.com/realms/main"),
        ("client_id", "kakuremichi"),
        ("client_secret", "s3cret-value"),
        ("role_claim", "groups"),
        ("role_map", "engineers = member, viewer\nbroken line"),
        ("default_role", "viewer"),
        ("auto_provision", "on"),
    ];
    // A role map line without `=`: its line number, and everything typed kept (not the secret).
    let (s, _, page) = post(&mut c, "/ui/providers", &form).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("role map, line 2"), "{page}");
    assert!(
        page.contains("value=\"https://id.example.com/realms/main\""),
        "{page}"
    );
    assert!(!page.contains("s3cret-value"), "{page}");
    form[8] = ("role_map", "engineers = member, viewer\n\nops = admin");
    let (s, to, page) = post(&mut c, "/ui/providers", &form).await;
    assert_eq!(
        (s, to.as_deref()),
        (StatusCode::SEE_OTHER, Some("/ui/providers")),
        "{page}"
    );
    let list = c.api(Method::GET, "/identity-providers", Value::Null).await;
    assert_eq!(
        list[0]["role_map"]["engineers"],
        json!(["member", "viewer"])
    );
    assert_eq!(list[0]["role_map"]["ops"], json!(["admin"]));
    assert_eq!(list[0]["default_roles"], json!(["viewer"]));
    let (_, _, page) = get(&mut c, "/ui/providers").await;
    assert!(
        page.contains(&format!("{}/auth/sso/corp/callback", c.base)),
        "{page}"
    );
    assert!(!page.contains("s3cret-value"), "{page}");
    let id = list[0]["id"].as_str().unwrap();
    let (s, _, page) = get(&mut c, &format!("/ui/providers/{id}/delete")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("Delete provider corp"), "{page}");
    let (s, to, _) = post(
        &mut c,
        &format!("/ui/providers/{id}/delete"),
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(
        (s, to.as_deref()),
        (StatusCode::SEE_OTHER, Some("/ui/providers"))
    );
    assert_eq!(
        c.api(Method::GET, "/identity-providers", Value::Null).await,
        json!([])
    );
}

#[tokio::test]
async fn an_api_key_is_made_on_its_page_shown_once_and_revoked_after_confirming() {
    let (mut c, _db) = start().await;
    set_up_owner(&mut c).await;
    let (s, _, page) = get(&mut c, "/ui/keys").await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("admin key (every permission)"), "{page}");
    let csrf = hidden(&page, "csrf");
    let (s, _, _) = post(
        &mut c,
        "/ui/keys",
        &[("name", "ci"), ("scope", "site:read")],
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "no CSRF token");

    // Bad input: the API's message (or the page's own), what was typed and ticked kept.
    let (s, _, page) = post(&mut c, "/ui/keys", &[("csrf", &csrf), ("name", "ci")]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("give at least one permission"), "{page}");
    assert!(page.contains("value=\"ci\""), "{page}");
    let (s, _, page) = post(
        &mut c,
        "/ui/keys",
        &[
            ("csrf", &csrf),
            ("name", "ci"),
            ("scope", "site:read"),
            ("expires_in_days", "soon"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("is not a number of days"), "{page}");
    assert!(page.contains("value=\"site:read\" checked"), "{page}");

    // A personal key: its secret on the answer, once, and it works.
    let (s, _, page) = post(
        &mut c,
        "/ui/keys",
        &[
            ("csrf", &csrf),
            ("name", "ci"),
            ("kind", "personal"),
            ("scope", "site:read"),
            ("scope", "resource:read"),
            ("expires_in_days", "30"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{page}");
    let start = page.find("kmk_").expect("the secret on the page");
    let secret: String = page[start..]
        .chars()
        .take_while(|ch| ch.is_ascii_alphanumeric() || *ch == '_' || *ch == '-')
        .collect();
    let sites = c
        .http
        .get(format!("{}/api/v1/sites", c.base))
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap();
    assert_eq!(sites.status(), StatusCode::OK);
    let (_, _, page) = get(&mut c, "/ui/keys").await;
    assert!(!page.contains(&secret), "the secret is shown again");
    assert!(page.contains("personal: owner@example.com (you)"), "{page}");
    assert!(page.contains("site:read, resource:read"), "{page}");
    // A service token.
    let (s, _, page) = post(
        &mut c,
        "/ui/keys",
        &[
            ("csrf", &csrf),
            ("name", "deploy-bot"),
            ("kind", "service"),
            ("scope", "resource:write"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{page}");
    let keys = c.api(Method::GET, "/api-keys", Value::Null).await;
    let bot = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "deploy-bot")
        .unwrap();
    assert!(bot.get("user_id").is_none(), "{bot}");
    let ci = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "ci")
        .unwrap();
    let id = ci["id"].as_str().unwrap();

    // Revoked after confirming: refused from then on.
    let (s, _, page) = get(&mut c, &format!("/ui/keys/{id}/revoke")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("Revoke API key ci"), "{page}");
    let (s, _, _) = post(&mut c, &format!("/ui/keys/{id}/revoke"), &[]).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "no CSRF token");
    let (s, to, _) = post(&mut c, &format!("/ui/keys/{id}/revoke"), &[("csrf", &csrf)]).await;
    assert_eq!(
        (s, to.as_deref()),
        (StatusCode::SEE_OTHER, Some("/ui/keys"))
    );
    let sites = c
        .http
        .get(format!("{}/api/v1/sites", c.base))
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap();
    assert_eq!(sites.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn agent_sessions_are_listed_shared_and_stopped_from_their_page() {
    let (mut c, db) = start().await;
    set_up_owner(&mut c).await;
    let (_, _, page) = get(&mut c, "/ui/sessions").await;
    assert!(page.contains("No agent session yet"), "{page}");
    assert!(page.contains("--sessions-hostname"), "{page}");
    let csrf = hidden(&page, "csrf");
    let site = c
        .api(Method::POST, "/sites", json!({"name": "dev-box"}))
        .await;
    let owner = c.api(Method::GET, "/users?q=owner", Value::Null).await[0]["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let session = db
        .store
        .create_agent_session(
            kakuremichi_control::store::NewAgentSession {
                org_id: kakuremichi_control::store::DEFAULT_ORG,
                user_id: Some(owner),
                scope: "user".into(),
                team_id: None,
                site_id: site["id"].as_str().unwrap().parse().unwrap(),
                tags: [("description".to_owned(), "fix <the> build".to_owned())].into(),
                params: json!({"agent_type": "claude"}),
                ttl_secs: None,
            },
            &Default::default(),
        )
        .await
        .unwrap();
    let id = session.id;
    let (s, _, page) = get(&mut c, "/ui/sessions").await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("fix &lt;the&gt; build"), "{page}");
    assert!(page.contains("dev-box"), "site named: {page}");
    assert!(page.contains(&format!("data-session=\"{id}\"")), "{page}");
    assert!(page.contains("data-sessions=\"live\""), "{page}");
    assert!(!page.contains("Revoke share link"), "{page}");

    // Its status stream, as the page's script reads it.
    let events = c
        .send_raw(c.http.get(format!("{}/ui/sessions/events", c.base)))
        .await;
    assert_eq!(events.status(), StatusCode::OK);
    assert_eq!(
        events.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    drop(events);

    // A read-only share link: shown, then revoked.
    let share = format!("/ui/sessions/{id}/share");
    let (s, _, _) = post(&mut c, &share, &[]).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "no CSRF token");
    let (s, _, page) = post(&mut c, &share, &[("csrf", &csrf)]).await;
    assert_eq!(s, StatusCode::OK, "{page}");
    assert!(page.contains("/s/kms_"), "{page}");
    assert!(page.contains("Revoke share link"), "{page}");
    let (s, to, _) = post(&mut c, &share, &[("csrf", &csrf), ("revoke", "1")]).await;
    assert_eq!(
        (s, to.as_deref()),
        (StatusCode::SEE_OTHER, Some("/ui/sessions"))
    );
    let (_, _, page) = get(&mut c, "/ui/sessions").await;
    assert!(!page.contains("Revoke share link"), "{page}");

    // Stopped after confirming.
    let (s, _, page) = get(&mut c, &format!("/ui/sessions/{id}/stop")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains(&format!("Stop session {id}")), "{page}");
    let (s, to, _) = post(
        &mut c,
        &format!("/ui/sessions/{id}/stop"),
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(
        (s, to.as_deref()),
        (StatusCode::SEE_OTHER, Some("/ui/sessions"))
    );
    let stopped = db
        .store
        .agent_session(kakuremichi_control::store::DEFAULT_ORG, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stopped.status, "stopped");
    let (_, _, page) = get(&mut c, "/ui/sessions").await;
    assert!(!page.contains("data-sessions=\"live\""), "{page}");
}

#[tokio::test]
async fn a_custom_role_is_made_changed_and_deleted_from_its_page() {
    let (mut c, _db) = start().await;
    set_up_owner(&mut c).await;
    let (s, _, page) = get(&mut c, "/ui/roles").await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("(built in)"), "{page}");
    let csrf = hidden(&page, "csrf");
    let (s, _, _) = post(&mut c, "/ui/roles", &[("name", "auditor")]).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "no CSRF token");
    // Bad input: the API's message, what was typed and ticked kept.
    let (s, _, page) = post(
        &mut c,
        "/ui/roles",
        &[
            ("csrf", &csrf),
            ("name", "Not A Name"),
            ("description", "reads the log"),
            ("permission", "audit:read"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("field-error"), "{page}");
    assert!(page.contains("value=\"reads the log\""), "{page}");
    assert!(page.contains("value=\"audit:read\" checked"), "{page}");
    let (s, to, page) = post(
        &mut c,
        "/ui/roles",
        &[
            ("csrf", &csrf),
            ("name", "auditor"),
            ("description", "reads the log"),
            ("permission", "audit:read"),
        ],
    )
    .await;
    assert_eq!(
        (s, to.as_deref()),
        (StatusCode::SEE_OTHER, Some("/ui/roles")),
        "{page}"
    );
    let role = c.api(Method::GET, "/roles/auditor", Value::Null).await;
    assert_eq!(role["permissions"], json!(["audit:read"]));
    // Changed from its own page.
    let (s, _, page) = get(&mut c, "/ui/roles/auditor").await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("value=\"audit:read\" checked"), "{page}");
    let (s, to, _) = post(
        &mut c,
        "/ui/roles/auditor",
        &[
            ("csrf", &csrf),
            ("description", "reads the log and users"),
            ("permission", "audit:read"),
            ("permission", "user:read"),
        ],
    )
    .await;
    assert_eq!(
        (s, to.as_deref()),
        (StatusCode::SEE_OTHER, Some("/ui/roles"))
    );
    let role = c.api(Method::GET, "/roles/auditor", Value::Null).await;
    assert_eq!(role["permissions"], json!(["audit:read", "user:read"]));
    // A built-in role shows what it gives, with no form.
    let (_, _, page) = get(&mut c, "/ui/roles/owner").await;
    assert!(!page.contains("Save role"), "{page}");
    // Deleted after confirming.
    let (s, _, page) = get(&mut c, "/ui/roles/auditor/delete").await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("Delete role auditor"), "{page}");
    let (s, to, _) = post(&mut c, "/ui/roles/auditor/delete", &[("csrf", &csrf)]).await;
    assert_eq!(
        (s, to.as_deref()),
        (StatusCode::SEE_OTHER, Some("/ui/roles"))
    );
    let roles = c.api(Method::GET, "/roles", Value::Null).await;
    assert!(
        !roles
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "auditor"),
        "{roles}"
    );
}

#[tokio::test]
async fn an_access_policy_gets_ordered_rules_from_its_editor_and_a_resource_follows_it() {
    let (mut c, _db) = start().await;
    set_up_owner(&mut c).await;
    let (s, _, page) = get(&mut c, "/ui/policies").await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("No access policy yet"), "{page}");
    let csrf = hidden(&page, "csrf");
    let (s, _, page) = post(&mut c, "/ui/policies", &[("csrf", &csrf), ("name", "")]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("field-error"), "{page}");
    let (s, to, _) = post(
        &mut c,
        "/ui/policies",
        &[("csrf", &csrf), ("name", "staff")],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let at = to.unwrap();
    assert!(at.starts_with("/ui/policies/"), "{at}");
    let id = at.trim_start_matches("/ui/policies/").to_owned();
    let (s, _, page) = get(&mut c, &at).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        page.contains("No rule: every request needs sign-in"),
        "{page}"
    );

    // Editor buttons redraw the form, unsaved; what was typed stays.
    let rule =
        |action: &'static str, paths: &'static str, methods: &'static str, cidrs: &'static str| {
            [
                ("rule_action", action),
                ("rule_paths", paths),
                ("rule_methods", methods),
                ("rule_cidrs", cidrs),
            ]
        };
    let mut form: Vec<(&str, &str)> = vec![
        ("csrf", &csrf),
        ("name", "staff"),
        ("role", "member"),
        ("email_domains", "example.com"),
    ];
    form.extend(rule("allow", "/hooks/*", "post", ""));
    form.extend(rule("deny", "/admin/*", "", "10.0.0.0/8"));
    form.push(("op", "add"));
    let (s, _, page) = post(&mut c, &at, &form).await;
    assert_eq!(s, StatusCode::OK, "{page}");
    assert!(page.contains("not saved yet"), "{page}");
    assert!(page.contains("Rule 3: action"), "{page}");
    assert!(page.contains("value=\"/admin/*\""), "{page}");
    let saved = c
        .api(Method::GET, &format!("/policies/{id}"), Value::Null)
        .await;
    assert!(saved["access"].get("rules").is_none(), "not saved: {saved}");
    form.pop();
    form.push(("op", "up:1"));
    let (_, _, page) = post(&mut c, &at, &form).await;
    let first = page.find("value=\"/admin/*\"").unwrap();
    let second = page.find("value=\"/hooks/*\"").unwrap();
    assert!(first < second, "moved up");

    // A bad address range: the API's message, the form as typed (in the order now shown).
    form.truncate(4);
    form.extend(rule("deny", "/admin/*", "", "10.0.0.0/99"));
    form.extend(rule("allow", "/hooks/*", "post", ""));
    let (s, _, page) = post(&mut c, &at, &form).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("field-error"), "{page}");
    assert!(page.contains("value=\"10.0.0.0/99\""), "{page}");
    // Saved: the rules in the order shown.
    form[7] = ("rule_cidrs", "10.0.0.0/8");
    let (s, to, page) = post(&mut c, &at, &form).await;
    assert_eq!(
        (s, to.as_deref()),
        (StatusCode::SEE_OTHER, Some(at.as_str())),
        "{page}"
    );
    let saved = c
        .api(Method::GET, &format!("/policies/{id}"), Value::Null)
        .await;
    assert_eq!(saved["access"]["roles"], json!(["member"]));
    assert_eq!(saved["access"]["email_domains"], json!(["example.com"]));
    assert_eq!(
        saved["access"]["rules"],
        json!([
            {"action": "deny", "paths": ["/admin/*"], "cidrs": ["10.0.0.0/8"]},
            {"action": "allow", "paths": ["/hooks/*"], "methods": ["POST"]},
        ])
    );

    // A resource follows it from the resource's page; the policy cannot go while it does.
    let site = c.api(Method::POST, "/sites", json!({"name": "home"})).await;
    let r = c
        .api(
            Method::POST,
            "/resources",
            json!({"hostname": "app.example.com", "site_id": site["id"], "target": "127.0.0.1:1"}),
        )
        .await;
    let rid = r["id"].as_str().unwrap();
    let (_, _, page) = get(&mut c, &format!("/ui/resources/{rid}")).await;
    assert!(
        page.contains(&format!("<option value=\"{id}\">staff</option>")),
        "{page}"
    );
    let (s, _, _) = post(
        &mut c,
        &format!("/ui/resources/{rid}/access"),
        &[("csrf", &csrf), ("mode", "public"), ("policy", &id)],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let r = c
        .api(Method::GET, &format!("/resources/{rid}"), Value::Null)
        .await;
    assert_eq!(r["policy_id"], json!(id));
    let (s, _, page) = post(&mut c, &format!("{at}/delete"), &[("csrf", &csrf)]).await;
    assert!(s.is_client_error(), "{s}: {page}");
    let (s, _, _) = post(
        &mut c,
        &format!("/ui/resources/{rid}/access"),
        &[("csrf", &csrf), ("mode", "public"), ("policy", "")],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let (s, _, page) = get(&mut c, &format!("{at}/delete")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("Delete policy staff"), "{page}");
    let (s, to, _) = post(&mut c, &format!("{at}/delete"), &[("csrf", &csrf)]).await;
    assert_eq!(
        (s, to.as_deref()),
        (StatusCode::SEE_OTHER, Some("/ui/policies"))
    );
}

#[tokio::test]
async fn the_resource_form_publishes_tcp_and_balanced_http_with_checks_and_limits() {
    let (mut c, _db) = start().await;
    set_up_owner(&mut c).await;
    let home = c.api(Method::POST, "/sites", json!({"name": "home"})).await;
    c.api(Method::POST, "/sites", json!({"name": "backup"}))
        .await;
    let home_id = home["id"].as_str().unwrap().to_owned();
    let (s, _, page) = get(&mut c, "/ui/resources/new").await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("value=\"udp\""), "{page}");
    let csrf = hidden(&page, "csrf");

    // A word where the port goes: said beside the port, everything typed kept.
    let mut form = vec![
        ("csrf", csrf.as_str()),
        ("protocol", "tcp"),
        ("public_port", "ssh"),
        ("site_id", home_id.as_str()),
        ("target", "127.0.0.1:22"),
        ("health_check", "on"),
        ("hc_interval", "1000"),
        ("idle_timeout", "600000"),
        ("proxy_protocol", "on"),
    ];
    let (s, _, page) = post(&mut c, "/ui/resources", &form).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("id=\"error-public_port\""), "{page}");
    assert!(
        page.contains("&quot;ssh&quot; is not a whole number"),
        "{page}"
    );
    assert!(page.contains("value=\"tcp\" checked"), "{page}");
    assert!(page.contains("value=\"127.0.0.1:22\""), "{page}");
    // The API's own refusal, beside its field (a health check timeout longer than its interval).
    form[2] = ("public_port", "2222");
    form.push(("hc_timeout", "5000"));
    let (s, _, page) = post(&mut c, "/ui/resources", &form).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("id=\"error-"), "{page}");
    assert!(page.contains("timeout_ms"), "{page}");
    form.pop();
    let (s, to, page) = post(&mut c, "/ui/resources", &form).await;
    assert_eq!(s, StatusCode::SEE_OTHER, "{page}");
    let id = to.unwrap().trim_start_matches("/ui/resources/").to_owned();
    let r = c
        .api(Method::GET, &format!("/resources/{id}"), Value::Null)
        .await;
    assert_eq!(r["protocol"], "tcp", "{r}");
    assert_eq!(r["public_port"], 2222, "{r}");
    assert_eq!(r["health_check"]["interval_ms"], 1000, "{r}");
    assert_eq!(r["limits"]["idle_timeout_ms"], 600000, "{r}");

    // HTTP over two sites, the busiest target avoided, a health check on a path.
    let (s, to, page) = post(
        &mut c,
        "/ui/resources",
        &[
            ("csrf", &csrf),
            ("protocol", "http"),
            ("hostname", "app.example.com"),
            ("site_id", &home_id),
            ("target", "127.0.0.1:8080"),
            ("more_targets", "backup 127.0.0.1:8080"),
            ("balance", "least_outstanding"),
            ("sticky", "on"),
            ("health_check", "on"),
            ("hc_path", "/healthz"),
            ("max_body", "1048576"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER, "{page}");
    let id = to.unwrap().trim_start_matches("/ui/resources/").to_owned();
    let r = c
        .api(Method::GET, &format!("/resources/{id}"), Value::Null)
        .await;
    assert_eq!(r["balance"], "least_outstanding", "{r}");
    assert_eq!(r["sticky"], true, "{r}");
    assert_eq!(r["health_check"]["path"], "/healthz", "{r}");
    assert_eq!(r["limits"]["max_request_body_bytes"], 1048576, "{r}");
    assert_eq!(r["targets"].as_array().map(Vec::len), Some(2), "{r}");
}

#[tokio::test]
async fn a_resource_becomes_an_mcp_server_from_its_page_and_the_mcp_page_lists_it() {
    let (mut c, _db) = start().await;
    set_up_owner(&mut c).await;
    let (s, _, page) = get(&mut c, "/ui/mcp").await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("No MCP server yet"), "{page}");
    assert!(page.contains("No client holds access yet"), "{page}");
    let csrf = hidden(&page, "csrf");
    let site = c.api(Method::POST, "/sites", json!({"name": "home"})).await;
    let r = c
        .api(
            Method::POST,
            "/resources",
            json!({"hostname": "tools.example.com", "site_id": site["id"], "target": "127.0.0.1:1"}),
        )
        .await;
    let id = r["id"].as_str().unwrap();
    let (s, _, _) = post(
        &mut c,
        &format!("/ui/resources/{id}/access"),
        &[
            ("csrf", &csrf),
            ("mode", "sign-in"),
            ("role", "member"),
            ("mcp", "on"),
            ("api_keys", "on"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let r = c
        .api(Method::GET, &format!("/resources/{id}"), Value::Null)
        .await;
    assert_eq!(r["access"]["mcp"], true, "{r}");
    assert_eq!(r["access"]["api_keys"], true, "{r}");
    let (_, _, page) = get(&mut c, &format!("/ui/resources/{id}")).await;
    assert!(page.contains("name=\"mcp\" checked"), "{page}");
    let (_, _, page) = get(&mut c, "/ui/mcp").await;
    assert!(page.contains("https://tools.example.com/"), "{page}");
    assert!(page.contains("roles member"), "{page}");
    // Unticked: no longer an MCP server.
    let (s, _, _) = post(
        &mut c,
        &format!("/ui/resources/{id}/access"),
        &[("csrf", &csrf), ("mode", "sign-in"), ("role", "member")],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let r = c
        .api(Method::GET, &format!("/resources/{id}"), Value::Null)
        .await;
    assert!(r["access"].get("mcp").is_none(), "{r}");
    // A grant that is not there: a clear 404 page.
    let (s, _, page) = get(
        &mut c,
        &format!("/ui/mcp/grants/{}/revoke", uuid::Uuid::new_v4()),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{page}");
}

#[tokio::test]
async fn a_certificate_is_uploaded_listed_with_its_expiry_and_deleted_after_confirming() {
    let (mut c, _db) = start().await;
    set_up_owner(&mut c).await;
    let (s, _, page) = get(&mut c, "/ui/certificates").await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("No certificate yet"), "{page}");
    let csrf = hidden(&page, "csrf");
    // No ACME CA here: the API says so, in the ACME form, the names kept.
    let (s, _, page) = post(
        &mut c,
        "/ui/certificates",
        &[
            ("csrf", &csrf),
            ("kind", "acme"),
            ("names", "app.example.com"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("id=\"acme-error\""), "{page}");
    assert!(page.contains("no ACME CA configured"), "{page}");
    assert!(page.contains("value=\"app.example.com\""), "{page}");
    // A broken upload: the upload form's message.
    let (s, _, page) = post(
        &mut c,
        "/ui/certificates",
        &[
            ("csrf", &csrf),
            ("kind", "upload"),
            ("chain_pem", "nope"),
            ("key_pem", "nope"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("id=\"upload-error\""), "{page}");
    let made = rcgen::generate_simple_self_signed(vec!["up.example.com".to_owned()]).unwrap();
    let key = made.signing_key.serialize_pem();
    let (s, to, page) = post(
        &mut c,
        "/ui/certificates",
        &[
            ("csrf", &csrf),
            ("kind", "upload"),
            ("chain_pem", &made.cert.pem()),
            ("key_pem", &key),
        ],
    )
    .await;
    assert_eq!(
        (s, to.as_deref()),
        (StatusCode::SEE_OTHER, Some("/ui/certificates")),
        "{page}"
    );
    let (_, _, page) = get(&mut c, "/ui/certificates").await;
    assert!(page.contains("up.example.com"), "{page}");
    assert!(page.contains("days left"), "{page}");
    assert!(!page.contains("PRIVATE KEY"), "the key is never shown");
    let certs = c.api(Method::GET, "/certificates", Value::Null).await;
    let id = certs[0]["id"].as_str().unwrap();
    let (s, _, page) = get(&mut c, &format!("/ui/certificates/{id}/delete")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        page.contains("Delete certificate for up.example.com"),
        "{page}"
    );
    let (s, to, _) = post(
        &mut c,
        &format!("/ui/certificates/{id}/delete"),
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(
        (s, to.as_deref()),
        (StatusCode::SEE_OTHER, Some("/ui/certificates"))
    );
    assert_eq!(
        c.api(Method::GET, "/certificates", Value::Null).await,
        json!([])
    );
}

#[tokio::test]
async fn a_share_link_is_made_on_its_resources_page_shown_once_and_revoked() {
    let (mut c, _db) = start().await;
    set_up_owner(&mut c).await;
    let site = c.api(Method::POST, "/sites", json!({"name": "home"})).await;
    let r = c
        .api(
            Method::POST,
            "/resources",
            json!({"hostname": "docs.example.com", "site_id": site["id"], "target": "127.0.0.1:1",
                   "access": {"roles": ["member"]}}),
        )
        .await;
    let id = r["id"].as_str().unwrap();
    let at = format!("/ui/resources/{id}");
    let (_, _, page) = get(&mut c, &at).await;
    assert!(page.contains("Make a share link"), "{page}");
    let csrf = hidden(&page, "csrf");
    let links = format!("{at}/share-links");
    let (s, _, _) = post(&mut c, &links, &[("name", "x")]).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "no CSRF token");
    let (s, _, page) = post(
        &mut c,
        &links,
        &[
            ("csrf", &csrf),
            ("name", "for bob"),
            ("expires_in_hours", "soon"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("is not a number of hours"), "{page}");
    let (s, _, page) = post(
        &mut c,
        &links,
        &[
            ("csrf", &csrf),
            ("name", "for bob"),
            ("expires_in_hours", "48"),
            ("max_uses", "3"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{page}");
    assert!(
        page.contains("https://docs.example.com/.kakuremichi/auth/share/"),
        "{page}"
    );
    let made = c
        .api(
            Method::GET,
            &format!("/resources/{id}/share-links"),
            Value::Null,
        )
        .await;
    assert_eq!(made[0]["name"], "for bob");
    assert_eq!(made[0]["max_uses"], 3);
    let link = made[0]["id"].as_str().unwrap();
    let (_, _, page) = get(&mut c, &at).await;
    assert!(page.contains("0 of 3"), "{page}");
    assert!(
        !page.contains("/.kakuremichi/auth/share/"),
        "shown once: {page}"
    );
    let revoke = format!("{links}/{link}/revoke");
    let (s, _, page) = get(&mut c, &revoke).await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("Revoke share link"), "{page}");
    let (s, to, _) = post(&mut c, &revoke, &[("csrf", &csrf)]).await;
    assert_eq!(
        (s, to.as_deref()),
        (StatusCode::SEE_OTHER, Some(at.as_str()))
    );
    let made = c
        .api(
            Method::GET,
            &format!("/resources/{id}/share-links"),
            Value::Null,
        )
        .await;
    assert!(made[0]["revoked_at"].is_string(), "{made}");
}

#[tokio::test]
async fn a_gateway_is_made_from_its_page_shown_how_to_run_given_a_new_token_and_deleted() {
    let (mut c, _db) = start().await;
    set_up_owner(&mut c).await;
    let (s, _, page) = get(&mut c, "/ui/gateways").await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("New gateway"), "{page}");
    let csrf = hidden(&page, "csrf");
    let (s, _, _) = post(&mut c, "/ui/gateways", &[("name", "edge-1")]).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "no CSRF token");
    let (s, _, page) = post(
        &mut c,
        "/ui/gateways",
        &[
            ("csrf", &csrf),
            ("name", " "),
            ("endpoint", "gw.example.com:51820"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("id=\"gateway-error\""), "{page}");
    assert!(page.contains("value=\"gw.example.com:51820\""), "{page}");
    let (s, _, page) = post(
        &mut c,
        "/ui/gateways",
        &[
            ("csrf", &csrf),
            ("name", "edge-1"),
            ("endpoint", "gw.example.com:51820"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{page}");
    assert!(page.contains("kakuremichi-gateway --control"), "{page}");
    assert!(page.contains("KAKUREMICHI_GATEWAY_TOKEN="), "{page}");
    assert!(page.contains("open UDP 51820"), "{page}");
    assert!(
        page.contains("/download/kakuremichi-gateway-linux-$(uname -m)"),
        "{page}"
    );
    let gws = c.api(Method::GET, "/gateways", Value::Null).await;
    let id = gws[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(gws[0]["endpoint"], "gw.example.com:51820");
    // Its page later: no token.
    let at = format!("/ui/gateways/{id}");
    let (s, _, page) = get(&mut c, &at).await;
    assert_eq!(s, StatusCode::OK);
    assert!(!page.contains("--token"), "{page}");
    let (s, _, page) = post(&mut c, &format!("{at}/token"), &[("csrf", &csrf)]).await;
    assert_eq!(s, StatusCode::OK, "{page}");
    assert!(page.contains("--token kme_"), "{page}");
    let (s, _, page) = get(&mut c, &format!("{at}/delete")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("Delete gateway edge-1"), "{page}");
    let (s, to, _) = post(&mut c, &format!("{at}/delete"), &[("csrf", &csrf)]).await;
    assert_eq!(
        (s, to.as_deref()),
        (StatusCode::SEE_OTHER, Some("/ui/gateways"))
    );
    assert_eq!(
        c.api(Method::GET, "/gateways", Value::Null).await,
        json!([])
    );
}

#[tokio::test]
async fn a_member_makes_and_revokes_their_own_key_and_changes_their_password_on_the_account_page() {
    let (mut c, _db) = start().await;
    set_up_owner(&mut c).await;
    c.api(
        Method::POST,
        "/users",
        json!({"email": "mia@example.com", "password": "correct horse battery", "roles": ["member"]}),
    )
    .await;
    // A service token has no "me".
    let token = c
        .api(
            Method::POST,
            "/api-keys",
            json!({"name": "bot", "scopes": ["site:read"], "service": true}),
        )
        .await;
    let r = c
        .http
        .get(format!("{}/api/v1/me", c.base))
        .bearer_auth(token["secret"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "{}",
        r.text().await.unwrap()
    );
    let mut mia = fresh(&c);
    sign_in(&mut mia, "mia@example.com").await;
    let (s, _, page) = get(&mut mia, "/ui/account").await;
    assert_eq!(s, StatusCode::OK, "{page}");
    assert!(page.contains("mia@example.com"), "{page}");
    assert!(page.contains("<dd>member</dd>"), "{page}");
    let csrf = hidden(&page, "csrf");

    // Her own key: shown once, acting with her roles only.
    let (s, _, _) = post(&mut mia, "/ui/account/keys", &[("name", "laptop")]).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "no CSRF token");
    let (s, _, page) = post(
        &mut mia,
        "/ui/account/keys",
        &[
            ("csrf", &csrf),
            ("name", "laptop"),
            ("expires_in_days", "30"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{page}");
    let start = page.find("kmk_").expect("the secret on the page");
    let secret: String = page[start..]
        .chars()
        .take_while(|ch| ch.is_ascii_alphanumeric() || *ch == '_' || *ch == '-')
        .collect();
    let with_key = |method: Method, path: &str| {
        c.http
            .request(method, format!("{}/api/v1{path}", c.base))
            .bearer_auth(&secret)
            .json(&json!({"name": "nope"}))
            .send()
    };
    assert_eq!(
        with_key(Method::GET, "/sites").await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(
        with_key(Method::POST, "/sites").await.unwrap().status(),
        StatusCode::FORBIDDEN,
        "a member's key cannot create sites"
    );
    let (_, _, page) = get(&mut mia, "/ui/account").await;
    assert!(!page.contains(&secret), "shown once");
    let keys = with_key(Method::GET, "/me/api-keys")
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let id = keys[0]["id"].as_str().unwrap().to_owned();
    let (s, _, page) = get(&mut mia, &format!("/ui/account/keys/{id}/revoke")).await;
    assert_eq!(s, StatusCode::OK, "{page}");
    let (s, to, _) = post(
        &mut mia,
        &format!("/ui/account/keys/{id}/revoke"),
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(
        (s, to.as_deref()),
        (StatusCode::SEE_OTHER, Some("/ui/account"))
    );
    assert_eq!(
        with_key(Method::GET, "/sites").await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );

    // Her password: the current one first; then the new one signs her in.
    let (s, _, page) = post(
        &mut mia,
        "/ui/account/password",
        &[
            ("csrf", &csrf),
            ("current_password", "wrong wrong wrong"),
            ("new_password", "staple battery horse"),
            ("repeat_password", "staple battery horse"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{page}");
    assert!(page.contains("that is not your password"), "{page}");
    let (s, _, page) = post(
        &mut mia,
        "/ui/account/password",
        &[
            ("csrf", &csrf),
            ("current_password", "correct horse battery"),
            ("new_password", "staple battery horse"),
            ("repeat_password", "staple battery hose"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("differ"), "{page}");
    let (s, _, page) = post(
        &mut mia,
        "/ui/account/password",
        &[
            ("csrf", &csrf),
            ("current_password", "correct horse battery"),
            ("new_password", "staple battery horse"),
            ("repeat_password", "staple battery horse"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{page}");
    assert!(page.contains("Your password is changed"), "{page}");
    let mut again = fresh(&c);
    let (_, _, login) = get(&mut again, "/auth/sign-in").await;
    let csrf2 = hidden(&login, "csrf");
    let (_, _, page) = post(
        &mut again,
        "/auth/sign-in",
        &[
            ("email", "mia@example.com"),
            ("password", "staple battery horse"),
            ("csrf", &csrf2),
        ],
    )
    .await;
    assert!(
        page.contains("You are signed in as mia@example.com"),
        "{page}"
    );
}

#[tokio::test]
async fn an_installed_site_is_revoked_after_confirming_and_a_new_install_command_brings_it_back() {
    let (mut c, _db) = start().await;
    set_up_owner(&mut c).await;
    let site = c.api(Method::POST, "/sites", json!({"name": "home"})).await;
    let id = site["id"].as_str().unwrap().to_owned();
    let r = c
        .http
        .post(format!("{}/api/v1/enroll", c.base))
        .json(&json!({
            "protocol_version": 1,
            "kind": "agent",
            "token": site["enrollment_token"],
            "public_key": kakuremichi_proto::WgPublicKey([7; 32]).to_base64(),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let at = format!("/ui/sites/{id}");
    let (_, _, page) = get(&mut c, &at).await;
    assert!(page.contains("Revoke site…"), "{page}");
    let csrf = hidden(&page, "csrf");
    let (s, _, page) = get(&mut c, &format!("{at}/revoke")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("Revoke site home"), "{page}");
    let (s, _, _) = post(&mut c, &format!("{at}/revoke"), &[]).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "no CSRF token");
    let (s, to, _) = post(&mut c, &format!("{at}/revoke"), &[("csrf", &csrf)]).await;
    assert_eq!(
        (s, to.as_deref()),
        (StatusCode::SEE_OTHER, Some(at.as_str()))
    );
    let now = c
        .api(Method::GET, &format!("/sites/{id}"), Value::Null)
        .await;
    assert_eq!(now["enrolled"], false, "{now}");
    let (_, _, page) = get(&mut c, &at).await;
    assert!(!page.contains("Revoke site…"), "{page}");
    let (s, _, page) = post(&mut c, &format!("{at}/token"), &[("csrf", &csrf)]).await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("--token kme_"), "{page}");
}
