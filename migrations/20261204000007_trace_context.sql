-- The producer's W3C trace context (AMQP headers `traceparent`, `tracestate`), kept with the
-- operation so a restart or a takeover still answers in the same trace (docs/wire.md).
ALTER TABLE volume_operations
    ADD COLUMN traceparent VARCHAR(64) NULL,
    ADD COLUMN tracestate VARCHAR(512) NULL;
