-- The order operations were accepted in, assigned by the server (docs/wire.md (processing rule 4)): resumed
-- operations are handed to the executor in this order, never in the daemon's clock order (two
-- commands in one millisecond, or a clock stepped back, would otherwise swap an attach and the
-- detach after it).
ALTER TABLE volume_operations
    ADD COLUMN seq BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    ADD UNIQUE KEY uq_volume_operations_seq (seq);
