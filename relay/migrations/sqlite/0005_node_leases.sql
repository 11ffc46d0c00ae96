-- Several relays on one database: each running relay holds the lease of its node id, renewed
-- by a heartbeat, so a second relay with the same node id refuses to start while the first
-- lives. `instance` names one run of a relay; a record's `instance` is the run that keeps it:
-- a takeover moves open records to the new run in one statement, and a run that lost its
-- lease can no longer change them. Kept identical in ../sqlite and ../postgres.
CREATE TABLE relay_nodes (
    node_id       TEXT   NOT NULL PRIMARY KEY,
    instance      TEXT   NOT NULL,
    host          TEXT   NOT NULL,
    pid           BIGINT NOT NULL,
    sip           TEXT   NOT NULL,
    started_at_ms BIGINT NOT NULL,
    heartbeat_ms  BIGINT NOT NULL
);

ALTER TABLE cdrs ADD COLUMN instance TEXT;

-- Settings of the relay that serves this database, for the admin commands: `domain` (the realm
-- new accounts must carry).
CREATE TABLE relay_settings (
    name          TEXT   NOT NULL PRIMARY KEY,
    value         TEXT   NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
