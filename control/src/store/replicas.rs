//! Control replicas sharing one database: each notes itself (heartbeat, whether it leads the
//! singleton work) and the nodes whose sessions it holds, so that every replica answers the same
//! about who is online. See [`crate::replicas`] for the tasks that keep these rows.

use kakuremichi_proto::NodeKind;
use sqlx::Row;
use uuid::Uuid;

use super::{parse_uuid, Result, Store};

/// A replica, as `GET /api/v1/replicas` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct ReplicaRow {
    /// Its id (new at every start).
    pub id: Uuid,
    /// The address it listens on.
    pub address: String,
    /// Its software version.
    pub software_version: String,
    /// When it started.
    #[serde(serialize_with = "crate::times::ms")]
    #[schemars(with = "crate::times::DateTime")]
    pub started_at: i64,
    /// Its last heartbeat (every second while it runs).
    #[serde(serialize_with = "crate::times::ms")]
    #[schemars(with = "crate::times::DateTime")]
    pub heartbeat_at: i64,
    /// Whether it runs the singleton work (certificate orders and renewals, credential refresh).
    pub leader: bool,
    /// Nodes whose sessions it holds.
    pub nodes: i64,
    /// Whether its heartbeat is fresh.
    pub alive: bool,
}

/// What a replica writes about itself on each heartbeat.
#[derive(Debug, Clone)]
pub struct Heartbeat<'a> {
    /// The replica.
    pub id: Uuid,
    /// Its listen address.
    pub address: &'a str,
    /// Its software version.
    pub software_version: &'a str,
    /// When it started (unix ms).
    pub started_at: i64,
    /// Whether it leads.
    pub leader: bool,
}

/// Rows per statement when presence is written in bulk.
const CHUNK: usize = 200;

impl Store {
    /// Notes replica `hb` as alive at `now`.
    pub async fn replica_heartbeat(&self, hb: &Heartbeat<'_>, now: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO control_replicas \
             (id, address, software_version, started_at, heartbeat_at, leader) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, \
             leader = excluded.leader, address = excluded.address",
        )
        .bind(hb.id.to_string())
        .bind(hb.address)
        .bind(hb.software_version)
        .bind(hb.started_at)
        .bind(now)
        .bind(i64::from(hb.leader))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Forgets replica `id` and the sessions it held (it is stopping), and replicas silent since
    /// before `stale_before` with theirs.
    pub async fn replica_gone(&self, id: Uuid, stale_before: i64) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "DELETE FROM node_presence WHERE replica_id = $1 OR replica_id IN \
             (SELECT id FROM control_replicas WHERE heartbeat_at < $2)",
        )
        .bind(id.to_string())
        .bind(stale_before)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM control_replicas WHERE id = $1 OR heartbeat_at < $2")
            .bind(id.to_string())
            .bind(stale_before)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Notes that replica `replica` now holds the sessions of `joined` and no longer those of
    /// `left` (a node that moved to another replica since keeps that replica's row).
    pub async fn presence_update(
        &self,
        replica: Uuid,
        joined: &[(Uuid, NodeKind)],
        left: &[Uuid],
        now: i64,
    ) -> Result<()> {
        if joined.is_empty() && left.is_empty() {
            return Ok(());
        }
        let replica = replica.to_string();
        let mut tx = self.pool.begin().await?;
        for chunk in joined.chunks(CHUNK) {
            // Four parameters a row.
            let mut sql = String::from(
                "INSERT INTO node_presence (node_id, kind, replica_id, since) VALUES ",
            );
            for i in 0..chunk.len() {
                if i > 0 {
                    sql.push_str(", ");
                }
                let b = i * 4;
                sql.push_str(&format!("(${}, ${}, ${}, ${})", b + 1, b + 2, b + 3, b + 4));
            }
            sql.push_str(
                " ON CONFLICT (node_id) DO UPDATE SET kind = excluded.kind, \
                 replica_id = excluded.replica_id, since = excluded.since",
            );
            let mut q = sqlx::query(&sql);
            for (id, kind) in chunk {
                q = q
                    .bind(id.to_string())
                    .bind(kind.to_string())
                    .bind(replica.clone())
                    .bind(now);
            }
            q.execute(&mut *tx).await?;
        }
        for chunk in left.chunks(CHUNK) {
            let mut sql =
                String::from("DELETE FROM node_presence WHERE replica_id = $1 AND node_id IN (");
            for i in 0..chunk.len() {
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!("${}", i + 2));
            }
            sql.push(')');
            let mut q = sqlx::query(&sql).bind(replica.clone());
            for id in chunk {
                q = q.bind(id.to_string());
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The nodes whose sessions other replicas than `me` hold, of replicas heard from since
    /// `fresh_since`.
    pub async fn remote_presence(
        &self,
        me: Uuid,
        fresh_since: i64,
    ) -> Result<Vec<(Uuid, NodeKind)>> {
        let rows = sqlx::query(
            "SELECT p.node_id, p.kind FROM node_presence p \
             JOIN control_replicas r ON r.id = p.replica_id \
             WHERE p.replica_id <> $1 AND r.heartbeat_at >= $2",
        )
        .bind(me.to_string())
        .bind(fresh_since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let id = parse_uuid(&row.try_get::<String, _>(0)?)?;
                let kind = match row.try_get::<String, _>(1)?.as_str() {
                    "gateway" => NodeKind::Gateway,
                    _ => NodeKind::Agent,
                };
                Ok((id, kind))
            })
            .collect()
    }

    /// Every replica noted, newest first; `alive` when heard from since `fresh_since`.
    pub async fn replicas(&self, fresh_since: i64) -> Result<Vec<ReplicaRow>> {
        let rows = sqlx::query(
            "SELECT r.id, r.address, r.software_version, r.started_at, r.heartbeat_at, r.leader, \
             (SELECT COUNT(*) FROM node_presence p WHERE p.replica_id = r.id) \
             FROM control_replicas r ORDER BY r.started_at DESC, r.id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let heartbeat_at: i64 = row.try_get(4)?;
                Ok(ReplicaRow {
                    id: parse_uuid(&row.try_get::<String, _>(0)?)?,
                    address: row.try_get(1)?,
                    software_version: row.try_get(2)?,
                    started_at: row.try_get(3)?,
                    heartbeat_at,
                    leader: row.try_get::<i64, _>(5)? != 0,
                    nodes: row.try_get(6)?,
                    alive: heartbeat_at >= fresh_since,
                })
            })
            .collect()
    }
}
