-- Custom roles: a name and the permissions it gives (JSON array of names such as
-- "resource:write"). The built-in roles (owner, admin, member, viewer) are not stored; a user's
-- permissions are the union of their roles'.
CREATE TABLE roles (
    name TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    permissions TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
