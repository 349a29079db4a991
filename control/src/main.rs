//! The `kakuremichi-control` binary: parses settings, opens the store, seeds or prints the admin
//! key, and serves the API, the node hub and the admin page until SIGTERM or ctrl-c.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kakuremichi_control::config::{FileConfig, RawSettings};
use kakuremichi_control::serve::{serve_until, ServeOptions};
use kakuremichi_control::store::{Backend, Store};
use kakuremichi_control::{app, AppState, HubTiming};
use kakuremichi_proto::Secret;

/// How control logs (`--log-format`), as the gateway and the agent do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line: timestamp, level, target, message, fields and spans.
    Json,
}

/// kakuremichi control: REST API, node WebSocket hub and store.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Log lines as text or as JSON objects (the filter is RUST_LOG, default info).
    #[arg(long, env = "KAKUREMICHI_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Export traces over OTLP/HTTP (protobuf) to this collector, e.g. http://127.0.0.1:4318
    /// (/v1/traces is appended). Without it (nor the standard OTEL_EXPORTER_OTLP_ENDPOINT),
    /// nothing is exported.
    #[arg(long, env = "KAKUREMICHI_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
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
    /// PostgreSQL connection pool size (SQLite always uses one connection). Default 8.
    #[arg(long, env = "KAKUREMICHI_DATABASE_MAX_CONNECTIONS")]
    database_max_connections: Option<u32>,
    /// How long a new enrollment token is valid: 90s, 30m, 24h, 7d. Default 24h.
    #[arg(long, env = "KAKUREMICHI_ENROLLMENT_TOKEN_TTL")]
    enrollment_token_ttl: Option<String>,
    /// Open connections (API clients and node sessions) at most; more wait in the backlog.
    /// Default 10000.
    #[arg(long, env = "KAKUREMICHI_CONTROL_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Node handshakes in progress at most; more hellos are answered busy with a retry delay.
    /// Default 64.
    #[arg(long, env = "KAKUREMICHI_CONTROL_MAX_HANDSHAKES")]
    max_handshakes: Option<usize>,
    /// File with the key that seals certificate keys at rest (base64 of 32 bytes), made on first
    /// start when missing. Replicas sharing a database need the same file. Default
    /// DATA_DIR/secrets.key.
    #[arg(long, env = "KAKUREMICHI_SECRETS_KEY_FILE")]
    secrets_key_file: Option<PathBuf>,
    /// The URL browsers reach control at: sign-in pages and the issuer of session tokens
    /// (e.g. https://control.example.com). Default http://LISTEN.
    #[arg(long, env = "KAKUREMICHI_PUBLIC_URL")]
    public_url: Option<String>,
    /// Sign-in attempts per minute from one client address; more are answered 429. Default 20.
    #[arg(long, env = "KAKUREMICHI_SIGN_IN_PER_MINUTE")]
    sign_in_per_minute: Option<u32>,
    /// How long a sign-in lasts, at control and at every gateway: 30m, 8h, 7d (at most 90d).
    /// Default 24h.
    #[arg(long, env = "KAKUREMICHI_SESSION_LIFE")]
    session_life: Option<String>,
    /// Password or PIN attempts per minute from one client on one resource (the resource takes
    /// ten times as many from everyone); also e-mail code requests per client and per address.
    /// Default 5.
    #[arg(long, env = "KAKUREMICHI_PASSCODE_ATTEMPTS_PER_MINUTE")]
    passcode_attempts_per_minute: Option<u32>,
    /// The SMTP relay that sends one-time codes to visitors: smtp://host:25,
    /// smtp://user:pass@host:587?tls=required, smtps://user:pass@host:465. Without it, no
    /// resource offers e-mailed codes.
    #[arg(long, env = "KAKUREMICHI_SMTP_URL")]
    smtp_url: Option<String>,
    /// The sender of e-mailed codes. Default kakuremichi@<public URL's host>.
    #[arg(long, env = "KAKUREMICHI_SMTP_FROM")]
    smtp_from: Option<String>,
    /// Where MCP clients' client ID metadata documents (an https URL as client_id) may be
    /// fetched from: public (public addresses only, the default), any (loopback and private
    /// addresses too: a lab or a test) or off (clients must register).
    #[arg(long, env = "KAKUREMICHI_CLIENT_METADATA_DOCUMENTS")]
    client_metadata_documents: Option<String>,
    /// Extra root certificates (PEM) trusted when fetching client metadata documents.
    #[arg(long, env = "KAKUREMICHI_CLIENT_METADATA_CA_FILE")]
    client_metadata_ca_file: Option<PathBuf>,
    /// The hostname gateways serve agent sessions at (agentapi-proxy's API: /start, /search,
    /// /{id}/*, /s/{token}/*), e.g. agents.example.com. Without it, sessions are managed under
    /// /api/v1/sessions but no gateway reaches them.
    #[arg(long, env = "KAKUREMICHI_SESSIONS_HOSTNAME")]
    sessions_hostname: Option<String>,
    /// The folder of the agent binaries served to the one-line install
    /// (kakuremichi-agent-linux-x86_64, kakuremichi-agent-linux-aarch64, or kakuremichi-agent for
    /// this machine's architecture) [default: the folder of this executable].
    #[arg(long, env = "KAKUREMICHI_RELEASE_DIR")]
    release_dir: Option<PathBuf>,
    /// ACME directory URL (e.g. https://acme-v02.api.letsencrypt.org/directory): control orders
    /// and renews certificates for every gateway.
    #[arg(long, env = "KAKUREMICHI_ACME_DIRECTORY")]
    acme_directory: Option<String>,
    /// Contact e-mail addresses for the ACME account, comma-separated.
    #[arg(long, env = "KAKUREMICHI_ACME_CONTACT")]
    acme_contact: Option<String>,
    /// Extra root certificate (PEM) trusted for the ACME CA's own API (a private CA).
    #[arg(long, env = "KAKUREMICHI_ACME_CA_FILE")]
    acme_ca_file: Option<PathBuf>,
    /// Certificates for HTTP resource hostnames no certificate covers: http-01 (default),
    /// tls-alpn-01 or off.
    #[arg(long, env = "KAKUREMICHI_ACME_FOR_RESOURCES")]
    acme_for_resources: Option<String>,
    /// RFC 2136 server (ip:port) that takes the DNS-01 TXT records (for wildcards).
    #[arg(long, env = "KAKUREMICHI_ACME_DNS_SERVER")]
    acme_dns_server: Option<String>,
    /// The zone DNS-01 updates go to.
    #[arg(long, env = "KAKUREMICHI_ACME_DNS_ZONE")]
    acme_dns_zone: Option<String>,
    /// The TSIG key's name (hmac-sha256).
    #[arg(long, env = "KAKUREMICHI_ACME_DNS_TSIG_NAME")]
    acme_dns_tsig_name: Option<String>,
    /// File with the TSIG key's secret (base64).
    #[arg(long, env = "KAKUREMICHI_ACME_DNS_TSIG_SECRET_FILE")]
    acme_dns_tsig_secret_file: Option<PathBuf>,
    /// How long an HTTP-01 or TLS-ALPN-01 order waits for gateways to apply the answer. Default 10s.
    #[arg(long, env = "KAKUREMICHI_ACME_GATEWAY_WAIT")]
    acme_gateway_wait: Option<String>,
    /// TOML file with the same settings (snake_case keys); the command line and env win.
    /// SIGHUP reads it again.
    #[arg(long, env = "KAKUREMICHI_CONTROL_CONFIG")]
    config: Option<PathBuf>,
    /// On SIGTERM or ctrl-c: stop accepting at once, then let requests in flight finish for at
    /// most this long (5, 5s, 500ms, 2m; 0 to an hour). Default 10s.
    #[arg(long, env = "KAKUREMICHI_SHUTDOWN_GRACE")]
    shutdown_grace: Option<String>,
}

/// Writes a generated admin key to `<data dir>/admin-key`, readable by the owner only, and says
/// where it is: the key itself never reaches the terminal or the logs.
/// Writes a generated admin key to a private file and says where: a banner on standard output,
/// or (`banner` false: JSON logs, whose every line must be an object) a log event.
#[allow(clippy::print_stdout)]
fn save_admin_key(data_dir: &Path, key: &Secret, banner: bool) -> anyhow::Result<()> {
    let path = data_dir.join("admin-key");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    writeln!(file, "{}", key.expose())
        .with_context(|| format!("cannot write {}", path.display()))?;
    if !banner {
        tracing::warn!(
            path = %path.display(),
            "a new admin API key was generated and written to this file (readable by this user \
             only); use it as Authorization: Bearer <key>, keep it somewhere safe and delete the file"
        );
        return Ok(());
    }
    println!();
    println!("================================================================================");
    println!(" kakuremichi: a new admin API key was generated and written to");
    println!();
    println!("   {}", path.display());
    println!();
    println!(" (readable by this user only). Use it as: Authorization: Bearer <key>,");
    println!(
        " e.g. curl -H \"Authorization: Bearer $(cat {})\" ...",
        path.display()
    );
    println!(" Keep it somewhere safe and delete the file.");
    println!("================================================================================");
    println!();
    Ok(())
}

/// Makes the data folder private to this user (0700), and the SQLite files in it (0600).
#[cfg(unix)]
fn restrict(data_dir: &Path, sqlite: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict {}", data_dir.display()))?;
    if sqlite {
        for entry in std::fs::read_dir(data_dir)?.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().contains(".db") {
                std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("cannot restrict {}", entry.path().display()))?;
            }
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn restrict(_data_dir: &Path, _sqlite: bool) -> anyhow::Result<()> {
    Ok(())
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
    let cli = Cli::parse();
    let log_format = cli.log_format;
    kakuremichi_telemetry::init(log_format == LogFormat::Json);
    // Before anything else: a SIGHUP must reload, never end the process.
    #[cfg(unix)]
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    let config_path = cli.config.clone();
    let file = match &cli.config {
        Some(path) => FileConfig::read(path)?,
        None => FileConfig::default(),
    };
    let traces = kakuremichi_telemetry::traces_endpoint(
        cli.otlp_endpoint
            .as_deref()
            .or(file.otlp_endpoint.as_deref()),
    )?;
    let from_cli = RawSettings {
        listen: cli.listen,
        data_dir: cli.data_dir,
        database_url: cli.database_url,
        overlay_cidr: cli.overlay_cidr,
        initial_admin_key: cli.initial_admin_key.map(Secret::new),
        database_max_connections: cli.database_max_connections,
        enrollment_token_ttl: cli.enrollment_token_ttl,
        max_connections: cli.max_connections,
        max_handshakes: cli.max_handshakes,
        secrets_key_file: cli.secrets_key_file,
        public_url: cli.public_url,
        sign_in_per_minute: cli.sign_in_per_minute,
        session_life: cli.session_life,
        passcode_attempts_per_minute: cli.passcode_attempts_per_minute,
        smtp_url: cli.smtp_url.map(Secret::new),
        smtp_from: cli.smtp_from,
        client_metadata_documents: cli.client_metadata_documents,
        client_metadata_ca_file: cli.client_metadata_ca_file,
        sessions_hostname: cli.sessions_hostname,
        release_dir: cli.release_dir,
        shutdown_grace: cli.shutdown_grace,
        acme: kakuremichi_control::config::AcmeRaw {
            directory: cli.acme_directory,
            contact: cli.acme_contact,
            ca_file: cli.acme_ca_file,
            for_resources: cli.acme_for_resources,
            dns_server: cli.acme_dns_server,
            dns_zone: cli.acme_dns_zone,
            dns_tsig_name: cli.acme_dns_tsig_name,
            dns_tsig_secret_file: cli.acme_dns_tsig_secret_file,
            gateway_wait: cli.acme_gateway_wait,
        },
    };
    let raw = from_cli.clone().over(file);
    let settings = raw.clone().validate()?;
    let (grace_tx, grace_rx) = tokio::sync::watch::channel(settings.shutdown_grace);
    // SIGHUP: read the file again; apply what can change live, name what needs a restart.
    #[cfg(unix)]
    let reloads = match hangups {
        Ok(mut hangups) => Some(tokio::spawn(async move {
            let mut running = raw;
            while hangups.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the config file");
                running = reload(running, &from_cli, config_path.as_deref(), &grace_tx);
            }
        })),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: no config reloads");
            None
        }
    };
    // A thousand nodes need a thousand sockets: take the hard limit.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "cannot raise the open-files limit");
    }

    std::fs::create_dir_all(&settings.data_dir).with_context(|| {
        format!(
            "cannot create data directory {}",
            settings.data_dir.display()
        )
    })?;
    let sqlite = Backend::of_url(&settings.database_url) == Some(Backend::Sqlite);
    let store = Store::connect_with(
        &settings.database_url,
        settings.overlay,
        settings.database_max_connections,
    )
    .await
    .context("cannot open the database")?
    .with_enrollment_token_ttl(settings.enrollment_token_ttl)
    .with_public_url(&settings.public_url)
    .with_session_life(settings.session_life)
    .with_sessions_host(settings.sessions_hostname.clone());
    let sealer = kakuremichi_control::seal::Sealer::from_file(&settings.secrets_key_file, true)
        .context("cannot set up the secrets key")?;
    let store = store.with_sealer(std::sync::Arc::new(sealer));
    restrict(&settings.data_dir, sqlite)?;
    store
        .ensure_signing_key()
        .await
        .context("cannot set up the key that signs session tokens")?;
    if let Some(key) = store
        .ensure_admin_key(settings.initial_admin_key.as_ref())
        .await
        .context("cannot set up the admin key")?
    {
        save_admin_key(&settings.data_dir, &key, log_format == LogFormat::Text)?;
    }

    let timing = HubTiming {
        max_handshakes: settings.max_handshakes,
        ..HubTiming::default()
    };
    let mut state = AppState::with_timing(store.clone(), timing);
    // With PostgreSQL, replicas may share the database: one leads the singleton work, by lock.
    state.replica = std::sync::Arc::new(kakuremichi_control::replicas::Replica::new(sqlite));
    if let Some(endpoint) = &traces {
        let id = state.replica.id.to_string();
        kakuremichi_telemetry::start(
            endpoint,
            kakuremichi_telemetry::Service {
                name: "kakuremichi-control",
                instance_id: id.clone(),
                attributes: vec![("kakuremichi.replica.id", id)],
            },
        )
        .context("cannot start exporting traces (--otlp-endpoint)")?;
    }
    state.acme = settings.acme.clone().map(std::sync::Arc::new);
    state.sign_in = std::sync::Arc::new(kakuremichi_control::identity::SignInLimits::new(
        settings.sign_in_per_minute,
    ));
    state.visitors = std::sync::Arc::new(kakuremichi_control::visitors::Visitors {
        per_minute: settings.passcode_attempts_per_minute,
        mailer: match &settings.smtp {
            Some((url, from)) => Some(
                kakuremichi_control::visitors::Mailer::new(url, from)
                    .context("cannot set up the SMTP relay")?,
            ),
            None => None,
        },
    });
    state.release_dir = settings.release_dir.clone().map(std::sync::Arc::new);
    state.public_url_set = settings.public_url_set;
    state.client_metadata = std::sync::Arc::new(
        kakuremichi_control::client_metadata::ClientMetadata::new(
            settings.client_metadata,
            &settings.client_metadata_roots,
        )
        .map_err(anyhow::Error::msg)
        .context("cannot set up the client metadata fetcher")?,
    );
    // A deep accept queue (the kernel caps it at net.core.somaxconn): a fleet reconnecting after
    // a restart opens its WebSockets all at once.
    let socket = match settings.listen {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .context("cannot create the listening socket")?;
    socket.set_reuseaddr(true)?;
    socket
        .bind(settings.listen)
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let listener = socket
        .listen(65_535)
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
    use kakuremichi_control::replicas;
    if !sqlite {
        let url = settings.database_url.clone();
        tokio::spawn(replicas::follow_changes(state.clone(), url.clone()));
        tokio::spawn(replicas::lead(
            state.replica.clone(),
            url,
            state.shutdown_signal(),
        ));
        tokio::spawn(replicas::heartbeat(state.clone(), bound.to_string()));
    }
    // The singleton work: on the replica that leads.
    if let Some(acme) = settings.acme.clone() {
        let st = state.clone();
        tokio::spawn(replicas::while_leader(
            state.replica.watch_leader(),
            "certificates",
            move || kakuremichi_control::acme::run(st.clone(), acme.clone()),
        ));
    }
    // Gateways' API-key assertions live for a session's life: push fresh ones at a third of it.
    let refresh = (settings.session_life / 3).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(3600),
    );
    let refresher = store.clone();
    tokio::spawn(replicas::while_leader(
        state.replica.watch_leader(),
        "credential refresh",
        move || {
            let refresher = refresher.clone();
            async move {
                let mut tick = tokio::time::interval(refresh);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    if let Err(e) = refresher.refresh_edge_credentials().await {
                        tracing::warn!(error = %e, "cannot refresh the gateways' API-key assertions");
                    }
                }
            }
        },
    ));
    let router = app(state.clone());
    let shutdown_state = state.clone();
    let options = ServeOptions {
        max_connections: settings.max_connections,
        ..ServeOptions::default()
    };
    let stopping = std::sync::Arc::new(std::sync::OnceLock::new());
    let stopping_at = stopping.clone();
    serve_until(
        listener,
        router,
        options,
        async move {
            shutdown_signal().await;
            let _ = stopping_at.set(tokio::time::Instant::now());
            // Stops accepting (serve), and tells every node session to close: nodes reconnect
            // with their jittered backoff, to this control once it is back or to another one.
            shutdown_state.shutdown();
        },
        grace_rx.clone(),
    )
    .await;
    #[cfg(unix)]
    let _ = reloads.map(|r| r.abort());
    // What is left of the grace period (at most 5 s) for node sessions to close.
    let grace = *grace_rx.borrow();
    let spent = stopping.get().map(|t| t.elapsed()).unwrap_or_default();
    let left = state
        .hub
        .wait_idle(grace.saturating_sub(spent).min(Duration::from_secs(5)))
        .await;
    if left > 0 {
        tracing::warn!(sessions = left, "node sessions still open at shutdown");
    }
    match state.flush_activity().await {
        Ok(n) => tracing::info!(nodes = n, "recorded the nodes' last activity"),
        Err(e) => tracing::error!(error = %e, "cannot record the nodes' last activity"),
    }
    if !sqlite {
        // Gone now rather than when its heartbeat is stale: its nodes are already elsewhere.
        let hour_ago = kakuremichi_control::store::now_ms() - 3_600_000;
        if let Err(e) = store.replica_gone(state.replica.id, hour_ago).await {
            tracing::warn!(error = %e, "cannot forget this replica in the store");
        }
    }
    store.close().await;
    tracing::info!(
        elapsed = ?stopping.get().map(|t| t.elapsed()).unwrap_or_default(),
        "stopped"
    );
    // The spans still queued go out (blocking: off the runtime's threads).
    let _ = tokio::task::spawn_blocking(kakuremichi_telemetry::shutdown).await;
    Ok(())
}

/// One SIGHUP: reads the config file again under the same command line and environment and
/// applies what can change live; a file that does not read or validate changes nothing.
/// Returns the raw settings in force afterwards.
fn reload(
    running: RawSettings,
    from_cli: &RawSettings,
    path: Option<&Path>,
    grace: &tokio::sync::watch::Sender<Duration>,
) -> RawSettings {
    let Some(path) = path else {
        tracing::info!("no --config file: nothing to reload");
        return running;
    };
    let fresh = FileConfig::read(path)
        .map(|file| from_cli.clone().over(file))
        .and_then(|raw| raw.clone().validate().map(|s| (raw, s)));
    let (raw, validated) = match fresh {
        Ok(f) => f,
        Err(error) => {
            tracing::error!(
                %error,
                "config reload failed: the file is not valid; keeping the config in force"
            );
            return running;
        }
    };
    let (changes, next) = kakuremichi_control::config::reload(&running, &raw);
    if changes.iter().any(|c| c.key == "shutdown_grace") {
        grace.send_replace(validated.shutdown_grace);
    }
    for c in changes.iter().filter(|c| !c.live) {
        tracing::warn!(
            key = c.key,
            "config reload: {} changed, but it takes effect only at a restart; keeping the old \
             value",
            c.key
        );
    }
    let live: Vec<&str> = changes.iter().filter(|c| c.live).map(|c| c.key).collect();
    if live.is_empty() {
        tracing::info!("config reloaded: nothing to change");
    } else {
        tracing::info!(keys = ?live, "config reloaded");
    }
    next
}
