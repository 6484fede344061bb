
-- The database's clock, for leases, heartbeats and quotas: one clock for
-- every node, so that skew between machines never matters.
CREATE FUNCTION now_ms() RETURNS bigint LANGUAGE sql VOLATILE
    AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint $$;
-- Nodes of the cluster and their last heartbeat.
CREATE TABLE nodes (
    node text COLLATE "C" PRIMARY KEY,
    started_ms bigint NOT NULL,
    heartbeat_ms bigint NOT NULL,
    info json NOT NULL
);
-- Who polls (and delivers for) an instance, or runs a source's discovery:
-- the owner, the epoch (raised at every claim: the fencing token) and
-- when the lease lapses unless renewed.
CREATE TABLE lease (
    instance text COLLATE "C" PRIMARY KEY,
    owner text COLLATE "C",
    epoch bigint NOT NULL DEFAULT 0,
    until_ms bigint NOT NULL DEFAULT 0
);
CREATE INDEX lease_owner ON lease (owner);
-- Stored rate quotas (see gcra.rs) and a host's pauses and pace, shared
-- by every node.
CREATE TABLE quota (
    key text COLLATE "C" PRIMARY KEY,
    tat_ms double precision NOT NULL DEFAULT 0,
    paused_until_ms bigint NOT NULL DEFAULT 0,
    gap_ms bigint NOT NULL DEFAULT 0,
    gap_until_ms bigint NOT NULL DEFAULT 0
);
