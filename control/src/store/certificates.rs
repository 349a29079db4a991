//! Certificates, ACME challenge answers and ACME accounts in the store.
//!
//! A certificate row is either uploaded (chain and key given) or managed by ACME: created
//! `pending` with `next_attempt_at = now`, claimed by one control replica at a time with a lease
//! (`lease_until`), then `valid` with its next attempt at two thirds of its lifetime, or `failed`
//! with a backoff. Keys are sealed with the store's [`Sealer`]; a store without one refuses to
//! keep keys. Issuing, replacing or removing a certificate and adding or clearing challenge
//! answers bump the config version: gateways get them in their snapshot.

use kakuremichi_proto::{AcmeChallenge, Secret, TlsCertificate};
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::{corrupt, now_ms, parse_uuid, Result, Store, StoreError};

const KEY_PURPOSE: &str = "certificate private key";
const ACCOUNT_PURPOSE: &str = "acme account";

/// Where a certificate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CertSource {
    /// Ordered and renewed by control.
    Acme,
    /// Given by an admin.
    Upload,
}

/// How an ACME certificate proves control of its names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum ChallengeKind {
    /// A token served over plain HTTP on port 80 by every gateway.
    #[serde(rename = "http-01")]
    Http01,
    /// A special certificate served on port 443 by every gateway (RFC 8737).
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    /// A TXT record set through RFC 2136 dynamic DNS (the only way to a wildcard).
    #[serde(rename = "dns-01")]
    Dns01,
}

impl ChallengeKind {
    /// The stored (and API) spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ChallengeKind::Http01 => "http-01",
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
            ChallengeKind::Dns01 => "dns-01",
        }
    }

    fn parse(s: &str) -> Result<ChallengeKind> {
        match s {
            "http-01" => Ok(ChallengeKind::Http01),
            "tls-alpn-01" => Ok(ChallengeKind::TlsAlpn01),
            "dns-01" => Ok(ChallengeKind::Dns01),
            other => Err(corrupt(format!("challenge {other:?}"))),
        }
    }
}

/// Where a certificate stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CertStatus {
    /// Not issued yet.
    Pending,
    /// Issued and served (a failed renewal keeps it valid until it expires).
    Valid,
    /// Never issued: the last attempt failed; another follows after a backoff.
    Failed,
}

/// A certificate row (no key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    /// Id.
    pub id: Uuid,
    /// The organization it belongs to.
    pub org_id: Uuid,
    /// Names covered.
    pub names: Vec<String>,
    /// ACME or upload.
    pub source: CertSource,
    /// ACME: the challenge used.
    pub challenge: Option<ChallengeKind>,
    /// Status.
    pub status: CertStatus,
    /// The chain (PEM), once issued.
    pub chain_pem: Option<String>,
    /// Validity start (unix ms).
    pub not_before: Option<i64>,
    /// Expiry (unix ms).
    pub not_after: Option<i64>,
    /// ACME: when the next order (first issue or renewal) is due (unix ms).
    pub next_attempt_at: Option<i64>,
    /// Failed attempts since the last success.
    pub failures: u32,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When the current chain was issued or uploaded (unix ms).
    pub issued_at: Option<i64>,
    /// Creation time (unix ms).
    pub created_at: i64,
    /// Made by control for a resource hostname (removed with it).
    pub auto_resource: bool,
}

/// A challenge answer in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredChallenge {
    /// The kind.
    pub kind: ChallengeKind,
    /// The name being validated.
    pub name: String,
    /// HTTP-01 token (empty for the others).
    pub token: String,
    /// HTTP-01: key authorization; TLS-ALPN-01: its digest (base64url); DNS-01: the TXT value.
    pub value: String,
}

fn certificate_from_row(row: &AnyRow) -> Result<Certificate> {
    let id: String = row.try_get("id")?;
    let names: String = row.try_get("names")?;
    let source: String = row.try_get("source")?;
    let challenge: Option<String> = row.try_get("challenge")?;
    let status: String = row.try_get("status")?;
    let failures: i64 = row.try_get("failures")?;
    let auto: i64 = row.try_get("auto_resource")?;
    let org: String = row.try_get("org_id")?;
    Ok(Certificate {
        id: parse_uuid(&id)?,
        org_id: parse_uuid(&org)?,
        names: serde_json::from_str(&names).map_err(corrupt)?,
        source: match source.as_str() {
            "acme" => CertSource::Acme,
            "upload" => CertSource::Upload,
            other => return Err(corrupt(format!("certificate source {other:?}"))),
        },
        challenge: challenge.as_deref().map(ChallengeKind::parse).transpose()?,
        status: match status.as_str() {
            "pending" => CertStatus::Pending,
            "valid" => CertStatus::Valid,
            "failed" => CertStatus::Failed,
            other => return Err(corrupt(format!("certificate status {other:?}"))),
        },
        chain_pem: row.try_get("chain_pem")?,
        not_before: row.try_get("not_before")?,
        not_after: row.try_get("not_after")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        failures: u32::try_from(failures.max(0)).unwrap_or(u32::MAX),
        last_error: row.try_get("last_error")?,
        issued_at: row.try_get("issued_at")?,
        created_at: row.try_get("created_at")?,
        auto_resource: auto != 0,
    })
}

/// An issued chain with its key and validity, to store.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The chain, PEM.
    pub chain_pem: String,
    /// The private key, PEM.
    pub key_pem: Secret,
    /// Validity start (unix ms).
    pub not_before: i64,
    /// Expiry (unix ms).
    pub not_after: i64,
}

const COLUMNS: &str = "id, names, source, challenge, status, chain_pem, not_before, not_after, \
     next_attempt_at, failures, last_error, issued_at, created_at, auto_resource, org_id";

impl Store {
    fn sealer(&self) -> Result<&crate::seal::Sealer> {
        self.sealer.as_deref().ok_or_else(|| {
            StoreError::Invalid(
                "control has no secrets key to keep certificate keys with (--secrets-key-file)"
                    .into(),
            )
        })
    }

    /// Whether this store can keep private keys.
    pub fn can_seal(&self) -> bool {
        self.sealer.is_some()
    }

    /// A new ACME certificate of `org` for `names`, due at once.
    pub async fn create_acme_certificate(
        &self,
        org: Uuid,
        names: &[String],
        challenge: ChallengeKind,
        auto_resource: bool,
    ) -> Result<Certificate> {
        self.sealer()?;
        let id = Uuid::new_v4();
        let now = now_ms();
        sqlx::query(
            "INSERT INTO certificates (id, names, source, challenge, status, next_attempt_at, \
             failures, created_at, auto_resource, org_id) VALUES ($1, $2, 'acme', $3, 'pending', \
             $4, 0, $5, $6, $7)",
        )
        .bind(id.to_string())
        .bind(serde_json::to_string(names).map_err(corrupt)?)
        .bind(challenge.as_str())
        .bind(now)
        .bind(now)
        .bind(i64::from(auto_resource))
        .bind(org.to_string())
        .execute(&self.pool)
        .await?;
        self.get_certificate(id).await
    }

    /// Stores an uploaded certificate of `org` (its names and validity already read from the
    /// chain).
    pub async fn upload_certificate(
        &self,
        org: Uuid,
        names: &[String],
        cert: &Issued,
    ) -> Result<Certificate> {
        let sealed = self
            .sealer()?
            .seal(KEY_PURPOSE, cert.key_pem.expose().as_bytes())
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let id = Uuid::new_v4();
        let now = now_ms();
        sqlx::query(
            "INSERT INTO certificates (id, names, source, status, chain_pem, key_sealed, \
             not_before, not_after, failures, issued_at, created_at, org_id) \
             VALUES ($1, $2, 'upload', 'valid', $3, $4, $5, $6, 0, $7, $8, $9)",
        )
        .bind(id.to_string())
        .bind(serde_json::to_string(names).map_err(corrupt)?)
        .bind(&cert.chain_pem)
        .bind(sealed)
        .bind(cert.not_before)
        .bind(cert.not_after)
        .bind(now)
        .bind(now)
        .bind(org.to_string())
        .execute(&mut *tx)
        .await?;
        self.commit_bumped(tx).await?;
        self.get_certificate(id).await
    }

    /// One certificate.
    pub async fn get_certificate(&self, id: Uuid) -> Result<Certificate> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM certificates WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound("certificate"))?;
        certificate_from_row(&row)
    }

    /// Every certificate, oldest first.
    pub async fn list_certificates(&self) -> Result<Vec<Certificate>> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM certificates ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(certificate_from_row)
        .collect()
    }

    /// Removes a certificate and its challenge answers; gateways stop serving it.
    pub async fn delete_certificate(&self, id: Uuid) -> Result<()> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM acme_challenges WHERE certificate_id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query("DELETE FROM certificates WHERE id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound("certificate"));
        }
        self.commit_bumped(tx).await?;
        Ok(())
    }

    /// Makes an ACME certificate due now (a renewal on request, or a retry without the backoff).
    pub async fn certificate_due_now(&self, id: Uuid) -> Result<Certificate> {
        let done = sqlx::query(
            "UPDATE certificates SET next_attempt_at = $1 WHERE id = $2 AND source = 'acme'",
        )
        .bind(now_ms())
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            let _ = self.get_certificate(id).await?;
            return Err(StoreError::Invalid(
                "only ACME certificates are renewed by control".into(),
            ));
        }
        self.get_certificate(id).await
    }

    /// Claims the ACME certificate most overdue at `now`, for `lease_ms`, if any is due and no
    /// other replica holds it.
    pub async fn claim_due_certificate(
        &self,
        now: i64,
        lease_ms: i64,
    ) -> Result<Option<Certificate>> {
        let candidates: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM certificates WHERE source = 'acme' AND next_attempt_at <= $1 \
             AND (lease_until IS NULL OR lease_until < $2) ORDER BY next_attempt_at LIMIT 8",
        )
        .bind(now)
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        for id in candidates {
            let done = sqlx::query(
                "UPDATE certificates SET lease_until = $1 WHERE id = $2 \
                 AND (lease_until IS NULL OR lease_until < $3)",
            )
            .bind(now + lease_ms)
            .bind(&id)
            .bind(now)
            .execute(&self.pool)
            .await?;
            if done.rows_affected() == 1 {
                return Ok(Some(self.get_certificate(parse_uuid(&id)?).await?));
            }
        }
        Ok(None)
    }

    /// When the next ACME certificate is due (unix ms), if any.
    pub async fn next_certificate_due(&self) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT MIN(next_attempt_at) FROM certificates WHERE source = 'acme'",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Stores a newly issued (or renewed) chain and key; the next attempt is at `next_attempt_at`.
    pub async fn certificate_issued(
        &self,
        id: Uuid,
        cert: &Issued,
        next_attempt_at: i64,
    ) -> Result<()> {
        let sealed = self
            .sealer()?
            .seal(KEY_PURPOSE, cert.key_pem.expose().as_bytes())
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE certificates SET status = 'valid', chain_pem = $1, key_sealed = $2, \
             not_before = $3, not_after = $4, next_attempt_at = $5, failures = 0, \
             last_error = NULL, lease_until = NULL, issued_at = $6 WHERE id = $7",
        )
        .bind(&cert.chain_pem)
        .bind(sealed)
        .bind(cert.not_before)
        .bind(cert.not_after)
        .bind(next_attempt_at)
        .bind(now_ms())
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            // Deleted while being ordered.
            return Ok(());
        }
        self.commit_bumped(tx).await?;
        Ok(())
    }

    /// Records a failed attempt; the next is at `next_attempt_at`. A certificate already issued
    /// stays valid (and served) until it expires.
    pub async fn certificate_failed(
        &self,
        id: Uuid,
        error: &str,
        next_attempt_at: i64,
    ) -> Result<()> {
        let error: String = error.chars().take(2000).collect();
        sqlx::query(
            "UPDATE certificates SET failures = failures + 1, last_error = $1, \
             next_attempt_at = $2, lease_until = NULL, \
             status = CASE WHEN chain_pem IS NULL THEN 'failed' ELSE status END WHERE id = $3",
        )
        .bind(error)
        .bind(next_attempt_at)
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Publishes a challenge answer (HTTP-01 and TLS-ALPN-01 reach gateways in their snapshot).
    pub async fn add_acme_challenge(&self, certificate: Uuid, c: &StoredChallenge) -> Result<u64> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO acme_challenges (id, certificate_id, kind, name, token, value, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(Uuid::new_v4().to_string())
        .bind(certificate.to_string())
        .bind(c.kind.as_str())
        .bind(&c.name)
        .bind(&c.token)
        .bind(&c.value)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        self.commit_bumped(tx).await
    }

    /// Removes a certificate's challenge answers.
    pub async fn clear_acme_challenges(&self, certificate: Uuid) -> Result<()> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM acme_challenges WHERE certificate_id = $1")
            .bind(certificate.to_string())
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() > 0 {
            self.commit_bumped(tx).await?;
        }
        Ok(())
    }

    /// The stored credentials (JSON) of the ACME account at `directory`.
    pub async fn acme_account(&self, directory: &str) -> Result<Option<Secret>> {
        let sealed: Option<String> =
            sqlx::query_scalar("SELECT credentials_sealed FROM acme_accounts WHERE directory = $1")
                .bind(directory)
                .fetch_optional(&self.pool)
                .await?;
        let Some(sealed) = sealed else {
            return Ok(None);
        };
        let plain = self
            .sealer()?
            .open(ACCOUNT_PURPOSE, &sealed)
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        Ok(Some(Secret::new(
            String::from_utf8(plain).map_err(corrupt)?,
        )))
    }

    /// Keeps the credentials (JSON) of a new ACME account.
    pub async fn save_acme_account(&self, directory: &str, credentials: &Secret) -> Result<()> {
        let sealed = self
            .sealer()?
            .seal(ACCOUNT_PURPOSE, credentials.expose().as_bytes())
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        sqlx::query("DELETE FROM acme_accounts WHERE directory = $1")
            .bind(directory)
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "INSERT INTO acme_accounts (directory, credentials_sealed, created_at) \
             VALUES ($1, $2, $3)",
        )
        .bind(directory)
        .bind(sealed)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Valid certificates with their keys opened, and the challenge answers gateways serve, read
    /// in `tx` (part of [`Store::load_world`]). A key that does not open is logged and skipped.
    pub(super) async fn load_tls(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    ) -> Result<(Vec<(Uuid, TlsCertificate)>, Vec<AcmeChallenge>)> {
        let rows = sqlx::query(
            "SELECT id, names, chain_pem, key_sealed, not_after, org_id FROM certificates \
             WHERE status = 'valid' AND chain_pem IS NOT NULL AND key_sealed IS NOT NULL \
             ORDER BY created_at, id",
        )
        .fetch_all(&mut **tx)
        .await?;
        let mut certificates = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: String = row.try_get("id")?;
            let Some(sealer) = self.sealer.as_deref() else {
                tracing::warn!(certificate_id = %id, "no secrets key: certificate not served");
                continue;
            };
            let sealed: String = row.try_get("key_sealed")?;
            let key = match sealer.open(KEY_PURPOSE, &sealed) {
                Ok(k) => k,
                Err(error) => {
                    tracing::error!(certificate_id = %id, %error, "certificate not served");
                    continue;
                }
            };
            let names: String = row.try_get("names")?;
            let org: String = row.try_get("org_id")?;
            certificates.push((
                parse_uuid(&org)?,
                TlsCertificate {
                    id: parse_uuid(&id)?,
                    names: serde_json::from_str(&names).map_err(corrupt)?,
                    chain_pem: row.try_get("chain_pem")?,
                    key_pem: Secret::new(String::from_utf8(key).map_err(corrupt)?),
                    not_after_ms: row.try_get::<Option<i64>, _>("not_after")?.unwrap_or(0),
                },
            ));
        }
        let rows = sqlx::query(
            "SELECT kind, name, token, value FROM acme_challenges ORDER BY created_at, id",
        )
        .fetch_all(&mut **tx)
        .await?;
        let mut challenges = Vec::new();
        for row in &rows {
            let kind: String = row.try_get("kind")?;
            let name: String = row.try_get("name")?;
            let token: String = row.try_get("token")?;
            let value: String = row.try_get("value")?;
            match ChallengeKind::parse(&kind)? {
                ChallengeKind::Http01 => challenges.push(AcmeChallenge::Http01 {
                    token,
                    key_authorization: value,
                }),
                ChallengeKind::TlsAlpn01 => challenges.push(AcmeChallenge::TlsAlpn01 {
                    name,
                    digest: value,
                }),
                ChallengeKind::Dns01 => {}
            }
        }
        Ok((certificates, challenges))
    }
}
