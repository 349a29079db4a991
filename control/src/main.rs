//! The `kakuremichi-control` binary: parses settings, opens the store, seeds or prints the admin
//! key, and serves the API, the node hub and the admin page until SIGTERM or ctrl-c.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use kakuremichi_control::config::{FileConfig, RawSettings};
use kakuremichi_control::store::{Backend, Store};
use kakuremichi_control::{app, AppState};
use kakuremichi_proto::Secret;
use tracing_subscriber::EnvFilter;

/// kakuremichi control: REST API, node WebSocket hub and store.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Address to listen on (API, web UI, node WebSocket). Default 127.0.0.1:3000.
    #[arg(long, env = "KAKUREMICHI_CONTROL_LISTEN")]
    listen: Option<String>,
    /// Data directory (holds control.db with the default database). Default ./data.
    #[arg(long, env = "KAKUREMICHI_CONTROL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Database URL: sqlite://FILE or postgres://... Default sqlite://DATA_DIR/control.db.
    #[arg(long, env = "KAKUREMICHI_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Overlay network addresses are allocated from. Default 100.64.0.0/10.
    #[arg(long, env = "KAKUREMICHI_OVERLAY_CIDR")]
    overlay_cidr: Option<String>,
    /// Admin key (kma_<id>_<secret>) to seed when the store has none.
    #[arg(long, env = "KAKUREMICHI_INITIAL_ADMIN_KEY", hide_env_values = true)]
    initial_admin_key: Option<String>,
    /// TOML file with the same settings (snake_case keys); the command line and env win.
    #[arg(long, env = "KAKUREMICHI_CONTROL_CONFIG")]
    config: Option<PathBuf>,
}

#[allow(clippy::print_stdout)]
fn print_admin_key_banner(key: &Secret) {
    println!();
    println!("================================================================================");
    println!(" kakuremichi: a new admin API key was generated. It is shown only this once.");
    println!();
    println!("   {}", key.expose());
    println!();
    println!(" Use it as: Authorization: Bearer <key>");
    println!("================================================================================");
    println!();
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let file = match &cli.config {
        Some(path) => FileConfig::read(path)?,
        None => FileConfig::default(),
    };
    let settings = RawSettings {
        listen: cli.listen,
        data_dir: cli.data_dir,
        database_url: cli.database_url,
        overlay_cidr: cli.overlay_cidr,
        initial_admin_key: cli.initial_admin_key.map(Secret::new),
    }
    .over(file)
    .validate()?;

    if Backend::of_url(&settings.database_url) == Some(Backend::Sqlite) {
        std::fs::create_dir_all(&settings.data_dir).with_context(|| {
            format!(
                "cannot create data directory {}",
                settings.data_dir.display()
            )
        })?;
    }
    let store = Store::connect(&settings.database_url, settings.overlay)
        .await
        .context("cannot open the database")?;
    if let Some(key) = store
        .ensure_admin_key(settings.initial_admin_key.as_ref())
        .await
        .context("cannot set up the admin key")?
    {
        print_admin_key_banner(&key);
    }

    let state = AppState::new(store.clone());
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let bound = listener
        .local_addr()
        .context("cannot read the listen address")?;
    tracing::info!(
        listen = %bound,
        overlay = %settings.overlay,
        version = store.config_version().await.unwrap_or_default(),
        "kakuremichi control is up"
    );
    let router = app(state.clone());
    let shutdown_state = state.clone();
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            shutdown_state.shutdown();
        })
        .await
        .context("server failed")?;
    store.close().await;
    Ok(())
}
