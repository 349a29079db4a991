//! The demo private app: a small HTTP server that the quickstart publishes and the end-to-end tests
//! and benchmarks reach through the tunnel. It serves deterministic bodies of any size, hashes or
//! echoes or discards uploads, echoes WebSocket messages, streams server-sent events (`/sse/{n}/{interval_ms}`), shows the request headers it got, says which address it listens on (`/whoami`, or after a wait: `/whoami/slow/{ms}`), and answers late on request.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use futures_util::StreamExt as _;
use sha2::{Digest as _, Sha256};

/// Command line of the demo app.
#[derive(Debug, Parser)]
#[command(
    name = "kakuremichi-demo-app",
    about = "A private HTTP app to publish through kakuremichi"
)]
struct Args {
    /// Address to listen on.
    #[arg(
        long,
        env = "KAKUREMICHI_DEMO_LISTEN",
        default_value = "127.0.0.1:9000"
    )]
    listen: SocketAddr,
    /// Also serve HTTPS here (HTTP/1.1 and HTTP/2 by ALPN) with a self-signed certificate for
    /// `--tls-name`: the benchmark's direct-over-TLS baseline.
    #[arg(long, env = "KAKUREMICHI_DEMO_TLS_LISTEN")]
    tls_listen: Option<SocketAddr>,
    /// The name the self-signed certificate is for.
    #[arg(long, env = "KAKUREMICHI_DEMO_TLS_NAME", default_value = "localhost")]
    tls_name: String,
    /// Also echo UDP datagrams here (each back to its sender, as it came).
    #[arg(long, env = "KAKUREMICHI_DEMO_UDP_ECHO")]
    udp_echo: Option<SocketAddr>,
    /// Where `/identity` fetches the keys that verify kakuremichi's identity assertion.
    #[arg(
        long,
        env = "KAKUREMICHI_DEMO_JWKS_URL",
        default_value = "http://127.0.0.1:3000/.well-known/kakuremichi/jwks.json"
    )]
    jwks_url: String,
}

/// Accepts TCP connections and hands over those whose TLS handshake finished (handshakes run
/// in tasks of their own, so that many go on at once).
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        SocketAddr,
    )>,
    local: SocketAddr,
}

impl TlsListener {
    async fn bind(addr: SocketAddr, name: &str) -> anyhow::Result<TlsListener> {
        let made = rcgen::generate_simple_self_signed(vec![name.to_owned()])?;
        let key = rustls::pki_types::PrivateKeyDer::try_from(made.signing_key.serialize_der())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![made.cert.der().clone()], key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let local = listener.local_addr()?;
        let (tx, ready) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Ok(Ok(tls)) =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    {
                        let _ = tx.send((tls, peer)).await;
                    }
                });
            }
        });
        Ok(TlsListener { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // A deep accept queue: the agent opens thousands of connections at once under load tests.
    let socket = match args.listen {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket
        .bind(args.listen)
        .with_context(|| format!("binding {}", args.listen))?;
    let listener = socket.listen(65_535)?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    tracing::info!(listen = %args.listen, "demo app listening");
    if let Some(addr) = args.udp_echo {
        let socket = tokio::net::UdpSocket::bind(addr)
            .await
            .with_context(|| format!("binding {addr} for the UDP echo"))?;
        tracing::info!(listen = %addr, "demo app echoing UDP");
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_535];
            loop {
                match socket.recv_from(&mut buf).await {
                    Ok((n, from)) => {
                        let _ = socket.send_to(&buf[..n], from).await;
                    }
                    Err(error) => tracing::debug!(%error, "UDP echo"),
                }
            }
        });
    }
    if let Some(addr) = args.tls_listen {
        let tls = TlsListener::bind(addr, &args.tls_name).await?;
        tracing::info!(listen = %addr, name = %args.tls_name, "demo app listening for HTTPS");
        let router = app(args.listen, args.jwks_url.clone());
        tokio::spawn(async move {
            if let Err(error) = axum::serve(tls, router).await {
                tracing::error!(%error, "serving HTTPS");
            }
        });
    }
    axum::serve(listener, app(args.listen, args.jwks_url))
        .await
        .context("serving the demo app")
}

async fn health(
    flag: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (axum::http::StatusCode, &'static str) {
    if flag.load(std::sync::atomic::Ordering::SeqCst) {
        (axum::http::StatusCode::OK, "ok")
    } else {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "failing on purpose",
        )
    }
}

async fn set_health(
    flag: std::sync::Arc<std::sync::atomic::AtomicBool>,
    healthy: bool,
) -> &'static str {
    flag.store(healthy, std::sync::atomic::Ordering::SeqCst);
    if healthy {
        "healthy\n"
    } else {
        "failing\n"
    }
}

fn app(listen: SocketAddr, jwks_url: String) -> Router {
    let whoami = listen.to_string();
    let whoami_late = whoami.clone();
    // `/healthz` answers 503 after `POST /healthz/fail`, 200 again after `POST /healthz/ok`.
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let fail_flag = healthy.clone();
    let ok_flag = healthy.clone();
    Router::new()
        .route("/", get(index))
        .route("/whoami", get(move || async move { whoami }))
        .route(
            "/whoami/slow/{ms}",
            get(move |Path(ms): Path<u64>| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                whoami_late
            }),
        )
        .route("/healthz", get(move || health(healthy.clone())))
        .route(
            "/healthz/fail",
            post(move || set_health(fail_flag.clone(), false)),
        )
        .route(
            "/healthz/ok",
            post(move || set_health(ok_flag.clone(), true)),
        )
        .route("/bytes/{n}", get(bytes))
        .route("/headers", get(headers))
        .route(
            "/identity",
            get(move |h: HeaderMap| identity(h, jwks_url.clone())),
        )
        .route("/slow/{ms}", get(slow))
        .route("/sha256", post(sha256))
        .route("/echo", post(echo))
        .route("/discard", post(discard))
        .route("/ws", get(ws_echo))
        .route("/sse/{n}/{interval_ms}", get(sse))
}

/// `n` server-sent events, one every `interval_ms`, each `data: <i> <unix micros when written>`.
async fn sse(Path((n, interval_ms)): Path<(u32, u64)>) -> Response {
    let events = futures_util::stream::unfold(0u32, move |i| async move {
        if i >= n {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(interval_ms)).await;
        }
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or(0);
        let event = Bytes::from(format!("data: {i} {micros}\n\n"));
        Some((Ok::<_, std::convert::Infallible>(event), i + 1))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(events),
    )
        .into_response()
}

async fn index() -> Html<&'static str> {
    Html(concat!(
        "<!doctype html><html><head><title>kakuremichi demo app</title></head>",
        "<body><h1>Hello from the kakuremichi demo app</h1>",
        "<p>This page is served by a private app behind the agent, ",
        "reached through the gateway and a WireGuard tunnel.</p></body></html>\n"
    ))
}

/// The byte at offset `i` of every `/bytes/{n}` body.
fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

async fn bytes(Path(n): Path<u64>) -> Response {
    // A multiple of the pattern's period, so every chunk is the same bytes: no work per request.
    const CHUNK: u64 = 251 * 256;
    static PATTERN: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    let full = PATTERN
        .get_or_init(|| (0..CHUNK).map(pattern).collect::<Vec<u8>>().into())
        .clone();
    let chunks = futures_util::stream::iter((0..n.div_ceil(CHUNK)).map(move |c| {
        let len = (n - c * CHUNK).min(CHUNK) as usize;
        Ok::<_, std::convert::Infallible>(full.slice(..len))
    }));
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, n.to_string()),
        ],
        Body::from_stream(chunks),
    )
        .into_response()
}

/// What an app behind kakuremichi does with the identity assertion: verifies it against the JWKS
/// (signature, `aud` = this hostname, expiry) and shows its claims, or answers 401.
async fn identity(
    map: HeaderMap,
    jwks_url: String,
) -> (axum::http::StatusCode, Json<serde_json::Value>) {
    let unauthorized = |why: String| {
        (
            axum::http::StatusCode::UNAUTHORIZED,
            Json(serde_json::json!({ "verified": false, "error": why })),
        )
    };
    let Some(token) = map
        .get("kakuremichi-jwt-assertion")
        .and_then(|v| v.to_str().ok())
    else {
        return unauthorized("no Kakuremichi-Jwt-Assertion header".into());
    };
    let host = map
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(|h| h.rsplit_once(':').map_or(h, |(name, _)| name))
        .unwrap_or_default()
        .to_ascii_lowercase();
    let jwks: jsonwebtoken::jwk::JwkSet = match async {
        reqwest::Client::builder()
            .no_proxy()
            .timeout(std::time::Duration::from_secs(5))
            .build()?
            .get(&jwks_url)
            .send()
            .await?
            .json()
            .await
    }
    .await
    {
        Ok(j) => j,
        Err(e) => return unauthorized(format!("cannot fetch the JWKS at {jwks_url}: {e}")),
    };
    let verified = (|| {
        let kid = jsonwebtoken::decode_header(token)?.kid.unwrap_or_default();
        let jwk = jwks
            .find(&kid)
            .ok_or(jsonwebtoken::errors::ErrorKind::InvalidKeyFormat)?;
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
        v.set_audience(&[host.as_str()]);
        jsonwebtoken::decode::<serde_json::Value>(
            token,
            &jsonwebtoken::DecodingKey::from_jwk(jwk)?,
            &v,
        )
    })();
    match verified {
        Ok(data) => (
            axum::http::StatusCode::OK,
            Json(serde_json::json!({ "verified": true, "claims": data.claims })),
        ),
        Err(e) => unauthorized(format!("the assertion does not verify: {e}")),
    }
}

async fn headers(map: HeaderMap) -> Json<serde_json::Value> {
    let obj: serde_json::Map<String, serde_json::Value> = map
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
            )
        })
        .collect();
    Json(serde_json::Value::Object(obj))
}

async fn slow(Path(ms): Path<u64>) -> &'static str {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    "slow response\n"
}

async fn sha256(req: Request) -> Result<Json<serde_json::Value>, StatusCode> {
    let mut stream = req.into_body().into_data_stream();
    let mut hasher = Sha256::new();
    let mut len: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| StatusCode::BAD_REQUEST)?;
        len += chunk.len() as u64;
        hasher.update(&chunk);
    }
    Ok(Json(serde_json::json!({
        "len": len,
        "sha256": hex(&hasher.finalize()),
    })))
}

/// A WebSocket that echoes every text and binary message.
async fn ws_echo(ws: axum::extract::ws::WebSocketUpgrade) -> Response {
    ws.on_upgrade(|mut socket| async move {
        use axum::extract::ws::Message;
        while let Some(Ok(msg)) = socket.recv().await {
            let reply = match msg {
                Message::Text(t) => Message::Text(t),
                Message::Binary(b) => Message::Binary(b),
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            if socket.send(reply).await.is_err() {
                break;
            }
        }
    })
}

async fn discard(req: Request) -> Result<Json<serde_json::Value>, StatusCode> {
    let mut stream = req.into_body().into_data_stream();
    let mut len: u64 = 0;
    while let Some(chunk) = stream.next().await {
        len += chunk.map_err(|_| StatusCode::BAD_REQUEST)?.len() as u64;
    }
    Ok(Json(serde_json::json!({ "len": len })))
}

async fn echo(req: Request) -> Response {
    let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
    let mut resp = Body::from_stream(req.into_body().into_data_stream()).into_response();
    if let Some(ct) = content_type {
        resp.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    resp
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
