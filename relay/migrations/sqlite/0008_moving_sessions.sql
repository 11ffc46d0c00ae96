-- Service change: a session's record keeps each segment of the session (the service and details
-- in force, when it began and ended, the tariff it was rated by, its billed time and charge) as
-- a JSON array; the record's charge is their sum. NULL for a plain call and for a session that
-- never got past its set-up. Kept identical in ../sqlite and ../postgres.
ALTER TABLE cdrs ADD COLUMN segments TEXT;

-- Transfer: the session a session continues (the client moved to another service, or followed
-- its application server's REFER); NULL for a session that continues none.
ALTER TABLE cdrs ADD COLUMN transferred_from TEXT;
