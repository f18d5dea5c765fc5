package engine

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/health"
	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/scheduler"
	"github.com/nix-offload/nix-offload/internal/slots"
	"github.com/nix-offload/nix-offload/internal/sshconn"
)

func testAlone(t *testing.T, connect func(ctx context.Context, m machines.Machine) (Session, func(), error)) *Alone {
	t.Helper()
	dir := t.TempDir()
	sl, err := slots.Open(filepath.Join(dir, "slots"))
	if err != nil {
		t.Fatal(err)
	}
	h, err := health.Open(filepath.Join(dir, "health.json"))
	if err != nil {
		t.Fatal(err)
	}
	m := machines.Machine{Host: "b1", Systems: []string{"x86_64-linux"}, ParallelBuilds: 1, Enabled: true, Speed: 1}
	return &Alone{Machines: []machines.Machine{m}, Slots: sl, Health: h, Connect: connect}
}

var linuxReq = scheduler.Request{System: "x86_64-linux"}

// A slot lock that someone else holds (another user's process, in a shared
// state directory) is an error after a bound, not a wait without end.
func TestAloneSlotLockHeld(t *testing.T) {
	defer func(w time.Duration) { slotLockWait = w }(slotLockWait)
	slotLockWait = 50 * time.Millisecond
	a := testAlone(t, nil)
	unlock, err := a.Slots.Lock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	_, err = a.Try(context.Background(), linuxReq)
	if err == nil || !strings.Contains(err.Error(), "still held by another process") {
		t.Fatalf("Try with the slot lock held: %v", err)
	}
}

// The only capable machine fails with a permanent error: the build fails
// at once with that error, and the machine is dialled once.
func TestAlonePermanentFailsAtOnce(t *testing.T) {
	dials := 0
	hk := &sshconn.HostKeyError{Name: "b1", Addr: "b1:22", Problem: sshconn.HostKeyMismatch}
	a := testAlone(t, func(context.Context, machines.Machine) (Session, func(), error) {
		dials++
		return nil, nil, hk
	})
	_, err := a.Try(context.Background(), linuxReq)
	var ue *UnusableError
	if !errors.As(err, &ue) || !strings.Contains(err.Error(), hk.Error()) {
		t.Fatalf("Try: %v, want an UnusableError with the host key error", err)
	}
	_, err = a.Acquire(context.Background(), linuxReq, map[string]string{})
	if !errors.As(err, &ue) || dials != 1 {
		t.Fatalf("Acquire: %v after %d dials, want an UnusableError and 1 dial", err, dials)
	}
}

// A transient failure postpones, and fails the build with the last error
// once GiveUp has passed.
func TestAloneTransientGivesUp(t *testing.T) {
	clock := newFakeClock()
	refused := &sshconn.ConnectError{Name: "b1", Addr: "b1:22", Err: errors.New("connection refused")}
	a := testAlone(t, func(context.Context, machines.Machine) (Session, func(), error) {
		return nil, nil, refused
	})
	a.Clock, a.GiveUp = clock, time.Minute
	_, err := a.Try(context.Background(), linuxReq)
	var none *NoMachineError
	if !errors.As(err, &none) || none.Decision.Verdict != scheduler.Postpone {
		t.Fatalf("Try after one refusal: %v, want a postpone", err)
	}
	clock.Advance(2*time.Minute, nil)
	_, err = a.Try(context.Background(), linuxReq)
	var ue *UnusableError
	if !errors.As(err, &ue) || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("Try after GiveUp: %v, want an UnusableError with the last error", err)
	}
}

// A build whose inputs a machine holds goes to that machine when it has a
// free slot, and to the scheduler's first choice when it has none.
func TestAlonePrefersTheMachineWithTheInputs(t *testing.T) {
	var dialled []string
	a := testAlone(t, func(_ context.Context, m machines.Machine) (Session, func(), error) {
		dialled = append(dialled, m.Name())
		return nil, nil, errors.New("not reachable in this test")
	})
	b1 := a.Machines[0]
	b2 := b1
	b2.Host, b2.Speed = "b2", 0.5 // the scheduler's second choice
	a.Machines = append(a.Machines, b2)
	req := linuxReq
	req.Present = map[string]uint64{b2.Name(): 1 << 20}
	a.Try(context.Background(), req)
	if len(dialled) == 0 || dialled[0] != b2.Name() {
		t.Fatalf("dialled %v, want %s first: it holds the inputs", dialled, b2.Name())
	}
	// b2 busy: its slot held by another build.
	dialled = nil
	a2 := testAlone(t, a.Connect)
	a2.Machines = a.Machines
	s, ok, err := a2.Slots.Acquire(b2)
	if !ok || err != nil {
		t.Fatal(ok, err)
	}
	defer s.Release()
	a2.Try(context.Background(), req)
	if len(dialled) == 0 || dialled[0] != b1.Name() {
		t.Fatalf("dialled %v with %s busy, want %s", dialled, b2.Name(), b1.Name())
	}
}
