//! `kakuremichi-gateway`: see the library docs.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use kakuremichi_gateway::config::Cli;
use kakuremichi_gateway::{Gateway, GatewayOptions, ProxyTimeouts};
use kakuremichi_node::process;
use kakuremichi_proto::NodeKind;
use tokio::sync::watch;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    process::run_main(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = cli.resolve().context("invalid settings")?;
    let state = process::load_identity(&settings.node, NodeKind::Gateway).await?;

    let gateway = Gateway::new(GatewayOptions {
        data_dir: settings.node.data_dir.clone(),
        wg_listen: settings.node.wg_listen,
        private_key: state.private_key.0,
        timeouts: ProxyTimeouts {
            connect: settings.connect_timeout,
            response: settings.upstream_timeout,
        },
        quic: settings.node.quic.clone(),
    });
    let cached_version =
        process::serve_cached_config(gateway.cached_config(), |s| gateway.apply(s, false)).await?;

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
    let channel = process::spawn_channel(
        &state,
        settings.node.data_dir.clone(),
        Arc::new(gateway.clone()),
        cached_version,
    );

    process::shutdown_signal().await;
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
