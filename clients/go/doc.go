// Package volumeclient is the Go client of volume-daemon: it publishes volume commands
// (create, attach, detach, delete, cancel, reconcile) to RabbitMQ, waits for their terminal
// events, and subscribes to the event stream.
//
// A [Client] publishes with publisher confirms and the mandatory flag, so a command the broker
// could not route, or a prefix whose topology does not exist, is an error rather than a lost
// message. [Client.Publish] returns a [Pending] whose [Pending.Wait] returns the command's
// event: the client listens on its reply queue (the command's reply_to) before it publishes,
// so an event that arrives before Wait is called is kept, and a copy of an event (same id) is
// delivered once. A failed command's error is a [*CommandError] with the contract's code,
// retryable flag and hint.
//
// Publishing is idempotent on the command id: publishing a command again with the same
// CommandID (after a timeout, a crash, a lost connection) never repeats its effect at
// CloudStack, and its Wait returns the original event, with the same event id.
//
// The wire format is the daemon's docs/wire.md and asyncapi.yaml; the JSON Schemas in
// schemas/ describe every message, and this package's tests check that its types carry every
// field of real captured messages.
package volumeclient
