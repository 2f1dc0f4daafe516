"""The client's errors: every one says what failed and for which command."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .events import Event, EventError


class VolumeClientError(Exception):
    """Base of every error this package raises."""


class InvalidCommandError(VolumeClientError):
    """A command the daemon would reject, found before anything was published."""

    def __init__(self, command_type: str, field: str, problem: str, command_id: str = "") -> None:
        self.command_type = command_type
        self.field = field
        self.problem = problem
        self.command_id = command_id
        where = f" {command_id}" if command_id else ""
        super().__init__(f"invalid {command_type} command{where}: {field}: {problem}")


class BrokerError(VolumeClientError):
    """The broker or the connection to it failed; `doing` says what the client was doing."""

    def __init__(self, doing: str, reason: str) -> None:
        self.doing = doing
        self.reason = reason
        super().__init__(f"{doing}: {reason}")


class TopologyMissingError(BrokerError):
    """The daemon's exchange does not exist: the daemon has not started yet under this
    prefix (or the prefix is wrong). `VolumeClient.declare_topology()` declares it."""


class UnroutableError(BrokerError):
    """The broker had no queue to route the command to: nobody would execute it."""


class NackedError(BrokerError):
    """The broker refused the command (a negative publisher confirm)."""


class ClosedError(BrokerError):
    """The client's connection is closed. Connect again and publish the same command (same
    command id): the daemon runs a command id once and answers a repeat with its event."""


class WaitTimeout(VolumeClientError):
    """No event within the time given; the pending command keeps listening."""


class CommandError(VolumeClientError):
    """A command that failed: the event's error object (code, message, retryable, hint,
    CloudStack's code), with the event."""

    def __init__(self, event: "Event", error: "EventError") -> None:
        self.event = event
        self.code = error.code
        self.message = error.message
        self.retryable = error.retryable
        self.hint = error.hint
        self.cloudstack_error_code: Optional[int] = error.cloudstack_error_code
        retry = "retryable" if error.retryable else "not retryable"
        super().__init__(
            f"{event.data.get('type')} command {event.command_id} failed: {error.code}: "
            f"{error.message} ({retry}; {error.hint})"
        )


class CancelledError(VolumeClientError):
    """The operation was cancelled by a cancel command before it started."""

    def __init__(self, event: "Event") -> None:
        self.event = event
        super().__init__(f"{event.data.get('type')} command {event.command_id} was cancelled")
