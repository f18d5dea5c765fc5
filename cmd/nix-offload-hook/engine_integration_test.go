package main

// The engine's placement rules as a user sees them from the hook working
// alone (no broker): the host's health is shared by every hook, and a
// machine that cannot serve until its configuration changes fails a build
// at once instead of making Nix wait forever.

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/testbed"
)

// silentListener accepts TCP connections and never says a word, like a
// machine whose sshd is wedged, or with hangUp closes them at once, like
// one whose sshd dies on every connection; it counts the connections.
type silentListener struct {
	ln    net.Listener
	count atomic.Int64
	mu    sync.Mutex
	conns []net.Conn
}

func newSilentListener(t *testing.T) *silentListener { return listenTCP(t, false) }

func newHangUpListener(t *testing.T) *silentListener { return listenTCP(t, true) }

func listenTCP(t *testing.T, hangUp bool) *silentListener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &silentListener{ln: ln}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.count.Add(1)
			if hangUp {
				c.Close()
				continue
			}
			s.mu.Lock()
			s.conns = append(s.conns, c)
			s.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		s.mu.Lock()
		for _, c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
	})
	return s
}

func (s *silentListener) port() int { return s.ln.Addr().(*net.TCPAddr).Port }

// A silent preferred machine is dialled once in a whole nix-build without a
// broker (the failure goes to the host's health file, which the next hooks
// read), and not at all by the next nix-build within its backoff. Before,
// every hook dialled it again, connect-timeout each.
func TestHookAloneSharesHealth(t *testing.T) {
	local := testbed.Lookup(t, "2.8")
	b := testbed.StartBuilder(t, local)
	silent := newSilentListener(t)
	env := newOffloadEnv(t, "", b)
	cfg, err := os.ReadFile(env.config)
	if err != nil {
		t.Fatal(err)
	}
	text := string(cfg) + fmt.Sprintf(`
[[machine]]
host = "127.0.0.1"
port = %d
user = "root"
ssh-key = %q
host-key = %q
systems = ["x86_64-linux"]
speed = 10
parallel-builds = 4
connect-timeout = "2s"
`, silent.port(), b.ClientKey, b.HostKey)
	if err := os.WriteFile(env.config, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	store := testbed.NewStore(t)
	for round, want := range []int64{1, 1} {
		expr := env.writeExpr(t, fmt.Sprintf(`let salt = %q; in map (i: derivation {
			name = "h${toString i}"; inherit salt; system = "x86_64-linux"; builder = "/bin/sh";
			args = [ "-c" "echo ${toString i} > $out" ]; }) [1 2 3 4]`, randomHex(8)))
		start := time.Now()
		if _, errOut, err := nixBuild(t, local, store, env, expr); err != nil {
			t.Fatalf("round %d: nix-build: %v\n%s", round, err, errOut)
		}
		if got := silent.count.Load(); got != want {
			t.Errorf("round %d: the silent machine was dialled %d times in all, want %d", round, got, want)
		}
		t.Logf("round %d: 4 builds in %v", round, time.Since(start).Round(time.Millisecond))
	}
	if _, err := os.Stat(filepath.Join(env.dir, "state", "health.json")); err != nil {
		t.Errorf("no health file: %v", err)
	}
}

// A machine whose host key no longer matches the pinned one cannot serve
// until someone changes the configuration: as with Nix's own hook, the
// build fails at once with that error. Before, the hook postponed every
// 5 s, forever.
func TestHookAlonePermanentErrorFailsAtOnce(t *testing.T) {
	local := testbed.Lookup(t, "2.8")
	b := testbed.StartBuilder(t, local)
	other := testbed.StartBuilder(t, local)
	env := newOffloadEnv(t, "", b)
	cfg, err := os.ReadFile(env.config)
	if err != nil {
		t.Fatal(err)
	}
	text := strings.Replace(string(cfg), fmt.Sprintf("host-key = %q", b.HostKey), fmt.Sprintf("host-key = %q", other.HostKey), 1)
	if err := os.WriteFile(env.config, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	store := testbed.NewStore(t)
	expr := env.writeExpr(t, fmt.Sprintf(`derivation { name = "pinned"; salt = %q; system = "x86_64-linux";
		builder = "/bin/sh"; args = [ "-c" "echo x > $out" ]; }`, randomHex(8)))
	start := time.Now()
	_, errOut, err := startBuild(t, local, store, env, expr).wait(t, time.Minute)
	if err == nil {
		t.Fatal("the build succeeded on a machine with the wrong host key")
	}
	if took := time.Since(start); took > 20*time.Second {
		t.Errorf("failed after %v, want at once", took)
	}
	if !strings.Contains(errOut, "host key mismatch") {
		t.Errorf("nix-build does not say why:\n%s", errOut)
	}
}

// forceCommand makes b's sshd run command instead of whatever our key
// asks for, as NixOS's nix.sshServe does for its key: a builder that logs
// us in and never speaks the serve protocol.
func forceCommand(t *testing.T, b *testbed.Builder, command string) {
	t.Helper()
	p := filepath.Join(b.Dir, "authorized_keys")
	key, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(fmt.Sprintf("command=%q %s", command, key)), 0o644); err != nil {
		t.Fatal(err)
	}
}

// A builder whose key runs `sleep 1000` costs connect-timeout and a few
// seconds, alone, through the broker and in `check`: the connection is
// closed when the greeting does not come, and nothing waits for the
// command to end. Before, the hook hung for good (Session.Close waited for
// an exit sshd never reports) and `check` with it.
func TestForcedCommandBuilder(t *testing.T) {
	local := testbed.Lookup(t, "2.8")
	forced := testbed.StartBuilder(t, local)
	good := testbed.StartBuilder(t, local)
	forceCommand(t, forced, "sleep 1000")
	const bound = 2*time.Second + 8*time.Second // connect-timeout + a few seconds

	t.Run("check", func(t *testing.T) {
		cfg := writeConfig(t, machineTOML(forced, true)+"connect-timeout = \"2s\"\n")
		start := time.Now()
		code, out, errOut := runCLI(t, "check", "-config", cfg)
		if took := time.Since(start); took > bound {
			t.Errorf("check took %v, want at most %v", took, bound)
		}
		if code == 0 {
			t.Errorf("check passed a machine that never speaks the protocol:\n%s%s", out, errOut)
		}
	})
	for _, mode := range []string{"alone", "broker"} {
		t.Run(mode, func(t *testing.T) {
			env := newFaultEnv(t, "",
				faultMachine{b: forced, slots: 4, extra: "speed = 10\nconnect-timeout = \"2s\""},
				faultMachine{b: good, slots: 4})
			store := testbed.NewStore(t)
			if mode == "broker" {
				withBroker(t, local, store, env)
			}
			expr := env.writeExpr(t, fmt.Sprintf(`derivation { name = "forced"; salt = %q; system = "x86_64-linux";
				builder = "/bin/sh"; args = [ "-c" "echo x > $out" ]; }`, randomHex(8)))
			start := time.Now()
			_, errOut, err := startBuild(t, local, store, env, expr).wait(t, time.Minute)
			if err != nil {
				t.Fatalf("nix-build: %v\n%s", err, errOut)
			}
			if took := time.Since(start); took > bound {
				t.Errorf("the build took %v, want at most %v:\n%s", took, bound, errOut)
			}
		})
	}
}

// hookUnder returns the pid of a process running the hook binary under the
// process root (its child or grandchild), or 0.
func hookUnder(t *testing.T, root int) int {
	t.Helper()
	hook := testbed.HookBinary(t)
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); err != nil || exe != hook {
			continue
		}
		for p, depth := pid, 0; p > 1 && depth < 8; depth++ {
			if p = parentOf(p); p == root {
				return pid
			}
		}
	}
	return 0
}

func parentOf(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// pid (comm) state ppid …; comm may hold spaces, so read after ")".
	s := string(b)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(fields) < 2 {
		return 0
	}
	ppid, _ := strconv.Atoi(fields[1])
	return ppid
}

// A hook waiting on a builder that logs in and never speaks ends within
// 1 s of SIGTERM (before: it ignored it, waiting in Session.Close).
func TestForcedCommandBuilderSIGTERM(t *testing.T) {
	local := testbed.Lookup(t, "2.8")
	forced := testbed.StartBuilder(t, local)
	forceCommand(t, forced, "sleep 1000")
	env := newFaultEnv(t, "", faultMachine{b: forced, slots: 1, extra: "connect-timeout = \"60s\""})
	store := testbed.NewStore(t)
	expr := env.writeExpr(t, fmt.Sprintf(`derivation { name = "forced"; salt = %q; system = "x86_64-linux";
		builder = "/bin/sh"; args = [ "-c" "echo x > $out" ]; }`, randomHex(8)))
	bb := startBuild(t, local, store, env, expr)
	var pid int
	testbed.WaitFor(t, 30*time.Second, "the hook to start", func() bool {
		pid = hookUnder(t, bb.cmd.Process.Pid)
		return pid != 0
	})
	// It is connected and waiting for the greeting once sshd runs the
	// forced command for it.
	testbed.WaitFor(t, 30*time.Second, "the forced command to run", func() bool {
		for _, p := range forced.Processes() {
			if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", p)); strings.TrimSpace(string(comm)) == "sleep" {
				return true
			}
		}
		return false
	})
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	testbed.WaitFor(t, time.Second, "the hook to exit after SIGTERM", func() bool {
		_, err := os.Stat(fmt.Sprintf("/proc/%d/exe", pid))
		if err != nil {
			return true
		}
		st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		return strings.Contains(string(st), ") Z ") // exited, not yet reaped
	})
}
