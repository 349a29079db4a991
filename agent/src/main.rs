//! `kakuremichi-agent`: see the library docs.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use kakuremichi_agent::config::Cli;
use kakuremichi_agent::{Agent, AgentOptions};
use kakuremichi_node::{process, ChannelState};
use kakuremichi_proto::NodeKind;
use tokio::sync::watch;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    process::run_main(cli.log.log_format, cli.runtime.worker_threads(), run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Before anything else: a SIGHUP must reload, never end the process.
    let hangups = process::hangups();
    let fallback = cli.resolve_fallback().context("invalid settings")?;
    let all = cli.clone().resolve_all().context("invalid settings")?;
    let settings = all.node.clone();
    let state = process::load_identity(&settings, NodeKind::Agent).await?;
    kakuremichi_node::traces::start(all.otlp.as_ref(), NodeKind::Agent, &state)?;

    let agent = Agent::new(AgentOptions {
        data_dir: settings.data_dir.clone(),
        wg_listen: settings.wg_listen,
        private_key: state.private_key.0,
        quic: settings.quic.clone(),
        sessions: Some(all.sessions.clone()),
        fallback,
    });
    let cached_version =
        process::serve_cached_config(agent.cached_config(), |s| agent.apply(s, false)).await?;
    let (channel, channel_state) = process::spawn_channel(
        &state,
        settings.data_dir.clone(),
        Arc::new(agent.clone()),
        cached_version,
    );
    let metrics_task = match all.metrics_listen {
        Some(addr) => {
            let agent = agent.clone();
            Some(
                kakuremichi_node::metrics::listen(addr, move || {
                    agent.render_metrics(*channel_state.borrow() == ChannelState::Connected)
                })
                .await?,
            )
        }
        None => None,
    };

    // SIGHUP: read the file again and apply what can change live.
    let (grace_tx, grace_rx) = watch::channel(all.shutdown_grace);
    let reloads = {
        let mut running = all;
        tokio::spawn(process::serve_hangups(hangups, move || {
            let fresh = match cli.clone().resolve_all() {
                Ok(s) => s,
                Err(error) => {
                    tracing::error!(
                        %error,
                        "config reload failed: the file is not valid; keeping the config in force"
                    );
                    return;
                }
            };
            let (changes, next) = kakuremichi_agent::reload::reload(&running, &fresh);
            grace_tx.send_replace(next.shutdown_grace);
            changes.log();
            running = next;
        }))
    };

    process::shutdown_signal().await;
    if let Some(t) = metrics_task {
        t.abort();
    }
    reloads.abort();
    let started = tokio::time::Instant::now();
    let grace = *grace_rx.borrow();
    tracing::info!(
        ?grace,
        streams = agent.streams_in_flight(),
        "refusing new streams; those in flight have the grace period to finish"
    );
    // Control hears this agent is leaving; streams in flight finish within the grace period;
    // and every session ends as before (SIGTERM, SIGKILL after its own grace period).
    let leave = channel.leave(Duration::from_secs(1).min(grace.max(Duration::from_millis(100))));
    let drain = async {
        let left = agent.drain(grace).await;
        if left > 0 {
            tracing::warn!(
                streams = left,
                ?grace,
                "streams still open at the end of the shutdown grace period are cut"
            );
        }
    };
    tokio::join!(leave, drain, agent.stop_sessions());
    agent.shutdown();
    tracing::info!(elapsed = ?started.elapsed(), "stopped");
    Ok(())
}
