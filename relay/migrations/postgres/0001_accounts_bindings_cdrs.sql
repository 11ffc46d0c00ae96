-- Accounts, registrar bindings and call-detail records (PostgreSQL).
-- Keep this file in step with ../sqlite/0001_accounts_bindings_cdrs.sql: the same tables,
-- columns and indexes, so one set of queries in relay/src/store.rs serves both.
-- Times are UTC integer milliseconds; there are no floating-point columns.

CREATE TABLE users (
    name          TEXT    NOT NULL PRIMARY KEY,
    realm         TEXT    NOT NULL,
    ha1_md5       TEXT    NOT NULL,
    ha1_sha256    TEXT    NOT NULL,
    created_at_ms BIGINT  NOT NULL,
    updated_at_ms BIGINT  NOT NULL
);

CREATE TABLE bindings (
    aor           TEXT    NOT NULL,
    contact       TEXT    NOT NULL,
    instance      TEXT,
    expires_at_ms BIGINT  NOT NULL,
    q             INTEGER,
    call_id       TEXT    NOT NULL,
    cseq          BIGINT  NOT NULL,
    source        TEXT    NOT NULL,
    updated_at_ms BIGINT  NOT NULL,
    PRIMARY KEY (aor, contact)
);
CREATE INDEX bindings_expires_at ON bindings (expires_at_ms);

CREATE TABLE cdrs (
    id            TEXT    NOT NULL PRIMARY KEY,
    call_id       TEXT    NOT NULL,
    caller        TEXT    NOT NULL,
    callee        TEXT    NOT NULL,
    created_at_ms BIGINT  NOT NULL,
    started_at_ms BIGINT,
    ended_at_ms   BIGINT,
    duration_ms   BIGINT,
    ended_by      TEXT,
    status        INTEGER,
    reason        TEXT,
    state         TEXT    NOT NULL
);
CREATE INDEX cdrs_call_id ON cdrs (call_id);
CREATE INDEX cdrs_caller_created ON cdrs (caller, created_at_ms);
CREATE INDEX cdrs_callee_created ON cdrs (callee, created_at_ms);
CREATE INDEX cdrs_created ON cdrs (created_at_ms);
-- Records a previous run left open (closed at start-up).
CREATE INDEX cdrs_open ON cdrs (state) WHERE state IN ('attempt', 'answered', 'established');
