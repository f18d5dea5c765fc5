package graph

import (
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestBuildLogReadableUnderStrictUmask: the broker's unit runs it with UMask=0077, and `nix log
// DRV` reads the log file as the user who runs it; the log and the directories made for it are
// readable by all, as Nix leaves its own.
func TestBuildLogReadableUnderStrictUmask(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "log")
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	r := &Remote{LogDir: dir}
	const drv = "/nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-logged.drv"
	w, closeLog, err := r.openLog(drv)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(w, "a log line\n")
	closeLog()
	p := filepath.Join(dir, "drvs", "zz", "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-logged.drv")
	if b, err := os.ReadFile(p); err != nil || string(b) != "a log line\n" {
		t.Fatalf("log at %s: %q, %v", p, b, err)
	}
	for path, want := range map[string]os.FileMode{
		dir: 0o755, filepath.Join(dir, "drvs"): 0o755, filepath.Dir(p): 0o755, p: 0o644,
	} {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != want {
			t.Errorf("%s has mode %v, want %v", path, fi.Mode().Perm(), want)
		}
	}
}
