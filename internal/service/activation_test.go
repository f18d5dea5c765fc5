package service

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/testbed"
)

// startActivated runs the "serve" helper under systemd-socket-activate listening on sock, with
// extra options for the tool, and returns it with its stderr.
func startActivated(t *testing.T, sock string, opts ...string) (*exec.Cmd, *bytes.Buffer) {
	t.Helper()
	testbed.RequireUser(t, "to run systemd-socket-activate")
	socketActivate := testbed.Tool(t, "systemd-socket-activate", "apt-get install systemd")
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	// The tool passes its children only TERM, PATH, HOME and what -E names.
	args := append([]string{"-l", sock}, opts...)
	args = append(args,
		"-E", helperEnv+"=serve",
		"-E", sockEnv+"="+filepath.Join(filepath.Dir(sock), "unused", "hook.sock"),
		"-E", "GORACE=atexit_sleep_ms=0",
		exe)
	cmd := exec.Command(socketActivate, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	return cmd, &stderr
}

// TestSocketActivation proves that Listen takes the socket systemd's own tool passes: the tool
// listens, starts the helper on the first connection, and the helper serves that connection
// on the socket it was given.
func TestSocketActivation(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "s.sock")
	cmd, stderr := startActivated(t, sock, "--fdname="+ActivationName)

	line := readLine(t, sock) // this connection is what makes the tool start the helper
	if err := cmd.Wait(); err != nil {
		t.Fatalf("helper: %v\n%s", err, stderr)
	}
	if want := fmt.Sprintf(`activated=true addr=%s peer=%d env=""`, sock, os.Getuid()); line != want {
		t.Errorf("helper said %q, want %q\n%s", line, want, stderr)
	}
	if _, err := os.Lstat(filepath.Join(dir, "unused")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the activated helper created a socket of its own: %v", err)
	}
}

// TestSocketActivationDatagram gives Listen a datagram socket through the same tool: it must
// fail and say what it got.
func TestSocketActivationDatagram(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s.sock")
	cmd, stderr := startActivated(t, sock, "--datagram")

	// The tool starts the helper when the first datagram arrives.
	var err error
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		var c net.Conn
		if c, err = net.Dial("unixgram", sock); err == nil {
			_, err = c.Write([]byte("wake up"))
			c.Close()
			break
		}
	}
	if err != nil {
		t.Fatalf("sending to the tool's socket: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the helper did not exit")
	}
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != listenError {
		t.Fatalf("helper: %v, want exit status %d\n%s", err, listenError, stderr)
	}
	want := "socket activation: systemd passed no listening unix stream socket (ListenStream= with a path): fd 3 is a unix datagram socket, not a stream socket"
	if !strings.Contains(stderr.String(), want) {
		t.Errorf("stderr:\n%s\nwant it to contain %q", stderr, want)
	}
}
