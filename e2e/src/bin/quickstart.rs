//! The quickstart: starts control (SQLite), a gateway, an agent and the demo private app on
//! loopback, publishes the app at http://demo.localhost:8080 (and https://demo.localhost:8443 with a
//! self-signed development certificate), prints where to look, and runs
//! until Ctrl-C. It uses the release binaries next to it (build them with
//! `cargo build --release --workspace --bins`, which `scripts/quickstart` does).

#![allow(clippy::print_stdout)]

use std::net::SocketAddr;

use anyhow::Context as _;
use kakuremichi_e2e::{Stack, StackOptions, DEMO_HOST};
use rand::distributions::{Alphanumeric, DistString as _};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let admin_key = format!(
        "kma_{}_{}",
        uuid::Uuid::new_v4().simple(),
        Alphanumeric.sample_string(&mut rand::thread_rng(), 32)
    );
    let opts = StackOptions {
        control_listen: SocketAddr::from(([127, 0, 0, 1], 3000)),
        control_url_for_test: "http://127.0.0.1:3000".into(),
        control_url_for_nodes: "http://127.0.0.1:3000".into(),
        gateway_http_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
        gateway_http_for_test: SocketAddr::from(([127, 0, 0, 1], 8080)),
        gateway_wg_listen: SocketAddr::from(([127, 0, 0, 1], 51820)),
        gateway_endpoint: "127.0.0.1:51820".into(),
        app_listen: SocketAddr::from(([127, 0, 0, 1], 9000)),
        admin_key: admin_key.clone(),
        gateway_args: vec![
            "--https-listen".into(),
            "127.0.0.1:8443".into(),
            "--tls-self-signed".into(),
            "--http3".into(),
        ],
        ..StackOptions::loopback()
    };
    println!("starting control, a gateway, an agent and the demo app on loopback...");
    let stack = Stack::start_with(opts).await.context(
        "starting the quickstart (are ports 3000, 8080, 8443, 9000 and UDP 51820 free?)",
    )?;
    // The admin who signs in to the console.
    let admin_password = Alphanumeric.sample_string(&mut rand::thread_rng(), 16);
    let (status, body) = stack
        .api
        .call(
            reqwest::Method::POST,
            "/api/v1/users",
            Some(serde_json::json!({
                "email": "admin@example.com", "name": "Admin", "password": admin_password,
                "roles": ["owner"]
            })),
        )
        .await
        .context("creating the admin")?;
    anyhow::ensure!(status == 201, "creating the admin: {status} {body}");
    // A second resource that needs sign-in, and a user who may reach it.
    let password = Alphanumeric.sample_string(&mut rand::thread_rng(), 16);
    kakuremichi_e2e::identity::private_resource(
        &stack,
        serde_json::json!({
            "email": "demo@example.com", "name": "Demo User", "password": password
        }),
        serde_json::json!({}),
    )
    .await
    .context("setting up the resource behind sign-in")?;
    println!(
        r#"
kakuremichi is running.

  Your app, through the tunnel:  http://{DEMO_HOST}:8080/
      try: curl http://{DEMO_HOST}:8080/
  The same over HTTPS:           https://{DEMO_HOST}:8443/ (HTTP/1.1, HTTP/2, HTTP/3)
      with a self-signed development certificate: curl -k https://{DEMO_HOST}:8443/
  The same app behind sign-in:   http://private.localhost:8080/headers
      sign in as demo@example.com with password {password}
      (the app sees who you are: Remote-User and a signed Kakuremichi-Jwt-Assertion, which
       http://private.localhost:8080/identity verifies against
       http://127.0.0.1:3000/.well-known/kakuremichi/jwks.json)
  Admin console:                 http://127.0.0.1:3000/
      sign in as admin@example.com with password {admin_password}
  Admin API key (shown once):    {admin_key}
      try: curl -H 'Authorization: Bearer {admin_key}' http://127.0.0.1:3000/api/v1/resources
  Data folders and logs:         {}

Press Ctrl-C to stop everything.
"#,
        stack.dir.path().display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    println!("stopping");
    drop(stack);
    Ok(())
}
