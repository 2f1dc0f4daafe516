"""Python client of volume-daemon.

Commands are published to RabbitMQ (`VolumeClient.publish`), their terminal events come back on
the client's reply queue (`Pending.wait`), and the daemon's read API answers questions about
operations, volumes and exports (`ReadApi`). The wire format is the daemon's docs/wire.md.
"""

from .client import Delivery, Pending, Subscription, VolumeClient
from .commands import (
    GIB,
    MAX_COMMAND_SIZE,
    Attach,
    Cancel,
    Command,
    Create,
    Delete,
    DeleteSnapshot,
    Detach,
    Reconcile,
    Resize,
    RevertSnapshot,
    Snapshot,
    gib,
    new_command_id,
)
from .errors import (
    BrokerError,
    CancelledError,
    ClosedError,
    CommandError,
    InvalidCommandError,
    NackedError,
    TopologyMissingError,
    UnroutableError,
    VolumeClientError,
    WaitTimeout,
)
from .events import Event, EventError, parse_event
from .read_api import ReadApi, ReadApiError

__all__ = [
    "Attach", "BrokerError", "Cancel", "CancelledError", "ClosedError", "Command", "CommandError",
    "Create", "Delete", "DeleteSnapshot", "Delivery", "Detach", "Event", "EventError", "GIB",
    "InvalidCommandError", "MAX_COMMAND_SIZE", "NackedError", "Pending", "ReadApi", "ReadApiError",
    "Reconcile", "Resize", "RevertSnapshot", "Snapshot", "Subscription", "TopologyMissingError",
    "UnroutableError", "VolumeClient", "VolumeClientError", "WaitTimeout", "gib", "new_command_id",
    "parse_event",
]
