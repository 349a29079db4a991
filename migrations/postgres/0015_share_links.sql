-- Share links: a secret URL that lets whoever opens it into one resource without an account,
-- until it expires, runs out of uses or is revoked. Each opening (a use) is counted here by control;
-- the browser then holds a session token whose `sid` is the link's id, so revoking the link ends
-- those sessions at every gateway.
CREATE TABLE share_links (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    resource_id TEXT NOT NULL REFERENCES resources (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    hash TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    max_uses BIGINT,
    uses BIGINT NOT NULL DEFAULT 0,
    revoked_at BIGINT
);
CREATE INDEX share_links_resource ON share_links (resource_id);
