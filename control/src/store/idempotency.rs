//! Idempotency keys: the first answer to a `POST` sent with an `Idempotency-Key`, kept 24 hours
//! per API key so a retry gets the same answer instead of a second object.

use sqlx::Row;
use uuid::Uuid;

use super::{now_ms, Result, Store};

/// How long an answer is kept.
pub const IDEMPOTENCY_TTL_MS: i64 = 24 * 3600 * 1000;

const PURPOSE: &str = "idempotency-response";

/// What a request with an idempotency key meets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyBegin {
    /// The key is new: the request runs, then [`Store::idempotency_finish`] or
    /// [`Store::idempotency_abandon`].
    Run,
    /// The same request ran: its answer.
    Replay {
        /// Status code.
        status: u16,
        /// Content type.
        content_type: Option<String>,
        /// Body.
        body: Vec<u8>,
    },
    /// The key was used with another request (method, path or body).
    Mismatch,
    /// The first request with this key still runs.
    InFlight,
}

impl Store {
    /// Claims `key` for `api_key` and a request's `fingerprint`, or tells what it met.
    pub async fn idempotency_begin(
        &self,
        api_key: Uuid,
        key: &str,
        fingerprint: &str,
    ) -> Result<IdempotencyBegin> {
        let now = now_ms();
        sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
            .bind(now - IDEMPOTENCY_TTL_MS)
            .execute(&self.pool)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys (api_key_id, idem_key, fingerprint, created_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (api_key_id, idem_key) DO NOTHING",
        )
        .bind(api_key.to_string())
        .bind(key)
        .bind(fingerprint)
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if inserted == 1 {
            return Ok(IdempotencyBegin::Run);
        }
        let Some(row) = sqlx::query(
            "SELECT fingerprint, status, content_type, body_sealed FROM idempotency_keys \
             WHERE api_key_id = $1 AND idem_key = $2",
        )
        .bind(api_key.to_string())
        .bind(key)
        .fetch_optional(&self.pool)
        .await?
        else {
            // Abandoned between the two statements: this request may run.
            return Box::pin(self.idempotency_begin(api_key, key, fingerprint)).await;
        };
        let stored: String = row.try_get("fingerprint")?;
        if stored != fingerprint {
            return Ok(IdempotencyBegin::Mismatch);
        }
        let status: Option<i64> = row.try_get("status")?;
        let Some(status) = status else {
            return Ok(IdempotencyBegin::InFlight);
        };
        let sealed: Option<String> = row.try_get("body_sealed")?;
        let body = match sealed {
            Some(s) => self.open_blob(PURPOSE, &s)?,
            None => Vec::new(),
        };
        Ok(IdempotencyBegin::Replay {
            status: u16::try_from(status).unwrap_or(500),
            content_type: row.try_get("content_type")?,
            body,
        })
    }

    /// Keeps the answer of the request that claimed `key`.
    pub async fn idempotency_finish(
        &self,
        api_key: Uuid,
        key: &str,
        status: u16,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<()> {
        let sealed = self.seal_blob(PURPOSE, body)?;
        sqlx::query(
            "UPDATE idempotency_keys SET status = $1, content_type = $2, body_sealed = $3 \
             WHERE api_key_id = $4 AND idem_key = $5",
        )
        .bind(i64::from(status))
        .bind(content_type)
        .bind(sealed)
        .bind(api_key.to_string())
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Frees `key`: its request failed in a way a retry may mend (a 5xx, an answer not kept).
    pub async fn idempotency_abandon(&self, api_key: Uuid, key: &str) -> Result<()> {
        sqlx::query("DELETE FROM idempotency_keys WHERE api_key_id = $1 AND idem_key = $2")
            .bind(api_key.to_string())
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Whether answers can be kept (they are sealed: control needs its secrets key).
    pub fn can_keep_answers(&self) -> bool {
        self.sealer.is_some()
    }
}
