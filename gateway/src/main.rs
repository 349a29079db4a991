//! `kakuremichi-gateway`: see the library docs.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use kakuremichi_gateway::config::Cli;
use kakuremichi_gateway::{Gateway, GatewayOptions, ProxyTimeouts};
use kakuremichi_node::channel::{run_channel, ChannelConfig, ChannelState};
use kakuremichi_proto::NodeKind;
use tokio::sync::watch;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(error) => {
            tracing::error!(%error, "cannot start the runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = cli.resolve().context("invalid settings")?;
    let control = match &settings.control {
        Some(c) => c.clone(),
        None => kakuremichi_node::NodeState::load(&settings.data_dir)
            .context("reading the node state")?
            .map(|s| s.control_url)
            .context("--control is required (KAKUREMICHI_GATEWAY_CONTROL)")?,
    };
    let state = kakuremichi_node::load_or_enroll(
        &settings.data_dir,
        &control,
        NodeKind::Gateway,
        settings.token.as_ref(),
    )
    .await
    .context("enrollment")?;
    tracing::info!(node_id = %state.node_id, public_key = %state.private_key.public_key(), "gateway identity");

    let gateway = Gateway::new(GatewayOptions {
        data_dir: settings.data_dir.clone(),
        wg_listen: settings.wg_listen,
        private_key: state.private_key.0,
        timeouts: ProxyTimeouts {
            connect: settings.connect_timeout,
            response: settings.upstream_timeout,
        },
    });
    let cached = gateway.cached_config();
    let cached_version = cached.as_ref().map(|c| c.version);
    if let Some(snapshot) = cached {
        let version = snapshot.version;
        gateway
            .apply(snapshot, false)
            .await
            .context("applying the cached config")?;
        tracing::info!(version, "serving the cached config");
    } else {
        tracing::info!("no cached config: waiting for control's first snapshot");
    }

    let listener = tokio::net::TcpListener::bind(settings.http_listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", settings.http_listen))?;
    tracing::info!(addr = %settings.http_listen, "serving HTTP");
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let server = tokio::spawn(kakuremichi_gateway::serve_http(
        listener,
        gateway.proxy(),
        shutdown_rx,
        Duration::from_secs(10),
    ));

    let metrics_task = match settings.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr}"))?;
            tracing::info!(%addr, "serving metrics at /metrics");
            Some(tokio::spawn(kakuremichi_gateway::metrics::serve_metrics(
                listener,
                gateway.metrics(),
            )))
        }
        None => None,
    };
    let memory = tokio::spawn(
        gateway
            .clone()
            .run_endpoint_memory(Duration::from_millis(250)),
    );
    let (state_tx, _state_rx) = watch::channel(ChannelState::Connecting);
    let channel = tokio::spawn(run_channel(
        ChannelConfig::new(&state, settings.data_dir.clone()),
        Arc::new(gateway.clone()),
        cached_version,
        state_tx,
    ));

    shutdown_signal().await;
    tracing::info!("shutting down");
    channel.abort();
    memory.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    let _ = shutdown_tx.send(true);
    let _ = server.await;
    gateway.remember_endpoints();
    gateway.shutdown();
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
