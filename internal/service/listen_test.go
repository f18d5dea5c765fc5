package service

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/nix-offload/nix-offload/internal/testbed"
)

// roundTrip connects to ln's address, accepts the connection and checks that a byte passes;
// it returns the uid PeerUID reports for the connecting side.
func roundTrip(t *testing.T, ln net.Listener) uint32 {
	t.Helper()
	c, err := net.Dial("unix", ln.Addr().String())
	if err != nil {
		t.Fatalf("connecting to %s: %v", ln.Addr(), err)
	}
	defer c.Close()
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := c.Write([]byte{42}); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	if _, err := io.ReadFull(s, b); err != nil || b[0] != 42 {
		t.Fatalf("read %v, %v; want 42", b, err)
	}
	uid, err := PeerUID(s)
	if err != nil {
		t.Fatal(err)
	}
	return uid
}

func TestListenCreatesRootOnlySocket(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "run", "nix-offload") // neither exists yet
	path := filepath.Join(dir, "hook.sock")
	ln, activated, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if activated {
		t.Error("activated = true without systemd")
	}
	if got := ln.Addr().String(); got != path {
		t.Errorf("Addr() = %q, want %q", got, path)
	}

	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode() != fs.ModeSocket|0o600 {
		t.Errorf("socket mode = %v, want %v", fi.Mode(), fs.ModeSocket|0o600)
	}
	if st := fi.Sys().(*syscall.Stat_t); int(st.Uid) != os.Getuid() {
		t.Errorf("socket owner = %d, want %d", st.Uid, os.Getuid())
	}
	di, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !di.IsDir() || di.Mode().Perm()&^0o755 != 0 {
		t.Errorf("directory mode = %v, want a directory with at most 0755", di.Mode())
	}
	// The private directory the socket was bound in is gone.
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("directory holds %v, want only hook.sock", entries)
	}

	if uid := roundTrip(t, ln); int(uid) != os.Getuid() {
		t.Errorf("PeerUID = %d, want %d", uid, os.Getuid())
	}

	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Errorf("socket after Close: %v, want it removed", err)
	}
}

// staleSocket leaves a socket file at path that nobody listens on, as a crashed broker would.
func staleSocket(t *testing.T, path string) os.FileInfo {
	t.Helper()
	ul, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ul.SetUnlinkOnClose(false)
	ul.Close()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := net.Dial("unix", path); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("the stale socket is not stale: dial: %v", err)
	}
	return fi
}

func TestListenReplacesStaleSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "hook.sock")
	old := staleSocket(t, path)

	ln, _, err := Listen(path)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	defer ln.Close()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if os.SameFile(fi, old) {
		t.Error("the stale socket file is still there")
	}
	if fi.Mode() != fs.ModeSocket|0o600 {
		t.Errorf("socket mode = %v, want %v", fi.Mode(), fs.ModeSocket|0o600)
	}
	roundTrip(t, ln)
}

func TestListenLeavesLiveSocketAlone(t *testing.T) {
	path := filepath.Join(t.TempDir(), "hook.sock")
	first, _, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	before, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	probe := make(chan error, 1)
	go func() { // the second Listen connects once to see whether anyone answers
		c, err := first.Accept()
		if err == nil {
			c.Close()
		}
		probe <- err
	}()

	ln, _, err := Listen(path)
	if err == nil {
		ln.Close()
		t.Fatal("a second Listen on a live socket succeeded")
	}
	if want := "another broker is listening on " + path; err.Error() != want {
		t.Errorf("error = %q, want %q", err, want)
	}
	if err := <-probe; err != nil {
		t.Fatal(err)
	}
	after, err := os.Lstat(path)
	if err != nil || !os.SameFile(before, after) {
		t.Fatalf("the live socket was touched: %v", err)
	}
	roundTrip(t, first)
}

func TestListenNeverRemovesOtherFiles(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "hook.sock")
	if err := os.WriteFile(path, []byte("precious"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, _, err := Listen(path)
	if want := path + " exists and is not a socket (a regular file); not removing it"; err == nil || err.Error() != want {
		t.Fatalf("Listen over a regular file: %v, want %q", err, want)
	}
	if b, err := os.ReadFile(path); err != nil || string(b) != "precious" {
		t.Errorf("the file is now %q, %v", b, err)
	}

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, _, err := Listen(path); err == nil || !strings.Contains(err.Error(), "is not a socket (a directory)") {
		t.Fatalf("Listen over a directory: %v, want an error saying it is not a socket", err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("%s holds %v afterwards, want only the directory", dir, entries)
	}
}

func TestListenCloseKeepsAReplacement(t *testing.T) {
	path := filepath.Join(t.TempDir(), "hook.sock")
	ln, _, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	// Someone removed our socket and put another in its place: Close must not remove theirs.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	other := staleSocket(t, path)
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(path); err != nil || !os.SameFile(fi, other) {
		t.Errorf("Close removed a socket it had not created: %v", err)
	}
}

func TestListenPathTooLong(t *testing.T) {
	path := "/run/" + strings.Repeat("x", 120) + "/hook.sock"
	_, _, err := Listen(path)
	if err == nil || !strings.Contains(err.Error(), "too long") {
		t.Fatalf("Listen(%d bytes): %v, want an error saying the path is too long", len(path), err)
	}
	if _, err := os.Lstat(filepath.Dir(path)); !os.IsNotExist(err) {
		t.Errorf("Listen created %s: %v", filepath.Dir(path), err)
	}
}

// TestListenOtherUsersCannotConnect runs a helper as nobody: it must be refused by the 0600
// socket, and be let in (with PeerUID saying who it is) once the mode is loosened, which shows
// that the refusal came from the socket's mode and not from the test's set-up.
func TestListenOtherUsersCannotConnect(t *testing.T) {
	testbed.RequireUser(t, "to run a helper as another user")
	const nobody = 65534
	// Everything on the way to the socket and to the helper binary must be open to nobody.
	dir, err := os.MkdirTemp("", "nix-offload-service-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(dir, "helper")
	copyExecutable(t, exe)
	path := filepath.Join(dir, "run", "hook.sock")

	ln, _, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	connectAsNobody := func() string {
		cmd := exec.Command(exe)
		// GORACE: a race-enabled helper would otherwise sleep 1 s before exiting.
		cmd.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=0", helperEnv+"=connect", sockEnv+"="+path)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
		cmd.Stderr = os.Stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("helper: %v", err)
		}
		return strings.TrimSpace(string(out))
	}

	if got := connectAsNobody(); got != "error: dial unix "+path+": connect: permission denied" {
		t.Errorf("nobody connecting to the 0600 socket: %q, want permission denied", got)
	}

	if err := os.Chmod(path, 0o666); err != nil {
		t.Fatal(err)
	}
	accepted := make(chan uint32, 1)
	go func() {
		defer close(accepted)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		if uid, err := PeerUID(c); err == nil {
			accepted <- uid
		}
	}()
	if got := connectAsNobody(); got != "connected" {
		t.Fatalf("nobody connecting to a 0666 socket: %q; the test's set-up is wrong", got)
	}
	if uid, ok := <-accepted; !ok || uid != nobody {
		t.Errorf("PeerUID of nobody's connection = %d (%v), want %d", uid, ok, nobody)
	}
}

// copyExecutable copies the test binary to path, mode 0755.
func copyExecutable(t *testing.T, path string) {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o755); err != nil {
		t.Fatal(err)
	}
}

func TestPeerUID(t *testing.T) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		uid, err := PeerUID(c)
		c.Close()
		if err != nil {
			t.Fatal(err)
		}
		if int(uid) != os.Getuid() {
			t.Errorf("PeerUID = %d, want %d", uid, os.Getuid())
		}
	}

	tcp, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer tcp.Close()
	c, err := net.Dial("tcp", tcp.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := PeerUID(c); err == nil || !strings.Contains(err.Error(), "not a unix connection") {
		t.Errorf("PeerUID of a TCP connection: %v, want an error", err)
	}
}

// activationFile returns a new descriptor for the socket of c (a listener or connection), named
// as systemd would name it in LISTEN_FDNAMES.
func activationFile(t *testing.T, c interface{ File() (*os.File, error) }, name string) *os.File {
	t.Helper()
	f, err := c.File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd, err := syscall.Dup(int(f.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	syscall.CloseOnExec(fd)
	return os.NewFile(uintptr(fd), name)
}

func newUnixListener(t *testing.T, path string) *net.UnixListener {
	t.Helper()
	ul, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ul.Close() })
	return ul
}

func unixgram(t *testing.T, path string) *net.UnixConn {
	t.Helper()
	uc, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { uc.Close() })
	return uc
}

func TestFromActivation(t *testing.T) {
	dir := t.TempDir()
	a := newUnixListener(t, filepath.Join(dir, "a.sock"))
	b := newUnixListener(t, filepath.Join(dir, "b.sock"))
	dgram := unixgram(t, filepath.Join(dir, "d.sock"))
	tcp, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer tcp.Close()
	regular, err := os.Create(filepath.Join(dir, "file"))
	if err != nil {
		t.Fatal(err)
	}
	regular.Close()
	pair, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(pair[0])
	defer syscall.Close(pair[1])

	// Each function returns a fresh descriptor, as systemd would pass it.
	type fileFunc func(name string) *os.File
	var (
		lnA     fileFunc = func(n string) *os.File { return activationFile(t, a, n) }
		lnB     fileFunc = func(n string) *os.File { return activationFile(t, b, n) }
		dgramFD fileFunc = func(n string) *os.File { return activationFile(t, dgram, n) }
		tcpFD   fileFunc = func(n string) *os.File { return activationFile(t, tcp, n) }
		fileFD  fileFunc = func(n string) *os.File {
			fd, err := syscall.Open(filepath.Join(dir, "file"), syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			return os.NewFile(uintptr(fd), n)
		}
		connFD fileFunc = func(n string) *os.File { // a connected stream socket, not a listener
			fd, err := syscall.Dup(pair[0])
			if err != nil {
				t.Fatal(err)
			}
			return os.NewFile(uintptr(fd), n)
		}
	)

	type file struct {
		f    fileFunc
		name string
	}
	tests := []struct {
		name    string
		files   []file
		want    string // the chosen listener's address, or
		wantErr string // a part of the error
	}{
		{"one unnamed", []file{{lnA, "LISTEN_FD_3"}}, a.Addr().String(), ""},
		{"the one named hook", []file{{lnA, "other"}, {lnB, "hook"}}, b.Addr().String(), ""},
		{"first unix listener", []file{{dgramFD, "LISTEN_FD_3"}, {tcpFD, "LISTEN_FD_4"}, {lnB, "LISTEN_FD_5"}, {lnA, "LISTEN_FD_6"}}, b.Addr().String(), ""},
		{"hook is a datagram socket", []file{{lnA, "other"}, {dgramFD, "hook"}}, "", `fd 4 ("hook") is a unix datagram socket, not a stream socket`},
		{"only datagram", []file{{dgramFD, "LISTEN_FD_3"}}, "", "no listening unix stream socket (ListenStream= with a path): fd 3 is a unix datagram socket, not a stream socket"},
		{"tcp and a file", []file{{tcpFD, "web"}, {fileFD, "LISTEN_FD_4"}}, "", `fd 3 ("web") is not a unix socket (address family 2); fd 4 is not a socket`},
		{"hook is not listening", []file{{connFD, "hook"}, {lnA, "LISTEN_FD_4"}}, "", `fd 3 ("hook") is a unix stream socket that is not listening`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var files []*os.File
			for _, f := range tt.files {
				files = append(files, f.f(f.name))
			}
			ln, err := fromActivation(files)
			for _, f := range files {
				if f.Fd() != ^uintptr(0) {
					t.Errorf("%s left open", f.Name())
				}
			}
			if tt.wantErr != "" {
				if err == nil {
					ln.Close()
					t.Fatalf("picked %s, want an error", ln.Addr())
				}
				if !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %q does not contain %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			if got := ln.Addr().String(); got != tt.want {
				t.Errorf("picked %s, want %s", got, tt.want)
			}
			roundTrip(t, ln)
		})
	}
}

// TestListenActivatedFake passes a listening socket to a helper as fd 3 with LISTEN_FDS=1, the
// way systemd does; the helper sets LISTEN_PID itself, since only it knows its pid.
func TestListenActivatedFake(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "s.sock")
	ul := newUnixListener(t, sock)
	ul.SetUnlinkOnClose(false)
	f, err := ul.File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	unused := filepath.Join(dir, "unused", "hook.sock")
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=0", helperEnv+"=serve", fakePIDEnv+"=1", sockEnv+"="+unused, "LISTEN_FDS=1", "LISTEN_FDNAMES=hook")
	cmd.ExtraFiles = []*os.File{f}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line := readLine(t, sock)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("helper: %v", err)
	}
	if want := fmt.Sprintf(`activated=true addr=%s peer=%d env=""`, sock, os.Getuid()); line != want {
		t.Errorf("helper said %q, want %q", line, want)
	}
	if _, err := os.Lstat(filepath.Dir(unused)); !os.IsNotExist(err) {
		t.Errorf("the activated helper created %s: %v", filepath.Dir(unused), err)
	}
	if _, err := os.Lstat(sock); err != nil {
		t.Errorf("the activated socket is gone after the helper closed it: %v", err)
	}
}
