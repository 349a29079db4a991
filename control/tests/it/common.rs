//! Test helpers: a store on a fresh SQLite file or a fresh PostgreSQL schema, and a test app.

#![allow(dead_code)]

use std::net::SocketAddr;

use kakuremichi_control::overlay::OverlayNet;
use kakuremichi_control::store::Store;
use kakuremichi_control::{app, AppState};
use kakuremichi_proto::Secret;
use sqlx::Connection as _;

pub const ADMIN_KEY: &str = "kma_0123456789abcdef0123456789abcdef_testsecretvalue";

pub fn postgres_url() -> String {
    std::env::var("KAKUREMICHI_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A store and what keeps its database alive; dropping it removes the database.
pub struct TestDb {
    pub store: Store,
    pub backend: &'static str,
    _dir: Option<tempfile::TempDir>,
    _schema: Option<SchemaGuard>,
}

/// Drops a PostgreSQL test schema, even when the test panicked.
pub struct SchemaGuard {
    schema: String,
}

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        let schema = self.schema.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&postgres_url()).await.unwrap();
                sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                    .execute(&mut conn)
                    .await
                    .unwrap();
            })
        })
        .join();
    }
}

pub async fn sqlite() -> TestDb {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("control.db").display()
    );
    let store = Store::connect(&url, OverlayNet::DEFAULT).await.unwrap();
    TestDb {
        store,
        backend: "sqlite",
        _dir: Some(dir),
        _schema: None,
    }
}

/// A store in a fresh schema `t_<random>`; panics (fails the test) if PostgreSQL is unreachable.
pub async fn postgres() -> TestDb {
    let (url, guard) = empty_postgres().await;
    let store = Store::connect_with(&url, OverlayNet::DEFAULT, 4)
        .await
        .unwrap();
    TestDb {
        store,
        backend: "postgres",
        _dir: None,
        _schema: Some(guard),
    }
}

/// The URL of a fresh, empty PostgreSQL schema (nothing migrated), and its guard.
pub async fn empty_postgres() -> (String, SchemaGuard) {
    let base = postgres_url();
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&base)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {base} is unreachable: {e}"));
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let guard = SchemaGuard {
        schema: schema.clone(),
    };
    let sep = if base.contains('?') { '&' } else { '?' };
    (
        format!("{base}{sep}options=-c%20search_path%3D{schema}"),
        guard,
    )
}

/// Runs a store test body.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    let db = $crate::common::sqlite().await;
                    super::$name(db.store.clone()).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    let db = $crate::common::postgres().await;
                    super::$name(db.store.clone()).await;
                }
            }
        )*
    };
}

/// An app state on a fresh SQLite store with [`ADMIN_KEY`] seeded.
pub async fn state(db: &TestDb) -> AppState {
    db.store
        .ensure_admin_key(Some(&Secret::new(ADMIN_KEY)))
        .await
        .unwrap();
    AppState::new(db.store.clone())
}

/// Serves the app on an ephemeral port.
pub async fn serve(state: AppState) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        kakuremichi_control::serve::serve(
            listener,
            app(state),
            kakuremichi_control::serve::ServeOptions::default(),
            std::future::pending(),
            std::time::Duration::from_secs(1),
        )
        .await;
    });
    addr
}

/// A browser of sorts: keeps cookies, follows no redirect.
pub struct Client {
    pub base: String,
    pub http: reqwest::Client,
    pub jar: std::collections::HashMap<String, String>,
}

impl Client {
    pub fn cookies(&self) -> String {
        self.jar
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Sends with the jar's cookies, keeps the ones set: (status, Location, body).
    pub async fn send(
        &mut self,
        req: reqwest::RequestBuilder,
    ) -> (reqwest::StatusCode, Option<String>, String) {
        let r = req
            .header(reqwest::header::COOKIE, self.cookies())
            .send()
            .await
            .unwrap();
        for v in r.headers().get_all(reqwest::header::SET_COOKIE) {
            let first = v.to_str().unwrap().split(';').next().unwrap();
            let (k, v) = first.split_once('=').unwrap();
            self.jar.insert(k.to_owned(), v.to_owned());
        }
        let location = r
            .headers()
            .get(reqwest::header::LOCATION)
            .map(|l| l.to_str().unwrap().to_owned());
        (r.status(), location, r.text().await.unwrap())
    }

    /// Sends with the jar's cookies; the answer unread (a stream stays open until dropped).
    pub async fn send_raw(&self, req: reqwest::RequestBuilder) -> reqwest::Response {
        req.header(reqwest::header::COOKIE, self.cookies())
            .send()
            .await
            .unwrap()
    }

    /// Calls the API with the admin key; a failure panics.
    pub async fn api(
        &mut self,
        method: reqwest::Method,
        path: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
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

/// The value of the hidden input `name` in a page.
pub fn hidden(html: &str, name: &str) -> String {
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
