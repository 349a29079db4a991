//! `Idempotency-Key` on creates (draft-ietf-httpapi-idempotency-key-header): a `POST` sent with
//! a key runs once per API key; a retry with the same key and the same request gets the first
//! answer again (with `Idempotent-Replayed: true`), for 24 hours. The same key with another
//! request is 422; a retry while the first still runs is 409. Answers of 5xx are not kept, so a
//! retry after a failure runs again.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::Digest as _;

use crate::store::{ApiKey, IdempotencyBegin};
use crate::{ApiError, AppState, MAX_BODY_BYTES};

/// The header.
pub const HEADER: &str = "idempotency-key";

/// The largest answer kept.
const MAX_KEPT: usize = 1 << 20;

/// The middleware (inside the API-key check, which puts the [`ApiKey`] in the request).
pub async fn idempotency(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if req.method() != Method::POST {
        return Ok(next.run(req).await);
    }
    let Some(raw) = req.headers().get(HEADER) else {
        return Ok(next.run(req).await);
    };
    let key = raw
        .to_str()
        .ok()
        .map(|k| k.trim().trim_matches('"'))
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::BadRequest("Idempotency-Key must be 1 to 255 visible ASCII characters".into())
        })?
        .to_owned();
    let Some(caller) = req.extensions().get::<ApiKey>().map(|k| k.id) else {
        return Ok(next.run(req).await);
    };
    if !state.store.can_keep_answers() {
        tracing::debug!("no secrets key: Idempotency-Key is not honoured");
        return Ok(next.run(req).await);
    }
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| ApiError::PayloadTooLarge)?;
    let mut h = sha2::Sha256::new();
    h.update(parts.method.as_str());
    h.update([0]);
    h.update(parts.uri.path());
    h.update([0]);
    h.update(&bytes);
    let fingerprint: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    match state
        .store
        .idempotency_begin(caller, &key, &fingerprint)
        .await?
    {
        IdempotencyBegin::Run => {}
        IdempotencyBegin::Replay {
            status,
            content_type,
            body,
        } => {
            let mut resp = Response::new(Body::from(body));
            *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            if let Some(ct) = content_type.and_then(|c| HeaderValue::from_str(&c).ok()) {
                resp.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            resp.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            return Ok(resp);
        }
        IdempotencyBegin::Mismatch => return Err(ApiError::Unprocessable(
            "this Idempotency-Key was used with another request: use a new key for a new request"
                .into(),
        )),
        IdempotencyBegin::InFlight => {
            return Err(ApiError::Conflict(
                "a request with this Idempotency-Key is still running: retry later".into(),
            ))
        }
    }
    let resp = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let status = resp.status();
    if status.is_server_error() {
        state.store.idempotency_abandon(caller, &key).await?;
        return Ok(resp);
    }
    let (parts, body) = resp.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_KEPT).await else {
        state.store.idempotency_abandon(caller, &key).await?;
        return Ok(ApiError::Internal("an answer too large to keep".into()).into_response());
    };
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if let Err(e) = state
        .store
        .idempotency_finish(caller, &key, status.as_u16(), content_type, &body)
        .await
    {
        tracing::warn!(error = %e, "cannot keep an answer for its Idempotency-Key");
        state.store.idempotency_abandon(caller, &key).await?;
    }
    Ok(Response::from_parts(parts, Body::from(body)))
}
