package volumeclient

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// Options tune a [Client]. The zero value suits most callers.
type Options struct {
	// ReplyQueue names the client's reply queue. Empty: a server-named queue (amq.gen-*),
	// which the daemon's default REPLY_TO_ALLOWED accepts. A name must match the daemon's
	// REPLY_TO_ALLOWED (by default "<prefix>.reply.*"). The queue is exclusive to the client.
	ReplyQueue string
	// BindEvents also binds the reply queue to the events exchange ("volume.#"), for a daemon
	// whose REPLY_TO_ALLOWED does not accept the reply queue: every event then reaches the
	// client, which keeps those of its own commands. A copy that arrives both ways is
	// recognised by its id and delivered once.
	BindEvents bool
	// TLSConfig for amqps:// URLs (nil: the system's roots, the URL's host as server name).
	TLSConfig *tls.Config
	// ConnectTimeout bounds each address's TCP, TLS and AMQP handshake (default 10 s), within
	// the context given to [Dial].
	ConnectTimeout time.Duration
	// NoReconnect: when the connection closes, end every wait with [ErrClosed] instead of
	// reconnecting (see [Client]).
	NoReconnect bool
}

// Client publishes commands to one daemon (one AMQP prefix) and delivers their events. It is
// safe for concurrent use.
//
// When its connection is lost (a broker restart, a network cut) it reconnects, trying the URLs
// in order with backoff, until [Client.Close]: it opens a new reply queue, bound to the events
// exchange as well (the daemon still answers to the old reply queue, which died with the
// connection), and publishes every command still waited for again, same CommandID, which is
// safe: the daemon executes a command id once and answers a repeat with the original event.
// So a [Pending.Wait] started before the loss returns the event. Publish waits for the
// connection meanwhile (bounded by its context). With [Options.NoReconnect] a lost connection
// ends every wait with [ErrClosed] instead.
type Client struct {
	urls  string
	opts  Options
	names names
	pub   publisher

	mu         sync.Mutex
	conn       *amqp.Connection
	address    string // the URL connected to, password hidden
	replyQueue string
	up         chan struct{} // closed while connected; a new one while reconnecting
	waiting    map[string][]*Pending
	stop       chan struct{} // closed by Close
	stopOnce   sync.Once
	done       chan struct{} // closed when the client is closed for good
	closeErr   error
}

// names are the broker names of one prefix (the daemon's docs/wire.md).
type names struct{ prefix string }

func (n names) commands() string { return n.prefix + ".commands" }
func (n names) events() string   { return n.prefix + ".events" }
func (n names) deadLetters() string {
	return n.prefix + ".commands.dlx"
}
func (n names) deadQueue() string { return n.prefix + ".commands.dead" }

// maxPrefix keeps every derived name within AMQP's 255 bytes.
const maxPrefix = 255 - len(".commands.dead")

// Dial connects to the broker and opens the client's reply queue. urls is one AMQP URL or a
// comma-separated list, tried in order until one connects; prefix is the daemon's AMQP_PREFIX
// ("volume" by default). The topology is not declared: the daemon declares it, or call
// [Client.DeclareTopology].
func Dial(ctx context.Context, urls, prefix string, opts *Options) (*Client, error) {
	if opts == nil {
		opts = &Options{}
	}
	if prefix == "" || len(prefix) > maxPrefix {
		return nil, fmt.Errorf("volumeclient: the AMQP prefix must be 1-%d bytes, is %d", maxPrefix, len(prefix))
	}
	conn, address, err := dialFirst(ctx, urls, opts)
	if err != nil {
		return nil, err
	}
	c := &Client{
		urls:    urls,
		opts:    *opts,
		names:   names{prefix},
		up:      make(chan struct{}),
		waiting: map[string][]*Pending{},
		stop:    make(chan struct{}),
		done:    make(chan struct{}),
	}
	closed := conn.NotifyClose(make(chan *amqp.Error, 1))
	if err := c.attach(conn, address, opts.BindEvents); err != nil {
		conn.Close()
		return nil, err
	}
	go c.supervise(closed)
	return c, nil
}

// dialFirst tries each comma-separated URL in order; the error names every address's failure.
func dialFirst(ctx context.Context, urls string, opts *Options) (*amqp.Connection, string, error) {
	var failures []string
	for _, u := range strings.Split(urls, ",") {
		u = strings.TrimSpace(u)
		if u == "" {
			continue
		}
		conn, err := dialOne(ctx, u, opts)
		if err == nil {
			return conn, Redact(u), nil
		}
		failures = append(failures, Redact(u)+": "+err.Error())
		if ctx.Err() != nil {
			break
		}
	}
	if len(failures) == 0 {
		return nil, "", errors.New("volumeclient: no AMQP URL given")
	}
	return nil, "", fmt.Errorf("volumeclient: cannot connect to the broker: %s", strings.Join(failures, "; "))
}

func dialOne(ctx context.Context, u string, opts *Options) (*amqp.Connection, error) {
	timeout := opts.ConnectTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	deadline := time.Now().Add(timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	config := amqp.Config{
		Heartbeat:       10 * time.Second,
		Locale:          "en_US",
		TLSClientConfig: opts.TLSConfig,
		Properties:      amqp.Table{"product": "volumeclient (Go)", "connection_name": "volumeclient"},
		Dial: func(network, addr string) (net.Conn, error) {
			dctx, cancel := context.WithDeadline(ctx, deadline)
			defer cancel()
			conn, err := (&net.Dialer{}).DialContext(dctx, network, addr)
			if err != nil {
				return nil, err
			}
			// The handshake is bounded too; amqp091 clears the deadline once it is done.
			return conn, conn.SetDeadline(deadline)
		},
	}
	if opts.TLSConfig != nil {
		config.TLSClientConfig = opts.TLSConfig.Clone()
	}
	return amqp.DialConfig(u, config)
}

// Redact returns an AMQP URL with its password replaced by ***, for messages and logs.
func Redact(u string) string {
	parsed, err := url.Parse(u)
	if err != nil || parsed.User == nil {
		return u
	}
	if _, has := parsed.User.Password(); has {
		parsed.User = url.UserPassword(parsed.User.Username(), "***")
		return strings.Replace(parsed.String(), "%2A%2A%2A", "***", 1)
	}
	return u
}

// Address is the broker URL the client is (or was last) connected to, password hidden.
func (c *Client) Address() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.address
}

// Prefix is the daemon's AMQP prefix this client talks to.
func (c *Client) Prefix() string { return c.names.prefix }

// ReplyQueue is the queue the daemon sends this client's events to (the commands' reply_to);
// a new one after each reconnection.
func (c *Client) ReplyQueue() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.replyQueue
}

// Close closes the connection for good. Waiting calls return errors wrapping [ErrClosed].
func (c *Client) Close() error {
	c.stopOnce.Do(func() { close(c.stop) })
	c.mu.Lock()
	conn := c.conn
	c.mu.Unlock()
	err := conn.Close()
	if errors.Is(err, amqp.ErrClosed) {
		return nil
	}
	return err
}

func (c *Client) closedErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closeErr == nil {
		return ErrClosed
	}
	return c.closeErr
}

// withChannel runs f on a channel of its own, so that a broker error (which closes the
// channel) cannot disturb publishing or the reply queue.
func (c *Client) withChannel(doing string, f func(*amqp.Channel) error) error {
	c.mu.Lock()
	conn := c.conn
	c.mu.Unlock()
	ch, err := conn.Channel()
	if err != nil {
		return &BrokerError{Doing: doing, Err: c.classify(err)}
	}
	defer ch.Close()
	if err := f(ch); err != nil {
		return &BrokerError{Doing: doing, Err: c.classify(err)}
	}
	return nil
}

// classify wraps the broker's 404 (no such exchange) as ErrTopologyMissing and a closed
// connection as ErrClosed.
func (c *Client) classify(err error) error {
	var amqpErr *amqp.Error
	switch {
	case errors.As(err, &amqpErr) && amqpErr.Code == amqp.NotFound:
		return fmt.Errorf("%w: %s", ErrTopologyMissing, amqpErr.Reason)
	case errors.Is(err, amqp.ErrClosed):
		return c.closedErr()
	}
	return err
}

// DeclareTopology declares the daemon's exchanges and queues for this prefix (idempotent,
// with the daemon's arguments), for a producer that may start before the daemon.
func (c *Client) DeclareTopology(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	n := c.names
	return c.withChannel("declaring the topology for prefix "+n.prefix, func(ch *amqp.Channel) error {
		for _, e := range []struct{ name, kind string }{
			{n.commands(), "topic"}, {n.events(), "topic"}, {n.deadLetters(), "fanout"},
		} {
			if err := ch.ExchangeDeclare(e.name, e.kind, true, false, false, false, nil); err != nil {
				return err
			}
		}
		quorum := amqp.Table{"x-queue-type": "quorum"}
		if _, err := ch.QueueDeclare(n.deadQueue(), true, false, false, false, quorum); err != nil {
			return err
		}
		if err := ch.QueueBind(n.deadQueue(), "", n.deadLetters(), false, nil); err != nil {
			return err
		}
		args := amqp.Table{
			"x-queue-type":             "quorum",
			"x-single-active-consumer": true,
			"x-dead-letter-exchange":   n.deadLetters(),
			"x-delivery-limit":         int32(5),
		}
		if _, err := ch.QueueDeclare(n.commands(), true, false, false, false, args); err != nil {
			return err
		}
		return ch.QueueBind(n.commands(), "volume.#", n.commands(), false, nil)
	})
}
