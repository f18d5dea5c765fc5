package smallfile

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestRead: a regular file within the bound is read whole; everything else is refused
// before any byte is read, with the path and what it is, and nothing blocks: not a FIFO
// without a writer, not /dev/zero.
func TestRead(t *testing.T) {
	dir := t.TempDir()
	small := filepath.Join(dir, "offload.toml")
	os.WriteFile(small, []byte("[[machine]]\n"), 0o644)
	big := filepath.Join(dir, "big")
	os.WriteFile(big, make([]byte, 1025), 0o644)
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}

	data, err := Read(small, 1024)
	if err != nil || string(data) != "[[machine]]\n" {
		t.Errorf("regular file: %q, %v", data, err)
	}
	if _, err := Read(filepath.Join(dir, "missing"), 1024); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing file: %v, want fs.ErrNotExist", err)
	}
	for _, tc := range []struct{ path, want string }{
		{dir, dir + " is a directory, not a regular file"},
		{fifo, fifo + " is a named pipe (FIFO), not a regular file"},
		{"/dev/zero", "/dev/zero is a character device, not a regular file"},
		{big, big + " is larger than 1 KiB"},
	} {
		done := make(chan error, 1)
		go func() { _, err := Read(tc.path, 1024); done <- err }()
		select {
		case err := <-done:
			if err == nil || err.Error() != tc.want {
				t.Errorf("Read(%s) = %v, want %q", tc.path, err, tc.want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("Read(%s) blocks", tc.path)
		}
	}
	var nr *NotRegularError
	if _, err := Read(dir, 1024); !errors.As(err, &nr) || !strings.Contains(nr.Kind, "directory") {
		t.Errorf("directory: %v, want a *NotRegularError", err)
	}
}
