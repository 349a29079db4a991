-- Certificates control orders by ACME or was given, once for all gateways. Private keys are sealed
-- with the secrets key (never stored in the clear); `names` is a JSON array.
CREATE TABLE certificates (
    id TEXT PRIMARY KEY,
    names TEXT NOT NULL,
    source TEXT NOT NULL,
    challenge TEXT,
    status TEXT NOT NULL,
    chain_pem TEXT,
    key_sealed TEXT,
    not_before BIGINT,
    not_after BIGINT,
    next_attempt_at BIGINT,
    failures BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    lease_until BIGINT,
    issued_at BIGINT,
    created_at BIGINT NOT NULL,
    auto_resource BIGINT NOT NULL DEFAULT 0
);
-- Answers to ACME challenges in flight, pushed to every gateway.
CREATE TABLE acme_challenges (
    id TEXT PRIMARY KEY,
    certificate_id TEXT NOT NULL REFERENCES certificates (id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    token TEXT NOT NULL,
    value TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
-- ACME accounts, by directory URL; credentials sealed.
CREATE TABLE acme_accounts (
    directory TEXT PRIMARY KEY,
    credentials_sealed TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
