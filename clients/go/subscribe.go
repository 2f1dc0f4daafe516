package volumeclient

import (
	"context"
	"fmt"

	amqp "github.com/rabbitmq/amqp091-go"
)

// SubscribeOptions say what a [Subscription] receives.
type SubscribeOptions struct {
	// Queue names a durable queue that keeps events while nobody listens (several subscribers
	// on one name share its events). Empty: a private queue that lives as long as the
	// subscription.
	Queue string
	// Patterns are routing-key patterns: "volume.#" (the default: every event),
	// "volume.attach.*", "volume.*.failed", ...
	Patterns []string
	// Prefetch is how many unacknowledged events the subscription holds at most (default 32).
	Prefetch int
}

// Subscription is a stream of completion events. Each event must be acknowledged
// ([Received.Ack]) or it is delivered again, to this queue's next consumer.
type Subscription struct {
	ch         *amqp.Channel
	queue      string
	deliveries <-chan amqp.Delivery
}

// Received is one event of a [Subscription], not yet acknowledged.
type Received struct {
	Event *Event
	// Redelivered: delivered before (to this or another subscriber); dedupe on Event.ID.
	Redelivered bool
	delivery    amqp.Delivery
}

// Ack acknowledges the event: the broker forgets it.
func (r *Received) Ack() error {
	if err := r.delivery.Ack(false); err != nil {
		return &BrokerError{Doing: "acknowledging event " + r.Event.ID, Err: err}
	}
	return nil
}

// Reject gives the event back to the queue (requeue) or drops it.
func (r *Received) Reject(requeue bool) error {
	if err := r.delivery.Reject(requeue); err != nil {
		return &BrokerError{Doing: "rejecting event " + r.Event.ID, Err: err}
	}
	return nil
}

// Subscribe binds a queue to the events exchange and consumes it on a channel of its own.
func (c *Client) Subscribe(ctx context.Context, opts SubscribeOptions) (*Subscription, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	patterns := opts.Patterns
	if len(patterns) == 0 {
		patterns = []string{"volume.#"}
	}
	prefetch := opts.Prefetch
	if prefetch <= 0 {
		prefetch = 32
	}
	c.mu.Lock()
	conn := c.conn
	c.mu.Unlock()
	ch, err := conn.Channel()
	if err != nil {
		return nil, &BrokerError{Doing: "opening a channel for events", Err: c.classify(err)}
	}
	s, err := c.subscribeOn(ch, opts.Queue, patterns, prefetch)
	if err != nil {
		ch.Close()
		return nil, err
	}
	return s, nil
}

func (c *Client) subscribeOn(ch *amqp.Channel, queue string, patterns []string, prefetch int) (*Subscription, error) {
	fail := func(doing string, err error) (*Subscription, error) {
		return nil, &BrokerError{Doing: doing, Err: c.classify(err)}
	}
	// Per consumer, not global: quorum queues refuse a global prefetch.
	if err := ch.Qos(prefetch, 0, false); err != nil {
		return fail("setting the event prefetch", err)
	}
	durable := queue != ""
	q, err := ch.QueueDeclare(queue, durable, !durable, !durable, false, nil)
	if err != nil {
		return fail(fmt.Sprintf("declaring the event queue %q", queue), err)
	}
	for _, p := range patterns {
		if err := ch.QueueBind(q.Name, p, c.names.events(), false, nil); err != nil {
			return fail(fmt.Sprintf("binding %q to %s", p, c.names.events()), err)
		}
	}
	deliveries, err := ch.Consume(q.Name, "", false, false, false, false, nil)
	if err != nil {
		return fail("consuming "+q.Name, err)
	}
	return &Subscription{ch: ch, queue: q.Name, deliveries: deliveries}, nil
}

// Queue is the subscription's queue name.
func (s *Subscription) Queue() string { return s.queue }

// Next returns the next event. A message that is not a volume event is dropped (rejected
// without requeue). When the subscription or its connection closes, Next returns an error
// wrapping [ErrClosed]; when ctx ends, ctx's error.
func (s *Subscription) Next(ctx context.Context) (*Received, error) {
	for {
		select {
		case d, ok := <-s.deliveries:
			if !ok {
				return nil, &BrokerError{Doing: "receiving events from " + s.queue, Err: ErrClosed}
			}
			ev, err := ParseEvent(d.Body)
			if err != nil {
				if rerr := d.Reject(false); rerr != nil {
					return nil, &BrokerError{Doing: "dropping a message that is not an event", Err: rerr}
				}
				continue
			}
			return &Received{Event: ev, Redelivered: d.Redelivered, delivery: d}, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// Close stops the subscription; unacknowledged events go back to the queue (a private queue
// is deleted with them).
func (s *Subscription) Close() error {
	return s.ch.Close()
}
