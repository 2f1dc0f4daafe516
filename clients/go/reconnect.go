package volumeclient

import (
	"context"
	"fmt"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// attach makes conn the client's connection: a reply queue on it, the publisher on it, and
// the client marked connected.
func (c *Client) attach(conn *amqp.Connection, address string, bind bool) error {
	queue, err := c.openReplies(conn, bind)
	if err != nil {
		return err
	}
	c.pub.reset(conn)
	c.mu.Lock()
	c.conn, c.address, c.replyQueue = conn, address, queue
	close(c.up)
	c.mu.Unlock()
	return nil
}

// connected waits until the client has a connection (at once, unless it is reconnecting).
func (c *Client) connected(ctx context.Context) error {
	c.mu.Lock()
	up := c.up
	c.mu.Unlock()
	select {
	case <-up:
		return nil
	case <-c.done:
		return c.closedErr()
	case <-ctx.Done():
		return fmt.Errorf("waiting for the connection to the broker to come back: %w", ctx.Err())
	}
}

// reconnectDelay is the wait before the n-th attempt (0, 0.2 s, 0.4 s, ... up to 5 s).
func reconnectDelay(n int) time.Duration {
	d := time.Duration(n) * 200 * time.Millisecond
	if d > 5*time.Second {
		d = 5 * time.Second
	}
	return d
}

// supervise watches the connection; when it is lost (and the client is not closing) it
// connects again and publishes the waited-for commands again, until Close.
func (c *Client) supervise(closed chan *amqp.Error) {
	for {
		reason := <-closed
		c.mu.Lock()
		c.up = make(chan struct{})
		c.mu.Unlock()
		if c.stopped() || c.opts.NoReconnect {
			c.finish(reason)
			return
		}
		for attempt := 0; ; attempt++ {
			select {
			case <-c.stop:
				c.finish(reason)
				return
			case <-time.After(reconnectDelay(attempt)):
			}
			conn, address, err := dialFirst(context.Background(), c.urls, &c.opts)
			if err != nil {
				continue
			}
			closed = conn.NotifyClose(make(chan *amqp.Error, 1))
			// The old reply queue died with the old connection, and the daemon answers there:
			// listen on the events exchange as well from now on.
			if err := c.attach(conn, address, true); err != nil {
				conn.Close()
				continue
			}
			c.republish()
			break
		}
	}
}

// republish publishes every command still waited for again (same command id: the daemon
// executes it once and answers a repeat with its event).
func (c *Client) republish() {
	c.mu.Lock()
	var pending []*Pending
	for _, list := range c.waiting {
		if len(list) > 0 {
			pending = append(pending, list[0])
		}
	}
	c.mu.Unlock()
	for _, p := range pending {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_ = c.send(ctx, p) // a failure here is the next loss: supervise tries again
		cancel()
	}
}

func (c *Client) stopped() bool {
	select {
	case <-c.stop:
		return true
	default:
		return false
	}
}

// finish closes the client for good: every wait ends with ErrClosed (and the reason).
func (c *Client) finish(reason *amqp.Error) {
	err := ErrClosed
	if reason != nil {
		err = fmt.Errorf("%w: %s", ErrClosed, reason.Error())
	}
	c.mu.Lock()
	c.closeErr = err
	c.mu.Unlock()
	close(c.done)
}
