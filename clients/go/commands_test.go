package volumeclient_test

import (
	"errors"
	"strings"
	"testing"

	"volume-daemon/volumeclient"
)

const (
	vol = "3106013a-e175-423e-a090-1f2c6b7d8e9f"
	vm  = "9a1c2b3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d"
)

func TestInvalidCommandsAreRefusedBeforePublishingAndNameTheField(t *testing.T) {
	id := volumeclient.Common{CommandID: "c1"}
	cases := []struct {
		cmd   volumeclient.Command
		field string
	}{
		{&volumeclient.Create{Common: volumeclient.Common{CommandID: "has space"}, Name: "n", Size: 1}, "command_id"},
		{&volumeclient.Create{Common: volumeclient.Common{CommandID: strings.Repeat("x", 65)}, Name: "n", Size: 1}, "command_id"},
		{&volumeclient.Create{Common: id, Name: "", Size: 1}, "name"},
		{&volumeclient.Create{Common: id, Name: "n", Size: 0}, "size"},
		{&volumeclient.Create{Common: id, Name: "n", Size: 1, ZoneID: "zone-1"}, "zone_id"},
		{&volumeclient.Create{Common: id, Name: "n", Size: 1, DiskOfferingID: "x"}, "disk_offering_id"},
		{&volumeclient.Attach{Common: id, VolumeID: vol, VMID: vm, DeviceID: volumeclient.DeviceID(3)}, "device_id"},
		{&volumeclient.Attach{Common: id, VolumeID: vol, VMID: vm, DeviceID: volumeclient.DeviceID(26)}, "device_id"},
		{&volumeclient.Attach{Common: id, VolumeID: vol}, "vm_id"},
		{&volumeclient.Detach{Common: id, VolumeID: "not-a-uuid"}, "volume_id"},
		{&volumeclient.Delete{Common: id}, "volume_id"},
		{&volumeclient.Cancel{Common: id, Target: ""}, "target"},
		{&volumeclient.Reconcile{Common: id, VMID: "vm-1"}, "vm_id"},
		{&volumeclient.Snapshot{Common: id, VolumeID: vol, Name: strings.Repeat("n", 181)}, "name"},
		{&volumeclient.Snapshot{Common: id}, "volume_id"},
		{&volumeclient.RevertSnapshot{Common: id, VolumeID: vol, SnapshotID: "snap-1"}, "snapshot_id"},
		{&volumeclient.DeleteSnapshot{Common: id, VolumeID: vol}, "snapshot_id"},
		{&volumeclient.Resize{Common: id, VolumeID: vol}, "size"},
		{&volumeclient.Detach{Common: volumeclient.Common{CommandID: "c1", CorrelationID: strings.Repeat("c", 256)}, VolumeID: vol}, "correlation_id"},
		{&volumeclient.Detach{Common: volumeclient.Common{CommandID: "c1", Metadata: map[string]string{"big": strings.Repeat("m", 70000)}}, VolumeID: vol}, ""},
	}
	for _, tc := range cases {
		_, err := volumeclient.Encode(tc.cmd)
		var invalid *volumeclient.InvalidCommandError
		if !errors.As(err, &invalid) || invalid.Field != tc.field {
			t.Errorf("%T %+v: got %v, want an invalid %q", tc.cmd, tc.cmd, err, tc.field)
		}
	}
}

func TestValidCommandsEncodeAsTheWireFormatAndParseBack(t *testing.T) {
	cmds := []volumeclient.Command{
		&volumeclient.Create{Common: volumeclient.Common{CommandID: "c1", CorrelationID: "job-7", Metadata: map[string]string{"k": "v"}}, Name: "disk0", Size: 5 * volumeclient.GiB, ZoneID: vm},
		&volumeclient.Attach{Common: volumeclient.Common{CommandID: "c2"}, VolumeID: vol, VMID: vm, DeviceID: volumeclient.DeviceID(0)},
		&volumeclient.Detach{Common: volumeclient.Common{CommandID: "c3"}, VolumeID: vol},
		&volumeclient.Delete{Common: volumeclient.Common{CommandID: "c4"}, VolumeID: vol},
		&volumeclient.Cancel{Common: volumeclient.Common{CommandID: "c5"}, Target: "c2"},
		&volumeclient.Reconcile{Common: volumeclient.Common{CommandID: "c6"}},
		&volumeclient.Snapshot{Common: volumeclient.Common{CommandID: "c7"}, VolumeID: vol, Name: "before"},
		&volumeclient.RevertSnapshot{Common: volumeclient.Common{CommandID: "c8"}, VolumeID: vol, SnapshotID: vm},
		&volumeclient.DeleteSnapshot{Common: volumeclient.Common{CommandID: "c9"}, VolumeID: vol, SnapshotID: vm},
		&volumeclient.Resize{Common: volumeclient.Common{CommandID: "c10"}, VolumeID: vol, Size: 2 * volumeclient.GiB, ShrinkOK: true},
	}
	want := []string{
		`{"command_id":"c1","type":"create","correlation_id":"job-7","metadata":{"k":"v"},"name":"disk0","size":5368709120,"zone_id":"` + vm + `"}`,
		`{"command_id":"c2","type":"attach","volume_id":"` + vol + `","vm_id":"` + vm + `","device_id":0}`,
		`{"command_id":"c3","type":"detach","volume_id":"` + vol + `"}`,
		`{"command_id":"c4","type":"delete","volume_id":"` + vol + `"}`,
		`{"command_id":"c5","type":"cancel","target":"c2"}`,
		`{"command_id":"c6","type":"reconcile"}`,
		`{"command_id":"c7","type":"snapshot","name":"before","volume_id":"` + vol + `"}`,
		`{"command_id":"c8","type":"revert_snapshot","volume_id":"` + vol + `","snapshot_id":"` + vm + `"}`,
		`{"command_id":"c9","type":"delete_snapshot","volume_id":"` + vol + `","snapshot_id":"` + vm + `"}`,
		`{"command_id":"c10","type":"resize","size":2147483648,"volume_id":"` + vol + `","shrink_ok":true}`,
	}
	for i, c := range cmds {
		body, err := volumeclient.Encode(c)
		if err != nil || string(body) != want[i] {
			t.Fatalf("%s: %s (%v), want %s", c.Type(), body, err, want[i])
		}
		back, err := volumeclient.ParseCommand(body)
		if err != nil {
			t.Fatal(err)
		}
		again, _ := volumeclient.Encode(back)
		if string(again) != string(body) {
			t.Fatalf("round trip of %s: %s", body, again)
		}
	}
	if _, err := volumeclient.ParseCommand([]byte(`{"command_id":"x","type":"grow"}`)); err == nil {
		t.Fatal("an unknown type parsed")
	}
}

func TestNewCommandIDsAreUUIDsAndDiffer(t *testing.T) {
	a, b := volumeclient.NewCommandID(), volumeclient.NewCommandID()
	if a == b || len(a) != 36 || a[14] != '4' {
		t.Fatalf("%s %s", a, b)
	}
	if _, err := volumeclient.Encode(&volumeclient.Detach{Common: volumeclient.Common{CommandID: a}, VolumeID: b}); err != nil {
		t.Fatal(err)
	}
}

func TestRedactHidesThePasswordOnly(t *testing.T) {
	for in, want := range map[string]string{
		"amqp://guest:s3cret@10.0.0.1:5672/%2f": "amqp://guest:***@10.0.0.1:5672/%2f",
		"amqps://user@host/vh":                  "amqps://user@host/vh",
		"amqp://127.0.0.1":                      "amqp://127.0.0.1",
	} {
		if got := volumeclient.Redact(in); got != want {
			t.Errorf("Redact(%q) = %q, want %q", in, got, want)
		}
	}
}
