//! Control's HTTP listener: hyper's HTTP/1.1 server with upgrades (the node WebSocket) around the
//! axum router, with what `axum::serve` lacks: a cap on open connections (at the cap control stops
//! accepting and the kernel's backlog holds the rest), a timeout on reading request headers (a
//! client that opens a socket and says nothing is closed), and a graceful stop that ends idle
//! keep-alive connections and lets requests in flight finish.
//!
//! A connection holds its slot until both its HTTP side and, after an upgrade, its WebSocket
//! session are gone: the slot travels in the request's extensions as a [`ConnectionSlot`].

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt as _;

/// Limits of the listener.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Open connections (API clients and node sessions) at most.
    pub max_connections: usize,
    /// A client must send a request's headers within this time.
    pub header_read_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// One of the listener's connection slots; freed when the last clone drops.
#[derive(Debug, Clone)]
pub struct ConnectionSlot(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting, asks every
/// connection to finish and waits for requests in flight (at most `drain`).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    serve_until(listener, router, options, shutdown, watch::channel(drain).1).await;
}

/// [`serve`], with a drain period read when `shutdown` resolves (a config reload may change it).
pub async fn serve_until(
    listener: TcpListener,
    router: Router,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
    drain: watch::Receiver<Duration>,
) {
    let slots = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let (stop, stopped) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut warned_full = false;
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if slots.available_permits() == 0 && !warned_full {
            tracing::warn!(
                max = options.max_connections,
                "control is at its connection limit; new connections wait in the backlog"
            );
            warned_full = true;
        } else if slots.available_permits() > options.max_connections / 10 {
            warned_full = false;
        }
        let _ = stream.set_nodelay(true);
        let slot = ConnectionSlot(Arc::new(permit));
        let router = router.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(slot.clone());
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                let router = router.clone();
                async move {
                    let answer: Result<_, Infallible> =
                        router.oneshot(req.map(axum::body::Body::new)).await;
                    answer
                }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(options.header_read_timeout);
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = crate::until_set(&mut stopped) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    stop.send_replace(true);
    // Wait for HTTP connections to finish (upgraded sessions hold their slot too; they end on
    // the state's own shutdown signal).
    let all = u32::try_from(options.max_connections.max(1)).unwrap_or(u32::MAX);
    let drain = *drain.borrow();
    if tokio::time::timeout(drain, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            grace = ?drain,
            "connections still open at the end of the shutdown grace period are cut"
        );
    }
}
