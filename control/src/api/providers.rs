//! `/identity-providers`: single sign-on through a generic OpenID Connect provider or GitHub.
//! The client secret is sealed at rest and never shown again.

use std::collections::BTreeMap;

use crate::api::doc::get;
use crate::api::doc::ApiRouter;
use axum::extract::State;
use axum::http::StatusCode;
use kakuremichi_proto::Secret;
use serde::Deserialize;
use uuid::Uuid;

use super::{invalid, ApiJson, ApiPath, Org};
use crate::store::{IdentityProvider, NewIdentityProvider, ProviderKind};
use crate::{validate, ApiError, AppState};

/// Body of `POST /identity-providers`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateProvider {
    /// Short name, in the sign-in URL `/auth/sso/<name>`: 1 to 32 of `a-z 0-9 -`.
    pub name: String,
    /// `oidc` or `github`.
    pub kind: ProviderKind,
    /// Shown on the sign-in button; defaults to the name.
    pub display_name: Option<String>,
    /// OIDC: the issuer URL (discovery at `<issuer>/.well-known/openid-configuration`).
    /// GitHub: the base URL; default `https://github.com` (or a GitHub Enterprise server).
    pub issuer: Option<String>,
    /// OAuth client id.
    pub client_id: String,
    /// OAuth client secret.
    pub client_secret: Secret,
    /// Scopes; default `openid email profile` (OIDC) or `read:user user:email read:org` (GitHub).
    pub scopes: Option<Vec<String>>,
    /// OIDC: the claim with group or role names (dotted path), e.g. `groups`.
    pub role_claim: Option<String>,
    /// Claim value, or GitHub `org` / `org/team`, to role names. When set, a user's roles
    /// follow the provider at every sign-in.
    #[serde(default)]
    pub role_map: BTreeMap<String, Vec<String>>,
    /// Roles every user from this provider gets; default none.
    #[serde(default)]
    pub default_roles: Vec<String>,
    /// Create an account for an unknown person at first sign-in; default `true`.
    pub auto_provision: Option<bool>,
}

/// The identity providers router.
pub fn router() -> ApiRouter<AppState> {
    ApiRouter::new()
        .route("/identity-providers", get(list).post(create))
        .route("/identity-providers/{id}", get(one).delete(remove))
}

fn url(s: &str, what: &str) -> Result<String, ApiError> {
    let u = url::Url::parse(s.trim())
        .map_err(|e| invalid(format!("{what}: {s:?} is not a URL: {e}")))?;
    if !matches!(u.scheme(), "http" | "https")
        || u.host_str().is_none()
        || u.query().is_some()
        || u.fragment().is_some()
        || !u.username().is_empty()
    {
        return Err(invalid(format!(
            "{what}: {s:?} must be an http(s) URL without query, fragment or credentials"
        )));
    }
    Ok(s.trim().trim_end_matches('/').to_owned())
}

fn role_list(list: &[String], what: &str) -> Result<Vec<String>, ApiError> {
    list.iter()
        .map(|r| validate::role(r).map_err(|e| invalid(format!("{what}: {e}"))))
        .collect()
}

async fn create(
    State(state): State<AppState>,
    org: Org,
    ApiJson(body): ApiJson<CreateProvider>,
) -> Result<(StatusCode, ApiJson<IdentityProvider>), ApiError> {
    let name = body.name.trim().to_owned();
    if name.is_empty()
        || name.len() > 32
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(invalid(format!(
            "name: {name:?} must be 1 to 32 of a-z, 0-9 and '-'"
        )));
    }
    let issuer = match (body.kind, body.issuer.as_deref()) {
        (ProviderKind::Oidc, None) => {
            return Err(invalid(
                "issuer: an OIDC provider needs its issuer URL".into(),
            ))
        }
        (_, Some(i)) => url(i, "issuer")?,
        (ProviderKind::Github, None) => "https://github.com".to_owned(),
    };
    if body.client_id.trim().is_empty() || body.client_id.len() > 512 {
        return Err(invalid("client_id: 1 to 512 characters".into()));
    }
    let secret = body.client_secret.expose();
    if secret.is_empty() || secret.len() > 1024 {
        return Err(invalid("client_secret: 1 to 1024 characters".into()));
    }
    let scopes = body.scopes.unwrap_or_else(|| match body.kind {
        ProviderKind::Oidc => vec!["openid".into(), "email".into(), "profile".into()],
        ProviderKind::Github => vec!["read:user".into(), "user:email".into(), "read:org".into()],
    });
    if scopes.len() > 32
        || scopes
            .iter()
            .any(|s| s.is_empty() || s.len() > 128 || s.bytes().any(|b| b <= b' ' || b == b'"'))
    {
        return Err(invalid(
            "scopes: at most 32 scope names, each without spaces".into(),
        ));
    }
    if body.kind == ProviderKind::Oidc && !scopes.iter().any(|s| s == "openid") {
        return Err(invalid(
            "scopes: an OIDC provider needs the openid scope".into(),
        ));
    }
    if body.role_map.len() > 256 {
        return Err(invalid("role_map: at most 256 entries".into()));
    }
    let mut role_map = BTreeMap::new();
    for (k, v) in &body.role_map {
        if k.is_empty() || k.len() > 256 {
            return Err(invalid("role_map: keys are 1 to 256 characters".into()));
        }
        role_map.insert(k.clone(), role_list(v, "role_map")?);
    }
    let role_claim = match body.role_claim.as_deref().map(str::trim) {
        Some("") | None => None,
        Some(c) if c.len() <= 128 => Some(c.to_owned()),
        Some(_) => return Err(invalid("role_claim: at most 128 characters".into())),
    };
    if body.kind == ProviderKind::Oidc && !role_map.is_empty() && role_claim.is_none() {
        return Err(invalid(
            "role_claim: a role_map needs the claim that holds the groups, e.g. \"groups\"".into(),
        ));
    }
    let default_roles = role_list(&body.default_roles, "default_roles")?;
    for r in role_map.values().flatten().chain(&default_roles) {
        if !state.store.role_exists(org.0, r).await? {
            return Err(invalid(format!(
                "there is no role {r:?}; see GET /api/v1/roles"
            )));
        }
    }
    let display_name = match body.display_name.as_deref() {
        Some(d) => validate::name(d).map_err(invalid)?,
        None => name.clone(),
    };
    let p = state
        .store
        .create_identity_provider(&NewIdentityProvider {
            org_id: org.0,
            name,
            kind: body.kind,
            display_name,
            issuer,
            client_id: body.client_id.trim().to_owned(),
            client_secret: body.client_secret,
            scopes,
            role_claim,
            role_map,
            default_roles,
            auto_provision: body.auto_provision.unwrap_or(true),
        })
        .await?;
    tracing::info!(provider = %p.name, kind = ?p.kind, "identity provider added");
    Ok((StatusCode::CREATED, ApiJson(p)))
}

async fn list(
    State(state): State<AppState>,
    org: Org,
) -> Result<ApiJson<Vec<IdentityProvider>>, ApiError> {
    let all = state.store.list_identity_providers().await?;
    Ok(ApiJson(
        all.into_iter().filter(|p| p.org_id == org.0).collect(),
    ))
}

/// The provider, if it belongs to `org`; another organization's is "not found" as well.
async fn owned(state: &AppState, org: Org, id: Uuid) -> Result<IdentityProvider, ApiError> {
    let p = state.store.identity_provider(id).await?;
    org.owns(p.org_id, "identity provider")?;
    Ok(p)
}

async fn one(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiJson<IdentityProvider>, ApiError> {
    Ok(ApiJson(owned(&state, org, id).await?))
}

async fn remove(
    State(state): State<AppState>,
    org: Org,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    owned(&state, org, id).await?;
    state.store.delete_identity_provider(id).await?;
    state.sso.forget(id);
    tracing::info!(provider_id = %id, "identity provider removed");
    Ok(StatusCode::NO_CONTENT)
}
