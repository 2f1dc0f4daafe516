"""The daemon's events: CloudEvents 1.0 in structured JSON (docs/wire.md), one terminal event
per operation, `type` = `volume.<command type>.<status>`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, Optional

from .errors import CancelledError, CommandError, VolumeClientError

PENDING, EXECUTING, COMPLETED, FAILED, CANCELLED = "pending", "executing", "completed", "failed", "cancelled"


@dataclass(frozen=True)
class EventError:
    """Why an operation failed: `code` (`CLOUDSTACK_INVALID_PARAMETER`, `VOLUME_NOT_FOUND`, ...),
    whether sending the same command again may succeed, and what to do."""

    code: str
    message: str
    retryable: bool
    hint: str
    cloudstack_error_code: Optional[int] = None


@dataclass(frozen=True)
class Event:
    id: str
    type: str
    source: str
    time: str
    data: Dict[str, Any]
    #: The command's trace, with the daemon's operation span as parent, when it carried one.
    traceparent: Optional[str] = None
    tracestate: Optional[str] = None

    @property
    def command_id(self) -> str:
        return str(self.data.get("command_id", ""))

    @property
    def status(self) -> str:
        return str(self.data.get("status", ""))

    @property
    def volume_id(self) -> Optional[str]:
        return self.data.get("volume_id")

    @property
    def error(self) -> Optional[EventError]:
        e = self.data.get("error")
        if not e:
            return None
        return EventError(
            code=e.get("code", ""),
            message=e.get("message", ""),
            retryable=bool(e.get("retryable", False)),
            hint=e.get("hint", ""),
            cloudstack_error_code=e.get("cloudstack_error_code"),
        )

    def raise_for_status(self) -> "Event":
        """Returns the event when the operation completed; raises `CommandError` (code,
        retryable, hint) when it failed and `CancelledError` when it was cancelled."""
        if self.status == FAILED:
            error = self.error or EventError("INTERNAL", "failed without an error object", False, "")
            raise CommandError(self, error)
        if self.status == CANCELLED:
            raise CancelledError(self)
        return self


def parse_event(body: bytes) -> Event:
    """Decodes an event body; raises `VolumeClientError` when it is not one."""
    try:
        raw = json.loads(body)
        return Event(
            id=raw["id"],
            type=raw["type"],
            source=raw["source"],
            time=raw["time"],
            data=raw["data"],
            traceparent=raw.get("traceparent"),
            tracestate=raw.get("tracestate"),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise VolumeClientError(f"not an event of volume-daemon: {e}") from e
