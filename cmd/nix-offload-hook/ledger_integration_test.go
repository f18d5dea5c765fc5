package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/testbed"
)

// countedExpr is n independent derivations that each, on their machine,
// add a marker to /nix/.running-<salt>, append how many markers they see
// to /nix/.seen-<salt>, wait for the file /nix/.gate-<salt>, and take
// their marker away. The last of k builds running at once to add its
// marker sees all k, so the largest number in the seen file is the most
// builds the machine ran at once.
func countedExpr(salt string, n int) string {
	return fmt.Sprintf(`let salt = %q; mk = i: derivation { name = "counted${toString i}"; inherit salt; system = "x86_64-linux";
		builder = "/bin/sh"; args = ["-c" ''
			d=/nix/.running-${salt}; /bin/mkdir -p $d; : > $d/${toString i}
			set -- $d/*; echo $# >> /nix/.seen-${salt}
			while [ ! -e /nix/.gate-${salt} ]; do /bin/sleep 0.1; done
			/bin/rm $d/${toString i}; echo ${toString i} > $out
		'']; };
	in builtins.genList (i: mk (i + 1)) %d`, salt, n)
}

// seenOn reads the counts the builds of salt wrote on b.
func seenOn(t *testing.T, b *testbed.Builder, salt string) []int {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(b.Dir, "nix", ".seen-"+salt))
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var seen []int
	for _, f := range strings.Fields(string(data)) {
		n, err := strconv.Atoi(f)
		if err != nil {
			t.Fatalf("seen file: %q", data)
		}
		seen = append(seen, n)
	}
	return seen
}

// TestSlotLedgerAcrossBrokerStop: a machine with parallel-builds = 2, four
// builds through the broker (two running, two queued), and the broker is
// stopped. It hands the queued two back and keeps running the other two
// while it drains; the hooks given back build alone, on the slot files.
// The machine never runs more than two at once. Before the broker held
// slot files, the hooks alone saw no slot in use and started both at once:
// four builds on a machine of two.
func TestSlotLedgerAcrossBrokerStop(t *testing.T) {
	local := testbed.Lookup(t, "2.8")
	b := testbed.StartBuilder(t, testbed.Lookup(t, "2.34"))
	store := testbed.NewStore(t)
	env := newFaultEnv(t, "", faultMachine{b: b, slots: 2})
	broker := withBroker(t, local, store, env)
	salt := randomHex(8)
	bb := startBuild(t, local, store, env, env.writeExpr(t, countedExpr(salt, 4)))

	testbed.WaitFor(t, time.Minute, "two builds running on the machine and two queued", func() bool {
		st := broker.status(t)
		return st.Running == 4 && st.Queued == 2 && len(seenOn(t, b, salt)) == 2
	})
	broker.cmd.Process.Signal(syscall.SIGTERM)
	exited := make(chan error, 1)
	go func() { exited <- broker.cmd.Wait() }()
	testbed.WaitFor(t, time.Minute, "the broker to give the two queued builds back", func() bool {
		return strings.Count(bb.stderr.String(), "without the broker") == 2
	})
	// An absence needs a window: the hooks given back decide at once and
	// would reach the machine within a second or two (the first two are
	// still there, waiting for the gate). Ten seconds is well past that,
	// and past PostponeWait, when a hook that found no slot asks again.
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if seen := seenOn(t, b, salt); len(seen) > 2 {
			t.Fatalf("a hook given back started a build on a machine whose 2 slots the draining broker's builds hold: counts %v\nnix-build said:\n%s", seen, bb.stderr.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := os.WriteFile(filepath.Join(b.Dir, "nix", ".gate-"+salt), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	out, errOut, err := bb.wait(t, 2*time.Minute)
	if err != nil {
		t.Fatalf("nix-build across the broker's stop: %v\n%s", err, errOut)
	}
	if outs := strings.Fields(out); len(outs) != 4 {
		t.Errorf("outputs %q, want 4", outs)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("broker exited with %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatalf("broker still running a minute after its builds ended")
	}
	seen := seenOn(t, b, salt)
	if len(seen) != 4 {
		t.Errorf("%d builds ran on the machine, want 4 (counts %v)", len(seen), seen)
	}
	for _, n := range seen {
		if n > 2 {
			t.Errorf("the machine ran %d builds at once, parallel-builds = 2 (counts %v)", n, seen)
		}
	}
}
