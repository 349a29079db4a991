//! Share links: a secret URL that lets whoever opens it into one resource without an account,
//! until it expires, runs out of uses or is revoked. Control counts each opening; the session
//! token a browser then gets has the link's id as `sid`, so revoking the link ends those sessions
//! at every gateway with the next config push.

use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::{now_ms, parse_uuid, Result, Store, StoreError};
use crate::secrets;
use kakuremichi_proto::Secret;

/// A share link, as the API shows it (never its secret after creation).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct ShareLink {
    /// Id (inside the secret).
    pub id: Uuid,
    /// The resource it opens.
    pub resource_id: Uuid,
    /// Display name.
    pub name: String,
    /// Created.
    #[serde(serialize_with = "crate::times::ms")]
    #[schemars(with = "crate::times::DateTime")]
    pub created_at: i64,
    /// Expiry; it opens nothing after, and sessions it opened end then.
    #[serde(serialize_with = "crate::times::ms")]
    #[schemars(with = "crate::times::DateTime")]
    pub expires_at: i64,
    /// How many times it may be opened; absent: until it expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<i64>,
    /// How many times it was opened.
    pub uses: i64,
    /// Unix ms, when revoked.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(serialize_with = "crate::times::opt_ms")]
    #[schemars(with = "Option<crate::times::DateTime>")]
    pub revoked_at: Option<i64>,
}

/// Why a share link opens nothing (shown to the person who opened it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ShareRefusal {
    /// Unknown, malformed, or for another hostname.
    #[error("this share link is not valid here")]
    Unknown,
    /// Revoked by an administrator.
    #[error("this share link was revoked")]
    Revoked,
    /// Past its expiry.
    #[error("this share link has expired")]
    Expired,
    /// Opened as many times as it allows.
    #[error("this share link has been used as many times as it allows")]
    UsedUp,
}

const COLUMNS: &str = "id, resource_id, name, created_at, expires_at, max_uses, uses, revoked_at";

fn row_to_link(r: &AnyRow) -> Result<ShareLink> {
    let id: String = r.try_get("id")?;
    let resource: String = r.try_get("resource_id")?;
    Ok(ShareLink {
        id: parse_uuid(&id)?,
        resource_id: parse_uuid(&resource)?,
        name: r.try_get("name")?,
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
        max_uses: r.try_get("max_uses")?,
        uses: r.try_get("uses")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

impl Store {
    /// Creates a share link for a resource of `org`; returns it and its secret (shown once).
    pub async fn create_share_link(
        &self,
        org: Uuid,
        resource: Uuid,
        name: &str,
        expires_at: i64,
        max_uses: Option<i64>,
    ) -> Result<(ShareLink, Secret)> {
        let id = Uuid::new_v4();
        let secret = secrets::new_with_id(secrets::SHARE_LINK_PREFIX, id);
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
        sqlx::query(
            "INSERT INTO share_links (id, org_id, resource_id, name, hash, created_at, \
             expires_at, max_uses) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(id.to_string())
        .bind(org.to_string())
        .bind(resource.to_string())
        .bind(name)
        .bind(secrets::digest(&secret))
        .bind(now_ms())
        .bind(expires_at)
        .bind(max_uses)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let link = self
            .list_share_links(org, resource)
            .await?
            .into_iter()
            .find(|l| l.id == id)
            .ok_or(StoreError::NotFound("share link"))?;
        Ok((link, secret))
    }

    /// The share links of a resource of `org`, revoked and expired ones included, newest first.
    pub async fn list_share_links(&self, org: Uuid, resource: Uuid) -> Result<Vec<ShareLink>> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM share_links WHERE org_id = $1 AND resource_id = $2 \
             ORDER BY created_at DESC, id"
        ))
        .bind(org.to_string())
        .bind(resource.to_string())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(row_to_link)
        .collect()
    }

    /// Revokes a share link: it opens nothing more, and the sessions it opened end at every
    /// gateway with the config push this makes.
    pub async fn revoke_share_link(&self, org: Uuid, resource: Uuid, id: Uuid) -> Result<()> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE share_links SET revoked_at = $1 WHERE id = $2 AND org_id = $3 \
             AND resource_id = $4 AND revoked_at IS NULL",
        )
        .bind(now_ms())
        .bind(id.to_string())
        .bind(org.to_string())
        .bind(resource.to_string())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound("share link"));
        }
        self.commit_bumped(tx).await?;
        Ok(())
    }

    /// Opens a share link for `host` at `now` (unix ms): counts one use, atomically, if it is
    /// live, and answers it; otherwise says why not.
    pub async fn redeem_share_link(
        &self,
        secret: &Secret,
        host: &str,
        now: i64,
    ) -> Result<std::result::Result<ShareLink, ShareRefusal>> {
        let Some(id) = secrets::embedded_id(secrets::SHARE_LINK_PREFIX, secret) else {
            return Ok(Err(ShareRefusal::Unknown));
        };
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "SELECT s.{}, s.hash, r.hostname FROM share_links s \
             JOIN resources r ON r.id = s.resource_id WHERE s.id = $1",
            COLUMNS.replace(", ", ", s.")
        ))
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(Err(ShareRefusal::Unknown));
        };
        let hash: String = row.try_get("hash")?;
        let hostname: Option<String> = row.try_get("hostname")?;
        if secrets::verify(&hash, secret).await != secrets::Verified::Yes
            || hostname.as_deref() != Some(host)
        {
            return Ok(Err(ShareRefusal::Unknown));
        }
        let link = row_to_link(&row)?;
        if link.revoked_at.is_some() {
            return Ok(Err(ShareRefusal::Revoked));
        }
        if link.expires_at <= now {
            return Ok(Err(ShareRefusal::Expired));
        }
        let counted = sqlx::query(
            "UPDATE share_links SET uses = uses + 1 WHERE id = $1 AND revoked_at IS NULL \
             AND (max_uses IS NULL OR uses < max_uses)",
        )
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        if counted.rows_affected() == 0 {
            return Ok(Err(ShareRefusal::UsedUp));
        }
        tx.commit().await?;
        Ok(Ok(ShareLink {
            uses: link.uses + 1,
            ..link
        }))
    }
}
