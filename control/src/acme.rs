//! Certificates by ACME, ordered and renewed once by control for every gateway.
//!
//! One task per control process ([`run`]) claims due certificates from the store with a lease (so
//! several replicas never order the same one twice), proves control of the names and stores the
//! chain with its sealed key; gateways get it in their next snapshot. The proof:
//! - **HTTP-01**: the token's answer goes into every gateway's snapshot; the task waits until the
//!   online gateways applied that version, since the CA may ask any of them.
//! - **TLS-ALPN-01**: the same, with the key authorization's digest; gateways answer a
//!   ClientHello offering `acme-tls/1` with a certificate carrying it (RFC 8737).
//! - **DNS-01**: a TXT record set with an RFC 2136 update ([`crate::dns`]); the only way to a
//!   wildcard.
//!
//! The scheduling (renew at two thirds of the lifetime, backoff after failures) is in
//! [`crate::certs`]. With `--acme-for-resources`, every HTTP resource hostname no certificate
//! covers gets one.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use kakuremichi_proto::{NodeKind, RouteProtocol, Secret};
use rand::Rng as _;
use uuid::Uuid;

use crate::certs;
use crate::dns::Rfc2136;
use crate::store::{Certificate, ChallengeKind, Issued, StoreError, StoredChallenge};
use crate::AppState;

/// How control talks to its ACME CA.
#[derive(Debug, Clone)]
pub struct AcmeSettings {
    /// The directory URL.
    pub directory: String,
    /// Contact URIs for the account (`mailto:...`).
    pub contact: Vec<String>,
    /// Extra root certificate (PEM file) trusted for the CA's own HTTPS API.
    pub ca_file: Option<PathBuf>,
    /// Challenge for certificates made automatically for HTTP resources (`None`: none made).
    pub for_resources: Option<ChallengeKind>,
    /// RFC 2136 server for DNS-01.
    pub dns: Option<Rfc2136>,
    /// How long to wait for gateways to apply a challenge answer.
    pub gateway_wait: Duration,
}

/// How long a replica holds a certificate it is ordering.
const LEASE_MS: i64 = 5 * 60 * 1000;
/// Longest sleep between looks at the store.
const MAX_IDLE: Duration = Duration::from_secs(30);

/// An order failed.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The CA said no, or could not be reached.
    #[error("ACME: {0}")]
    Acme(#[from] instant_acme::Error),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A DNS update failed.
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// Orders and renews due certificates until control shuts down.
pub async fn run(state: AppState, settings: AcmeSettings) {
    let mut changes = state.store.subscribe();
    let mut shutdown = state.shutdown_signal();
    tracing::info!(directory = %settings.directory, "ACME certificates enabled");
    loop {
        if let Err(error) = ensure_resource_certificates(&state, &settings).await {
            tracing::warn!(%error, "cannot add certificates for resources; will retry");
        }
        loop {
            if state.shutting_down() {
                return;
            }
            match state
                .store
                .claim_due_certificate(crate::store::now_ms(), LEASE_MS)
                .await
            {
                Ok(Some(cert)) => process(&state, &settings, cert).await,
                Ok(None) => break,
                Err(error) => {
                    tracing::warn!(%error, "cannot read due certificates; will retry");
                    break;
                }
            }
        }
        let wait = match state.store.next_certificate_due().await {
            Ok(Some(at)) => Duration::from_millis(
                (at - crate::store::now_ms()).clamp(500, MAX_IDLE.as_millis() as i64) as u64,
            ),
            _ => MAX_IDLE,
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = changes.changed() => {}
            () = crate::until_set(&mut shutdown) => return,
        }
    }
}

/// Creates an ACME certificate for every HTTP resource hostname (and the agent sessions
/// hostname, under the default organization, whose gateways serve it) no certificate covers, and
/// removes automatic ones whose hostname is no longer served.
async fn ensure_resource_certificates(
    state: &AppState,
    settings: &AcmeSettings,
) -> Result<(), StoreError> {
    let Some(challenge) = settings.for_resources else {
        return Ok(());
    };
    let resources = state.store.list_resources().await?;
    let certificates = state.store.list_certificates().await?;
    let wanted: Vec<(Uuid, &str)> = resources
        .iter()
        .filter(|r| r.protocol == RouteProtocol::Http)
        .map(|r| (r.org_id, r.hostname.as_str()))
        .chain(
            state
                .store
                .sessions_host()
                .map(|h| (crate::store::DEFAULT_ORG, h)),
        )
        .collect();
    for &(org, host) in &wanted {
        // Only the hostname's own organization's certificates count.
        if certificates
            .iter()
            .any(|c| c.org_id == org && certs::covers(&c.names, host))
        {
            continue;
        }
        let c = state
            .store
            .create_acme_certificate(org, &[host.to_owned()], challenge, true)
            .await?;
        tracing::info!(certificate_id = %c.id, %host, "ordering a certificate for a hostname gateways serve");
    }
    for c in certificates.iter().filter(|c| c.auto_resource) {
        if !c.names.iter().any(|n| wanted.iter().any(|(_, h)| h == n)) {
            tracing::info!(certificate_id = %c.id, names = ?c.names, "hostname no longer served: certificate removed");
            state.store.delete_certificate(c.id).await?;
        }
    }
    Ok(())
}

async fn process(state: &AppState, settings: &AcmeSettings, cert: Certificate) {
    let mut dns_records = Vec::new();
    let result = tokio::time::timeout(
        Duration::from_secs(180),
        order(state, settings, &cert, &mut dns_records),
    )
    .await
    .unwrap_or_else(|_| {
        Err(AcmeError::Other(
            "the order took longer than 3 minutes".into(),
        ))
    });
    if let Err(error) = state.store.clear_acme_challenges(cert.id).await {
        tracing::warn!(certificate_id = %cert.id, %error, "cannot clear challenge answers");
    }
    if let Some(dns) = &settings.dns {
        for (name, value) in dns_records {
            if let Err(error) = dns.remove_txt(&name, &value).await {
                tracing::warn!(%name, %error, "cannot remove a DNS-01 record");
            }
        }
    }
    let now = crate::store::now_ms();
    match result {
        Ok(issued) => {
            let next = certs::renew_at(issued.not_before, issued.not_after);
            match state.store.certificate_issued(cert.id, &issued, next).await {
                Ok(()) => tracing::info!(
                    certificate_id = %cert.id,
                    names = ?cert.names,
                    not_after = issued.not_after,
                    renew_at = next,
                    "certificate issued"
                ),
                Err(error) => {
                    tracing::error!(certificate_id = %cert.id, %error, "cannot store an issued certificate");
                    let at = certs::retry_at(now, cert.failures + 1, jitter(), cert.not_after);
                    let _ = state
                        .store
                        .certificate_failed(cert.id, &error.to_string(), at)
                        .await;
                }
            }
        }
        Err(error) => {
            let at = certs::retry_at(now, cert.failures + 1, jitter(), cert.not_after);
            tracing::warn!(
                certificate_id = %cert.id,
                names = ?cert.names,
                %error,
                retry_in_ms = at - now,
                "certificate order failed"
            );
            if let Err(e) = state
                .store
                .certificate_failed(cert.id, &error.to_string(), at)
                .await
            {
                tracing::warn!(certificate_id = %cert.id, error = %e, "cannot record a failed order");
            }
        }
    }
}

fn jitter() -> f64 {
    rand::thread_rng().gen_range(0.5..=1.0)
}

async fn account(state: &AppState, settings: &AcmeSettings) -> Result<Account, AcmeError> {
    let builder = || match &settings.ca_file {
        Some(path) => Account::builder_with_root(path),
        None => Account::builder(),
    };
    if let Some(stored) = state.store.acme_account(&settings.directory).await? {
        let credentials: AccountCredentials = serde_json::from_str(stored.expose())
            .map_err(|e| AcmeError::Other(format!("stored ACME account: {e}")))?;
        return Ok(builder()?.from_credentials(credentials).await?);
    }
    let contact: Vec<&str> = settings.contact.iter().map(String::as_str).collect();
    let (account, credentials) = builder()?
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            settings.directory.clone(),
            None,
        )
        .await?;
    let json = serde_json::to_string(&credentials)
        .map_err(|e| AcmeError::Other(format!("ACME account: {e}")))?;
    state
        .store
        .save_acme_account(&settings.directory, &Secret::new(json))
        .await?;
    tracing::info!(directory = %settings.directory, "ACME account created");
    Ok(account)
}

/// Waits until every online gateway applied `version` (or `limit` passed: the CA is asked anyway).
async fn wait_gateways(state: &AppState, version: u64, limit: Duration) -> Result<(), StoreError> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let now = crate::store::now_ms();
        let gateways = state.store.list_nodes(NodeKind::Gateway).await?;
        let behind: Vec<String> = gateways
            .iter()
            .filter(|g| {
                let pending = state.activity.peek(NodeKind::Gateway, g.id);
                let seen = g.last_seen_at.max(pending.as_ref().and_then(|p| p.seen_at));
                let online = state.hub.is_online(g.id) || seen.is_some_and(|s| now - s < 30_000);
                let applied = pending
                    .and_then(|p| p.applied_version)
                    .max(g.applied_version)
                    .unwrap_or(0);
                online && applied < version
            })
            .map(|g| g.name.clone())
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                ?behind,
                version,
                "gateways did not apply the challenge in time; asking the CA anyway"
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn order(
    state: &AppState,
    settings: &AcmeSettings,
    cert: &Certificate,
    dns_records: &mut Vec<(String, String)>,
) -> Result<Issued, AcmeError> {
    let kind = cert.challenge.unwrap_or(ChallengeKind::Http01);
    let account = account(state, settings).await?;
    let identifiers: Vec<Identifier> = cert
        .names
        .iter()
        .map(|n| Identifier::Dns(n.clone()))
        .collect();
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz?;
        match authz.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => {
                return Err(AcmeError::Other(format!(
                    "authorization is {other:?}, not pending"
                )))
            }
        }
        let challenge_type = match kind {
            ChallengeKind::Http01 => ChallengeType::Http01,
            ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
            ChallengeKind::Dns01 => ChallengeType::Dns01,
        };
        let mut challenge = authz.challenge(challenge_type.clone()).ok_or_else(|| {
            AcmeError::Other(format!("the CA offers no {} challenge", kind.as_str()))
        })?;
        let identifier = challenge.identifier();
        let base = match identifier.identifier {
            Identifier::Dns(d) => d.clone(),
            other => {
                return Err(AcmeError::Other(format!(
                    "unsupported identifier {other:?}"
                )))
            }
        };
        let key_authorization = challenge.key_authorization();
        match kind {
            ChallengeKind::Http01 | ChallengeKind::TlsAlpn01 => {
                let (token, value) = if kind == ChallengeKind::Http01 {
                    (
                        challenge.token.clone(),
                        key_authorization.as_str().to_owned(),
                    )
                } else {
                    (
                        String::new(),
                        base64::engine::general_purpose::URL_SAFE_NO_PAD
                            .encode(key_authorization.digest()),
                    )
                };
                let version = state
                    .store
                    .add_acme_challenge(
                        cert.id,
                        &StoredChallenge {
                            kind,
                            name: base.clone(),
                            token,
                            value,
                        },
                    )
                    .await?;
                wait_gateways(state, version, settings.gateway_wait).await?;
            }
            ChallengeKind::Dns01 => {
                let dns = settings.dns.as_ref().ok_or_else(|| {
                    AcmeError::Other("dns-01 needs --acme-dns-server and its TSIG key".into())
                })?;
                let name = format!("_acme-challenge.{base}");
                let value = key_authorization.dns_value();
                dns.add_txt(&name, &value).await?;
                dns_records.push((name, value));
            }
        }
        challenge.set_ready().await?;
    }
    let retry = RetryPolicy::new()
        .initial_delay(Duration::from_millis(200))
        .backoff(1.5)
        .timeout(Duration::from_secs(90));
    let status = order.poll_ready(&retry).await?;
    if status != OrderStatus::Ready {
        return Err(AcmeError::Other(format!("order is {status:?}, not ready")));
    }
    let key_pem = order.finalize().await?;
    let chain_pem = order.poll_certificate(&retry).await?;
    let info = certs::chain_info(&chain_pem).map_err(|e| AcmeError::Other(e.to_string()))?;
    Ok(Issued {
        chain_pem,
        key_pem: Secret::new(key_pem),
        not_before: info.not_before_ms,
        not_after: info.not_after_ms,
    })
}
