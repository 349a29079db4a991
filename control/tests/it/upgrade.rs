//! Upgrading a store that holds data: a database migrated by an earlier version (up to 0003,
//! before TCP resources rebuilt the resources table on SQLite) keeps its sites, resources and
//! credentials after the remaining migrations run at start.

use std::borrow::Cow;

use kakuremichi_control::overlay::OverlayNet;
use kakuremichi_control::store::Store;
use kakuremichi_proto::{NodeKind, RouteProtocol};
use sqlx::Connection as _;

const SITE: &str = "00000000-0000-0000-0000-00000000000a";
const RESOURCE: &str = "00000000-0000-0000-0000-00000000000b";

/// Runs the first `n` migrations of `migrator` on `url`, then writes rows as that version would.
async fn at_migration_3(url: &str, migrator: sqlx::migrate::Migrator) {
    sqlx::any::install_default_drivers();
    let mut m = migrator;
    m.migrations = Cow::Owned(m.migrations[..3].to_vec());
    let pool = sqlx::AnyPool::connect(url).await.unwrap();
    m.run(&pool).await.unwrap();
    sqlx::query(
        "INSERT INTO sites (id, name, overlay_address, created_at, public_key, credential_hash) \
         VALUES ($1, 'home', '100.64.0.2', 1, 'AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=', 'sha256$x')",
    )
    .bind(SITE)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO resources (id, name, hostname, site_id, target, overlay_port, created_at) \
         VALUES ($1, 'demo', 'demo.localhost', $2, '127.0.0.1:9000', 10000, 2)",
    )
    .bind(RESOURCE)
    .bind(SITE)
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
}

async fn check(store: &Store) {
    let resources = store.list_resources().await.unwrap();
    assert_eq!(resources.len(), 1);
    let r = &resources[0];
    assert_eq!(r.id.to_string(), RESOURCE);
    assert_eq!(r.hostname, "demo.localhost");
    // 0013: what existed before organizations is the default organization's.
    assert_eq!(r.org_id, kakuremichi_control::store::DEFAULT_ORG);
    assert_eq!(r.protocol, RouteProtocol::Http);
    assert_eq!(r.public_port, None);
    assert!(!r.redirect_https);
    // 0007: one target, balanced round robin, no sticky sessions and no health check.
    assert!(r.more_targets.is_empty());
    assert_eq!(r.balance, kakuremichi_proto::Balance::RoundRobin);
    assert!(!r.sticky);
    assert_eq!(r.health_check, None);
    let site = store
        .get_node(NodeKind::Agent, SITE.parse().unwrap())
        .await
        .unwrap();
    assert!(site.enrolled());
    assert_eq!(site.org_id, kakuremichi_control::store::DEFAULT_ORG);
    // The upgraded table takes new rows of both kinds.
    let tcp = store
        .create_resource(&kakuremichi_control::store::NewResource {
            name: "db".into(),
            protocol: RouteProtocol::Tcp,
            hostname: String::new(),
            public_port: None,
            redirect_https: false,
            hsts_max_age: None,
            site_id: site.id,
            target: "127.0.0.1:5432".into(),
            balance: Default::default(),
            sticky: false,
            health_check: None,
            limits: Default::default(),
            proxy_protocol: false,
            more_targets: vec![],
            access: None,
            policy_id: None,
        })
        .await
        .unwrap();
    assert_eq!(tcp.overlay_port, 10001);
}

#[tokio::test]
async fn a_sqlite_store_from_migration_3_upgrades_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("control.db").display()
    );
    at_migration_3(&url, sqlx::migrate!("../migrations/sqlite")).await;
    let store = Store::connect(&url, OverlayNet::DEFAULT).await.unwrap();
    check(&store).await;
}

#[tokio::test]
async fn a_postgres_store_from_migration_3_upgrades_with_its_data() {
    let base = crate::common::postgres_url();
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&base).await.unwrap();
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
    at_migration_3(&url, sqlx::migrate!("../migrations/postgres")).await;
    let store = Store::connect_with(&url, OverlayNet::DEFAULT, 2)
        .await
        .unwrap();
    check(&store).await;
    store.close().await;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&mut conn)
        .await
        .unwrap();
}
