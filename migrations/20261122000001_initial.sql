-- volume-daemon schema (CONTRACT §5). Runs on MariaDB 10.6+ and MySQL 8.
-- Timestamps are UTC with millisecond precision.

-- One row per accepted command; id = command_id, the idempotency key.
CREATE TABLE volume_operations (
    id                VARCHAR(64)  NOT NULL,
    type              ENUM('create', 'attach', 'detach', 'delete') NOT NULL,
    status            ENUM('pending', 'executing', 'completed', 'failed', 'cancelled') NOT NULL,
    volume_id         CHAR(36)     NULL,
    vm_id             CHAR(36)     NULL,
    correlation_id    VARCHAR(255) NULL,
    reply_to          VARCHAR(255) NULL,
    request           JSON         NOT NULL,
    response          JSON         NULL,
    error             TEXT         NULL,
    error_code        VARCHAR(64)  NULL,
    cloudstack_job_id VARCHAR(64)  NULL,
    attempts          INT UNSIGNED NOT NULL DEFAULT 0,
    -- The terminal event's id, so a duplicate command re-publishes the same event.
    event_id          CHAR(36)     NULL,
    created_at        DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    updated_at        DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    started_at        DATETIME(3)  NULL,
    completed_at      DATETIME(3)  NULL,
    PRIMARY KEY (id),
    KEY idx_volume_operations_status (status, created_at),
    KEY idx_volume_operations_volume (volume_id, created_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Where each attached volume is. Two volumes never share a device on one VM; remote
-- attachments have no device path (NULLs do not collide in a UNIQUE key).
CREATE TABLE device_mappings (
    id                     BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    volume_id              CHAR(36)     NOT NULL,
    vm_id                  CHAR(36)     NOT NULL,
    operation_mode         ENUM('oma', 'failover') NOT NULL,
    device_path            VARCHAR(255) NULL,
    by_id_path             VARCHAR(255) NULL,
    serial                 VARCHAR(64)  NULL,
    cloudstack_device_id   INT UNSIGNED NULL,
    cloudstack_state       VARCHAR(32)  NOT NULL,
    linux_state            VARCHAR(32)  NOT NULL,
    size                   BIGINT UNSIGNED NULL,
    persistent_device_name VARCHAR(255) NULL,
    symlink_path           VARCHAR(255) NULL,
    last_sync              DATETIME(3)  NULL,
    created_at             DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    updated_at             DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    UNIQUE KEY uq_device_mappings_volume (volume_id),
    UNIQUE KEY uq_device_mappings_vm_device (vm_id, device_path)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- CloudStack connection settings, used when CLOUDSTACK_API_URL is not set. The active row is
-- re-read for every operation, so rotated keys apply without a restart.
CREATE TABLE ossea_configs (
    id         BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    name       VARCHAR(255) NOT NULL,
    api_url    VARCHAR(1024) NOT NULL,
    api_key    VARCHAR(1024) NOT NULL,
    secret_key VARCHAR(1024) NOT NULL,
    domain     VARCHAR(255) NULL,
    zone       VARCHAR(255) NULL,
    oma_vm_id  CHAR(36)     NULL,
    is_active  BOOLEAN      NOT NULL DEFAULT FALSE,
    created_at DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    updated_at DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    UNIQUE KEY uq_ossea_configs_name (name)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Events to publish, written in the same transaction as the result they announce. The relay
-- claims unpublished rows with FOR UPDATE SKIP LOCKED and sets published_at only after the
-- broker confirmed. A re-published event is a new row with the same event_id.
CREATE TABLE outbox (
    id             BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    event_id       CHAR(36)     NOT NULL,
    exchange       VARCHAR(255) NOT NULL,
    routing_key    VARCHAR(255) NOT NULL,
    payload        LONGTEXT     NOT NULL,
    correlation_id VARCHAR(255) NULL,
    reply_to       VARCHAR(255) NULL,
    created_at     DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    published_at   DATETIME(3)  NULL,
    PRIMARY KEY (id),
    KEY idx_outbox_unpublished (published_at, id),
    KEY idx_outbox_event (event_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
