package volumeclient

import (
	"bytes"
	"encoding/json"
	"fmt"
	"time"
)

// Status is where an operation stands. Every event carries a terminal one.
type Status string

const (
	StatusPending   Status = "pending"
	StatusExecuting Status = "executing"
	StatusCompleted Status = "completed"
	StatusFailed    Status = "failed"
	StatusCancelled Status = "cancelled"
)

// Code is what went wrong, as the caller can act on it (the event's error.code).
type Code string

const (
	CodeInvalidCommand             Code = "INVALID_COMMAND"
	CodeCloudStackInvalidParameter Code = "CLOUDSTACK_INVALID_PARAMETER"
	CodeCloudStackUnauthorized     Code = "CLOUDSTACK_UNAUTHORIZED"
	CodeCloudStackLimit            Code = "CLOUDSTACK_LIMIT"
	CodeCloudStackUnavailable      Code = "CLOUDSTACK_UNAVAILABLE"
	CodeCloudStackJobFailed        Code = "CLOUDSTACK_JOB_FAILED"
	CodeVolumeNotFound             Code = "VOLUME_NOT_FOUND"
	CodeSnapshotNotFound           Code = "SNAPSHOT_NOT_FOUND"
	CodeVolumeInUse                Code = "VOLUME_IN_USE"
	CodeDeviceCorrelationTimeout   Code = "DEVICE_CORRELATION_TIMEOUT"
	CodeTimeout                    Code = "TIMEOUT"
	CodeInternal                   Code = "INTERNAL"
)

// Mode says how an attached volume is reached.
type Mode string

const (
	// ModeHost: attached to the VM the daemon runs on; the Linux device is in the event.
	ModeHost Mode = "host"
	// ModeRemote: attached to another VM; no device path.
	ModeRemote Mode = "remote"
)

// Event is a completion event: a CloudEvents 1.0 structured event whose Data is the
// operation's outcome. Every operation has exactly one; a re-published copy (a duplicate
// command, or the relay's at-least-once delivery) has the same ID.
type Event struct {
	SpecVersion     string    `json:"specversion"`
	ID              string    `json:"id"`
	Source          string    `json:"source"`
	Type            string    `json:"type"` // "volume.<type>.<status>"
	Subject         string    `json:"subject,omitempty"`
	Time            time.Time `json:"time"`
	DataContentType string    `json:"datacontenttype"`
	// TraceParent and TraceState: the command's trace, with the daemon's span as parent
	// (CloudEvents distributed-tracing extension), when the command carried one.
	TraceParent string    `json:"traceparent,omitempty"`
	TraceState  string    `json:"tracestate,omitempty"`
	Data        EventData `json:"data"`
}

// EventData is the operation's outcome. Fields that do not apply to its type are empty.
type EventData struct {
	OperationID   string            `json:"operation_id"`
	CommandID     string            `json:"command_id"`
	CorrelationID string            `json:"correlation_id"`
	Type          string            `json:"type"` // the command type, or "unknown" for an unreadable one
	Status        Status            `json:"status"`
	VolumeID      string            `json:"volume_id,omitempty"`
	VMID          string            `json:"vm_id,omitempty"`
	Metadata      map[string]string `json:"metadata,omitempty"`
	Error         *EventError       `json:"error,omitempty"`
	CreatedAt     time.Time         `json:"created_at"`
	CompletedAt   time.Time         `json:"completed_at"`
	DurationMS    uint64            `json:"duration_ms"`

	// Create: the new volume.
	Volume *VolumeInfo `json:"volume,omitempty"`
	// Attach: how the volume is reached, and for ModeHost its device, persistent path and export.
	Mode           Mode       `json:"mode,omitempty"`
	DevicePath     string     `json:"device_path,omitempty"`
	ByIDPath       string     `json:"by_id_path,omitempty"`
	PersistentPath string     `json:"persistent_path,omitempty"`
	NBDExport      *NBDExport `json:"nbd_export,omitempty"`
	// Detach: the volume was not attached. Delete: the volume did not exist.
	AlreadyDetached *bool `json:"already_detached,omitempty"`
	AlreadyAbsent   *bool `json:"already_absent,omitempty"`
	// Cancel: the command id it cancelled (or tried to).
	Target string `json:"target,omitempty"`
	// Reconcile: what it repaired (empty, not nil, when nothing had drifted).
	Changes []Change `json:"changes"`
	// Snapshot and RevertSnapshot: the snapshot.
	Snapshot *SnapshotInfo `json:"snapshot,omitempty"`
	// DeleteSnapshot: the snapshot deleted (AlreadyAbsent says whether it was gone already).
	SnapshotID string `json:"snapshot_id,omitempty"`
	// Resize: the size before, in bytes (Volume has the new one).
	PreviousSize *uint64 `json:"previous_size,omitempty"`
}

// SnapshotInfo is a volume snapshot (Snapshot and RevertSnapshot events).
type SnapshotInfo struct {
	ID       string    `json:"id"`
	VolumeID string    `json:"volume_id"`
	Name     string    `json:"name"`
	State    string    `json:"state"`
	Created  time.Time `json:"created"`
}

// EventError is a failed operation's error.
type EventError struct {
	Code      Code   `json:"code"`
	Message   string `json:"message"`
	Retryable bool   `json:"retryable"`
	// Hint is a one-line recovery suggestion for the operator.
	Hint string `json:"hint"`
	// CloudStackErrorCode is CloudStack's own error code (431, ...) when CloudStack refused.
	CloudStackErrorCode *uint16 `json:"cloudstack_error_code,omitempty"`
}

// VolumeInfo is the volume a create made.
type VolumeInfo struct {
	ID     string `json:"id"`
	Name   string `json:"name"`
	Size   uint64 `json:"size"`
	ZoneID string `json:"zone_id"`
	State  string `json:"state"` // CloudStack's: Allocated, Ready, ...
}

// NBDExport is the NBD export of a host attachment; URL is the daemon's NBD_URL/<Name>.
type NBDExport struct {
	Name string `json:"name"`
	URL  string `json:"url"`
}

// Change is one repair a reconcile made.
type Change struct {
	VolumeID string `json:"volume_id"`
	VMID     string `json:"vm_id,omitempty"`
	// What is one of mapping_added, mapping_removed, mapping_moved, device_changed,
	// export_added, export_removed.
	What   string  `json:"what"`
	Before *string `json:"before,omitempty"`
	After  *string `json:"after,omitempty"`
}

// ParseEvent decodes an event body. Fields it does not know are ignored (a newer daemon may
// add some).
func ParseEvent(body []byte) (*Event, error) {
	var e Event
	if err := decodeInto(body, &e); err != nil {
		return nil, fmt.Errorf("volumeclient: not a volume event: %w", err)
	}
	if e.Data.CommandID == "" || e.ID == "" {
		return nil, fmt.Errorf("volumeclient: not a volume event: no id or data.command_id")
	}
	return &e, nil
}

func decodeInto(b []byte, v interface{}) error {
	return json.NewDecoder(bytes.NewReader(b)).Decode(v)
}

// Err is nil for a completed operation, an [*CommandError] for a failed one, and an error
// wrapping [ErrCancelled] for a cancelled one.
func (e *Event) Err() error {
	switch e.Data.Status {
	case StatusCompleted:
		return nil
	case StatusCancelled:
		return fmt.Errorf("command %s (%s): %w", e.Data.CommandID, e.Data.Type, ErrCancelled)
	case StatusFailed:
		ce := &CommandError{CommandID: e.Data.CommandID, Type: e.Data.Type, EventID: e.ID}
		if e.Data.Error != nil {
			ce.EventError = *e.Data.Error
		} else {
			ce.Code, ce.Message = CodeInternal, "the failed event has no error object"
		}
		return ce
	default:
		return fmt.Errorf("command %s: the event has status %q, not a terminal one", e.Data.CommandID, e.Data.Status)
	}
}
