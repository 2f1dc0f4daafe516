"""Typed commands, validated as the daemon validates them (docs/wire.md), and their JSON bodies.

Every command has the common fields `command_id` (the idempotency key: the daemon runs a
command id once and answers a repeat with the original event; empty means a random UUID is
given when it is published), `correlation_id`, `metadata`, and an optional W3C trace context
(`traceparent`, `tracestate`), sent as AMQP headers and carried to the command's event.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

from .errors import InvalidCommandError

#: The largest command body the daemon reads (bytes).
MAX_COMMAND_SIZE = 64 << 10
GIB = 1 << 30

_COMMAND_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")


def gib(n: Union[int, float]) -> int:
    """`n` GiB in bytes (sizes are bytes on the wire; CloudStack gets whole GiB, rounded up)."""
    return int(n * GIB)


def new_command_id() -> str:
    """A random command id (a UUID): what `publish` gives a command without one."""
    return str(uuid.uuid4())


@dataclass
class _Common:
    command_id: str = ""
    correlation_id: str = ""
    metadata: Dict[str, str] = field(default_factory=dict)
    #: W3C trace context: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`.
    traceparent: str = ""
    tracestate: str = ""

    type: str = field(default="", init=False, repr=False)

    def _bad(self, field_name: str, problem: str) -> InvalidCommandError:
        return InvalidCommandError(self.type, field_name, problem, self.command_id)

    def _uuid(self, name: str, value: Optional[str], required: bool) -> None:
        if not value:
            if required:
                raise self._bad(name, "is required (a UUID)")
            return
        if not _UUID.match(value):
            raise self._bad(name, f"{value!r} is not a UUID")

    def _fields(self) -> Dict[str, Any]:
        raise NotImplementedError

    def _check(self) -> None:
        raise NotImplementedError

    def validate(self) -> None:
        """Raises `InvalidCommandError` naming the field if the daemon would reject this."""
        if not _COMMAND_ID.match(self.command_id or ""):
            raise self._bad("command_id", f"{self.command_id!r} is not 1-64 characters of [A-Za-z0-9._:-]")
        if len(self.correlation_id.encode()) > 255:
            raise self._bad("correlation_id", f"is {len(self.correlation_id.encode())} bytes; at most 255")
        for k, v in self.metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise self._bad("metadata", f"{k!r}: keys and values are strings")
        if self.traceparent:
            m = _TRACEPARENT.match(self.traceparent)
            if not m or set(m.group(1)) == {"0"} or set(m.group(2)) == {"0"}:
                raise self._bad("traceparent", f"{self.traceparent!r} is not a W3C traceparent (version 00, lowercase hex, non-zero ids)")
        elif self.tracestate:
            raise self._bad("tracestate", "needs a traceparent")
        if len(self.tracestate.encode()) > 512:
            raise self._bad("tracestate", "is over 512 bytes")
        self._check()

    def body(self) -> bytes:
        """Validates the command and returns its JSON body (the command id must be set)."""
        self.validate()
        wire: Dict[str, Any] = {"command_id": self.command_id, "type": self.type}
        if self.correlation_id:
            wire["correlation_id"] = self.correlation_id
        if self.metadata:
            wire["metadata"] = dict(self.metadata)
        wire.update({k: v for k, v in self._fields().items() if v is not None})
        encoded = json.dumps(wire, separators=(",", ":")).encode()
        if len(encoded) > MAX_COMMAND_SIZE:
            raise self._bad("", f"the body is {len(encoded)} bytes; at most {MAX_COMMAND_SIZE}")
        return encoded


@dataclass
class Create(_Common):
    """Create a volume of `size` bytes (see `gib`)."""

    name: str = ""
    size: int = 0
    disk_offering_id: Optional[str] = None
    zone_id: Optional[str] = None

    def __post_init__(self) -> None:
        self.type = "create"

    def _check(self) -> None:
        n = len(self.name.encode())
        if n == 0 or n > 255:
            raise self._bad("name", f"must be 1-255 bytes, is {n}")
        if not isinstance(self.size, int) or self.size <= 0:
            raise self._bad("size", f"must be a whole number of bytes > 0, is {self.size!r}")
        self._uuid("disk_offering_id", self.disk_offering_id, False)
        self._uuid("zone_id", self.zone_id, False)

    def _fields(self) -> Dict[str, Any]:
        return {"name": self.name, "size": self.size, "disk_offering_id": self.disk_offering_id, "zone_id": self.zone_id}


@dataclass
class Attach(_Common):
    """Attach a volume to a VM. Attached to the VM the daemon runs on, the event carries the
    Linux device, a persistent path and an NBD export. `device_id` 0 attaches a boot disk."""

    volume_id: str = ""
    vm_id: str = ""
    device_id: Optional[int] = None

    def __post_init__(self) -> None:
        self.type = "attach"

    def _check(self) -> None:
        self._uuid("volume_id", self.volume_id, True)
        self._uuid("vm_id", self.vm_id, True)
        d = self.device_id
        if d is not None and (not isinstance(d, int) or d < 0 or d > 25 or d == 3):
            raise self._bad("device_id", f"{d!r} is not a valid CloudStack deviceid (0-25, never 3)")

    def _fields(self) -> Dict[str, Any]:
        return {"volume_id": self.volume_id, "vm_id": self.vm_id, "device_id": self.device_id}


@dataclass
class Detach(_Common):
    volume_id: str = ""

    def __post_init__(self) -> None:
        self.type = "detach"

    def _check(self) -> None:
        self._uuid("volume_id", self.volume_id, True)

    def _fields(self) -> Dict[str, Any]:
        return {"volume_id": self.volume_id}


@dataclass
class Delete(_Common):
    """Delete a volume (detached first when it is attached)."""

    volume_id: str = ""

    def __post_init__(self) -> None:
        self.type = "delete"

    def _check(self) -> None:
        self._uuid("volume_id", self.volume_id, True)

    def _fields(self) -> Dict[str, Any]:
        return {"volume_id": self.volume_id}


@dataclass
class Cancel(_Common):
    """Cancel a pending command (by its command id); a started one is not stopped."""

    target: str = ""

    def __post_init__(self) -> None:
        self.type = "cancel"

    def _check(self) -> None:
        if not _COMMAND_ID.match(self.target or ""):
            raise self._bad("target", f"{self.target!r} is not a command id")

    def _fields(self) -> Dict[str, Any]:
        return {"target": self.target}


@dataclass
class Reconcile(_Common):
    """Compare the daemon's records with CloudStack (one VM, or all) and repair them."""

    vm_id: Optional[str] = None

    def __post_init__(self) -> None:
        self.type = "reconcile"

    def _check(self) -> None:
        self._uuid("vm_id", self.vm_id, False)

    def _fields(self) -> Dict[str, Any]:
        return {"vm_id": self.vm_id}


@dataclass
class Snapshot(_Common):
    volume_id: str = ""
    name: Optional[str] = None

    def __post_init__(self) -> None:
        self.type = "snapshot"

    def _check(self) -> None:
        if self.name is not None and (not self.name.strip() or len(self.name) > 180):
            raise self._bad("name", "must be 1-180 characters when given")
        self._uuid("volume_id", self.volume_id, True)

    def _fields(self) -> Dict[str, Any]:
        return {"volume_id": self.volume_id, "name": self.name}


@dataclass
class _OnSnapshot(_Common):
    """A command naming a volume and one of its snapshots."""

    volume_id: str = ""
    snapshot_id: str = ""

    def _check(self) -> None:
        self._uuid("volume_id", self.volume_id, True)
        self._uuid("snapshot_id", self.snapshot_id, True)

    def _fields(self) -> Dict[str, Any]:
        return {"volume_id": self.volume_id, "snapshot_id": self.snapshot_id}


@dataclass
class RevertSnapshot(_OnSnapshot):
    def __post_init__(self) -> None:
        self.type = "revert_snapshot"


@dataclass
class DeleteSnapshot(_OnSnapshot):
    def __post_init__(self) -> None:
        self.type = "delete_snapshot"


@dataclass
class Resize(_Common):
    """Resize to `size` bytes (rounded up to GiB); shrinking needs `shrink_ok`."""

    volume_id: str = ""
    size: int = 0
    shrink_ok: bool = False

    def __post_init__(self) -> None:
        self.type = "resize"

    def _check(self) -> None:
        if not isinstance(self.size, int) or self.size <= 0:
            raise self._bad("size", f"must be a whole number of bytes > 0, is {self.size!r}")
        self._uuid("volume_id", self.volume_id, True)

    def _fields(self) -> Dict[str, Any]:
        return {"volume_id": self.volume_id, "size": self.size, "shrink_ok": self.shrink_ok or None}


Command = Union[Create, Attach, Detach, Delete, Cancel, Reconcile, Snapshot, RevertSnapshot, DeleteSnapshot, Resize]
