//! A test server that speaks coder/agentapi's HTTP API (`GET /status`, `GET /messages`,
//! `POST /message`, `GET /events` as SSE, `POST /upload`) with a fake agent that answers every
//! message with `echo: <message>` after a short delay: the session command of the agent-session
//! tests and benchmarks, standing in for `agentapi server -- claude`.
//!
//! Its command line follows agentapi's (`server --port N [--type T] [--allowed-hosts H] -- <agent
//! command>`), and it checks the Host header as agentapi does (400 for a host not allowed). For
//! the tests it also can exit at once (`--exit-at-once`), start a child process in its process
//! group (`--spawn-child`), and show its environment and working folder (`/_test/env/{name}`,
//! `/_test/cwd`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use futures_util::stream::{self, Stream, StreamExt as _};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::broadcast;

/// agentapi's command line, as far as the tests use it.
#[derive(Debug, Parser)]
#[command(
    name = "kakuremichi-fake-agentapi",
    about = "A fake coder/agentapi server"
)]
struct Args {
    /// `server` (the only command).
    command: String,
    /// Port to listen on (127.0.0.1).
    #[arg(long, short = 'p', default_value_t = 3284)]
    port: u16,
    /// Agent type reported by `/status`.
    #[arg(long = "type", short = 't', default_value = "claude")]
    agent_type: String,
    /// Hosts allowed in the Host header, comma-separated (`*`: any).
    #[arg(long, short = 'a', default_value = "localhost,127.0.0.1,[::1]")]
    allowed_hosts: String,
    /// How long the fake agent takes to answer, in milliseconds.
    #[arg(long, default_value_t = 50)]
    reply_delay_ms: u64,
    /// How long before it starts listening, in milliseconds (a slow start).
    #[arg(long, default_value_t = 0)]
    start_delay_ms: u64,
    /// Exit at once with status 3 (a session command that fails).
    #[arg(long)]
    exit_at_once: bool,
    /// Start `sleep 3600` in this process group (a grandchild that must not outlive the session).
    #[arg(long)]
    spawn_child: bool,
    /// The agent command (ignored).
    #[arg(last = true)]
    agent: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
struct Message {
    id: u64,
    role: &'static str,
    content: String,
    time: String,
}

#[derive(Debug)]
struct Agent {
    messages: Vec<Message>,
    running: bool,
}

#[derive(Debug, Clone)]
struct App {
    agent: Arc<Mutex<Agent>>,
    events: broadcast::Sender<(&'static str, serde_json::Value)>,
    agent_type: Arc<str>,
    allowed: Arc<Vec<String>>,
    delay: Duration,
}

fn now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // RFC 3339 in UTC from the Unix time, without a date library.
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, day) = civil(days);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn civil(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn status_json(app: &App, running: bool) -> serde_json::Value {
    json!({"status": if running { "running" } else { "stable" },
           "agent_type": &*app.agent_type, "transport": "pty"})
}

fn problem(status: StatusCode, detail: &str) -> Response {
    let mut r = (
        status,
        Json(
            json!({"title": status.canonical_reason(), "status": status.as_u16(),
                    "detail": detail}),
        ),
    )
        .into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    r
}

async fn check_host(State(app): State<App>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let name = if host.starts_with('[') {
        host.split_inclusive(']').next().unwrap_or(host)
    } else {
        host.split(':').next().unwrap_or(host)
    };
    if app.allowed.iter().any(|a| a == "*" || a == name) {
        return next.run(req).await;
    }
    (
        StatusCode::BAD_REQUEST,
        format!(
            "Invalid host header. Allowed hosts: {}",
            app.allowed.join(", ")
        ),
    )
        .into_response()
}

async fn status(State(app): State<App>) -> Json<serde_json::Value> {
    let running = app.agent.lock().running;
    Json(status_json(&app, running))
}

async fn messages(State(app): State<App>) -> Json<serde_json::Value> {
    Json(json!({"messages": app.agent.lock().messages}))
}

#[derive(Debug, Deserialize)]
struct Send {
    content: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

fn push(app: &App, role: &'static str, content: String) {
    let mut a = app.agent.lock();
    let m = Message {
        id: a.messages.len() as u64,
        role,
        content,
        time: now(),
    };
    a.messages.push(m.clone());
    let _ = app.events.send((
        "message_update",
        json!({"id": m.id, "role": m.role, "message": m.content, "time": m.time}),
    ));
}

fn set_running(app: &App, running: bool) {
    app.agent.lock().running = running;
    let _ = app
        .events
        .send(("status_change", status_json(app, running)));
}

async fn message(State(app): State<App>, body: Bytes) -> Response {
    if body.is_empty() {
        return problem(StatusCode::BAD_REQUEST, "request body is required");
    }
    let Ok(send) = serde_json::from_slice::<Send>(&body) else {
        return problem(StatusCode::BAD_REQUEST, "request body is not valid JSON");
    };
    let (Some(content), Some(kind)) = (send.content, send.kind) else {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "content and type are required",
        );
    };
    if kind != "user" && kind != "raw" {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "type must be one of user, raw",
        );
    }
    if kind == "raw" {
        return Json(json!({"ok": true})).into_response();
    }
    if content.trim() != content {
        return problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "message must be trimmed of leading and trailing whitespace",
        );
    }
    if content.is_empty() {
        return problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "message must not be empty",
        );
    }
    if app.agent.lock().running {
        return problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "message can only be sent when the agent is waiting for user input",
        );
    }
    push(&app, "user", content.clone());
    set_running(&app, true);
    let a = app.clone();
    tokio::spawn(async move {
        tokio::time::sleep(a.delay).await;
        push(&a, "agent", format!("echo: {content}"));
        set_running(&a, false);
    });
    Json(json!({"ok": true})).into_response()
}

async fn event_stream(
    State(app): State<App>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    // Subscribe first, then replay: nothing between them is lost (a duplicate at worst).
    let live = app.events.subscribe();
    let replay: Vec<(&'static str, serde_json::Value)> = {
        let a = app.agent.lock();
        a.messages
            .iter()
            .map(|m| {
                (
                    "message_update",
                    json!({"id": m.id, "role": m.role, "message": m.content, "time": m.time}),
                )
            })
            .chain(std::iter::once((
                "status_change",
                status_json(&app, a.running),
            )))
            .collect()
    };
    // A subscriber that falls behind is dropped, as agentapi does (1024 events).
    let live = stream::unfold(live, |mut rx| async move {
        rx.recv().await.ok().map(|e| (e, rx))
    });
    let all = stream::iter(replay)
        .chain(live)
        .map(|(name, data)| Ok(Event::default().event(name).data(data.to_string())));
    Sse::new(all)
}

async fn upload(body: Bytes) -> Response {
    if body.len() > 10 * 1024 * 1024 {
        return problem(StatusCode::BAD_REQUEST, "file size exceeds 10MB limit");
    }
    Json(json!({"ok": true, "filePath": format!("/tmp/upload/{}", body.len())})).into_response()
}

async fn test_env(Path(name): Path<String>) -> Response {
    match std::env::var(&name) {
        Ok(v) => v.into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn test_cwd() -> Response {
    std::env::current_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_default()
        .into_response()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.command != "server" {
        anyhow::bail!("unknown command {:?} (only server)", args.command);
    }
    if args.exit_at_once {
        eprintln!("fake agent: exiting at once, as asked");
        std::process::exit(3);
    }
    let _child = if args.spawn_child {
        Some(tokio::process::Command::new("sleep").arg("3600").spawn()?)
    } else {
        None
    };
    tokio::time::sleep(Duration::from_millis(args.start_delay_ms)).await;
    let (events, _) = broadcast::channel(1024);
    let app = App {
        agent: Arc::new(Mutex::new(Agent {
            messages: vec![Message {
                id: 0,
                role: "agent",
                content: "fake agent ready".into(),
                time: now(),
            }],
            running: false,
        })),
        events,
        agent_type: args.agent_type.into(),
        allowed: Arc::new(
            args.allowed_hosts
                .split([',', ' '])
                .filter(|h| !h.is_empty())
                .map(str::to_owned)
                .collect(),
        ),
        delay: Duration::from_millis(args.reply_delay_ms),
    };
    let router = Router::new()
        .route("/status", get(status))
        .route("/messages", get(messages))
        .route("/message", post(message))
        .route("/events", get(event_stream))
        .route("/upload", post(upload))
        .route("/_test/env/{name}", get(test_env))
        .route("/_test/cwd", get(test_cwd))
        .layer(middleware::from_fn_with_state(app.clone(), check_host))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // As Go's net/http (agentapi's) does: small writes (SSE events) leave at once.
    use axum::serve::ListenerExt as _;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            term.recv().await;
        })
        .await?;
    Ok(())
}
