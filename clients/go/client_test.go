package volumeclient_test

// These tests talk to a running volume-daemon, its RabbitMQ and its CloudStack simulator. The
// daemon's suite starts them (tests/e2e/go_client.rs, run by scripts/test) and sets AMQP_URL,
// AMQP_PREFIX, VM_ID (a VM of the simulator that is not the daemon's host) and
// VOLUME_EXAMPLES_DIR (messages it captured on the broker). Without them the tests fail.

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"volume-daemon/volumeclient"
)

type daemon struct {
	url, prefix, vm string
}

func needDaemon(t *testing.T) daemon {
	t.Helper()
	d := daemon{os.Getenv("AMQP_URL"), os.Getenv("AMQP_PREFIX"), os.Getenv("VM_ID")}
	if d.url == "" || d.prefix == "" || d.vm == "" {
		t.Fatal("AMQP_URL, AMQP_PREFIX and VM_ID must name a running daemon's broker, prefix and a remote VM: run these tests through the daemon's scripts/test (tests/e2e/go_client.rs)")
	}
	return d
}

func timeout(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func dial(t *testing.T, d daemon, opts *volumeclient.Options) *volumeclient.Client {
	t.Helper()
	c, err := volumeclient.Dial(timeout(t), d.url, d.prefix, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func run(t *testing.T, c *volumeclient.Client, cmd volumeclient.Command) *volumeclient.Event {
	t.Helper()
	ctx := timeout(t)
	p, err := c.Publish(ctx, cmd)
	if err != nil {
		t.Fatalf("publishing %s: %v", cmd.Type(), err)
	}
	ev, err := p.Wait(ctx)
	if err != nil {
		t.Fatalf("%s %s: %v", cmd.Type(), p.CommandID(), err)
	}
	if want := "volume." + cmd.Type() + ".completed"; ev.Type != want {
		t.Fatalf("event type %q, want %q", ev.Type, want)
	}
	return ev
}

func TestCreateAttachDetachDeleteOfARemoteAttachment(t *testing.T) {
	d := needDaemon(t)
	c := dial(t, d, nil)

	created := run(t, c, &volumeclient.Create{Name: "go-lifecycle", Size: 3*volumeclient.GiB - 1,
		Common: volumeclient.Common{Metadata: map[string]string{"caller": "go"}}})
	vol := created.Data.Volume
	if vol == nil || vol.ID == "" || vol.ID != created.Data.VolumeID || vol.Size != 3*volumeclient.GiB || vol.Name != "go-lifecycle" {
		t.Fatalf("create event's volume: %+v (volume_id %q)", vol, created.Data.VolumeID)
	}
	if created.Data.Metadata["caller"] != "go" || created.Subject != vol.ID {
		t.Fatalf("metadata %v, subject %q", created.Data.Metadata, created.Subject)
	}

	attached := run(t, c, &volumeclient.Attach{VolumeID: vol.ID, VMID: d.vm})
	if attached.Data.Mode != volumeclient.ModeRemote || attached.Data.DevicePath != "" || attached.Data.VMID != d.vm {
		t.Fatalf("attach to a remote VM: mode %q, device %q, vm %q", attached.Data.Mode, attached.Data.DevicePath, attached.Data.VMID)
	}

	detached := run(t, c, &volumeclient.Detach{VolumeID: vol.ID})
	if detached.Data.AlreadyDetached == nil || *detached.Data.AlreadyDetached {
		t.Fatalf("detach of an attached volume: already_detached %v", detached.Data.AlreadyDetached)
	}

	deleted := run(t, c, &volumeclient.Delete{VolumeID: vol.ID})
	if deleted.Data.VolumeID != vol.ID || deleted.Data.AlreadyAbsent == nil || *deleted.Data.AlreadyAbsent {
		t.Fatalf("delete: volume %q, already_absent %v", deleted.Data.VolumeID, deleted.Data.AlreadyAbsent)
	}
	for _, ev := range []*volumeclient.Event{created, attached, detached, deleted} {
		if ev.Data.CorrelationID != ev.Data.CommandID || ev.Data.Error != nil {
			t.Fatalf("%s: correlation id %q, error %+v", ev.Type, ev.Data.CorrelationID, ev.Data.Error)
		}
	}
}

// The event is already in the client's reply queue when Wait is called: Wait still returns it.
func TestAWaitStartedAfterTheEventArrivedReturnsIt(t *testing.T) {
	d := needDaemon(t)
	c := dial(t, d, nil)
	ctx := timeout(t)
	watcher := dial(t, d, nil)
	events, err := watcher.Subscribe(ctx, volumeclient.SubscribeOptions{Patterns: []string{"volume.create.*"}})
	if err != nil {
		t.Fatal(err)
	}
	defer events.Close()

	p, err := c.Publish(ctx, &volumeclient.Create{Name: "go-late-wait", Size: volumeclient.GiB})
	if err != nil {
		t.Fatal(err)
	}
	seen := nextOf(t, events, p.CommandID())
	// The daemon sends the reply_to copy in the same relay batch as the exchange's; give the
	// broker a moment to put it in the reply queue before looking.
	time.Sleep(200 * time.Millisecond)
	ev, err := p.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ev.ID != seen.ID {
		t.Fatalf("Wait returned event %s, the subscription saw %s", ev.ID, seen.ID)
	}
	// A second Wait returns the same event at once.
	again, err := p.Wait(ctx)
	if err != nil || again.ID != ev.ID {
		t.Fatalf("second Wait: %v, %v", again, err)
	}
}

func nextOf(t *testing.T, events *volumeclient.Subscription, commandID string) *volumeclient.Event {
	t.Helper()
	ctx := timeout(t)
	for {
		r, err := events.Next(ctx)
		if err != nil {
			t.Fatalf("waiting for the event of %s on the subscription: %v", commandID, err)
		}
		if err := r.Ack(); err != nil {
			t.Fatal(err)
		}
		if r.Event.Data.CommandID == commandID {
			return r.Event
		}
	}
}

// Publishing a command again (same id) does not run it again: Wait returns the original event,
// with its id. Through a server-named reply queue, one named as the daemon's REPLY_TO_ALLOWED
// allows by default, and with the events exchange bound as well (each event then arrives
// twice, the reply and the exchange's copy, and is delivered once).
func TestADuplicateCommandReturnsTheOriginalEvent(t *testing.T) {
	d := needDaemon(t)
	for name, opts := range map[string]*volumeclient.Options{
		"server-named reply queue": nil,
		"named reply queue":        {ReplyQueue: d.prefix + ".reply.go-test"},
		"bound to the events too":  {BindEvents: true},
	} {
		t.Run(name, func(t *testing.T) {
			c := dial(t, d, opts)
			if opts != nil && opts.ReplyQueue != "" && c.ReplyQueue() != opts.ReplyQueue {
				t.Fatalf("reply queue %q", c.ReplyQueue())
			}
			id := "go-dup-" + volumeclient.NewCommandID()
			first := run(t, c, &volumeclient.Create{Common: volumeclient.Common{CommandID: id}, Name: "go-dup", Size: volumeclient.GiB})
			again := run(t, c, &volumeclient.Create{Common: volumeclient.Common{CommandID: id}, Name: "go-dup", Size: volumeclient.GiB})
			if again.ID != first.ID || again.Data.VolumeID != first.Data.VolumeID {
				t.Fatalf("re-published: event %s volume %s; first: event %s volume %s",
					again.ID, again.Data.VolumeID, first.ID, first.Data.VolumeID)
			}
		})
	}
}

func TestACommandsTraceComesBackOnItsEvent(t *testing.T) {
	d := needDaemon(t)
	c := dial(t, d, nil)
	const parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	e := run(t, c, &volumeclient.Create{
		Common: volumeclient.Common{TraceParent: parent, TraceState: "congo=t61rcWkgMzE"},
		Name:   "go-traced",
		Size:   volumeclient.GiB,
	})
	if !strings.Contains(e.TraceParent, "4bf92f3577b34da6a3ce929d0e0e4736") || e.TraceParent == parent {
		t.Fatalf("the event's traceparent %q: the same trace, the daemon's span as parent", e.TraceParent)
	}
	if e.TraceState != "congo=t61rcWkgMzE" {
		t.Fatalf("tracestate %q", e.TraceState)
	}
}

func TestAFailedCommandReturnsItsCodeAndHint(t *testing.T) {
	d := needDaemon(t)
	c := dial(t, d, nil)
	ctx := timeout(t)
	cases := []struct {
		cmd  volumeclient.Command
		code volumeclient.Code
	}{
		{&volumeclient.Create{Name: "go-bad-offering", Size: volumeclient.GiB, DiskOfferingID: volumeclient.NewCommandID()}, volumeclient.CodeCloudStackInvalidParameter},
		{&volumeclient.Attach{VolumeID: volumeclient.NewCommandID(), VMID: d.vm}, volumeclient.CodeVolumeNotFound},
		{&volumeclient.Cancel{Target: "go-no-such-command"}, volumeclient.CodeInvalidCommand},
	}
	for _, tc := range cases {
		p, err := c.Publish(ctx, tc.cmd)
		if err != nil {
			t.Fatal(err)
		}
		ev, err := p.Wait(ctx)
		var failed *volumeclient.CommandError
		if !errors.As(err, &failed) {
			t.Fatalf("%s: want a *CommandError, got %v", tc.cmd.Type(), err)
		}
		if failed.Code != tc.code || failed.Hint == "" || failed.Message == "" || failed.CommandID != p.CommandID() {
			t.Fatalf("%s: %+v, want code %s with a hint", tc.cmd.Type(), failed, tc.code)
		}
		if ev == nil || ev.Data.Status != volumeclient.StatusFailed || ev.Type != "volume."+tc.cmd.Type()+".failed" {
			t.Fatalf("%s: event %+v", tc.cmd.Type(), ev)
		}
		if !strings.Contains(err.Error(), string(tc.code)) || !strings.Contains(err.Error(), failed.Hint) {
			t.Fatalf("the error's text names neither code nor hint: %v", err)
		}
	}
}

func TestAReconcileOfAnUndisturbedVMReportsNoChange(t *testing.T) {
	d := needDaemon(t)
	ev := run(t, dial(t, d, nil), &volumeclient.Reconcile{VMID: d.vm})
	if ev.Data.Changes == nil || len(ev.Data.Changes) != 0 {
		t.Fatalf("changes %#v, want an empty list", ev.Data.Changes)
	}
}

// A prefix with no exchange, and an exchange with no queue bound, are errors, not lost
// commands; the client publishes again once the topology exists.
func TestMissingTopologyAndUnroutableCommandsAreErrors(t *testing.T) {
	d := needDaemon(t)
	ctx := timeout(t)
	prefix := d.prefix + ".go-" + volumeclient.NewCommandID()[:8]
	c := dial(t, d, &volumeclient.Options{})
	other, err := volumeclient.Dial(ctx, d.url, prefix, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	admin := adminChannel(t, d)
	t.Cleanup(func() {
		admin.QueueDelete(prefix+".commands", false, false, false)
		admin.QueueDelete(prefix+".commands.dead", false, false, false)
		for _, x := range []string{".commands", ".events", ".commands.dlx"} {
			admin.ExchangeDelete(prefix+x, false, false)
		}
	})

	_, err = other.Publish(ctx, &volumeclient.Detach{VolumeID: volumeclient.NewCommandID()})
	if !errors.Is(err, volumeclient.ErrTopologyMissing) || !strings.Contains(err.Error(), prefix+".commands") {
		t.Fatalf("publish to a prefix with no exchange: %v", err)
	}

	if err := admin.ExchangeDeclare(prefix+".commands", "topic", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	_, err = other.Publish(ctx, &volumeclient.Detach{VolumeID: volumeclient.NewCommandID()})
	if !errors.Is(err, volumeclient.ErrUnroutable) {
		t.Fatalf("publish to an exchange with no queue: %v", err)
	}

	if err := other.DeclareTopology(ctx); err != nil {
		t.Fatal(err)
	}
	p, err := other.Publish(ctx, &volumeclient.Detach{VolumeID: volumeclient.NewCommandID()})
	if err != nil {
		t.Fatalf("publish once the topology exists: %v", err)
	}
	p.Stop()
	if q, err := admin.QueueDeclarePassive(prefix+".commands", true, false, false, false, amqp.Table{"x-queue-type": "quorum"}); err != nil || q.Messages != 1 {
		t.Fatalf("the commands queue holds %d messages (%v), want the one routed command", q.Messages, err)
	}
	// The daemon's own client is unaffected by the other prefix's errors.
	run(t, c, &volumeclient.Reconcile{VMID: d.vm})
}

func adminChannel(t *testing.T, d daemon) *amqp.Channel {
	t.Helper()
	conn, err := amqp.Dial(strings.Split(d.url, ",")[0])
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	return ch
}

// A list of URLs is tried in order: a dead first address does not stop the client.
func TestAURLListSkipsADeadAddress(t *testing.T) {
	d := needDaemon(t)
	list := d
	list.url = "amqp://guest:secret@127.0.0.1:1/%2f," + d.url
	c := dial(t, list, nil)
	if c.Address() != volumeclient.Redact(strings.Split(d.url, ",")[0]) {
		t.Fatalf("connected to %s", c.Address())
	}
	run(t, c, &volumeclient.Reconcile{VMID: d.vm})

	_, err := volumeclient.Dial(timeout(t), "amqp://guest:secret@127.0.0.1:1/%2f", d.prefix, nil)
	if err == nil || !strings.Contains(err.Error(), "127.0.0.1:1") || strings.Contains(err.Error(), "secret") {
		t.Fatalf("dialing a dead address: %v (it must name the address and hide the password)", err)
	}
}

// Wait ends with ErrClosed, not a hang, when the client is closed under it.
func TestAWaitEndsWhenTheClientCloses(t *testing.T) {
	d := needDaemon(t)
	c, err := volumeclient.Dial(timeout(t), d.url, d.prefix, nil)
	if err != nil {
		t.Fatal(err)
	}
	// A cancel of an unknown command fails at once; its event may or may not beat the close.
	p, err := c.Publish(timeout(t), &volumeclient.Cancel{Target: "go-closing"})
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	_, err = p.Wait(timeout(t))
	var failed *volumeclient.CommandError
	if !errors.Is(err, volumeclient.ErrClosed) && !errors.As(err, &failed) {
		t.Fatalf("Wait after Close: %v", err)
	}
	if _, err := c.Publish(timeout(t), &volumeclient.Reconcile{}); !errors.Is(err, volumeclient.ErrClosed) {
		t.Fatalf("Publish after Close: %v", err)
	}
}

// The read API shows what the commands did: the operations, the volume's mapping, the
// daemon's role; an unknown id is nil, a malformed one a ReadError naming the status.
func TestTheReadAPIShowsWhatTheCommandsDid(t *testing.T) {
	d := needDaemon(t)
	base := os.Getenv("VOLUME_API_URL")
	if base == "" {
		t.Fatal("VOLUME_API_URL must name the daemon's HTTP address (tests/e2e/go_client.rs)")
	}
	c := dial(t, d, nil)
	api := volumeclient.NewReadAPI(base, nil)
	ctx := timeout(t)
	created := run(t, c, &volumeclient.Create{Name: "go-read-api", Size: 1 << 30})
	volume := created.Data.Volume.ID
	run(t, c, &volumeclient.Attach{VolumeID: volume, VMID: d.vm})

	op, err := api.Operation(ctx, created.Data.CommandID)
	if err != nil || op == nil || op.Status != volumeclient.StatusCompleted || op.Type != "create" {
		t.Fatalf("operation %+v, %v", op, err)
	}
	view, err := api.Volume(ctx, volume)
	if err != nil || view == nil || view.Mapping == nil || view.Mapping.VMID != d.vm {
		t.Fatalf("volume %+v, %v", view, err)
	}
	ops, err := api.Operations(ctx, volumeclient.OperationFilter{VolumeID: volume, PageSize: 1})
	if err != nil || len(ops) != 2 {
		t.Fatalf("operations of %s (one per page): %+v, %v", volume, ops, err)
	}
	if _, err := api.Exports(ctx); err != nil {
		t.Fatal(err)
	}
	ready, err := api.Status(ctx)
	if err != nil || ready.Role != "active" || ready.Components["database"] != "up" {
		t.Fatalf("readiness %+v, %v", ready, err)
	}
	if none, err := api.Operation(ctx, "go-no-such-operation"); none != nil || err != nil {
		t.Fatalf("unknown operation: %+v, %v", none, err)
	}
	var bad *volumeclient.ReadError
	if _, err := api.Volume(ctx, "not-a-uuid"); !errors.As(err, &bad) || bad.Status != 400 || bad.Code != "BAD_REQUEST" {
		t.Fatalf("malformed volume id: %v", err)
	}
	run(t, c, &volumeclient.Detach{VolumeID: volume})
	run(t, c, &volumeclient.Delete{VolumeID: volume})
}
