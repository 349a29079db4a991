//! Users, their sign-in sessions and the keys that sign session tokens, in the store.
//!
//! Passwords are argon2id hashes (bounded in flight by [`crate::secrets`]); session cookies are
//! high-entropy secrets stored as digests and found by the id inside them. Every change that
//! gateways must know (a revoked session, a user signed out everywhere or disabled, a new key)
//! bumps the config version, so it reaches every gateway with the next snapshot.

use kakuremichi_proto::identity::{EdgeApiKey, GatewayIdentity, SigningKey, UserCutoff};
use kakuremichi_proto::Secret;
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::{corrupt, now_ms, parse_uuid, taken, Result, Store, StoreError};
use crate::secrets;

/// The permission a personal API key (and its user) needs to reach resources that accept keys.
pub const ACCESS_PERMISSION: &str = "resource:access";
/// Prefix of control's sign-in session cookies.
pub const SESSION_PREFIX: &str = "kms";
/// Purpose the signing keys are sealed under.
const KEY_PURPOSE: &str = "signing-key";
/// Built-in roles, most powerful first.
pub const BUILT_IN_ROLES: &[&str] = &["owner", "admin", "member", "viewer"];

/// A user as stored (without the password hash).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct User {
    /// Id.
    pub id: Uuid,
    /// E-mail address, lower case, unique.
    pub email: String,
    /// Display name.
    pub name: String,
    /// Role names in the organization the user was read for (empty when read without one).
    pub roles: Vec<String>,
    /// Disabled users cannot sign in, and their tokens are refused everywhere.
    pub disabled: bool,
    /// Wrong passwords since the last good sign-in.
    pub failed_sign_ins: u32,
    /// Locked until, after too many wrong passwords.
    #[serde(serialize_with = "crate::times::opt_ms")]
    pub locked_until: Option<i64>,
    /// Tokens issued before this (unix seconds) are refused.
    pub sessions_not_before: i64,
    /// Creation time.
    #[serde(serialize_with = "crate::times::ms")]
    pub created_at: i64,
    /// Whether the user has a password.
    pub has_password: bool,
    /// Whether the user has a TOTP second factor.
    pub has_totp: bool,
}

/// A new user (already validated; the password already hashed).
#[derive(Debug, Clone)]
pub struct NewUser {
    /// E-mail address, lower case.
    pub email: String,
    /// Display name.
    pub name: String,
    /// argon2id hash of the password, if the user signs in with one.
    pub password_hash: Option<String>,
    /// Roles.
    pub roles: Vec<String>,
}

/// Changes to a user; `None` keeps the field.
#[derive(Debug, Clone, Default)]
pub struct UserPatch {
    /// New name.
    pub name: Option<String>,
    /// New roles.
    pub roles: Option<Vec<String>>,
    /// Disable or enable.
    pub disabled: Option<bool>,
    /// New password hash.
    pub password_hash: Option<String>,
    /// Clear the lockout and the count of wrong passwords.
    pub unlock: bool,
}

/// A sign-in session at control.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Id (the `sid` of every token minted from it).
    pub id: Uuid,
    /// Whose.
    pub user_id: Uuid,
    /// Creation time (unix ms).
    pub created_at: i64,
    /// Expiry (unix ms).
    pub expires_at: i64,
    /// How the user signed in.
    pub amr: Vec<String>,
    /// Started through this organization's own identity provider: it vouches for the user
    /// only there. `None`: any organization the user belongs to.
    pub org_id: Option<Uuid>,
}

/// A key that signs session tokens, as the JWKS publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedKey {
    /// Key id.
    pub kid: String,
    /// Public key, base64url.
    pub x: String,
    /// Created (unix ms).
    pub created_at: i64,
    /// Retired (unix ms): no longer signs, still verifies.
    pub retired_at: Option<i64>,
}

/// The private half of the current signing key.
pub struct Signer {
    /// Key id.
    pub kid: String,
    /// PKCS#8 document of the Ed25519 key.
    pub pkcs8: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

fn user_from_row(row: &AnyRow) -> Result<User> {
    let id: String = row.try_get("id")?;
    let roles: String = row.try_get("roles")?;
    let password: Option<String> = row.try_get("password_hash")?;
    Ok(User {
        id: parse_uuid(&id)?,
        email: row.try_get("email")?,
        name: row.try_get("name")?,
        roles: serde_json::from_str(&roles).map_err(corrupt)?,
        disabled: row.try_get::<i64, _>("disabled")? != 0,
        failed_sign_ins: u32::try_from(row.try_get::<i64, _>("failed_sign_ins")?).unwrap_or(0),
        locked_until: row.try_get("locked_until")?,
        sessions_not_before: row.try_get("sessions_not_before")?,
        created_at: row.try_get("created_at")?,
        has_password: password.is_some(),
        has_totp: row.try_get::<Option<String>, _>("totp_sealed")?.is_some(),
    })
}

fn session_from_row(row: &AnyRow) -> Result<Session> {
    let id: String = row.try_get("id")?;
    let user: String = row.try_get("user_id")?;
    let amr: String = row.try_get("amr")?;
    Ok(Session {
        id: parse_uuid(&id)?,
        user_id: parse_uuid(&user)?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        amr: serde_json::from_str(&amr).map_err(corrupt)?,
        org_id: row
            .try_get::<Option<String>, _>("org_id")?
            .map(|o| parse_uuid(&o))
            .transpose()?,
    })
}

// users.roles is always '[]' (roles live in memberships).
const USER_COLUMNS: &str = "id, email, name, password_hash, roles, disabled, failed_sign_ins, \
     locked_until, sessions_not_before, created_at, totp_sealed";
const MEMBER_COLUMNS: &str = "u.id, u.email, u.name, u.password_hash, m.roles, u.disabled, \
     u.failed_sign_ins, u.locked_until, u.sessions_not_before, u.created_at, u.totp_sealed";
/// Purpose TOTP secrets are sealed under.
const TOTP_PURPOSE: &str = "totp";

impl Store {
    // ------------------------------------------------------------------ users

    /// How many users exist.
    pub async fn count_users(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Creates a user, a member of `org` with `new.roles`.
    pub async fn create_user(&self, org: Uuid, new: &NewUser) -> Result<User> {
        let _w = self.write.lock().await;
        let id = Uuid::new_v4();
        let mut tx = self.pool.begin().await?;
        Self::insert_user(&mut tx, id, org, new).await?;
        tx.commit().await?;
        self.get_member(org, id).await
    }

    async fn insert_user(
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        id: Uuid,
        org: Uuid,
        new: &NewUser,
    ) -> Result<()> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO users (id, email, name, password_hash, roles, created_at) \
             VALUES ($1, $2, $3, $4, '[]', $5)",
        )
        .bind(id.to_string())
        .bind(&new.email)
        .bind(&new.name)
        .bind(new.password_hash.as_deref())
        .bind(now)
        .execute(&mut **tx)
        .await
        .map_err(taken(|| format!("a user with e-mail {} exists", new.email)))?;
        sqlx::query(
            "INSERT INTO memberships (org_id, user_id, roles, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(org.to_string())
        .bind(id.to_string())
        .bind(serde_json::to_string(&new.roles).map_err(corrupt)?)
        .bind(now)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Creates the first user (the owner of the default organization) if there is none yet,
    /// and makes `admin_key_id` their key. `Conflict` when a user exists already.
    pub async fn create_owner(&self, new: &NewUser, admin_key_id: Uuid) -> Result<User> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(&mut *tx)
            .await?;
        if count > 0 {
            return Err(StoreError::Conflict("control is set up already".into()));
        }
        let id = Uuid::new_v4();
        Self::insert_user(&mut tx, id, super::DEFAULT_ORG, new).await?;
        sqlx::query("UPDATE api_keys SET user_id = $1 WHERE id = $2")
            .bind(id.to_string())
            .bind(admin_key_id.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.get_member(super::DEFAULT_ORG, id).await
    }

    /// One user, whatever their organizations (`roles` is empty: roles belong to memberships,
    /// see [`Store::get_member`]).
    pub async fn get_user(&self, id: Uuid) -> Result<User> {
        let row = sqlx::query(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound("user"))?;
        user_from_row(&row)
    }

    /// One member of `org`, with their roles there; `NotFound` when not a member.
    pub async fn get_member(&self, org: Uuid, id: Uuid) -> Result<User> {
        let row = sqlx::query(&format!(
            "SELECT {MEMBER_COLUMNS} FROM users u JOIN memberships m ON m.user_id = u.id \
             WHERE m.org_id = $1 AND u.id = $2"
        ))
        .bind(org.to_string())
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound("user"))?;
        user_from_row(&row)
    }

    /// A user and their password hash, by e-mail address (`roles` empty, as [`Store::get_user`]).
    pub async fn user_by_email(&self, email: &str) -> Result<Option<(User, Option<String>)>> {
        let row = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE email = $1"
        ))
        .bind(email.to_ascii_lowercase())
        .fetch_optional(&self.pool)
        .await?;
        match row {
            None => Ok(None),
            Some(row) => Ok(Some((user_from_row(&row)?, row.try_get("password_hash")?))),
        }
    }

    /// Every member of `org`, with their roles there, oldest first.
    pub async fn list_users(&self, org: Uuid) -> Result<Vec<User>> {
        sqlx::query(&format!(
            "SELECT {MEMBER_COLUMNS} FROM users u JOIN memberships m ON m.user_id = u.id \
             WHERE m.org_id = $1 ORDER BY u.created_at, u.id"
        ))
        .bind(org.to_string())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(user_from_row)
        .collect()
    }

    /// Changes a member of `org`: roles there, and the account's name, password, lockout and
    /// whether it is disabled (the caller decides who may change the account itself).
    /// Disabling, or a change of roles, also ends the user's sessions everywhere (tokens carry
    /// the roles they were issued with).
    pub async fn update_user(&self, org: Uuid, id: Uuid, patch: &UserPatch) -> Result<User> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "SELECT {MEMBER_COLUMNS} FROM users u JOIN memberships m ON m.user_id = u.id \
             WHERE m.org_id = $1 AND u.id = $2"
        ))
        .bind(org.to_string())
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound("user"))?;
        let mut u = user_from_row(&row)?;
        let mut cut = false;
        if let Some(n) = &patch.name {
            u.name = n.clone();
        }
        if let Some(r) = &patch.roles {
            cut |= *r != u.roles;
            u.roles = r.clone();
        }
        if let Some(d) = patch.disabled {
            cut |= d && !u.disabled;
            u.disabled = d;
        }
        if patch.unlock {
            u.failed_sign_ins = 0;
            u.locked_until = None;
        }
        if cut {
            u.sessions_not_before = now_ms() / 1000;
        }
        if let Some(h) = &patch.password_hash {
            sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
                .bind(h)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "UPDATE users SET name = $1, disabled = $2, failed_sign_ins = $3, \
             locked_until = $4, sessions_not_before = $5 WHERE id = $6",
        )
        .bind(&u.name)
        .bind(i64::from(u.disabled))
        .bind(i64::from(u.failed_sign_ins))
        .bind(u.locked_until)
        .bind(u.sessions_not_before)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE memberships SET roles = $1 WHERE org_id = $2 AND user_id = $3")
            .bind(serde_json::to_string(&u.roles).map_err(corrupt)?)
            .bind(org.to_string())
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        if cut {
            Self::end_sessions(&mut tx, id).await?;
            self.commit_bumped(tx).await?;
        } else {
            tx.commit().await?;
        }
        Ok(u)
    }

    async fn end_sessions(tx: &mut sqlx::Transaction<'static, sqlx::Any>, id: Uuid) -> Result<()> {
        sqlx::query(
            "UPDATE user_sessions SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL",
        )
        .bind(now_ms())
        .bind(id.to_string())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Removes a user from `org`, ending their sessions; a user left in no organization is
    /// deleted. Their sessions stay, revoked, so that gateways keep refusing their tokens.
    pub async fn delete_user(&self, org: Uuid, id: Uuid) -> Result<()> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM memberships WHERE org_id = $1 AND user_id = $2")
            .bind(org.to_string())
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound("user"));
        }
        Self::end_sessions(&mut tx, id).await?;
        let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM memberships WHERE user_id = $1")
            .bind(id.to_string())
            .fetch_one(&mut *tx)
            .await?;
        if left == 0 {
            sqlx::query("DELETE FROM users WHERE id = $1")
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
        } else {
            // Tokens carry the roles of the organization they were issued for.
            sqlx::query("UPDATE users SET sessions_not_before = $1 WHERE id = $2")
                .bind(now_ms() / 1000)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        self.commit_bumped(tx).await?;
        Ok(())
    }

    /// Takes one sign-in attempt for `ip` (a client address, or any other key such as
    /// `passcode:<resource>:<address>`) from its token bucket: `per_minute` attempts a minute,
    /// in bursts of as many. The bucket lives in the store, so every control
    /// replica counts against the same one. `Ok(None)`: go on; `Ok(Some(ms))`: refused, a token
    /// comes back in `ms`. A refused attempt takes nothing.
    pub async fn take_sign_in(&self, ip: &str, per_minute: u32, now: i64) -> Result<Option<i64>> {
        let cap = f64::from(per_minute.max(1));
        let rate = cap / 60_000.0;
        // r = the tokens refilled since `at`, at most `cap`. Granted when r >= 1 (then r - 1
        // stay); refused otherwise (r stays, at least 0).
        let r = "(sign_in_buckets.tokens + ($3 - sign_in_buckets.at) * $4)";
        let row = sqlx::query(&format!(
            "INSERT INTO sign_in_buckets (ip, tokens, at, granted) VALUES ($1, $2, $3, 1) \
             ON CONFLICT (ip) DO UPDATE SET \
               tokens = CASE WHEN {r} >= $5 THEN $5 - 1 WHEN {r} >= 1 THEN {r} - 1 \
                 WHEN {r} < 0 THEN 0 ELSE {r} END, \
               granted = CASE WHEN {r} >= 1 THEN 1 ELSE 0 END, \
               at = $3 \
             RETURNING tokens, granted"
        ))
        .bind(ip)
        .bind(cap - 1.0)
        .bind(now)
        .bind(rate)
        .bind(cap)
        .fetch_one(&self.pool)
        .await?;
        let tokens: f64 = row.try_get("tokens")?;
        let granted: i64 = row.try_get("granted")?;
        // Buckets idle long enough to be full again are the ones that cost nothing to forget.
        sqlx::query("DELETE FROM sign_in_buckets WHERE at < $1")
            .bind(now - 120_000)
            .execute(&self.pool)
            .await?;
        if granted != 0 {
            Ok(None)
        } else {
            Ok(Some(((1.0 - tokens) / rate).ceil() as i64))
        }
    }

    /// Counts a wrong password: after `max_failures` in a row the account is locked for
    /// `lock_ms`. Returns the user's lock expiry, if locked now.
    pub async fn record_failed_sign_in(
        &self,
        id: Uuid,
        max_failures: u32,
        lock_ms: i64,
    ) -> Result<Option<i64>> {
        let _w = self.write.lock().await;
        let failures: i64 = sqlx::query_scalar(
            "UPDATE users SET failed_sign_ins = failed_sign_ins + 1 WHERE id = $1 \
             RETURNING failed_sign_ins",
        )
        .bind(id.to_string())
        .fetch_one(&self.pool)
        .await?;
        if failures >= i64::from(max_failures) {
            let until = now_ms() + lock_ms;
            sqlx::query(
                "UPDATE users SET locked_until = $1, failed_sign_ins = 0 WHERE id = $2 \
                 AND (locked_until IS NULL OR locked_until < $3)",
            )
            .bind(until)
            .bind(id.to_string())
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
            return Ok(Some(until));
        }
        Ok(None)
    }

    /// Gives a user a TOTP second factor with `secret` (replacing any earlier one).
    pub async fn set_totp(&self, user: Uuid, secret: &[u8]) -> Result<()> {
        let sealed = self.seal_blob(TOTP_PURPOSE, secret)?;
        let done =
            sqlx::query("UPDATE users SET totp_sealed = $1, totp_last_step = 0 WHERE id = $2")
                .bind(sealed)
                .bind(user.to_string())
                .execute(&self.pool)
                .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound("user"));
        }
        Ok(())
    }

    /// Removes a user's TOTP second factor.
    pub async fn clear_totp(&self, user: Uuid) -> Result<()> {
        let done = sqlx::query("UPDATE users SET totp_sealed = NULL WHERE id = $1")
            .bind(user.to_string())
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound("user"));
        }
        Ok(())
    }

    /// A user's TOTP secret, if they have one.
    pub async fn totp_secret(&self, user: Uuid) -> Result<Option<Vec<u8>>> {
        let sealed: Option<Option<String>> =
            sqlx::query_scalar("SELECT totp_sealed FROM users WHERE id = $1")
                .bind(user.to_string())
                .fetch_optional(&self.pool)
                .await?;
        sealed
            .flatten()
            .map(|s| self.open_blob(TOTP_PURPOSE, &s))
            .transpose()
    }

    /// Takes TOTP time step `step` for `user`: `false` when a code for it or a later step was
    /// already accepted (a code works once).
    pub async fn take_totp_step(&self, user: Uuid, step: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE users SET totp_last_step = $1 WHERE id = $2 AND totp_last_step < $1",
        )
        .bind(step)
        .bind(user.to_string())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Seals `plain` with control's secrets key (for values that travel through browsers or
    /// rest in the store).
    pub fn seal_blob(&self, purpose: &str, plain: &[u8]) -> Result<String> {
        self.sealer
            .as_deref()
            .ok_or_else(|| StoreError::Invalid("control has no secrets key".into()))?
            .seal(purpose, plain)
            .map_err(|e| StoreError::Invalid(e.to_string()))
    }

    /// Opens a value sealed by [`Store::seal_blob`]; `BadSecret` when it was tampered with.
    pub fn open_blob(&self, purpose: &str, sealed: &str) -> Result<Vec<u8>> {
        self.sealer
            .as_deref()
            .ok_or_else(|| StoreError::Invalid("control has no secrets key".into()))?
            .open(purpose, sealed)
            .map_err(|_| StoreError::BadSecret)
    }

    // --------------------------------------------------------------- sessions

    /// Starts a session for a user who just proved who they are; returns it and its cookie.
    /// The user's wrong-password count is cleared.
    pub async fn create_session(
        &self,
        user: Uuid,
        ttl_ms: i64,
        amr: &[String],
        scope: Option<Uuid>,
    ) -> Result<(Session, Secret)> {
        let id = Uuid::new_v4();
        let secret = secrets::new_with_id(SESSION_PREFIX, id);
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO user_sessions (id, user_id, token_hash, created_at, expires_at, amr, \
             org_id) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id.to_string())
        .bind(user.to_string())
        .bind(secrets::digest(&secret))
        .bind(now)
        .bind(now + ttl_ms)
        .bind(serde_json::to_string(amr).map_err(corrupt)?)
        .bind(scope.map(|o| o.to_string()))
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE users SET failed_sign_ins = 0 WHERE id = $1")
            .bind(user.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((
            Session {
                id,
                user_id: user,
                created_at: now,
                expires_at: now + ttl_ms,
                amr: amr.to_vec(),
                org_id: scope,
            },
            secret,
        ))
    }

    /// The live session a cookie names, with its user (`None`: unknown, expired, revoked, or
    /// the user is disabled or was signed out everywhere since).
    pub async fn session_by_cookie(&self, cookie: &Secret) -> Result<Option<(Session, User)>> {
        let Some(id) = secrets::embedded_id(SESSION_PREFIX, cookie) else {
            return Ok(None);
        };
        let row = sqlx::query(
            "SELECT id, user_id, token_hash, created_at, expires_at, revoked_at, amr, org_id \
             FROM user_sessions WHERE id = $1",
        )
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let hash: String = row.try_get("token_hash")?;
        if !secrets::verify(&hash, cookie).await.ok() {
            return Ok(None);
        }
        let revoked: Option<i64> = row.try_get("revoked_at")?;
        let session = session_from_row(&row)?;
        if revoked.is_some() || session.expires_at <= now_ms() {
            return Ok(None);
        }
        let user = match self.get_user(session.user_id).await {
            Ok(u) => u,
            Err(StoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        if user.disabled || session.created_at / 1000 < user.sessions_not_before {
            return Ok(None);
        }
        Ok(Some((session, user)))
    }

    /// Ends one session: its tokens are refused by every gateway from the next snapshot on.
    pub async fn revoke_session(&self, id: Uuid) -> Result<()> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE user_sessions SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
        )
        .bind(now_ms())
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        self.commit_bumped(tx).await?;
        Ok(())
    }

    /// Signs a user out everywhere: every session ends and every token issued so far is refused.
    pub async fn revoke_user_sessions(&self, user: Uuid) -> Result<()> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("UPDATE users SET sessions_not_before = $1 WHERE id = $2")
            .bind(now_ms() / 1000)
            .bind(user.to_string())
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound("user"));
        }
        sqlx::query(
            "UPDATE user_sessions SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL",
        )
        .bind(now_ms())
        .bind(user.to_string())
        .execute(&mut *tx)
        .await?;
        self.commit_bumped(tx).await?;
        Ok(())
    }

    // ----------------------------------------------------------- signing keys

    /// Makes sure a current signing key exists (needs the sealer).
    pub async fn ensure_signing_key(&self) -> Result<()> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        self.seeding_lock(&mut tx).await?;
        let current: Option<String> =
            sqlx::query_scalar("SELECT private_sealed FROM signing_keys WHERE retired_at IS NULL")
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(sealed) = current {
            // Another replica (or an earlier run) sealed it: this one must be able to open it.
            if let Some(sealer) = self.sealer.as_deref() {
                if sealer.open(KEY_PURPOSE, &sealed).is_err() {
                    return Err(StoreError::Invalid(
                        "the signing key in the database was sealed with another secrets key: \
                         every control replica on one database needs the same secrets key file \
                         (--secrets-key-file; copy the first replica's)"
                            .into(),
                    ));
                }
            }
            return Ok(());
        }
        self.insert_signing_key(&mut tx).await?;
        self.commit_bumped(tx).await?;
        Ok(())
    }

    async fn insert_signing_key(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    ) -> Result<String> {
        use base64::Engine as _;
        use ring::signature::KeyPair as _;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| StoreError::Invalid("cannot generate a signing key".into()))?;
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
            .map_err(|_| StoreError::Invalid("cannot read the new signing key".into()))?;
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key());
        let sealed = self
            .sealer
            .as_deref()
            .ok_or_else(|| {
                StoreError::Invalid(
                    "control has no secrets key to keep its signing key with".into(),
                )
            })?
            .seal(KEY_PURPOSE, pkcs8.as_ref())
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        let kid = Uuid::new_v4().simple().to_string()[..16].to_owned();
        sqlx::query(
            "INSERT INTO signing_keys (kid, private_sealed, public_x, created_at) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(&kid)
        .bind(sealed)
        .bind(&x)
        .bind(now_ms())
        .execute(&mut **tx)
        .await?;
        Ok(kid)
    }

    /// Retires the current signing key (it keeps verifying for `overlap_ms`) and makes a new
    /// one. Returns the new key id.
    pub async fn rotate_signing_key(&self) -> Result<String> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE signing_keys SET retired_at = $1 WHERE retired_at IS NULL")
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        let kid = self.insert_signing_key(&mut tx).await?;
        self.commit_bumped(tx).await?;
        Ok(kid)
    }

    /// The current signing key, opened.
    pub async fn signer(&self) -> Result<Signer> {
        self.read_signer(&self.pool).await
    }

    async fn read_signer<'e, E>(&self, ex: E) -> Result<Signer>
    where
        E: sqlx::Executor<'e, Database = sqlx::Any>,
    {
        let row = sqlx::query(
            "SELECT kid, private_sealed FROM signing_keys WHERE retired_at IS NULL \
             ORDER BY created_at DESC",
        )
        .fetch_optional(ex)
        .await?
        .ok_or(StoreError::NotFound("signing key"))?;
        let sealed: String = row.try_get("private_sealed")?;
        let pkcs8 = self
            .sealer
            .as_deref()
            .ok_or_else(|| StoreError::Invalid("control has no secrets key".into()))?
            .open(KEY_PURPOSE, &sealed)
            .map_err(|e| corrupt(e.to_string()))?;
        Ok(Signer {
            kid: row.try_get("kid")?,
            pkcs8,
        })
    }

    /// Keys that still verify: the current one and those retired less than `overlap_ms` ago.
    pub async fn published_keys(&self, overlap_ms: i64) -> Result<Vec<PublishedKey>> {
        let rows = sqlx::query(
            "SELECT kid, public_x, created_at, retired_at FROM signing_keys \
             WHERE retired_at IS NULL OR retired_at > $1 ORDER BY created_at DESC",
        )
        .bind(now_ms() - overlap_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(PublishedKey {
                    kid: r.try_get("kid")?,
                    x: r.try_get("public_x")?,
                    created_at: r.try_get("created_at")?,
                    retired_at: r.try_get("retired_at")?,
                })
            })
            .collect()
    }

    /// What gateways need: keys, revoked sessions and user cutoffs still within a token's life.
    pub(crate) async fn gateway_identity(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        token_life_ms: i64,
    ) -> Result<GatewayIdentity> {
        let now = now_ms();
        let keys = sqlx::query(
            "SELECT kid, public_x FROM signing_keys WHERE retired_at IS NULL OR retired_at > $1 \
             ORDER BY created_at DESC",
        )
        .bind(now - token_life_ms)
        .fetch_all(&mut **tx)
        .await?
        .iter()
        .map(|r| {
            Ok(SigningKey {
                kid: r.try_get("kid")?,
                x: r.try_get("public_x")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
        // Revoked sessions, revoked share links, replaced passcodes and revoked OAuth grants (the
        // `sid` of the sessions and tokens they opened), while tokens for them may live.
        let revoked_sessions = sqlx::query_scalar::<_, String>(
            "SELECT id FROM user_sessions WHERE revoked_at IS NOT NULL AND expires_at > $1 \
             UNION SELECT id FROM share_links WHERE revoked_at IS NOT NULL AND expires_at > $1 \
             UNION SELECT id FROM resource_passcodes WHERE replaced_at > $2 \
             UNION SELECT grant_id FROM oauth_revoked_grants WHERE revoked_at > $2 \
             ORDER BY id",
        )
        .bind(now)
        .bind(now - token_life_ms)
        .fetch_all(&mut **tx)
        .await?
        .iter()
        .map(|s| parse_uuid(s))
        .collect::<Result<Vec<_>>>()?;
        let user_cutoffs = sqlx::query(
            "SELECT id, sessions_not_before, disabled FROM users \
             WHERE disabled <> 0 OR sessions_not_before > $1 ORDER BY id",
        )
        .bind((now - token_life_ms) / 1000)
        .fetch_all(&mut **tx)
        .await?
        .iter()
        .map(|r| {
            let id: String = r.try_get("id")?;
            Ok(UserCutoff {
                user: parse_uuid(&id)?,
                not_before: r.try_get("sessions_not_before")?,
                disabled: r.try_get::<i64, _>("disabled")? != 0,
            })
        })
        .collect::<Result<Vec<_>>>()?;
        Ok(GatewayIdentity {
            issuer: String::new(),
            sign_in_url: String::new(),
            keys,
            revoked_sessions,
            user_cutoffs,
            api_keys: Vec::new(),
        })
    }

    /// The API keys gateways accept: for every HTTP resource that allows them, each live
    /// personal key of its organization whose user is a member there, not disabled, allowed by
    /// the resource's policy, and holds `resource:access` (its scopes and its user's roles there
    /// both give it), with an assertion signed for that user and hostname. The assertion lives
    /// for a session's life (or until the key expires); control pushes fresh ones before then.
    pub(crate) async fn edge_api_keys(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        resources: &[super::Resource],
        sessions_host: Option<&str>,
        issuer: &str,
        life_ms: i64,
    ) -> Result<Vec<EdgeApiKey>> {
        use std::collections::HashMap;
        let hosts: Vec<&super::Resource> = resources
            .iter()
            .filter(|r| r.access.as_ref().is_some_and(|a| a.takes_keys()) && !r.hostname.is_empty())
            .collect();
        if hosts.is_empty() && sessions_host.is_none() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let keys = sqlx::query(
            "SELECT id, name, hash, scopes, user_id, org_id, expires_at FROM api_keys \
             WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $1) ORDER BY id",
        )
        .bind(now)
        .fetch_all(&mut **tx)
        .await?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // (org, user) -> (email, name, roles) of members who are not disabled.
        let mut members: HashMap<(String, String), (String, String, Vec<String>)> = HashMap::new();
        for r in sqlx::query(
            "SELECT m.org_id, m.user_id, m.roles, u.email, u.name FROM memberships m \
             JOIN users u ON u.id = m.user_id WHERE u.disabled = 0",
        )
        .fetch_all(&mut **tx)
        .await?
        {
            let roles: String = r.try_get("roles")?;
            members.insert(
                (r.try_get("org_id")?, r.try_get("user_id")?),
                (
                    r.try_get("email")?,
                    r.try_get("name")?,
                    serde_json::from_str(&roles).map_err(corrupt)?,
                ),
            );
        }
        // (org, role) -> permissions of custom roles.
        let mut custom: HashMap<(String, String), Vec<String>> = HashMap::new();
        for r in sqlx::query("SELECT org_id, name, permissions FROM roles")
            .fetch_all(&mut **tx)
            .await?
        {
            let p: String = r.try_get("permissions")?;
            custom.insert(
                (r.try_get("org_id")?, r.try_get("name")?),
                serde_json::from_str(&p).map_err(corrupt)?,
            );
        }
        // Without a signing key nothing can be asserted: keys are not accepted, the rest of the
        // world goes on.
        let signer = match self.read_signer(&mut **tx).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot sign API-key assertions: gateways accept no API key");
                return Ok(Vec::new());
            }
        };
        let mut out = Vec::new();
        for k in &keys {
            let hash: String = k.try_get("hash")?;
            if !hash.starts_with(kakuremichi_proto::identity::SECRET_DIGEST_PREFIX) {
                // A hash from an earlier version: it becomes a digest at its first use at control.
                continue;
            }
            let org: String = k.try_get("org_id")?;
            let id: String = k.try_get("id")?;
            let key_id = parse_uuid(&id)?;
            let user: Option<String> = k.try_get("user_id")?;
            let scopes: Option<String> = k.try_get("scopes")?;
            let scopes: Option<Vec<String>> = scopes
                .map(|s| serde_json::from_str(&s).map_err(corrupt))
                .transpose()?;
            let scoped = |perm: &str| scopes.as_ref().is_none_or(|s| s.iter().any(|p| p == perm));
            let by_scope = scoped(ACCESS_PERMISSION);
            let expires_at: Option<i64> = k.try_get("expires_at")?;
            let exp = expires_at.map_or(now + life_ms, |e| e.min(now + life_ms));
            let Some(user) = user else {
                // An organization service key: for the resources whose policies name it.
                if !by_scope {
                    continue;
                }
                // The admin key seeded at first start has no name.
                let name: String = k.try_get::<Option<String>, _>("name")?.unwrap_or_default();
                for r in hosts.iter().filter(|r| {
                    r.org_id.to_string() == org
                        && r.access
                            .as_ref()
                            .is_some_and(|a| a.service_keys.contains(&key_id))
                }) {
                    let claims = kakuremichi_proto::identity::SessionClaims {
                        iss: issuer.to_owned(),
                        sub: key_id.to_string(),
                        aud: r.hostname.clone(),
                        iat: now / 1000,
                        exp: exp / 1000,
                        sid: key_id.to_string(),
                        email: String::new(),
                        name: name.clone(),
                        roles: Vec::new(),
                        nonce: String::new(),
                        amr: vec![kakuremichi_proto::identity::SERVICE_KEY_AMR.to_owned()],
                        scope: String::new(),
                    };
                    push_edge_key(&mut out, &signer, &claims, key_id, &hash);
                }
                continue;
            };
            let Some((email, name, roles)) = members.get(&(org.clone(), user.clone())) else {
                continue;
            };
            let role_gives = |perm: &str| {
                roles.iter().any(|r| match crate::roles::built_in(r) {
                    Some(perms) => perms.contains(&perm),
                    None => custom
                        .get(&(org.clone(), r.clone()))
                        .is_some_and(|p| p.iter().any(|p| p == perm)),
                })
            };
            // The key's assertion on one hostname: its user, as a session token says.
            let claims_for = |aud: &str| kakuremichi_proto::identity::SessionClaims {
                iss: issuer.to_owned(),
                sub: user.clone(),
                aud: aud.to_owned(),
                iat: now / 1000,
                exp: exp / 1000,
                sid: key_id.to_string(),
                email: email.clone(),
                name: name.clone(),
                roles: roles.clone(),
                nonce: String::new(),
                amr: vec![kakuremichi_proto::identity::API_KEY_AMR.to_owned()],
                scope: String::new(),
            };
            // The agent-sessions endpoint: each key that may reach sessions, as its user.
            if let Some(host) = sessions_host {
                if role_gives(SESSION_ACCESS) && scoped(SESSION_ACCESS) {
                    push_edge_key(&mut out, &signer, &claims_for(host), key_id, &hash);
                }
            }
            if !(role_gives(ACCESS_PERMISSION) && by_scope) {
                continue;
            }
            for r in hosts.iter().filter(|r| r.org_id.to_string() == org) {
                if !r
                    .access
                    .as_ref()
                    .is_some_and(|a| a.api_keys && a.allows(email, roles))
                {
                    continue;
                }
                push_edge_key(&mut out, &signer, &claims_for(&r.hostname), key_id, &hash);
            }
        }
        Ok(out)
    }
}

/// The permission that lets a key reach agent sessions through a gateway.
const SESSION_ACCESS: &str = "session:access";

/// Signs the assertion for a key on one hostname and adds it to what gateways get (a key whose
/// assertion cannot be signed is left out, and logged).
fn push_edge_key(
    out: &mut Vec<EdgeApiKey>,
    signer: &Signer,
    claims: &kakuremichi_proto::identity::SessionClaims,
    key_id: Uuid,
    digest: &str,
) {
    match crate::identity::mint(signer, claims) {
        Ok(assertion) => out.push(EdgeApiKey {
            id: key_id,
            host: claims.aud.clone(),
            digest: digest.to_owned(),
            assertion,
        }),
        Err(e) => {
            tracing::error!(error = %e, key_id = %key_id, "cannot sign an API-key assertion")
        }
    }
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditEntry {
    /// When.
    #[serde(serialize_with = "crate::times::ms")]
    pub at: i64,
    /// Who: `admin-key:<id>`, `user:<id>`, or `anonymous`.
    pub actor: String,
    /// What: `sign_in`, `sign_out`, `account_locked`, or `<METHOD> <API path>`.
    pub action: String,
    /// What it was done to (a user id, an e-mail address, a path), if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// `ok`, `denied`, or an HTTP status code.
    pub outcome: String,
    /// The client's address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// More, e.g. why a sign-in failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The organization it happened in; `None` (sign-ins at control) shows to the default one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub org_id: Option<Uuid>,
}

/// Which audit entries to list.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditFilter {
    /// Only this action (exact), or actions starting with it when it ends in `*`.
    pub action: Option<String>,
    /// Only this actor.
    pub actor: Option<String>,
    /// Only this outcome.
    pub outcome: Option<String>,
    /// Only entries at or after this time (RFC 3339, or unix ms).
    #[serde(default, deserialize_with = "crate::times::de_opt_ms")]
    pub since: Option<i64>,
    /// At most this many, newest first (default 100, at most 1000).
    pub limit: Option<u32>,
}

impl Store {
    /// Adds a line to the audit log.
    pub async fn record_audit(&self, e: &AuditEntry) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit_log (id, at, actor, action, target, outcome, client, detail, \
             org_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(Uuid::new_v4().to_string())
        .bind(e.at)
        .bind(&e.actor)
        .bind(&e.action)
        .bind(e.target.as_deref())
        .bind(&e.outcome)
        .bind(e.client.as_deref())
        .bind(e.detail.as_deref())
        .bind(e.org_id.map(|o| o.to_string()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The organization's audit entries matching `f`, newest first (the default organization
    /// also sees those of no organization).
    pub async fn list_audit(&self, org: Uuid, f: &AuditFilter) -> Result<Vec<AuditEntry>> {
        let mut sql = String::from(
            "SELECT at, actor, action, target, outcome, client, detail, org_id FROM audit_log \
             WHERE (org_id = $1",
        );
        sql.push_str(if org == super::DEFAULT_ORG {
            " OR org_id IS NULL)"
        } else {
            ")"
        });
        let mut binds: Vec<String> = vec![org.to_string()];
        if let Some(a) = &f.action {
            match a.strip_suffix('*') {
                Some(prefix) => {
                    binds.push(format!("{}%", prefix.replace(['%', '_'], "")));
                    sql.push_str(&format!(" AND action LIKE ${}", binds.len()));
                }
                None => {
                    binds.push(a.clone());
                    sql.push_str(&format!(" AND action = ${}", binds.len()));
                }
            }
        }
        if let Some(a) = &f.actor {
            binds.push(a.clone());
            sql.push_str(&format!(" AND actor = ${}", binds.len()));
        }
        if let Some(o) = &f.outcome {
            binds.push(o.clone());
            sql.push_str(&format!(" AND outcome = ${}", binds.len()));
        }
        let since_at = binds.len() + 1;
        sql.push_str(&format!(
            " AND at >= ${since_at} ORDER BY at DESC, id DESC LIMIT ${}",
            since_at + 1
        ));
        let mut q = sqlx::query(&sql);
        for b in &binds {
            q = q.bind(b);
        }
        let rows = q
            .bind(f.since.unwrap_or(0))
            .bind(i64::from(f.limit.unwrap_or(100).clamp(1, 1000)))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    at: r.try_get("at")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    outcome: r.try_get("outcome")?,
                    client: r.try_get("client")?,
                    detail: r.try_get("detail")?,
                    org_id: r
                        .try_get::<Option<String>, _>("org_id")?
                        .map(|o| parse_uuid(&o))
                        .transpose()?,
                })
            })
            .collect()
    }
}

/// Prefix of scoped API keys.
pub const API_KEY_PREFIX: &str = "kmk";

/// An API key as stored (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct ApiKey {
    /// Id (inside the key).
    pub id: Uuid,
    /// Display name (`admin` for the admin key).
    pub name: String,
    /// Permissions; `None`: every permission (the admin key).
    pub scopes: Option<Vec<String>>,
    /// The organization it acts in.
    pub org_id: Uuid,
    /// The user it belongs to, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Uuid>,
    /// Created.
    #[serde(serialize_with = "crate::times::ms")]
    #[schemars(with = "crate::times::DateTime")]
    pub created_at: i64,
    /// Expires (unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(serialize_with = "crate::times::opt_ms")]
    #[schemars(with = "Option<crate::times::DateTime>")]
    pub expires_at: Option<i64>,
    /// Last used (unix ms, to the minute).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(serialize_with = "crate::times::opt_ms")]
    #[schemars(with = "Option<crate::times::DateTime>")]
    pub last_used_at: Option<i64>,
}

fn api_key_from_row(r: &AnyRow) -> Result<ApiKey> {
    let id: String = r.try_get("id")?;
    let user: Option<String> = r.try_get("user_id")?;
    let scopes: Option<String> = r.try_get("scopes")?;
    let org: String = r.try_get("org_id")?;
    Ok(ApiKey {
        org_id: parse_uuid(&org)?,
        id: parse_uuid(&id)?,
        name: r
            .try_get::<Option<String>, _>("name")?
            .unwrap_or_else(|| "admin".into()),
        scopes: scopes
            .map(|s| serde_json::from_str(&s).map_err(corrupt))
            .transpose()?,
        user_id: user.map(|u| parse_uuid(&u)).transpose()?,
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
        last_used_at: r.try_get("last_used_at")?,
    })
}

const KEY_COLUMNS: &str = "id, hash, name, scopes, user_id, created_at, expires_at, last_used_at, \
     revoked_at, org_id";

impl Store {
    /// Makes a scoped API key acting in `org`; returns it and its secret (shown once). Gateways
    /// learn of it with the next config version (which this bumps), for resources that accept
    /// keys.
    pub async fn create_api_key(
        &self,
        org: Uuid,
        name: &str,
        scopes: &[String],
        expires_at: Option<i64>,
        user: Option<Uuid>,
    ) -> Result<(ApiKey, Secret)> {
        let id = Uuid::new_v4();
        let secret = secrets::new_with_id(API_KEY_PREFIX, id);
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO api_keys (id, hash, created_at, name, scopes, expires_at, user_id, \
             org_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(id.to_string())
        .bind(secrets::digest(&secret))
        .bind(now_ms())
        .bind(name)
        .bind(serde_json::to_string(scopes).map_err(corrupt)?)
        .bind(expires_at)
        .bind(user.map(|u| u.to_string()))
        .bind(org.to_string())
        .execute(&mut *tx)
        .await?;
        self.commit_bumped(tx).await?;
        let key = self
            .list_api_keys(org)
            .await?
            .into_iter()
            .find(|k| k.id == id)
            .ok_or(StoreError::NotFound("API key"))?;
        Ok((key, secret))
    }

    /// Every live API key of the organization (its admin key included), oldest first.
    pub async fn list_api_keys(&self, org: Uuid) -> Result<Vec<ApiKey>> {
        sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE revoked_at IS NULL AND org_id = $1 \
             ORDER BY created_at, id"
        ))
        .bind(org.to_string())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(api_key_from_row)
        .collect()
    }

    /// Revokes an API key of the organization, with immediate effect at control and within a
    /// config push at every gateway (this bumps the version).
    pub async fn revoke_api_key(&self, org: Uuid, id: Uuid) -> Result<()> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND org_id = $3 \
             AND revoked_at IS NULL",
        )
        .bind(now_ms())
        .bind(id.to_string())
        .bind(org.to_string())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound("API key"));
        }
        self.commit_bumped(tx).await?;
        Ok(())
    }

    /// The live key `secret` is (admin `kma_` or scoped `kmk_`), found by the id inside it and
    /// compared by digest; `None` when unknown, wrong, revoked or expired. Records its use (at
    /// most once a minute per key).
    pub async fn check_api_key(&self, secret: &Secret) -> Result<Option<ApiKey>> {
        let id = secrets::embedded_id(secrets::ADMIN_KEY_PREFIX, secret)
            .or_else(|| secrets::embedded_id(API_KEY_PREFIX, secret));
        let Some(id) = id else { return Ok(None) };
        let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let hash: String = row.try_get("hash")?;
        let verified = secrets::verify(&hash, secret).await;
        if !verified.ok() {
            return Ok(None);
        }
        if verified == secrets::Verified::YesUpgrade {
            sqlx::query("UPDATE api_keys SET hash = $1 WHERE id = $2 AND hash = $3")
                .bind(secrets::digest(secret))
                .bind(id.to_string())
                .bind(&hash)
                .execute(&self.pool)
                .await?;
        }
        let revoked: Option<i64> = row.try_get("revoked_at")?;
        let key = api_key_from_row(&row)?;
        let now = now_ms();
        if revoked.is_some() || key.expires_at.is_some_and(|e| e <= now) {
            return Ok(None);
        }
        if key.last_used_at.is_none_or(|t| now - t > 60_000) {
            sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
                .bind(now)
                .bind(id.to_string())
                .execute(&self.pool)
                .await?;
        }
        Ok(Some(key))
    }
}
