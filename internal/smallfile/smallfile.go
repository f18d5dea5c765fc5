// Package smallfile reads the small files a user points the tools at (offload.toml, the
// machines files `builders` includes, private keys) without trusting the path: it must name
// a regular file of bounded size, checked before a byte is read.
//
// A path is whatever a configuration or a command line says, and the hook runs as root inside
// nix-daemon. Read naively, /dev/zero grows the process until the kernel kills it, a FIFO
// blocks the open (and the read) forever with no timeout to save it, /dev/stdin is Nix's
// protocol stream, and a directory gives "read /tmp: is a directory", which does not say that
// /tmp was given as the configuration. [Read] opens without blocking (O_NONBLOCK, so a FIFO
// with no writer opens at once), looks at what it opened, and refuses anything but a regular
// file, naming the path and the kind of file it found.
package smallfile

import (
	"fmt"
	"io"
	"io/fs"
	"os"
	"syscall"
)

// NotRegularError is a path that names something other than a regular file.
type NotRegularError struct {
	Path string
	Kind string // "a directory", "a named pipe (FIFO)", "a device", "a socket", …
}

func (e *NotRegularError) Error() string {
	return fmt.Sprintf("%s is %s, not a regular file", e.Path, e.Kind)
}

// TooLargeError is a file larger than the reader's bound.
type TooLargeError struct {
	Path string
	Max  int64
}

func (e *TooLargeError) Error() string {
	return fmt.Sprintf("%s is larger than %s", e.Path, humanSize(e.Max))
}

// Read returns the contents of the regular file at path, which must be at most max bytes.
// A file that does not exist gives an error for which errors.Is(err, fs.ErrNotExist) holds;
// one that is not a regular file gives a [*NotRegularError], and one larger than max a
// [*TooLargeError]. It never blocks on a FIFO or reads from a device.
func Read(path string, max int64) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, &NotRegularError{Path: path, Kind: kind(fi.Mode())}
	}
	if fi.Size() > max {
		return nil, &TooLargeError{Path: path, Max: max}
	}
	// The size can grow after Stat (or lie, in /proc): the read has its own bound.
	data, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > max {
		return nil, &TooLargeError{Path: path, Max: max}
	}
	return data, nil
}

func kind(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "a directory"
	case m&fs.ModeNamedPipe != 0:
		return "a named pipe (FIFO)"
	case m&fs.ModeSocket != 0:
		return "a socket"
	case m&fs.ModeCharDevice != 0:
		return "a character device"
	case m&fs.ModeDevice != 0:
		return "a block device"
	}
	return "of type " + m.Type().String()
}

func humanSize(n int64) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d bytes", n)
}
