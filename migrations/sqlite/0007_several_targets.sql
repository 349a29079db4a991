-- Several targets per resource: the resource's own (site_id, target, overlay_port) is the primary;
-- these are the others, each with an overlay port from its site's allocator.
CREATE TABLE resource_targets (
    id TEXT PRIMARY KEY,
    resource_id TEXT NOT NULL REFERENCES resources (id) ON DELETE CASCADE,
    site_id TEXT NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    target TEXT NOT NULL,
    overlay_port BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    CONSTRAINT resource_targets_site_port_key UNIQUE (site_id, overlay_port)
);
CREATE INDEX resource_targets_resource_id ON resource_targets (resource_id);
-- How gateways balance over the targets, sticky sessions (HTTP), and the health check agents run
-- (JSON of proto::HealthCheck; NULL: none).
ALTER TABLE resources ADD COLUMN balance TEXT NOT NULL DEFAULT 'round_robin';
ALTER TABLE resources ADD COLUMN sticky BIGINT NOT NULL DEFAULT 0;
ALTER TABLE resources ADD COLUMN health_check TEXT;
