//! Single sign-on in the store: identity providers (generic OIDC, GitHub) and the link from an
//! account at a provider (its stable subject) to a user.
//!
//! A provider's client secret is sealed with control's secrets key. A user signing in through a
//! provider is found by the provider's subject, never by e-mail alone: an existing local user is
//! linked only when the provider says the e-mail address is verified.

use std::collections::BTreeMap;

use kakuremichi_proto::Secret;
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::{corrupt, now_ms, parse_uuid, taken, Result, Store, StoreError, User};

/// Purpose client secrets are sealed under.
const SECRET_PURPOSE: &str = "idp-client-secret";

/// What kind of provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// A generic OpenID Connect provider, found by discovery.
    Oidc,
    /// GitHub OAuth (github.com or GitHub Enterprise Server).
    Github,
}

impl ProviderKind {
    fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Oidc => "oidc",
            ProviderKind::Github => "github",
        }
    }
}

/// An identity provider as stored (without its client secret).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IdentityProvider {
    /// Id.
    pub id: Uuid,
    /// The organization it signs people in to (a default-organization provider vouches for
    /// its users everywhere they are members).
    pub org_id: Uuid,
    /// Short name, in URLs: `/auth/sso/<name>`.
    pub name: String,
    /// Kind.
    pub kind: ProviderKind,
    /// Shown on the sign-in button.
    pub display_name: String,
    /// The OIDC issuer URL, or GitHub's base URL.
    pub issuer: String,
    /// OAuth client id.
    pub client_id: String,
    /// Scopes asked for.
    pub scopes: Vec<String>,
    /// OIDC: the claim holding group or role names (a dotted path, e.g. `realm_access.roles`).
    pub role_claim: Option<String>,
    /// Claim value (OIDC) or `org` / `org/team` (GitHub) to roles.
    pub role_map: BTreeMap<String, Vec<String>>,
    /// Roles every user from this provider gets.
    pub default_roles: Vec<String>,
    /// Whether an unknown person is given an account at first sign-in.
    pub auto_provision: bool,
    /// Creation time.
    #[serde(serialize_with = "crate::times::ms")]
    pub created_at: i64,
}

/// A new identity provider (validated).
#[derive(Debug, Clone)]
pub struct NewIdentityProvider {
    /// The organization.
    pub org_id: Uuid,
    /// Short name.
    pub name: String,
    /// Kind.
    pub kind: ProviderKind,
    /// Shown on the sign-in button.
    pub display_name: String,
    /// Issuer or base URL.
    pub issuer: String,
    /// Client id.
    pub client_id: String,
    /// Client secret (sealed before it is stored).
    pub client_secret: Secret,
    /// Scopes.
    pub scopes: Vec<String>,
    /// Role claim.
    pub role_claim: Option<String>,
    /// Role map.
    pub role_map: BTreeMap<String, Vec<String>>,
    /// Default roles.
    pub default_roles: Vec<String>,
    /// Auto-provisioning.
    pub auto_provision: bool,
}

/// Who a provider says signed in.
#[derive(Debug, Clone)]
pub struct ExternalAccount {
    /// The provider's stable subject.
    pub subject: String,
    /// E-mail address, lower case.
    pub email: String,
    /// Whether the provider verified the address.
    pub email_verified: bool,
    /// Display name.
    pub name: String,
    /// Roles from the provider's groups, when the provider maps roles (`None`: it does not).
    pub mapped_roles: Option<Vec<String>>,
}

const PROVIDER_COLUMNS: &str = "id, name, kind, display_name, issuer, client_id, scopes, \
     role_claim, role_map, default_roles, auto_provision, created_at, org_id";

fn provider_from_row(row: &AnyRow) -> Result<IdentityProvider> {
    let id: String = row.try_get("id")?;
    let kind: String = row.try_get("kind")?;
    let json = |c: &str| -> Result<String> { Ok(row.try_get::<String, _>(c)?) };
    Ok(IdentityProvider {
        id: parse_uuid(&id)?,
        org_id: parse_uuid(&json("org_id")?)?,
        name: row.try_get("name")?,
        kind: match kind.as_str() {
            "oidc" => ProviderKind::Oidc,
            "github" => ProviderKind::Github,
            other => return Err(corrupt(format!("unknown provider kind {other}"))),
        },
        display_name: row.try_get("display_name")?,
        issuer: row.try_get("issuer")?,
        client_id: row.try_get("client_id")?,
        scopes: serde_json::from_str(&json("scopes")?).map_err(corrupt)?,
        role_claim: row.try_get("role_claim")?,
        role_map: serde_json::from_str(&json("role_map")?).map_err(corrupt)?,
        default_roles: serde_json::from_str(&json("default_roles")?).map_err(corrupt)?,
        auto_provision: row.try_get::<i64, _>("auto_provision")? != 0,
        created_at: row.try_get("created_at")?,
    })
}

/// The provider's default roles and the mapped ones, each once.
fn provider_roles(provider: &IdentityProvider, mapped: Option<&[String]>) -> Vec<String> {
    let mut roles = provider.default_roles.clone();
    for r in mapped.unwrap_or_default() {
        if !roles.contains(r) {
            roles.push(r.clone());
        }
    }
    roles
}

impl Store {
    /// Adds an identity provider.
    pub async fn create_identity_provider(
        &self,
        new: &NewIdentityProvider,
    ) -> Result<IdentityProvider> {
        let id = Uuid::new_v4();
        let sealed = self.seal_blob(SECRET_PURPOSE, new.client_secret.expose().as_bytes())?;
        sqlx::query(
            "INSERT INTO identity_providers (id, name, kind, display_name, issuer, client_id, \
             client_secret_sealed, scopes, role_claim, role_map, default_roles, auto_provision, \
             created_at, org_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .bind(id.to_string())
        .bind(&new.name)
        .bind(new.kind.as_str())
        .bind(&new.display_name)
        .bind(&new.issuer)
        .bind(&new.client_id)
        .bind(sealed)
        .bind(serde_json::to_string(&new.scopes).map_err(corrupt)?)
        .bind(new.role_claim.as_deref())
        .bind(serde_json::to_string(&new.role_map).map_err(corrupt)?)
        .bind(serde_json::to_string(&new.default_roles).map_err(corrupt)?)
        .bind(i64::from(new.auto_provision))
        .bind(now_ms())
        .bind(new.org_id.to_string())
        .execute(&self.pool)
        .await
        .map_err(taken(|| {
            format!("an identity provider named {} exists", new.name)
        }))?;
        self.identity_provider(id).await
    }

    /// One identity provider.
    pub async fn identity_provider(&self, id: Uuid) -> Result<IdentityProvider> {
        let row = sqlx::query(&format!(
            "SELECT {PROVIDER_COLUMNS} FROM identity_providers WHERE id = $1"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound("identity provider"))?;
        provider_from_row(&row)
    }

    /// An identity provider by name, with its client secret.
    pub async fn identity_provider_by_name(
        &self,
        name: &str,
    ) -> Result<Option<(IdentityProvider, Secret)>> {
        let row = sqlx::query(&format!(
            "SELECT {PROVIDER_COLUMNS}, client_secret_sealed FROM identity_providers \
             WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let sealed: String = row.try_get("client_secret_sealed")?;
        let secret = self.open_blob(SECRET_PURPOSE, &sealed)?;
        let secret = String::from_utf8(secret).map_err(corrupt)?;
        Ok(Some((provider_from_row(&row)?, Secret::new(secret))))
    }

    /// Every identity provider of every organization, by name.
    pub async fn list_identity_providers(&self) -> Result<Vec<IdentityProvider>> {
        sqlx::query(&format!(
            "SELECT {PROVIDER_COLUMNS} FROM identity_providers ORDER BY name"
        ))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(provider_from_row)
        .collect()
    }

    /// Removes an identity provider and the links to its accounts (the users stay).
    pub async fn delete_identity_provider(&self, id: Uuid) -> Result<()> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM identity_providers WHERE id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound("identity provider"));
        }
        sqlx::query("DELETE FROM user_identities WHERE provider_id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The user an account at `provider` is: found by its subject; else an existing user with
    /// the same e-mail address, linked only when the provider verified it; else a new user when
    /// the provider provisions. The user ends up a member of the provider's organization (a
    /// provider that provisions adds them). When the provider maps roles, the user's roles
    /// there follow it (a change ends their other sessions, as any change of roles does).
    /// `Invalid` with a message for the person when none applies.
    ///
    /// A provider of an organization other than the default one never takes over an account
    /// it does not already know: it links by e-mail only accounts that are members of its
    /// organization, and it provisions only addresses no account has. Otherwise the admin of
    /// one organization could, with their own provider, sign in as a member of another.
    pub async fn sso_user(
        &self,
        provider: &IdentityProvider,
        account: &ExternalAccount,
    ) -> Result<User> {
        let org = provider.org_id;
        let linked: Option<String> = sqlx::query_scalar(
            "SELECT user_id FROM user_identities WHERE provider_id = $1 AND subject = $2",
        )
        .bind(provider.id.to_string())
        .bind(&account.subject)
        .fetch_optional(&self.pool)
        .await?;
        let roles = provider_roles(provider, account.mapped_roles.as_deref());
        let user = match linked {
            Some(id) => self.get_user(parse_uuid(&id)?).await?,
            None => {
                let user = match self.user_by_email(&account.email).await? {
                    Some((user, _)) if account.email_verified => {
                        let member = self.member_roles(org, user.id).await?.is_some();
                        if org != super::DEFAULT_ORG && !member {
                            return Err(StoreError::Invalid(format!(
                                "an account with {} exists and is not a member of this \
                                 organization: ask its administrator to add it",
                                account.email
                            )));
                        }
                        user
                    }
                    Some(_) => {
                        return Err(StoreError::Invalid(format!(
                            "an account with {} exists, and {} has not verified that address",
                            account.email, provider.display_name
                        )))
                    }
                    None if provider.auto_provision => {
                        self.create_user(
                            org,
                            &super::NewUser {
                                email: account.email.clone(),
                                name: account.name.clone(),
                                password_hash: None,
                                roles: roles.clone(),
                            },
                        )
                        .await?
                    }
                    None => {
                        return Err(StoreError::Invalid(format!(
                            "{} has no account here: ask an administrator to add it",
                            account.email
                        )))
                    }
                };
                sqlx::query(
                    "INSERT INTO user_identities (provider_id, subject, user_id, created_at) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(provider.id.to_string())
                .bind(&account.subject)
                .bind(user.id.to_string())
                .bind(now_ms())
                .execute(&self.pool)
                .await?;
                tracing::info!(user_id = %user.id, provider = %provider.name, "linked an account at an identity provider");
                user
            }
        };
        let current = match self.member_roles(org, user.id).await? {
            Some(r) => r,
            None if provider.auto_provision => {
                self.add_member(org, user.id, &roles).await?;
                roles.clone()
            }
            None => {
                return Err(StoreError::Invalid(format!(
                    "{} is not a member of this organization: ask its administrator to add it",
                    account.email
                )))
            }
        };
        if account.mapped_roles.is_some() && roles != current {
            return self
                .update_user(
                    org,
                    user.id,
                    &super::UserPatch {
                        roles: Some(roles),
                        ..Default::default()
                    },
                )
                .await;
        }
        self.get_member(org, user.id).await
    }
}
