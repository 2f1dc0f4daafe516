-- An event the broker keeps refusing (a nack: some queue it routes to refuses it) is given up
-- after a bounded number of tries (docs/wire.md): `publish_attempts` counts the tries the broker
-- refused or left unconfirmed, and `refused_at` records when the relay gave the event up. A
-- refused row also gets `published_at` (the relay is done with it), so it leaves the backlog
-- and the retention sweep deletes it like any other.
ALTER TABLE outbox
    ADD COLUMN publish_attempts INT UNSIGNED NOT NULL DEFAULT 0,
    ADD COLUMN refused_at DATETIME(3) NULL;
