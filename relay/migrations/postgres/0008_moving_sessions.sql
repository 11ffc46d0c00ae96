-- Service change: a session's record keeps each segment of the session (the service and details
-- in force, when it began and ended, the tariff it was rated by, its billed time and charge) as
-- a JSON array; the record's charge is their sum. NULL for a plain call and for a session that
-- never got past its set-up. Kept identical in ../sqlite and ../postgres.
ALTER TABLE cdrs ADD COLUMN segments TEXT;

-- Transfer: the session a session continues (the client moved to another service, or followed
-- its application server's REFER); NULL for a session that continues none.
ALTER TABLE cdrs ADD COLUMN transferred_from TEXT;

-- Redirects to additional servers (other relays on the same database): a new INVITE that
-- matches a rule gets 302 with the Contact of the relay named `target`, on a relay that knows
-- that name (`relay serve --additional NAME=sip:HOST:PORT`). Conditions left NULL hold always.
CREATE TABLE redirects (
    id             BIGINT NOT NULL PRIMARY KEY,
    target         TEXT   NOT NULL,
    -- The host of the caller's From URI (case-insensitive).
    caller_domain  TEXT,
    -- The service the request is for (after the rules), or the called user.
    service        TEXT,
    -- Only while the relay carries more sessions than this.
    sessions_above BIGINT,
    created_at_ms  BIGINT NOT NULL
);

-- `relay drain`: an order to move the matching sessions to an additional server. Every relay
-- of the database carries it out for the sessions it carries and leaves one report.
CREATE TABLE drains (
    id            BIGINT NOT NULL PRIMARY KEY,
    target        TEXT   NOT NULL,
    service       TEXT,
    appserver     TEXT,
    created_at_ms BIGINT NOT NULL
);

CREATE TABLE drain_reports (
    drain_id       BIGINT NOT NULL,
    node           TEXT   NOT NULL,
    -- Sessions and registered clients that moved.
    moved          BIGINT NOT NULL,
    -- Registered clients that refused the REFER: redirected on their next call instead.
    redirected     BIGINT NOT NULL,
    failed         BIGINT NOT NULL,
    -- One line per failure: the session and why.
    problems       TEXT   NOT NULL,
    reported_at_ms BIGINT NOT NULL,
    PRIMARY KEY (drain_id, node)
);

-- Auto-redial (camp-on): a caller waits for a target that is not registered. The relay keeps
-- the watch (and the dialog with the caller it reaches it by) until the target registers (then
-- it sends the caller a REFER), the caller hangs up, or the deadline passes.
CREATE TABLE watches (
    id            TEXT   NOT NULL PRIMARY KEY,
    node          TEXT   NOT NULL,
    caller        TEXT   NOT NULL,
    target        TEXT   NOT NULL,
    deadline_ms   BIGINT NOT NULL,
    -- What the relay needs to send the caller a request in the watch's dialog (JSON).
    dialog        TEXT   NOT NULL,
    created_at_ms BIGINT NOT NULL
);
