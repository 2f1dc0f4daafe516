package volumeclient_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"time"

	"volume-daemon/volumeclient"
)

// Create a volume and wait for it: the event carries the new volume.
func Example() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	client, err := volumeclient.Dial(ctx, os.Getenv("AMQP_URL"), os.Getenv("AMQP_PREFIX"), nil)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	pending, err := client.Publish(ctx, &volumeclient.Create{Name: "example-disk", Size: 10 * volumeclient.GiB})
	if err != nil {
		log.Fatal(err)
	}
	event, err := pending.Wait(ctx)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(event.Type, event.Data.Volume.Name, event.Data.Volume.Size)
	// Output: volume.create.completed example-disk 10737418240
}

// A failed command's error carries the contract's code, whether a retry may help, and a hint
// for the operator.
func ExampleCommandError() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	client, err := volumeclient.Dial(ctx, os.Getenv("AMQP_URL"), os.Getenv("AMQP_PREFIX"), nil)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	pending, err := client.Publish(ctx, &volumeclient.Create{
		Name:           "no-such-offering",
		Size:           volumeclient.GiB,
		DiskOfferingID: "00000000-0000-4000-8000-000000000000",
	})
	if err != nil {
		log.Fatal(err)
	}
	_, err = pending.Wait(ctx)
	var failed *volumeclient.CommandError
	if errors.As(err, &failed) {
		fmt.Println(failed.Code, failed.Retryable, failed.Hint != "")
	}
	// Output: CLOUDSTACK_INVALID_PARAMETER false true
}

// A subscriber sees every outcome and acknowledges each event once it has handled it.
func ExampleClient_Subscribe() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	client, err := volumeclient.Dial(ctx, os.Getenv("AMQP_URL"), os.Getenv("AMQP_PREFIX"), nil)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	events, err := client.Subscribe(ctx, volumeclient.SubscribeOptions{Patterns: []string{"volume.reconcile.*"}})
	if err != nil {
		log.Fatal(err)
	}
	defer events.Close()

	pending, err := client.Publish(ctx, &volumeclient.Reconcile{VMID: os.Getenv("VM_ID")})
	if err != nil {
		log.Fatal(err)
	}
	for {
		received, err := events.Next(ctx)
		if err != nil {
			log.Fatal(err)
		}
		if err := received.Ack(); err != nil {
			log.Fatal(err)
		}
		if received.Event.Data.CommandID == pending.CommandID() {
			fmt.Println(received.Event.Type, len(received.Event.Data.Changes))
			return
		}
	}
	// Output: volume.reconcile.completed 0
}

// The test-failover recipe (docs/failover.md in the daemon's repository) for one disk: snapshot
// it, detach it from the appliance, boot the test VM from it (device 0), detach it again, revert
// it to the snapshot, attach it back to the appliance (same persistent name and export), and
// delete the snapshot. Every step is a daemon command; nothing calls CloudStack directly.
func Example_testFailover() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	client, err := volumeclient.Dial(ctx, os.Getenv("AMQP_URL"), os.Getenv("AMQP_PREFIX"), nil)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	run := func(c volumeclient.Command) *volumeclient.Event {
		pending, err := client.Publish(ctx, c)
		if err != nil {
			log.Fatal(err)
		}
		event, err := pending.Wait(ctx)
		if err != nil {
			log.Fatalf("%s: %v", c.Type(), err)
		}
		return event
	}
	appliance, testVM := os.Getenv("HOST_VM_ID"), os.Getenv("TEST_VM_ID")

	disk := run(&volumeclient.Create{Name: "test-failover-boot", Size: volumeclient.GiB}).Data.VolumeID
	first := run(&volumeclient.Attach{VolumeID: disk, VMID: appliance})
	snapshot := run(&volumeclient.Snapshot{VolumeID: disk, Name: "before-test"}).Data.Snapshot.ID
	run(&volumeclient.Detach{VolumeID: disk})
	run(&volumeclient.Attach{VolumeID: disk, VMID: testVM, DeviceID: volumeclient.DeviceID(0)})
	// ... the test VM boots from the disk and runs; then it is stopped ...
	run(&volumeclient.Detach{VolumeID: disk})
	reverted := run(&volumeclient.RevertSnapshot{VolumeID: disk, SnapshotID: snapshot})
	back := run(&volumeclient.Attach{VolumeID: disk, VMID: appliance})
	run(&volumeclient.DeleteSnapshot{VolumeID: disk, SnapshotID: snapshot})

	fmt.Println(reverted.Type, back.Data.Mode, back.Data.PersistentPath == first.Data.PersistentPath)
	// Output: volume.revert_snapshot.completed host true
}
