//! `kakuremichi-agent`: see the library docs.

use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser as _;
use kakuremichi_agent::config::Cli;
use kakuremichi_agent::{Agent, AgentOptions};
use kakuremichi_node::{process, ChannelState};
use kakuremichi_proto::NodeKind;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    process::run_main(cli.log.log_format, run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let fallback = cli.resolve_fallback().context("invalid settings")?;
    let all = cli.resolve_all().context("invalid settings")?;
    let settings = all.node;
    let state = process::load_identity(&settings, NodeKind::Agent).await?;
    kakuremichi_node::traces::start(all.otlp.as_ref(), NodeKind::Agent, &state)?;

    let agent = Agent::new(AgentOptions {
        data_dir: settings.data_dir.clone(),
        wg_listen: settings.wg_listen,
        private_key: state.private_key.0,
        quic: settings.quic.clone(),
        sessions: Some(all.sessions),
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

    process::shutdown_signal().await;
    channel.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    // A graceful stop ends every session (their processes get the grace period).
    agent.stop_sessions().await;
    agent.shutdown();
    Ok(())
}
