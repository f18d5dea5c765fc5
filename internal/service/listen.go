package service

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
)

// ActivationName is the name the socket unit gives the broker's socket
// (FileDescriptorName=hook). When systemd passes several sockets, [Listen] takes the one with
// this name.
const ActivationName = "hook"

// maxSocketPath is the longest path bind(2) accepts for a unix socket on Linux:
// sizeof(sun_path) less the terminating NUL.
const maxSocketPath = 107

// probeTimeout bounds the connection attempt that tells a live socket from a stale one.
const probeTimeout = time.Second

// Listen returns the broker's listening socket and whether systemd passed it (socket
// activation).
//
// If systemd passed sockets (LISTEN_PID is this process), Listen uses the one named
// [ActivationName], or else the first one that is a listening unix stream socket, and closes
// the others; it fails if the chosen descriptor is not a listening unix stream socket. It then
// ignores path: the socket unit decides where the socket lives, and ln.Addr() says where. The
// LISTEN_* variables are removed from the environment either way, so that the processes the
// broker starts do not take them for their own.
//
// Otherwise Listen creates the socket at path, mode 0600, owned by the current user:
//   - The parent directory is created (0755) if it is missing.
//   - If a socket file is already there, Listen connects to it. If something answers, it fails
//     with "another broker is listening on PATH" (this includes a socket that systemd holds for
//     socket activation: the probe then starts that broker). If nothing answers, the file is
//     stale and is removed. A path that exists and is not a socket is never removed.
//   - The socket is bound in a new 0700 directory beside path, set to 0600 and then hard-linked
//     to path, which fails rather than replaces if another process created path meanwhile.
//     No other user can connect before the mode is final, and the process-wide umask is left
//     alone, so Listen is safe to call while other goroutines create files.
//
// Closing such a listener removes the socket file, if it is still the one Listen created. Its
// Addr is path; connections accepted from it report the private name the socket was bound
// under as their LocalAddr, which no longer exists.
func Listen(path string) (ln net.Listener, activated bool, err error) {
	if files := activation.Files(true); len(files) > 0 {
		ln, err := fromActivation(files)
		if err != nil {
			return nil, false, err
		}
		return ln, true, nil
	}
	ln, err = listenPath(path)
	if err != nil {
		return nil, false, err
	}
	return ln, false, nil
}

// fromActivation picks the broker's socket among the descriptors systemd passed, turns it into
// a listener and closes every file.
func fromActivation(files []*os.File) (net.Listener, error) {
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	// The descriptors are numbered from 3 (SD_LISTEN_FDS_START) in the order of files.
	describe := func(i int) string {
		if name := files[i].Name(); name != "" && !strings.HasPrefix(name, "LISTEN_FD_") {
			return fmt.Sprintf("fd %d (%q)", 3+i, name)
		}
		return fmt.Sprintf("fd %d", 3+i)
	}
	chosen := -1
	for i, f := range files {
		if f.Name() == ActivationName {
			if err := checkStreamListener(f); err != nil {
				return nil, fmt.Errorf("socket activation: %s %v; want a listening unix stream socket (ListenStream= with a path)", describe(i), err)
			}
			chosen = i
			break
		}
	}
	if chosen < 0 {
		var why []string
		for i, f := range files {
			if err := checkStreamListener(f); err != nil {
				why = append(why, describe(i)+" "+err.Error())
				continue
			}
			chosen = i
			break
		}
		if chosen < 0 {
			return nil, fmt.Errorf("socket activation: systemd passed no listening unix stream socket (ListenStream= with a path): %s", strings.Join(why, "; "))
		}
	}
	ln, err := net.FileListener(files[chosen])
	if err != nil {
		return nil, fmt.Errorf("socket activation: %s: %w", describe(chosen), err)
	}
	return ln, nil
}

// checkStreamListener returns nil if f is a listening AF_UNIX SOCK_STREAM socket and otherwise
// an error saying what it is instead, worded to follow "fd 3 ".
func checkStreamListener(f *os.File) error {
	raw, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var domain, typ, listening int
	var serr error
	err = raw.Control(func(fd uintptr) {
		if domain, serr = socketDomain(int(fd)); serr != nil {
			return
		}
		if typ, serr = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_TYPE); serr != nil {
			return
		}
		listening, serr = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_ACCEPTCONN)
	})
	switch {
	case err != nil:
		return err
	case errors.Is(serr, syscall.ENOTSOCK):
		return errors.New("is not a socket")
	case serr != nil:
		return fmt.Errorf("cannot be inspected: %w", serr)
	case domain != syscall.AF_UNIX:
		return fmt.Errorf("is not a unix socket (address family %d)", domain)
	case typ != syscall.SOCK_STREAM:
		return fmt.Errorf("is a unix %s socket, not a stream socket", socketType(typ))
	case listening == 0:
		return errors.New("is a unix stream socket that is not listening")
	}
	return nil
}

func socketType(typ int) string {
	switch typ {
	case syscall.SOCK_DGRAM:
		return "datagram"
	case syscall.SOCK_SEQPACKET:
		return "seqpacket"
	}
	return fmt.Sprintf("type-%d", typ)
}

// listenPath creates the socket at path itself.
func listenPath(path string) (net.Listener, error) {
	if path == "" {
		return nil, errors.New("no socket path")
	}
	if err := CheckSocketPath(path); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("creating the socket's directory: %w", err)
	}
	// If path appears between the check and the link (another broker starting at the same
	// moment), check again: that reports the other broker, or clears its stale socket.
	for attempt := 0; ; attempt++ {
		if err := removeStale(path); err != nil {
			return nil, err
		}
		ln, err := bindPrivate(path)
		if errors.Is(err, fs.ErrExist) && attempt == 0 {
			continue
		}
		return ln, err
	}
}

// removeStale makes sure nothing is at path, removing a socket nobody listens on. It fails if
// something listens there or if path is not a socket.
func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("%s exists and is not a socket (%s); not removing it", path, fileKind(fi.Mode()))
	}
	c, err := net.DialTimeout("unix", path, probeTimeout)
	if err == nil {
		c.Close()
		return fmt.Errorf("another broker is listening on %s", path)
	}
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil // removed meanwhile
	case !errors.Is(err, syscall.ECONNREFUSED):
		// Only "refused" proves that nobody listens: a full backlog (EAGAIN) or a timeout
		// may be a busy broker.
		return fmt.Errorf("%s exists and did not answer as a stale socket would; not removing it: %w", path, err)
	}
	// Remove it only if it is still the file we probed.
	if again, err := os.Lstat(path); err != nil || !os.SameFile(fi, again) {
		return nil
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("removing stale socket: %w", err)
	}
	return nil
}

func fileKind(m fs.FileMode) string {
	switch {
	case m.IsRegular():
		return "a regular file"
	case m.IsDir():
		return "a directory"
	case m.Type() == fs.ModeSymlink:
		return "a symbolic link"
	}
	return "mode " + m.String()
}

// privateSuffixLen is the most bindPrivate adds to the socket's directory: "/.sock", the up
// to ten digits os.MkdirTemp appends, and "/s".
const privateSuffixLen = len("/.sock") + 10 + len("/s")

// CheckSocketPath reports whether [Listen] can create a socket at path: unix socket paths are
// short (107 bytes on Linux), and Listen binds in a private directory beside path first,
// which takes a few bytes more. `check` and every command that reads the configuration call
// it, so a path that is too long is found before the broker is started.
func CheckSocketPath(path string) error {
	switch {
	case len(path) > maxSocketPath:
		return fmt.Errorf("socket path %s is too long: %d bytes, a unix socket allows %d", path, len(path), maxSocketPath)
	case len(filepath.Dir(path))+privateSuffixLen > maxSocketPath:
		return fmt.Errorf("socket path %s is too long: it is bound in a directory beside it first, which takes %d bytes, and a unix socket allows %d; use a shorter directory",
			path, len(filepath.Dir(path))+privateSuffixLen, maxSocketPath)
	}
	return nil
}

// bindPrivate binds a socket in a new 0700 directory beside path, makes it 0600 and links it to
// path. The error wraps fs.ErrExist if path exists by then.
func bindPrivate(path string) (net.Listener, error) {
	dir, err := os.MkdirTemp(filepath.Dir(path), ".sock")
	if err != nil {
		return nil, fmt.Errorf("creating a private directory for the socket: %w", err)
	}
	defer os.RemoveAll(dir)
	private := filepath.Join(dir, "s")
	if len(private) > maxSocketPath {
		return nil, fmt.Errorf("socket path %s is too long: it is bound as %s first, %d bytes, and a unix socket allows %d", path, private, len(private), maxSocketPath)
	}
	ul, err := net.ListenUnix("unix", &net.UnixAddr{Name: private, Net: "unix"})
	if err != nil {
		return nil, err
	}
	ul.SetUnlinkOnClose(false)
	fail := func(err error) (net.Listener, error) {
		ul.Close()
		return nil, err
	}
	if err := os.Chmod(private, 0o600); err != nil {
		return fail(err)
	}
	if err := os.Link(private, path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fail(fmt.Errorf("%s appeared while we were creating it: %w", path, err))
		}
		return fail(fmt.Errorf("placing the socket: %w", err))
	}
	fi, err := os.Lstat(path)
	if err != nil {
		return fail(err)
	}
	return &unixListener{UnixListener: ul, addr: &net.UnixAddr{Name: path, Net: "unix"}, file: fi}, nil
}

// unixListener is a listener whose socket was bound under another name: it reports the final
// path and removes it on Close.
type unixListener struct {
	*net.UnixListener
	addr *net.UnixAddr
	file os.FileInfo // the socket file, to recognise it at Close
	once sync.Once
}

func (l *unixListener) Addr() net.Addr { return l.addr }

// Close stops listening and removes the socket file, unless another process has replaced it.
func (l *unixListener) Close() error {
	err := l.UnixListener.Close()
	l.once.Do(func() {
		if fi, lerr := os.Lstat(l.addr.Name); lerr == nil && os.SameFile(fi, l.file) {
			os.Remove(l.addr.Name)
		}
	})
	return err
}
