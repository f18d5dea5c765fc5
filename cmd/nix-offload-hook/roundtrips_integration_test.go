package main

import (
	"fmt"
	"strings"
	"testing"

	"github.com/nix-offload/nix-offload/internal/testbed"
)

// staleExpr is a, and with withB a derivation b that reads a's output.
func staleExpr(salt string, withB bool) string {
	b := "a"
	if withB {
		b = `derivation {
    name = "b"; inherit salt; system = "x86_64-linux"; builder = "/bin/sh";
    args = [ "-c" "read x < ${a}; echo \"b $x\" > $out" ];
  }`
	}
	return fmt.Sprintf(`
let
  salt = %q;
  a = derivation {
    name = "a"; inherit salt; system = "x86_64-linux"; builder = "/bin/sh";
    args = [ "-c" "echo a > $out" ];
  };
in %s
`, salt, b)
}

// TestBrokerStaleInputHint (issue 16): the broker remembers what it built on a machine, and
// a later build that needs it checks it in the build's own flight instead of asking first.
// Here the machine lost it meanwhile (it rebooted, and its store was collected), so the
// build fails there for want of it; the broker sends it and builds again, on the same
// attempt, and the user sees a success. On every Nix of the bed: each answers the failure in
// band, which is what keeps the session in step for the second try.
func TestBrokerStaleInputHint(t *testing.T) {
	onEveryNix(t, func(t *testing.T, nix testbed.Nix, b *testbed.Builder, store string, env *brokerEnv) {
		salt := randomHex(8)
		outA, errOut, err := nixBuild(t, nix, store, env.offloadEnv, env.writeExpr(t, staleExpr(salt, false)))
		if err != nil {
			t.Fatalf("nix-build a: %v\n%s", err, errOut)
		}
		sentBefore := env.status(t).Machines[0].BytesSent

		// A reboot ends every session (and with them their GC locks); then a collection.
		b.Kill()
		b.Restart(t)
		b.Run(t, "nix-store", "--delete", outA)

		outB, errOut, err := nixBuild(t, nix, store, env.offloadEnv, env.writeExpr(t, staleExpr(salt, true)))
		if err != nil {
			t.Fatalf("nix-build b after its input was collected on the machine: %v\n%s\nbroker log:\n%s", err, errOut, lastBytes(env.log.String(), 4000))
		}
		if got := storeFile(t, store, outB); got != "b a" {
			t.Errorf("b's output holds %q, want %q", got, "b a")
		}
		st := env.status(t)
		m := st.Machines[0]
		if m.Builds != 2 || m.Failed != 0 {
			t.Errorf("status: %d builds, %d failed; want 2 and 0", m.Builds, m.Failed)
		}
		if m.BytesSent <= sentBefore {
			t.Errorf("a was not sent again (%d bytes sent in all)", m.BytesSent)
		}
		// One attempt: the second try was on the same session, not the engine's retry.
		starts := 0
		for _, line := range strings.Split(env.log.String(), "\n") {
			if strings.Contains(line, "build starts") && strings.Contains(line, "-b.drv") {
				starts++
			}
		}
		if starts != 1 {
			t.Errorf("b started %d times in the broker's log, want once", starts)
		}
		env.stop(t)
	})
}
