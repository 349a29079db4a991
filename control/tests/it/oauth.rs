//! Control as an OAuth 2.1 authorization server for MCP resources, over real HTTP: metadata,
//! dynamic registration, the consent page for a signed-in user, the code exchange with PKCE, and
//! refresh rotation; and the bad input every step must refuse clearly (a wrong PKCE verifier, a
//! redirect URI one character off, a replayed code or refresh token, another resource).

use std::collections::HashMap;

use base64::Engine as _;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use crate::common::{self, hidden, Client, ADMIN_KEY};

const RESOURCE: &str = "http://mcp.localhost:8080/mcp";
const REDIRECT: &str = "http://127.0.0.1:9999/callback";
const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";

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

/// Control on a new SQLite store (admin and signing keys made) serving `state(store)`: an MCP
/// resource (`mcp.localhost`), a plain protected one (`plain.localhost`), and Ann, a member.
async fn setup(
    state: impl FnOnce(kakuremichi_control::store::Store) -> kakuremichi_control::AppState,
) -> (Client, kakuremichi_control::store::Store, common::TestDb) {
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
    let base = format!("http://{}", common::serve(state(store.clone())).await);
    let mut c = Client {
        base,
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        jar: HashMap::new(),
    };
    let site = c.api(Method::POST, "/sites", json!({"name": "home"})).await;
    for (host, mcp) in [("mcp.localhost", true), ("plain.localhost", false)] {
        c.api(
            Method::POST,
            "/resources",
            json!({"hostname": host, "site_id": site["id"], "target": "127.0.0.1:1",
                   "access": {"roles": ["member"], "mcp": mcp}}),
        )
        .await;
    }
    c.api(
        Method::POST,
        "/users",
        json!({"email": "ann@example.com", "password": "correct horse battery", "roles": ["member"]}),
    )
    .await;
    (c, store, db)
}

/// The claims of a JWT, unverified.
fn payload(jwt: &str) -> Value {
    let part = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn an_mcp_client_registers_gets_consent_exchanges_a_code_and_rotates_refresh_tokens() {
    let (mut c, store, _db) = setup(kakuremichi_control::AppState::new).await;
    let base = c.base.clone();

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
    let payload = payload(access);
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
    ] {
        let (_, to, _) = code_with(&mut c, &client_id, vec![]).await;
        let code = query(&to.unwrap())["code"].clone();
        let (s, e) = exchange(code, changes.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{changes:?}: {e}");
        assert_eq!(e["error"], error, "{changes:?}: {e}");
    }
    // A client control does not know: invalid_client (RFC 6749 §5.2).
    let (_, to, _) = code_with(&mut c, &client_id, vec![]).await;
    let code = query(&to.unwrap())["code"].clone();
    let (s, e) = exchange(
        code,
        vec![("client_id", "00000000-0000-0000-0000-000000000000")],
    )
    .await;
    assert_eq!(
        (s, e["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_client")),
        "{e}"
    );

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
    // Administrators see each live grant (who let which client reach what) and revoke one.
    let (_, to, _) = code_with(&mut c, &client_id, vec![]).await;
    let (_, third) = exchange(query(&to.unwrap())["code"].clone(), vec![]).await;
    let sid = self::payload(third["access_token"].as_str().unwrap())["sid"]
        .as_str()
        .unwrap()
        .to_owned();
    let grants = c
        .api(Method::GET, "/resources/oauth-grants", Value::Null)
        .await;
    let grant = grants
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["id"] == sid.as_str())
        .unwrap_or_else(|| panic!("{grants}"))
        .clone();
    assert_eq!(grant["user_email"], "ann@example.com");
    assert_eq!(grant["resource"], RESOURCE);
    assert!(grant["client_name"].as_str().is_some_and(|n| !n.is_empty()));
    let replayed = self::payload(first["access_token"].as_str().unwrap())["sid"].clone();
    assert!(
        !grants
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["id"] == replayed),
        "a grant revoked by a replay is not listed: {grants}"
    );
    let revoke = |path: String| {
        c.http
            .delete(format!("{base}/api/v1{path}"))
            .bearer_auth(ADMIN_KEY)
            .send()
    };
    let r = revoke(format!("/resources/oauth-grants/{sid}"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let (s, e) = refresh(third["refresh_token"].as_str().unwrap()).await;
    assert_eq!(
        (s, e["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant")),
        "a revoked grant refreshes nothing: {e}"
    );
    let r = revoke(format!("/resources/oauth-grants/{sid}"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let grants = c
        .api(Method::GET, "/resources/oauth-grants", Value::Null)
        .await;
    assert!(
        !grants
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["id"] == sid.as_str()),
        "{grants}"
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

/// An https server on loopback for client metadata documents: `path -> (status, headers, body)`,
/// counting the requests per path. Returns its port and the CA that signed its certificate.
async fn document_server(
    routes: impl Fn(u16, &str) -> (u16, Vec<(&'static str, String)>, String) + Send + Sync + 'static,
) -> (
    u16,
    reqwest::Certificate,
    std::sync::Arc<parking_lot::Mutex<HashMap<String, usize>>>,
) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = std::sync::Arc::new(parking_lot::Mutex::new(HashMap::new()));
    let (routes, counted) = (std::sync::Arc::new(routes), hits.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, routes, hits) = (acceptor.clone(), routes.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                *hits.lock().entry(path.clone()).or_insert(0) += 1;
                let (status, headers, body) = routes(port, &path);
                let mut out = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n",
                    body.len()
                );
                for (k, v) in headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str("\r\n");
                out.push_str(&body);
                let _ = tls.write_all(out.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (
        port,
        reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap(),
        hits,
    )
}

#[tokio::test]
async fn an_mcp_client_known_by_its_metadata_document_authorizes_without_registering() {
    use kakuremichi_control::client_metadata::{ClientMetadata, Reach};

    let (port, ca, hits) = document_server(|port, path| {
        let me = format!("https://127.0.0.1:{port}{path}");
        let doc = |id: &str| {
            json!({"client_id": id, "client_name": "Test MCP client", "redirect_uris": [REDIRECT],
                   "token_endpoint_auth_method": "none", "application_type": "native"})
            .to_string()
        };
        let json_type = ("content-type", "application/json".to_owned());
        match path {
            "/client.json" => (
                200,
                vec![json_type, ("cache-control", "max-age=3600".into())],
                doc(&me),
            ),
            "/impostor.json" => (
                200,
                vec![json_type],
                doc(&format!("https://127.0.0.1:{port}/client.json")),
            ),
            "/huge.json" => (200, vec![json_type], " ".repeat(100 * 1024) + &doc(&me)),
            "/moved.json" => (
                302,
                vec![("location", format!("https://127.0.0.1:{port}/client.json"))],
                String::new(),
            ),
            "/secret.json" => (
                200,
                vec![json_type],
                json!({"client_id": me, "redirect_uris": [REDIRECT], "client_secret": "s3cret"})
                    .to_string(),
            ),
            _ => (404, vec![], "not found".into()),
        }
    })
    .await;

    // This control fetches from any address (the document server is on loopback) and trusts the
    // server's CA; a default one (public addresses only) shares the store.
    let (mut c, store, _db) = setup(|store| {
        let mut state = kakuremichi_control::AppState::new(store);
        state.client_metadata = std::sync::Arc::new(
            ClientMetadata::new(Reach::Any, std::slice::from_ref(&ca)).unwrap(),
        );
        state
    })
    .await;
    let base = c.base.clone();
    let public_only = format!(
        "http://{}",
        common::serve(kakuremichi_control::AppState::new(store.clone())).await
    );
    let (_, _, meta) = c
        .send(
            c.http
                .get(format!("{base}/.well-known/oauth-authorization-server")),
        )
        .await;
    let meta: Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(
        meta["client_id_metadata_document_supported"], true,
        "{meta}"
    );
    let (_, _, form) = c.send(c.http.get(format!("{base}/auth/sign-in"))).await;
    let csrf = hidden(&form, "csrf");
    let (s, _, body) = c
        .send(c.http.post(format!("{base}/auth/sign-in")).form(&[
            ("email", "ann@example.com"),
            ("password", "correct horse battery"),
            ("csrf", csrf.as_str()),
        ]))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");

    // The URL is the client: no registration, the consent page says who publishes it.
    let client_id = format!("https://127.0.0.1:{port}/client.json");
    let url = format!(
        "{base}/oauth/authorize?{}",
        authorize_query(&client_id, &[])
    );
    let (s, _, page) = c.send(c.http.get(&url)).await;
    assert_eq!(s, StatusCode::OK, "{page}");
    assert!(page.contains("published by <b>127.0.0.1</b>"), "{page}");
    assert!(page.contains("a program on this computer"), "{page}");
    let (s, to, page) = code_with(&mut c, &client_id, vec![]).await;
    assert_eq!(s, StatusCode::FOUND, "{page}");
    let code = query(to.as_deref().unwrap())["code"].clone();
    let exchange = |code: String, client: String| {
        let (http, base) = (reqwest::Client::new(), base.clone());
        async move {
            let r = http
                .post(format!("{base}/oauth/token"))
                .form(&[
                    ("grant_type", "authorization_code"),
                    ("code", code.as_str()),
                    ("code_verifier", VERIFIER),
                    ("redirect_uri", REDIRECT),
                    ("client_id", client.as_str()),
                    ("resource", RESOURCE),
                ])
                .send()
                .await
                .unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let (s, tokens) = exchange(code, client_id.clone()).await;
    assert_eq!(s, StatusCode::OK, "{tokens}");
    let payload = payload(tokens["access_token"].as_str().unwrap());
    assert_eq!(payload["client_id"], client_id.as_str(), "{payload}");
    assert_eq!(payload["aud"], RESOURCE);
    // The document was fetched once: max-age keeps it.
    assert_eq!(hits.lock().get("/client.json"), Some(&1));

    // A code is the client's: another URL, or no such client, gets nothing.
    let (_, to, _) = code_with(&mut c, &client_id, vec![]).await;
    let code = query(to.as_deref().unwrap())["code"].clone();
    let (s, e) = exchange(code, format!("https://127.0.0.1:{port}/never-seen.json")).await;
    assert_eq!(
        (s, e["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_client")),
        "{e}"
    );

    // A redirect URI the document does not list: a page, nothing sent to it.
    let (s, to, page) = code_with(
        &mut c,
        &client_id,
        vec![("redirect_uri", Some("http://127.0.0.1:9999/callbac"))],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{page}");
    assert!(to.is_none());

    // Documents that do not hold: each a clear page, never a redirect.
    for (path, says) in [
        ("/impostor.json", "is not the URL it is published at"),
        ("/huge.json", "larger than 64 KiB"),
        ("/moved.json", "redirects are not followed"),
        ("/secret.json", "client secret"),
        ("/missing.json", "404"),
        ("/", "needs a path"),
    ] {
        let id = format!("https://127.0.0.1:{port}{path}");
        let url = format!("{base}/oauth/authorize?{}", authorize_query(&id, &[]));
        let (s, to, page) = c.send(c.http.get(&url)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path}: {page}");
        assert!(to.is_none(), "{path}");
        assert!(page.contains(says), "{path}: {page}");
    }
    // Plain http is not a document URL, and is no registered client either.
    let id = format!("http://127.0.0.1:{port}/client.json");
    let url = format!("{base}/oauth/authorize?{}", authorize_query(&id, &[]));
    let (s, _, page) = c.send(c.http.get(&url)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("not registered"), "{page}");

    // A control with the default reach does not fetch from loopback at all.
    let hits_before = hits.lock().values().sum::<usize>();
    c.base = public_only.clone();
    let url = format!(
        "{public_only}/oauth/authorize?{}",
        authorize_query(&client_id, &[])
    );
    let (s, _, page) = c.send(c.http.get(&url)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("not on a public address"), "{page}");
    let url = format!(
        "{public_only}/oauth/authorize?{}",
        authorize_query(&format!("https://localhost:{port}/client.json"), &[])
    );
    let (s, _, page) = c.send(c.http.get(&url)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains("not on a public address"), "{page}");
    assert_eq!(hits.lock().values().sum::<usize>(), hits_before);
}
