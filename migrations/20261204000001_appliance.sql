-- The appliance a database belongs to (one row): appliances share a database server, each
-- with its own database, and a daemon refuses to start on another appliance's.
CREATE TABLE appliance (
    id TINYINT UNSIGNED NOT NULL PRIMARY KEY,
    amqp_prefix VARCHAR(255) NOT NULL,
    host_vm_id CHAR(36) NULL,
    created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    CONSTRAINT appliance_is_one_row CHECK (id = 1)
) ENGINE = InnoDB;
