//! Agent sessions in the store: one row per session (its owner, scope, site, tags, parameters,
//! sealed environment, phase as the agent last reported it, and its share link). A session that
//! ends (deleted, or stopped or failed on its agent) leaves the agent's snapshot and the
//! gateways' route tables with the config push its change makes.

use std::collections::BTreeMap;

use kakuremichi_proto::{SessionPhase, SessionState};
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::{corrupt, now_ms, parse_uuid, Result, Store, StoreError};

const ENV_PURPOSE: &str = "agent-session-env";
const SHARE_PURPOSE: &str = "agent-session-share";

/// A session's share link, as its owner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionShareInfo {
    /// The token, when control can still open it.
    pub token: Option<String>,
    /// Its digest (what gateways compare).
    pub digest: String,
    /// Who made it.
    pub created_by: String,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms, if it expires.
    pub expires_at: Option<i64>,
}

/// One agent session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSession {
    /// Id.
    pub id: Uuid,
    /// Organization.
    pub org_id: Uuid,
    /// Who started it (`None`: an organization key).
    pub user_id: Option<Uuid>,
    /// `user` or `team`.
    pub scope: String,
    /// The team (a role name) of a team session.
    pub team_id: Option<String>,
    /// The site whose agent runs it.
    pub site_id: Uuid,
    /// `creating`, `starting`, `active`, `running`, `stopping`, `stopped` or `failed`.
    pub status: String,
    /// Free tags.
    pub tags: BTreeMap<String, String>,
    /// The start request's `params`, as sent.
    pub params: serde_json::Value,
    /// Lifetime, seconds.
    pub ttl_secs: Option<i64>,
    /// The loopback port on the agent.
    pub port: Option<i64>,
    /// Why it ended.
    pub reason: Option<String>,
    /// Unix ms.
    pub started_at: i64,
    /// Unix ms.
    pub updated_at: i64,
    /// Unix ms.
    pub last_message_at: i64,
    /// Unix ms, once ended.
    pub ended_at: Option<i64>,
    /// Its share link.
    pub share: Option<SessionShareInfo>,
}

impl AgentSession {
    /// Whether it has ended.
    pub fn ended(&self) -> bool {
        self.ended_at.is_some()
    }
}

/// What a new session is made of.
#[derive(Debug, Clone)]
pub struct NewAgentSession {
    /// Organization.
    pub org_id: Uuid,
    /// Owner.
    pub user_id: Option<Uuid>,
    /// `user` or `team`.
    pub scope: String,
    /// Team of a team session.
    pub team_id: Option<String>,
    /// The site chosen.
    pub site_id: Uuid,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Parameters.
    pub params: serde_json::Value,
    /// Lifetime.
    pub ttl_secs: Option<i64>,
}

/// A live session as the world needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSession {
    /// Id.
    pub id: Uuid,
    /// Organization.
    pub org_id: Uuid,
    /// Owner.
    pub user_id: Option<Uuid>,
    /// Team of a team session.
    pub team_id: Option<String>,
    /// Site.
    pub site_id: Uuid,
    /// Lifetime.
    pub ttl_secs: Option<u64>,
    /// Role whose env file applies on the agent (the team of a team session).
    pub env: BTreeMap<String, kakuremichi_proto::Secret>,
    /// Share digest and expiry.
    pub share: Option<(String, Option<i64>)>,
    /// The start request's `params.message`.
    pub initial_message: Option<String>,
    /// The start request's `params.oneshot`.
    pub oneshot: bool,
}

const COLUMNS: &str = "id, org_id, user_id, scope, team_id, site_id, status, tags, params, \
     ttl_secs, port, reason, started_at, updated_at, last_message_at, ended_at, share_sealed, \
     share_digest, share_created_by, share_created_at, share_expires_at";

fn opt_uuid(s: Option<String>) -> Result<Option<Uuid>> {
    s.as_deref().map(parse_uuid).transpose()
}

impl Store {
    fn row_to_session(&self, r: &AnyRow) -> Result<AgentSession> {
        let id: String = r.try_get("id")?;
        let org: String = r.try_get("org_id")?;
        let site: String = r.try_get("site_id")?;
        let tags: String = r.try_get("tags")?;
        let params: String = r.try_get("params")?;
        let digest: Option<String> = r.try_get("share_digest")?;
        let share = match digest {
            None => None,
            Some(digest) => {
                let sealed: Option<String> = r.try_get("share_sealed")?;
                let token = sealed
                    .and_then(|s| self.open_blob(SHARE_PURPOSE, &s).ok())
                    .and_then(|b| String::from_utf8(b).ok());
                Some(SessionShareInfo {
                    token,
                    digest,
                    created_by: r
                        .try_get::<Option<String>, _>("share_created_by")?
                        .unwrap_or_default(),
                    created_at: r
                        .try_get::<Option<i64>, _>("share_created_at")?
                        .unwrap_or_default(),
                    expires_at: r.try_get("share_expires_at")?,
                })
            }
        };
        Ok(AgentSession {
            id: parse_uuid(&id)?,
            org_id: parse_uuid(&org)?,
            user_id: opt_uuid(r.try_get("user_id")?)?,
            scope: r.try_get("scope")?,
            team_id: r.try_get("team_id")?,
            site_id: parse_uuid(&site)?,
            status: r.try_get("status")?,
            tags: serde_json::from_str(&tags).map_err(corrupt)?,
            params: serde_json::from_str(&params).map_err(corrupt)?,
            ttl_secs: r.try_get("ttl_secs")?,
            port: r.try_get("port")?,
            reason: r.try_get("reason")?,
            started_at: r.try_get("started_at")?,
            updated_at: r.try_get("updated_at")?,
            last_message_at: r.try_get("last_message_at")?,
            ended_at: r.try_get("ended_at")?,
            share,
        })
    }

    /// Stores a new session (status `creating`) with its environment sealed; the agent gets it
    /// with the config push this makes.
    pub async fn create_agent_session(
        &self,
        new: NewAgentSession,
        env: &BTreeMap<String, String>,
    ) -> Result<AgentSession> {
        let id = Uuid::new_v4();
        let env_sealed = if env.is_empty() {
            None
        } else {
            let json = serde_json::to_vec(env).map_err(corrupt)?;
            Some(self.seal_blob(ENV_PURPOSE, &json)?)
        };
        let now = now_ms();
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO agent_sessions (id, org_id, user_id, scope, team_id, site_id, status, \
             tags, params, env_sealed, ttl_secs, started_at, updated_at, last_message_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 'creating', $7, $8, $9, $10, $11, $11, $11)",
        )
        .bind(id.to_string())
        .bind(new.org_id.to_string())
        .bind(new.user_id.map(|u| u.to_string()))
        .bind(&new.scope)
        .bind(new.team_id.clone())
        .bind(new.site_id.to_string())
        .bind(serde_json::to_string(&new.tags).map_err(corrupt)?)
        .bind(serde_json::to_string(&new.params).map_err(corrupt)?)
        .bind(env_sealed)
        .bind(new.ttl_secs)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        self.commit_bumped(tx).await?;
        self.agent_session(new.org_id, id)
            .await?
            .ok_or(StoreError::NotFound("session"))
    }

    /// One session of `org`.
    pub async fn agent_session(&self, org: Uuid, id: Uuid) -> Result<Option<AgentSession>> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM agent_sessions WHERE id = $1 AND org_id = $2"
        ))
        .bind(id.to_string())
        .bind(org.to_string())
        .fetch_optional(&self.pool)
        .await?
        .map(|r| self.row_to_session(&r))
        .transpose()
    }

    /// The sessions of `org`, newest first.
    pub async fn agent_sessions(&self, org: Uuid) -> Result<Vec<AgentSession>> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM agent_sessions WHERE org_id = $1 ORDER BY started_at DESC, id"
        ))
        .bind(org.to_string())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| self.row_to_session(r))
        .collect()
    }

    /// How many live sessions each site runs.
    pub async fn live_sessions_per_site(&self) -> Result<BTreeMap<Uuid, i64>> {
        let mut out = BTreeMap::new();
        for r in sqlx::query(
            "SELECT site_id, COUNT(*) AS n FROM agent_sessions WHERE ended_at IS NULL \
             GROUP BY site_id",
        )
        .fetch_all(&self.pool)
        .await?
        {
            let site: String = r.try_get("site_id")?;
            out.insert(parse_uuid(&site)?, r.try_get::<i64, _>("n")?);
        }
        Ok(out)
    }

    /// Ends a session (`stopped`, or `failed` with a reason): its agent ends its process with
    /// the config push this makes. `false` when it had already ended.
    pub async fn end_agent_session(
        &self,
        org: Uuid,
        id: Uuid,
        status: &str,
        reason: Option<&str>,
    ) -> Result<bool> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let now = now_ms();
        let done = sqlx::query(
            "UPDATE agent_sessions SET status = $1, reason = COALESCE($2, reason), \
             ended_at = $3, updated_at = $3 WHERE id = $4 AND org_id = $5 AND ended_at IS NULL",
        )
        .bind(status)
        .bind(reason)
        .bind(now)
        .bind(id.to_string())
        .bind(org.to_string())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        self.commit_bumped(tx).await?;
        Ok(true)
    }

    /// Records what a site's agent reports of its sessions; returns the sessions whose status
    /// changed (as stored now). A session that ended on its agent ends here too (a config push).
    pub async fn record_session_states(
        &self,
        site: Uuid,
        states: &[SessionState],
    ) -> Result<Vec<AgentSession>> {
        if states.is_empty() {
            return Ok(Vec::new());
        }
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let now = now_ms();
        let mut changed = Vec::new();
        let mut ended = false;
        for s in states {
            let status = match (s.phase, s.agent_status.as_deref()) {
                (SessionPhase::Active, Some("running")) => "running",
                (SessionPhase::Active, _) => "active",
                (SessionPhase::Creating, _) => "creating",
                (SessionPhase::Starting, _) => "starting",
                (SessionPhase::Stopping, _) => "stopping",
                (SessionPhase::Stopped, _) => "stopped",
                (SessionPhase::Failed, _) => "failed",
            };
            let end = s.phase.ended().then_some(now);
            let done = sqlx::query(
                "UPDATE agent_sessions SET status = $1, port = $2, reason = $3, \
                 agent_status = $4, updated_at = $5, ended_at = $6 WHERE id = $7 AND site_id = $8 \
                 AND ended_at IS NULL AND (status <> $1 OR port IS NULL OR port <> $2 \
                 OR $6 IS NOT NULL)",
            )
            .bind(status)
            .bind(i64::from(s.port))
            .bind(s.reason.clone())
            .bind(s.agent_status.clone())
            .bind(now)
            .bind(end)
            .bind(s.id.to_string())
            .bind(site.to_string())
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() > 0 {
                ended |= end.is_some();
                changed.push(s.id);
            }
        }
        if ended {
            self.commit_bumped(tx).await?;
        } else {
            tx.commit().await?;
        }
        let mut out = Vec::new();
        for id in changed {
            if let Some(r) = sqlx::query(&format!(
                "SELECT {COLUMNS} FROM agent_sessions WHERE id = $1"
            ))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            {
                out.push(self.row_to_session(&r)?);
            }
        }
        Ok(out)
    }

    /// Notes a message sent to a session (`last_message_at`).
    pub async fn touch_agent_session(&self, id: Uuid) -> Result<()> {
        sqlx::query("UPDATE agent_sessions SET last_message_at = $1 WHERE id = $2")
            .bind(now_ms())
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Gives a session a share link (the token sealed, its digest for gateways); a config push.
    pub async fn set_session_share(
        &self,
        org: Uuid,
        id: Uuid,
        token: &str,
        created_by: &str,
        expires_at: Option<i64>,
    ) -> Result<()> {
        let sealed = self.seal_blob(SHARE_PURPOSE, token.as_bytes())?;
        let digest = kakuremichi_proto::identity::secret_digest(token);
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE agent_sessions SET share_sealed = $1, share_digest = $2, \
             share_created_by = $3, share_created_at = $4, share_expires_at = $5 \
             WHERE id = $6 AND org_id = $7",
        )
        .bind(sealed)
        .bind(digest)
        .bind(created_by)
        .bind(now_ms())
        .bind(expires_at)
        .bind(id.to_string())
        .bind(org.to_string())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound("session"));
        }
        self.commit_bumped(tx).await?;
        Ok(())
    }

    /// Revokes a session's share link; `false` when it had none.
    pub async fn delete_session_share(&self, org: Uuid, id: Uuid) -> Result<bool> {
        let _w = self.write.lock().await;
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE agent_sessions SET share_sealed = NULL, share_digest = NULL, \
             share_created_by = NULL, share_created_at = NULL, share_expires_at = NULL \
             WHERE id = $1 AND org_id = $2 AND share_digest IS NOT NULL",
        )
        .bind(id.to_string())
        .bind(org.to_string())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        self.commit_bumped(tx).await?;
        Ok(true)
    }

    /// The live sessions, environments opened (for the world).
    pub(crate) async fn live_sessions(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    ) -> Result<Vec<LiveSession>> {
        let rows = sqlx::query(
            "SELECT id, org_id, user_id, team_id, site_id, ttl_secs, env_sealed, share_digest, \
             share_expires_at, params FROM agent_sessions WHERE ended_at IS NULL ORDER BY started_at, id",
        )
        .fetch_all(&mut **tx)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: String = r.try_get("id")?;
            let id = parse_uuid(&id)?;
            let org: String = r.try_get("org_id")?;
            let site: String = r.try_get("site_id")?;
            let sealed: Option<String> = r.try_get("env_sealed")?;
            let env = match sealed {
                None => BTreeMap::new(),
                Some(s) => match self
                    .open_blob(ENV_PURPOSE, &s)
                    .and_then(|b| serde_json::from_slice(&b).map_err(corrupt))
                {
                    Ok(env) => env,
                    Err(e) => {
                        tracing::error!(session_id = %id, error = %e, "cannot open a session's environment: it starts without it");
                        BTreeMap::new()
                    }
                },
            };
            let digest: Option<String> = r.try_get("share_digest")?;
            let ttl: Option<i64> = r.try_get("ttl_secs")?;
            let params: String = r.try_get("params")?;
            let params = serde_json::from_str::<serde_json::Value>(&params).unwrap_or_default();
            let initial_message = params
                .get("message")
                .and_then(|m| m.as_str())
                .filter(|m| !m.is_empty())
                .map(str::to_owned);
            out.push(LiveSession {
                initial_message,
                oneshot: params.get("oneshot").and_then(|o| o.as_bool()) == Some(true),
                id,
                org_id: parse_uuid(&org)?,
                user_id: opt_uuid(r.try_get("user_id")?)?,
                team_id: r.try_get("team_id")?,
                site_id: parse_uuid(&site)?,
                ttl_secs: ttl.map(|t| t.max(0) as u64),
                env,
                share: match digest {
                    Some(d) => Some((d, r.try_get("share_expires_at")?)),
                    None => None,
                },
            });
        }
        Ok(out)
    }
}

impl Store {
    /// The sessions part of the world: live sessions, and who may reach each (its owner; for a
    /// team session the members holding the team's role, and the organization's owners and
    /// admins), among members who are not disabled.
    pub(crate) async fn sessions_world(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        host: &str,
    ) -> Result<crate::world::SessionsWorld> {
        let live = self.live_sessions(tx).await?;
        let mut members: Vec<(Uuid, Uuid, Vec<String>)> = Vec::new();
        if !live.is_empty() {
            for r in sqlx::query(
                "SELECT m.org_id, m.user_id, m.roles FROM memberships m \
                 JOIN users u ON u.id = m.user_id WHERE u.disabled = 0",
            )
            .fetch_all(&mut **tx)
            .await?
            {
                let org: String = r.try_get("org_id")?;
                let user: String = r.try_get("user_id")?;
                let roles: String = r.try_get("roles")?;
                members.push((
                    parse_uuid(&org)?,
                    parse_uuid(&user)?,
                    serde_json::from_str(&roles).map_err(corrupt)?,
                ));
            }
        }
        let mut sessions = Vec::with_capacity(live.len());
        for s in live {
            let users: Vec<Uuid> = members
                .iter()
                .filter(|(org, user, roles)| {
                    *org == s.org_id
                        && match &s.team_id {
                            None => Some(*user) == s.user_id,
                            Some(team) => roles
                                .iter()
                                .any(|r| r == team || r == "owner" || r == "admin"),
                        }
                })
                .map(|(_, user, _)| *user)
                .collect();
            sessions.push((s, users));
        }
        Ok(crate::world::SessionsWorld {
            hostname: host.to_owned(),
            control_url: self.public_url.clone(),
            sessions,
        })
    }
}
