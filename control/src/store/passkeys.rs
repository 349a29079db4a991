//! Passkeys in the store: users' WebAuthn credentials, and the ceremonies in progress (taken
//! exactly once, so that no answer can be replayed).

use sqlx::Row;
use uuid::Uuid;

use super::{now_ms, parse_uuid, taken, Result, Store, StoreError};

/// A user's passkey, as listed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PasskeyInfo {
    /// Id.
    pub id: Uuid,
    /// The user's name for it.
    pub name: String,
    /// Created.
    #[serde(serialize_with = "crate::times::ms")]
    pub created_at: i64,
    /// Last used to sign in.
    #[serde(serialize_with = "crate::times::opt_ms")]
    pub last_used_at: Option<i64>,
}

impl Store {
    /// Stores a new passkey (`passkey`: webauthn-rs's JSON); `Conflict` when its credential is
    /// registered already.
    pub async fn add_passkey(
        &self,
        user: Uuid,
        name: &str,
        cred_id: &str,
        passkey: &str,
    ) -> Result<Uuid> {
        let id = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO passkeys (id, user_id, name, cred_id, passkey, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id.to_string())
        .bind(user.to_string())
        .bind(name)
        .bind(cred_id)
        .bind(passkey)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(taken(|| "this passkey is registered already".into()))?;
        Ok(id)
    }

    /// A user's passkeys: (id, webauthn-rs JSON).
    pub async fn passkeys_of(&self, user: Uuid) -> Result<Vec<(Uuid, String)>> {
        sqlx::query("SELECT id, passkey FROM passkeys WHERE user_id = $1 ORDER BY created_at")
            .bind(user.to_string())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                Ok((
                    parse_uuid(&r.try_get::<String, _>("id")?)?,
                    r.try_get("passkey")?,
                ))
            })
            .collect()
    }

    /// A user's passkeys, as listed.
    pub async fn list_passkeys(&self, user: Uuid) -> Result<Vec<PasskeyInfo>> {
        sqlx::query(
            "SELECT id, name, created_at, last_used_at FROM passkeys WHERE user_id = $1 \
             ORDER BY created_at",
        )
        .bind(user.to_string())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(PasskeyInfo {
                id: parse_uuid(&r.try_get::<String, _>("id")?)?,
                name: r.try_get("name")?,
                created_at: r.try_get("created_at")?,
                last_used_at: r.try_get("last_used_at")?,
            })
        })
        .collect()
    }

    /// Records a sign-in with a passkey: its new state (counter) and the time.
    pub async fn passkey_used(&self, id: Uuid, passkey: &str) -> Result<()> {
        sqlx::query("UPDATE passkeys SET passkey = $1, last_used_at = $2 WHERE id = $3")
            .bind(passkey)
            .bind(now_ms())
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Removes one of a user's passkeys.
    pub async fn delete_passkey(&self, user: Uuid, id: Uuid) -> Result<()> {
        let done = sqlx::query("DELETE FROM passkeys WHERE id = $1 AND user_id = $2")
            .bind(id.to_string())
            .bind(user.to_string())
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound("passkey"));
        }
        Ok(())
    }

    /// Keeps a ceremony's state for `ttl_ms`; returns its id.
    pub async fn put_challenge(
        &self,
        user: Uuid,
        kind: &str,
        state: &str,
        ttl_ms: i64,
    ) -> Result<Uuid> {
        let id = Uuid::new_v4();
        let now = now_ms();
        sqlx::query("DELETE FROM passkey_challenges WHERE expires_at < $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "INSERT INTO passkey_challenges (id, user_id, kind, state, expires_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id.to_string())
        .bind(user.to_string())
        .bind(kind)
        .bind(state)
        .bind(now + ttl_ms)
        .execute(&self.pool)
        .await?;
        Ok(id)
    }

    /// Takes a ceremony's state (once): its user and state, if it exists, is of `kind` and has
    /// not expired.
    pub async fn take_challenge(&self, id: Uuid, kind: &str) -> Result<Option<(Uuid, String)>> {
        let row = sqlx::query(
            "DELETE FROM passkey_challenges WHERE id = $1 AND kind = $2 \
             RETURNING user_id, state, expires_at",
        )
        .bind(id.to_string())
        .bind(kind)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        if row.try_get::<i64, _>("expires_at")? < now_ms() {
            return Ok(None);
        }
        let user: String = row.try_get("user_id")?;
        Ok(Some((parse_uuid(&user)?, row.try_get("state")?)))
    }
}
