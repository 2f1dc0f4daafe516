"""The client against a running daemon (the daemon's suite runs these: tests/e2e/python_client.rs).

Needs AMQP_URL, AMQP_PREFIX, VOLUME_API_URL, VM_ID (a VM other than the host) and HOST_VM_ID
(the VM the daemon runs on, with NBD exports on). Missing ones fail every test, loudly."""

import os
import time
import unittest
import uuid

import pika

import volume_daemon_client as v

ENV = {k: os.environ.get(k, "") for k in ("AMQP_URL", "AMQP_PREFIX", "VOLUME_API_URL", "VM_ID", "HOST_VM_ID")}
WAIT = 60.0


def setUpModule():
    missing = [k for k, val in ENV.items() if not val]
    if missing:
        raise RuntimeError(f"these tests need a running daemon: set {', '.join(missing)}")


class AgainstTheDaemon(unittest.TestCase):
    def setUp(self):
        self.client = v.VolumeClient(ENV["AMQP_URL"], ENV["AMQP_PREFIX"])
        self.api = v.ReadApi(ENV["VOLUME_API_URL"])

    def tearDown(self):
        self.client.close()

    def test_create_attach_to_the_host_detach_delete(self):
        created = self.client.execute(v.Create(name="py-lifecycle", size=v.gib(1), metadata={"by": "python"}), WAIT)
        self.assertEqual(created.type, "volume.create.completed")
        volume = created.data["volume"]["id"]
        self.assertEqual(created.data["metadata"], {"by": "python"})

        attached = self.client.execute(v.Attach(volume_id=volume, vm_id=ENV["HOST_VM_ID"]), WAIT)
        self.assertEqual(attached.data["mode"], "host")
        self.assertTrue(attached.data["device_path"].startswith("/dev/"), attached.data)
        self.assertTrue(attached.data["persistent_path"], attached.data)
        export = attached.data["nbd_export"]
        self.assertEqual(export["name"], f"migration-vol-{volume}")
        seen = self.api.volume(volume)
        self.assertEqual(seen["mapping"]["vm_id"], ENV["HOST_VM_ID"])
        self.assertEqual(seen["nbd_export"]["name"], export["name"])
        self.assertIn(export["name"], [e["name"] for e in self.api.exports()])

        detached = self.client.execute(v.Detach(volume_id=volume), WAIT)
        self.assertFalse(detached.data.get("already_detached"))
        self.assertIsNone(self.api.volume(volume)["mapping"])
        deleted = self.client.execute(v.Delete(volume_id=volume), WAIT)
        self.assertEqual(deleted.status, "completed")
        ops = list(self.api.operations(volume_id=volume))
        self.assertEqual(sorted(o["type"] for o in ops), ["attach", "create", "delete", "detach"], ops)

    def test_an_event_that_arrives_before_the_wait_is_kept(self):
        pending = self.client.publish(v.Create(name="py-early", size=v.gib(1)))
        deadline = time.monotonic() + WAIT
        while (self.api.operation(pending.command_id) or {}).get("status") != "completed":
            self.assertLess(time.monotonic(), deadline, "the operation did not complete")
            time.sleep(0.1)
        time.sleep(0.5)  # the event has left the daemon by now
        event = pending.wait(WAIT)
        self.assertEqual(event.command_id, pending.command_id)
        self.assertIs(pending.wait(1), event, "a second wait returns the same event")

    def test_a_duplicate_command_gets_the_original_event(self):
        command = v.Create(name="py-duplicate", size=v.gib(1))
        first = self.client.publish(command).wait(WAIT)
        again = self.client.publish(command).wait(WAIT)
        self.assertEqual(again.id, first.id)
        self.assertEqual(again.data["volume"]["id"], first.data["volume"]["id"])
        ops = [o for o in self.api.operations(type="create", limit=500) if o["id"] == command.command_id]
        self.assertEqual(len(ops), 1, ops)

    def test_a_failed_command_raises_its_code_retryable_and_hint(self):
        missing = str(uuid.uuid4())
        with self.assertRaises(v.CommandError) as raised:
            self.client.execute(v.Attach(volume_id=missing, vm_id=ENV["VM_ID"]), WAIT)
        e = raised.exception
        self.assertEqual(e.code, "VOLUME_NOT_FOUND", str(e))
        self.assertFalse(e.retryable)
        self.assertTrue(e.hint)
        self.assertEqual(e.event.status, "failed")

    def test_a_missing_topology_and_an_unroutable_command_are_errors(self):
        prefix = f"py-missing-{uuid.uuid4().hex[:8]}"
        with v.VolumeClient(ENV["AMQP_URL"], prefix) as lonely:
            with self.assertRaises(v.TopologyMissingError) as raised:
                lonely.publish(v.Create(name="nowhere", size=1))
            self.assertIn(f"{prefix}.commands", str(raised.exception))
            # An exchange with no queue bound: nobody would execute the command.
            conn = pika.BlockingConnection(pika.URLParameters(ENV["AMQP_URL"]))
            try:
                conn.channel().exchange_declare(f"{prefix}.commands", "topic", auto_delete=True)
                with self.assertRaises(v.UnroutableError):
                    lonely.publish(v.Create(name="nowhere", size=1))
            finally:
                conn.channel().exchange_delete(f"{prefix}.commands")
                conn.close()

    def test_invalid_commands_are_refused_before_anything_is_sent(self):
        with self.assertRaises(v.InvalidCommandError) as raised:
            self.client.publish(v.Attach(volume_id="not-a-uuid", vm_id=ENV["VM_ID"]))
        self.assertEqual(raised.exception.field, "volume_id")

    def test_subscribe_with_explicit_acks(self):
        sub = self.client.subscribe(binding="volume.create.*")
        try:
            created = self.client.execute(v.Create(name="py-subscribed", size=v.gib(1)), WAIT)
            first = self.next_for(sub, created.command_id)
            first.reject(requeue=True)
            again = self.next_for(sub, created.command_id)
            self.assertEqual(again.event.id, first.event.id, "a rejected event comes again")
            again.ack()
        finally:
            sub.close()

    def next_for(self, sub, command_id):
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            d = sub.next(timeout=5)
            if d is None:
                continue
            if d.event is not None and d.event.command_id == command_id:
                return d
            d.ack()
        self.fail(f"no event of {command_id} on the subscription")

    def test_a_commands_trace_comes_back_on_its_event(self):
        trace = uuid.uuid4().hex
        parent = uuid.uuid4().hex[:16]
        command = v.Create(name="py-traced", size=v.gib(1), traceparent=f"00-{trace}-{parent}-01", tracestate="py=1")
        event = self.client.publish(command).wait(WAIT)
        _, event_trace, event_parent, _ = event.traceparent.split("-")
        self.assertEqual(event_trace, trace)
        self.assertNotEqual(event_parent, parent, "the daemon's span is the event's parent")
        self.assertEqual(event.tracestate, "py=1")

    def test_the_read_api_reports_the_daemon_and_unknown_ids(self):
        status = self.api.status()
        self.assertEqual(status["role"], "active", status)
        self.assertIsNone(self.api.operation(f"py-none-{uuid.uuid4().hex[:8]}"))
        self.assertIsNone(self.api.volume(str(uuid.uuid4())))
        with self.assertRaises(v.ReadApiError) as raised:
            self.api.volume("not-a-uuid")
        self.assertEqual(raised.exception.status, 400)


if __name__ == "__main__":
    unittest.main()
