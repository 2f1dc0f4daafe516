//go:build brokerrestart

package volumeclient_test

// Run by the daemon's suite on a RabbitMQ node of the test's own (never the machine's shared
// broker): tests/e2e/go_client.rs starts the node and a daemon on it, then runs
// `go test -tags brokerrestart -run TestAWaitStartedBeforeABrokerRestartReturnsTheEvent` with
// RESTART_NODE naming the node.

import (
	"context"
	"os"
	"os/exec"
	"testing"
	"time"

	"volume-daemon/volumeclient"
)

// A Wait started before the broker restarts returns the event: the client reconnects, opens
// a new reply queue bound to the events exchange, and publishes the waited-for command again
// (same id); a command published after the restart runs too.
func TestAWaitStartedBeforeABrokerRestartReturnsTheEvent(t *testing.T) {
	d := needDaemon(t)
	node := os.Getenv("RESTART_NODE")
	if node == "" {
		t.Fatal("RESTART_NODE must name the test's own RabbitMQ node (tests/e2e/go_client.rs)")
	}
	c := dial(t, d, nil)
	before := c.ReplyQueue()
	ctx, cancel := context.WithTimeout(context.Background(), 180*time.Second)
	defer cancel()
	p, err := c.Publish(ctx, &volumeclient.Create{Name: "across-a-restart", Size: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	waited := make(chan error, 1)
	var ev *volumeclient.Event
	go func() {
		var err error
		ev, err = p.Wait(ctx)
		waited <- err
	}()
	for _, step := range []string{"stop_app", "start_app"} {
		if out, err := exec.Command("rabbitmqctl", "-n", node, step).CombinedOutput(); err != nil {
			t.Fatalf("rabbitmqctl -n %s %s: %v\n%s", node, step, err, out)
		}
	}
	if err := <-waited; err != nil {
		t.Fatalf("the wait started before the restart: %v", err)
	}
	if ev.Data.CommandID != p.CommandID() || ev.Data.Status != volumeclient.StatusCompleted {
		t.Fatalf("event %+v", ev.Data)
	}
	if c.ReplyQueue() == before {
		t.Fatalf("the reply queue %s survived a restart of the broker's app", before)
	}
	after := run(t, c, &volumeclient.Create{Name: "after-the-restart", Size: 1 << 30})
	if after.Data.Volume == nil {
		t.Fatalf("no volume in %+v", after.Data)
	}
}
