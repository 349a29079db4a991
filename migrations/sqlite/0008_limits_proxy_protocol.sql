-- Per-resource limits the gateways enforce (JSON of proto::Limits; NULL: the gateways' own), and
-- the PROXY protocol v2 header to TCP targets: on the resource for every target, and per extra
-- target to say otherwise (NULL: as the resource).
ALTER TABLE resources ADD COLUMN limits TEXT;
ALTER TABLE resources ADD COLUMN proxy_protocol BIGINT NOT NULL DEFAULT 0;
ALTER TABLE resource_targets ADD COLUMN proxy_protocol BIGINT;
