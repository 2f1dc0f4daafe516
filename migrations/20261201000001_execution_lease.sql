-- The execution lease (one row per AMQP prefix): who may execute operations, until when, and
-- the epoch of that holding. Every state write of an active instance checks, in its own
-- transaction, that the epoch is still its own (fencing); expiry is in the server's clock, so
-- a holder that vanishes without closing its connection loses the lease after its TTL.
CREATE TABLE execution_lease (
    name        VARCHAR(255)    NOT NULL,
    holder      VARCHAR(255)    NOT NULL,
    epoch       BIGINT UNSIGNED NOT NULL,
    expires_at  DATETIME(3)     NOT NULL,
    acquired_at DATETIME(3)     NULL,
    renewed_at  DATETIME(3)     NULL,
    PRIMARY KEY (name)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
