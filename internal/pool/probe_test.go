package pool

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/testbed"
)

// The probe runs over the pool's warm connection, dials nothing, and reads the builder's state.
func TestProbe(t *testing.T) {
	e := startBed(t, testbed.Lookup(t, "2.34"), Options{Idle: 1})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := e.p.Probe(ctx, 5*time.Second); !errors.Is(err, ErrNoConn) {
		t.Fatalf("Probe before any connection: %v, want ErrNoConn", err)
	}
	if err := e.p.Warm(ctx); err != nil {
		t.Fatal(err)
	}
	st, err := e.p.Probe(ctx, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if !st.HasLoad || st.Cores < 1 || !st.HasFree || st.FreeBytes == 0 {
		t.Errorf("state %+v", st)
	}
	if n := e.dials.Load(); n != 1 {
		t.Errorf("%d connection attempts, want 1: the probe dials nothing", n)
	}
}

// A key whose forced command is the serve command itself runs that instead of the probe: the
// probe says "unknown" within its bound, and the connection and its sessions go on.
func TestProbeForcedCommand(t *testing.T) {
	e := startBed(t, testbed.Lookup(t, "2.34"), Options{Idle: 1})
	p := filepath.Join(e.b.Dir, "authorized_keys")
	key, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(fmt.Sprintf("command=%q %s", "nix-store --serve --write", key)), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s := get(t, e.p)
	start := time.Now()
	if st, err := e.p.Probe(ctx, 3*time.Second); err == nil {
		t.Fatalf("the probe accepted a forced command's answer: %+v", st)
	} else {
		t.Logf("probe: %v", err)
	}
	if d := time.Since(start); d > 4*time.Second {
		t.Errorf("the probe took %v, bound 3s", d)
	}
	if _, err := s.Conn().QueryValidPaths(nil, false, false); err != nil {
		t.Errorf("the session broke after the probe: %v", err)
	}
	e.p.Put(s, true)
	if st := e.p.Stats(); st.Conns != 1 || st.Dropped != 0 {
		t.Errorf("after the probe: %+v", st)
	}
}

// Probes every few moments do not keep a connection that no session uses from being closed.
func TestProbeKeepsNoEmptyConnection(t *testing.T) {
	e := startBed(t, testbed.Lookup(t, "2.34"), Options{Idle: -1})
	e.p.tick, e.p.trim = 20*time.Millisecond, 300*time.Millisecond
	e.p.Put(get(t, e.p), false)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	probed := 0
	testbed.WaitFor(t, 10*time.Second, "the empty connection to be closed", func() bool {
		if _, err := e.p.Probe(ctx, 5*time.Second); err == nil {
			probed++
		}
		return e.p.Stats().Conns == 0
	})
	if probed == 0 {
		t.Errorf("no probe answered while the connection was open")
	}
}
