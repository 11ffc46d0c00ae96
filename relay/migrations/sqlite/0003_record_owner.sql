-- Which relay keeps a session's record (its node id): after a restart a relay resumes or
-- closes only its own open records, never those of another relay sharing the database.
-- Records written before this column existed have none and belong to whoever restarts first.
ALTER TABLE cdrs ADD COLUMN owner TEXT;
CREATE INDEX cdrs_owner_state ON cdrs (owner, state);
