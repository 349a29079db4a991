-- Agent sessions: an agentapi server (wrapping an AI coding agent) that an edge agent runs for a
-- user (scope 'user') or a team (scope 'team', team_id a role name in the organization). Control
-- keeps them here; the agent's status reports move `status`; an ended session (stopped or failed)
-- leaves the agent's snapshot. The environment and the share token are sealed with control's
-- secrets key; the share link is one per session, checked by gateways against its digest.
CREATE TABLE agent_sessions (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    user_id TEXT,
    scope TEXT NOT NULL,
    team_id TEXT,
    site_id TEXT NOT NULL,
    status TEXT NOT NULL,
    tags TEXT NOT NULL,
    params TEXT NOT NULL,
    env_sealed TEXT,
    ttl_secs BIGINT,
    port BIGINT,
    reason TEXT,
    agent_status TEXT,
    started_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    last_message_at BIGINT NOT NULL,
    ended_at BIGINT,
    share_sealed TEXT,
    share_digest TEXT,
    share_created_by TEXT,
    share_created_at BIGINT,
    share_expires_at BIGINT
);
CREATE INDEX agent_sessions_org ON agent_sessions (org_id, started_at);
CREATE INDEX agent_sessions_site ON agent_sessions (site_id, status);
