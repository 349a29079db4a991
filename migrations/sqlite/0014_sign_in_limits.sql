-- The per-address sign-in rate limit, shared by every control replica: a token bucket per client
-- address (tokens left, at most the per-minute limit; when last counted, unix ms; whether the
-- last attempt got a token).
CREATE TABLE sign_in_buckets (
    ip TEXT PRIMARY KEY,
    tokens DOUBLE PRECISION NOT NULL,
    at BIGINT NOT NULL,
    granted BIGINT NOT NULL
);
CREATE INDEX sign_in_buckets_at ON sign_in_buckets (at);
