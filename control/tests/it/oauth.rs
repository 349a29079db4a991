//! Control as an OAuth 2.1 authorization server for MCP resources, over real HTTP: metadata,
//! dynamic registration, the consent page for a signed-in user, the code exchange with PKCE, and
//! refresh rotation; and the bad input every step must refuse clearly (a wrong PKCE verifier, a
//! redirect URI one character off, a replayed code or refresh token, another resource).

use std::collections::HashMap;

use base64::Engine as _;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use crate::common::{self, ADMIN_KEY};

const RESOURCE: &str = "http://mcp.localhost:8080/mcp";
const REDIRECT: &str = "http://127.0.0.1:9999/callback";
const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";

struct Client {
    base: String,
    http: reqwest::Client,
    jar: HashMap<String, String>,
}

impl Client {
    fn cookies(&self) -> String {
        self.jar
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn send(&mut self, req: reqwest::RequestBuilder) -> (StatusCode, Option<String>, String) {
        let r = req.header(COOKIE, self.cookies()).send().await.unwrap();
        for v in r.headers().get_all(SET_COOKIE) {
            let first = v.to_str().unwrap().split(';').next().unwrap();
            let (k, v) = first.split_once('=').unwrap();
            self.jar.insert(k.to_owned(), v.to_owned());
        }
        let location = r
            .headers()
            .get(LOCATION)
            .map(|l| l.to_str().unwrap().to_owned());
        (r.status(), location, r.text().await.unwrap())
    }

    async fn api(&mut self, method: Method, path: &str, body: Value) -> Value {
        let req = self
            .http
            .request(method, format!("{}/api/v1{path}", self.base))
            .bearer_auth(ADMIN_KEY)
            .json(&body);
        let (status, _, text) = self.send(req).await;
        assert!(status.is_success(), "{path}: {status} {text}");
        serde_json::from_str(&text).unwrap()
    }
}

fn hidden(html: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html
        .find(&marker)
        .unwrap_or_else(|| panic!("no {name} in {html}"))
        + marker.len();
    let end = html[start..].find('"').unwrap() + start;
    html[start..end]
        .replace("&amp;", "&")
        .replace("&quot;", "\"")
}

fn challenge(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

fn query(location: &str) -> HashMap<String, String> {
    url::Url::parse(location)
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The authorization URL's query for `client_id`, with `changes` applied (`None` removes).
fn authorize_query(client_id: &str, changes: &[(&str, Option<&str>)]) -> String {
    let challenge = challenge(VERIFIER);
    let mut params: Vec<(String, String)> = [
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", REDIRECT),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
        ("state", "st4te"),
        ("resource", RESOURCE),
        ("scope", "mcp"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    for (k, v) in changes {
        params.retain(|(pk, _)| pk != k);
        if let Some(v) = v {
            params.push(((*k).to_owned(), (*v).to_owned()));
        }
    }
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish()
}

/// Asks for a code with `changes` to the authorization request and allows it on the consent
/// page; returns the final answer (the redirect to the client, or an error page).
async fn code_with(
    c: &mut Client,
    client_id: &str,
    changes: Vec<(&'static str, Option<&'static str>)>,
) -> (StatusCode, Option<String>, String) {
    let url = format!(
        "{}/oauth/authorize?{}",
        c.base,
        authorize_query(client_id, &changes)
    );
    let (s, to, page) = c.send(c.http.get(&url)).await;
    if s != StatusCode::OK {
        return (s, to, page);
    }
    assert!(page.contains("Test MCP client"), "{page}");
    let mut form = consent_fields(&page);
    form.push(("decision".into(), "allow".into()));
    let req = c
        .http
        .post(format!("{}/oauth/authorize", c.base))
        .form(&form);
    c.send(req).await
}

fn consent_fields(page: &str) -> Vec<(String, String)> {
    [
        "response_type",
        "client_id",
        "redirect_uri",
        "code_challenge",
        "code_challenge_method",
        "state",
        "resource",
        "scope",
        "csrf",
    ]
    .iter()
    .map(|k| ((*k).to_owned(), hidden(page, k)))
    .collect()
}

#[tokio::test]
async fn an_mcp_client_registers_gets_consent_exchanges_a_code_and_rotates_refresh_tokens() {
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
    let base = format!(
        "http://{}",
        common::serve(kakuremichi_control::AppState::new(store.clone())).await
    );
    let mut c = Client {
        base: base.clone(),
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        jar: HashMap::new(),
    };
    // An MCP resource, and a member who may use it.
    let site = c.api(Method::POST, "/sites", json!({"name": "home"})).await;
    c.api(
        Method::POST,
        "/resources",
        json!({"hostname": "mcp.localhost", "site_id": site["id"], "target": "127.0.0.1:1",
               "access": {"roles": ["member"], "mcp": true}}),
    )
    .await;
    c.api(
        Method::POST,
        "/resources",
        json!({"hostname": "plain.localhost", "site_id": site["id"], "target": "127.0.0.1:1",
               "access": {"roles": ["member"]}}),
    )
    .await;
    c.api(
        Method::POST,
        "/users",
        json!({"email": "ann@example.com", "password": "correct horse battery", "roles": ["member"]}),
    )
    .await;

    // Metadata (RFC 8414): PKCE S256 only, registration, iss in responses.
    let (s, _, meta) = c
        .send(
            c.http
                .get(format!("{base}/.well-known/oauth-authorization-server")),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let meta: Value = serde_json::from_str(&meta).unwrap();
    let iss = meta["issuer"].as_str().unwrap().to_owned();
    assert!(iss.starts_with("http://"), "{meta}");
    assert_eq!(meta["code_challenge_methods_supported"], json!(["S256"]));
    assert_eq!(meta["authorization_response_iss_parameter_supported"], true);
    assert_eq!(
        meta["registration_endpoint"],
        format!("{iss}/oauth/register")
    );

    // Registration: public clients with https or loopback redirect URIs.
    for bad in [
        json!({"redirect_uris": ["http://evil.example/cb"]}),
        json!({"redirect_uris": []}),
        json!({"redirect_uris": [REDIRECT], "grant_types": ["client_credentials"]}),
        json!({"redirect_uris": "not a list"}),
    ] {
        let (s, _, e) = c
            .send(c.http.post(format!("{base}/oauth/register")).json(&bad))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {e}");
        assert!(e.contains("\"error\""), "{e}");
    }
    let (s, _, reg) = c
        .send(c.http.post(format!("{base}/oauth/register")).json(&json!({
            "redirect_uris": [REDIRECT], "client_name": "Test MCP client",
            "token_endpoint_auth_method": "none", "application_type": "native"
        })))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{reg}");
    let reg: Value = serde_json::from_str(&reg).unwrap();
    let client_id = reg["client_id"].as_str().unwrap().to_owned();
    assert_eq!(reg["token_endpoint_auth_method"], "none");

    // Not signed in: sent to sign in, then back to the request.
    let authorize = format!(
        "{base}/oauth/authorize?{}",
        authorize_query(&client_id, &[])
    );
    let (s, to, _) = c.send(c.http.get(&authorize)).await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert_eq!(to.as_deref(), Some("/auth/sign-in"));
    let (_, _, form) = c.send(c.http.get(format!("{base}/auth/sign-in"))).await;
    let csrf = hidden(&form, "csrf");
    let (s, to, body) = c
        .send(c.http.post(format!("{base}/auth/sign-in")).form(&[
            ("email", "ann@example.com"),
            ("password", "correct horse battery"),
            ("csrf", csrf.as_str()),
        ]))
        .await;
    assert_eq!(s, StatusCode::SEE_OTHER, "{body}");
    let back = to.unwrap();
    assert!(back.starts_with("/oauth/authorize?"), "{back}");

    // A code, through the consent page, for each case below.
    let token = |form: Vec<(&'static str, String)>| {
        let (http, base) = (reqwest::Client::new(), base.clone());
        async move {
            let r = http
                .post(format!("{base}/oauth/token"))
                .form(&form)
                .send()
                .await
                .unwrap();
            let s = r.status();
            let v: Value = r.json().await.unwrap();
            (s, v)
        }
    };
    let exchange = |code: String, changes: Vec<(&'static str, &'static str)>| {
        let mut form = vec![
            ("grant_type", "authorization_code".to_owned()),
            ("code", code),
            ("code_verifier", VERIFIER.to_owned()),
            ("redirect_uri", REDIRECT.to_owned()),
            ("client_id", client_id.clone()),
            ("resource", RESOURCE.to_owned()),
        ];
        for (k, v) in changes {
            form.retain(|(fk, _)| *fk != k);
            form.push((k, v.to_owned()));
        }
        token(form)
    };

    let (s, to, _) = code_with(&mut c, &client_id, vec![]).await;
    assert_eq!(s, StatusCode::FOUND);
    let q = query(to.as_deref().unwrap());
    assert!(to.unwrap().starts_with(REDIRECT));
    assert_eq!(q["state"], "st4te");
    assert_eq!(q["iss"], iss.as_str());
    let (s, tokens) = exchange(q["code"].clone(), vec![]).await;
    assert_eq!(s, StatusCode::OK, "{tokens}");
    assert_eq!(tokens["token_type"], "Bearer");
    let access = tokens["access_token"].as_str().unwrap();
    let header = jsonwebtoken::decode_header(access).unwrap();
    assert_eq!(header.typ.as_deref(), Some("at+jwt"));
    let payload: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(access.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(payload["aud"], RESOURCE, "audience-bound: {payload}");
    assert_eq!(payload["client_id"], client_id.as_str());
    assert_eq!(payload["email"], "ann@example.com");
    assert_eq!(payload["scope"], "mcp");
    assert_eq!(payload["amr"], json!(["oauth"]));
    let grant = payload["sid"].as_str().unwrap().to_owned();

    // A replayed code is refused and revokes what it issued.
    let (s, e) = exchange(q["code"].clone(), vec![]).await;
    assert_eq!(
        (s, e["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant")),
        "{e}"
    );
    assert!(
        e["error_description"]
            .as_str()
            .unwrap()
            .contains("already used"),
        "{e}"
    );
    assert!(store
        .grant_revoked(uuid::Uuid::parse_str(&grant).unwrap())
        .await
        .unwrap());
    let (s, e) = token(vec![
        ("grant_type", "refresh_token".into()),
        (
            "refresh_token",
            tokens["refresh_token"].as_str().unwrap().into(),
        ),
        ("client_id", client_id.clone()),
    ])
    .await;
    assert_eq!(
        (s, e["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant")),
        "{e}"
    );

    // A wrong verifier, a redirect URI one character off, another resource: each refused.
    for (changes, error) in [
        (
            vec![(
                "code_verifier",
                "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXK",
            )],
            "invalid_grant",
        ),
        (
            vec![("redirect_uri", "http://127.0.0.1:9999/callbacK")],
            "invalid_grant",
        ),
        (
            vec![("resource", "http://plain.localhost:8080/mcp")],
            "invalid_target",
        ),
        (
            vec![("client_id", "00000000-0000-0000-0000-000000000000")],
            "invalid_grant",
        ),
    ] {
        let (_, to, _) = code_with(&mut c, &client_id, vec![]).await;
        let code = query(&to.unwrap())["code"].clone();
        let (s, e) = exchange(code, changes.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{changes:?}: {e}");
        assert_eq!(e["error"], error, "{changes:?}: {e}");
    }

    // Refresh tokens rotate; the old one, used again, revokes the grant.
    let (_, to, _) = code_with(&mut c, &client_id, vec![]).await;
    let (_, first) = exchange(query(&to.unwrap())["code"].clone(), vec![]).await;
    let refresh = |rt: &str| {
        token(vec![
            ("grant_type", "refresh_token".to_owned()),
            ("refresh_token", rt.to_owned()),
            ("client_id", client_id.clone()),
            ("resource", RESOURCE.to_owned()),
        ])
    };
    let old = first["refresh_token"].as_str().unwrap().to_owned();
    let (s, second) = refresh(&old).await;
    assert_eq!(s, StatusCode::OK, "{second}");
    assert_ne!(second["refresh_token"], first["refresh_token"]);
    let (s, e) = refresh(&old).await;
    assert_eq!(
        (s, e["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant")),
        "{e}"
    );
    let (s, e) = refresh(second["refresh_token"].as_str().unwrap()).await;
    assert_eq!(
        (s, e["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant")),
        "the whole grant is revoked: {e}"
    );

    // At the authorization endpoint: a redirect URI one character off is a page (nothing goes
    // to it); the rest go back to the client with an error.
    let (s, to, page) = code_with(
        &mut c,
        &client_id,
        vec![("redirect_uri", Some("http://127.0.0.1:9999/callbac"))],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{page}");
    assert!(to.is_none());
    assert!(page.contains("did not register"), "{page}");
    let (s, _, page) = code_with(&mut c, &client_id, vec![("client_id", Some("nope"))]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{page}");
    for (changes, error) in [
        (
            vec![("code_challenge_method", Some("plain"))],
            "invalid_request",
        ),
        (vec![("code_challenge", None)], "invalid_request"),
        (
            vec![("resource", Some("http://plain.localhost:8080/mcp"))],
            "invalid_target",
        ),
        (vec![("resource", None)], "invalid_target"),
        (
            vec![("response_type", Some("token"))],
            "unsupported_response_type",
        ),
    ] {
        let (s, to, page) = code_with(&mut c, &client_id, changes.clone()).await;
        assert_eq!(s, StatusCode::FOUND, "{changes:?}: {page}");
        let q = query(&to.unwrap());
        assert_eq!(q["error"], error, "{changes:?}");
        assert_eq!(q["state"], "st4te");
    }
    // Denying consent.
    let url = format!(
        "{base}/oauth/authorize?{}",
        authorize_query(&client_id, &[])
    );
    let (_, _, page) = c.send(c.http.get(&url)).await;
    let mut form = consent_fields(&page);
    form.push(("decision".into(), "deny".into()));
    let (s, to, _) = c
        .send(c.http.post(format!("{base}/oauth/authorize")).form(&form))
        .await;
    assert_eq!(s, StatusCode::FOUND);
    assert_eq!(query(&to.unwrap())["error"], "access_denied");
    // A consent form without its CSRF token.
    form.retain(|(k, _)| k != "csrf");
    let (s, _, _) = c
        .send(c.http.post(format!("{base}/oauth/authorize")).form(&form))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}
