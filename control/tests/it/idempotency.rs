//! `Idempotency-Key` on creates, on both stores.

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use http_body_util::BodyExt as _;
use kakuremichi_control::app;
use serde_json::{json, Value};
use tower::ServiceExt as _;

use crate::common::{self, ADMIN_KEY};

async fn call(
    router: &axum::Router,
    key: &str,
    path: &str,
    body: Value,
    idem: Option<&str>,
) -> (StatusCode, Option<String>, Value) {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(k) = idem {
        req = req.header("idempotency-key", k);
    }
    let resp = router
        .clone()
        .oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let replayed = resp
        .headers()
        .get("idempotent-replayed")
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        replayed,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn sites(router: &axum::Router) -> usize {
    let req = Request::builder()
        .uri("/api/v1/sites")
        .header(header::AUTHORIZATION, format!("Bearer {ADMIN_KEY}"))
        .body(Body::empty())
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice::<Value>(&bytes)
        .unwrap()
        .as_array()
        .unwrap()
        .len()
}

async fn a_retried_create_makes_one_object_and_gets_the_first_answer(mut db: common::TestDb) {
    db.store =
        db.store
            .clone()
            .with_sealer(std::sync::Arc::new(kakuremichi_control::seal::Sealer::new(
                [7; 32],
            )));
    let state = common::state(&db).await;
    let router = app(state);
    let site = json!({"name": "home"});
    let (s1, r1, first) = call(
        &router,
        ADMIN_KEY,
        "/api/v1/sites",
        site.clone(),
        Some("k-1"),
    )
    .await;
    assert_eq!((s1, r1), (StatusCode::CREATED, None), "{first}");
    // The retry: the same answer (its one-time token too), no second site.
    let (s2, r2, again) = call(
        &router,
        ADMIN_KEY,
        "/api/v1/sites",
        site.clone(),
        Some("k-1"),
    )
    .await;
    assert_eq!((s2, r2.as_deref()), (StatusCode::CREATED, Some("true")));
    assert_eq!(again, first);
    assert_eq!(sites(&router).await, 1);
    // The same key for another request: refused, nothing made.
    let (s, _, e) = call(
        &router,
        ADMIN_KEY,
        "/api/v1/sites",
        json!({"name": "other"}),
        Some("k-1"),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert!(e["message"].as_str().unwrap().contains("another request"));
    assert_eq!(sites(&router).await, 1);
    // A refused create is kept too: the retry is refused the same way.
    let (s, _, e) = call(
        &router,
        ADMIN_KEY,
        "/api/v1/sites",
        json!({"name": ""}),
        Some("k-2"),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    let (s, r, _) = call(
        &router,
        ADMIN_KEY,
        "/api/v1/sites",
        json!({"name": ""}),
        Some("k-2"),
    )
    .await;
    assert_eq!((s, r.as_deref()), (StatusCode::BAD_REQUEST, Some("true")));
    // Another API key's "k-1" is its own.
    let (s, _, made) = call(
        &router,
        ADMIN_KEY,
        "/api/v1/api-keys",
        json!({"name": "ci", "scopes": ["site:write", "site:read"]}),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{made}");
    let ci = made["secret"].as_str().unwrap();
    let (s, r, other) = call(
        &router,
        ci,
        "/api/v1/sites",
        json!({"name": "ci-site"}),
        Some("k-1"),
    )
    .await;
    assert_eq!((s, r), (StatusCode::CREATED, None), "{other}");
    assert_ne!(other["id"], first["id"]);
    assert_eq!(sites(&router).await, 2);
    // Without a key: every POST runs; a bad key is a clear 400.
    let (s, _, _) = call(
        &router,
        ADMIN_KEY,
        "/api/v1/sites",
        json!({"name": "n1"}),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _, e) = call(
        &router,
        ADMIN_KEY,
        "/api/v1/sites",
        json!({"name": "n2"}),
        Some(&"x".repeat(256)),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert!(e["message"].as_str().unwrap().contains("Idempotency-Key"));
    assert_eq!(sites(&router).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_sqlite() {
    a_retried_create_makes_one_object_and_gets_the_first_answer(common::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_postgres() {
    a_retried_create_makes_one_object_and_gets_the_first_answer(common::postgres().await).await;
}
