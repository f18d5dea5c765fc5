package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/service"
	"github.com/nix-offload/nix-offload/internal/testbed"
)

// The broker's socket is root's: its mode keeps other users from connecting, and the server
// refuses any peer whose uid is not 0 in case the mode is ever wrong (a socket unit with
// another SocketMode, a path in a shared directory).

// serveOn serves b's API on a fresh unix socket in dir with the given peerUID and returns
// the socket's path; each tune changes the server before it serves.
func serveOn(t *testing.T, b *Broker, dir string, peerUID func(net.Conn) (uint32, error), tune ...func(*Server)) string {
	t.Helper()
	path := filepath.Join(dir, "hook.sock")
	ln, _, err := service.Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(b, peerUID)
	for _, f := range tune {
		f(srv)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return path
}

// request sends method path (with body, if any) over the unix socket and returns the status
// code and body.
func request(t *testing.T, socket, method, path, body string) (int, string) {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", socket)
	}}, Timeout: 10 * time.Second}
	defer hc.CloseIdleConnections()
	req, err := http.NewRequest(method, "http://broker"+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestServerRefusesNonRootPeers: every endpoint answers 403 to a peer whose uid is not 0, and
// to one whose uid cannot be read; root gets through. (The uid is given by a stub here; the
// test below has the kernel report it.)
func TestServerRefusesNonRootPeers(t *testing.T) {
	endpoints := []struct{ method, path, body string }{
		{"GET", brokerapi.Prefix + "/status", ""},
		{"POST", brokerapi.Prefix + "/try", `{"drvPath":"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x.drv","system":"x86_64-linux","amWilling":true}`},
		{"POST", brokerapi.Prefix + "/builds", `{}`},
		{"GET", brokerapi.Prefix + "/builds/1/nar/x", ""},
		{"POST", brokerapi.Prefix + "/builds/1/imported", ""},
		{"DELETE", brokerapi.Prefix + "/builds/1", ""},
	}
	for name, peer := range map[string]func(net.Conn) (uint32, error){
		"uid 65534":  func(net.Conn) (uint32, error) { return 65534, nil },
		"uid 1000":   func(net.Conn) (uint32, error) { return 1000, nil },
		"uid failed": func(net.Conn) (uint32, error) { return 0, errors.New("no SO_PEERCRED") },
	} {
		t.Run(name, func(t *testing.T) {
			b := newTestBroker(t, testMachine("b1", 1, "x86_64-linux"))
			socket := serveOn(t, b, t.TempDir(), peer)
			for _, e := range endpoints {
				code, body := request(t, socket, e.method, e.path, e.body)
				if code != http.StatusForbidden || !strings.Contains(body, "only root may use the broker") {
					t.Errorf("%s %s: %d %q, want 403 only root", e.method, e.path, code, body)
				}
			}
		})
	}
	t.Run("control: root", func(t *testing.T) {
		b := newTestBroker(t, testMachine("b1", 1, "x86_64-linux"))
		socket := serveOn(t, b, t.TempDir(), func(net.Conn) (uint32, error) { return 0, nil })
		if code, body := request(t, socket, "GET", brokerapi.Prefix+"/status", ""); code != http.StatusOK {
			t.Errorf("root: %d %q, want 200", code, body)
		}
	})
}

// socketHelperEnv is the socket the helper process that TestSocketIsRootOnly runs as
// nobody connects to.
const socketHelperEnv = "NIX_OFFLOAD_BROKER_TEST_SOCKET"

// TestSocketHelper is not a test: run by TestSocketIsRootOnly as another user, it asks the
// broker for its status and prints "status <code> <body>" or "error: <dial error>".
func TestSocketHelper(t *testing.T) {
	socket := os.Getenv(socketHelperEnv)
	if socket == "" {
		return
	}
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", socket)
	}}, Timeout: 10 * time.Second}
	resp, err := hc.Get("http://broker" + brokerapi.Prefix + "/status")
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) {
			err = op
		}
		fmt.Println("error:", err)
		return
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	fmt.Printf("status %d %s\n", resp.StatusCode, strings.TrimSpace(string(body)))
}

// TestSocketIsRootOnly serves the broker as the daemon does (service.Listen, service.PeerUID)
// and has a process running as nobody connect: the socket (0600, owned by root, in a
// directory nobody cannot write) refuses the connection; with the mode loosened by hand, the
// server itself answers 403.
func TestSocketIsRootOnly(t *testing.T) {
	testbed.RequireUser(t, "to run a helper as another user")
	const nobody = 65534
	// Everything on the way to the socket and to the helper binary must be open to nobody.
	dir := testbed.SharedDir(t, "nix-offload-broker-")
	exe := filepath.Join(dir, "helper")
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(exe, bin, 0o755); err != nil {
		t.Fatal(err)
	}

	b := newTestBroker(t)
	socket := serveOn(t, b, filepath.Join(dir, "run"), service.PeerUID)

	fi, err := os.Lstat(socket)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode() != fs.ModeSocket|0o600 || fi.Sys().(*syscall.Stat_t).Uid != 0 {
		t.Errorf("socket %s: mode %v owner %d, want %v owned by root", socket, fi.Mode(), fi.Sys().(*syscall.Stat_t).Uid, fs.ModeSocket|0o600)
	}
	di, err := os.Stat(filepath.Dir(socket))
	if err != nil {
		t.Fatal(err)
	}
	if di.Mode().Perm()&0o022 != 0 || di.Sys().(*syscall.Stat_t).Uid != 0 {
		t.Errorf("socket directory %s: mode %v, owner %d; want it owned by root and not writable by others",
			filepath.Dir(socket), di.Mode(), di.Sys().(*syscall.Stat_t).Uid)
	}

	asNobody := func() string {
		t.Helper()
		cmd := exec.Command(exe, "-test.run=^TestSocketHelper$")
		cmd.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=0", socketHelperEnv+"="+socket)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
		cmd.Stderr = os.Stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("helper: %v\n%s", err, out)
		}
		for line := range strings.SplitSeq(string(out), "\n") {
			if strings.HasPrefix(line, "status ") || strings.HasPrefix(line, "error: ") {
				return line
			}
		}
		t.Fatalf("helper printed no result:\n%s", out)
		return ""
	}

	if got := asNobody(); got != "error: dial unix "+socket+": connect: permission denied" {
		t.Errorf("nobody connecting to the broker's socket: %q, want permission denied", got)
	}

	// Second lock: the server refuses a non-root peer the kernel names.
	if err := os.Chmod(socket, 0o666); err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf(`status 403 {"error":"only root may use the broker (peer uid %d)"}`, nobody)
	if got := asNobody(); got != want {
		t.Errorf("nobody on a loosened socket: %q, want %q", got, want)
	}
	if code, body := request(t, socket, "GET", brokerapi.Prefix+"/status", ""); code != http.StatusOK {
		t.Errorf("root on the same socket: %d %q, want 200", code, body)
	}
}

// TestStatusCountsConnections: the status counts the API connections open
// now (the caller's included) and every connection accepted since the
// start, which stays counted after the connection closes.
func TestStatusCountsConnections(t *testing.T) {
	b := newTestBroker(t, testMachine("b1", 1, "x86_64-linux"))
	socket := serveOn(t, b, t.TempDir(), func(net.Conn) (uint32, error) { return 0, nil })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	status := func() brokerapi.Status {
		t.Helper()
		code, body := request(t, socket, "GET", brokerapi.Prefix+"/status", "")
		var st brokerapi.Status
		if err := json.Unmarshal([]byte(body), &st); code != http.StatusOK || err != nil {
			t.Fatalf("status: %d %q (%v)", code, body, err)
		}
		return st
	}
	held, err := brokerapi.Dial(ctx, socket)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := held.Status(ctx); err != nil { // its connection stays open, idle
		t.Fatal(err)
	}
	var st brokerapi.Status
	testbed.WaitFor(t, 10*time.Second, "the asker and the held connection alone", func() bool {
		st = status()
		return st.Clients == 2
	})
	if st.Accepted < 2 {
		t.Errorf("accepted %d with 2 connections open, want at least 2", st.Accepted)
	}
	held.Close()
	testbed.WaitFor(t, 10*time.Second, "the held connection to be gone", func() bool {
		next := status()
		if next.Accepted <= st.Accepted {
			t.Fatalf("accepted %d after %d, want more: every status dials anew", next.Accepted, st.Accepted)
		}
		return next.Clients == 1
	})
}
