-- Passkeys (WebAuthn credentials). passkey is webauthn-rs's Passkey as JSON (public key, counter;
-- no secret); cred_id its credential id (base64url), unique across users.
CREATE TABLE passkeys (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    name TEXT NOT NULL,
    cred_id TEXT NOT NULL UNIQUE,
    passkey TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT
);
CREATE INDEX passkeys_user ON passkeys (user_id);

-- WebAuthn ceremonies in progress: the challenge state, kept server side (in the store every
-- replica shares) and taken exactly once, so an answer cannot be replayed.
CREATE TABLE passkey_challenges (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
