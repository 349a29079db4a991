-- Identity: people who sign in, their sessions, and the keys that sign session tokens.
--
-- users.roles is a JSON array of role names. failed_sign_ins and locked_until implement the
-- account lockout; sessions_not_before (unix seconds) is "sign out everywhere": tokens issued
-- before it are refused by every gateway. totp_sealed is the TOTP secret (sealed); totp_last_step
-- the last time step a code was accepted for, so that no code works twice.
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    password_hash TEXT,
    roles TEXT NOT NULL,
    disabled BIGINT NOT NULL DEFAULT 0,
    failed_sign_ins BIGINT NOT NULL DEFAULT 0,
    locked_until BIGINT,
    sessions_not_before BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    totp_sealed TEXT,
    totp_last_step BIGINT NOT NULL DEFAULT 0
);

-- Control's sign-in sessions. The cookie is kms_<id>_<secret>; token_hash is its digest. A
-- deleted user's sessions stay, revoked, until they expire: gateways must keep refusing them.
CREATE TABLE user_sessions (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    token_hash TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT,
    amr TEXT NOT NULL
);
CREATE INDEX user_sessions_user ON user_sessions (user_id);

-- Ed25519 keys signing session tokens; private keys sealed. A retired key is still published
-- until the tokens it signed have expired.
CREATE TABLE signing_keys (
    kid TEXT PRIMARY KEY,
    private_sealed TEXT NOT NULL,
    public_x TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    retired_at BIGINT
);

-- Who may reach an HTTP resource (JSON of proto::identity::AccessPolicy; NULL: public).
ALTER TABLE resources ADD COLUMN access TEXT;

-- The audit log: sign-ins, refusals and every change through the API, newest last.
CREATE TABLE audit_log (
    id TEXT PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT,
    outcome TEXT NOT NULL,
    client TEXT,
    detail TEXT
);
CREATE INDEX audit_log_at ON audit_log (at);

-- The admin key set up first becomes the first user's (the owner's) first key at set-up.
ALTER TABLE api_keys ADD COLUMN user_id TEXT;
-- API keys beside the admin key: kmk_<id>_<secret>, scoped to permissions (JSON array; NULL: all,
-- as the admin key), with an expiry, the last time used, and revocation.
ALTER TABLE api_keys ADD COLUMN name TEXT;
ALTER TABLE api_keys ADD COLUMN scopes TEXT;
ALTER TABLE api_keys ADD COLUMN expires_at BIGINT;
ALTER TABLE api_keys ADD COLUMN last_used_at BIGINT;
ALTER TABLE api_keys ADD COLUMN revoked_at BIGINT;
