-- The old Go daemon's operations, kept verbatim as history by `volume-daemon import-legacy`
-- (docs/configuration.md): its ids, types (`cleanup` included), statuses, bodies and times.
CREATE TABLE legacy_operations (
    id           VARCHAR(64)  NOT NULL,
    type         VARCHAR(32)  NOT NULL,
    status       VARCHAR(32)  NOT NULL,
    volume_id    VARCHAR(64)  NULL,
    vm_id        VARCHAR(64)  NULL,
    request      LONGTEXT     NULL,
    response     LONGTEXT     NULL,
    error        TEXT         NULL,
    created_at   DATETIME(3)  NULL,
    completed_at DATETIME(3)  NULL,
    imported_at  DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- The old daemon's ended create, attach, detach and delete operations are also operations here
-- (the read API shows `"imported": true`), each with a stored terminal event of a stable id, so
-- a duplicate of its command is answered like any other.
ALTER TABLE volume_operations ADD COLUMN imported BOOLEAN NOT NULL DEFAULT FALSE;
