//! Custom roles in the store: named sets of permissions. The built-in roles live in code
//! ([`crate::roles`]); a user's permissions are the union of their roles' permissions.

use std::collections::BTreeSet;

use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::{corrupt, now_ms, taken, Result, Store, StoreError};

/// A custom role.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CustomRole {
    /// Name (as users' `roles` name it).
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Permissions it gives.
    pub permissions: Vec<String>,
    /// Created.
    #[serde(serialize_with = "crate::times::ms")]
    pub created_at: i64,
}

fn role_from_row(r: &AnyRow) -> Result<CustomRole> {
    let permissions: String = r.try_get("permissions")?;
    Ok(CustomRole {
        name: r.try_get("name")?,
        description: r.try_get("description")?,
        permissions: serde_json::from_str(&permissions).map_err(corrupt)?,
        created_at: r.try_get("created_at")?,
    })
}

impl Store {
    /// Every custom role of the organization, by name.
    pub async fn list_roles(&self, org: Uuid) -> Result<Vec<CustomRole>> {
        sqlx::query(
            "SELECT name, description, permissions, created_at FROM roles WHERE org_id = $1 \
             ORDER BY name",
        )
        .bind(org.to_string())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(role_from_row)
        .collect()
    }

    /// Adds a custom role (the caller checked the name is not built in).
    pub async fn create_role(&self, org: Uuid, role: &CustomRole) -> Result<CustomRole> {
        sqlx::query(
            "INSERT INTO roles (org_id, name, description, permissions, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(org.to_string())
        .bind(&role.name)
        .bind(&role.description)
        .bind(serde_json::to_string(&role.permissions).map_err(corrupt)?)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(taken(|| format!("a role named {} exists", role.name)))?;
        self.role(org, &role.name).await
    }

    /// One custom role.
    pub async fn role(&self, org: Uuid, name: &str) -> Result<CustomRole> {
        let row = sqlx::query(
            "SELECT name, description, permissions, created_at FROM roles \
             WHERE org_id = $1 AND name = $2",
        )
        .bind(org.to_string())
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound("role"))?;
        role_from_row(&row)
    }

    /// Changes a custom role's description or permissions (in effect at the next request).
    pub async fn update_role(
        &self,
        org: Uuid,
        name: &str,
        description: Option<&str>,
        permissions: Option<&[String]>,
    ) -> Result<CustomRole> {
        let mut r = self.role(org, name).await?;
        if let Some(d) = description {
            r.description = d.to_owned();
        }
        if let Some(p) = permissions {
            r.permissions = p.to_vec();
        }
        sqlx::query(
            "UPDATE roles SET description = $1, permissions = $2 WHERE org_id = $3 AND name = $4",
        )
        .bind(&r.description)
        .bind(serde_json::to_string(&r.permissions).map_err(corrupt)?)
        .bind(org.to_string())
        .bind(name)
        .execute(&self.pool)
        .await?;
        Ok(r)
    }

    /// Removes a custom role; `Conflict` while a user holds it.
    pub async fn delete_role(&self, org: Uuid, name: &str) -> Result<()> {
        let holders = self
            .list_users(org)
            .await?
            .into_iter()
            .filter(|u| u.roles.iter().any(|r| r == name))
            .count();
        if holders > 0 {
            return Err(StoreError::Conflict(format!(
                "{holders} user(s) hold the role {name}: take it from them first"
            )));
        }
        let done = sqlx::query("DELETE FROM roles WHERE org_id = $1 AND name = $2")
            .bind(org.to_string())
            .bind(name)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound("role"));
        }
        Ok(())
    }

    /// The permissions `roles` give together in the organization: built-in roles' from code,
    /// custom ones' from the store; a name that is neither gives nothing.
    pub async fn permissions_of(&self, org: Uuid, roles: &[String]) -> Result<BTreeSet<String>> {
        let mut out = BTreeSet::new();
        let mut custom = Vec::new();
        for r in roles {
            match crate::roles::built_in(r) {
                Some(perms) => out.extend(perms.iter().map(|p| (*p).to_owned())),
                None => custom.push(r),
            }
        }
        if !custom.is_empty() {
            for role in self.list_roles(org).await? {
                if custom.contains(&&role.name) {
                    out.extend(role.permissions);
                }
            }
        }
        Ok(out)
    }

    /// Whether `name` is a role (built in, or custom in the organization).
    pub async fn role_exists(&self, org: Uuid, name: &str) -> Result<bool> {
        if crate::roles::built_in(name).is_some() {
            return Ok(true);
        }
        match self.role(org, name).await {
            Ok(_) => Ok(true),
            Err(StoreError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
