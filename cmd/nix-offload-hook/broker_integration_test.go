package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/testbed"
)

// brokerEnv is an offloadEnv whose config names a broker socket, and the
// broker serving it, started in the local side's mount namespace as it
// runs in production (it sees the same /nix as nix-daemon).
type brokerEnv struct {
	offloadEnv
	cmd *exec.Cmd
	log *syncBuffer
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// newBrokerEnv writes the config, with parallel-builds slots per builder,
// and starts the broker for store.
func newBrokerEnv(t *testing.T, nix testbed.Nix, store string, slots int, builders ...*testbed.Builder) *brokerEnv {
	t.Helper()
	return newBrokerEnvWith(t, nix, store, slots, "", builders...)
}

// newBrokerEnvWith is newBrokerEnv with extra lines in every machine's
// table (as newOffloadEnv's extra).
func newBrokerEnvWith(t *testing.T, nix testbed.Nix, store string, slots int, extra string, builders ...*testbed.Builder) *brokerEnv {
	t.Helper()
	return newBrokerEnvEdit(t, nix, store, slots, extra, nil, builders...)
}

// newBrokerEnvEdit is newBrokerEnvWith with a last change to the config's text (nil: none).
func newBrokerEnvEdit(t *testing.T, nix testbed.Nix, store string, slots int, extra string, edit func(string) string, builders ...*testbed.Builder) *brokerEnv {
	t.Helper()
	return newBrokerEnvOn(t, nix, store, slots, newOffloadEnv(t, extra, builders...), edit)
}

// newBrokerEnvOn starts the broker on env's config, with parallel-builds
// slots per builder and a last change to the config's text (nil: none).
func newBrokerEnvOn(t *testing.T, nix testbed.Nix, store string, slots int, env offloadEnv, edit func(string) string) *brokerEnv {
	t.Helper()
	cfg, err := os.ReadFile(env.config)
	if err != nil {
		t.Fatal(err)
	}
	text := strings.ReplaceAll(string(cfg), "parallel-builds = 4\n", fmt.Sprintf("parallel-builds = %d\n", slots))
	if edit != nil {
		text = edit(text)
	}
	if err := os.WriteFile(env.config, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	e := &brokerEnv{offloadEnv: env}
	e.start(t, nix, store)
	return e
}

func (e *brokerEnv) start(t *testing.T, nix testbed.Nix, store string) {
	t.Helper()
	// The store's database first: on a fresh store the broker's local
	// nix-store and the test's first nix-build would both create it, and
	// one of them can fail with "SQLite database … is busy" or, on Nix 2.8,
	// "creating symlink … File exists" (testbed.Nix.InitStore).
	nix.InitStore(t, store)
	cmd := nix.Command(store, e.mounts, testbed.HookBinary(t), "daemon", "-config", e.config, "-drain", "30s", "-debug")
	e.log = &syncBuffer{}
	cmd.Stdout, cmd.Stderr = e.log, e.log
	if p := os.Getenv("NIX_OFFLOAD_TEST_BROKER_LOG"); p != "" {
		// A copy that survives a test killed by -timeout.
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		cmd.Stdout, cmd.Stderr = io.MultiWriter(e.log, f), io.MultiWriter(e.log, f)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	e.cmd = cmd
	t.Cleanup(func() {
		testbed.KillCommand(cmd)
		if t.Failed() {
			t.Logf("broker log:\n%s", e.log.String())
		}
	})
	testbed.WaitFor(t, time.Minute, "the broker's socket", func() bool {
		c, err := brokerapi.Dial(context.Background(), e.socket)
		if err != nil {
			return false
		}
		c.Close()
		return true
	})
}

// stop sends SIGTERM and waits for the broker to exit.
func (e *brokerEnv) stop(t *testing.T) {
	t.Helper()
	e.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- e.cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("broker exited with %v\n%s", err, e.log.String())
		}
	case <-time.After(time.Minute):
		t.Fatalf("broker did not stop within a minute of SIGTERM\n%s", e.log.String())
	}
}

func (e *brokerEnv) status(t *testing.T) brokerapi.Status {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := brokerapi.Dial(ctx, e.socket)
	if err != nil {
		t.Fatalf("broker: %v", err)
	}
	defer c.Close()
	st, err := c.Status(ctx)
	if err != nil {
		t.Fatalf("status: %v", err)
	}
	return st
}

func slotsUsed(st brokerapi.Status) int {
	n := 0
	for _, m := range st.Machines {
		n += m.SlotsUsed
	}
	return n
}

// onEveryNix runs f as a subtest on each Nix of the bed: a builder of that version, a local
// store, and a broker with 4 slots on it, all of that version.
func onEveryNix(t *testing.T, f func(t *testing.T, nix testbed.Nix, b *testbed.Builder, store string, env *brokerEnv)) {
	for _, v := range []string{"2.8", "2.26", "2.34"} {
		t.Run(v, func(t *testing.T) {
			nix := testbed.Lookup(t, v)
			b := testbed.StartBuilder(t, nix)
			store := testbed.NewStore(t)
			f(t, nix, b, store, newBrokerEnv(t, nix, store, 4, b))
		})
	}
}

// TestBrokerBuilds: hooks of Nix 2.8 and 2.34 hand builds to a broker,
// which runs them on builders of other versions over warm sessions.
func TestBrokerBuilds(t *testing.T) {
	pairs := [][2]string{{"2.8", "2.34"}, {"2.34", "2.8"}, {"2.26", "2.26"}}
	for _, p := range pairs {
		t.Run(fmt.Sprintf("local %s to builder %s", p[0], p[1]), func(t *testing.T) {
			local, remote := testbed.Lookup(t, p[0]), testbed.Lookup(t, p[1])
			b := testbed.StartBuilder(t, remote)
			store := testbed.NewStore(t)
			env := newBrokerEnv(t, local, store, 4, b)
			expr := env.writeExpr(t, graphExpr(randomHex(8)))
			out, errOut, err := nixBuild(t, local, store, env.offloadEnv, expr)
			if err != nil {
				t.Fatalf("nix-build: %v\n%s", err, errOut)
			}
			if got := storeFile(t, store, out); got != graphRoot {
				t.Errorf("root output %q, want %q", got, graphRoot)
			}
			if !strings.Contains(errOut, "remote log line from c1") || !strings.Contains(errOut, "remote log line from root") {
				t.Errorf("remote log lines not shown while building:\n%s", errOut)
			}
			if strings.Contains(errOut, "going on without it") || strings.Contains(errOut, "without the broker") {
				t.Errorf("the hooks did not use the broker:\n%s", errOut)
			}
			drv := strings.TrimSpace(runNix(t, local, store, env.offloadEnv, "nix-store", "-q", "--deriver", out))
			if logText := runNix(t, local, store, env.offloadEnv, "nix-store", "-l", drv); !strings.Contains(logText, "remote log line from root") {
				t.Errorf("nix-store -l %s: %q", drv, logText)
			}
			runNix(t, local, store, env.offloadEnv, "nix-store", "--verify-path", out)

			st := env.status(t)
			if len(st.Machines) != 1 || st.Machines[0].Builds != 8 {
				t.Errorf("status: %+v, want 8 builds on one machine", st.Machines)
			}
			if used := slotsUsed(st); used != 0 || st.Running != 0 || st.Queued != 0 {
				t.Errorf("after the builds: %d slots used, %d running, %d queued", used, st.Running, st.Queued)
			}
			// 8 builds, 4 slots: sessions were reused, not one per build.
			if m := st.Machines[0]; m.Conns > 1 || m.Idle+m.InUse > 6 {
				t.Errorf("status: %d connections, %d sessions after 8 builds", m.Conns, m.Idle+m.InUse)
			}
			env.stop(t)
		})
	}
}

// TestBrokerQueuesInsteadOfPostponing: with one slot and a local side that
// cannot build, the broker accepts and queues; every build succeeds and
// none waits for build-poll-interval.
func TestBrokerQueuesInsteadOfPostponing(t *testing.T) {
	nix := testbed.Lookup(t, "2.34")
	b := testbed.StartBuilder(t, nix)
	store := testbed.NewStore(t)
	env := newBrokerEnv(t, nix, store, 1, b)
	expr := env.writeExpr(t, graphExpr(randomHex(8)))
	start := time.Now()
	out, errOut, err := nixBuild(t, nix, store, env.offloadEnv, "-j", "0", "--option", "build-poll-interval", "30", expr)
	if err != nil {
		t.Fatalf("nix-build: %v\n%s", err, errOut)
	}
	took := time.Since(start)
	if got := storeFile(t, store, out); got != graphRoot {
		t.Errorf("root output %q", got)
	}
	// A build the broker queued is accepted "on 'nix-offload queue'". Whether
	// it still waits when its hook sends the build (and says "waits for a
	// machine") depends on how fast the builds before it end.
	if !strings.Contains(errOut, "on 'nix-offload queue'") {
		t.Errorf("no build was queued in the broker:\n%s", errOut)
	}
	// A postponed build would wait 30 s for nix-daemon to ask again.
	if took > 25*time.Second {
		t.Errorf("8 builds on one slot took %v: something waited for build-poll-interval", took)
	}
	t.Logf("8 builds through one slot: %v", took.Round(time.Millisecond))
}

// TestBrokerHookKilled: a hook killed with SIGKILL (as nix-daemon kills
// it) costs only its connection: the remote build stops and the slot is
// free within a second.
func TestBrokerHookKilled(t *testing.T) {
	nix := testbed.Lookup(t, "2.8")
	b := testbed.StartBuilder(t, nix)
	store := testbed.NewStore(t)
	env := newBrokerEnv(t, nix, store, 2, b)
	expr := env.writeExpr(t, fmt.Sprintf(`derivation { name = "sleeper"; salt = %q; system = "x86_64-linux";
		builder = "/bin/sh"; args = ["-c" "echo sleeping; /bin/sleep 300; echo > $out"]; }`, randomHex(8)))
	cmd := nix.Command(store, env.mounts, "nix-build", "--max-jobs", "0", "--no-out-link",
		"--option", "build-hook", testbed.HookBinary(t), "--option", "substituters", "", expr)
	cmd.Env = append(cmd.Env, "NIX_OFFLOAD_CONFIG="+env.config)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { testbed.KillCommand(cmd) })
	testbed.WaitFor(t, time.Minute, "the build to run on the builder", func() bool { return len(sleepers(b)) > 0 })
	if used := slotsUsed(env.status(t)); used != 1 {
		t.Errorf("%d slots used during the build, want 1", used)
	}
	// SIGKILL every process of nix-build's group: the hook among them.
	syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	cmd.Wait()
	killed := time.Now()
	testbed.WaitFor(t, 5*time.Second, "the remote build to stop", func() bool { return len(sleepers(b)) == 0 })
	gone := time.Since(killed)
	testbed.WaitFor(t, 5*time.Second, "the slot to be free", func() bool { return slotsUsed(env.status(t)) == 0 })
	freed := time.Since(killed)
	t.Logf("remote build gone %v, slot free %v after the hook was killed", gone.Round(time.Millisecond), freed.Round(time.Millisecond))
	if freed > time.Second {
		t.Errorf("slot freed %v after the hook died, want within a second", freed)
	}
}

// TestBrokerStopsWhileBuilding: SIGTERM to the broker lets a running build
// finish and hands a queued one back; nix-build still succeeds, and a later
// build works without the broker.
func TestBrokerStopsWhileBuilding(t *testing.T) {
	nix := testbed.Lookup(t, "2.34")
	b := testbed.StartBuilder(t, nix)
	store := testbed.NewStore(t)
	env := newBrokerEnv(t, nix, store, 1, b)
	salt := randomHex(8)
	expr := env.writeExpr(t, fmt.Sprintf(`let mk = n: derivation { name = "slow${n}"; salt = %q; system = "x86_64-linux";
		builder = "/bin/sh"; args = ["-c" "echo slow ${n}; /bin/sleep 3; echo ${n} > $out"]; };
		in [ (mk "1") (mk "2") ]`, salt))
	cmd := nix.Command(store, env.mounts, "nix-build", "--max-jobs", "0", "--no-out-link",
		"--option", "build-hook", testbed.HookBinary(t), "--option", "substituters", "", expr)
	cmd.Env = append(cmd.Env, "NIX_OFFLOAD_CONFIG="+env.config)
	var stdout, stderr syncBuffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { testbed.KillCommand(cmd) })
	testbed.WaitFor(t, time.Minute, "one build running and one queued", func() bool {
		st := env.status(t)
		return st.Running == 2 && slotsUsed(st) == 1
	})
	env.stop(t)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("nix-build after the broker stopped: %v\n%s", err, stderr.String())
	}
	outs := strings.Fields(stdout.String())
	if len(outs) != 2 {
		t.Fatalf("outputs %q", outs)
	}
	if !strings.Contains(stderr.String(), "gave") {
		t.Errorf("the queued build was not handed back:\n%s", stderr.String())
	}
}
