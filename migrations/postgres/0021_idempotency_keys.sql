-- Idempotency-Key on creates (draft-ietf-httpapi-idempotency-key-header): the first answer to a
-- POST with a key, replayed to a retry with the same key by the same API key for 24 hours. The
-- body is sealed with control's secrets key: it may hold a secret shown once (an API key, an
-- enrollment token). `status` is NULL while the first request runs.
CREATE TABLE idempotency_keys (
    api_key_id TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status BIGINT,
    content_type TEXT,
    body_sealed TEXT,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (api_key_id, idem_key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
