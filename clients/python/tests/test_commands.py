"""Commands without a broker: validated as the daemon validates them, naming the field, and
encoded as `schemas/command.schema.json` describes (checked with jsonschema)."""

import json
import os
import pathlib
import unittest

import jsonschema

import volume_daemon_client as v

SCHEMAS = pathlib.Path(os.environ.get("VOLUME_SCHEMAS_DIR", pathlib.Path(__file__).resolve().parents[3] / "schemas"))
VOL = "0b8ac9a6-6b53-4c1c-9d8e-3f1f7a6f2a10"
VM = "9a1e2d3c-4b5a-4697-8a7b-6c5d4e3f2a1b"
SNAP = "1f2e3d4c-5b6a-4798-8a9b-0c1d2e3f4a5b"
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def command_schema() -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / "command.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def valid_commands():
    return [
        v.Create(command_id="c-1", name="disk", size=v.gib(1), correlation_id="job-7", metadata={"k": "v"}),
        v.Create(command_id="c-2", name="disk", size=1, disk_offering_id=VOL, zone_id=VM),
        v.Attach(command_id="c-3", volume_id=VOL, vm_id=VM),
        v.Attach(command_id="c-4", volume_id=VOL, vm_id=VM, device_id=0),
        v.Detach(command_id="c-5", volume_id=VOL),
        v.Delete(command_id="c-6", volume_id=VOL),
        v.Cancel(command_id="c-7", target="c-1"),
        v.Reconcile(command_id="c-8"),
        v.Reconcile(command_id="c-9", vm_id=VM),
        v.Snapshot(command_id="c-10", volume_id=VOL, name="before-test"),
        v.RevertSnapshot(command_id="c-11", volume_id=VOL, snapshot_id=SNAP),
        v.DeleteSnapshot(command_id="c-12", volume_id=VOL, snapshot_id=SNAP),
        v.Resize(command_id="c-13", volume_id=VOL, size=v.gib(2)),
        v.Resize(command_id="c-14", volume_id=VOL, size=v.gib(1), shrink_ok=True),
        v.Create(command_id="c-15", name="traced", size=1, traceparent=TRACE, tracestate="a=b"),
    ]


class ValidCommands(unittest.TestCase):
    def test_every_kind_encodes_as_the_command_schema_describes(self):
        schema = command_schema()
        for c in valid_commands():
            body = json.loads(c.body())
            errors = [e.message for e in schema.iter_errors(body)]
            self.assertEqual(errors, [], f"{c}: {body}")
            self.assertEqual(body["type"], c.type)

    def test_optional_fields_are_left_out_not_sent_as_null(self):
        body = json.loads(v.Attach(command_id="x", volume_id=VOL, vm_id=VM).body())
        self.assertNotIn("device_id", body)
        self.assertEqual(json.loads(v.Attach(command_id="x", volume_id=VOL, vm_id=VM, device_id=0).body())["device_id"], 0)


class InvalidCommands(unittest.TestCase):
    def assert_field(self, command, field):
        with self.assertRaises(v.InvalidCommandError) as raised:
            command.body()
        self.assertEqual(raised.exception.field, field, str(raised.exception))
        self.assertIn(field, str(raised.exception))

    def test_each_refusal_names_its_field(self):
        cases = [
            (v.Create(command_id="bad id!", name="x", size=1), "command_id"),
            (v.Create(command_id="x" * 65, name="x", size=1), "command_id"),
            (v.Create(command_id="a", name="", size=1), "name"),
            (v.Create(command_id="a", name="é" * 128, size=1), "name"),
            (v.Create(command_id="a", name="x", size=0), "size"),
            (v.Create(command_id="a", name="x", size=1, zone_id="zone-1"), "zone_id"),
            (v.Create(command_id="a", name="x", size=1, correlation_id="c" * 256), "correlation_id"),
            (v.Attach(command_id="a", volume_id=VOL, vm_id="vm"), "vm_id"),
            (v.Attach(command_id="a", volume_id=VOL, vm_id=VM, device_id=3), "device_id"),
            (v.Attach(command_id="a", volume_id=VOL, vm_id=VM, device_id=26), "device_id"),
            (v.Detach(command_id="a"), "volume_id"),
            (v.Cancel(command_id="a", target=""), "target"),
            (v.Snapshot(command_id="a", volume_id=VOL, name=" "), "name"),
            (v.RevertSnapshot(command_id="a", volume_id=VOL, snapshot_id="s"), "snapshot_id"),
            (v.Resize(command_id="a", volume_id=VOL, size=-1), "size"),
            (v.Create(command_id="a", name="x", size=1, traceparent="00-abc-01"), "traceparent"),
            (v.Create(command_id="a", name="x", size=1, traceparent="00-" + "0" * 32 + "-00f067aa0ba902b7-01"), "traceparent"),
            (v.Create(command_id="a", name="x", size=1, tracestate="a=b"), "tracestate"),
        ]
        for command, field in cases:
            with self.subTest(command=command):
                self.assert_field(command, field)

    def test_what_the_client_refuses_the_schema_refuses_too(self):
        schema = command_schema()
        for body in [
            {"command_id": "a", "type": "create", "name": "", "size": 1},
            {"command_id": "a", "type": "attach", "volume_id": VOL, "vm_id": VM, "device_id": 3},
            {"command_id": "bad id!", "type": "detach", "volume_id": VOL},
        ]:
            self.assertTrue(list(schema.iter_errors(body)), body)

    def test_an_oversized_body_is_refused(self):
        self.assert_field(v.Create(command_id="a", name="x", size=1, metadata={"k": "x" * v.MAX_COMMAND_SIZE}), "")


class Events(unittest.TestCase):
    def test_a_failed_event_raises_its_code_and_hint(self):
        body = json.dumps({
            "specversion": "1.0", "id": "e1", "source": "volume-daemon", "type": "volume.attach.failed",
            "time": "2026-12-04T00:00:00Z", "datacontenttype": "application/json",
            "data": {"command_id": "c", "type": "attach", "status": "failed",
                     "error": {"code": "VOLUME_IN_USE", "message": "m", "retryable": False, "hint": "h", "cloudstack_error_code": 536}},
        }).encode()
        event = v.parse_event(body)
        with self.assertRaises(v.CommandError) as raised:
            event.raise_for_status()
        e = raised.exception
        self.assertEqual((e.code, e.retryable, e.hint, e.cloudstack_error_code), ("VOLUME_IN_USE", False, "h", 536))

    def test_something_else_is_not_an_event(self):
        with self.assertRaises(v.VolumeClientError):
            v.parse_event(b"{}")


if __name__ == "__main__":
    unittest.main()
