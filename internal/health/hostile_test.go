package health

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/testbed"
)

// nobody is the uid of an unprivileged local user.
const nobody = 65534

// A state directory another user owns, or can write, is not shared through:
// its owner could hold the lock or forge the file. The Tracker says so at
// Open and keeps the backoff in memory. Before, the directory was used as
// it was, and a lock held by that user stalled every failure by 10 s.
func TestStateDirOfAnotherUser(t *testing.T) {
	testbed.RequireRoot(t)
	for _, tc := range []struct {
		name  string
		setUp func(dir string) error
		want  string
	}{
		{"owned by nobody", func(dir string) error { return os.Chown(dir, nobody, nobody) }, "is owned by uid 65534"},
		{"writable by all", func(dir string) error { return os.Chmod(dir, 0o777) }, "is writable by others"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "state")
			if err := os.Mkdir(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			if err := tc.setUp(dir); err != nil {
				t.Fatal(err)
			}
			tr, err := Open(filepath.Join(dir, "health.json"))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Open: %v, want %q", err, tc.want)
			}
			start := time.Now()
			if s, err := tr.Failed("b1", errRefused); s.Failures != 1 || err != nil {
				t.Errorf("Failed = %+v, %v", s, err)
			}
			if took := time.Since(start); took > time.Second {
				t.Errorf("Failed took %v", took)
			}
			if len(tr.Down()) != 1 {
				t.Errorf("Down = %q, want b1 in memory", tr.Down())
			}
		})
	}
}

// A lock file another user planted in our directory is refused at once,
// not waited for, and the failure stays in memory, also across Reload.
func TestPlantedLockFile(t *testing.T) {
	testbed.RequireRoot(t)
	dir := filepath.Join(t.TempDir(), "state")
	path := filepath.Join(dir, "health.json")
	tr, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	lock := path + ".lock"
	if err := os.WriteFile(lock, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(lock, nobody, nobody); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	s, err := tr.Failed("b1", errRefused)
	if took := time.Since(start); took > time.Second {
		t.Errorf("Failed took %v with a planted lock file", took)
	}
	if err == nil || !strings.Contains(err.Error(), "open to other users") || s.Failures != 1 {
		t.Errorf("Failed = %+v, %v", s, err)
	}
	if err := tr.Reload(); err != nil {
		t.Fatal(err)
	}
	if len(tr.Down()) != 1 {
		t.Errorf("after Reload: Down = %q, want the unsaved failure kept", tr.Down())
	}
	// A success of another machine reads the file too (healthy machines
	// are not written): it used to take the file's content whole, and the
	// broker then dialled b1 again at once.
	if err := tr.Succeeded("b2"); err != nil {
		t.Fatal(err)
	}
	if len(tr.Down()) != 1 {
		t.Errorf("after another machine's success: Down = %q, want the unsaved failure kept", tr.Down())
	}
}

// A state directory that cannot be written (full, or read-only) keeps the
// backoff in memory across the broker's Reload every second, and a write
// that works later saves it.
func TestUnwritableStateKeepsBackoff(t *testing.T) {
	testbed.RequireRoot(t)
	dir := filepath.Join(t.TempDir(), "state")
	path := filepath.Join(dir, "health.json")
	tr, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	// Root writes through mode bits: make the file's name a directory, so
	// that the rename over it fails as on a full or read-only disk.
	if err := os.WriteFile(path+".lock", nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(path, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := tr.Failed("b1", errRefused); err == nil {
		t.Fatal("Failed saved the state where it cannot")
	}
	tr.Reload()
	if len(tr.Down()) != 1 {
		t.Fatalf("after Reload: Down = %q, want the failure kept in memory", tr.Down())
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if _, err := tr.Failed("b2", errRefused); err != nil {
		t.Fatal(err)
	}
	other, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := other.Down(); len(got) != 2 {
		t.Errorf("another process sees %q, want b1 (saved late) and b2", got)
	}
}
