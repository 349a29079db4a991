//! REST API tests through `tower::ServiceExt::oneshot`.

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt as _;
use kakuremichi_control::app;
use serde_json::{json, Value};
use tower::ServiceExt as _;

use crate::common::{self, ADMIN_KEY};

struct TestApp {
    router: Router,
    _db: common::TestDb,
}

impl TestApp {
    async fn new() -> Self {
        let db = common::sqlite().await;
        let state = common::state(&db).await;
        Self {
            router: app(state),
            _db: db,
        }
    }

    async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
        key: Option<&str>,
    ) -> (StatusCode, String, Option<String>) {
        let ctype = body.map(|_| "application/json");
        self.send(method, path, body, ctype, key).await
    }

    /// A request with the given content type (if any); returns status, body and content type.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
        content_type: Option<&str>,
        key: Option<&str>,
    ) -> (StatusCode, String, Option<String>) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(k) = key {
            req = req.header(header::AUTHORIZATION, format!("Bearer {k}"));
        }
        if let Some(c) = content_type {
            req = req.header(header::CONTENT_TYPE, c);
        }
        let body = body.map_or_else(Body::empty, |b| Body::from(b.to_owned()));
        let resp = self
            .router
            .clone()
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let ctype = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap(), ctype)
    }

    /// A raw request with the admin key.
    async fn admin(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
    ) -> (StatusCode, String, Option<String>) {
        self.raw(method, path, body, Some(ADMIN_KEY)).await
    }

    /// `POST /api/v1/enroll` (no admin key) with a raw body.
    async fn enroll(&self, body: &str) -> (StatusCode, String) {
        let (s, text, _) = self
            .raw(Method::POST, "/api/v1/enroll", Some(body), None)
            .await;
        (s, text)
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let body = body.map(|b| b.to_string());
        let (status, text, _) = self
            .raw(method, path, body.as_deref(), Some(ADMIN_KEY))
            .await;
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
        };
        (status, v)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(body)).await
    }

    /// `POST` without a body.
    async fn post_empty(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::POST, path, None).await
    }

    async fn patch(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PATCH, path, Some(body)).await
    }

    async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::DELETE, path, None).await
    }

    /// Creates a site; returns the answer's body whatever its status.
    async fn site(&self, name: &str) -> Value {
        self.post("/api/v1/sites", json!({ "name": name })).await.1
    }

    /// Creates a gateway; returns the answer's body whatever its status.
    async fn gateway(&self, name: &str, endpoint: &str) -> Value {
        let body = json!({ "name": name, "endpoint": endpoint });
        self.post("/api/v1/gateways", body).await.1
    }
}

/// The `id` of a created thing.
fn id(v: &Value) -> &str {
    v["id"].as_str().unwrap()
}

fn assert_error(status: StatusCode, text: &str, want: StatusCode) {
    assert_eq!(status, want, "{text}");
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    assert!(v["error"]["code"].is_string(), "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
}

#[tokio::test]
async fn site_crud() {
    let t = TestApp::new().await;
    let (s, site) = t.post("/api/v1/sites", json!({"name": "home"})).await;
    assert_eq!(s, StatusCode::CREATED, "{site}");
    assert!(site["enrollment_token"]
        .as_str()
        .unwrap()
        .starts_with("kme_"));
    assert_eq!(site["overlay_address"], "100.64.0.1");
    assert_eq!(site["enrolled"], false);
    assert_eq!(site["online"], false);
    assert!(site["peers"].as_array().unwrap().is_empty());
    let id = id(&site);
    let (s, got) = t.get(&format!("/api/v1/sites/{id}")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        got.get("enrollment_token").is_none(),
        "token shown once: {got}"
    );
    let (s, list) = t.get("/api/v1/sites").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let (s, upd) = t
        .patch(&format!("/api/v1/sites/{id}"), json!({"name": "lab"}))
        .await;
    assert_eq!((s, upd["name"].as_str()), (StatusCode::OK, Some("lab")));
    let (s, tok) = t
        .post_empty(&format!("/api/v1/sites/{id}/enrollment-token"))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(tok["enrollment_token"]
        .as_str()
        .unwrap()
        .starts_with("kme_"));
    let (s, _) = t.post("/api/v1/sites", json!({"name": "lab"})).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = t.delete(&format!("/api/v1/sites/{id}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, e) = t.get(&format!("/api/v1/sites/{id}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(e["error"]["code"], "not_found");
}

#[tokio::test]
async fn gateway_crud_and_validation() {
    let t = TestApp::new().await;
    let (s, gw) = t
        .post(
            "/api/v1/gateways",
            json!({"name": "edge", "endpoint": "203.0.113.7:51820"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{gw}");
    assert_eq!(gw["endpoint"], "203.0.113.7:51820");
    assert!(gw.get("targets").is_none());
    let id = id(&gw);
    for bad in [
        json!({"name": "x", "endpoint": "nope"}),
        json!({"name": "x", "endpoint": "h:0"}),
        json!({"name": "", "endpoint": "h:1"}),
        json!({"name": "x".repeat(65), "endpoint": "h:1"}),
        json!({"name": "x"}),
    ] {
        let (s, e) = t.post("/api/v1/gateways", bad.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad} -> {e}");
        assert_eq!(e["error"]["code"], "bad_request");
    }
    let (s, upd) = t
        .patch(
            &format!("/api/v1/gateways/{id}"),
            json!({"endpoint": "gw.example.com:443"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(upd["endpoint"], "gw.example.com:443");
    assert_eq!(upd["name"], "edge");
    let (s, _) = t
        .patch(&format!("/api/v1/gateways/{id}"), json!({"endpoint": "x"}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = t
        .post_empty(&format!("/api/v1/gateways/{id}/enrollment-token"))
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = t.delete(&format!("/api/v1/gateways/{id}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = t.delete(&format!("/api/v1/gateways/{id}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn resource_crud_and_validation() {
    let t = TestApp::new().await;
    let site = t.site("home").await;
    let site_id = id(&site);
    let (s, r) = t
        .post(
            "/api/v1/resources",
            json!({"hostname": "Demo.Localhost", "site_id": site_id, "target": "127.0.0.1:9000"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    assert_eq!(r["hostname"], "demo.localhost");
    assert_eq!(r["name"], "demo.localhost");
    assert_eq!(r["overlay_port"], 10000);
    let id = id(&r);
    let (s, dup) = t.post("/api/v1/resources", json!({"name": "b", "hostname": "demo.localhost", "site_id": site_id, "target": "127.0.0.1:1"})).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(dup["error"]["code"], "conflict");
    for bad in [
        json!({"hostname": "bad_host", "site_id": site_id, "target": "127.0.0.1:1"}),
        json!({"hostname": "a.localhost", "site_id": site_id, "target": "127.0.0.1:0"}),
        json!({"hostname": "a.localhost", "site_id": site_id, "target": "127.0.0.1:70000"}),
        json!({"hostname": "a.localhost", "site_id": site_id, "target": "noport"}),
        json!({"hostname": "a.localhost", "site_id": "not-a-uuid", "target": "h:1"}),
        json!({"hostname": "a.localhost", "site_id": uuid::Uuid::new_v4(), "target": "h:1"}),
    ] {
        let (s, e) = t.post("/api/v1/resources", bad.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad} -> {e}");
    }
    let (s, upd) = t
        .patch(
            &format!("/api/v1/resources/{id}"),
            json!({"target": "10.0.0.2:8080", "name": "demo"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (upd["target"].as_str(), upd["name"].as_str()),
        (Some("10.0.0.2:8080"), Some("demo"))
    );
    let (s, list) = t.get("/api/v1/resources").await;
    assert_eq!((s, list.as_array().unwrap().len()), (StatusCode::OK, 1));
    let (s, got) = t.get(&format!("/api/v1/resources/{id}")).await;
    assert_eq!((s, got), (StatusCode::OK, upd));
    // Deleting the site deletes its resources.
    let (s, _) = t.delete(&format!("/api/v1/sites/{site_id}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = t.get(&format!("/api/v1/resources/{id}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn several_targets_balance_and_health_checks_over_the_api() {
    let t = TestApp::new().await;
    let a = id(&t.site("a").await).to_owned();
    let b = id(&t.site("b").await).to_owned();
    let (s, r) = t
        .post(
            "/api/v1/resources",
            json!({
                "hostname": "lb.localhost", "site_id": a, "target": "127.0.0.1:9000",
                "targets": [{"site_id": b, "target": "127.0.0.1:9001"}],
                "balance": "least_outstanding", "sticky": true,
                "health_check": {"path": "/healthz", "interval_ms": 1000}
            }),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    assert_eq!(r["balance"], "least_outstanding");
    assert_eq!(r["sticky"], true);
    assert_eq!(
        r["health_check"],
        json!({"path": "/healthz", "interval_ms": 1000, "timeout_ms": 500,
               "unhealthy_threshold": 1, "healthy_threshold": 2})
    );
    let targets = r["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 2);
    assert_eq!(targets[0]["primary"], true);
    assert_eq!(targets[0]["id"], r["id"]);
    assert_eq!(targets[1]["site_id"], json!(b));
    assert_eq!(targets[1]["primary"], false);
    let rid = id(&r).to_owned();
    let bad_checks = [
        json!({"interval_ms": 100}),
        json!({"interval_ms": 1000, "timeout_ms": 1000}),
        json!({"timeout_ms": 10}),
        json!({"unhealthy_threshold": 0}),
        json!({"healthy_threshold": 11}),
        json!({"path": "healthz"}),
        json!({"path": "/a b"}),
        json!({"path": "/\u{7f}"}),
        json!({"path": format!("/{}", "a".repeat(1024))}),
        json!({"path": "/", "expected_status": 99}),
        json!({"path": "/", "expected_status": 600}),
        json!({"expected_status": 200}),
        json!({"interval": 5}),
    ];
    for bad in bad_checks {
        let (s, e) = t
            .post(
                "/api/v1/resources",
                json!({"hostname": "x.localhost", "site_id": a, "target": "h:1", "health_check": bad}),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad} -> {e}");
    }
    for bad in [
        json!({"protocol": "udp", "site_id": a, "target": "h:1", "health_check": {}}),
        json!({"protocol": "tcp", "site_id": a, "target": "h:1", "health_check": {"path": "/"}}),
        json!({"protocol": "tcp", "site_id": a, "target": "h:1", "sticky": true}),
        json!({"hostname": "x.localhost", "site_id": a, "target": "h:1", "balance": "random"}),
        json!({"hostname": "x.localhost", "site_id": a, "target": "h:1", "targets": [{"site_id": a}]}),
        json!({"hostname": "x.localhost", "site_id": a, "target": "h:1", "targets": [{"site_id": a, "target": "h:0"}]}),
        json!({"hostname": "x.localhost", "site_id": a, "target": "h:1", "targets": [{"site_id": uuid::Uuid::new_v4(), "target": "h:2"}]}),
        json!({"hostname": "x.localhost", "site_id": a, "target": "h:1", "targets": [{"site_id": a, "target": "h:2", "weight": 3}]}),
    ] {
        let (s, e) = t.post("/api/v1/resources", bad.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad} -> {e}");
    }
    let many: Vec<_> = (0..32)
        .map(|i| json!({"site_id": a, "target": format!("h:{}", i + 1)}))
        .collect();
    let (s, _) = t
        .post(
            "/api/v1/resources",
            json!({"hostname": "many.localhost", "site_id": a, "target": "h:1", "targets": many}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "at most 32 targets");
    let (s, full) = t
        .post(
            "/api/v1/resources",
            json!({"hostname": "many.localhost", "site_id": a, "target": "h:1", "targets": many[..31]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "32 targets: {full}");
    assert_eq!(full["targets"].as_array().unwrap().len(), 32);
    let (s, e) = t
        .post(
            &format!("/api/v1/resources/{}/targets", id(&full)),
            json!({"site_id": a, "target": "h:99"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "a 33rd target: {e}");
    // A TCP resource takes a connect check.
    let (s, tcp) = t
        .post(
            "/api/v1/resources",
            json!({"protocol": "tcp", "site_id": a, "target": "h:1", "health_check": {"interval_ms": 2000}}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{tcp}");
    assert_eq!(tcp["health_check"]["timeout_ms"], 1000);
    assert!(tcp.get("sticky").is_none());
    // PATCH and the targets sub-routes.
    let (s, p) = t
        .patch(
            &format!("/api/v1/resources/{rid}"),
            json!({"balance": "round_robin", "sticky": false, "health_check": null}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{p}");
    assert_eq!(p["balance"], "round_robin");
    assert!(p.get("health_check").is_none());
    let (s, e) = t
        .patch(
            &format!("/api/v1/resources/{rid}"),
            json!({"health_check": {"path": "x"}}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    let tcp_id = id(&tcp);
    for bad in [
        json!({"sticky": true}),
        json!({"health_check": {"path": "/"}}),
        json!({"weight": 1}),
    ] {
        let (s, e) = t
            .patch(&format!("/api/v1/resources/{tcp_id}"), bad.clone())
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad} -> {e}");
    }
    let (s, e) = t
        .post(
            &format!("/api/v1/resources/{rid}/targets"),
            json!({"site_id": a, "target": "nope"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    let (s, e) = t
        .post(
            &format!("/api/v1/resources/{rid}/targets"),
            json!({"site_id": a, "target": "h:1", "primary": true}),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::BAD_REQUEST,
        "unknown fields are refused: {e}"
    );
    let (s, added) = t
        .post(
            &format!("/api/v1/resources/{rid}/targets"),
            json!({"site_id": a, "target": "127.0.0.1:9002"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{added}");
    assert_eq!(added["primary"], false);
    let (s, _) = t
        .post(
            &format!("/api/v1/resources/{}/targets", uuid::Uuid::new_v4()),
            json!({"site_id": a, "target": "127.0.0.1:9002"}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, got) = t.get(&format!("/api/v1/resources/{rid}")).await;
    assert_eq!(got["targets"].as_array().unwrap().len(), 3);
    let (s, e) = t
        .delete(&format!("/api/v1/resources/{rid}/targets/{rid}"))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "the primary stays: {e}");
    let tid = added["id"].as_str().unwrap();
    let (s, _) = t
        .delete(&format!("/api/v1/resources/{rid}/targets/{tid}"))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = t
        .delete(&format!("/api/v1/resources/{rid}/targets/{tid}"))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn config_version_rises() {
    let t = TestApp::new().await;
    let (s, v1) = t.get("/api/v1/config/version").await;
    assert_eq!(s, StatusCode::OK);
    t.site("a").await;
    let (_, v2) = t.get("/api/v1/config/version").await;
    assert!(v2["version"].as_u64().unwrap() > v1["version"].as_u64().unwrap());
}

/// Every route with a body, with a valid path.
async fn body_routes(t: &TestApp) -> Vec<(Method, String)> {
    let site = t.site("s").await;
    let gw = t.gateway("g", "h:1").await;
    let (_, r) = t
        .post(
            "/api/v1/resources",
            json!({"hostname": "a.localhost", "site_id": site["id"], "target": "h:1"}),
        )
        .await;
    vec![
        (Method::POST, "/api/v1/sites".into()),
        (Method::PATCH, format!("/api/v1/sites/{}", id(&site))),
        (Method::POST, "/api/v1/gateways".into()),
        (Method::PATCH, format!("/api/v1/gateways/{}", id(&gw))),
        (Method::POST, "/api/v1/resources".into()),
        (Method::PATCH, format!("/api/v1/resources/{}", id(&r))),
        (Method::POST, "/api/v1/enroll".into()),
    ]
}

#[tokio::test]
async fn malformed_json_unknown_fields_and_content_type_are_400_json() {
    let t = TestApp::new().await;
    for (method, path) in body_routes(&t).await {
        for body in ["{", "[1,2]", "{\"name\": \"x\", \"surprise\": 1}", "{\"protocol_version\": 1, \"kind\": \"agent\", \"token\": \"t\", \"public_key\": \"AAAA\", \"x\": 1}"] {
            let (s, text, ctype) = t.admin(method.clone(), &path, Some(body)).await;
            assert_error(s, &text, StatusCode::BAD_REQUEST);
            assert_eq!(ctype.as_deref(), Some("application/json"), "{method} {path}");
        }
        // Wrong content type.
        let body = Some("{\"name\": \"x\"}");
        let (s, text, _) = t
            .send(method, &path, body, Some("text/plain"), Some(ADMIN_KEY))
            .await;
        assert_error(s, &text, StatusCode::BAD_REQUEST);
    }
}

#[tokio::test]
async fn oversized_body_is_413_json() {
    let t = TestApp::new().await;
    let big = format!("{{\"name\": \"{}\"}}", "x".repeat(1 << 20));
    for (method, path) in body_routes(&t).await {
        let (s, text, _) = t.admin(method, &path, Some(&big)).await;
        assert_error(s, &text, StatusCode::PAYLOAD_TOO_LARGE);
    }
}

#[tokio::test]
async fn every_admin_route_needs_the_key() {
    let t = TestApp::new().await;
    let id = uuid::Uuid::new_v4();
    let mut routes = vec![(Method::GET, "/api/v1/config/version".to_owned())];
    for coll in ["sites", "gateways", "resources"] {
        let all = format!("/api/v1/{coll}");
        let one = format!("{all}/{id}");
        routes.extend([
            (Method::GET, all.clone()),
            (Method::POST, all),
            (Method::GET, one.clone()),
            (Method::PATCH, one.clone()),
            (Method::DELETE, one.clone()),
        ]);
        if coll != "resources" {
            routes.push((Method::POST, format!("{one}/enrollment-token")));
        }
    }
    let wrong = "kma_0123456789abcdef0123456789abcdef_wrongsecret";
    for (method, path) in routes {
        for key in [None, Some(wrong), Some("garbage")] {
            let (s, text, _) = t.raw(method.clone(), &path, Some("{}"), key).await;
            assert_error(s, &text, StatusCode::UNAUTHORIZED);
        }
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_are_json() {
    let t = TestApp::new().await;
    let (s, text, _) = t.admin(Method::GET, "/api/v1/nope", None).await;
    assert_error(s, &text, StatusCode::NOT_FOUND);
    let (s, text, _) = t.raw(Method::GET, "/nope", None, None).await;
    assert_error(s, &text, StatusCode::NOT_FOUND);
    let (s, text, _) = t.admin(Method::PUT, "/api/v1/sites", Some("{}")).await;
    assert_error(s, &text, StatusCode::METHOD_NOT_ALLOWED);
    let (s, text, _) = t.admin(Method::GET, "/api/v1/sites/not-a-uuid", None).await;
    assert_error(s, &text, StatusCode::BAD_REQUEST);
    let (s, text, _) = t
        .raw(Method::GET, "/api/v1/nodes/connect", None, None)
        .await;
    assert_error(s, &text, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn health_metrics_and_page() {
    let t = TestApp::new().await;
    let (s, text, _) = t.raw(Method::GET, "/healthz", None, None).await;
    assert_eq!((s, text.as_str()), (StatusCode::OK, "ok"));
    t.get("/api/v1/sites").await;
    let (s, text, _) = t.raw(Method::GET, "/metrics", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        text.contains("kakuremichi_nodes_online{kind=\"gateway\"} 0"),
        "{text}"
    );
    assert!(text.contains("kakuremichi_config_version "), "{text}");
    assert!(
        text.contains("kakuremichi_api_requests_total{class=\"2xx\"} "),
        "{text}"
    );
    let timed: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("kakuremichi_api_request_duration_seconds_count "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(timed >= 1, "the API request was timed\n{text}");
    assert!(text.contains("kakuremichi_api_request_duration_seconds_bucket{le=\"+Inf\"} "));
    assert!(
        text.contains("kakuremichi_config_snapshots_sent_total{kind=\"agent\"} 0\n"),
        "{text}"
    );
    assert!(text.contains("\nprocess_resident_memory_bytes "), "{text}");
    // `/` is the console, which sends a new control to set-up.
    let (s, _, _) = t.raw(Method::GET, "/", None, None).await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let (s, _, _) = t.raw(Method::GET, "/ui", None, None).await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let (s, text, ctype) = t.raw(Method::GET, "/setup", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(ctype.unwrap().starts_with("text/html"));
    assert!(
        text.contains("<title>Set up kakuremichi - kakuremichi</title>"),
        "{text}"
    );
}

#[tokio::test]
async fn enrollment_over_the_api() {
    let t = TestApp::new().await;
    let gw = t.gateway("g", "h:1").await;
    let token = gw["enrollment_token"].as_str().unwrap();
    let pk = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
    let body = |v: u32, kind: &str| {
        json!({"protocol_version": v, "kind": kind, "token": token, "public_key": pk}).to_string()
    };
    let (s, text) = t.enroll(&body(99, "gateway")).await;
    assert_error(s, &text, StatusCode::BAD_REQUEST);
    assert!(text.contains("unsupported protocol version 99"), "{text}");
    let (s, text) = t.enroll(&body(1, "agent")).await;
    assert_error(s, &text, StatusCode::UNAUTHORIZED);
    let (s, text) = t.enroll(&body(1, "gateway")).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let resp: kakuremichi_proto::EnrollResponse = serde_json::from_str(&text).unwrap();
    assert_eq!(
        resp.overlay_address.to_string(),
        gw["overlay_address"].as_str().unwrap()
    );
    let (s, text) = t.enroll(&body(1, "gateway")).await;
    assert_error(s, &text, StatusCode::UNAUTHORIZED);
    let (_, got) = t.get(&format!("/api/v1/gateways/{}", id(&gw))).await;
    assert_eq!(got["enrolled"], true);
    assert_eq!(got["public_key"], pk);
}

#[tokio::test]
async fn certificates_are_uploaded_checked_listed_without_keys_and_sealed_at_rest() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("control.db").display()
    );
    let store = kakuremichi_control::store::Store::connect(
        &url,
        kakuremichi_control::overlay::OverlayNet::DEFAULT,
    )
    .await
    .unwrap()
    .with_sealer(std::sync::Arc::new(
        kakuremichi_control::seal::Sealer::from_file(&dir.path().join("secrets.key"), true)
            .unwrap(),
    ));
    store
        .ensure_admin_key(Some(&kakuremichi_proto::Secret::new(ADMIN_KEY)))
        .await
        .unwrap();
    let t = TestApp {
        router: app(kakuremichi_control::AppState::new(store.clone())),
        _db: common::sqlite().await,
    };
    let made = rcgen::generate_simple_self_signed(vec!["Up.Example.com".to_owned()]).unwrap();
    let chain = made.cert.pem();
    let key = made.signing_key.serialize_pem();
    let (s, c) = t
        .post(
            "/api/v1/certificates",
            json!({"chain_pem": chain, "key_pem": key}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{c}");
    assert_eq!(c["names"], json!(["up.example.com"]));
    assert_eq!(c["source"], "upload");
    assert_eq!(c["status"], "valid");
    assert!(c.get("key_pem").is_none(), "{c}");
    let (s, list) = t.get("/api/v1/certificates").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert!(!list.to_string().contains("PRIVATE KEY"), "{list}");
    // Sealed at rest: the key is nowhere in the database files.
    store.close().await;
    for entry in std::fs::read_dir(dir.path()).unwrap().flatten() {
        let bytes = std::fs::read(entry.path()).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains("PRIVATE KEY"),
            "{} holds a clear key",
            entry.path().display()
        );
    }

    let t = TestApp::new().await; // no secrets key, no ACME
    let (s, e) = t
        .post(
            "/api/v1/certificates",
            json!({"chain_pem": chain, "key_pem": key}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert!(e.to_string().contains("secrets key"), "{e}");
    let other = rcgen::generate_simple_self_signed(vec!["x.example".to_owned()]).unwrap();
    let mut expired = rcgen::CertificateParams::new(vec!["old.example".to_owned()]).unwrap();
    expired.not_before = rcgen::date_time_ymd(2020, 1, 1);
    expired.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let old_key = rcgen::KeyPair::generate().unwrap();
    let old = expired.self_signed(&old_key).unwrap();
    for (body, says) in [
        (
            json!({"chain_pem": chain, "key_pem": other.signing_key.serialize_pem()}),
            "does not match",
        ),
        (json!({"chain_pem": "junk", "key_pem": key}), "chain_pem"),
        (json!({"chain_pem": chain, "key_pem": "junk"}), "key_pem"),
        (
            json!({"chain_pem": old.pem(), "key_pem": old_key.serialize_pem()}),
            "expired",
        ),
        (json!({"chain_pem": chain}), "either names"),
        (
            json!({"names": ["a.example"], "chain_pem": chain, "key_pem": key}),
            "either names",
        ),
        (json!({"names": ["a.example"]}), "no ACME CA"),
        (
            json!({"chain_pem": "x".repeat(70_000), "key_pem": key}),
            "at most",
        ),
        (
            json!({"chain_pem": chain, "key_pem": key, "extra": 1}),
            "unknown field",
        ),
    ] {
        let (s, e) = t.post("/api/v1/certificates", body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
        assert!(e.to_string().contains(says), "{says}: {e}");
    }
    let (s, _) = t
        .get("/api/v1/certificates/00000000-0000-0000-0000-000000000001")
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn limits_and_proxy_protocol_over_the_api() {
    let t = TestApp::new().await;
    let a = id(&t.site("a").await).to_owned();
    let (s, r) = t
        .post(
            "/api/v1/resources",
            json!({
                "hostname": "limits.localhost", "site_id": a, "target": "127.0.0.1:9000",
                "limits": {"max_request_body_bytes": 1048576, "response_timeout_ms": 5000,
                           "idle_timeout_ms": 10000}
            }),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    assert_eq!(
        r["limits"],
        json!({"max_request_body_bytes": 1048576, "response_timeout_ms": 5000, "idle_timeout_ms": 10000})
    );
    assert!(
        r.get("proxy_protocol").is_none(),
        "an HTTP resource has none"
    );
    for bad in [
        json!({"limits": {"response_timeout_ms": 50}}),
        json!({"limits": {"response_timeout_ms": 3_600_001}}),
        json!({"limits": {"idle_timeout_ms": 99}}),
        json!({"limits": {"max_request_body_bytes": 2_u64 << 40}}),
        json!({"limits": {"max_body": 1}}),
        json!({"limits": {"max_request_body_bytes": -1}}),
        json!({"proxy_protocol": true}),
    ] {
        let mut body = json!({"hostname": "x.localhost", "site_id": a, "target": "h:1"});
        body.as_object_mut()
            .unwrap()
            .extend(bad.as_object().unwrap().clone());
        let (s, e) = t.post("/api/v1/resources", body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad} -> {e}");
        assert!(e["error"]["message"].is_string(), "{e}");
    }
    for bad in [
        json!({"protocol": "tcp", "site_id": a, "target": "h:1", "limits": {"response_timeout_ms": 1000}}),
        json!({"protocol": "udp", "site_id": a, "target": "h:1", "limits": {"max_request_body_bytes": 1}}),
        json!({"protocol": "udp", "site_id": a, "target": "h:1", "proxy_protocol": true}),
        json!({"protocol": "udp", "site_id": a, "target": "h:1", "targets": [{"site_id": a, "target": "h:2", "proxy_protocol": true}]}),
    ] {
        let (s, e) = t.post("/api/v1/resources", bad.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad} -> {e}");
    }
    // A TCP resource: PROXY protocol on the resource, one target saying otherwise.
    let (s, db) = t
        .post(
            "/api/v1/resources",
            json!({"protocol": "tcp", "site_id": a, "target": "h:1", "proxy_protocol": true,
                   "limits": {"idle_timeout_ms": 60000},
                   "targets": [{"site_id": a, "target": "h:2", "proxy_protocol": false},
                               {"site_id": a, "target": "h:3"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{db}");
    assert_eq!(db["proxy_protocol"], true);
    let pp: Vec<_> = db["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["proxy_protocol"].clone())
        .collect();
    assert_eq!(pp, [json!(true), json!(false), json!(true)]);
    let db_id = id(&db).to_owned();
    let (s, p) = t
        .patch(
            &format!("/api/v1/resources/{db_id}"),
            json!({"proxy_protocol": false, "limits": {}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{p}");
    assert_eq!(p["limits"], json!({}));
    let pp: Vec<_> = p["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["proxy_protocol"].clone())
        .collect();
    assert_eq!(pp, [json!(false), json!(false), json!(false)]);
    let (s, added) = t
        .post(
            &format!("/api/v1/resources/{db_id}/targets"),
            json!({"site_id": a, "target": "h:4", "proxy_protocol": true}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{added}");
    assert_eq!(added["proxy_protocol"], true);
    let (s, e) = t
        .post(
            &format!("/api/v1/resources/{}/targets", id(&r)),
            json!({"site_id": a, "target": "h:4", "proxy_protocol": true}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    let (s, e) = t
        .patch(
            &format!("/api/v1/resources/{}", id(&r)),
            json!({"limits": {"idle_timeout_ms": 5}}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
}

/// Access policies' rules and service keys: stored normalized, refused with a message naming
/// the field when malformed.
#[tokio::test]
async fn access_rules_and_service_keys_are_validated() {
    let t = TestApp::new().await;
    let site = t.site("home").await;
    let site_id = id(&site);
    let (s, key) = t
        .post(
            "/api/v1/api-keys",
            json!({"name": "ci", "scopes": ["resource:access"], "service": true}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{key}");
    assert!(key["user_id"].is_null(), "{key}");
    let (s, e) = t
        .post(
            "/api/v1/api-keys",
            json!({"name": "ci", "scopes": ["resource:access"], "service": true,
                   "user_id": uuid::Uuid::new_v4()}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    let access = json!({
        "service_keys": [id(&key)],
        "rules": [
            {"action": "deny", "cidrs": ["192.0.2.0/24"]},
            {"action": "bypass", "paths": ["/hooks/*"], "methods": ["post"]},
        ],
    });
    let (s, r) = t
        .post(
            "/api/v1/resources",
            json!({"hostname": "hooks.localhost", "site_id": site_id, "target": "127.0.0.1:9000",
                   "access": access}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    assert_eq!(
        r["access"]["rules"][1],
        json!({"action": "allow", "paths": ["/hooks/*"], "methods": ["POST"]})
    );
    assert_eq!(r["access"]["service_keys"], json!([id(&key)]));
    let path = format!("/api/v1/resources/{}", id(&r));
    for (rule, names) in [
        (
            json!({"action": "allow", "paths": ["hooks"]}),
            "access.rules[0].paths",
        ),
        (
            json!({"action": "allow", "paths": ["/a/../b"]}),
            "access.rules[0].paths",
        ),
        (
            json!({"action": "allow", "paths": ["/a?b=1"]}),
            "access.rules[0].paths",
        ),
        (
            json!({"action": "allow", "methods": ["GE T"]}),
            "access.rules[0].methods",
        ),
        (
            json!({"action": "allow", "cidrs": ["10.0.0.0/40"]}),
            "cidrs",
        ),
        (json!({"action": "maybe"}), "action"),
        (json!({"action": "allow", "path": ["/"]}), "path"),
    ] {
        let (s, e) = t.patch(&path, json!({"access": {"rules": [rule]}})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{rule} -> {e}");
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.contains(names), "{rule}: {message}");
    }
    let many: Vec<Value> = (0..101).map(|_| json!({"action": "deny"})).collect();
    let (s, e) = t.patch(&path, json!({"access": {"rules": many}})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
}

/// Reusable access policies over the API: validated like a resource's access; a resource that
/// follows one shows the policy's fields with its own laid over them; one in use is not deleted.
#[tokio::test]
async fn access_policies_over_the_api() {
    let t = TestApp::new().await;
    let site = t.site("home").await;
    let site_id = id(&site);
    for bad in [
        json!({"name": "x", "access": {"rules": [{"action": "allow", "paths": ["nope"]}]}}),
        json!({"name": "", "access": {}}),
        json!({"name": "x"}),
        json!({"name": "x", "access": {}, "extra": 1}),
    ] {
        let (s, e) = t.post("/api/v1/policies", bad.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad} -> {e}");
    }
    let (s, p) = t
        .post(
            "/api/v1/policies",
            json!({"name": "staff", "access": {"roles": ["member"], "users": ["Ann@Example.com"]}}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
    assert_eq!(p["access"]["users"], json!(["ann@example.com"]));
    let (s, _) = t
        .post("/api/v1/policies", json!({"name": "staff", "access": {}}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, r) = t
        .post(
            "/api/v1/resources",
            json!({"hostname": "follows.localhost", "site_id": site_id, "target": "127.0.0.1:1",
                   "policy_id": id(&p), "access": {"api_keys": true}}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    assert_eq!(r["policy_id"], id(&p));
    assert_eq!(r["own_access"], json!({"api_keys": true}));
    assert_eq!(
        r["access"],
        json!({"roles": ["member"], "users": ["ann@example.com"], "api_keys": true})
    );
    let (s, e) = t
        .post(
            "/api/v1/resources",
            json!({"hostname": "x.localhost", "site_id": site_id, "target": "127.0.0.1:1",
                   "policy_id": uuid::Uuid::new_v4()}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    let policy = format!("/api/v1/policies/{}", id(&p));
    let (s, changed) = t
        .patch(
            &policy,
            json!({"access": {"email_domains": ["example.com"]}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{changed}");
    assert_eq!(changed["resources"], 1);
    let (_, r) = t.get(&format!("/api/v1/resources/{}", id(&r))).await;
    assert_eq!(
        r["access"],
        json!({"email_domains": ["example.com"], "api_keys": true})
    );
    let (s, e) = t.delete(&policy).await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    let (s, r) = t
        .patch(
            &format!("/api/v1/resources/{}", id(&r)),
            json!({"policy_id": null}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["access"], json!({"api_keys": true}));
    assert!(
        r.get("policy_id").is_none() && r.get("own_access").is_none(),
        "{r}"
    );
    assert_eq!(t.delete(&policy).await.0, StatusCode::NO_CONTENT);
    assert_eq!(t.get(&policy).await.0, StatusCode::NOT_FOUND);
}

/// Share links over the API: only for resources that need sign-in, checked bounds, the secret
/// shown once, revocation once.
#[tokio::test]
async fn share_links_over_the_api() {
    let t = TestApp::new().await;
    let site = t.site("home").await;
    let site_id = id(&site);
    let (_, public) = t
        .post(
            "/api/v1/resources",
            json!({"hostname": "open.localhost", "site_id": site_id, "target": "127.0.0.1:1"}),
        )
        .await;
    let (s, e) = t
        .post(
            &format!("/api/v1/resources/{}/share-links", id(&public)),
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("public"));
    let (_, r) = t
        .post(
            "/api/v1/resources",
            json!({"hostname": "shut.localhost", "site_id": site_id, "target": "127.0.0.1:1",
                   "access": {}}),
        )
        .await;
    let links = format!("/api/v1/resources/{}/share-links", id(&r));
    for bad in [
        json!({"expires_in_seconds": 0}),
        json!({"expires_in_seconds": 40_000_000}),
        json!({"max_uses": 0}),
        json!({"name": ""}),
        json!({"uses": 3}),
    ] {
        let (s, e) = t.post(&links, bad.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad} -> {e}");
    }
    let (s, made) = t.post(&links, json!({"max_uses": 5})).await;
    assert_eq!(s, StatusCode::CREATED, "{made}");
    let secret = made["secret"].as_str().unwrap();
    assert!(secret.starts_with("kml_"));
    assert_eq!(
        made["path"].as_str().unwrap(),
        format!("/.kakuremichi/auth/share/{secret}")
    );
    assert_eq!(
        (made["uses"].as_i64(), made["max_uses"].as_i64()),
        (Some(0), Some(5))
    );
    let (s, list) = t.get(&links).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert!(!list.to_string().contains(secret), "{list}");
    let one = format!("{links}/{}", id(&made));
    assert_eq!(t.delete(&one).await.0, StatusCode::NO_CONTENT);
    assert_eq!(t.delete(&one).await.0, StatusCode::NOT_FOUND);
    let (_, list) = t.get(&links).await;
    assert!(list[0]["revoked_at"].is_string(), "{list}");
    let (s, _) = t
        .get(&format!(
            "/api/v1/resources/{}/share-links",
            uuid::Uuid::new_v4()
        ))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn scoped_api_keys_hold_only_their_permissions_and_revocation_is_immediate() {
    let app = TestApp::new().await;
    let with = |key: &str, method: Method, path: &str, body: Option<&str>| {
        let (app, key, path, body) = (
            &app,
            key.to_owned(),
            path.to_owned(),
            body.map(str::to_owned),
        );
        async move { app.raw(method, &path, body.as_deref(), Some(&key)).await }
    };
    let (status, created) = app
        .post(
            "/api/v1/api-keys",
            json!({"name": "reader", "scopes": ["resource:read", "site:read"], "expires_in_days": 30}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let reader = created["secret"].as_str().unwrap().to_owned();
    assert!(reader.starts_with("kmk_"));
    assert!(created["expires_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));

    // It reads what it may, and nothing else.
    assert_eq!(
        with(&reader, Method::GET, "/api/v1/resources", None)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        with(&reader, Method::GET, "/api/v1/sites", None).await.0,
        StatusCode::OK
    );
    let (status, body, _) = with(&reader, Method::GET, "/api/v1/users", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("user:read"), "{body}");
    let (status, _, _) = with(
        &reader,
        Method::POST,
        "/api/v1/sites",
        Some(r#"{"name":"x"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // X-API-Key works too.
    let req = Request::builder()
        .uri("/api/v1/resources")
        .header("x-api-key", &reader)
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        app.router.clone().oneshot(req).await.unwrap().status(),
        StatusCode::OK
    );

    // A key cannot give more than it has; unknown permissions are refused.
    let (status, _, _) = with(
        &reader,
        Method::POST,
        "/api/v1/api-keys",
        Some(r#"{"name":"x","scopes":["resource:read"]}"#),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "api_key:write is needed");
    let (status, body) = app
        .post("/api/v1/api-keys", json!({"name": "x", "scopes": ["root"]}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _) = app
        .post(
            "/api/v1/api-keys",
            json!({"name": "x", "scopes": ["resource:read"], "expires_in_days": 0}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Listed without secrets, with the last time used; revoked at once.
    let (_, keys) = app.get("/api/v1/api-keys").await;
    let listed = keys.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{keys}");
    assert!(!keys.to_string().contains(&reader));
    let id = created["id"].as_str().unwrap();
    assert!(listed
        .iter()
        .any(|k| k["id"] == id && k["last_used_at"].is_string()));
    let admin_id = listed.iter().find(|k| k["scopes"].is_null()).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = app.delete(&format!("/api/v1/api-keys/{admin_id}")).await;
    assert_eq!(status, StatusCode::CONFLICT, "the last admin key stays");
    let (status, _) = app.delete(&format!("/api/v1/api-keys/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body, _) = with(&reader, Method::GET, "/api/v1/resources", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, _) = app.delete(&format!("/api/v1/api-keys/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn roles_are_permission_sets_and_a_personal_key_holds_what_its_user_may_at_each_request() {
    let app = TestApp::new().await;
    let with = |key: &str, method: Method, path: &str, body: Option<&str>| {
        let (app, key, path, body) = (
            &app,
            key.to_owned(),
            path.to_owned(),
            body.map(str::to_owned),
        );
        async move { app.raw(method, &path, body.as_deref(), Some(&key)).await.0 }
    };
    // Built-in roles are listed and cannot change.
    let (_, roles) = app.get("/api/v1/roles").await;
    let names: Vec<&str> = roles
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["owner", "admin", "member", "viewer"]);
    let (status, _) = app.delete("/api/v1/roles/admin").await;
    assert_eq!(status, StatusCode::CONFLICT);
    // A custom role from named permissions; unknown permissions and built-in names are refused.
    let (status, body) = app
        .post(
            "/api/v1/roles",
            json!({"name": "deployer", "permissions": ["resource:write", "nuke:all"]}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _) = app
        .post(
            "/api/v1/roles",
            json!({"name": "viewer", "permissions": ["resource:write"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, body) = app
        .post(
            "/api/v1/roles",
            json!({"name": "deployer", "description": "ships resources",
                   "permissions": ["resource:write", "site:write"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // Users hold only roles that exist.
    let (status, body) = app
        .post(
            "/api/v1/users",
            json!({"email": "x@example.com", "roles": ["wizard"]}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, user) = app
        .post(
            "/api/v1/users",
            json!({"email": "dee@example.com", "roles": ["viewer", "deployer"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{user}");
    let uid = id(&user).to_owned();

    // A personal key for her, asking for more than her roles give: it holds the intersection.
    let (status, created) = app
        .post(
            "/api/v1/api-keys",
            json!({"name": "dee's laptop", "user_id": uid,
                   "scopes": ["resource:read", "resource:write", "user:read"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["user_id"], uid.as_str());
    let key = created["secret"].as_str().unwrap().to_owned();
    assert_eq!(
        with(&key, Method::GET, "/api/v1/resources", None).await,
        StatusCode::OK,
        "viewer gives resource:read"
    );
    assert_eq!(
        with(&key, Method::GET, "/api/v1/users", None).await,
        StatusCode::FORBIDDEN,
        "no role of hers gives user:read"
    );
    let (_, site) = app.post("/api/v1/sites", json!({"name": "s1"})).await;
    let make = format!(
        r#"{{"hostname":"dee.example.com","site_id":"{}","target":"127.0.0.1:80"}}"#,
        id(&site)
    );
    assert_eq!(
        with(&key, Method::POST, "/api/v1/resources", Some(&make)).await,
        StatusCode::CREATED,
        "deployer gives resource:write"
    );
    assert_eq!(
        with(
            &key,
            Method::POST,
            "/api/v1/sites",
            Some(r#"{"name":"s2"}"#)
        )
        .await,
        StatusCode::FORBIDDEN,
        "the key does not hold site:write though her role does"
    );
    // The role is in use: it cannot go. Its permissions change at once.
    let (status, _) = app.delete("/api/v1/roles/deployer").await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = app
        .patch(
            "/api/v1/roles/deployer",
            json!({"permissions": ["site:write"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let make2 = make.replace("dee.example.com", "dee2.example.com");
    assert_eq!(
        with(&key, Method::POST, "/api/v1/resources", Some(&make2)).await,
        StatusCode::FORBIDDEN,
        "the role no longer gives resource:write"
    );
    // Taking the role away, then disabling her, take effect at the next request.
    let (status, _) = app
        .patch(&format!("/api/v1/users/{uid}"), json!({"roles": []}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        with(&key, Method::GET, "/api/v1/resources", None).await,
        StatusCode::FORBIDDEN
    );
    let (status, _) = app
        .patch(
            &format!("/api/v1/users/{uid}"),
            json!({"roles": ["viewer"], "disabled": true}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        with(&key, Method::GET, "/api/v1/resources", None).await,
        StatusCode::UNAUTHORIZED
    );
    let (status, _) = app.delete("/api/v1/roles/deployer").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

/// Two control replicas on one store count sign-in attempts from an address together: the limit
/// holds across them (here 3 a minute, alternating replicas), then 429 with `Retry-After`.
#[tokio::test]
async fn the_sign_in_rate_limit_is_shared_by_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("control.db").display()
    );
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let store = kakuremichi_control::store::Store::connect(
            &url,
            kakuremichi_control::overlay::OverlayNet::DEFAULT,
        )
        .await
        .unwrap();
        let mut state = kakuremichi_control::AppState::new(store);
        state.sign_in = std::sync::Arc::new(kakuremichi_control::identity::SignInLimits::new(3));
        replicas.push(app(state));
    }
    let csrf = "c".repeat(43);
    let mut statuses = Vec::new();
    for i in 0..5 {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri("/auth/sign-in")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::COOKIE, format!("kakuremichi_csrf={csrf}"))
            .body(Body::from(format!(
                "email=nobody%40example.com&password=wrong-password&csrf={csrf}"
            )))
            .unwrap();
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(std::net::SocketAddr::from((
                [192, 0, 2, 7],
                40000,
            ))));
        let resp = replicas[i % 2].clone().oneshot(req).await.unwrap();
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            assert!(resp.headers().contains_key(header::RETRY_AFTER));
        }
        statuses.push(resp.status().as_u16());
    }
    assert_eq!(statuses, [401, 401, 401, 429, 429]);
}

/// A resource's passcode over the API (set, shown without its hash, removed; bad shapes refused),
/// and at the sign-in page: the resource as a whole takes at most ten times one client's
/// attempts a minute, from whichever addresses they come.
#[tokio::test]
async fn passcodes_over_the_api_and_the_per_resource_limit() {
    let db = common::sqlite().await;
    let mut state = common::state(&db).await;
    state.visitors = std::sync::Arc::new(kakuremichi_control::visitors::Visitors {
        per_minute: 1,
        mailer: None,
    });
    let base = format!("http://{}", common::serve(state).await);
    let api = reqwest::Client::new();
    let call = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut req = api
            .request(method, format!("{base}/api/v1{path}"))
            .bearer_auth(ADMIN_KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (_, site) = call(
        reqwest::Method::POST,
        "/sites",
        Some(json!({"name": "home"})),
    )
    .await;
    let (s, r) = call(
        reqwest::Method::POST,
        "/resources",
        Some(
            json!({"hostname": "pin.localhost", "site_id": id(&site), "target": "127.0.0.1:1",
                    "access": {"roles": ["admin"]}}),
        ),
    )
    .await;
    assert_eq!(s, 201, "{r}");
    let path = format!("/resources/{}/passcode", id(&r));
    assert_eq!(call(reqwest::Method::GET, &path, None).await.0, 404);
    let (s, e) = call(
        reqwest::Method::PUT,
        &path,
        Some(json!({"kind": "pin", "value": "12a456"})),
    )
    .await;
    assert_eq!(s, 400, "{e}");
    let (s, shown) = call(
        reqwest::Method::PUT,
        &path,
        Some(json!({"kind": "pin", "value": "123456"})),
    )
    .await;
    assert_eq!(s, 200, "{shown}");
    let (s, shown) = call(reqwest::Method::GET, &path, None).await;
    assert_eq!((s, &shown["kind"]), (200, &json!("pin")));
    assert!(!shown.to_string().contains("argon2"), "{shown}");
    assert_eq!(call(reqwest::Method::DELETE, &path, None).await.0, 204);
    assert_eq!(call(reqwest::Method::DELETE, &path, None).await.0, 404);

    // With no passcode left, each attempt is answered without hashing anything, so the burst
    // below takes milliseconds: eleven clients, one attempt each, against a limit of ten a
    // minute for the resource.
    let csrf = "c".repeat(43);
    let form = [
        ("passcode", "123456"),
        ("rd", "http://pin.localhost/"),
        ("n", &"n".repeat(43)),
        ("csrf", &csrf),
    ];
    let mut statuses = Vec::new();
    for last in 2..=12u8 {
        let client = reqwest::Client::builder()
            .local_address(std::net::IpAddr::from([127, 0, 0, last]))
            .build()
            .unwrap();
        let r = client
            .post(format!("{base}/auth/passcode"))
            .header("cookie", format!("kakuremichi_csrf={csrf}"))
            .form(&form)
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses[..10], [400; 10], "{statuses:?}");
    assert_eq!(statuses[10], 429, "{statuses:?}");
}
