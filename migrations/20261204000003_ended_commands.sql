-- Idempotency outlives retention (docs/wire.md (processing rule 2)): when the retention sweep deletes an
-- ended operation, what a duplicate of its command needs stays here, as long as the database
-- lives: the command id, its type and its terminal event (the same event id is published again).
-- About 1–2 KiB a command; nothing else of the operation is kept.
CREATE TABLE ended_commands (
    id            VARCHAR(64)  NOT NULL,
    type          VARCHAR(32)  NOT NULL,
    event_payload LONGTEXT     NULL,
    completed_at  DATETIME(3)  NULL,
    swept_at      DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
