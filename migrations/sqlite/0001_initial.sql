-- The config version: bumped in the same transaction as every change that affects a node's snapshot.
CREATE TABLE config_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO config_state (id, version) VALUES (1, 1);

-- Admin API keys: the key is kma_<id>_<secret>; only its argon2id hash is stored.
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- Agents' identities in the API. Enrollment tokens are kme_<site id>_<secret>; credentials
-- are argon2id hashes. last_status is the latest StatusReport as JSON.
CREATE TABLE sites (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    overlay_address TEXT NOT NULL,
    public_key TEXT,
    enrollment_token_hash TEXT,
    credential_hash TEXT,
    last_seen_at BIGINT,
    applied_version BIGINT,
    software_version TEXT,
    last_status TEXT,
    last_status_at BIGINT,
    created_at BIGINT NOT NULL,
    CONSTRAINT sites_name_key UNIQUE (name),
    CONSTRAINT sites_overlay_address_key UNIQUE (overlay_address)
);

CREATE TABLE gateways (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    overlay_address TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    public_key TEXT,
    enrollment_token_hash TEXT,
    credential_hash TEXT,
    last_seen_at BIGINT,
    applied_version BIGINT,
    software_version TEXT,
    last_status TEXT,
    last_status_at BIGINT,
    created_at BIGINT NOT NULL,
    CONSTRAINT gateways_name_key UNIQUE (name),
    CONSTRAINT gateways_overlay_address_key UNIQUE (overlay_address)
);

CREATE TABLE resources (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    hostname TEXT NOT NULL,
    site_id TEXT NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    target TEXT NOT NULL,
    overlay_port BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    CONSTRAINT resources_hostname_key UNIQUE (hostname),
    CONSTRAINT resources_site_port_key UNIQUE (site_id, overlay_port)
);
CREATE INDEX resources_site_id ON resources (site_id);
