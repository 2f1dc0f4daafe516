package volumeclient

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
)

// GiB is 2^30 bytes, the unit CloudStack sizes volumes in (a [Create]'s Size is rounded up to it).
const GiB uint64 = 1 << 30

// MaxCommandSize is the largest command body the daemon accepts (64 KiB).
const MaxCommandSize = 64 << 10

// Command is one of [Create], [Attach], [Detach], [Delete], [Cancel] and [Reconcile]. The daemon
// executes each command id once: publishing the same command again (same CommandID) never
// repeats its effect, and the daemon answers with the original terminal event.
type Command interface {
	// Type is the command's type and its routing key's last word: "create", "attach", ...
	Type() string
	// Header is the part every command has.
	Header() *Common
	wire() wireCommand
}

// Common is what every command carries.
type Common struct {
	// CommandID is the idempotency key and becomes the operation id: 1–64 characters of
	// [A-Za-z0-9._:-]. Publish fills a random one when it is empty.
	CommandID string
	// CorrelationID is echoed in the events (default: the command id); at most 255 bytes.
	CorrelationID string
	// Metadata is stored with the operation and echoed in its events.
	Metadata map[string]string
	// TraceParent and TraceState are the caller's W3C trace context, sent as AMQP headers: the
	// command's events come back in the same trace (Event.TraceParent, Event.TraceState).
	TraceParent string
	TraceState  string
}

// Header returns the command's common fields, so that a function taking any [Command] can set
// its id or correlation id.
func (c *Common) Header() *Common { return c }

// Create makes a new data volume. Its completion event carries the new volume in Data.Volume
// and its id in Data.VolumeID.
type Create struct {
	Common
	// Name is the CloudStack volume name (1–255 bytes).
	Name string
	// Size in bytes (> 0); CloudStack receives whole GiB, rounded up.
	Size uint64
	// DiskOfferingID is a CloudStack disk offering (default: the zone's first customized one).
	DiskOfferingID string
	// ZoneID is a CloudStack zone (default: the daemon's zone).
	ZoneID string
}

// Attach attaches a volume to a VM. When the VM is the one the daemon runs on, the event says
// mode "host" and carries the Linux device, its persistent path and NBD export.
type Attach struct {
	Common
	VolumeID string
	VMID     string
	// DeviceID is CloudStack's deviceid (nil: CloudStack picks; 0: the root disk; 3 is
	// never valid). Use [DeviceID] to set it.
	DeviceID *uint32
}

// Detach detaches a volume from whichever VM it is attached to.
type Detach struct {
	Common
	VolumeID string
}

// Delete deletes a volume, detaching it first when it is attached.
type Delete struct {
	Common
	VolumeID string
}

// Cancel ends a pending operation (not yet started at CloudStack) as cancelled. The target's
// waiter gets its "volume.<type>.cancelled" event; cancelling an executing operation fails
// with [CodeVolumeInUse].
type Cancel struct {
	Common
	// Target is the command id of the operation to cancel.
	Target string
}

// Reconcile compares the daemon's records with CloudStack and the guest's devices, repairs
// them, and lists what it changed in the event's Data.Changes.
type Reconcile struct {
	Common
	// VMID limits the reconcile to one VM (default: every VM with mappings, and the host VM).
	VMID string
}

// Snapshot takes a CloudStack snapshot of a volume; the event carries it in Data.Snapshot.
type Snapshot struct {
	Common
	VolumeID string
	// Name becomes part of the snapshot's CloudStack name, which always contains the command
	// id (at most 180 characters; default "vd").
	Name string
}

// RevertSnapshot returns a volume to one of its snapshots. CloudStack needs the volume
// detached or its VM stopped; a refusal fails with [CodeVolumeInUse].
type RevertSnapshot struct {
	Common
	VolumeID   string
	SnapshotID string
}

// DeleteSnapshot deletes one of a volume's snapshots (one already gone completes with
// Data.AlreadyAbsent).
type DeleteSnapshot struct {
	Common
	VolumeID   string
	SnapshotID string
}

// Resize changes a volume's size. CloudStack receives whole GiB, rounded up; a smaller size
// needs ShrinkOK.
type Resize struct {
	Common
	VolumeID string
	// Size in bytes (> 0).
	Size     uint64
	ShrinkOK bool
}

// DeviceID returns a pointer to n, for [Attach].DeviceID.
func DeviceID(n uint32) *uint32 { return &n }

func (*Create) Type() string         { return "create" }
func (*Attach) Type() string         { return "attach" }
func (*Detach) Type() string         { return "detach" }
func (*Delete) Type() string         { return "delete" }
func (*Cancel) Type() string         { return "cancel" }
func (*Reconcile) Type() string      { return "reconcile" }
func (*Snapshot) Type() string       { return "snapshot" }
func (*RevertSnapshot) Type() string { return "revert_snapshot" }
func (*DeleteSnapshot) Type() string { return "delete_snapshot" }
func (*Resize) Type() string         { return "resize" }

// wireCommand is the JSON body of every command type (docs/wire.md in the daemon's repository).
type wireCommand struct {
	CommandID      string            `json:"command_id"`
	Type           string            `json:"type"`
	CorrelationID  string            `json:"correlation_id,omitempty"`
	Metadata       map[string]string `json:"metadata,omitempty"`
	Name           string            `json:"name,omitempty"`
	Size           uint64            `json:"size,omitempty"`
	DiskOfferingID string            `json:"disk_offering_id,omitempty"`
	ZoneID         string            `json:"zone_id,omitempty"`
	VolumeID       string            `json:"volume_id,omitempty"`
	VMID           string            `json:"vm_id,omitempty"`
	DeviceID       *uint32           `json:"device_id,omitempty"`
	Target         string            `json:"target,omitempty"`
	SnapshotID     string            `json:"snapshot_id,omitempty"`
	ShrinkOK       bool              `json:"shrink_ok,omitempty"`
}

func (c *Common) wireHeader(ty string) wireCommand {
	return wireCommand{CommandID: c.CommandID, Type: ty, CorrelationID: c.CorrelationID, Metadata: c.Metadata}
}

func (c *Create) wire() wireCommand {
	w := c.wireHeader(c.Type())
	w.Name, w.Size, w.DiskOfferingID, w.ZoneID = c.Name, c.Size, c.DiskOfferingID, c.ZoneID
	return w
}

func (c *Attach) wire() wireCommand {
	w := c.wireHeader(c.Type())
	w.VolumeID, w.VMID, w.DeviceID = c.VolumeID, c.VMID, c.DeviceID
	return w
}

func (c *Detach) wire() wireCommand {
	w := c.wireHeader(c.Type())
	w.VolumeID = c.VolumeID
	return w
}

func (c *Delete) wire() wireCommand {
	w := c.wireHeader(c.Type())
	w.VolumeID = c.VolumeID
	return w
}

func (c *Cancel) wire() wireCommand {
	w := c.wireHeader(c.Type())
	w.Target = c.Target
	return w
}

func (c *Reconcile) wire() wireCommand {
	w := c.wireHeader(c.Type())
	w.VMID = c.VMID
	return w
}

func (c *Snapshot) wire() wireCommand {
	w := c.wireHeader(c.Type())
	w.VolumeID, w.Name = c.VolumeID, c.Name
	return w
}

func (c *RevertSnapshot) wire() wireCommand {
	w := c.wireHeader(c.Type())
	w.VolumeID, w.SnapshotID = c.VolumeID, c.SnapshotID
	return w
}

func (c *DeleteSnapshot) wire() wireCommand {
	w := c.wireHeader(c.Type())
	w.VolumeID, w.SnapshotID = c.VolumeID, c.SnapshotID
	return w
}

func (c *Resize) wire() wireCommand {
	w := c.wireHeader(c.Type())
	w.VolumeID, w.Size, w.ShrinkOK = c.VolumeID, c.Size, c.ShrinkOK
	return w
}

var (
	commandIDPattern = regexp.MustCompile(`^[A-Za-z0-9._:-]{1,64}$`)
	uuidPattern      = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)
)

// Validate checks a command as the daemon would, so that a command the daemon would reject is
// an error before it is published. The error is an [*InvalidCommandError] naming the field.
func Validate(c Command) error {
	_, err := Encode(c)
	return err
}

type badField func(field, problem string, args ...interface{}) error

func validateFields(c Command, bad badField) error {
	uuid := func(field, v string, required bool) error {
		if v == "" && !required {
			return nil
		}
		if !uuidPattern.MatchString(v) {
			return bad(field, "%q is not a UUID", v)
		}
		return nil
	}
	switch c := c.(type) {
	case *Create:
		if len(c.Name) == 0 || len(c.Name) > 255 {
			return bad("name", "must be 1-255 bytes, is %d", len(c.Name))
		}
		if c.Size == 0 {
			return bad("size", "must be > 0 bytes")
		}
		if err := uuid("disk_offering_id", c.DiskOfferingID, false); err != nil {
			return err
		}
		return uuid("zone_id", c.ZoneID, false)
	case *Attach:
		if c.DeviceID != nil && (*c.DeviceID == 3 || *c.DeviceID > 25) {
			return bad("device_id", "%d is not a valid CloudStack deviceid (0-25, never 3)", *c.DeviceID)
		}
		if err := uuid("volume_id", c.VolumeID, true); err != nil {
			return err
		}
		return uuid("vm_id", c.VMID, true)
	case *Detach:
		return uuid("volume_id", c.VolumeID, true)
	case *Delete:
		return uuid("volume_id", c.VolumeID, true)
	case *Cancel:
		if !commandIDPattern.MatchString(c.Target) {
			return bad("target", "%q is not a command id", c.Target)
		}
	case *Reconcile:
		return uuid("vm_id", c.VMID, false)
	case *Snapshot:
		if len([]rune(c.Name)) > 180 || (c.Name != "" && strings.TrimSpace(c.Name) == "") {
			return bad("name", "must be 1-180 characters when given")
		}
		return uuid("volume_id", c.VolumeID, true)
	case *RevertSnapshot:
		if err := uuid("volume_id", c.VolumeID, true); err != nil {
			return err
		}
		return uuid("snapshot_id", c.SnapshotID, true)
	case *DeleteSnapshot:
		if err := uuid("volume_id", c.VolumeID, true); err != nil {
			return err
		}
		return uuid("snapshot_id", c.SnapshotID, true)
	case *Resize:
		if c.Size == 0 {
			return bad("size", "must be > 0 bytes")
		}
		return uuid("volume_id", c.VolumeID, true)
	default:
		return bad("type", "unknown command type %T", c)
	}
	return nil
}

// Encode validates c (see [Validate]) and returns its JSON body.
func Encode(c Command) ([]byte, error) {
	w := c.wire()
	bad := func(field, problem string, args ...interface{}) error {
		return &InvalidCommandError{CommandID: w.CommandID, Type: w.Type, Field: field, Problem: fmt.Sprintf(problem, args...)}
	}
	if !commandIDPattern.MatchString(w.CommandID) {
		return nil, bad("command_id", "%q is not 1-64 characters of [A-Za-z0-9._:-]", w.CommandID)
	}
	if len(w.CorrelationID) > 255 {
		return nil, bad("correlation_id", "is %d bytes; at most 255", len(w.CorrelationID))
	}
	if err := validateFields(c, bad); err != nil {
		return nil, err
	}
	body, err := json.Marshal(w)
	if err != nil {
		return nil, bad("", "cannot be encoded: %v", err)
	}
	if len(body) > MaxCommandSize {
		return nil, bad("", "the body is %d bytes; at most %d", len(body), MaxCommandSize)
	}
	return body, nil
}

// ParseCommand decodes and validates a command body, as the daemon would (unknown fields are
// ignored, as the daemon ignores them). It is for tools that inspect commands, such as a
// dead-letter viewer.
func ParseCommand(body []byte) (Command, error) {
	var w wireCommand
	if err := decodeInto(body, &w); err != nil {
		return nil, &InvalidCommandError{Problem: "not a command body: " + err.Error()}
	}
	common := Common{CommandID: w.CommandID, CorrelationID: w.CorrelationID, Metadata: w.Metadata}
	var c Command
	switch w.Type {
	case "create":
		c = &Create{Common: common, Name: w.Name, Size: w.Size, DiskOfferingID: w.DiskOfferingID, ZoneID: w.ZoneID}
	case "attach":
		c = &Attach{Common: common, VolumeID: w.VolumeID, VMID: w.VMID, DeviceID: w.DeviceID}
	case "detach":
		c = &Detach{Common: common, VolumeID: w.VolumeID}
	case "delete":
		c = &Delete{Common: common, VolumeID: w.VolumeID}
	case "cancel":
		c = &Cancel{Common: common, Target: w.Target}
	case "reconcile":
		c = &Reconcile{Common: common, VMID: w.VMID}
	case "snapshot":
		c = &Snapshot{Common: common, VolumeID: w.VolumeID, Name: w.Name}
	case "revert_snapshot":
		c = &RevertSnapshot{Common: common, VolumeID: w.VolumeID, SnapshotID: w.SnapshotID}
	case "delete_snapshot":
		c = &DeleteSnapshot{Common: common, VolumeID: w.VolumeID, SnapshotID: w.SnapshotID}
	case "resize":
		c = &Resize{Common: common, VolumeID: w.VolumeID, Size: w.Size, ShrinkOK: w.ShrinkOK}
	default:
		return nil, &InvalidCommandError{CommandID: w.CommandID, Field: "type", Problem: fmt.Sprintf("unknown type %q", w.Type)}
	}
	return c, Validate(c)
}

// NewCommandID returns a random command id (a UUID), what Publish uses when CommandID is empty.
func NewCommandID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic("volumeclient: the system's random source failed: " + err.Error())
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}
