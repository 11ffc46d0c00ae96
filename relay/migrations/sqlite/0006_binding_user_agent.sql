-- What registered: the User-Agent of the REGISTER that made or last refreshed a binding, for
-- `relay registrations`. Kept identical in ../sqlite and ../postgres.
ALTER TABLE bindings ADD COLUMN user_agent TEXT;
