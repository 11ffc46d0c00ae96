-- A rule's servers either restrict the request to them (1, `relay rule add --servers`) or are
-- only tried first, before the service's other servers (0, `--prefer`).
ALTER TABLE rules ADD COLUMN servers_only BIGINT NOT NULL DEFAULT 1;
