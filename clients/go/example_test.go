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
