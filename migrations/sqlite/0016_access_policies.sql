-- Access policies reusable across resources: a resource may follow one (policy_id) and lay its
-- own access fields over it (resources.access, the per-resource overrides).
CREATE TABLE access_policies (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    name TEXT NOT NULL,
    access TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (org_id, name)
);
ALTER TABLE resources ADD COLUMN policy_id TEXT;
CREATE INDEX resources_policy ON resources (policy_id);
