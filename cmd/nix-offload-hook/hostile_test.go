package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/hookproto"
)

// Careless and hostile inputs at the front doors (issue 19): each test here failed before
// its fix.

// writeMachineConfig writes an offload.toml with one machine at port of 127.0.0.1 whose socket and
// state-dir lie in a temporary directory, and returns its path.
func writeMachineConfig(t *testing.T, port int, extra string) string {
	t.Helper()
	dir := t.TempDir()
	keyFile, hostKey := testKeys(t)
	text := fmt.Sprintf(`[daemon]
socket = %q
state-dir = %q

[[machine]]
host = "127.0.0.1"
port = %d
ssh-key = %q
host-key = %q
systems = ["x86_64-linux"]
features = ["kvm"]
connect-timeout = "5s"
%s`, filepath.Join(dir, "hook.sock"), filepath.Join(dir, "state"), port, keyFile, hostKey, extra)
	path := filepath.Join(dir, "offload.toml")
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestHookEmptyBuildersBuildsLocally: `--builders ""` is how a user, trusted or not, asks Nix
// for a local build. With offload.toml present, the hook fed the stdin Nix really wrote for
// `--builders ""` (2.8, 2.26, 2.34) declines permanently, says why, and connects to no
// machine; fed the default `builders`, the same hook does try the machine.
func TestHookEmptyBuildersBuildsLocally(t *testing.T) {
	lc := newConnCounter(t)
	t.Setenv("NIX_OFFLOAD_CONFIG", writeMachineConfig(t, lc.port(), ""))
	serve := func(t *testing.T, fixture string) (reply, log string) {
		stdin, err := os.ReadFile(filepath.Join("..", "..", "internal", "hookproto", "testdata", fixture))
		if err != nil {
			t.Fatal(err)
		}
		var out, logBuf bytes.Buffer
		h := &hook{in: bytes.NewReader(stdin), out: &out, log: hookproto.NewLogger(&logBuf)}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := h.serve(ctx); err != nil {
			t.Fatalf("serve: %v", err)
		}
		return out.String(), logBuf.String()
	}
	for _, series := range []string{"2.8", "2.26", "2.34"} {
		reply, log := serve(t, "nix-"+series+"-no-builders.bin")
		if reply != "# decline-permanently\n" || !strings.Contains(log, "builders setting is empty") {
			t.Errorf("Nix %s, --builders '': reply %q, log %q; want # decline-permanently and why", series, reply, log)
		}
	}
	if n := lc.connections(); n != 0 {
		t.Errorf("the hook made %d connections although builders was empty", n)
	}
	reply, log := serve(t, "nix-2.34.bin")
	if reply == "# decline-permanently\n" || lc.connections() == 0 {
		t.Errorf("control, default builders: reply %q, no connection; the hook should have tried the machine\n%s", reply, log)
	}
}
