-- Raw TCP resources: no hostname, a public port on every gateway. SQLite cannot drop NOT NULL, so
-- the table is rebuilt.
CREATE TABLE resources_v4 (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    hostname TEXT,
    site_id TEXT NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    target TEXT NOT NULL,
    overlay_port BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    protocol TEXT NOT NULL DEFAULT 'http',
    public_port BIGINT,
    CONSTRAINT resources_hostname_key UNIQUE (hostname),
    CONSTRAINT resources_site_port_key UNIQUE (site_id, overlay_port),
    CONSTRAINT resources_public_port_key UNIQUE (public_port)
);
INSERT INTO resources_v4 (id, name, hostname, site_id, target, overlay_port, created_at)
    SELECT id, name, hostname, site_id, target, overlay_port, created_at FROM resources;
DROP TABLE resources;
ALTER TABLE resources_v4 RENAME TO resources;
CREATE INDEX resources_site_id ON resources (site_id);
