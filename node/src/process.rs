//! The process around a node: logging, the runtime, identity at startup, serving the cached
//! config, starting the control channel and waiting for a shutdown signal. Each binary's `main`
//! strings these together around its own runtime object.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use kakuremichi_proto::{ConfigSnapshot, NodeKind};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::channel::{run_channel_until, ChannelConfig, ChannelState, NodeHooks};
use crate::control_url::check_control_urls;
use crate::settings::NodeSettings;
use crate::state::NodeState;

/// Logs to stderr as `format` says (filter from `RUST_LOG`, default `info`), runs `run` on a Tokio
/// runtime of `worker_threads` threads and turns its result into the exit code; an error is logged with its causes. Traces,
/// if `run` started them, are flushed at the end.
pub fn run_main(
    format: crate::settings::LogFormat,
    worker_threads: usize,
    run: impl Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    // Traces (if asked) start once the node knows its id: `crate::traces::start`.
    kakuremichi_telemetry::init(format == crate::settings::LogFormat::Json);
    // Every client connection and upstream socket is a file: take the hard limit.
    if let Err(error) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(%error, "cannot raise the open-files limit");
    }
    crate::memory::limit_arenas();
    tracing::debug!(worker_threads, "starting the runtime");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads.max(1))
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(r) => r,
        Err(error) => {
            tracing::error!(%error, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    // After a load, give what the allocator keeps back to the system.
    runtime.spawn(crate::memory::return_freed_memory());
    let code = match runtime.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    };
    // The spans still queued go out before the process ends.
    kakuremichi_telemetry::shutdown();
    code
}

/// The node's identity: `state.json` if it enrolled before, else a fresh enrollment with the
/// token. The control URL (one, or a comma-separated list for several control replicas) defaults
/// to the enrolled one; either way each URL must pass [`check_control_urls`] before the token or
/// the credential is sent to it.
pub async fn load_identity(settings: &NodeSettings, kind: NodeKind) -> anyhow::Result<NodeState> {
    let control = match &settings.control {
        Some(c) => {
            check_control_urls(c, settings.allow_insecure_control).context("--control")?;
            c.clone()
        }
        None => {
            let url = NodeState::load(&settings.data_dir)
                .context("reading the node state")?
                .map(|s| s.control_url)
                .with_context(|| {
                    format!(
                        "--control is required (KAKUREMICHI_{}_CONTROL)",
                        kind.to_string().to_uppercase()
                    )
                })?;
            check_control_urls(&url, settings.allow_insecure_control).with_context(|| {
                format!(
                    "the control URL this node enrolled with ({}); pass --control to change it",
                    NodeState::path(&settings.data_dir).display()
                )
            })?;
            url
        }
    };
    let state =
        crate::enroll::load_or_enroll(&settings.data_dir, &control, kind, settings.token.as_ref())
            .await
            .context("enrollment")?;
    tracing::info!(node_id = %state.node_id, public_key = %state.private_key.public_key(), "{kind} identity");
    Ok(state)
}

/// Applies the config cached by a previous run (with `apply`, which should not rewrite the cache),
/// so the node serves before control answers. Returns its version, for the channel's hello.
pub async fn serve_cached_config<F, Fut, E>(
    cached: Option<ConfigSnapshot>,
    apply: F,
) -> anyhow::Result<Option<u64>>
where
    F: FnOnce(ConfigSnapshot) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let Some(snapshot) = cached else {
        tracing::info!("no cached config: waiting for control's first snapshot");
        return Ok(None);
    };
    let version = snapshot.version;
    apply(snapshot)
        .await
        .context("applying the cached config")?;
    tracing::info!(version, "serving the cached config");
    Ok(Some(version))
}

/// Starts the control channel for this node; the receiver follows the channel's state.
pub fn spawn_channel<H: NodeHooks>(
    state: &NodeState,
    data_dir: PathBuf,
    hooks: Arc<H>,
    applied_version: Option<u64>,
) -> (Channel, watch::Receiver<ChannelState>) {
    let (state_tx, state_rx) = watch::channel(ChannelState::Connecting);
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(run_channel_until(
        ChannelConfig::new(state, data_dir),
        hooks,
        applied_version,
        state_tx,
        stop_rx,
    ));
    (Channel { task, stop }, state_rx)
}

/// The running control channel of a node.
#[derive(Debug)]
pub struct Channel {
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl Channel {
    /// Tells control this node is leaving (a WebSocket close frame, when connected) and stops
    /// the channel; gives up after `within`.
    pub async fn leave(self, within: std::time::Duration) {
        self.stop.send_replace(true);
        let mut task = self.task;
        if tokio::time::timeout(within, &mut task).await.is_err() {
            task.abort();
        }
    }
}

/// SIGHUP, from the start of the process (installing the handler early also keeps SIGHUP's
/// default action, ending the process, away). `None` where signals are not available.
pub fn hangups() -> Option<impl futures_util::Stream<Item = ()> + Unpin> {
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(mut s) => Some(Box::pin(futures_util::stream::poll_fn(move |cx| {
                s.poll_recv(cx)
            }))),
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGHUP: no config reloads");
                None
            }
        }
    }
    #[cfg(not(unix))]
    {
        None::<futures_util::stream::Pending<()>>
    }
}

/// Serves SIGHUPs from `hangups` (made by [`hangups`] at start): on each, `reload` runs (it
/// reads and applies the config file and logs what it did). Never returns.
pub async fn serve_hangups<S>(hangups: Option<S>, mut reload: impl FnMut())
where
    S: futures_util::Stream<Item = ()> + Unpin,
{
    use futures_util::StreamExt as _;
    let Some(mut hups) = hangups else {
        return std::future::pending().await;
    };
    while hups.next().await.is_some() {
        tracing::info!("SIGHUP: reloading the config file");
        reload();
    }
    std::future::pending().await
}

/// Waits for Ctrl-C or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
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
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::PrivateKey;
    use kakuremichi_proto::Secret;
    use kakuremichi_tunnel::QuicSettings;

    fn settings(data_dir: &std::path::Path, control: Option<&str>, allow: bool) -> NodeSettings {
        NodeSettings {
            control: control.map(Into::into),
            token: None,
            allow_insecure_control: allow,
            data_dir: data_dir.to_owned(),
            wg_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            quic: QuicSettings::default(),
        }
    }

    fn enrolled(data_dir: &std::path::Path, control_url: &str) -> NodeState {
        let state = NodeState {
            node_id: uuid::Uuid::from_u128(7),
            kind: NodeKind::Agent,
            credential: Secret::new("kmc_secret"),
            private_key: PrivateKey([9; 32]),
            control_url: control_url.into(),
            overlay_address: None,
        };
        state.save(data_dir).unwrap();
        state
    }

    #[tokio::test]
    async fn the_enrolled_control_url_is_checked_too() {
        let dir = tempfile::tempdir().unwrap();
        let state = enrolled(dir.path(), "http://10.0.0.1:3000");
        let err = load_identity(&settings(dir.path(), None, false), NodeKind::Agent)
            .await
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("state.json"), "{text}");
        assert!(text.contains("http://10.0.0.1:3000 is not HTTPS"), "{text}");
        assert!(!text.contains("kmc_secret"), "{text}");
        // With the flag it starts from the state (no network needed).
        let got = load_identity(&settings(dir.path(), None, true), NodeKind::Agent)
            .await
            .unwrap();
        assert_eq!(got, state);
        // An HTTPS --control replaces the enrolled URL; the check is on the URL in use.
        let got = load_identity(
            &settings(dir.path(), Some("https://control.example.com"), false),
            NodeKind::Agent,
        )
        .await
        .unwrap();
        assert_eq!(got.control_url, "https://control.example.com");
        let err = load_identity(
            &settings(dir.path(), Some("http://example.com"), false),
            NodeKind::Agent,
        )
        .await
        .unwrap_err();
        assert!(format!("{err:#}").contains("not HTTPS"), "{err:#}");
        assert_eq!(
            NodeState::load(dir.path()).unwrap().map(|s| s.control_url),
            Some("https://control.example.com".to_owned()),
            "a refused --control does not touch the state"
        );
    }

    #[tokio::test]
    async fn every_enrolled_control_url_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        enrolled(dir.path(), "https://c1.example.com,http://10.0.0.2:3000");
        let err = load_identity(&settings(dir.path(), None, false), NodeKind::Agent)
            .await
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("http://10.0.0.2:3000 is not HTTPS"), "{text}");
        // A list on --control replaces the enrolled one, normalized.
        let got = load_identity(
            &settings(
                dir.path(),
                Some(" https://c1.example.com/ , https://c2.example.com/"),
                false,
            ),
            NodeKind::Agent,
        )
        .await
        .unwrap();
        assert_eq!(
            got.control_url,
            "https://c1.example.com,https://c2.example.com"
        );
        let err = load_identity(&settings(dir.path(), Some(","), false), NodeKind::Agent)
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("no control URL"), "{err:#}");
    }

    #[tokio::test]
    async fn an_enrolled_loopback_url_needs_no_flag() {
        let dir = tempfile::tempdir().unwrap();
        let state = enrolled(dir.path(), "http://127.0.0.1:3000");
        let got = load_identity(&settings(dir.path(), None, false), NodeKind::Agent)
            .await
            .unwrap();
        assert_eq!(got, state);
    }
}
