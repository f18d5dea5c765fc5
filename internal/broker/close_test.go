package broker

import (
	"context"
	"errors"
	"os/exec"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/nix-offload/nix-offload/internal/localstore"
	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/testbed"
)

// warmPool is a pool whose Warm holds until ctx ends and then until
// released: a machine that is slow to answer while the broker closes.
type warmPool struct {
	idlePool
	cancelled chan struct{} // closed when Warm saw its context end
	release   chan struct{}
	ended     *atomic.Bool // set when Warm returns
}

func (p warmPool) Warm(ctx context.Context) error {
	<-ctx.Done()
	close(p.cancelled)
	<-p.release
	p.ended.Store(true)
	return ctx.Err()
}

// Close returns only when every goroutine the broker started has ended:
// the warm-up of a machine still answering, and the dispatcher. A local
// store that the warm-up was opening when Close began is closed too, so no
// local nix-store outlives the broker. Before, Close cancelled the warm-up
// and returned at once: the warm-up ran on, and a local store it opened
// then was never closed.
func TestCloseWaitsForItsGoroutines(t *testing.T) {
	opening, openRelease := make(chan struct{}), make(chan struct{})
	var opened atomic.Pointer[localstore.Store]
	pool := warmPool{cancelled: make(chan struct{}), release: make(chan struct{}), ended: new(atomic.Bool)}
	b := New(testOptions(t, Options{
		Config:  &machines.Config{Machines: []machines.Machine{testMachine("b1", 1, "x86_64-linux")}},
		NewPool: func(machines.Machine, func(error)) Pool { return pool },
		OpenLocal: func() (*localstore.Store, error) {
			close(opening)
			<-openRelease
			s, err := localstore.Open(localstore.Options{Command: func(argv ...string) *exec.Cmd {
				return exec.Command("false") // no handshake: the session fails at once
			}})
			opened.Store(s)
			return s, err
		},
	}))
	<-opening
	closed := make(chan struct{})
	go func() { b.Close(); close(closed) }()
	<-b.ctx.Done()
	// An absence needs a window here: Close must not return while the
	// warm-up is still opening the local store. The old Close returned
	// within microseconds of cancelling; a second is far past that. The
	// outcome on the current code does not depend on the window.
	select {
	case <-closed:
	case <-time.After(time.Second):
	}
	close(openRelease)
	<-pool.cancelled
	select {
	case <-closed:
		t.Error("Close returned while a machine's warm-up was still running")
	default:
	}
	close(pool.release)
	<-closed
	if !pool.ended.Load() {
		t.Error("Close returned before the machine's warm-up ended")
	}
	s := opened.Load()
	if s == nil {
		t.Fatal("the warm-up never opened the local store")
	}
	if err := s.Warm(); !errors.Is(err, localstore.ErrClosed) {
		t.Errorf("after Close, the local store opened during it: Warm = %v, want ErrClosed (it was left open)", err)
	}
	goleak.VerifyNone(t, goleak.IgnoreCurrent())
}

// Healthy fails once the dispatcher has not gone round for stuckAfter:
// the daemon's systemd watchdog then stops its pings, and systemd restarts
// a broker whose lock is held for good. While it goes round, it passes.
func TestHealthyOnlyWhileTheDispatcherRuns(t *testing.T) {
	clock := newTestClock()
	b := New(testOptions(t, Options{
		Config: &machines.Config{Machines: []machines.Machine{testMachine("b1", 1, "x86_64-linux")}},
		Now:    clock.Now,
	}))
	defer b.Close()
	testbed.WaitFor(t, 5*time.Second, "the dispatcher's first round", func() bool { return b.beat.Load() != 0 })
	if err := b.Healthy(); err != nil {
		t.Fatalf("Healthy with a running dispatcher: %v", err)
	}
	// A round after the clock moved: still healthy.
	clock.Advance(stuckAfter + time.Second)
	moved := clock.Now().UnixNano()
	b.kick()
	testbed.WaitFor(t, 5*time.Second, "the dispatcher to go round after the clock moved", func() bool { return b.beat.Load() >= moved })
	if err := b.Healthy(); err != nil {
		t.Fatalf("Healthy with a dispatcher that goes round: %v", err)
	}
	// The broker's lock held for good: the dispatcher stops at it.
	b.mu.Lock()
	clock.Advance(stuckAfter + time.Second)
	err := b.Healthy()
	b.mu.Unlock()
	if err == nil {
		t.Fatalf("Healthy with the broker's lock held for %v: nil, want an error", stuckAfter+time.Second)
	}
	b.Close()
	if err := b.Healthy(); err == nil {
		t.Error("Healthy after Close: nil, want an error")
	}
}
