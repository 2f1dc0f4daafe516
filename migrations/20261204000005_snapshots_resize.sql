-- The rest of the volume API (docs/wire.md): snapshots, revert, delete of a snapshot, resize
-- are operations too, and the snapshots the daemon took are recorded (the read API shows a
-- volume's snapshots; a lost createSnapshot answer is found again by the name, which contains
-- the command id).
ALTER TABLE volume_operations
    MODIFY type ENUM('create', 'attach', 'detach', 'delete', 'cancel', 'reconcile',
                     'snapshot', 'revert_snapshot', 'delete_snapshot', 'resize') NOT NULL;

CREATE TABLE snapshots (
    id           CHAR(36)     NOT NULL,
    volume_id    CHAR(36)     NOT NULL,
    name         VARCHAR(255) NOT NULL,
    state        VARCHAR(32)  NOT NULL,
    operation_id VARCHAR(64)  NULL,
    created_at   DATETIME(3)  NOT NULL,
    deleted_at   DATETIME(3)  NULL,
    PRIMARY KEY (id),
    KEY idx_snapshots_volume (volume_id, created_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
