package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/localstore"
	"github.com/nix-offload/nix-offload/internal/testbed"
)

// machineKeys adds lines to the [[machine]] table of b in a config's text.
func machineKeys(b *testbed.Builder, lines string) func(string) string {
	return func(text string) string {
		at := fmt.Sprintf("port = %d\n", b.Port)
		return strings.Replace(text, at, at+strings.TrimSuffix(lines, "\n")+"\n", 1)
	}
}

func machineStatus(st brokerapi.Status, b *testbed.Builder) brokerapi.MachineStatus {
	for _, m := range st.Machines {
		if strings.HasSuffix(m.Name, fmt.Sprintf(":%d", b.Port)) {
			return m
		}
	}
	return brokerapi.MachineStatus{}
}

// waitStates waits until the broker has asked every machine about itself.
func waitStates(t *testing.T, env *brokerEnv) brokerapi.Status {
	t.Helper()
	var st brokerapi.Status
	testbed.WaitFor(t, 30*time.Second, "every machine's first state", func() bool {
		st = env.status(t)
		for _, m := range st.Machines {
			if m.State == nil || m.State.Error != "" {
				return false
			}
		}
		return true
	})
	return st
}

// fanOutExpr is a 32 MiB output and four builds that read it.
func fanOutExpr(salt string) string {
	return fmt.Sprintf(`
let
  salt = %q;
  big = derivation {
    name = "big"; inherit salt; system = "x86_64-linux"; builder = "/bin/sh";
    args = [ "-c" "/bin/dd if=/dev/urandom of=$out bs=1048576 count=32 2>/dev/null" ];
  };
  use = i: derivation {
    name = "use${toString i}"; inherit salt; system = "x86_64-linux"; builder = "/bin/sh";
    args = [ "-c" "/bin/dd if=${big} of=/dev/null bs=1048576 2>/dev/null && echo use${toString i} > $out" ];
  };
in map use [1 2 3 4]
`, salt)
}

// The fan-out of issue 18: a 32 MiB input is built on one machine, then four builds consume
// it. Before, the input was sent to the other machine (33,554,560 bytes) although the first
// had free slots; now the consumers go where the input is and nothing is sent.
func TestBrokerFanOutSendsNothing(t *testing.T) {
	nix := testbed.Lookup(t, "2.8")
	b1, b2 := testbed.StartBuilder(t, nix), testbed.StartBuilder(t, nix)
	store := testbed.NewStore(t)
	env := newBrokerEnv(t, nix, store, 4, b1, b2)
	expr := env.writeExpr(t, fanOutExpr(randomHex(8)))
	_, errOut, err := nixBuild(t, nix, store, env.offloadEnv, expr)
	if err != nil {
		t.Fatalf("nix-build: %v\n%s", err, errOut)
	}
	st := env.status(t)
	var sent, builds uint64
	for _, m := range st.Machines {
		sent += m.BytesSent
		builds += m.Builds
		t.Logf("%s: %d builds, %d bytes sent, %d received", m.Name, m.Builds, m.BytesSent, m.BytesRecvd)
	}
	if builds != 5 {
		t.Errorf("%d builds, want 5", builds)
	}
	if sent != 0 {
		t.Errorf("%d bytes sent to the machines, want 0: the consumers should run where the input was built", sent)
	}
	for _, line := range strings.Split(env.log.String(), "\n") {
		if strings.Contains(line, "placed build") {
			t.Log(line)
		}
	}
	if !strings.Contains(env.log.String(), "holds 32 MiB of its inputs") {
		t.Errorf("the broker's debug log does not say why it chose the machine:\n%s", lastBytes(env.log.String(), 4000))
	}
}

// A machine whose store is nearly full (a 64 MiB tmpfs /nix, min-free-space 1G) and a machine
// that is busy (its /proc/loadavg says 32 per core, max-load 1) get nothing; status says why.
func TestBrokerAvoidsFullAndBusyMachines(t *testing.T) {
	nix := testbed.Lookup(t, "2.8")
	ok := testbed.StartBuilder(t, nix)
	busy := testbed.StartBuilder(t, nix, testbed.WithLoadavg("64.00 64.00 64.00 3/200 999"))
	full := testbed.StartBuilder(t, testbed.Lookup(t, "2.26"), testbed.WithNixTmpfs(64<<20))
	store := testbed.NewStore(t)
	edit := func(text string) string {
		text = machineKeys(busy, "max-load = 1\nspeed = 10")(text)
		return machineKeys(full, `min-free-space = "1G"`+"\nspeed = 10")(text)
	}
	env := newBrokerEnvEdit(t, nix, store, 4, "", edit, ok, busy, full)
	st := waitStates(t, env)
	fs, bs := machineStatus(st, full), machineStatus(st, busy)
	if !strings.HasPrefix(fs.Held, "store has ") || !strings.HasSuffix(fs.Held, " MiB free, min-free-space is 1 GiB") {
		t.Errorf("full machine: held %q, state %+v", fs.Held, fs.State)
	}
	// 64 ÷ the cores of this host, which every builder of the bed shares.
	if !strings.HasPrefix(bs.Held, "load ") || !strings.HasSuffix(bs.Held, " per core, max-load is 1") {
		t.Errorf("busy machine: held %q, state %+v", bs.Held, bs.State)
	}
	code, out, errOut := runCLI(t, "status", "-socket", env.socket)
	if code != 0 || !strings.Contains(out, "no new builds: store has ") || !strings.Contains(out, "no new builds: load ") {
		t.Errorf("status: exit %d\n%s%s", code, out, errOut)
	}
	t.Logf("nix-offload-hook status:\n%s", out)

	expr := env.writeExpr(t, graphExpr(randomHex(8)))
	_, errOut, err := nixBuild(t, nix, store, env.offloadEnv, expr)
	if err != nil {
		t.Fatalf("nix-build: %v\n%s", err, errOut)
	}
	st = env.status(t)
	if m := machineStatus(st, ok); m.Builds != 8 {
		t.Errorf("the free machine ran %d builds, want all 8", m.Builds)
	}
	for _, b := range []*testbed.Builder{busy, full} {
		if m := machineStatus(st, b); m.Builds != 0 || m.BytesSent != 0 {
			t.Errorf("%s got %d builds, %d bytes, want none (held: %s)", m.Name, m.Builds, m.BytesSent, m.Held)
		}
	}
}

// A hook's build overtakes the graph builds queued before it: with one slot held by a
// submission waiting for a gate, three more submissions queue, then a hook's build; once the
// gate opens, the hook's build runs next.
func TestBrokerHookOvertakesSubmissions(t *testing.T) {
	nix := testbed.Lookup(t, "2.8")
	b := testbed.StartBuilder(t, nix)
	store := testbed.NewStore(t)
	env := newBrokerEnv(t, nix, store, 1, b)
	gate, order := filepath.Join(b.Dir, "gate"), filepath.Join(b.Dir, "order")
	mk := func(name, wait string) string {
		return fmt.Sprintf(`derivation { name = %q; salt = %q; system = "x86_64-linux"; builder = "/bin/sh";
			args = [ "-c" "%secho %s >> %s; echo %s > $out" ]; }`, name, randomHex(8), wait, name, order, name)
	}
	waitGate := fmt.Sprintf("while [ ! -e %s ]; do /bin/sleep 0.1; done; ", gate)
	subs := []string{"gated", "graph1", "graph2", "graph3"}
	var drvs []string
	for i, name := range subs {
		w := ""
		if i == 0 {
			w = waitGate
		}
		drvs = append(drvs, strings.TrimSpace(runNix(t, nix, store, env.offloadEnv, "nix-instantiate", env.writeExpr(t, mk(name, w)))))
	}
	hookExpr := env.writeExpr(t, mk("hook", ""))

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	stores := make(chan *localstore.Store, 1)
	s, err := localstore.Open(localstore.Options{
		RealStoreDir: filepath.Join(store, "store"),
		Command:      func(argv ...string) *exec.Cmd { return nix.Command(store, env.mounts, argv...) },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	stores <- s
	errs := make(chan error, len(drvs)+1)
	for i, drv := range drvs {
		go func() { _, err := submit(ctx, env.socket, drv, -1, stores); errs <- err }()
		if i == 0 {
			testbed.WaitFor(t, 30*time.Second, "the gated build to take the slot", func() bool { return slotsUsed(env.status(t)) == 1 })
		} else {
			testbed.WaitFor(t, 30*time.Second, "the submission to queue", func() bool { return env.status(t).Queued == i })
		}
	}
	go func() {
		_, errOut, err := nixBuild(t, nix, store, env.offloadEnv, hookExpr)
		if err != nil {
			err = fmt.Errorf("nix-build: %v\n%s", err, errOut)
		}
		errs <- err
	}()
	testbed.WaitFor(t, 30*time.Second, "the hook's build to queue", func() bool { return env.status(t).Queued == len(drvs) })
	if err := os.WriteFile(gate, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for range len(drvs) + 1 {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	got, err := os.ReadFile(order)
	if err != nil {
		t.Fatal(err)
	}
	if want := "gated\nhook\ngraph1\ngraph2\ngraph3\n"; string(got) != want {
		t.Errorf("builds ran in the order\n%swant\n%s", got, want)
	}
}
