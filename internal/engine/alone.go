package engine

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nix-offload/nix-offload/internal/health"
	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/scheduler"
	"github.com/nix-offload/nix-offload/internal/slots"
)

// Timings of [Alone].
const (
	// PostponeWait is how long an accepted build waits before it asks again
	// for a slot, when every capable machine is busy.
	PostponeWait = 2 * time.Second
	// ProbeEvery is how often a machine on backoff is tried anyway when it
	// is the only one left for a build (as the broker does).
	ProbeEvery = 10 * time.Second
	// DefaultGiveUp is how long a build waits for its only capable machines
	// to come back from transient failures before it fails with the last
	// error (machines.Daemon's machine-wait overrides it).
	DefaultGiveUp = 5 * time.Minute
)

// slotLockWait bounds the wait for the host's slot lock: it is held for a
// few hundred system calls at a time, so a longer wait means another user's
// process holds it. A variable for tests.
var slotLockWait = 10 * time.Second

// Alone is the placer of a hook that works without a broker: it decides
// under the host's slot lock (internal/slots), skips the machines the
// host's health file has on backoff, and opens one serve session per
// attempt with [Connect]. A machine that cannot be reached is recorded in
// the health file, for every process of the host, and skipped.
//
// It places by load ÷ speed alone ([scheduler.Decide]): a hook process has
// no memory of where inputs went, and no warm connection to read a
// machine's load and free space on without another round trip before each
// build, so min-free-space and max-load are the broker's (internal/broker).
type Alone struct {
	Machines []machines.Machine
	Slots    *slots.Dir
	Health   *health.Tracker
	// Connect opens a session on m; [Connect] with Stderr unset if nil.
	Connect func(ctx context.Context, m machines.Machine) (Session, func(), error)
	// Put, if set, takes back each session Connect gave when its attempt
	// ends, reusable or not (a warm pool's Put), instead of closing it
	// and its connection.
	Put func(s Session, reusable bool)
	// Warn says that a machine cannot be used and why.
	Warn func(machine string, err error)
	// GiveUp bounds the wait for machines that failed transiently;
	// DefaultGiveUp if 0.
	GiveUp time.Duration
	Clock  Clock

	// down is what this process saw fail: name → why. Permanent failures
	// stay here for the process's life; transient ones are left to health.
	down      map[string]string
	permanent map[string]bool
	firstFail time.Time // when a capable machine first failed here
}

// NoMachineError is a request that no machine takes now; Decision says why
// and what to answer Nix.
type NoMachineError struct {
	Decision scheduler.Decision
}

func (e *NoMachineError) Error() string { return e.Decision.Reason }

// UnusableError is a build whose every capable machine failed for good, or
// for longer than the wait allows: the build fails with the last error.
type UnusableError struct {
	Reasons []string // "'m': why", one per machine
}

func (e *UnusableError) Error() string {
	return "every machine that can build it failed: " + strings.Join(e.Reasons, "; ")
}

func (a *Alone) clock() Clock {
	if a.Clock == nil {
		return RealClock
	}
	return a.Clock
}

// Try is Acquire before Nix has been answered: when no machine takes req
// now, it returns a *NoMachineError whose Decision is the reply (postpone
// included), or an *UnusableError when Nix must be told to look elsewhere.
func (a *Alone) Try(ctx context.Context, req scheduler.Request) (Lease, error) {
	return a.acquire(ctx, req, nil, false)
}

// Acquire implements [Placer]: after "# accept" there is no postponing, so
// it waits for a slot instead, up to GiveUp while the capable machines fail.
func (a *Alone) Acquire(ctx context.Context, req scheduler.Request, exclude map[string]string) (Lease, error) {
	return a.acquire(ctx, req, exclude, true)
}

func (a *Alone) acquire(ctx context.Context, req scheduler.Request, exclude map[string]string, wait bool) (Lease, error) {
	if a.down == nil {
		a.down, a.permanent = map[string]string{}, map[string]bool{}
	}
	for {
		a.Health.Reload() // on error the Tracker keeps what it knew
		down := a.Health.Down()
		for n, why := range a.down {
			down[n] = why
		}
		for n, why := range exclude {
			down[n] = why
		}
		d, slot, m, err := a.takeSlot(ctx, req, down)
		if err != nil {
			return nil, err
		}
		if d.Verdict == scheduler.Postpone && slot == nil {
			if uerr := a.unusable(req, down, exclude); uerr != nil {
				return nil, uerr
			}
			// The only capable machines are on backoff: probe one, as the
			// broker does, rather than wait out the backoff.
			m, slot, err = a.probe(ctx, req, down, exclude)
			if err != nil {
				return nil, err
			}
		}
		if slot == nil {
			switch {
			case d.Verdict == scheduler.Accept:
				continue // other hooks took the free slots first: decide again
			case d.Verdict == scheduler.Postpone && wait:
				ticks, stop := a.clock().Tick(PostponeWait)
				select {
				case <-ticks:
					stop()
					continue
				case <-ctx.Done():
					stop()
					return nil, context.Cause(ctx)
				}
			}
			return nil, &NoMachineError{Decision: d}
		}
		sess, closeConn, err := a.connect(ctx, m)
		if err != nil {
			slot.Release()
			if ctx.Err() != nil {
				return nil, context.Cause(ctx)
			}
			a.failed(m, err)
			continue // the next machine, or a verdict that says why
		}
		a.Health.Succeeded(m.Name())
		delete(a.down, m.Name())
		a.firstFail = time.Time{}
		return &aloneLease{m: m.Name(), s: sess, slot: slot, closeConn: closeConn, put: a.Put}, nil
	}
}

func (a *Alone) connect(ctx context.Context, m machines.Machine) (Session, func(), error) {
	if a.Connect != nil {
		return a.Connect(ctx, m)
	}
	return Connect(ctx, m, nil)
}

// failed records that m could not be used.
func (a *Alone) failed(m machines.Machine, err error) {
	if a.Warn != nil {
		a.Warn(m.Name(), err)
	}
	a.Health.Failed(m.Name(), err)
	a.down[m.Name()] = err.Error()
	if Permanent(err) {
		a.permanent[m.Name()] = true
	}
	if a.firstFail.IsZero() {
		a.firstFail = a.clock().Now()
	}
}

// unusable returns an *UnusableError when every machine that can build req
// is excluded or failed in this process, for good or for longer than GiveUp.
func (a *Alone) unusable(req scheduler.Request, down, exclude map[string]string) error {
	giveUp := a.GiveUp
	if giveUp <= 0 {
		giveUp = DefaultGiveUp
	}
	expired := !a.firstFail.IsZero() && a.clock().Now().Sub(a.firstFail) >= giveUp
	var reasons []string
	for _, m := range a.Machines {
		if !scheduler.Matches(m, req) {
			continue
		}
		why, isDown := down[m.Name()]
		_, here := a.down[m.Name()]
		_, excluded := exclude[m.Name()]
		if !excluded && (!isDown || !here || !a.permanent[m.Name()] && !expired) {
			return nil
		}
		reasons = append(reasons, fmt.Sprintf("'%s': %s", m.Name(), why))
	}
	if len(reasons) == 0 {
		return nil
	}
	return &UnusableError{Reasons: reasons}
}

// probe takes a slot on a capable machine on backoff that is due for a
// probe, if there is one.
func (a *Alone) probe(ctx context.Context, req scheduler.Request, down, exclude map[string]string) (machines.Machine, *slots.Slot, error) {
	for _, m := range a.Machines {
		_, excluded := exclude[m.Name()]
		if _, isDown := down[m.Name()]; !isDown || excluded || a.permanent[m.Name()] || !scheduler.Matches(m, req) {
			continue
		}
		if ok, _ := a.Health.Probe(m.Name(), ProbeEvery); !ok {
			continue
		}
		s, err := a.slotOn(ctx, m)
		if err != nil || s != nil {
			return m, s, err
		}
	}
	return machines.Machine{}, nil, nil
}

// lockSlots takes the host's slot lock, bounded: a lock held for long is
// another user's, and a hook must answer Nix rather than wait for it.
func (a *Alone) lockSlots(ctx context.Context) (func(), error) {
	lctx, cancel := context.WithTimeout(ctx, slotLockWait)
	defer cancel()
	unlock, err := a.Slots.Lock(lctx)
	if err != nil && ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
		return nil, fmt.Errorf("slots: %s: the lock is still held by another process after %v; "+
			"is the state directory shared with another user?", a.Slots.Path(), slotLockWait)
	}
	return unlock, err
}

func (a *Alone) slotOn(ctx context.Context, m machines.Machine) (*slots.Slot, error) {
	unlock, err := a.lockSlots(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	s, ok, err := a.Slots.Acquire(m)
	if !ok {
		return nil, err
	}
	return s, nil
}

// takeSlot decides for req under the slot lock and, on Accept, takes a slot
// on the best candidate that has one. slot is nil when the verdict is not
// Accept, or when other hooks took the free slots first.
func (a *Alone) takeSlot(ctx context.Context, req scheduler.Request, down map[string]string) (scheduler.Decision, *slots.Slot, machines.Machine, error) {
	unlock, err := a.lockSlots(ctx)
	if err != nil {
		return scheduler.Decision{}, nil, machines.Machine{}, err
	}
	defer unlock()
	load, err := a.Slots.Load(a.Machines)
	if err != nil {
		return scheduler.Decision{}, nil, machines.Machine{}, err
	}
	d := scheduler.Decide(a.Machines, req, load, down)
	preferPresent(d.Candidates, req.Present)
	for _, c := range d.Candidates {
		s, ok, err := a.Slots.Acquire(c)
		if err != nil {
			return d, nil, machines.Machine{}, err
		}
		if ok {
			return d, s, c, nil
		}
	}
	return d, nil, machines.Machine{}, nil
}

// preferPresent puts the candidates that hold most of the build's inputs
// first, keeping the scheduler's order among equals: a machine that has
// the inputs builds without a copy, when it has a free slot.
func preferPresent(cands []machines.Machine, present map[string]uint64) {
	if len(present) == 0 {
		return
	}
	slices.SortStableFunc(cands, func(a, b machines.Machine) int {
		return cmp.Compare(present[b.Name()], present[a.Name()])
	})
}

// aloneLease is a slot file and a one-use session.
type aloneLease struct {
	m         string
	s         Session
	slot      *slots.Slot
	closeConn func()
	put       func(Session, bool)
	once      sync.Once
}

func (l *aloneLease) Machine() string  { return l.m }
func (l *aloneLease) Session() Session { return l.s }

// Release closes the session, or gives it back to Put: reusable after a
// success or a build that failed on the machine, whose session is clean,
// as the broker's pools take them.
func (l *aloneLease) Release(err error) {
	l.once.Do(func() {
		if l.put != nil {
			l.put(l.s, err == nil || BuildFailed(err) && !TimedOut(err))
		} else {
			l.s.Close()
			l.closeConn()
		}
		l.slot.Release()
	})
}

var _ Placer = (*Alone)(nil)
var _ io.Writer = (*Gate)(nil)

// OpenHostState opens the host's slot files and health file (under the configuration's state
// directory), which every hook working without a broker shares, and `build` without one too.
// A health file that cannot be opened is reported to warn: health is then kept in memory.
func OpenHostState(cfg *machines.Config, warn func(error)) (*slots.Dir, *health.Tracker, error) {
	stateDir := cfg.Daemon.StateDir
	if stateDir == "" {
		stateDir = machines.DefaultStateDir
	}
	sl, err := slots.Open(filepath.Join(stateDir, "slots"))
	if err != nil {
		return nil, nil, err
	}
	tracker, herr := health.Open(filepath.Join(stateDir, "health.json"))
	if herr != nil {
		warn(herr)
	}
	return sl, tracker, nil
}
