-- Ways into one resource without an account: a password or PIN per resource, and one-time
-- codes sent by e-mail to addresses its policy lists.
--
-- A resource has at most one live passcode (replaced_at NULL). The browser that enters it gets a
-- session token whose `sid` is the passcode's id, so replacing or removing the passcode ends
-- those sessions at every gateway (control lists it among revoked sessions while such tokens
-- may live). Its tokens also name the resource (`sub`), so a resource deleted and made again
-- under the same hostname takes none of them.
CREATE TABLE resource_passcodes (
    id TEXT PRIMARY KEY,
    resource_id TEXT NOT NULL REFERENCES resources (id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    hash TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    replaced_at BIGINT
);
CREATE UNIQUE INDEX resource_passcodes_live ON resource_passcodes (resource_id)
    WHERE replaced_at IS NULL;

-- A code sent by e-mail: its digest, for one address and resource, until it expires, is used,
-- or has been guessed wrong too often.
CREATE TABLE email_codes (
    id TEXT PRIMARY KEY,
    resource_id TEXT NOT NULL REFERENCES resources (id) ON DELETE CASCADE,
    email TEXT NOT NULL,
    hash TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    used_at BIGINT
);
CREATE INDEX email_codes_expires ON email_codes (expires_at);
