package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/hookproto"
	"github.com/nix-offload/nix-offload/internal/testbed"
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
	if n := lc.connections(t); n != 0 {
		t.Errorf("the hook made %d connections although builders was empty", n)
	}
	reply, log := serve(t, "nix-2.34.bin")
	if reply == "# decline-permanently\n" || lc.connections(t) == 0 {
		t.Errorf("control, default builders: reply %q, no connection; the hook should have tried the machine\n%s", reply, log)
	}
}

// TestNoArguments: the bare command is a usage error (exit 2, with the usage), not a panic.
func TestNoArguments(t *testing.T) {
	code, out, errOut := runCLI(t)
	if code != exitUsage || out != "" || !strings.Contains(errOut, "no command given") || !strings.Contains(errOut, "usage:") {
		t.Errorf("exit %d, stdout %q, stderr %q; want 2 and the usage", code, out, errOut)
	}
}

// TestSubcommandHelp: -h and -help on a subcommand list its flags on stdout and exit 0, as
// `help` does for the whole tool.
func TestSubcommandHelp(t *testing.T) {
	for _, tc := range []struct{ cmd, flag string }{
		{"check", "-config-only"}, {"daemon", "-drain"}, {"status", "-json"},
	} {
		for _, h := range []string{"-h", "-help", "--help"} {
			code, out, errOut := runCLI(t, tc.cmd, h)
			if code != exitOK || errOut != "" || !strings.Contains(out, "usage: nix-offload-hook "+tc.cmd) || !strings.Contains(out, tc.flag) {
				t.Errorf("%s %s: exit %d, stdout %q, stderr %q; want 0 and the flags (%s among them)", tc.cmd, h, code, out, errOut, tc.flag)
			}
		}
	}
	if code, _, errOut := runCLI(t, "check", "-nosuchflag"); code != exitUsage || !strings.Contains(errOut, "check: flag provided but not defined: -nosuchflag") {
		t.Errorf("a wrong flag: exit %d, %q; want 2 naming the subcommand and the flag", code, errOut)
	}
}

// TestConfigNotARegularFile: a configuration path that names a directory, a FIFO or a device
// is refused at once (never read, never blocking), and the message names the path and says
// it was taken as the configuration, and from where.
func TestConfigNotARegularFile(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ path, kind string }{
		{dir, "a directory"},
		{fifo, "a named pipe (FIFO)"},
		{"/dev/zero", "a character device"},
	} {
		done := make(chan struct{})
		var code int
		var errOut string
		go func() {
			defer close(done)
			code, _, errOut = runCLI(t, "check", "-config-only", "-config", tc.path)
		}()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			t.Fatalf("check -config %s does not return", tc.path)
		}
		want := "nix-offload-hook: configuration file (-config): " + tc.path + " is " + tc.kind + ", not a regular file\n"
		if code != exitUsage || errOut != want {
			t.Errorf("-config %s: exit %d, stderr %q; want 2 and %q", tc.path, code, errOut, want)
		}
	}
	t.Setenv("NIX_OFFLOAD_CONFIG", dir)
	if _, _, errOut := runCLI(t, "check", "-config-only"); !strings.Contains(errOut, "configuration file ($NIX_OFFLOAD_CONFIG): "+dir+" is a directory") {
		t.Errorf("$NIX_OFFLOAD_CONFIG=%s: %q; want it named as the source", dir, errOut)
	}
}

// TestHookErrorSaidOnce: in hook mode an error goes to Nix once, as @nix JSON, and is not
// printed a second time in plain text.
func TestHookErrorSaidOnce(t *testing.T) {
	cmd := exec.Command(testbed.HookBinary(t), "7")
	cmd.Stdin = strings.NewReader("") // Nix went away before its settings
	cmd.Env = append(os.Environ(), "NIX_OFFLOAD_CONFIG="+writeMachineConfig(t, 1, ""))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err := cmd.Run()
	if ee := (*exec.ExitError)(nil); !errors.As(err, &ee) || ee.ExitCode() != exitFailed {
		t.Errorf("exit %v, want %d", err, exitFailed)
	}
	if n := strings.Count(stderr.String(), "reading settings from nix"); n != 1 || !strings.HasPrefix(stderr.String(), "@nix ") {
		t.Errorf("the error was said %d times, want once as @nix JSON:\n%s", n, stderr.String())
	}
}

// TestCheckSocketPathTooLong: a [daemon] socket longer than a unix socket allows is a
// configuration error that `check` reports, not something found only when the broker starts.
func TestCheckSocketPathTooLong(t *testing.T) {
	long := "/run/" + strings.Repeat("n", 110) + "/hook.sock"
	path := filepath.Join(t.TempDir(), "offload.toml")
	if err := os.WriteFile(path, []byte("[daemon]\nsocket = \""+long+"\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	code, _, errOut := runCLI(t, "check", "-config-only", "-config", path)
	if want := path + ": daemon.socket: socket path " + long + " is too long"; code != exitUsage || !strings.Contains(errOut, want) {
		t.Errorf("exit %d, stderr %q; want 2 and %q", code, errOut, want)
	}
}

// TestCheckWarnsReadableKey: `check` warns about a private key file that other users can read,
// and is quiet about one that only its owner can.
func TestCheckWarnsReadableKey(t *testing.T) {
	path := writeMachineConfig(t, 1, "")
	cfg, err := loadConfig(path, "", "x86_64-linux")
	if err != nil {
		t.Fatal(err)
	}
	key := cfg.Machines[0].SSHKey
	if _, _, errOut := runCLI(t, "check", "-config-only", "-config", path); strings.Contains(errOut, "warning") {
		t.Errorf("a 0600 key: %q, want no warning", errOut)
	}
	if err := os.Chmod(key, 0o644); err != nil {
		t.Fatal(err)
	}
	code, _, errOut := runCLI(t, "check", "-config-only", "-config", path)
	if want := "nix-offload-hook: warning: ssh-key " + key + " (of 127.0.0.1:1) can be read by other users (mode 0644)"; code != exitOK || !strings.Contains(errOut, want) {
		t.Errorf("a 0644 key: exit %d, stderr %q; want 0 and %q", code, errOut, want)
	}
}

// fakeBrokerEnv makes the test binary a fake broker (TestFakeBrokerHelper) on that socket.
const fakeBrokerEnv = "NIX_OFFLOAD_FAKE_BROKER_SOCKET"

// TestFakeBrokerHelper is not a test: run by TestStatusRefusesForeignBroker as another user,
// it serves a made-up status on the socket in $NIX_OFFLOAD_FAKE_BROKER_SOCKET, prints
// "listening" and serves until its stdin closes.
func TestFakeBrokerHelper(t *testing.T) {
	socket := os.Getenv(fakeBrokerEnv)
	if socket == "" {
		return
	}
	ln, err := net.Listen("unix", socket)
	if err != nil {
		fmt.Println("error:", err)
		return
	}
	go http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, `{"version":"evil","machines":[{"name":"root@fake-builder","systems":["x86_64-linux"],"enabled":true,"up":true}]}`)
	}))
	fmt.Println("listening")
	io.Copy(io.Discard, os.Stdin)
}

// TestStatusRefusesForeignBroker: `status` on a socket that another user serves (here
// nobody, who could bind it in a world-writable directory) refuses to show what it says and
// names the uid, as the hook refuses to use it; the same fake served by root is shown.
func TestStatusRefusesForeignBroker(t *testing.T) {
	testbed.RequireRoot(t)
	const nobody = 65534
	dir, err := os.MkdirTemp("", "nix-offload-status-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o1777); err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(dir, "helper")
	if bin, err := os.ReadFile(self); err != nil || os.WriteFile(exe, bin, 0o755) != nil {
		t.Fatalf("copying the test binary: %v", err)
	}
	fake := func(t *testing.T, socket string, cred *syscall.Credential) {
		cmd := exec.Command(exe, "-test.run=^TestFakeBrokerHelper$")
		cmd.Env = append(os.Environ(), fakeBrokerEnv+"="+socket)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		stdin, _ := cmd.StdinPipe()
		stdout, _ := cmd.StdoutPipe()
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { stdin.Close(); cmd.Wait() })
		line, err := bufio.NewReader(stdout).ReadString('\n')
		if line != "listening\n" {
			t.Fatalf("fake broker: %q, %v", line, err)
		}
	}

	foreign := filepath.Join(dir, "foreign.sock")
	fake(t, foreign, &syscall.Credential{Uid: nobody, Gid: nobody})
	code, out, errOut := runCLI(t, "status", "-socket", foreign)
	if code != exitFailed || strings.Contains(out, "fake-builder") ||
		!strings.Contains(errOut, fmt.Sprintf("the socket is served by uid %d, not by root or this hook's user: refusing it", nobody)) {
		t.Errorf("a broker run by nobody: exit %d, stdout %q, stderr %q; want 1, nothing shown, and the uid named", code, out, errOut)
	}

	own := filepath.Join(dir, "own.sock")
	fake(t, own, nil)
	if code, out, errOut := runCLI(t, "status", "-socket", own); code != exitOK || !strings.Contains(out, "root@fake-builder") {
		t.Errorf("control, the same fake run by root: exit %d, stdout %q, stderr %q; want it shown", code, out, errOut)
	}
}

// TestHookEmptyBuildersEndToEnd: real nix-build with offload.toml naming a working builder:
// with `--builders ""` nothing goes to the builder (with max-jobs 0 the build fails, saying
// why); without it the same build is offloaded.
func TestHookEmptyBuildersEndToEnd(t *testing.T) {
	nix := testbed.Lookup(t, "2.34")
	b := testbed.StartBuilder(t, nix)
	env := newOffloadEnv(t, "", b)
	store := testbed.NewStore(t)
	expr := env.writeExpr(t, graphExpr(randomHex(8)))
	if _, errOut, err := nixBuild(t, nix, store, env, "--builders", "", expr); err == nil || !strings.Contains(errOut, "builders setting is empty") ||
		strings.Contains(errOut, "building '/nix/store/") {
		t.Errorf("--builders '': err %v; want a local-only attempt that says builders is empty:\n%s", err, errOut)
	}
	out, errOut, err := nixBuild(t, nix, store, env, expr)
	if err != nil {
		t.Fatalf("control, default builders: %v\n%s", err, errOut)
	}
	if got := storeFile(t, store, out); got != graphRoot {
		t.Errorf("root output %q", got)
	}
}
