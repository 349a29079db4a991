-- Enrollment tokens expire: unix ms after which the token is refused (NULL: no token).
ALTER TABLE sites ADD COLUMN enrollment_token_expires_at BIGINT;
ALTER TABLE gateways ADD COLUMN enrollment_token_expires_at BIGINT;

-- Every node's WireGuard public key, across sites and gateways: one key, one node. A hello or an
-- enrollment that claims a key another node holds fails on this table's primary key.
CREATE TABLE node_keys (
    public_key TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    CONSTRAINT node_keys_node_id_key UNIQUE (node_id)
);
INSERT INTO node_keys (public_key, node_id)
    SELECT public_key, id FROM sites WHERE public_key IS NOT NULL
    ON CONFLICT DO NOTHING;
INSERT INTO node_keys (public_key, node_id)
    SELECT public_key, id FROM gateways WHERE public_key IS NOT NULL
    ON CONFLICT DO NOTHING;
