-- Application charges: what application servers charge users for within sessions, once per
-- (application server, idempotency key) whichever channel brought them (gRPC, an INFO, the
-- 200 OK for BYE). Kept identical in ../sqlite and ../postgres. Money is integer minor units.
-- A row is both the idempotency key and the ledger line: it is written only when the charge is
-- accepted, and the key lives as long as the line (that is the retention of keys).

CREATE TABLE charges (
    id               TEXT   NOT NULL PRIMARY KEY,
    appserver        TEXT   NOT NULL,
    idempotency_key  TEXT   NOT NULL,
    -- SHA-256 of the charge as sent: a retry with the same key must match it.
    fingerprint      TEXT   NOT NULL,
    session_id       TEXT   NOT NULL,
    user_name        TEXT   NOT NULL,
    service          TEXT,
    kind             TEXT   NOT NULL,
    refunds          TEXT,
    item_id          TEXT   NOT NULL,
    item_name        TEXT   NOT NULL,
    description      TEXT,
    unit_price_minor BIGINT NOT NULL,
    quantity         BIGINT NOT NULL,
    amount_minor     BIGINT NOT NULL,
    currency         TEXT   NOT NULL,
    occurred_at_ms   BIGINT NOT NULL,
    recorded_at_ms   BIGINT NOT NULL,
    -- 'grpc', 'info' or 'bye'.
    channel          TEXT   NOT NULL,
    UNIQUE (appserver, idempotency_key)
);
CREATE INDEX charges_user ON charges (user_name, occurred_at_ms);
CREATE INDEX charges_appserver ON charges (appserver, occurred_at_ms);
CREATE INDEX charges_session ON charges (session_id);

-- The SHA-256 (hex) of an application server's billing token; the token itself is never stored.
ALTER TABLE users ADD COLUMN token_sha256 TEXT;
-- The operator's fee on what an application server earns, in hundredths of a percent.
ALTER TABLE users ADD COLUMN fee_basis_points BIGINT NOT NULL DEFAULT 0;
CREATE INDEX users_token ON users (token_sha256);

-- Optional limits on application charges in a service's sessions (minor units): one line
-- (price x quantity), and all lines of one session.
ALTER TABLE services ADD COLUMN max_charge_minor BIGINT;
ALTER TABLE services ADD COLUMN max_session_charges_minor BIGINT;
