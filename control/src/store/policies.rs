//! Access policies reusable across resources. A resource that follows one gets the policy's
//! fields with its own laid over them ([`AccessPolicy::overlaid_with`]); changing the policy
//! changes every such resource with one config push.

use kakuremichi_proto::identity::AccessPolicy;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};
use uuid::Uuid;

use super::{corrupt, now_ms, parse_uuid, taken, Result, Store, StoreError};

/// A named access policy of an organization.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct Policy {
    /// Id.
    pub id: Uuid,
    /// Name, unique in the organization.
    pub name: String,
    /// Who may reach the resources that follow it.
    pub access: AccessPolicy,
    /// How many resources follow it.
    pub resources: i64,
    /// Created.
    #[serde(serialize_with = "crate::times::ms")]
    #[schemars(with = "crate::times::DateTime")]
    pub created_at: i64,
}

const SELECT: &str = "SELECT p.id, p.name, p.access, p.created_at, \
     (SELECT COUNT(*) FROM resources r WHERE r.policy_id = p.id) AS used FROM access_policies p";

fn row_to_policy(r: &AnyRow) -> Result<Policy> {
    let id: String = r.try_get("id")?;
    let access: String = r.try_get("access")?;
    Ok(Policy {
        id: parse_uuid(&id)?,
        name: r.try_get("name")?,
        access: serde_json::from_str(&access).map_err(corrupt)?,
        resources: r.try_get("used")?,
        created_at: r.try_get("created_at")?,
    })
}

impl Store {
    /// Fails with `Invalid` unless `policy` is one of `org`'s.
    pub(super) async fn policy_exists(
        tx: &mut Transaction<'static, Any>,
        org: Uuid,
        policy: Uuid,
    ) -> Result<()> {
        let found: Option<String> =
            sqlx::query_scalar("SELECT id FROM access_policies WHERE id = $1 AND org_id = $2")
                .bind(policy.to_string())
                .bind(org.to_string())
                .fetch_optional(&mut **tx)
                .await?;
        match found {
            Some(_) => Ok(()),
            None => Err(StoreError::Invalid(format!(
                "policy_id: access policy {policy} does not exist"
            ))),
        }
    }

    /// Creates a policy.
    pub async fn create_policy(
        &self,
        org: Uuid,
        name: &str,
        access: &AccessPolicy,
    ) -> Result<Policy> {
        let id = Uuid::new_v4();
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO access_policies (id, org_id, name, access, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id.to_string())
        .bind(org.to_string())
        .bind(name)
        .bind(serde_json::to_string(access).map_err(corrupt)?)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(taken(|| format!("an access policy named {name:?} exists")))?;
        tx.commit().await?;
        self.get_policy(org, id).await
    }

    /// The organization's policies, by name.
    pub async fn list_policies(&self, org: Uuid) -> Result<Vec<Policy>> {
        sqlx::query(&format!("{SELECT} WHERE p.org_id = $1 ORDER BY p.name"))
            .bind(org.to_string())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(row_to_policy)
            .collect()
    }

    /// One of the organization's policies.
    pub async fn get_policy(&self, org: Uuid, id: Uuid) -> Result<Policy> {
        let row = sqlx::query(&format!("{SELECT} WHERE p.id = $1 AND p.org_id = $2"))
            .bind(id.to_string())
            .bind(org.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound("access policy"))?;
        row_to_policy(&row)
    }

    /// Renames a policy or replaces its access; every resource that follows it changes with
    /// one config push.
    pub async fn update_policy(
        &self,
        org: Uuid,
        id: Uuid,
        name: Option<&str>,
        access: Option<&AccessPolicy>,
    ) -> Result<Policy> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE access_policies SET name = COALESCE($1, name), access = COALESCE($2, access) \
             WHERE id = $3 AND org_id = $4",
        )
        .bind(name)
        .bind(
            access
                .map(|a| serde_json::to_string(a).map_err(corrupt))
                .transpose()?,
        )
        .bind(id.to_string())
        .bind(org.to_string())
        .execute(&mut *tx)
        .await
        .map_err(taken(|| {
            format!(
                "an access policy named {:?} exists",
                name.unwrap_or_default()
            )
        }))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound("access policy"));
        }
        self.commit_bumped(tx).await?;
        self.get_policy(org, id).await
    }

    /// Deletes a policy no resource follows.
    pub async fn delete_policy(&self, org: Uuid, id: Uuid) -> Result<()> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let used: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM resources WHERE policy_id = $1")
            .bind(id.to_string())
            .fetch_one(&mut *tx)
            .await?;
        let done = sqlx::query("DELETE FROM access_policies WHERE id = $1 AND org_id = $2")
            .bind(id.to_string())
            .bind(org.to_string())
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound("access policy"));
        }
        if used > 0 {
            return Err(StoreError::Conflict(format!(
                "{used} resource(s) follow this access policy: move them off it first"
            )));
        }
        tx.commit().await?;
        Ok(())
    }
}
