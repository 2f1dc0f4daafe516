package volumeclient_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The repository README's Go example, run as written with `go run`.
func TestTheReadmeExampleRunsAsWritten(t *testing.T) {
	d := needDaemon(t)
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, found := strings.Cut(string(readme), "<!-- go-example -->\n```go\n")
	code, _, closed := strings.Cut(rest, "\n```")
	if !found || !closed {
		t.Fatal("the README has no Go example after <!-- go-example -->")
	}
	main := filepath.Join(t.TempDir(), "main.go")
	if err := os.WriteFile(main, []byte(code+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "run", main)
	cmd.Env = append(os.Environ(), "AMQP_URL="+d.url, "AMQP_PREFIX="+d.prefix, "VM_ID="+d.vm)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("go run of the README example: %v\n%s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	want := []string{"volume.create.completed ", "volume.attach.completed ", "mode: remote", "volume.detach.completed ", "volume.delete.completed "}
	if len(lines) != len(want) {
		t.Fatalf("output:\n%s", out)
	}
	volume := strings.TrimPrefix(lines[0], want[0])
	for i, w := range want {
		if !strings.HasPrefix(lines[i], w) || (strings.HasSuffix(w, " ") && lines[i] != w+volume) {
			t.Fatalf("line %d: %q, want %q + the volume id %q\n%s", i, lines[i], w, volume, out)
		}
	}
}
