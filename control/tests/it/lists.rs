//! Search, sort and cursor pagination of the API's lists, with a thousand sites.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use http_body_util::BodyExt as _;
use kakuremichi_control::app;
use kakuremichi_proto::NodeKind;
use serde_json::Value;
use tower::ServiceExt as _;

use crate::common::{self, ADMIN_KEY};

async fn get(router: &axum::Router, path: &str) -> (StatusCode, Option<String>, usize, Value) {
    let req = Request::builder()
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {ADMIN_KEY}"))
        .body(Body::empty())
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let link = resp
        .headers()
        .get(header::LINK)
        .map(|v| v.to_str().unwrap().to_owned());
    let total = resp
        .headers()
        .get("x-total-count")
        .map_or(0, |v| v.to_str().unwrap().parse().unwrap());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        link,
        total,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sites_are_searched_sorted_and_paged_by_cursor() {
    let db = common::sqlite().await;
    let state = common::state(&db).await;
    for i in 0..1000 {
        db.store
            .create_node(
                NodeKind::Agent,
                kakuremichi_control::store::DEFAULT_ORG,
                &format!("site-{i:04}"),
                None,
            )
            .await
            .unwrap();
    }
    let router = app(state);
    // Without a query: the whole list, as always.
    let (s, link, _, all) = get(&router, "/api/v1/sites").await;
    assert_eq!((s, link), (StatusCode::OK, None));
    assert_eq!(all.as_array().unwrap().len(), 1000);
    // Pages of 100, following the next link, in name order, each once.
    let mut path = "/api/v1/sites?limit=100".to_owned();
    let mut names = Vec::new();
    let started = std::time::Instant::now();
    loop {
        let (s, link, total, page) = get(&router, &path).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        assert_eq!(total, 1000);
        names.extend(
            page.as_array()
                .unwrap()
                .iter()
                .map(|s| s["name"].as_str().unwrap().to_owned()),
        );
        let Some(link) = link else { break };
        assert!(link.ends_with("; rel=\"next\""), "{link}");
        path = link[1..link.find('>').unwrap()].to_owned();
        assert!(
            path.starts_with("/api/v1/sites?limit=100&cursor="),
            "{path}"
        );
    }
    println!("ten pages of 100 in {:?}", started.elapsed());
    let want: Vec<String> = (0..1000).map(|i| format!("site-{i:04}")).collect();
    assert_eq!(names, want);
    // Search and reverse sort.
    let (_, link, total, page) = get(&router, "/api/v1/sites?q=SITE-09&sort=-name&limit=5").await;
    assert_eq!(total, 100);
    assert!(link
        .unwrap()
        .contains("q=SITE-09&sort=-name&limit=5&cursor="));
    let got: Vec<&str> = page
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        got,
        [
            "site-0999",
            "site-0998",
            "site-0997",
            "site-0996",
            "site-0995"
        ]
    );
    // Bad queries: clear 400s.
    for bad in [
        "limit=0",
        "limit=5000",
        "cursor=nope",
        "sort=a%20b",
        "colour=red",
    ] {
        let (s, _, _, e) = get(&router, &format!("/api/v1/sites?{bad}")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {e}");
    }
}
