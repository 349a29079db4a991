//! Ways into one resource without an account: its password or PIN (argon2id hashes, one live
//! per resource), and one-time codes sent by e-mail. Control checks them and hands the browser a
//! session token like any other; the gateway decides from that token alone.

use sqlx::Row;
use subtle::ConstantTimeEq as _;
use uuid::Uuid;

use super::{now_ms, parse_uuid, Result, Store, StoreError};

/// What a resource's passcode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PasscodeKind {
    /// A password (8 to 256 characters).
    Password,
    /// A PIN (6 digits).
    Pin,
}

impl PasscodeKind {
    fn as_str(self) -> &'static str {
        match self {
            PasscodeKind::Password => "password",
            PasscodeKind::Pin => "pin",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        match s {
            "password" => Ok(PasscodeKind::Password),
            "pin" => Ok(PasscodeKind::Pin),
            other => Err(StoreError::Invalid(format!(
                "unknown passcode kind {other:?}"
            ))),
        }
    }
}

/// A resource's live passcode, as the API shows it (never its hash).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PasscodeInfo {
    /// Password or PIN.
    pub kind: PasscodeKind,
    /// Created, when set.
    #[serde(serialize_with = "crate::times::ms")]
    pub created_at: i64,
}

/// A resource's live passcode with what checking it needs.
#[derive(Clone)]
pub struct LivePasscode {
    /// Its id: the `sid` of the sessions it opens.
    pub id: Uuid,
    /// Password or PIN.
    pub kind: PasscodeKind,
    /// The argon2id hash (PHC string).
    pub hash: String,
}

impl std::fmt::Debug for LivePasscode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LivePasscode")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// Why an e-mailed code signs no one in (shown to the person who typed it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EmailCodeRefusal {
    /// No such code, for another site, or wrong.
    #[error("that code is not right; check the e-mail and try again")]
    Wrong,
    /// Past its expiry.
    #[error("that code has expired; ask for a new one")]
    Expired,
    /// Used already, or guessed wrong too often.
    #[error("that code can no longer be used; ask for a new one")]
    Spent,
}

/// How many wrong guesses a code takes before it is spent.
pub const EMAIL_CODE_ATTEMPTS: i64 = 5;

fn code_digest(id: Uuid, code: &str) -> String {
    kakuremichi_proto::identity::secret_digest(&format!("{id}:{code}"))
}

impl Store {
    /// Sets a resource's passcode (its argon2id `hash`), replacing the live one, whose sessions
    /// then end at every gateway.
    pub async fn set_passcode(
        &self,
        org: Uuid,
        resource: Uuid,
        kind: PasscodeKind,
        hash: &str,
    ) -> Result<PasscodeInfo> {
        let now = now_ms();
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let owned: Option<String> =
            sqlx::query_scalar("SELECT id FROM resources WHERE id = $1 AND org_id = $2")
                .bind(resource.to_string())
                .bind(org.to_string())
                .fetch_optional(&mut *tx)
                .await?;
        if owned.is_none() {
            return Err(StoreError::NotFound("resource"));
        }
        // Replaced ones matter only while tokens they opened may live.
        sqlx::query("DELETE FROM resource_passcodes WHERE replaced_at < $1")
            .bind(now - self.session_life_ms())
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE resource_passcodes SET replaced_at = $1 \
             WHERE resource_id = $2 AND replaced_at IS NULL",
        )
        .bind(now)
        .bind(resource.to_string())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO resource_passcodes (id, resource_id, kind, hash, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(Uuid::new_v4().to_string())
        .bind(resource.to_string())
        .bind(kind.as_str())
        .bind(hash)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        self.commit_bumped(tx).await?;
        Ok(PasscodeInfo {
            kind,
            created_at: now,
        })
    }

    /// Removes a resource's passcode; the sessions it opened end at every gateway.
    pub async fn remove_passcode(&self, org: Uuid, resource: Uuid) -> Result<()> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE resource_passcodes SET replaced_at = $1 WHERE replaced_at IS NULL \
             AND resource_id = (SELECT id FROM resources WHERE id = $2 AND org_id = $3)",
        )
        .bind(now_ms())
        .bind(resource.to_string())
        .bind(org.to_string())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound("passcode"));
        }
        self.commit_bumped(tx).await?;
        Ok(())
    }

    /// A resource's live passcode, as the API shows it.
    pub async fn passcode_info(&self, org: Uuid, resource: Uuid) -> Result<Option<PasscodeInfo>> {
        let row = sqlx::query(
            "SELECT p.kind, p.created_at FROM resource_passcodes p \
             JOIN resources r ON r.id = p.resource_id \
             WHERE p.resource_id = $1 AND r.org_id = $2 AND p.replaced_at IS NULL",
        )
        .bind(resource.to_string())
        .bind(org.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(PasscodeInfo {
                kind: PasscodeKind::parse(&r.try_get::<String, _>("kind")?)?,
                created_at: r.try_get("created_at")?,
            })
        })
        .transpose()
    }

    /// A resource's live passcode, to check one a visitor typed.
    pub async fn live_passcode(&self, resource: Uuid) -> Result<Option<LivePasscode>> {
        let row = sqlx::query(
            "SELECT id, kind, hash FROM resource_passcodes \
             WHERE resource_id = $1 AND replaced_at IS NULL",
        )
        .bind(resource.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(LivePasscode {
                id: parse_uuid(&r.try_get::<String, _>("id")?)?,
                kind: PasscodeKind::parse(&r.try_get::<String, _>("kind")?)?,
                hash: r.try_get("hash")?,
            })
        })
        .transpose()
    }

    /// Records a one-time code sent to `email` for `resource`, valid until `expires_at` (unix
    /// ms); returns its id (the form that takes the code carries it).
    pub async fn create_email_code(
        &self,
        resource: Uuid,
        email: &str,
        code: &str,
        expires_at: i64,
    ) -> Result<Uuid> {
        let id = Uuid::new_v4();
        let now = now_ms();
        let _w = self.write.lock().await;
        sqlx::query("DELETE FROM email_codes WHERE expires_at < $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "INSERT INTO email_codes (id, resource_id, email, hash, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id.to_string())
        .bind(resource.to_string())
        .bind(email)
        .bind(code_digest(id, code))
        .bind(now)
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(id)
    }

    /// Checks a code typed for `resource` at `now`: the right one is spent and its address
    /// answered; a wrong one counts against the code ([`EMAIL_CODE_ATTEMPTS`]).
    pub async fn redeem_email_code(
        &self,
        id: Uuid,
        resource: Uuid,
        code: &str,
        now: i64,
    ) -> Result<std::result::Result<String, EmailCodeRefusal>> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT email, hash, expires_at, attempts, used_at FROM email_codes \
             WHERE id = $1 AND resource_id = $2",
        )
        .bind(id.to_string())
        .bind(resource.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(Err(EmailCodeRefusal::Wrong));
        };
        let used: Option<i64> = row.try_get("used_at")?;
        let attempts: i64 = row.try_get("attempts")?;
        if used.is_some() || attempts >= EMAIL_CODE_ATTEMPTS {
            return Ok(Err(EmailCodeRefusal::Spent));
        }
        if row.try_get::<i64, _>("expires_at")? <= now {
            return Ok(Err(EmailCodeRefusal::Expired));
        }
        let hash: String = row.try_get("hash")?;
        let right = bool::from(hash.as_bytes().ct_eq(code_digest(id, code).as_bytes()));
        let (sql, outcome) = if right {
            (
                "UPDATE email_codes SET used_at = $2 WHERE id = $1",
                Ok(row.try_get::<String, _>("email")?),
            )
        } else {
            (
                "UPDATE email_codes SET attempts = attempts + 1 WHERE id = $1 AND $2 >= 0",
                Err(EmailCodeRefusal::Wrong),
            )
        };
        sqlx::query(sql)
            .bind(id.to_string())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(outcome)
    }
}
