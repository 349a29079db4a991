//! Serving a node's Prometheus metrics at `GET /metrics` on a listener of their own
//! (`--metrics-listen`), apart from any public port; every other path is 404. The text comes
//! from the node's own render function, called once per scrape.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// How long a scrape connection may stay idle before its request head is in.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `addr` for metrics and serves `render`'s text there until the task is aborted.
pub async fn listen<F>(addr: SocketAddr, render: F) -> anyhow::Result<JoinHandle<()>>
where
    F: Fn() -> String + Send + Sync + 'static,
{
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    tracing::info!(addr = %listener.local_addr().unwrap_or(addr), "serving metrics at /metrics");
    Ok(tokio::spawn(serve(listener, render)))
}

/// Serves `GET /metrics` on `listener` forever, each answer made by `render`.
pub async fn serve<F>(listener: TcpListener, render: F)
where
    F: Fn() -> String + Send + Sync + 'static,
{
    let render = Arc::new(render);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of files, most likely: try again in a moment.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let render = Arc::clone(&render);
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let render = Arc::clone(&render);
                    async move { Ok::<_, Infallible>(answer(req.uri().path(), &*render)) }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(path: &str, render: &dyn Fn() -> String) -> Response<Full<Bytes>> {
    if path != "/metrics" {
        let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    }
    let mut r = Response::new(Full::new(Bytes::from(render())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(kakuremichi_metrics::CONTENT_TYPE),
    );
    r
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[tokio::test]
    async fn serves_a_fresh_render_at_metrics_and_404_elsewhere() {
        let scrapes = Arc::new(AtomicU64::new(0));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counter = Arc::clone(&scrapes);
        let server = tokio::spawn(serve(listener, move || {
            format!("scrapes {}\n", counter.fetch_add(1, Ordering::Relaxed) + 1)
        }));
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        for want in ["scrapes 1\n", "scrapes 2\n"] {
            let r = http
                .get(format!("http://{addr}/metrics"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(
                r.headers()[header::CONTENT_TYPE],
                kakuremichi_metrics::CONTENT_TYPE
            );
            assert_eq!(r.text().await.unwrap(), want);
        }
        let r = http
            .get(format!("http://{addr}/other"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        server.abort();
    }

    #[tokio::test]
    async fn a_port_in_use_is_an_error_naming_it() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = listen(addr, String::new).await.unwrap_err();
        assert!(
            format!("{err:#}").contains(&format!("metrics on {addr}")),
            "{err:#}"
        );
    }
}
