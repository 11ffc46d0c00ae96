-- Application servers, services with their tariffs, operator rules, and the session fields of
-- call-detail records (service, server, rated time charge, liveness, resumable dialog state).
-- Kept identical in ../sqlite and ../postgres. Money is integer minor units of `currency`.

-- 'user' (end users) or 'appserver' (application-server accounts).
ALTER TABLE users ADD COLUMN kind TEXT NOT NULL DEFAULT 'user';

-- Which services an application-server account may deliver (register).
CREATE TABLE appserver_services (
    account TEXT NOT NULL,
    service TEXT NOT NULL,
    PRIMARY KEY (account, service)
);

CREATE TABLE services (
    name              TEXT   NOT NULL PRIMARY KEY,
    per_minute_minor  BIGINT NOT NULL,
    setup_fee_minor   BIGINT NOT NULL,
    increment_secs    BIGINT NOT NULL,
    currency          TEXT   NOT NULL,
    fork              TEXT   NOT NULL,
    max_duration_secs BIGINT,
    created_at_ms     BIGINT NOT NULL,
    updated_at_ms     BIGINT NOT NULL
);

-- Operator rules: the first rule (lowest priority, then lowest id) whose every condition holds
-- picks the service and, optionally, the servers (comma-separated accounts, in order).
CREATE TABLE rules (
    id            BIGINT NOT NULL PRIMARY KEY,
    priority      BIGINT NOT NULL,
    conditions    TEXT   NOT NULL,
    service       TEXT   NOT NULL,
    servers       TEXT,
    created_at_ms BIGINT NOT NULL
);

-- The account whose REGISTER created the binding.
ALTER TABLE bindings ADD COLUMN account TEXT;

ALTER TABLE cdrs ADD COLUMN service TEXT;
ALTER TABLE cdrs ADD COLUMN server TEXT;
ALTER TABLE cdrs ADD COLUMN details TEXT;
ALTER TABLE cdrs ADD COLUMN charge_minor BIGINT;
ALTER TABLE cdrs ADD COLUMN currency TEXT;
ALTER TABLE cdrs ADD COLUMN billed_secs BIGINT;
-- Last sign of life of both parties (UTC ms), the end used when a party vanished.
ALTER TABLE cdrs ADD COLUMN last_alive_ms BIGINT;
-- When a relay restart found the session alive and resumed it.
ALTER TABLE cdrs ADD COLUMN resumed_at_ms BIGINT;
-- JSON: what the relay needs to keep supervising (or end) the session after a restart.
ALTER TABLE cdrs ADD COLUMN dialog TEXT;
CREATE INDEX cdrs_service_created ON cdrs (service, created_at_ms);
