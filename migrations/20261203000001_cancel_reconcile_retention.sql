-- The operator's view (CONTRACT §3, §6): `cancel` and `reconcile` are operations too, and the
-- retention sweep deletes ended operations by `completed_at` (and published outbox rows by
-- `published_at`, already indexed) in small batches.
ALTER TABLE volume_operations
    MODIFY type ENUM('create', 'attach', 'detach', 'delete', 'cancel', 'reconcile') NOT NULL,
    ADD KEY idx_volume_operations_completed (completed_at),
    ADD KEY idx_volume_operations_vm (vm_id, created_at),
    ADD KEY idx_volume_operations_created (created_at, id);

-- The failed event's whole error object (code, message, retryable, hint, CloudStack's code),
-- served by the read API; `error` and `error_code` keep their meaning.
ALTER TABLE volume_operations ADD COLUMN error_detail JSON NULL;

-- The terminal event itself, so a duplicate command re-publishes it (same id) after the
-- retention sweep deleted its outbox row.
ALTER TABLE volume_operations ADD COLUMN event_payload LONGTEXT NULL;
