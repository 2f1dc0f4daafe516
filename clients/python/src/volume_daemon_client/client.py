"""The broker side: publish commands, wait for their events, subscribe to events.

One `VolumeClient` is one connection (pika's `BlockingConnection`, so one thread at a time).
It opens an exclusive, server-named reply queue *before* anything is published and names it as
each command's `reply_to`: an event that arrives before `Pending.wait` is called is kept, and a
second copy of an event (the same event id) is delivered once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Set, TypeVar

import pika
import pika.exceptions as pe

from .commands import Command, new_command_id
from .errors import (
    BrokerError,
    ClosedError,
    NackedError,
    TopologyMissingError,
    UnroutableError,
    WaitTimeout,
)
from .events import Event, parse_event

T = TypeVar("T")

#: The commands queue's delivery limit (dead-lettered after that many deliveries).
DELIVERY_LIMIT = 5


class VolumeClient:
    """Connects to the first reachable of `urls` (a comma-separated list of `amqp://` or
    `amqps://` URLs) and uses the daemon's topology under `prefix`."""

    def __init__(self, urls: str = "amqp://guest:guest@127.0.0.1:5672/%2f", prefix: str = "volume") -> None:
        self.prefix = prefix
        self._conn = _connect(urls)
        self._events: Dict[str, Event] = {}
        self._seen: Set[str] = set()
        self._waiting: Set[str] = set()
        try:
            self._pub = self._confirming_channel()
            self._sub = self._conn.channel()
            declared = self._sub.queue_declare("", exclusive=True, auto_delete=True)
            self.reply_queue: str = declared.method.queue
            self._sub.basic_consume(self.reply_queue, self._on_reply, auto_ack=True)
        except pe.AMQPError as e:
            self._conn.close()
            raise BrokerError("opening the client's channels and reply queue", repr(e)) from e

    def _confirming_channel(self) -> "pika.adapters.blocking_connection.BlockingChannel":
        ch = self._conn.channel()
        ch.confirm_delivery()
        return ch

    # ---- names --------------------------------------------------------------------------

    @property
    def commands_exchange(self) -> str:
        return f"{self.prefix}.commands"

    @property
    def events_exchange(self) -> str:
        return f"{self.prefix}.events"

    # ---- life ---------------------------------------------------------------------------

    def close(self) -> None:
        if self._conn.is_open:
            self._conn.close()

    def __enter__(self) -> "VolumeClient":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def declare_topology(self) -> None:
        """Declares the daemon's exchanges, commands queue and dead-letter pair (for a producer
        that starts before the daemon). Declaring what exists already changes nothing."""
        ch = self._conn.channel()
        try:
            for name, kind in (
                (self.commands_exchange, "topic"),
                (self.events_exchange, "topic"),
                (f"{self.prefix}.commands.dlx", "fanout"),
            ):
                ch.exchange_declare(name, kind, durable=True)
            dead = f"{self.prefix}.commands.dead"
            ch.queue_declare(dead, durable=True, arguments={"x-queue-type": "quorum"})
            ch.queue_bind(dead, f"{self.prefix}.commands.dlx", "")
            commands = f"{self.prefix}.commands"
            ch.queue_declare(
                commands,
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-single-active-consumer": True,
                    "x-dead-letter-exchange": f"{self.prefix}.commands.dlx",
                    "x-delivery-limit": DELIVERY_LIMIT,
                },
            )
            ch.queue_bind(commands, self.commands_exchange, "volume.#")
        except pe.AMQPError as e:
            raise BrokerError(f"declaring the topology under {self.prefix!r}", repr(e)) from e
        finally:
            if ch.is_open:
                ch.close()

    # ---- publishing ---------------------------------------------------------------------

    def publish(self, command: Command) -> "Pending":
        """Validates `command` (raising `InvalidCommandError` before anything is sent), gives it
        a random command id when it has none, and publishes it persistent, mandatory and
        confirmed, with `reply_to` = this client's reply queue. Raises `UnroutableError`,
        `TopologyMissingError`, `NackedError` or `ClosedError` (all `BrokerError`)."""
        if not command.command_id:
            command.command_id = new_command_id()
        body = command.body()
        headers = {}
        if command.traceparent:
            headers["traceparent"] = command.traceparent
            if command.tracestate:
                headers["tracestate"] = command.tracestate
        props = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=command.command_id,
            correlation_id=command.correlation_id or None,
            reply_to=self.reply_queue,
            headers=headers or None,
        )
        doing = f"publishing {command.type} command {command.command_id} to {self.commands_exchange}"
        self._waiting.add(command.command_id)
        try:
            if not self._pub.is_open:
                self._pub = self._confirming_channel()
            self._pub.basic_publish(
                self.commands_exchange, f"volume.{command.type}", body, props, mandatory=True
            )
        except pe.UnroutableError as e:
            raise UnroutableError(doing, "no queue is bound to take it: is the daemon's topology declared?") from e
        except pe.NackError as e:
            raise NackedError(doing, "the broker refused it") from e
        except pe.ChannelClosedByBroker as e:
            if e.reply_code == 404:
                raise TopologyMissingError(doing, f"the exchange does not exist ({e.reply_text})") from e
            raise BrokerError(doing, repr(e)) from e
        except (pe.ConnectionClosed, pe.StreamLostError, pe.ChannelWrongStateError) as e:
            raise ClosedError(doing, repr(e)) from e
        except BaseException:
            self._waiting.discard(command.command_id)
            raise
        return Pending(self, command.command_id, command.type)

    def execute(self, command: Command, timeout: float = 300.0) -> Event:
        """Publishes `command` and waits for its event; raises `CommandError` when it failed."""
        return self.publish(command).wait(timeout).raise_for_status()

    # ---- events -------------------------------------------------------------------------

    def _on_reply(self, _ch: object, _method: object, _props: object, body: bytes) -> None:
        try:
            event = parse_event(body)
        except Exception:  # noqa: BLE001 - a foreign message in our queue is not ours to fail on
            return
        if event.id in self._seen:
            return  # a copy of an event already delivered or kept
        self._seen.add(event.id)
        self._events.setdefault(event.command_id, event)

    def _take(self, command_id: str, timeout: float) -> Event:
        deadline = time.monotonic() + timeout
        while command_id not in self._events:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(f"no event for command {command_id} within {timeout} s (still listening)")
            try:
                self._conn.process_data_events(time_limit=min(left, 0.5))
            except (pe.ConnectionClosed, pe.StreamLostError, pe.AMQPConnectionError) as e:
                raise ClosedError(f"waiting for the event of command {command_id}", repr(e)) from e
        self._waiting.discard(command_id)
        return self._events[command_id]

    def subscribe(self, queue: str = "", binding: str = "volume.#", prefetch: int = 16) -> "Subscription":
        """Events on a queue of yours bound to the events exchange with `binding`: durable
        when named, exclusive and server-named when `queue` is empty. Each must be acked."""
        ch = self._conn.channel()
        try:
            if queue:
                ch.queue_declare(queue, durable=True)
            else:
                queue = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
            ch.queue_bind(queue, self.events_exchange, binding)
            ch.basic_qos(prefetch_count=prefetch)
        except pe.ChannelClosedByBroker as e:
            if e.reply_code == 404:
                raise TopologyMissingError(f"subscribing to {self.events_exchange}", e.reply_text) from e
            raise BrokerError(f"subscribing to {self.events_exchange}", repr(e)) from e
        return Subscription(ch, queue)


class Pending:
    """A published command whose terminal event is on its way."""

    def __init__(self, client: VolumeClient, command_id: str, command_type: str) -> None:
        self._client = client
        self.command_id = command_id
        self.command_type = command_type

    def wait(self, timeout: float = 300.0) -> Event:
        """The command's terminal event (kept from the moment it arrived, so a late `wait`
        still gets it; a repeated `wait` returns the same event). `WaitTimeout` when none came
        within `timeout` seconds: the client keeps listening, `wait` may be called again. Use
        `Event.raise_for_status()` for a `CommandError` with code, retryable and hint."""
        return self._client._take(self.command_id, timeout)


@dataclass
class Delivery:
    """An event from a subscription, to be acknowledged (`ack`) or returned (`reject`)."""

    event: Optional[Event]
    body: bytes
    _ack: Callable[[], None]
    _reject: Callable[[bool], None]

    def ack(self) -> None:
        self._ack()

    def reject(self, requeue: bool = False) -> None:
        self._reject(requeue)


class Subscription:
    """Iterates events with explicit acknowledgements: an event not acked before the
    subscription's channel closes is delivered again."""

    def __init__(self, channel: "pika.adapters.blocking_connection.BlockingChannel", queue: str) -> None:
        self._ch = channel
        self.queue = queue

    def next(self, timeout: float = 30.0) -> Optional[Delivery]:
        """The next event, or `None` when none came within `timeout` seconds. An undecodable
        message comes with `event=None` (reject it)."""
        for method, _props, body in self._ch.consume(self.queue, inactivity_timeout=timeout):
            if method is None:
                return None
            tag = method.delivery_tag
            try:
                event: Optional[Event] = parse_event(body)
            except Exception:  # noqa: BLE001
                event = None
            return Delivery(
                event,
                body,
                lambda: self._ch.basic_ack(tag),
                lambda requeue: self._ch.basic_nack(tag, requeue=requeue),
            )
        return None

    def __iter__(self) -> Iterator[Delivery]:
        while True:
            d = self.next()
            if d is not None:
                yield d

    def close(self) -> None:
        if self._ch.is_open:
            self._ch.cancel()
            self._ch.close()


def _connect(urls: str) -> pika.BlockingConnection:
    errors: List[str] = []
    for url in [u.strip() for u in urls.split(",") if u.strip()]:
        try:
            return pika.BlockingConnection(pika.URLParameters(url))
        except pe.AMQPError as e:
            errors.append(f"{_redact(url)}: {e!r}")
    raise BrokerError("connecting to the broker", "; ".join(errors) or "no URL given")


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest
