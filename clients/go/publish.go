package volumeclient

import (
	"context"
	"fmt"
	"sync"

	amqp "github.com/rabbitmq/amqp091-go"
)

// publisher is the client's one confirm-mode channel. Publishes take turns on it, each
// waiting for its own confirm, so a basic.return (which the broker sends before the confirm
// of the same message) is always matched with the publish it belongs to.
type publisher struct {
	mu       sync.Mutex
	conn     *amqp.Connection
	ch       *amqp.Channel
	confirms chan amqp.Confirmation
	returns  chan amqp.Return
	closed   chan *amqp.Error
}

// reset points the publisher at a new connection (after a reconnection).
func (p *publisher) reset(conn *amqp.Connection) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.conn, p.ch = conn, nil
}

// channel returns the open confirm channel, opening a new one after a broker error closed
// the last (a missing exchange closes the channel it was published on).
func (p *publisher) channel() (*amqp.Channel, error) {
	if p.ch != nil && !p.ch.IsClosed() {
		return p.ch, nil
	}
	ch, err := p.conn.Channel()
	if err != nil {
		return nil, err
	}
	if err := ch.Confirm(false); err != nil {
		ch.Close()
		return nil, err
	}
	// Buffered: the connection's reader must never block on them. A publish abandoned by its
	// context leaves at most its own confirm and return behind; the next publish skips them.
	p.confirms = ch.NotifyPublish(make(chan amqp.Confirmation, 16))
	p.returns = ch.NotifyReturn(make(chan amqp.Return, 16))
	p.closed = ch.NotifyClose(make(chan *amqp.Error, 1))
	p.ch = ch
	return ch, nil
}

// publish sends one persistent, mandatory message and waits for the broker's confirm.
func (p *publisher) publish(ctx context.Context, exchange, key string, msg amqp.Publishing) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	ch, err := p.channel()
	if err != nil {
		return err
	}
	tag := ch.GetNextPublishSeqNo()
	if err := ch.PublishWithContext(ctx, exchange, key, true, false, msg); err != nil {
		return err
	}
	for {
		select {
		case c, ok := <-p.confirms:
			if !ok {
				return p.channelError()
			}
			if c.DeliveryTag < tag {
				continue // the confirm of an earlier, abandoned publish
			}
			if p.returned(msg.MessageId) {
				return ErrUnroutable
			}
			if !c.Ack {
				return ErrNacked
			}
			return nil
		case reason := <-p.closed:
			if reason != nil {
				return reason
			}
			return amqp.ErrClosed
		case <-ctx.Done():
			return fmt.Errorf("no confirm from the broker (the command may or may not have been delivered; publishing it again is safe): %w", ctx.Err())
		}
	}
}

// returned says whether the broker returned the message with this id as unroutable. Returns
// of earlier, abandoned publishes are dropped.
func (p *publisher) returned(id string) bool {
	for {
		select {
		case r := <-p.returns:
			if r.MessageId == id {
				return true
			}
		default:
			return false
		}
	}
}

func (p *publisher) channelError() error {
	select {
	case reason := <-p.closed:
		if reason != nil {
			return reason
		}
	default:
	}
	return amqp.ErrClosed
}

// Publish publishes a command (persistent, mandatory, with a publisher confirm) and returns a
// [Pending] that delivers its terminal event. The client listens before it publishes, so an
// event that arrives before [Pending.Wait] is called is kept. An empty CommandID is filled
// with a random one (see [NewCommandID]). Errors: an [*InvalidCommandError] before anything
// is sent; a [*BrokerError] wrapping [ErrUnroutable], [ErrTopologyMissing], [ErrNacked] or
// [ErrClosed]. The command's reply_to is the client's reply queue.
func (c *Client) Publish(ctx context.Context, cmd Command) (*Pending, error) {
	h := cmd.Header()
	if h.CommandID == "" {
		h.CommandID = NewCommandID()
	}
	body, err := Encode(cmd)
	if err != nil {
		return nil, err
	}
	msg := amqp.Publishing{
		ContentType:   "application/json",
		DeliveryMode:  amqp.Persistent,
		MessageId:     h.CommandID,
		CorrelationId: h.CorrelationID,
		Body:          body,
	}
	if h.TraceParent != "" {
		msg.Headers = amqp.Table{"traceparent": h.TraceParent}
		if h.TraceState != "" {
			msg.Headers["tracestate"] = h.TraceState
		}
	}
	p := c.expect(h.CommandID, cmd.Type(), msg)
	doing := fmt.Sprintf("publishing %s command %s to %s", cmd.Type(), h.CommandID, c.names.commands())
	if err := c.connected(ctx); err != nil {
		p.Stop()
		return nil, &BrokerError{Doing: doing, Err: err}
	}
	if err := c.send(ctx, p); err != nil {
		p.Stop()
		return nil, &BrokerError{Doing: doing, Err: c.classify(err)}
	}
	return p, nil
}

// send publishes p's command with the current reply queue as its reply_to.
func (c *Client) send(ctx context.Context, p *Pending) error {
	msg := p.msg
	msg.ReplyTo = c.ReplyQueue()
	return c.pub.publish(ctx, c.names.commands(), "volume."+p.typ, msg)
}

// Pending is a published command whose terminal event is on its way.
type Pending struct {
	c         *Client
	commandID string
	typ       string
	msg       amqp.Publishing // published again after a reconnection
	events    chan *Event     // capacity 1: the first copy of the event; later copies are dropped
}

// CommandID is the published command's id.
func (p *Pending) CommandID() string { return p.commandID }

// Wait returns the command's terminal event, and the event's [Event.Err]: nil when it
// completed, an [*CommandError] (code, retryable, hint) when it failed, an error wrapping
// [ErrCancelled] when it was cancelled. When ctx ends first, Wait returns ctx's error and the
// Pending keeps listening: Wait may be called again (or [Pending.Stop] to stop listening).
func (p *Pending) Wait(ctx context.Context) (*Event, error) {
	select {
	case ev := <-p.events:
		return p.got(ev)
	default:
	}
	select {
	case ev := <-p.events:
		return p.got(ev)
	case <-p.c.done:
		select {
		case ev := <-p.events: // it arrived just before the connection closed
			return p.got(ev)
		default:
		}
		return nil, &BrokerError{Doing: "waiting for the event of command " + p.commandID, Err: p.c.closedErr()}
	case <-ctx.Done():
		return nil, fmt.Errorf("volumeclient: waiting for the event of %s command %s: %w", p.typ, p.commandID, ctx.Err())
	}
}

func (p *Pending) got(ev *Event) (*Event, error) {
	p.Stop()
	select {
	case p.events <- ev: // a second Wait returns the same event
	default: // a copy of it arrived meanwhile: that one will
	}
	return ev, ev.Err()
}

// Stop stops listening for the event (a Pending whose event Wait returned has stopped).
func (p *Pending) Stop() {
	c := p.c
	c.mu.Lock()
	defer c.mu.Unlock()
	list := c.waiting[p.commandID]
	for i, q := range list {
		if q == p {
			list = append(list[:i], list[i+1:]...)
			break
		}
	}
	if len(list) == 0 {
		delete(c.waiting, p.commandID)
	} else {
		c.waiting[p.commandID] = list
	}
}

// expect registers a Pending before its command is published.
func (c *Client) expect(commandID, typ string, msg amqp.Publishing) *Pending {
	p := &Pending{c: c, commandID: commandID, typ: typ, msg: msg, events: make(chan *Event, 1)}
	c.mu.Lock()
	c.waiting[commandID] = append(c.waiting[commandID], p)
	c.mu.Unlock()
	return p
}

// openReplies declares an exclusive reply queue on conn (bound to the events exchange as well
// when bind is set) and starts delivering what arrives on it to the Pending of each command.
// It returns the queue's name.
func (c *Client) openReplies(conn *amqp.Connection, bind bool) (string, error) {
	ch, err := conn.Channel()
	if err != nil {
		return "", &BrokerError{Doing: "opening the reply channel", Err: err}
	}
	q, err := ch.QueueDeclare(c.opts.ReplyQueue, false, true, true, false, nil)
	if err != nil {
		return "", &BrokerError{Doing: fmt.Sprintf("declaring the reply queue %q", c.opts.ReplyQueue), Err: c.classify(err)}
	}
	if bind {
		if err := ch.QueueBind(q.Name, "volume.#", c.names.events(), false, nil); err != nil {
			return "", &BrokerError{Doing: "binding the reply queue to " + c.names.events(), Err: c.classify(err)}
		}
	}
	deliveries, err := ch.Consume(q.Name, "", true, true, false, false, nil)
	if err != nil {
		return "", &BrokerError{Doing: "consuming the reply queue " + q.Name, Err: c.classify(err)}
	}
	go c.deliver(deliveries, conn)
	return q.Name, nil
}

// deliver hands each event to the Pendings of its command id; messages that are not events,
// and events nobody waits for, are dropped. It ends when the channel closes.
func (c *Client) deliver(deliveries <-chan amqp.Delivery, conn *amqp.Connection) {
	for d := range deliveries {
		ev, err := ParseEvent(d.Body)
		if err != nil {
			continue
		}
		c.mu.Lock()
		for _, p := range c.waiting[ev.Data.CommandID] {
			select {
			case p.events <- ev:
			default: // a copy (same id) of the event it already holds
			}
		}
		c.mu.Unlock()
	}
	// The reply channel is gone: without it no event arrives, so the connection is closed
	// (and, unless the client is closing, made again).
	conn.Close()
}
