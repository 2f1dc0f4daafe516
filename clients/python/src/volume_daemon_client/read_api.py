"""The daemon's read-only HTTP API (docs/http.md): operations, volumes, exports, devices and
the daemon's readiness. Plain `urllib`, JSON in and out."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, Iterator, List, Optional

from .errors import VolumeClientError


class ReadApiError(VolumeClientError):
    """A request to the read API failed: `status` is the HTTP status (0: no answer)."""

    def __init__(self, what: str, status: int, detail: str) -> None:
        self.status = status
        super().__init__(f"{what}: HTTP {status}: {detail}" if status else f"{what}: {detail}")


class ReadApi:
    """`base_url` is the daemon's HTTP address, e.g. `http://127.0.0.1:8080`."""

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def _get(self, path: str, what: str, params: Optional[Dict[str, Any]] = None, missing_ok: bool = False) -> Any:
        query = {k: v for k, v in (params or {}).items() if v is not None}
        url = self.base_url + path + (("?" + urllib.parse.urlencode(query)) if query else "")
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            if missing_ok and e.code == 404:
                return None
            body = e.read().decode(errors="replace")
            try:
                error = json.loads(body)["error"]
                detail = f"{error['code']}: {error['message']}"
            except (ValueError, KeyError, TypeError):
                detail = body
            raise ReadApiError(what, e.code, detail) from e
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ReadApiError(what, 0, str(e)) from e

    def operation(self, operation_id: str) -> Optional[Dict[str, Any]]:
        """One operation (the command id is its id), or `None` when the daemon has none."""
        quoted = urllib.parse.quote(operation_id, safe="")
        return self._get(f"/api/v1/operations/{quoted}", f"reading operation {operation_id}", missing_ok=True)

    def operations(
        self,
        status: Optional[str] = None,
        type: Optional[str] = None,
        volume_id: Optional[str] = None,
        vm_id: Optional[str] = None,
        limit: Optional[int] = None,
    ) -> Iterator[Dict[str, Any]]:
        """Operations, newest first, optionally of one status, command type, volume or VM,
        following the pages (`limit` per page) until the last."""
        params: Dict[str, Any] = {"status": status, "type": type, "volume_id": volume_id, "vm_id": vm_id, "limit": limit}
        while True:
            page = self._get("/api/v1/operations", "listing operations", params)
            yield from page["items"]
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    def volume(self, volume_id: str) -> Optional[Dict[str, Any]]:
        """What the daemon knows of a volume (mapping, export, snapshots), or `None`."""
        return self._get(f"/api/v1/volumes/{volume_id}", f"reading volume {volume_id}", missing_ok=True)

    def vm_volumes(self, vm_id: str) -> List[Dict[str, Any]]:
        return self._get(f"/api/v1/vms/{vm_id}/volumes", f"listing the volumes of VM {vm_id}")["items"]

    def exports(self) -> List[Dict[str, Any]]:
        """The NBD exports of the host appliance."""
        return self._get("/api/v1/exports", "listing the NBD exports")["items"]

    def devices(self) -> List[Dict[str, Any]]:
        return self._get("/api/v1/devices", "listing the host's block devices")

    def status(self) -> Dict[str, Any]:
        """The daemon's `/ready` answer: role and every component (200 and 503 alike)."""
        url = self.base_url + "/ready"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            if e.code == 503:
                return json.loads(e.read())
            raise ReadApiError("reading /ready", e.code, e.reason) from e
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ReadApiError("reading /ready", 0, str(e)) from e
