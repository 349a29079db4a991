//! An MCP server behind an agent, authorized by the MCP specification end to end: the official
//! TypeScript SDK client (`@modelcontextprotocol/sdk`) discovers the gateway's protected-resource
//! metadata and control's authorization server, registers (and, a second time, names its client
//! ID metadata document on an https server of its own instead), completes the OAuth flow (PKCE,
//! resource indicator, consent by a signed-in member, done by the script), lists and calls the
//! tools of an SDK server behind the agent; the server never sees the client's token; the token
//! is refused on another MCP resource and in the query string; with control down, the token
//! keeps working.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use kakuremichi_e2e::identity::Browser;
use kakuremichi_e2e::sso::{js_dir, run_script};
use kakuremichi_e2e::{free_tcp_port, wait_for, Stack, StackOptions};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const MCP_HOST: &str = "mcp.localhost";
const OTHER_HOST: &str = "other-mcp.localhost";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mcp_sdk_client_authorizes_by_oauth_and_lists_the_tools_of_a_server_behind_an_agent() {
    // Control fetches client ID metadata documents from loopback too (the test client publishes
    // its own there), trusting the CA of the client's certificate.
    let dir = tempfile::tempdir().unwrap();
    let pki = kakuremichi_e2e::acme::api_certificate().unwrap();
    let (ca, cert, key) = (
        dir.path().join("ca.pem"),
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
    );
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    std::fs::write(&cert, &pki.cert_pem).unwrap();
    std::fs::write(&key, &pki.key_pem).unwrap();
    let mut opts = StackOptions::loopback();
    opts.control_args = vec![
        "--client-metadata-documents".into(),
        "any".into(),
        "--client-metadata-ca-file".into(),
        ca.display().to_string(),
    ];
    let mut stack = Stack::start_with(opts).await.expect("stack");
    let port = free_tcp_port();
    let _server = tokio::process::Command::new("node")
        .arg(js_dir().unwrap().join("mcp-server.mjs"))
        .arg(port.to_string())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("node mcp-server.mjs");
    wait_for(
        "the MCP server to listen",
        Duration::from_secs(20),
        || async {
            Ok(tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ()))
        },
    )
    .await
    .unwrap();

    let (status, v) = stack
        .api
        .call(
            Method::POST,
            "/api/v1/users",
            Some(
                json!({"email": "ann@example.com", "password": "correct horse battery",
                        "roles": ["member"]}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{v}");
    for host in [MCP_HOST, OTHER_HOST] {
        let (status, v) = stack
            .api
            .call(
                Method::POST,
                "/api/v1/resources",
                Some(json!({"hostname": host, "site_id": stack.site_id,
                            "target": format!("127.0.0.1:{port}"),
                            "access": {"roles": ["member"], "mcp": true}})),
            )
            .await
            .unwrap();
        assert_eq!(status, 201, "{v}");
    }
    let gw = stack.opts.gateway_http_for_test.port();
    let url = format!("http://{MCP_HOST}:{gw}/mcp");
    wait_for(
        "the gateway to challenge MCP clients",
        Duration::from_secs(10),
        || async {
            let r = stack
                .request_builder(Method::POST, OTHER_HOST, "/mcp")
                .send()
                .await?;
            let ok = r.status() == 401
                && r.headers()
                    .get("www-authenticate")
                    .is_some_and(|h| h.to_str().unwrap_or("").contains("resource_metadata"));
            Ok(ok.then_some(()))
        },
    )
    .await
    .unwrap();

    // Ann is signed in at control (her browser's cookie); the script consents as her.
    let control = &stack.opts.control_url_for_test;
    let mut ann = Browser::new();
    let form = ann
        .go(
            &stack,
            Method::GET,
            &format!("{control}/auth/sign-in"),
            None,
        )
        .await
        .unwrap();
    let csrf = kakuremichi_e2e::identity::hidden(&form.body, "csrf").unwrap();
    let signed = ann
        .go(
            &stack,
            Method::POST,
            &format!("{control}/auth/sign-in"),
            Some(&[
                ("email", "ann@example.com"),
                ("password", "correct horse battery"),
                ("csrf", &csrf),
            ]),
        )
        .await
        .unwrap();
    assert_eq!(signed.status, StatusCode::OK, "{}", signed.body);
    let control_host = url::Url::parse(control)
        .unwrap()
        .host_str()
        .unwrap()
        .to_owned();
    let cookie = format!(
        "kakuremichi_control={}",
        ann.cookie(&control_host, "kakuremichi_control").unwrap()
    );

    let out = run_script(
        "mcp-client.mjs",
        &json!({"url": url, "other": format!("http://{OTHER_HOST}:{gw}/mcp"), "cookie": cookie}),
    )
    .await
    .unwrap();
    assert_eq!(out["tools"], json!(["whoami"]), "{out:#}");
    let seen: &Value = &out["whoami"];
    assert_eq!(
        seen["authorization"],
        Value::Null,
        "no token passthrough: {out:#}"
    );
    assert_eq!(seen["assertion"], Value::Null, "{out:#}");
    assert_eq!(seen["user"], "ann@example.com", "{out:#}");
    assert!(
        out["authUrl"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{control}/oauth/authorize?")),
        "{out:#}"
    );
    let auth_url = url::Url::parse(out["authUrl"].as_str().unwrap()).unwrap();
    let params: std::collections::HashMap<_, _> = auth_url.query_pairs().collect();
    assert_eq!(params["code_challenge_method"], "S256");
    assert_eq!(
        params["resource"],
        url.as_str(),
        "RFC 8707 resource: {out:#}"
    );
    assert_eq!(
        out["other_status"], 401,
        "a token for another resource: {out:#}"
    );
    assert!(
        out["other_challenge"]
            .as_str()
            .unwrap()
            .contains("invalid_token"),
        "{out:#}"
    );
    assert_eq!(
        out["query_status"], 400,
        "a token in the query string: {out:#}"
    );

    // A client known by its metadata document's URL: nothing registered, same flow, and the
    // token names that URL as its client.
    let published = run_script(
        "mcp-client.mjs",
        &json!({"url": url, "other": format!("http://{OTHER_HOST}:{gw}/mcp"), "cookie": cookie,
                "cimd": {"cert": cert, "key": key}}),
    )
    .await
    .unwrap();
    assert_eq!(published["tools"], json!(["whoami"]), "{published:#}");
    let client_id = published["client_id"].as_str().unwrap();
    assert!(
        client_id.starts_with("https://127.0.0.1:") && client_id.ends_with("/mcp-client.json"),
        "{published:#}"
    );
    assert_eq!(published["document_fetches"], 1, "{published:#}");
    let claims: Value = serde_json::from_slice(
        &base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            published["token"]
                .as_str()
                .unwrap()
                .split('.')
                .nth(1)
                .unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["client_id"], client_id, "{claims}");
    assert_eq!(published["whoami"]["user"], "ann@example.com");

    // The metadata a client discovers, both forms.
    for (path, resource) in [
        ("/.well-known/oauth-protected-resource/mcp", url.clone()),
        (
            "/.well-known/oauth-protected-resource",
            format!("http://{MCP_HOST}:{gw}"),
        ),
    ] {
        let r = stack
            .request_builder(Method::GET, &format!("{MCP_HOST}:{gw}"), path)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let doc: Value = r.json().await.unwrap();
        assert_eq!(doc["resource"], resource.as_str(), "{doc}");
        assert_eq!(doc["authorization_servers"][0], control.as_str(), "{doc}");
    }

    // Control down: the token keeps working at the gateway, which checks it locally.
    stack.stop_control();
    let token = out["token"].as_str().unwrap();
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "curl", "version": "1"}}});
    let r = stack
        .request_builder(Method::POST, &format!("{MCP_HOST}:{gw}"), "/mcp")
        .bearer_auth(token)
        .header("accept", "application/json, text/event-stream")
        .json(&initialize)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("kakuremichi-e2e-tools"), "{body}");
    // A forged token (the signature of another) is refused all the same.
    // (A character well inside the signature: every bit of it counts.)
    let at = token.len() - 10;
    let swap = if &token[at..=at] == "A" { "B" } else { "A" };
    let forged = format!("{}{swap}{}", &token[..at], &token[at + 1..]);
    let r = stack
        .request_builder(Method::POST, &format!("{MCP_HOST}:{gw}"), "/mcp")
        .bearer_auth(&forged)
        .json(&initialize)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}
