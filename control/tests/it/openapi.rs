//! The OpenAPI description at `/api/v1/openapi.json`: served to anyone, and every operation it
//! describes is routed (the router's own "no such route" and 405 never answer one).

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use http_body_util::BodyExt as _;
use kakuremichi_control::app;
use serde_json::Value;
use tower::ServiceExt as _;

use crate::common::{self, ADMIN_KEY};

async fn call(router: &axum::Router, method: Method, path: &str, key: bool) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method.clone()).uri(path);
    if key {
        req = req.header(header::AUTHORIZATION, format!("Bearer {ADMIN_KEY}"));
    }
    let body = if matches!(method, Method::POST | Method::PATCH | Method::PUT) {
        req = req.header(header::CONTENT_TYPE, "application/json");
        Body::from("{}")
    } else {
        Body::empty()
    };
    // Long polls and event streams keep answering; the router's own answers come at once.
    let answer = async {
        let resp = router
            .clone()
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    };
    tokio::time::timeout(Duration::from_secs(2), answer)
        .await
        .unwrap_or((StatusCode::OK, Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_described_operation_is_routed_and_the_document_is_public() {
    let db = common::sqlite().await;
    let router = app(common::state(&db).await);
    let (status, doc) = call(&router, Method::GET, "/api/v1/openapi.json", false).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc, kakuremichi_control::api::openapi());

    // The router's own answers for a path or a method it does not have.
    let (s, missing) = call(&router, Method::GET, "/api/v1/no-such-thing", true).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(&router, Method::PUT, "/api/v1/sites", true).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);

    let paths = doc["paths"].as_object().unwrap();
    let mut operations = 0;
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            operations += 1;
            // Ids that exist nowhere: the handler answers (404 "<thing> not found" and the
            // like), never the router.
            let concrete = path
                .replace("{rest}", "x/y")
                .replace("{token}", "no-such-token")
                .split('/')
                .map(|seg| {
                    if seg.starts_with('{') {
                        "00000000-0000-4000-8000-00000000beef"
                    } else {
                        seg
                    }
                })
                .collect::<Vec<_>>()
                .join("/");
            if path == "/nodes/connect" || op["operationId"] == "post_signing_keys_rotate" {
                continue; // a WebSocket upgrade; a rotation that would change the test's keys
            }
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let (status, body) = call(&router, m, &format!("/api/v1{concrete}"), true).await;
            assert_ne!(
                status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path} is described but not routed"
            );
            assert!(
                !(status == StatusCode::NOT_FOUND && body == missing),
                "{method} {path} is described but not routed"
            );
            // Every error has the one shape.
            if !status.is_success() && !status.is_redirection() {
                assert!(
                    body["error"]["code"].is_string() && body["message"].is_string(),
                    "{method} {path}: {status} {body}"
                );
            }
            // Those that need a key say so, and with which permission.
            if op["security"].as_array().is_some_and(|s| !s.is_empty()) {
                assert!(
                    op["x-kakuremichi-permission"].is_string(),
                    "{method} {path}"
                );
                let (s, _) = call(
                    &router,
                    Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
                    &format!("/api/v1{concrete}"),
                    false,
                )
                .await;
                assert_eq!(s, StatusCode::UNAUTHORIZED, "{method} {path} without a key");
            }
        }
    }
    assert!(operations > 80, "only {operations} operations");
    // A route known to exist, its bodies described from the code's own types.
    let create = &doc["paths"]["/resources"]["post"];
    assert_eq!(
        create["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/CreateResource"
    );
    let schema = &doc["components"]["schemas"]["CreateResource"];
    assert!(schema["required"]
        .as_array()
        .unwrap()
        .contains(&Value::from("site_id")));
    assert_eq!(schema["additionalProperties"], false, "deny_unknown_fields");
}

/// `docs/openapi.json` is the document control serves; `KAKUREMICHI_WRITE_DOCS=1` rewrites it.
#[test]
fn the_published_copy_in_docs_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    let now = serde_json::to_string_pretty(&kakuremichi_control::api::openapi()).unwrap() + "\n";
    if std::env::var_os("KAKUREMICHI_WRITE_DOCS").is_some() {
        std::fs::write(path, &now).unwrap();
    }
    let published = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        published == now,
        "docs/openapi.json is stale: KAKUREMICHI_WRITE_DOCS=1 cargo nextest run -p \
         kakuremichi-control the_published_copy_in_docs_is_current"
    );
}

/// Times answer as RFC 3339 with milliseconds; a time asked for (`/audit?since=`) may be RFC
/// 3339 or unix ms, and anything else is a clear 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn times_are_rfc3339_and_since_takes_either_form() {
    use kakuremichi_control::times::{parse_time_ms, rfc3339_ms};
    let db = common::sqlite().await;
    let router = app(common::state(&db).await);
    let req = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/sites")
        .header(header::AUTHORIZATION, format!("Bearer {ADMIN_KEY}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(r#"{"name":"home"}"#))
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let site: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let created = site["created_at"].as_str().unwrap();
    assert_eq!(created.len(), "2026-05-02T12:00:00.000Z".len(), "{created}");
    let ms = parse_time_ms(created).unwrap();
    assert_eq!(rfc3339_ms(ms), created);

    let audit = |since: String| {
        let router = router.clone();
        async move {
            call(
                &router,
                Method::GET,
                &format!("/api/v1/audit?action=POST*&since={since}"),
                true,
            )
            .await
        }
    };
    for before in [rfc3339_ms(ms - 1000), (ms - 1000).to_string()] {
        let (s, list) = audit(before.clone()).await;
        assert_eq!(s, StatusCode::OK, "{before}: {list}");
        assert_eq!(list.as_array().unwrap().len(), 1, "{before}: {list}");
        assert!(list[0]["at"].as_str().is_some_and(|t| t.ends_with('Z')));
    }
    let (s, list) = audit(rfc3339_ms(ms + 60_000)).await;
    assert_eq!(
        (s, list.as_array().map(Vec::len)),
        (StatusCode::OK, Some(0))
    );
    let (s, err) = audit("yesterday".into()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        err["message"].as_str().unwrap().contains("RFC 3339"),
        "{err}"
    );
}
