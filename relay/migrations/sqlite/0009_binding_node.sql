-- Which relay took the REGISTER that made or last refreshed a binding (its node id), so that
-- with several relays on one database only that relay moves the device (`relay drain`).
-- Kept identical in ../sqlite and ../postgres.
ALTER TABLE bindings ADD COLUMN node TEXT;
