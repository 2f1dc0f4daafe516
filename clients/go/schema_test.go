package volumeclient_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"testing"
	"time"

	"volume-daemon/volumeclient"
)

// The daemon's suite captures real commands and events on the broker, checks each against
// schemas/command.schema.json or schemas/event.schema.json, and leaves them in
// VOLUME_EXAMPLES_DIR/{commands,events}. Every one must decode into this package's types and
// encode back with no field lost or changed (null and absent are the same; so are equal
// instants written differently).
func TestTheTypesCarryEveryFieldOfCapturedMessages(t *testing.T) {
	dir := os.Getenv("VOLUME_EXAMPLES_DIR")
	if dir == "" {
		t.Fatal("VOLUME_EXAMPLES_DIR must name the messages the daemon's suite captured (tests/e2e/go_client.rs)")
	}
	commands := readExamples(t, filepath.Join(dir, "commands"))
	events := readExamples(t, filepath.Join(dir, "events"))
	if len(commands) < 8 || len(events) < 10 {
		t.Fatalf("only %d commands and %d events captured", len(commands), len(events))
	}
	for name, body := range commands {
		cmd, err := volumeclient.ParseCommand(body)
		if err != nil {
			t.Fatalf("%s: %v\n%s", name, err, body)
		}
		again, err := volumeclient.Encode(cmd)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		sameJSON(t, name, body, again)
	}
	seen := map[string]bool{}
	for name, body := range events {
		ev, err := volumeclient.ParseEvent(body)
		if err != nil {
			t.Fatalf("%s: %v\n%s", name, err, body)
		}
		again, err := json.Marshal(ev)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		sameJSON(t, name, body, again)
		seen[ev.Type] = true
	}
	for _, ty := range []string{"volume.create.completed", "volume.attach.completed", "volume.detach.completed",
		"volume.delete.completed", "volume.create.failed", "volume.cancel.failed", "volume.reconcile.completed", "volume.unknown.failed"} {
		if !seen[ty] {
			t.Errorf("no %s among the captured events", ty)
		}
	}
}

func readExamples(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*.json"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no examples in %s (%v)", dir, err)
	}
	out := map[string][]byte{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		out[filepath.Base(dir)+"/"+filepath.Base(f)] = b
	}
	return out
}

func sameJSON(t *testing.T, name string, original, encoded []byte) {
	t.Helper()
	var a, b interface{}
	if err := json.Unmarshal(original, &a); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if err := json.Unmarshal(encoded, &b); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if a, b := normalize(a), normalize(b); !reflect.DeepEqual(a, b) {
		ja, _ := json.Marshal(a)
		jb, _ := json.Marshal(b)
		t.Fatalf("%s: the Go types lose or change something:\ncaptured: %s\nre-encoded: %s\ndiffering keys: %v", name, ja, jb, differing(a, b))
	}
}

// normalize drops nulls and empty objects, and writes every RFC 3339 instant one way.
func normalize(v interface{}) interface{} {
	switch v := v.(type) {
	case map[string]interface{}:
		out := map[string]interface{}{}
		for k, x := range v {
			x = normalize(x)
			if m, ok := x.(map[string]interface{}); x == nil || (ok && len(m) == 0) {
				continue
			}
			out[k] = x
		}
		return out
	case []interface{}:
		out := make([]interface{}, len(v))
		for i, x := range v {
			out[i] = normalize(x)
		}
		return out
	case string:
		if ts, err := time.Parse(time.RFC3339Nano, v); err == nil {
			return ts.UTC().Format(time.RFC3339Nano)
		}
	}
	return v
}

func differing(a, b interface{}) []string {
	ma, _ := a.(map[string]interface{})
	mb, _ := b.(map[string]interface{})
	var keys []string
	for k := range ma {
		if !reflect.DeepEqual(ma[k], mb[k]) {
			keys = append(keys, k)
		}
	}
	for k := range mb {
		if _, ok := ma[k]; !ok {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	return keys
}
