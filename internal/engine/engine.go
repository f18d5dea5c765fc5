package engine

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/nix-offload/nix-offload/internal/daemonproto"
	"github.com/nix-offload/nix-offload/internal/nar"
	"github.com/nix-offload/nix-offload/internal/offload"
	"github.com/nix-offload/nix-offload/internal/scheduler"
	"github.com/nix-offload/nix-offload/internal/serveproto"
)

// MaxMachines bounds the machines one build is tried on when machines are
// lost under it.
const MaxMachines = 3

// Session is one serve session on a machine, as the engine uses it. The
// serve protocol over SSH is one implementation (one-use in [Alone], warm
// in internal/pool); a second protocol is one more.
type Session interface {
	// Conn is the protocol client on the session.
	Conn() *serveproto.Conn
	// SetLog sends the session's stderr to w from now on; nil: nowhere.
	SetLog(w io.Writer)
	// StderrIsLog says that stderr is now a build log, so that only its
	// error: lines explain a failure.
	StderrIsLog()
	// Lost says why the connection under the session was closed for a
	// peer that stopped answering, or is nil.
	Lost() error
	// Close ends the session, which stops a running build on the machine.
	// It returns within a few seconds whatever the machine does.
	Close()
}

// Lease is a slot on one machine and a session there, held by one attempt.
type Lease interface {
	// Machine is the machine's name.
	Machine() string
	// Session is the session of this attempt.
	Session() Session
	// Release ends the lease: the slot is free and the session is closed or
	// returned to its pool. err is the attempt's outcome, nil on success.
	Release(err error)
}

// Placer hands out leases.
type Placer interface {
	// Acquire returns a lease on a machine that can build req and is not in
	// exclude (name → why), waiting for a slot when every capable machine is
	// busy. It may add to exclude the machines it could not use. It fails
	// when no machine will do: every capable one is excluded or down for
	// good, or ctx ended.
	Acquire(ctx context.Context, req scheduler.Request, exclude map[string]string) (Lease, error)
}

// Events receives a build's progress; any field may be nil. They are called
// from the goroutine that called [Run].
type Events struct {
	Started  func(machine string, attempt int)
	Copying  func(machine string, paths int, bytes uint64)
	Building func(machine string)
	Fetching func(machine string, paths int, bytes uint64)
	// Retrying: the attempt on machine was lost with err; the build is
	// going to another machine.
	Retrying func(machine string, err error)
	// Outputs: the outputs stayed on machine (Job.KeepOutputs); infos are
	// their metadata there.
	Outputs func(machine string, infos []serveproto.PathInfo)
}

// Build is one accepted build.
type Build struct {
	Request scheduler.Request
	// Job is the build; its Machine and Transfers are set per attempt.
	Job offload.Job
	// Local is the local store; what it returns is marked as local here.
	Local offload.Local
	// Log receives the machine's stderr once the build command is out.
	Log io.Writer
	// Activities, if set, receives an ssh-ng machine's activities and
	// their results other than log lines, from the protocol reader: it
	// must not block (hookproto.Relay).
	Activities func(daemonproto.Message)
	Events     Events
	// Transfers, if set, gives the upload table of the lease's machine.
	Transfers func(Lease) offload.Transfers
	// Clock is RealClock if nil.
	Clock Clock
}

// Run builds b on machines from p until it is done: it succeeded, failed
// for good, or was lost on MaxMachines machines. The error is what the
// last attempt failed with; see [TimedOut], [BuildFailed].
func Run(ctx context.Context, p Placer, b Build) error {
	if b.Clock == nil {
		b.Clock = RealClock
	}
	exclude := map[string]string{}
	var lost error
	for n := 1; ; n++ {
		l, err := p.Acquire(ctx, b.Request, exclude)
		if err != nil {
			if lost != nil {
				return fmt.Errorf("%w; %w", lost, err)
			}
			return err
		}
		if b.Events.Started != nil {
			b.Events.Started(l.Machine(), n)
		}
		err = attempt(ctx, l, &b)
		l.Release(err)
		if !RetryElsewhere(err) || ctx.Err() != nil {
			return err
		}
		if n >= MaxMachines {
			return fmt.Errorf("%w (%d machines lost; giving up)", err, n)
		}
		exclude[l.Machine()] = err.Error()
		if b.Events.Retrying != nil {
			b.Events.Retrying(l.Machine(), err)
		}
		lost = err
	}
}

// attempt runs b once on l's machine. A *LostError means the machine was
// lost before any output was fetched.
func attempt(ctx context.Context, l Lease, b *Build) error {
	m, s := l.Machine(), l.Session()
	gate := NewGate(b.Log, b.Clock)
	defer gate.Close()
	s.SetLog(gate)
	defer s.SetLog(nil)
	if as, ok := s.(ActivitySession); ok && b.Activities != nil {
		as.SetActivities(b.Activities)
		defer as.SetActivities(nil)
	}

	// Cancel the build when Nix's limits pass (plus grace), or when we are
	// asked to stop: closing the session makes the machine stop the build.
	bctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stopWatch := WatchLimits(bctx, cancel, b.Job.Options, gate.LastOutput, b.Clock)
	defer stopWatch()
	stopOnCancel := context.AfterFunc(bctx, s.Close)
	defer stopOnCancel()

	job := b.Job
	job.Machine = m
	if b.Transfers != nil {
		job.Transfers = b.Transfers(l)
	}
	ev := b.Events
	fetching := false
	run := func(ctx context.Context, local offload.Local, job offload.Job, ev offload.Events) error {
		return offload.Run(ctx, s.Conn(), local, job, ev)
	}
	if ds, ok := s.(DaemonSession); ok && ds.DaemonConn() != nil {
		run = func(ctx context.Context, local offload.Local, job offload.Job, ev offload.Events) error {
			return offload.RunDaemon(ctx, ds.DaemonConn(), local, job, ev)
		}
	}
	err := run(bctx, markLocal{b.Local}, job, offload.Events{
		Copying: func(n int, bytes uint64) {
			if ev.Copying != nil {
				ev.Copying(m, n, bytes)
			}
		},
		Building: func() {
			if ev.Building != nil {
				ev.Building(m)
			}
			gate.Open()
			s.StderrIsLog()
		},
		Fetching: func(n int, bytes uint64) {
			fetching = true
			if ev.Fetching != nil {
				ev.Fetching(m, n, bytes)
			}
		},
		Outputs: func(infos []serveproto.PathInfo) {
			if ev.Outputs != nil {
				ev.Outputs(m, infos)
			}
		},
	})
	var le *LimitError
	switch {
	case err == nil:
		return nil
	case errors.As(context.Cause(bctx), &le):
		return fmt.Errorf("build of '%s' on '%s' failed: %w", job.DrvPath, m, le)
	case ctx.Err() != nil, fetching, BuildFailed(err), errors.As(err, new(*LocalError)):
		return err
	case streamLost(err):
		// A link that went dead shows only as the end of the stream; say
		// why the connection was closed.
		if why := s.Lost(); why != nil {
			err = fmt.Errorf("%w: %v", err, why)
		}
		return &LostError{Machine: m, Err: err}
	}
	return err
}

// markLocal marks the local store's read failures as local.
type markLocal struct{ offload.Local }

func (l markLocal) PathInfos(paths []string) ([]serveproto.PathInfo, error) {
	infos, err := l.Local.PathInfos(paths)
	if err != nil && !errors.As(err, new(*LocalError)) {
		err = &LocalError{err}
	}
	return infos, err
}

func (l markLocal) Valid(paths []string) ([]string, error) {
	valid, err := l.Local.Valid(paths)
	if err != nil && !errors.As(err, new(*LocalError)) {
		err = &LocalError{err}
	}
	return valid, err
}

func (l markLocal) Dump(path string, w io.Writer) (nar.Stats, error) { return l.Local.Dump(path, w) }
