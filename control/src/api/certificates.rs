//! `/certificates`: TLS certificates control keeps for every gateway, ordered by ACME (HTTP-01,
//! TLS-ALPN-01, or DNS-01 for wildcards) or uploaded. Private keys never leave through the API.

use crate::api::doc::ApiRouter;
use crate::api::doc::{get, post};
use axum::extract::State;
use axum::http::StatusCode;
use kakuremichi_proto::Secret;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{invalid, ApiJson, ApiPath, Org};
use crate::store::{CertSource, CertStatus, Certificate, ChallengeKind, Issued};
use crate::{certs, validate, ApiError, AppState};

/// Body of `POST /certificates`: either `names` (ACME) or `chain_pem` with `key_pem` (upload).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCertificate {
    /// ACME: the names, e.g. `["app.example.com"]` or `["*.example.com", "example.com"]`.
    pub names: Option<Vec<String>>,
    /// ACME: `http-01` (default), `tls-alpn-01` or `dns-01` (needed for wildcards).
    pub challenge: Option<ChallengeKind>,
    /// Upload: the chain, end-entity first, PEM.
    pub chain_pem: Option<String>,
    /// Upload: its private key, PEM.
    pub key_pem: Option<Secret>,
}

/// A certificate as the API shows it (never its key).
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct CertificateView {
    /// Id.
    pub id: Uuid,
    /// Names covered.
    pub names: Vec<String>,
    /// `acme` or `upload`.
    pub source: CertSource,
    /// ACME: the challenge.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub challenge: Option<ChallengeKind>,
    /// `pending`, `valid` or `failed`.
    pub status: CertStatus,
    /// Validity start (unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(serialize_with = "crate::times::opt_ms")]
    #[schemars(with = "Option<crate::times::DateTime>")]
    pub not_before: Option<i64>,
    /// Expiry (unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(serialize_with = "crate::times::opt_ms")]
    #[schemars(with = "Option<crate::times::DateTime>")]
    pub not_after: Option<i64>,
    /// ACME: when the next order is due (unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(serialize_with = "crate::times::opt_ms")]
    #[schemars(with = "Option<crate::times::DateTime>")]
    pub next_attempt_at: Option<i64>,
    /// Failed attempts since the last success.
    pub failures: u32,
    /// Why the last attempt failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the current chain was issued or uploaded (unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(serialize_with = "crate::times::opt_ms")]
    #[schemars(with = "Option<crate::times::DateTime>")]
    pub issued_at: Option<i64>,
    /// The chain (public), once issued.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chain_pem: Option<String>,
    /// Made for a resource hostname.
    pub auto_resource: bool,
    /// Creation time.
    #[serde(serialize_with = "crate::times::ms")]
    #[schemars(with = "crate::times::DateTime")]
    pub created_at: i64,
}

impl From<Certificate> for CertificateView {
    fn from(c: Certificate) -> Self {
        Self {
            id: c.id,
            names: c.names,
            source: c.source,
            challenge: c.challenge,
            status: c.status,
            not_before: c.not_before,
            not_after: c.not_after,
            next_attempt_at: c.next_attempt_at,
            failures: c.failures,
            last_error: c.last_error,
            issued_at: c.issued_at,
            chain_pem: c.chain_pem,
            auto_resource: c.auto_resource,
            created_at: c.created_at,
        }
    }
}

/// The certificates router.
pub fn router() -> ApiRouter<AppState> {
    ApiRouter::new()
        .route(
            "/certificates",
            get(list)
                .summary("the organization's certificates (never their keys)")
                .returns::<Vec<CertificateView>>(200)
                .post(create)
                .summary("an ACME order by names, or an upload of a chain and its key")
                .body::<CreateCertificate>()
                .returns::<CertificateView>(201),
        )
        .route(
            "/certificates/{id}",
            get(one).returns::<CertificateView>(200).delete(remove),
        )
        .route(
            "/certificates/{id}/renew",
            post(renew)
                .summary("an ACME order now")
                .returns::<CertificateView>(200),
        )
}

/// The longest accepted chain or key (PEM).
const MAX_PEM: usize = 64 * 1024;
/// Names per certificate at most (Let's Encrypt allows 100).
const MAX_NAMES: usize = 100;

fn check_name(raw: &str) -> Result<String, ApiError> {
    match raw.strip_prefix("*.") {
        Some(rest) => Ok(format!("*.{}", validate::hostname(rest).map_err(invalid)?)),
        None => validate::hostname(raw).map_err(invalid),
    }
}

/// A certificate may not cover another organization's resource hostnames: shared gateways
/// would otherwise have a choice of certificates for them.
async fn check_names_mine(state: &AppState, org: Org, names: &[String]) -> Result<(), ApiError> {
    let resources = state.store.list_resources().await?;
    if let Some(r) = resources
        .iter()
        .find(|r| r.org_id != org.0 && !r.hostname.is_empty() && certs::covers(names, &r.hostname))
    {
        return Err(ApiError::Conflict(format!(
            "{} is another organization's hostname",
            r.hostname
        )));
    }
    Ok(())
}

async fn create(
    State(state): State<AppState>,
    org: Org,
    ApiJson(body): ApiJson<CreateCertificate>,
) -> Result<(StatusCode, ApiJson<CertificateView>), ApiError> {
    let cert = match (body.names, body.chain_pem, body.key_pem) {
        (Some(names), None, None) => {
            let Some(acme) = state.acme.as_deref() else {
                return Err(invalid(
                    "control has no ACME CA configured (--acme-directory): upload chain_pem and \
                     key_pem instead"
                        .into(),
                ));
            };
            if names.is_empty() || names.len() > MAX_NAMES {
                return Err(invalid(format!("names: from 1 to {MAX_NAMES} names")));
            }
            let mut checked = Vec::with_capacity(names.len());
            for n in &names {
                let n = check_name(n)?;
                if !checked.contains(&n) {
                    checked.push(n);
                }
            }
            let wildcard = checked.iter().any(|n| n.starts_with("*."));
            let challenge = body.challenge.unwrap_or(if wildcard {
                ChallengeKind::Dns01
            } else {
                ChallengeKind::Http01
            });
            if wildcard && challenge != ChallengeKind::Dns01 {
                return Err(invalid(
                    "a wildcard name can only be proven with dns-01".into(),
                ));
            }
            if challenge == ChallengeKind::Dns01 {
                let Some(dns) = &acme.dns else {
                    return Err(invalid(
                        "dns-01 needs control's RFC 2136 settings (--acme-dns-server, \
                         --acme-dns-zone, TSIG key)"
                            .into(),
                    ));
                };
                if let Some(outside) = checked
                    .iter()
                    .find(|n| !dns.in_zone(n.trim_start_matches("*.")))
                {
                    return Err(invalid(format!(
                        "{outside} is outside the DNS zone control updates ({})",
                        dns.zone
                    )));
                }
            }
            check_names_mine(&state, org, &checked).await?;
            state
                .store
                .create_acme_certificate(org.0, &checked, challenge, false)
                .await?
        }
        (None, Some(chain_pem), Some(key_pem)) => {
            if body.challenge.is_some() {
                return Err(invalid("challenge is for ACME certificates".into()));
            }
            if chain_pem.len() > MAX_PEM || key_pem.expose().len() > MAX_PEM {
                return Err(invalid(format!(
                    "chain_pem and key_pem: at most {MAX_PEM} bytes"
                )));
            }
            let info = certs::chain_info(&chain_pem).map_err(|e| invalid(e.to_string()))?;
            certs::check_key(&info, key_pem.expose()).map_err(|e| invalid(e.to_string()))?;
            if info.not_after_ms <= crate::store::now_ms() {
                return Err(invalid("the certificate has expired".into()));
            }
            check_names_mine(&state, org, &info.names).await?;
            state
                .store
                .upload_certificate(
                    org.0,
                    &info.names,
                    &Issued {
                        chain_pem,
                        key_pem,
                        not_before: info.not_before_ms,
                        not_after: info.not_after_ms,
                    },
                )
                .await?
        }
        _ => {
            return Err(invalid(
                "send either names (an ACME certificate) or chain_pem with key_pem (an upload)"
                    .into(),
            ))
        }
    };
    tracing::info!(certificate_id = %cert.id, names = ?cert.names, source = ?cert.source, "certificate added");
    Ok((StatusCode::CREATED, ApiJson(cert.into())))
}

async fn list(
    State(state): State<AppState>,
    org: Org,
) -> Result<ApiJson<Vec<CertificateView>>, ApiError> {
    let all = state.store.list_certificates().await?;
    Ok(ApiJson(
        all.into_iter()
            .filter(|c| c.org_id == org.0)
            .map(Into::into)
            .collect(),
    ))
}

/// The certificate, if it belongs to `org`; another organization's is "not found" as well.
async fn owned(state: &AppState, org: Org, id: Uuid) -> Result<Certificate, ApiError> {
    let c = state.store.get_certificate(id).await?;
    org.owns(c.org_id, "certificate")?;
    Ok(c)
}

async fn one(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiJson<CertificateView>, ApiError> {
    Ok(ApiJson(owned(&state, org, id).await?.into()))
}

async fn renew(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiJson<CertificateView>, ApiError> {
    owned(&state, org, id).await?;
    Ok(ApiJson(state.store.certificate_due_now(id).await?.into()))
}

async fn remove(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    owned(&state, org, id).await?;
    state.store.delete_certificate(id).await?;
    Ok(StatusCode::NO_CONTENT)
}
