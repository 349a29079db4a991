-- Control as an OAuth 2.1 authorization server for MCP clients (and any API resource marked
-- `mcp`): registered public clients, one-time authorization codes, and refresh tokens that rotate
-- on every use. Codes and refresh tokens are stored as digests only.
CREATE TABLE oauth_clients (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    redirect_uris TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- A code carries everything its exchange must match: client, redirect URI, PKCE challenge,
-- resource and scope. `grant_id` names the tokens it leads to, so a replayed code revokes them.
CREATE TABLE oauth_codes (
    hash TEXT PRIMARY KEY,
    grant_id TEXT NOT NULL,
    client_id TEXT NOT NULL REFERENCES oauth_clients (id) ON DELETE CASCADE,
    user_id TEXT NOT NULL,
    org_id TEXT NOT NULL,
    redirect_uri TEXT NOT NULL,
    challenge TEXT NOT NULL,
    resource TEXT NOT NULL,
    scope TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);
CREATE INDEX oauth_codes_expires ON oauth_codes (expires_at);

-- One row per refresh token; all of a grant's share `grant_id` (the `sid` of its access
-- tokens). Using one marks it used and makes the next; using a used one again revokes the grant.
CREATE TABLE oauth_refresh_tokens (
    hash TEXT PRIMARY KEY,
    grant_id TEXT NOT NULL,
    client_id TEXT NOT NULL REFERENCES oauth_clients (id) ON DELETE CASCADE,
    user_id TEXT NOT NULL,
    org_id TEXT NOT NULL,
    resource TEXT NOT NULL,
    scope TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);
CREATE INDEX oauth_refresh_tokens_grant ON oauth_refresh_tokens (grant_id);

-- Grants revoked (a replayed code or refresh token, or an administrator): their access tokens'
-- `sid` goes to gateways among the revoked sessions while such tokens may live.
CREATE TABLE oauth_revoked_grants (
    grant_id TEXT PRIMARY KEY,
    revoked_at BIGINT NOT NULL
);
