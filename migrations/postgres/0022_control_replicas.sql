-- Several control replicas on one database. Each replica notes itself here every second
-- (`heartbeat_at`, unix ms) and whether it holds the singleton work (`leader`, 0 or 1), and notes
-- the nodes whose sessions it holds in `node_presence`: a node is online, seen from any replica,
-- while its row names a replica whose heartbeat is fresh. Additive only (expand): replicas of
-- the version before ignore both tables.
CREATE TABLE control_replicas (
    id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    software_version TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    leader BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE node_presence (
    node_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    replica_id TEXT NOT NULL,
    since BIGINT NOT NULL
);
CREATE INDEX node_presence_replica ON node_presence (replica_id);
