//! Organizations (tenants) and memberships in the store.
//!
//! Every site, gateway, resource, certificate, API key, identity provider and custom role belongs
//! to one organization; a user belongs to any number, with roles in each. The default
//! organization holds what existed before organizations; its gateways serve every organization.

use kakuremichi_proto::Secret;
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::{corrupt, now_ms, parse_uuid, taken, Result, Store, StoreError};
use crate::secrets;

/// The default organization: the instance's own. It holds everything made before organizations
/// existed, sees sign-ins at control in its audit log, may create other organizations, and its
/// gateways are shared by every organization.
pub const DEFAULT_ORG: Uuid = Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0001);

/// An organization.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Organization {
    /// Id.
    pub id: Uuid,
    /// Display name, unique.
    pub name: String,
    /// Members must have signed in with a second factor (TOTP or a passkey) to reach this
    /// organization's resources.
    pub require_second_factor: bool,
    /// Created.
    #[serde(serialize_with = "crate::times::ms")]
    pub created_at: i64,
}

fn org_from_row(r: &AnyRow) -> Result<Organization> {
    let id: String = r.try_get("id")?;
    Ok(Organization {
        id: parse_uuid(&id)?,
        name: r.try_get("name")?,
        require_second_factor: r.try_get::<i64, _>("require_second_factor")? != 0,
        created_at: r.try_get("created_at")?,
    })
}

const ORG_COLUMNS: &str = "id, name, require_second_factor, created_at";

/// The tables whose rows belong to an organization and keep it alive.
const OWNED: &[(&str, &str)] = &[
    ("sites", "site"),
    ("gateways", "gateway"),
    ("resources", "resource"),
    ("certificates", "certificate"),
    ("identity_providers", "identity provider"),
];

impl Store {
    /// Creates an organization with its admin key (every permission; returned once, as the
    /// first admin key is); `owner` (if any) becomes its owner, and the key theirs.
    pub async fn create_org(
        &self,
        name: &str,
        owner: Option<Uuid>,
    ) -> Result<(Organization, Secret)> {
        let _w = self.write.lock().await;
        let id = Uuid::new_v4();
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO organizations (id, name, require_second_factor, created_at) \
             VALUES ($1, $2, 0, $3)",
        )
        .bind(id.to_string())
        .bind(name)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(taken(|| format!("an organization named {name:?} exists")))?;
        if let Some(user) = owner {
            sqlx::query(
                "INSERT INTO memberships (org_id, user_id, roles, created_at) \
                 VALUES ($1, $2, '[\"owner\"]', $3)",
            )
            .bind(id.to_string())
            .bind(user.to_string())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        let key_id = Uuid::new_v4();
        let key = secrets::new_with_id(secrets::ADMIN_KEY_PREFIX, key_id);
        sqlx::query(
            "INSERT INTO api_keys (id, hash, created_at, name, user_id, org_id) \
             VALUES ($1, $2, $3, 'admin', $4, $5)",
        )
        .bind(key_id.to_string())
        .bind(secrets::digest(&key))
        .bind(now)
        .bind(owner.map(|u| u.to_string()))
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((self.get_org(id).await?, key))
    }

    /// One organization.
    pub async fn get_org(&self, id: Uuid) -> Result<Organization> {
        let row = sqlx::query(&format!(
            "SELECT {ORG_COLUMNS} FROM organizations WHERE id = $1"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound("organization"))?;
        org_from_row(&row)
    }

    /// Every organization, oldest first.
    pub async fn list_orgs(&self) -> Result<Vec<Organization>> {
        sqlx::query(&format!(
            "SELECT {ORG_COLUMNS} FROM organizations ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(org_from_row)
        .collect()
    }

    /// Renames an organization or changes whether it requires a second factor (gateways learn
    /// it with the next snapshot).
    pub async fn update_org(
        &self,
        id: Uuid,
        name: Option<&str>,
        require_second_factor: Option<bool>,
    ) -> Result<Organization> {
        let _w = self.write.lock().await;
        let mut org = self.get_org(id).await?;
        if let Some(n) = name {
            n.clone_into(&mut org.name);
        }
        if let Some(r) = require_second_factor {
            org.require_second_factor = r;
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE organizations SET name = $1, require_second_factor = $2 WHERE id = $3")
            .bind(&org.name)
            .bind(i64::from(org.require_second_factor))
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(taken(|| {
                format!("an organization named {:?} exists", org.name)
            }))?;
        self.commit_bumped(tx).await?;
        Ok(org)
    }

    /// Deletes an empty organization (no sites, gateways, resources, certificates or identity
    /// providers), with its memberships, roles and API keys. Never the default one.
    pub async fn delete_org(&self, id: Uuid) -> Result<()> {
        if id == DEFAULT_ORG {
            return Err(StoreError::Invalid(
                "the default organization cannot be deleted".into(),
            ));
        }
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        for (table, what) in OWNED {
            let n: i64 =
                sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table} WHERE org_id = $1"))
                    .bind(id.to_string())
                    .fetch_one(&mut *tx)
                    .await?;
            if n > 0 {
                return Err(StoreError::Conflict(format!(
                    "the organization still has {n} {what}(s): delete them first"
                )));
            }
        }
        let done = sqlx::query("DELETE FROM organizations WHERE id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound("organization"));
        }
        for table in ["memberships", "roles", "access_policies"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE org_id = $1"))
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE org_id = $2 AND revoked_at IS NULL")
            .bind(now_ms())
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        self.commit_bumped(tx).await?;
        Ok(())
    }

    // ------------------------------------------------------------------ memberships

    /// The user's roles in the organization; `None` when not a member.
    pub async fn member_roles(&self, org: Uuid, user: Uuid) -> Result<Option<Vec<String>>> {
        let roles: Option<String> =
            sqlx::query_scalar("SELECT roles FROM memberships WHERE org_id = $1 AND user_id = $2")
                .bind(org.to_string())
                .bind(user.to_string())
                .fetch_optional(&self.pool)
                .await?;
        roles
            .map(|r| serde_json::from_str(&r).map_err(corrupt))
            .transpose()
    }

    /// The organizations the user belongs to, with their roles there.
    pub async fn memberships_of(&self, user: Uuid) -> Result<Vec<(Organization, Vec<String>)>> {
        let rows = sqlx::query(
            "SELECT o.id, o.name, o.require_second_factor, o.created_at, m.roles \
             FROM memberships m JOIN organizations o ON o.id = m.org_id \
             WHERE m.user_id = $1 ORDER BY o.created_at, o.id",
        )
        .bind(user.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let roles: String = r.try_get("roles")?;
                Ok((
                    org_from_row(r)?,
                    serde_json::from_str(&roles).map_err(corrupt)?,
                ))
            })
            .collect()
    }

    /// Makes an existing user a member of the organization with `roles` (`Conflict` if they
    /// are one already).
    pub async fn add_member(&self, org: Uuid, user: Uuid, roles: &[String]) -> Result<()> {
        sqlx::query(
            "INSERT INTO memberships (org_id, user_id, roles, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(org.to_string())
        .bind(user.to_string())
        .bind(serde_json::to_string(roles).map_err(corrupt)?)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(taken(|| "this user is a member already".into()))?;
        Ok(())
    }
}
