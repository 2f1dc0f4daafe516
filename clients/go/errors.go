package volumeclient

import (
	"errors"
	"fmt"
)

var (
	// ErrClosed: the client's connection to the broker is closed (Close was called or the
	// broker went away). A command published before may still run: publishing it again with
	// the same CommandID on a new client is safe and returns its event.
	ErrClosed = errors.New("volumeclient: the connection to the broker is closed")
	// ErrTopologyMissing: the exchange the client needs does not exist; the daemon has not
	// declared its topology for this prefix (start the daemon, or call DeclareTopology).
	ErrTopologyMissing = errors.New("volumeclient: the daemon's exchange does not exist")
	// ErrUnroutable: the broker had no queue to route the command to (the mandatory flag
	// returned it), so nobody will execute it.
	ErrUnroutable = errors.New("volumeclient: the command was not routed to any queue")
	// ErrNacked: the broker refused the command (a negative publisher confirm).
	ErrNacked = errors.New("volumeclient: the broker refused the command")
	// ErrCancelled: the operation was cancelled by a cancel command before it started.
	ErrCancelled = errors.New("volumeclient: the operation was cancelled")
)

// InvalidCommandError is a command the daemon would reject, found before it was published.
type InvalidCommandError struct {
	CommandID string
	Type      string
	Field     string // the JSON field, "" for the whole body
	Problem   string
}

func (e *InvalidCommandError) Error() string {
	what := "invalid command"
	if e.Type != "" {
		what = "invalid " + e.Type + " command"
	}
	if e.CommandID != "" {
		what += " " + e.CommandID
	}
	if e.Field != "" {
		return fmt.Sprintf("volumeclient: %s: field %s %s", what, e.Field, e.Problem)
	}
	return fmt.Sprintf("volumeclient: %s: %s", what, e.Problem)
}

// CommandError is the outcome of a command that failed: the event's error object, with the
// command it belongs to. Use errors.As to reach it.
type CommandError struct {
	CommandID string
	Type      string
	EventID   string
	EventError
}

func (e *CommandError) Error() string {
	s := fmt.Sprintf("command %s (%s) failed: %s: %s", e.CommandID, e.Type, e.Code, e.Message)
	if e.Hint != "" {
		s += " (hint: " + e.Hint + ")"
	}
	return s
}

// BrokerError is a failure of the broker or of the connection to it, saying what the client
// was doing. It wraps the amqp091 error, and ErrTopologyMissing, ErrUnroutable, ErrNacked or
// ErrClosed when one of them is the reason.
type BrokerError struct {
	Doing string
	Err   error
}

func (e *BrokerError) Error() string { return "volumeclient: " + e.Doing + ": " + e.Err.Error() }
func (e *BrokerError) Unwrap() error { return e.Err }
