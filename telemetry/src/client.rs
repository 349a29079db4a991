//! The HTTP client the OTLP exporter posts with: reqwest's blocking client (the workspace's
//! reqwest, with its rustls), since the batch processor exports from a thread of its own, outside
//! any Tokio runtime.

use std::time::Duration;

use bytes::Bytes;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};

use crate::TelemetryError;

/// Answers larger than this are cut (a collector answers a few bytes).
const MAX_ANSWER: usize = 64 * 1024;

/// A blocking reqwest client as the exporter's [`HttpClient`].
#[derive(Debug)]
pub(crate) struct BlockingClient(reqwest::blocking::Client);

impl BlockingClient {
    /// A client whose every request, answer included, takes at most `timeout`. It is built on
    /// a thread of its own: reqwest's blocking client refuses to be built inside a runtime.
    pub(crate) fn new(timeout: Duration) -> Result<Self, TelemetryError> {
        std::thread::spawn(move || {
            reqwest::blocking::Client::builder()
                .timeout(timeout)
                .redirect(reqwest::redirect::Policy::none())
                .build()
        })
        .join()
        .map_err(|_| TelemetryError::Exporter("building the HTTP client panicked".into()))?
        .map(Self)
        .map_err(|e| TelemetryError::Exporter(e.to_string()))
    }
}

#[async_trait::async_trait]
impl HttpClient for BlockingClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let answer = self
            .0
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body.to_vec())
            .send()?;
        let status = answer.status();
        let headers = answer.headers().clone();
        let mut bytes = answer.bytes()?;
        bytes.truncate(MAX_ANSWER);
        let mut response = Response::new(bytes);
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        Ok(response)
    }
}
