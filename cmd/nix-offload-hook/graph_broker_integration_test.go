package main

// `nix-offload-hook build` through the broker's graph API on the test bed:
// the graph runs in the broker, the command follows it.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/testbed"
)

// graphID is the id the command printed when it submitted its graph.
func graphID(t *testing.T, stderr *syncBuffer) string {
	t.Helper()
	re := regexp.MustCompile(`building graph ([0-9a-f]+) in the broker`)
	var id string
	testbed.WaitFor(t, time.Minute, "the command to name its graph", func() bool {
		m := re.FindStringSubmatch(stderr.String())
		if m != nil {
			id = m[1]
		}
		return m != nil
	})
	return id
}

// brokerBuilds is the broker's count of successful builds, every machine.
func brokerBuilds(t *testing.T, env *brokerEnv) uint64 {
	t.Helper()
	var n uint64
	for _, m := range env.status(t).Machines {
		n += m.Builds
	}
	return n
}

// waitExit waits up to d for cmd to exit and returns its exit code.
func waitExit(t *testing.T, cmd *exec.Cmd, d time.Duration, stderr *syncBuffer) int {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		switch {
		case err == nil:
			return 0
		case errors.As(err, &ee):
			return ee.ExitCode()
		}
		t.Fatalf("waiting for the command: %v", err)
	case <-time.After(d):
		t.Fatalf("the command did not exit within %v\n%s", d, stderr.String())
	}
	return -1
}

// TestBuildThroughBrokerInterrupt: SIGINT to a build that runs its graph in
// the broker stops every remote build within a second, on every machine
// (the command cancels the graph, which is detached from its connection),
// and the command exits with the results.
func TestBuildThroughBrokerInterrupt(t *testing.T) {
	local := testbed.Lookup(t, "2.8")
	b1, b2 := testbed.StartBuilder(t, local), testbed.StartBuilder(t, local)
	store := testbed.NewStore(t)
	env := newBrokerEnv(t, local, store, 4, b1, b2)
	cmd, _, stderr := startGraphBuild(t, local, store, env.offloadEnv, "-no-link", env.writeExpr(t, slowGraphExpr(randomHex(8), 4)))
	id := graphID(t, stderr)
	testbed.WaitFor(t, time.Minute, "sleepers on both machines", func() bool {
		return len(sleepers(b1)) > 0 && len(sleepers(b2)) > 0
	})
	start := time.Now()
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	testbed.WaitFor(t, 5*time.Second, "every remote build to stop", func() bool {
		return len(sleepers(b1)) == 0 && len(sleepers(b2)) == 0
	})
	if d := time.Since(start); d > time.Second {
		t.Errorf("the remote builds stopped %v after SIGINT, want within 1 s", d.Round(time.Millisecond))
	}
	if code := waitExit(t, cmd, 10*time.Second, stderr); code == 0 {
		t.Errorf("the command exited 0 after SIGINT\n%s", stderr.String())
	}
	if !strings.Contains(stderr.String(), "cancelling graph "+id) {
		t.Errorf("stderr does not say the graph is cancelled:\n%s", stderr.String())
	}
	if sum := graphSummary(t, env, id); sum.State != brokerapi.GraphCancelled {
		t.Errorf("the graph after SIGINT: %s", sum.State)
	}
}

func graphSummary(t *testing.T, env *brokerEnv, id string) brokerapi.GraphSummary {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := brokerapi.Dial(ctx, env.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sum, err := c.Graph(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	return sum
}

// TestBuildFollowAfterClientKilled: the command is killed (SIGKILL) mid-graph;
// the graph goes on in the broker, and `build -follow ID` finishes it: the
// outputs come home, the out-link is made, exit 0, and the broker built
// every derivation once.
func TestBuildFollowAfterClientKilled(t *testing.T) {
	local := testbed.Lookup(t, "2.8")
	b := testbed.StartBuilder(t, local)
	store := testbed.NewStore(t)
	env := newBrokerEnv(t, local, store, 4, b)
	mark(t, b, true)
	expr := env.writeExpr(t, fmt.Sprintf(`
let
  salt = %q;
  c0 = derivation { name = "c0"; inherit salt; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo c0 > $out" ]; };
  waiter = derivation { name = "waiter"; inherit salt; system = "x86_64-linux"; builder = "/bin/sh";
    args = [ "-c" "while [ -e /nix/.slow ]; do /bin/sleep 0.1; done; echo waited > $out" ]; };
in derivation { name = "root"; inherit salt c0 waiter; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "read a < $c0; read b < $waiter; echo $a $b > $out" ]; }
`, randomHex(8)))
	before := brokerBuilds(t, env)
	cmd, _, stderr := startGraphBuild(t, local, store, env.offloadEnv, "-no-link", expr)
	id := graphID(t, stderr)
	testbed.WaitFor(t, time.Minute, "c0 to be built", func() bool {
		return strings.Contains(stderr.String(), "built '")
	})
	cmd.Process.Kill()
	cmd.Wait()
	if sum := graphSummary(t, env, id); sum.State != brokerapi.GraphRunning {
		t.Fatalf("the graph after its client was killed: %s", sum.State)
	}
	mark(t, b, false)
	code, out, errOut := graphBuild(t, local, store, env.offloadEnv, "-follow", id)
	if code != 0 {
		t.Fatalf("build -follow %s: exit %d\n%s", id, code, errOut)
	}
	if got := storeFile(t, store, strings.TrimSpace(out)); got != "c0 waited" {
		t.Errorf("root's output %q", got)
	}
	if got, err := os.Readlink(filepath.Join(env.dir, "result")); err != nil || got != strings.TrimSpace(out) {
		t.Errorf("out-link: %q, %v; want %s", got, err, strings.TrimSpace(out))
	}
	if n := brokerBuilds(t, env) - before; n != 3 {
		t.Errorf("the broker built %d derivations for a graph of 3, followed twice", n)
	}
}

// TestBuildGraphDeleted: DELETE /v1/graphs/{id} from another client stops the
// graph's remote builds; the command that submitted it exits with the
// results, not 0.
func TestBuildGraphDeleted(t *testing.T) {
	local := testbed.Lookup(t, "2.8")
	b1 := testbed.StartBuilder(t, local)
	store := testbed.NewStore(t)
	env := newBrokerEnv(t, local, store, 4, b1)
	cmd, _, stderr := startGraphBuild(t, local, store, env.offloadEnv, "-no-link", "-json", env.writeExpr(t, slowGraphExpr(randomHex(8), 2)))
	id := graphID(t, stderr)
	testbed.WaitFor(t, time.Minute, "both sleepers", func() bool { return strings.Count(stderr.String(), "building '") == 2 && len(sleepers(b1)) > 0 })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := brokerapi.Dial(ctx, env.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.CancelGraph(ctx, id); err != nil {
		t.Fatal(err)
	}
	// The graph has ended when DELETE answers; its builds' remote processes
	// are being killed.
	testbed.WaitFor(t, 5*time.Second, "every remote build to stop", func() bool { return len(sleepers(b1)) == 0 })
	if code := waitExit(t, cmd, 10*time.Second, stderr); code == 0 {
		t.Errorf("the command exited 0 after its graph was deleted\n%s", stderr.String())
	}
	sum, err := c.Graph(ctx, id)
	if err != nil || sum.State != brokerapi.GraphCancelled || sum.Built != 0 {
		t.Errorf("after DELETE: %+v, %v", sum, err)
	}
}

// TestBrokerHookJoinsGraphBuild: a nix-build whose derivation a graph in the broker builds
// now waits for that build instead of building it again, and gets the outputs from the
// machine that built them: the broker builds it once, and both the graph and the nix-build
// succeed. The derivation waits on the machine until the test removes a file.
func TestBrokerHookJoinsGraphBuild(t *testing.T) {
	onEveryNix(t, func(t *testing.T, nix testbed.Nix, b *testbed.Builder, store string, env *brokerEnv) {
		mark(t, b, true)
		expr := env.writeExpr(t, joinedExpr(randomHex(8)))
		before := brokerBuilds(t, env)
		// Both bring the output home at once when the build ends: the command waits for
		// the lock nix-daemon's worker holds while the hook writes it, then finds it
		// valid.
		graph, _, graphErr := startGraphBuild(t, nix, store, env.offloadEnv, "-no-link", expr)
		testbed.WaitFor(t, time.Minute, "the graph's build to run", func() bool {
			st := env.status(t)
			return st.Running == 1 && slotsUsed(st) == 1
		})
		hooked := startNixBuild(t, nix, store, env.offloadEnv, expr)
		testbed.WaitFor(t, time.Minute, "the hook's build to wait for the graph's", func() bool {
			st := env.status(t)
			return st.Running == 2 && slotsUsed(st) == 1
		})
		mark(t, b, false)
		r := hooked.wait(t)
		if got := storeFile(t, store, r.out); got != "waited" {
			t.Errorf("output %q, want %q", got, "waited")
		}
		runNix(t, nix, store, env.offloadEnv, "nix-store", "--verify-path", r.out)
		if !strings.Contains(r.errOut, "is being built for another client") {
			t.Errorf("nix-build's log does not say it waited for the graph's build:\n%s", r.errOut)
		}
		if code := waitExit(t, graph, 2*time.Minute, graphErr); code != 0 {
			t.Fatalf("the graph's build: exit %d\n%s", code, graphErr.String())
		}
		if n := brokerBuilds(t, env) - before; n != 1 {
			t.Errorf("the broker built the derivation %d times, want once", n)
		}
		if st := env.status(t); slotsUsed(st) != 0 || st.Running != 0 || st.Queued != 0 {
			t.Errorf("after both: %d slots used, %d running, %d queued", slotsUsed(st), st.Running, st.Queued)
		}
		env.stop(t)
	})
}

// joinedExpr is one derivation that waits on its machine while /nix/.slow is there (mark).
func joinedExpr(salt string) string {
	return fmt.Sprintf(`derivation { name = "joined"; salt = %q; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "echo started; while [ -e /nix/.slow ]; do /bin/sleep 0.1; done; echo waited > $out" ]; }`, salt)
}

// nixBuildRun is a nix-build running in the background.
type nixBuildRun chan nixBuildResult

type nixBuildResult struct {
	out, errOut string
	err         error
}

func startNixBuild(t *testing.T, nix testbed.Nix, store string, env offloadEnv, args ...string) nixBuildRun {
	t.Helper()
	run := make(nixBuildRun, 1)
	cmd := nixBuildCmd(t, nix, store, env, args...)
	go func() {
		out, errOut, err := runCmd(cmd)
		run <- nixBuildResult{out, errOut, err}
	}()
	return run
}

// wait waits up to 2 minutes for the nix-build to succeed and returns its result.
func (run nixBuildRun) wait(t *testing.T) nixBuildResult {
	t.Helper()
	select {
	case r := <-run:
		if r.err != nil {
			t.Fatalf("nix-build: %v\n%s", r.err, r.errOut)
		}
		return r
	case <-time.After(2 * time.Minute):
		t.Fatal("nix-build did not finish within 2 minutes")
	}
	return nixBuildResult{}
}

// TestBrokerGraphJoinsHookBuild: a graph that needs a derivation a nix-build's hook is
// building through the broker waits for that build instead of building it again; once the
// hook has made the output valid here, the graph has it as a local path. Built once, and
// both succeed.
func TestBrokerGraphJoinsHookBuild(t *testing.T) {
	onEveryNix(t, func(t *testing.T, nix testbed.Nix, b *testbed.Builder, store string, env *brokerEnv) {
		mark(t, b, true)
		expr := env.writeExpr(t, joinedExpr(randomHex(8)))
		before := brokerBuilds(t, env)
		hooked := startNixBuild(t, nix, store, env.offloadEnv, expr)
		testbed.WaitFor(t, time.Minute, "the hook's build to run", func() bool {
			st := env.status(t)
			return st.Running == 1 && slotsUsed(st) == 1
		})
		graph, graphOut, graphErr := startGraphBuild(t, nix, store, env.offloadEnv, "-no-link", expr)
		id := graphID(t, graphErr)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		c, err := brokerapi.Dial(ctx, env.socket)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		events, err := c.FollowGraph(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		for {
			ev, err := events.Next()
			if err != nil {
				t.Fatalf("the graph's events ended before it waited for the hook's build: %v\n%s", err, graphErr.String())
			}
			if ev.Type == brokerapi.EventQueued && strings.Contains(ev.Reason, "is being built for another client") {
				break
			}
		}
		events.Close()
		mark(t, b, false)
		r := hooked.wait(t)
		if got := storeFile(t, store, r.out); got != "waited" {
			t.Errorf("output %q, want %q", got, "waited")
		}
		if code := waitExit(t, graph, 2*time.Minute, graphErr); code != 0 {
			t.Fatalf("the graph's build: exit %d\n%s", code, graphErr.String())
		}
		if got := strings.TrimSpace(graphOut.String()); got != r.out {
			t.Errorf("the graph's build printed %q, want %s", got, r.out)
		}
		if n := brokerBuilds(t, env) - before; n != 1 {
			t.Errorf("the broker built the derivation %d times, want once", n)
		}
		env.stop(t)
	})
}
