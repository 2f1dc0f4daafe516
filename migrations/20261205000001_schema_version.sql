-- Rolling upgrades: the instance that holds the lease migrates the schema (never a standby
-- under a running active) and records here the schema version it migrated to (its highest
-- migration) and its own version, so an operator sees what runs on the database.
ALTER TABLE execution_lease
    ADD COLUMN schema_version BIGINT NULL,
    ADD COLUMN holder_version VARCHAR(64) NULL;
