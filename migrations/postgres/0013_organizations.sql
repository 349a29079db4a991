-- Organizations (tenants). Every site, gateway, resource, certificate, API key, identity
-- provider and custom role belongs to one; users belong to several through memberships, with
-- roles per organization. The default organization (fixed id) holds everything made before
-- organizations existed, and its gateways are shared: they serve every organization's resources.
CREATE TABLE organizations (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    require_second_factor BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    CONSTRAINT organizations_name_key UNIQUE (name)
);
INSERT INTO organizations (id, name, require_second_factor, created_at)
VALUES ('00000000-0000-4000-8000-000000000001', 'default', 0, CAST(EXTRACT(EPOCH FROM now()) * 1000 AS BIGINT));

-- Who belongs to which organization, with which roles (JSON array of role names).
CREATE TABLE memberships (
    org_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    roles TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (org_id, user_id)
);
CREATE INDEX memberships_user ON memberships (user_id);
INSERT INTO memberships (org_id, user_id, roles, created_at)
SELECT '00000000-0000-4000-8000-000000000001', id, roles, created_at FROM users;
-- users.roles is no longer read: roles live in memberships.
UPDATE users SET roles = '[]';

ALTER TABLE sites ADD COLUMN org_id TEXT NOT NULL DEFAULT '00000000-0000-4000-8000-000000000001';
ALTER TABLE gateways ADD COLUMN org_id TEXT NOT NULL DEFAULT '00000000-0000-4000-8000-000000000001';
ALTER TABLE resources ADD COLUMN org_id TEXT NOT NULL DEFAULT '00000000-0000-4000-8000-000000000001';
ALTER TABLE certificates ADD COLUMN org_id TEXT NOT NULL DEFAULT '00000000-0000-4000-8000-000000000001';
ALTER TABLE api_keys ADD COLUMN org_id TEXT NOT NULL DEFAULT '00000000-0000-4000-8000-000000000001';
ALTER TABLE identity_providers ADD COLUMN org_id TEXT NOT NULL DEFAULT '00000000-0000-4000-8000-000000000001';
-- Audit lines without an organization (sign-ins at control) are shown to the default one.
ALTER TABLE audit_log ADD COLUMN org_id TEXT;
CREATE INDEX audit_log_org ON audit_log (org_id, at);

-- Custom role names are unique per organization.
CREATE TABLE roles_v13 (
    org_id TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    permissions TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (org_id, name)
);
INSERT INTO roles_v13 (org_id, name, description, permissions, created_at)
SELECT '00000000-0000-4000-8000-000000000001', name, description, permissions, created_at FROM roles;
DROP TABLE roles;
ALTER TABLE roles_v13 RENAME TO roles;

-- A session started through an organization's own identity provider vouches only for that
-- organization (NULL: password, passkey, or a default-organization provider).
ALTER TABLE user_sessions ADD COLUMN org_id TEXT;
