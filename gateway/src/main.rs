//! `kakuremichi-gateway`: see the library docs.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use kakuremichi_gateway::config::Cli;
use kakuremichi_gateway::listener::LiveSettings;
use kakuremichi_gateway::{Gateway, GatewayOptions, ProxyTimeouts};
use kakuremichi_node::process;
use kakuremichi_proto::NodeKind;
use tokio::sync::watch;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    process::run_main(cli.log.log_format, cli.runtime.worker_threads(), run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Before anything else: a SIGHUP must reload, never end the process.
    let hangups = process::hangups();
    let settings = cli.clone().resolve().context("invalid settings")?;
    let state = process::load_identity(&settings.node, NodeKind::Gateway).await?;
    kakuremichi_node::traces::start(settings.otlp.as_ref(), NodeKind::Gateway, &state)?;

    let gateway = Gateway::new(GatewayOptions {
        data_dir: settings.node.data_dir.clone(),
        wg_listen: settings.node.wg_listen,
        private_key: state.private_key.0,
        timeouts: ProxyTimeouts {
            connect: settings.connect_timeout,
            response: settings.upstream_timeout,
            body: settings.body_timeout,
        },
        quic: settings.node.quic.clone(),
        trusted_proxies: settings.trusted_proxies.clone(),
        tcp_listen_ip: settings.tcp_listen_ip,
        limits: settings.limits,
        https_port: settings.https.as_ref().map(|h| h.listen.port()),
    });
    let cached_version =
        process::serve_cached_config(gateway.cached_config(), |s| gateway.apply(s, false)).await?;

    let listener = kakuremichi_gateway::listener::bind_listener(settings.http_listen)
        .with_context(|| format!("cannot listen for HTTP on {}", settings.http_listen))?;
    tracing::info!(addr = %settings.http_listen, "serving HTTP");
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (limits_tx, limits_rx) = watch::channel(settings.limits);
    let (grace_tx, grace_rx) = watch::channel(settings.shutdown_grace);
    let live = LiveSettings {
        limits: limits_rx,
        drain: grace_rx.clone(),
    };
    let server = tokio::spawn(kakuremichi_gateway::listener::serve_http_live(
        listener,
        gateway.proxy(),
        live.clone(),
        shutdown_rx.clone(),
    ));

    let https_server = match &settings.https {
        None => None,
        Some(https) => {
            let resolver = kakuremichi_gateway::tls::CertResolver::new(
                https.cert_dir.as_deref(),
                https.self_signed,
                gateway.proxy().routes(),
                gateway.managed_certs(),
            )
            .context("cannot load the TLS certificates")?;
            let resolver = Arc::new(resolver);
            let tls = kakuremichi_gateway::tls::server_config(Arc::clone(&resolver))
                .context("cannot set up TLS")?;
            let listener = kakuremichi_gateway::listener::bind_listener(https.listen)
                .with_context(|| format!("cannot listen for HTTPS on {}", https.listen))?;
            let bound = listener.local_addr().unwrap_or(https.listen);
            tracing::info!(addr = %bound, self_signed = https.self_signed, "serving HTTPS");
            let alt_svc = if https.http3 {
                let config = kakuremichi_gateway::h3::server_config(resolver)
                    .context("cannot set up HTTP/3")?;
                let socket = std::net::UdpSocket::bind(bound)
                    .with_context(|| format!("cannot listen for HTTP/3 on UDP {bound}"))?;
                tracing::info!(addr = %bound, "serving HTTP/3");
                tokio::spawn(kakuremichi_gateway::h3::serve_h3(
                    socket,
                    config,
                    gateway.proxy(),
                    settings.limits,
                    shutdown_rx.clone(),
                ));
                http::HeaderValue::from_str(&format!("h3=\":{}\"; ma=86400", bound.port())).ok()
            } else {
                None
            };
            Some(tokio::spawn(
                kakuremichi_gateway::listener::serve_https_live(
                    listener,
                    gateway.proxy(),
                    live.clone(),
                    tls,
                    alt_svc,
                    shutdown_rx.clone(),
                ),
            ))
        }
    };

    let metrics_task = match settings.metrics_listen {
        Some(addr) => {
            let metrics = gateway.metrics();
            Some(kakuremichi_node::metrics::listen(addr, move || metrics.render()).await?)
        }
        None => None,
    };
    let memory = tokio::spawn(
        gateway
            .clone()
            .run_endpoint_memory(Duration::from_millis(250)),
    );
    let (channel, mut channel_state) = process::spawn_channel(
        &state,
        settings.node.data_dir.clone(),
        Arc::new(gateway.clone()),
        cached_version,
    );
    // New sign-ins need control; the proxy says so plainly while it is out of reach.
    let proxy = gateway.proxy();
    let control_watch = tokio::spawn(async move {
        loop {
            let up =
                *channel_state.borrow_and_update() == kakuremichi_node::ChannelState::Connected;
            proxy.set_control_up(up);
            if channel_state.changed().await.is_err() {
                return;
            }
        }
    });

    // SIGHUP: read the file again and apply what can change live.
    let reloads = {
        let proxy = gateway.proxy();
        let mut running = settings.clone();
        tokio::spawn(process::serve_hangups(hangups, move || {
            let fresh = match cli.clone().resolve() {
                Ok(s) => s,
                Err(error) => {
                    tracing::error!(
                        %error,
                        "config reload failed: the file is not valid; keeping the config in force"
                    );
                    return;
                }
            };
            let (changes, next) = kakuremichi_gateway::reload::reload(&running, &fresh);
            proxy.set_trusted_proxies(next.trusted_proxies.clone());
            proxy.set_timeouts(ProxyTimeouts {
                connect: next.connect_timeout,
                response: next.upstream_timeout,
                body: next.body_timeout,
            });
            limits_tx.send_replace(next.limits);
            grace_tx.send_replace(next.shutdown_grace);
            changes.log();
            running = next;
        }))
    };

    process::shutdown_signal().await;
    let started = tokio::time::Instant::now();
    let grace = *grace_rx.borrow();
    tracing::info!(
        ?grace,
        "closing the listeners; requests in flight have the grace period to finish"
    );
    // Stop accepting at once (the listeners close their sockets), and let requests in flight
    // finish within the grace period while control hears that this gateway is leaving.
    let _ = shutdown_tx.send(true);
    reloads.abort();
    control_watch.abort();
    let leave = channel.leave(Duration::from_secs(1).min(grace.max(Duration::from_millis(100))));
    let drain = async {
        let _ = server.await;
        if let Some(s) = https_server {
            let _ = s.await;
        }
    };
    tokio::join!(leave, drain);
    memory.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    gateway.stop_tcp().await;
    gateway.remember_endpoints();
    gateway.shutdown();
    tracing::info!(elapsed = ?started.elapsed(), "stopped");
    Ok(())
}
