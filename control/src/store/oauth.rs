//! Control as an OAuth 2.1 authorization server: registered public clients, one-time
//! authorization codes and rotating refresh tokens (digests only). A grant is everything one
//! authorization led to; a replayed code or refresh token revokes it, and gateways learn its id
//! among the revoked sessions.

use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::{now_ms, parse_uuid, Result, Store, StoreError};

/// A registered client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthClient {
    /// `client_id`.
    pub id: Uuid,
    /// `client_name`, shown on the consent page.
    pub name: String,
    /// Its redirect URIs, matched exactly (a loopback one on any port).
    pub redirect_uris: Vec<String>,
    /// Unix ms.
    pub created_at: i64,
    /// The URL of its client ID metadata document, when it is known by one (its `client_id`
    /// then is that URL, and `id` is control's own name for it).
    pub metadata_url: Option<String>,
}

impl OAuthClient {
    /// What the client calls itself in `client_id`: its document's URL, else its id.
    pub fn client_id(&self) -> String {
        self.metadata_url
            .clone()
            .unwrap_or_else(|| self.id.to_string())
    }
}

fn row_to_client(r: &AnyRow) -> Result<OAuthClient> {
    let uris: String = r.try_get("redirect_uris")?;
    Ok(OAuthClient {
        id: parse_uuid(&r.try_get::<String, _>("id")?)?,
        name: r.try_get("name")?,
        redirect_uris: serde_json::from_str(&uris)
            .map_err(|e| StoreError::Invalid(e.to_string()))?,
        created_at: r.try_get("created_at")?,
        metadata_url: r.try_get("metadata_url")?,
    })
}

/// What an authorization leads to, as a code or a refresh token carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthGrant {
    /// The grant: the `sid` of its access tokens.
    pub grant_id: Uuid,
    /// The client.
    pub client_id: Uuid,
    /// The user.
    pub user_id: Uuid,
    /// The organization of the resource.
    pub org_id: Uuid,
    /// The resource (RFC 8707 indicator): the access tokens' audience.
    pub resource: String,
    /// Granted scope (space-separated).
    pub scope: String,
}

/// A code's own checks beside its grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthCode {
    /// The grant.
    pub grant: OAuthGrant,
    /// The redirect URI the code was sent to.
    pub redirect_uri: String,
    /// The PKCE S256 challenge.
    pub challenge: String,
}

/// Why a code or refresh token gets nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GrantRefusal {
    /// Not one control issued.
    #[error("unknown code or token")]
    Unknown,
    /// Used already: the grant is now revoked.
    #[error("this code or token was already used; the grant is revoked")]
    Replayed,
    /// Past its expiry.
    #[error("this code or token has expired")]
    Expired,
}

/// A live grant as administrators see it: who let which client reach which resource.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct OAuthGrantInfo {
    /// The grant (the `sid` of its access tokens).
    pub id: Uuid,
    /// The client's id at control.
    pub client_id: Uuid,
    /// The client's name.
    pub client_name: String,
    /// The user who consented.
    pub user_id: Uuid,
    /// Their e-mail address.
    pub user_email: String,
    /// The resource (the access tokens' audience).
    pub resource: String,
    /// Granted scope (space-separated).
    pub scope: String,
    /// First tokens issued.
    #[serde(serialize_with = "crate::times::ms")]
    #[schemars(with = "crate::times::DateTime")]
    pub created_at: i64,
    /// Tokens last issued (a refresh).
    #[serde(serialize_with = "crate::times::ms")]
    #[schemars(with = "crate::times::DateTime")]
    pub last_used_at: i64,
    /// When its newest refresh token expires.
    #[serde(serialize_with = "crate::times::ms")]
    #[schemars(with = "crate::times::DateTime")]
    pub expires_at: i64,
}

fn row_to_grant(r: &AnyRow) -> Result<OAuthGrant> {
    let g = |c: &str| -> Result<Uuid> { parse_uuid(&r.try_get::<String, _>(c)?) };
    Ok(OAuthGrant {
        grant_id: g("grant_id")?,
        client_id: g("client_id")?,
        user_id: g("user_id")?,
        org_id: g("org_id")?,
        resource: r.try_get("resource")?,
        scope: r.try_get("scope")?,
    })
}

impl Store {
    /// Registers a public client.
    pub async fn create_oauth_client(
        &self,
        name: &str,
        redirect_uris: &[String],
    ) -> Result<OAuthClient> {
        let c = OAuthClient {
            id: Uuid::new_v4(),
            name: name.to_owned(),
            redirect_uris: redirect_uris.to_vec(),
            created_at: now_ms(),
            metadata_url: None,
        };
        let uris = serde_json::to_string(&c.redirect_uris)
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        sqlx::query(
            "INSERT INTO oauth_clients (id, name, redirect_uris, created_at) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(c.id.to_string())
        .bind(&c.name)
        .bind(uris)
        .bind(c.created_at)
        .execute(&self.pool)
        .await?;
        Ok(c)
    }

    /// A registered client.
    pub async fn oauth_client(&self, id: Uuid) -> Result<Option<OAuthClient>> {
        sqlx::query(
            "SELECT id, name, redirect_uris, created_at, metadata_url FROM oauth_clients \
             WHERE id = $1",
        )
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?
        .map(|r| row_to_client(&r))
        .transpose()
    }

    /// The client known by the metadata document at `url`.
    pub async fn oauth_client_by_url(&self, url: &str) -> Result<Option<OAuthClient>> {
        sqlx::query(
            "SELECT id, name, redirect_uris, created_at, metadata_url FROM oauth_clients \
             WHERE metadata_url = $1",
        )
        .bind(url)
        .fetch_optional(&self.pool)
        .await?
        .map(|r| row_to_client(&r))
        .transpose()
    }

    /// The client of the metadata document at `url`, made on first sight and its name and
    /// redirect URIs brought up to date with the document otherwise.
    pub async fn upsert_metadata_client(
        &self,
        url: &str,
        name: &str,
        redirect_uris: &[String],
    ) -> Result<OAuthClient> {
        let uris =
            serde_json::to_string(redirect_uris).map_err(|e| StoreError::Invalid(e.to_string()))?;
        sqlx::query(
            "INSERT INTO oauth_clients (id, name, redirect_uris, created_at, metadata_url) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (metadata_url) DO UPDATE \
             SET name = excluded.name, redirect_uris = excluded.redirect_uris",
        )
        .bind(Uuid::new_v4().to_string())
        .bind(name)
        .bind(uris)
        .bind(now_ms())
        .bind(url)
        .execute(&self.pool)
        .await?;
        self.oauth_client_by_url(url)
            .await?
            .ok_or(StoreError::NotFound("OAuth client"))
    }

    /// Records a code (by its digest) valid until `expires_at`.
    pub async fn create_oauth_code(
        &self,
        digest: &str,
        code: &OAuthCode,
        expires_at: i64,
    ) -> Result<()> {
        let now = now_ms();
        sqlx::query("DELETE FROM oauth_codes WHERE expires_at < $1")
            .bind(now - 3_600_000)
            .execute(&self.pool)
            .await?;
        let g = &code.grant;
        sqlx::query(
            "INSERT INTO oauth_codes (hash, grant_id, client_id, user_id, org_id, redirect_uri, \
             challenge, resource, scope, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(digest)
        .bind(g.grant_id.to_string())
        .bind(g.client_id.to_string())
        .bind(g.user_id.to_string())
        .bind(g.org_id.to_string())
        .bind(&code.redirect_uri)
        .bind(&code.challenge)
        .bind(&g.resource)
        .bind(&g.scope)
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Spends a code at `now`: once only; a second use revokes its grant.
    pub async fn take_oauth_code(
        &self,
        digest: &str,
        now: i64,
    ) -> Result<std::result::Result<OAuthCode, GrantRefusal>> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT grant_id, client_id, user_id, org_id, redirect_uri, challenge, resource, \
             scope, expires_at, used_at FROM oauth_codes WHERE hash = $1",
        )
        .bind(digest)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(Err(GrantRefusal::Unknown));
        };
        let code = OAuthCode {
            grant: row_to_grant(&row)?,
            redirect_uri: row.try_get("redirect_uri")?,
            challenge: row.try_get("challenge")?,
        };
        if row.try_get::<Option<i64>, _>("used_at")?.is_some() {
            Self::revoke_grant_in(&mut tx, code.grant.grant_id, now).await?;
            self.commit_bumped(tx).await?;
            return Ok(Err(GrantRefusal::Replayed));
        }
        if row.try_get::<i64, _>("expires_at")? <= now {
            return Ok(Err(GrantRefusal::Expired));
        }
        sqlx::query("UPDATE oauth_codes SET used_at = $1 WHERE hash = $2")
            .bind(now)
            .bind(digest)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Ok(code))
    }

    /// Records a refresh token (by its digest) of `grant`, valid until `expires_at`.
    pub async fn create_refresh_token(
        &self,
        digest: &str,
        grant: &OAuthGrant,
        expires_at: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO oauth_refresh_tokens (hash, grant_id, client_id, user_id, org_id, \
             resource, scope, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(digest)
        .bind(grant.grant_id.to_string())
        .bind(grant.client_id.to_string())
        .bind(grant.user_id.to_string())
        .bind(grant.org_id.to_string())
        .bind(&grant.resource)
        .bind(&grant.scope)
        .bind(now_ms())
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Spends a refresh token at `now` (the caller issues the next one): once only; a second
    /// use, or one of a revoked grant, revokes the grant.
    pub async fn take_refresh_token(
        &self,
        digest: &str,
        now: i64,
    ) -> Result<std::result::Result<OAuthGrant, GrantRefusal>> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT t.grant_id, t.client_id, t.user_id, t.org_id, t.resource, t.scope, \
             t.expires_at, t.used_at, g.revoked_at FROM oauth_refresh_tokens t \
             LEFT JOIN oauth_revoked_grants g ON g.grant_id = t.grant_id WHERE t.hash = $1",
        )
        .bind(digest)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(Err(GrantRefusal::Unknown));
        };
        let grant = row_to_grant(&row)?;
        if row.try_get::<Option<i64>, _>("used_at")?.is_some()
            || row.try_get::<Option<i64>, _>("revoked_at")?.is_some()
        {
            Self::revoke_grant_in(&mut tx, grant.grant_id, now).await?;
            self.commit_bumped(tx).await?;
            return Ok(Err(GrantRefusal::Replayed));
        }
        if row.try_get::<i64, _>("expires_at")? <= now {
            return Ok(Err(GrantRefusal::Expired));
        }
        sqlx::query("UPDATE oauth_refresh_tokens SET used_at = $1 WHERE hash = $2")
            .bind(now)
            .bind(digest)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Ok(grant))
    }

    /// The grants of `org` not revoked whose refresh tokens have not all expired, newest first.
    pub async fn oauth_grants(&self, org: Uuid) -> Result<Vec<OAuthGrantInfo>> {
        let rows = sqlx::query(
            "SELECT t.grant_id, t.client_id, c.name AS client_name, t.user_id,              COALESCE(u.email, '') AS user_email, t.resource, t.scope,              MIN(t.created_at) AS first_at, MAX(t.created_at) AS last_at,              MAX(t.expires_at) AS expires_at FROM oauth_refresh_tokens t              JOIN oauth_clients c ON c.id = t.client_id              LEFT JOIN users u ON u.id = t.user_id              WHERE t.org_id = $1 AND NOT EXISTS              (SELECT 1 FROM oauth_revoked_grants g WHERE g.grant_id = t.grant_id)              GROUP BY t.grant_id, t.client_id, c.name, t.user_id, u.email, t.resource, t.scope              HAVING MAX(t.expires_at) > $2 ORDER BY last_at DESC, t.grant_id",
        )
        .bind(org.to_string())
        .bind(now_ms())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let g = |c: &str| -> Result<Uuid> { parse_uuid(&r.try_get::<String, _>(c)?) };
                Ok(OAuthGrantInfo {
                    id: g("grant_id")?,
                    client_id: g("client_id")?,
                    client_name: r.try_get("client_name")?,
                    user_id: g("user_id")?,
                    user_email: r.try_get("user_email")?,
                    resource: r.try_get("resource")?,
                    scope: r.try_get("scope")?,
                    created_at: r.try_get("first_at")?,
                    last_used_at: r.try_get("last_at")?,
                    expires_at: r.try_get("expires_at")?,
                })
            })
            .collect()
    }

    /// Revokes a grant of `org` (an administrator's choice): its refresh tokens get nothing
    /// more and its access tokens are refused at every gateway. `false`: no such live grant.
    pub async fn revoke_oauth_grant(&self, org: Uuid, grant: Uuid) -> Result<bool> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let known = sqlx::query_scalar::<_, String>(
            "SELECT grant_id FROM oauth_refresh_tokens t WHERE t.grant_id = $1 AND t.org_id = $2              AND NOT EXISTS (SELECT 1 FROM oauth_revoked_grants g WHERE g.grant_id = t.grant_id)",
        )
        .bind(grant.to_string())
        .bind(org.to_string())
        .fetch_optional(&mut *tx)
        .await?
        .is_some();
        if !known {
            return Ok(false);
        }
        Self::revoke_grant_in(&mut tx, grant, now_ms()).await?;
        self.commit_bumped(tx).await?;
        Ok(true)
    }

    /// Whether a grant was revoked.
    pub async fn grant_revoked(&self, grant: Uuid) -> Result<bool> {
        Ok(sqlx::query_scalar::<_, String>(
            "SELECT grant_id FROM oauth_revoked_grants WHERE grant_id = $1",
        )
        .bind(grant.to_string())
        .fetch_optional(&self.pool)
        .await?
        .is_some())
    }

    async fn revoke_grant_in(
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        grant: Uuid,
        now: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO oauth_revoked_grants (grant_id, revoked_at) VALUES ($1, $2) \
             ON CONFLICT (grant_id) DO NOTHING",
        )
        .bind(grant.to_string())
        .bind(now)
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "UPDATE oauth_refresh_tokens SET used_at = $1 WHERE grant_id = $2 AND used_at IS NULL",
        )
        .bind(now)
        .bind(grant.to_string())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}
