package broker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nix-community/go-nix/pkg/derivation"
	"go.uber.org/zap"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/nar"
	"github.com/nix-offload/nix-offload/internal/offload"
	"github.com/nix-offload/nix-offload/internal/scheduler"
	"github.com/nix-offload/nix-offload/internal/serveproto"
)

// errClientGone cancels the builds of a client whose connection closed.
var errClientGone = errors.New("the client went away")

// errCancelled cancels a build on request.
var errCancelled = errors.New("cancelled")

// build is one build the broker runs for a client.
type build struct {
	b      *Broker
	t      *ticket
	req    brokerapi.BuildRequest
	drv    *derivation.Derivation
	inputs []string
	ctx    context.Context
	cancel context.CancelCauseFunc

	events   *eventWriter
	terminal chan struct{} // closed after the last event was written

	mu      sync.Mutex
	ho      *handoff // set once the outputs are offered to the client
	machine *machine // the machine of the current attempt

	done chan struct{} // closed when the build is over
	err  error         // valid after done
}

// handoff is a successful build's outputs, offered to the client.
type handoff struct {
	outputs  []serveproto.PathInfo
	fetch    func(path string, w io.Writer) error
	fetchMu  sync.Mutex
	broken   bool // a fetch failed part-way: the session's stream is lost
	imported chan error
}

// emit sends an event unless the stream has ended.
func (bd *build) emit(ev brokerapi.Event) { bd.events.emit(ev) }

// end sends the stream's last event.
func (bd *build) end(ev brokerapi.Event) {
	bd.events.emit(ev)
	bd.events.close()
	close(bd.terminal)
}

// run drives the build: wait for a slot, run on the machine, retry
// elsewhere when the machine is lost.
func (bd *build) run() {
	b := bd.b
	defer b.wg.Done()
	var err error
	defer func() {
		bd.err = err
		b.forget(bd.t)
		b.mu.Lock()
		delete(b.builds, bd.t.id)
		b.mu.Unlock()
		if bd.t.owner != nil {
			bd.t.owner.disown(bd.t.id)
		}
		close(bd.done)
		bd.cancel(nil)
	}()
	for attempt := 1; ; attempt++ {
		var m *machine
		m, err = bd.waitSlot()
		if errors.Is(err, errHandBack) {
			bd.handBack(err)
			return
		}
		if err != nil {
			bd.fail(brokerapi.FailMisc, err)
			return
		}
		b.log.Debug("build starts", zap.String("drv", bd.req.DrvPath), zap.String("machine", m.name), zap.Int("attempt", attempt))
		bd.emit(brokerapi.Event{Type: brokerapi.EventStarted, Build: bd.t.id, Machine: m.name})
		var retry bool
		retry, err = bd.runOn(m)
		b.log.Debug("build ends", zap.String("drv", bd.req.DrvPath), zap.String("machine", m.name), zap.Error(err))
		if err == nil || !retry {
			return
		}
		b.log.Warn("build lost its machine", zap.String("drv", bd.req.DrvPath), zap.String("machine", m.name), zap.Error(err))
		if attempt >= maxAttempts || bd.ctx.Err() != nil || !b.requeue(bd.t, m, err) {
			bd.fail(brokerapi.FailMisc, err)
			return
		}
		bd.emit(brokerapi.Event{Type: brokerapi.EventRetrying, Machine: m.name, Reason: err.Error()})
	}
}

// fail ends the stream with a failure, unless the outputs were offered
// already (the client then hears it from /imported).
func (bd *build) fail(kind string, err error) {
	bd.mu.Lock()
	offered := bd.ho != nil
	bd.mu.Unlock()
	if offered {
		return
	}
	bd.end(brokerapi.Event{Type: brokerapi.EventFailed, Kind: kind, Error: err.Error()})
}

// handBack ends the stream telling the client to run the build itself.
func (bd *build) handBack(err error) {
	bd.end(brokerapi.Event{Type: brokerapi.EventHandback, Reason: err.Error()})
}

// failureErr turns a ticket's failure into an error.
func failureErr(why string) error {
	if why == handBack {
		return errHandBack
	}
	return errors.New(why)
}

// waitSlot returns the machine whose slot the ticket holds, waiting in the
// queue if it must.
func (bd *build) waitSlot() (*machine, error) {
	b, t := bd.b, bd.t
	b.mu.Lock()
	if t.machine != nil {
		m := t.machine
		b.mu.Unlock()
		return m, nil
	}
	if t.failure != "" {
		b.mu.Unlock()
		return nil, failureErr(t.failure)
	}
	pos := slices.Index(b.queue, t) + 1
	reason := t.failure
	if reason == "" {
		reason = b.decideLocked(t).Reason
	}
	b.mu.Unlock()
	bd.emit(brokerapi.Event{Type: brokerapi.EventQueued, Position: pos, Reason: reason})
	queuedAt := time.Now()
	for {
		select {
		case <-t.granted:
		case <-bd.ctx.Done():
			return nil, context.Cause(bd.ctx)
		}
		b.mu.Lock()
		m, failure := t.machine, t.failure
		b.mu.Unlock()
		switch {
		case failure != "":
			b.mx.queueWait(time.Since(queuedAt))
			return nil, failureErr(failure)
		case m != nil:
			b.mx.queueWait(time.Since(queuedAt))
			return m, nil
		}
		// A wake-up left over from a grant the build did not wait for
		// (see ticket.wake): still queued.
	}
}

// requeue gives up t's slot on m after m failed it, and puts t at the head
// of the queue: it has waited longest. It returns false, and queues
// nothing, when every machine that could build t has failed it: the queue
// would keep t forever, since the scheduler sees the excluded machines as
// down and the probes skip them.
func (b *Broker) requeue(t *ticket, m *machine, why error) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.releaseLocked(t)
	t.exclude[m.name] = why.Error()
	if b.stopping {
		t.failure = handBack
		t.wake()
		return true
	}
	if !slices.ContainsFunc(b.machines, func(o *machine) bool {
		_, excluded := t.exclude[o.name]
		return !excluded && scheduler.Matches(o.cfg, t.req)
	}) {
		return false
	}
	t.queued = true
	b.queue = append([]*ticket{t}, b.queue...)
	b.dispatchLocked()
	return true
}

// localError marks a failure of the local store, which another machine
// would not fix.
type localError struct{ err error }

func (e *localError) Error() string { return "local store: " + e.err.Error() }
func (e *localError) Unwrap() error { return e.err }

// runOn runs the build on m. retry says the machine was lost before the
// outputs were offered, so another machine may do better.
func (bd *build) runOn(m *machine) (retry bool, err error) {
	b := bd.b
	sess, err := m.pool.Get(bd.ctx)
	if err != nil {
		if bd.ctx.Err() != nil {
			return false, context.Cause(bd.ctx)
		}
		return true, fmt.Errorf("cannot use '%s': %w", m.name, err)
	}
	reusable := false
	defer func() { m.pool.Put(sess, reusable) }()
	bd.mu.Lock()
	bd.machine = m
	bd.mu.Unlock()

	opts := serveproto.BuildOptions{
		MaxSilentTime: time.Duration(bd.req.Options.MaxSilentTime) * time.Second,
		BuildTimeout:  time.Duration(bd.req.Options.Timeout) * time.Second,
		MaxLogSize:    bd.req.Options.MaxLogSize,
		KeepFailed:    bd.req.Options.KeepFailed,
	}
	logw := &logSink{bd: bd}
	sess.SetLog(logw)
	defer sess.SetLog(nil)

	bctx, cancel := context.WithCancelCause(bd.ctx)
	defer cancel(nil)
	stopWatch := offload.WatchLimits(bctx, cancel, opts, &logw.activity)
	defer stopWatch()
	stopOnCancel := context.AfterFunc(bctx, sess.Close)
	defer stopOnCancel()

	job := offload.Job{
		Machine:       m.name,
		DrvPath:       bd.req.DrvPath,
		Drv:           bd.drv,
		Inputs:        bd.inputs,
		WantedOutputs: bd.req.WantedOutputs,
		Options:       opts,
		Substitute:    bd.req.Options.Substitute,
		Transfers:     transfers{sess: sess, up: m.uploads},
	}
	started := time.Now()
	err = offload.Run(bctx, sess.Conn(), &buildLocal{bd: bd, m: m}, job, offload.Events{
		Copying: func(n int, bytes uint64) {
			bd.emit(brokerapi.Event{Type: brokerapi.EventCopying, Machine: m.name, Paths: n, Bytes: bytes})
		},
		Building: func() {
			bd.emit(brokerapi.Event{Type: brokerapi.EventBuilding, Machine: m.name})
			logw.open.Store(true)
			sess.StderrIsLog()
		},
		Fetching: func(n int, bytes uint64) {
			bd.emit(brokerapi.Event{Type: brokerapi.EventFetching, Machine: m.name, Paths: n, Bytes: bytes})
		},
	})
	bd.mu.Lock()
	offered := bd.ho != nil
	broken := offered && bd.ho.broken
	bd.mu.Unlock()

	var be *offload.BuildError
	var le *offload.LimitError
	var local *localError
	switch {
	case err == nil:
		reusable = !broken
		m.builds.Add(1)
		b.mx.built(m.name, "success", time.Since(started))
		return false, nil
	case errors.As(context.Cause(bctx), &le):
		m.failed.Add(1)
		b.mx.built(m.name, "timeout", time.Since(started))
		bd.fail(brokerapi.FailTimeout, fmt.Errorf("build of '%s' on '%s' failed: %w", bd.req.DrvPath, m.name, le))
		return false, err
	case bd.ctx.Err() != nil:
		b.mx.built(m.name, "cancelled", time.Since(started))
		return false, context.Cause(bd.ctx)
	case errors.As(err, &be):
		reusable = true
		m.failed.Add(1)
		kind := brokerapi.FailBuild
		if be.TimedOut() {
			kind = brokerapi.FailTimeout
		}
		b.mx.built(m.name, kind, time.Since(started))
		bd.fail(kind, err)
		return false, err
	case offered || errors.As(err, &local):
		m.failed.Add(1)
		b.mx.built(m.name, "error", time.Since(started))
		bd.fail(brokerapi.FailMisc, err)
		return false, err
	case offload.MachineLost(err):
		// Before or during the build: both are worth another machine.
		b.mx.built(m.name, "lost", time.Since(started))
		// A link that went dead shows only as the end of the stream; say
		// why the connection was closed.
		if s, ok := sess.(interface{ Lost() error }); ok && s.Lost() != nil {
			err = fmt.Errorf("%w: %v", err, s.Lost())
		}
		return true, err
	default:
		m.failed.Add(1)
		b.mx.built(m.name, "error", time.Since(started))
		bd.fail(brokerapi.FailMisc, err)
		return false, err
	}
}

// logSink turns the remote's stderr into log events once the build
// command is out; what the machine prints before is not the build's log.
type logSink struct {
	bd       *build
	open     atomic.Bool
	activity offload.Activity
}

func (l *logSink) Write(p []byte) (int, error) {
	l.activity.Touch()
	if l.open.Load() {
		l.bd.emit(brokerapi.Event{Type: brokerapi.EventLog, Text: string(p)})
	}
	return len(p), nil
}

// buildLocal is the local store as the engine sees it in the broker: reads
// go to the broker's warm read sessions; outputs go to the client, which
// makes them valid where the store is writable.
type buildLocal struct {
	bd *build
	m  *machine
}

func (l *buildLocal) PathInfos(paths []string) ([]serveproto.PathInfo, error) {
	infos, err := l.bd.b.local.pathInfos(paths)
	if err != nil {
		return nil, &localError{err}
	}
	return infos, nil
}

func (l *buildLocal) Dump(p string, w io.Writer) (nar.Stats, error) {
	st, err := l.bd.b.local.dump(p, w)
	l.m.bytesSent.Add(uint64(st.Size))
	l.bd.b.mx.sent(l.m.name, st.Size)
	return st, err
}

func (l *buildLocal) Valid(paths []string) ([]string, error) {
	valid, err := l.bd.b.local.valid(paths)
	if err != nil {
		return nil, &localError{err}
	}
	return valid, nil
}

// AddOutputs offers the outputs to the client and waits until it has made
// them valid. The machine's slot is free from here on: the build is over.
func (l *buildLocal) AddOutputs(infos []serveproto.PathInfo, fetch func(path string, w io.Writer) error) error {
	bd := l.bd
	missing, err := bd.b.local.missingOutputs(infos)
	if err != nil {
		return &localError{err}
	}
	bd.b.mu.Lock()
	bd.b.releaseLocked(bd.t)
	bd.b.mu.Unlock()

	ho := &handoff{outputs: missing, fetch: fetch, imported: make(chan error, 1)}
	bd.mu.Lock()
	bd.ho = ho
	bd.mu.Unlock()
	out := make([]brokerapi.PathInfo, len(missing))
	for i, in := range missing {
		out[i] = brokerapi.PathInfo{Path: in.Path, Deriver: in.Deriver, NarHash: in.NarHash, NarSize: in.NarSize, References: in.References}
	}
	bd.end(brokerapi.Event{Type: brokerapi.EventOutputs, Build: bd.t.id, Machine: l.m.name, Outputs: out})
	select {
	case err := <-ho.imported:
		if err != nil {
			return &localError{err}
		}
		return nil
	case <-bd.ctx.Done():
		return context.Cause(bd.ctx)
	}
}

// fetchNAR writes the NAR of one offered output to w.
func (bd *build) fetchNAR(base string, w io.Writer) error {
	bd.mu.Lock()
	ho := bd.ho
	bd.mu.Unlock()
	if ho == nil {
		return fmt.Errorf("build %s has no outputs to fetch", bd.t.id)
	}
	i := slices.IndexFunc(ho.outputs, func(o serveproto.PathInfo) bool { return path.Base(o.Path) == base })
	if i < 0 {
		return fmt.Errorf("build %s has no output %q to fetch", bd.t.id, base)
	}
	ho.fetchMu.Lock()
	defer ho.fetchMu.Unlock()
	if ho.broken {
		return errors.New("an earlier fetch of this build failed part-way")
	}
	cw := &countWriter{w: w}
	err := ho.fetch(ho.outputs[i].Path, cw)
	bd.mu.Lock()
	m := bd.machine
	bd.mu.Unlock()
	m.bytesRcv.Add(uint64(cw.n))
	bd.b.mx.received(m.name, cw.n)
	if err != nil {
		ho.broken = true
	}
	return err
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}
