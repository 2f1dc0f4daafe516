-- One NBD export per host attachment (CONTRACT §5, §8): the entry `export_name` in
-- NBD_EXPORT_DIR is a symlink to `target_path` (the volume's persistent path). A re-attach
-- reuses the volume's row; a detach from the host VM or a delete marks it `removed`.
CREATE TABLE nbd_exports (
    id          BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    volume_id   CHAR(36)        NOT NULL,
    export_name VARCHAR(255)    NOT NULL,
    target_path VARCHAR(1024)   NOT NULL,
    status      ENUM('active', 'removed') NOT NULL,
    created_at  DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    updated_at  DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    UNIQUE KEY uq_nbd_exports_volume (volume_id),
    UNIQUE KEY uq_nbd_exports_name (export_name)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
