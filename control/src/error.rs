//! [`ApiError`]: the one error type of the REST API, with one status table.

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::store::StoreError;

/// An error answered by the API as `{"error": {"code": "...", "message": "..."}, "message":
/// "..."}` (the top-level `message` is what agentapi-proxy's clients read).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, unknown field, wrong content type or invalid value.
    #[error("{0}")]
    BadRequest(String),
    /// Missing or wrong admin key, enrollment token or credential.
    #[error("{0}")]
    Unauthorized(String),
    /// Authenticated, but not allowed to do this.
    #[error("{0}")]
    Forbidden(String),
    /// No such thing.
    #[error("{0}")]
    NotFound(String),
    /// The method is not allowed on this path.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A unique value is taken.
    #[error("{0}")]
    Conflict(String),
    /// The body is over the limit.
    #[error("request body is larger than 1 MiB")]
    PayloadTooLarge,
    /// Well formed, but it cannot be done (e.g. an `Idempotency-Key` reused for another request).
    #[error("{0}")]
    Unprocessable(String),
    /// The store cannot be reached now (PostgreSQL restarting, say): 503 with `Retry-After`; the
    /// cause is logged and masked in the answer.
    #[error("control cannot reach its database right now; try again in a few seconds")]
    Unavailable(String),
    /// Anything else; the cause is logged and masked in the answer.
    #[error("internal error")]
    Internal(String),
}

/// The `Retry-After` (seconds) of a 503 while the database is away.
pub const UNAVAILABLE_RETRY_AFTER_SECS: u64 = 2;

impl ApiError {
    /// The HTTP status and machine-readable code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unprocessable"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = match &self {
            ApiError::Internal(cause) => {
                tracing::error!(%cause, "internal error answering an API request");
                "internal error".to_owned()
            }
            ApiError::Unavailable(cause) => {
                tracing::warn!(%cause, "the database is unavailable; answering 503");
                self.to_string()
            }
            other => other.to_string(),
        };
        let mut resp = (
            status,
            Json(json!({"error": {"code": code, "message": message}, "message": message})),
        )
            .into_response();
        if matches!(self, ApiError::Unavailable(_)) {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(UNAVAILABLE_RETRY_AFTER_SECS),
            );
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => ApiError::NotFound(format!("{what} not found")),
            StoreError::Conflict(m) | StoreError::Exhausted(m) => ApiError::Conflict(m),
            StoreError::Invalid(m) => ApiError::BadRequest(m),
            StoreError::BadSecret => {
                ApiError::Unauthorized("invalid or already used token or credential".into())
            }
            e @ StoreError::Expired => ApiError::Unauthorized(e.to_string()),
            e @ StoreError::KeyInUse => ApiError::Conflict(e.to_string()),
            StoreError::Unavailable(cause) => ApiError::Unavailable(cause),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge
        } else {
            ApiError::BadRequest(r.body_text())
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::BadRequest(format!("invalid path: {}", r.body_text()))
    }
}
