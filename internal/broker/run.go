package broker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path"
	"slices"
	"sync"
	"time"

	"github.com/nix-community/go-nix/pkg/derivation"
	"go.uber.org/zap"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/engine"
	"github.com/nix-offload/nix-offload/internal/graph"
	"github.com/nix-offload/nix-offload/internal/nar"
	"github.com/nix-offload/nix-offload/internal/offload"
	"github.com/nix-offload/nix-offload/internal/scheduler"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/uploads"
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
	// leader, if set, is a graph's build of the same derivation that was running when this
	// one (a hook's) started: this one waits for it (follow) before it builds.
	leader *build

	events   *eventWriter
	terminal chan struct{} // closed after the last event was written

	mu      sync.Mutex
	ho      *handoff         // set once the outputs are offered to the client
	machine *machine         // the machine of the current attempt
	kept    *brokerapi.Event // the outputs event of a KeepOutputs success

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

// run drives the build with the engine: a slot from the queue, a session
// from the machine's pool, another machine when one is lost.
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
	if bd.leader != nil {
		var served bool
		if served, err = bd.follow(); served {
			if err != nil {
				bd.fail(brokerapi.FailMisc, err)
			}
			return
		}
	}
	p := &placer{bd: bd}
	local := &buildLocal{bd: bd}
	err = engine.Run(bd.ctx, p, engine.Build{
		Request: bd.t.req,
		Job: offload.Job{
			DrvPath:       bd.req.DrvPath,
			Drv:           bd.drv,
			Inputs:        bd.inputs,
			WantedOutputs: bd.req.WantedOutputs,
			Options:       bd.options(),
			Substitute:    bd.req.Options.Substitute,
			KeepOutputs:   bd.req.KeepOutputs,
		},
		Local: local,
		Log:   logEvents{bd},
		Events: engine.Events{
			Started: func(m string, n int) {
				b.log.Debug("build starts", zap.String("drv", bd.req.DrvPath), zap.String("machine", m), zap.Int("attempt", n))
			},
			Copying: func(m string, n int, bytes uint64) {
				bd.emit(brokerapi.Event{Type: brokerapi.EventCopying, Machine: m, Paths: n, Bytes: bytes})
			},
			Building: func(m string) {
				bd.emit(brokerapi.Event{Type: brokerapi.EventBuilding, Machine: m})
			},
			Fetching: func(m string, n int, bytes uint64) {
				bd.emit(brokerapi.Event{Type: brokerapi.EventFetching, Machine: m, Paths: n, Bytes: bytes})
			},
			Retrying: func(m string, err error) {
				b.log.Warn("build lost its machine", zap.String("drv", bd.req.DrvPath), zap.String("machine", m), zap.Error(err))
				bd.emit(brokerapi.Event{Type: brokerapi.EventRetrying, Machine: m, Reason: err.Error()})
			},
			Outputs: func(m string, infos []serveproto.PathInfo) {
				ev := brokerapi.Event{Type: brokerapi.EventOutputs, Build: bd.t.id, Machine: m, Outputs: apiInfos(infos)}
				bd.mu.Lock()
				bd.kept = &ev
				bd.mu.Unlock()
				bd.end(ev)
			},
		},
		Transfers: func(l engine.Lease) offload.Transfers {
			bl := l.(*lease)
			return uploads.For(bl.sess, bl.m.uploads)
		},
	})
	b.log.Debug("build ends", zap.String("drv", bd.req.DrvPath), zap.Error(err))
	switch {
	case err == nil:
	case errors.Is(err, errHandBack):
		bd.handBack(err)
	case bd.ctx.Err() != nil && p.started:
		// Cancelled while it ran: the client went away or asked for it.
	case local.lost() != "":
		bd.end(brokerapi.Event{Type: brokerapi.EventFailed, Kind: brokerapi.FailLostInput, Path: local.lost(), Error: err.Error()})
	case engine.TimedOut(err):
		bd.fail(brokerapi.FailTimeout, err)
	case engine.BuildFailed(err):
		bd.fail(brokerapi.FailBuild, err)
	default:
		bd.fail(brokerapi.FailMisc, err)
	}
}

// sameBuild returns the running build of req's derivation that req's submission waits for
// instead of building it again, if there is one: a derivation that two graphs, or a graph and
// a hook, need at once is built once. A KeepOutputs submission (a graph's) waits for any
// build of it, a graph's (KeepOutputs) first; a hook's build for a graph's only (nix-daemon's
// output locks keep two hooks of one derivation from running at once). With none, req's
// submission is the one that builds it: until it calls started (once it is in b.builds, or
// failed to start), others of the same derivation wait here, so that two at once do not both
// build.
func (b *Broker) sameBuild(req brokerapi.BuildRequest) (leader *build, started func()) {
	if req.KeepOutputs && req.Reservation != "" {
		return nil, func() {}
	}
	for {
		b.mu.Lock()
		var hook *build
		for _, bd := range b.builds {
			switch {
			case bd.req.DrvPath != req.DrvPath:
			case bd.req.KeepOutputs:
				if !req.KeepOutputs {
					priority := min(max(req.Priority, 0), brokerapi.MaxPriority)
					if req.Reservation != "" {
						priority = brokerapi.PriorityHook
					}
					b.lendPriorityLocked(bd.t, priority)
				}
				b.mu.Unlock()
				return bd, func() {}
			case req.KeepOutputs:
				hook = bd
			}
		}
		if hook != nil {
			b.mu.Unlock()
			return hook, func() {}
		}
		ch, busy := b.starting[req.DrvPath]
		if !busy {
			ch = make(chan struct{})
			if b.starting == nil {
				b.starting = map[string]chan struct{}{}
			}
			b.starting[req.DrvPath] = ch
			b.mu.Unlock()
			return nil, func() {
				b.mu.Lock()
				delete(b.starting, req.DrvPath)
				b.mu.Unlock()
				close(ch)
			}
		}
		b.mu.Unlock()
		<-ch // startBuild does not wait for machines: this is short
	}
}

// lendPriorityLocked raises queued t to priority, if it is lower: a hook that waits for a
// graph's build waits no longer in the queue than its own build would.
func (b *Broker) lendPriorityLocked(t *ticket, priority int) {
	if !t.queued || t.priority >= priority {
		return
	}
	if i := slices.Index(b.queue, t); i >= 0 {
		b.queue = slices.Delete(b.queue, i, i+1)
	}
	t.priority = priority
	b.enqueueLocked(t)
	b.dispatchLocked()
}

// sameBuildReason is the reason of the queued event of a submission that waits for leader.
func sameBuildReason(drvPath string, leader *build) string {
	return fmt.Sprintf("'%s' is being built for another client (build %s)", drvPath, leader.t.id)
}

// await waits for bd to end and returns what a submission that waited for it gets (see
// sameBuild): a KeepOutputs build's outputs event; for another build (a hook's), which brought
// the outputs home, an outputs event naming none, once every output of the derivation is
// valid locally. ok is false when bd failed or was cancelled, an output is not valid here, or
// ctx ended.
func (bd *build) await(ctx context.Context) (ev brokerapi.Event, ok bool) {
	select {
	case <-bd.done:
	case <-ctx.Done():
		return brokerapi.Event{}, false
	}
	bd.mu.Lock()
	kept, m := bd.kept, bd.machine
	bd.mu.Unlock()
	if kept != nil {
		return *kept, true
	}
	if bd.req.KeepOutputs || bd.err != nil {
		return brokerapi.Event{}, false
	}
	var paths []string
	for _, o := range bd.drv.Outputs {
		if o.Path == "" {
			return brokerapi.Event{}, false // floating content-addressed: where is not known here
		}
		paths = append(paths, o.Path)
	}
	valid, err := bd.b.local.valid(paths)
	if err != nil || len(valid) != len(paths) {
		return brokerapi.Event{}, false
	}
	ev = brokerapi.Event{Type: brokerapi.EventOutputs, Build: bd.t.id}
	if m != nil {
		ev.Machine = m.name
	}
	return ev, true
}

// follow runs a hook's build whose derivation a graph's build (bd.leader) builds now: the
// ticket's slot is given up while bd waits for it, and when it succeeded, the wanted outputs
// are offered to the client from the leader's machine, where they stay. served is false when
// bd must build it itself (the leader failed or was cancelled, or its machine no longer has
// them): the ticket is queued again, ahead of those that came later.
func (bd *build) follow() (served bool, err error) {
	b, t := bd.b, bd.t
	b.mu.Lock()
	b.releaseLocked(t)
	b.mu.Unlock()
	bd.emit(brokerapi.Event{Type: brokerapi.EventQueued, Reason: sameBuildReason(bd.req.DrvPath, bd.leader)})
	ev, ok := bd.leader.await(bd.ctx)
	if bd.ctx.Err() != nil {
		return true, context.Cause(bd.ctx)
	}
	var infos []serveproto.PathInfo
	m := b.byName[ev.Machine]
	if ok && m != nil {
		infos, ok = bd.wanted(ev.Outputs)
	}
	if ok && m != nil && bd.stillOn(m, infos) {
		b.log.Debug("build served from another client's build", zap.String("drv", bd.req.DrvPath), zap.String("machine", m.name), zap.String("leader", bd.leader.t.id))
		return true, bd.offer(m, infos, func(p string, w io.Writer) error {
			i := slices.IndexFunc(infos, func(in serveproto.PathInfo) bool { return in.Path == p })
			return b.readOn(bd.ctx, m.name, func(ms engine.MachineStore) error {
				_, err := ms.Dump(bd.ctx, infos[i], w)
				return err
			})
		})
	}
	b.mu.Lock()
	if b.stopping {
		t.failure = handBack
		t.wake()
	} else {
		b.requeueLocked(t)
		b.dispatchLocked()
	}
	b.mu.Unlock()
	return false, nil
}

// wanted picks the outputs bd's client wants (all if it named none) out of a build's outputs;
// ok is false if one of them is not there.
func (bd *build) wanted(outputs []brokerapi.PathInfo) ([]serveproto.PathInfo, bool) {
	names := bd.req.WantedOutputs
	if len(names) == 0 {
		for n := range bd.drv.Outputs {
			names = append(names, n)
		}
	}
	infos := make([]serveproto.PathInfo, 0, len(names))
	for _, n := range names {
		o, ok := bd.drv.Outputs[n]
		i := slices.IndexFunc(outputs, func(in brokerapi.PathInfo) bool { return in.Path == o.Path })
		if !ok || o.Path == "" || i < 0 {
			return nil, false
		}
		infos = append(infos, outputs[i].ServeInfo())
	}
	return infos, true
}

// stillOn reports whether m still has every one of infos (a machine's garbage collector may
// have taken what no session holds).
func (bd *build) stillOn(m *machine, infos []serveproto.PathInfo) bool {
	paths := make([]string, len(infos))
	for i, in := range infos {
		paths[i] = in.Path
	}
	var have []string
	err := bd.b.readOn(bd.ctx, m.name, func(ms engine.MachineStore) error {
		var err error
		have, err = ms.Valid(bd.ctx, paths, false)
		return err
	})
	return err == nil && len(have) == len(paths)
}

// options are the build's settings as the machine takes them.
func (bd *build) options() serveproto.BuildOptions {
	return serveproto.BuildOptions{
		MaxSilentTime: time.Duration(bd.req.Options.MaxSilentTime) * time.Second,
		BuildTimeout:  time.Duration(bd.req.Options.Timeout) * time.Second,
		MaxLogSize:    bd.req.Options.MaxLogSize,
		KeepFailed:    bd.req.Options.KeepFailed,
	}
}

// placer is the broker's engine.Placer for one build: the slot its ticket
// holds or waits for in the queue, and a session from that machine's pool.
type placer struct {
	bd      *build
	last    *machine // the machine of the last attempt
	started bool     // an attempt began
}

// Acquire gives up the slot of a machine that was lost (the ticket goes to
// the head of the queue, that machine excluded), waits for a slot and
// takes a session there. A machine whose pool cannot give a session is
// excluded too, and the ticket queued again.
func (p *placer) Acquire(ctx context.Context, _ scheduler.Request, exclude map[string]string) (engine.Lease, error) {
	bd, b := p.bd, p.bd.b
	if m := p.last; m != nil {
		p.last = nil
		if !b.requeue(bd.t, m, errors.New(exclude[m.name]), true) {
			return nil, errors.New("no other machine can build it")
		}
	}
	for {
		m, err := bd.waitSlot()
		if err != nil {
			return nil, err
		}
		bd.emit(brokerapi.Event{Type: brokerapi.EventStarted, Build: bd.t.id, Machine: m.name})
		sess, err := m.pool.Get(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil, context.Cause(ctx)
			}
			err = fmt.Errorf("cannot use '%s': %w", m.name, err)
			b.log.Warn("build cannot use its machine", zap.String("drv", bd.req.DrvPath), zap.String("machine", m.name), zap.Error(err))
			if engine.Permanent(err) {
				// Nothing changes until someone fixes the configuration:
				// this build does not wait for the machine.
				exclude[m.name] = err.Error()
			} else {
				// It may come back: keep it on backoff (the pool's dial
				// recorded it already, unless the failure came later), and
				// wait machine-wait for it or another.
				_, herr := b.health.Failed(m.name, err)
				b.healthError(herr)
			}
			if !b.requeue(bd.t, m, err, engine.Permanent(err)) {
				return nil, err
			}
			b.mu.Lock()
			why := b.waitedOutLocked(bd.t)
			if why != "" {
				b.releaseLocked(bd.t)
			}
			b.mu.Unlock()
			if why != "" {
				return nil, errors.New(why)
			}
			bd.emit(brokerapi.Event{Type: brokerapi.EventRetrying, Machine: m.name, Reason: err.Error()})
			continue
		}
		bd.mu.Lock()
		bd.machine = m
		bd.mu.Unlock()
		p.last, p.started = m, true
		return &lease{bd: bd, m: m, sess: sess, started: time.Now()}, nil
	}
}

// lease is a slot on m and a pool session there.
type lease struct {
	bd      *build
	m       *machine
	sess    Session
	started time.Time
}

func (l *lease) Machine() string         { return l.m.name }
func (l *lease) Session() engine.Session { return l.sess }

// Release returns the session to the pool (reusable when the build ended
// cleanly) and counts the outcome. The slot stays with the ticket: the
// next attempt's Acquire or the end of the build frees it.
func (l *lease) Release(err error) {
	bd, m := l.bd, l.m
	bd.mu.Lock()
	offered := bd.ho != nil
	broken := offered && bd.ho.broken
	bd.mu.Unlock()
	reusable, result := false, "error"
	switch {
	case err == nil:
		reusable, result = !broken, "success"
		m.builds.Add(1)
	case bd.ctx.Err() != nil:
		result = "cancelled"
	case engine.RetryElsewhere(err):
		result = "lost"
	case engine.TimedOut(err):
		reusable, result = engine.BuildFailed(err), "timeout"
		m.failed.Add(1)
	case engine.BuildFailed(err):
		reusable, result = true, brokerapi.FailBuild
		m.failed.Add(1)
	default:
		m.failed.Add(1)
	}
	bd.b.mx.built(m.name, result, time.Since(l.started))
	m.pool.Put(l.sess, reusable)
}

// logEvents sends the build log to the client as log events.
type logEvents struct{ bd *build }

func (l logEvents) Write(p []byte) (int, error) {
	l.bd.emit(brokerapi.Event{Type: brokerapi.EventLog, Text: string(p)})
	return len(p), nil
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
// of the queue: it has waited longest. A machine that failed t for good
// (exclude) is not tried for it again; one that failed transiently is, when
// it comes back, and starts t's wait of machine-wait. It returns false, and
// queues nothing, when every machine that could build t has failed it for
// good: the queue would keep t forever, since the scheduler sees the
// excluded machines as down and the probes skip them.
func (b *Broker) requeue(t *ticket, m *machine, why error, exclude bool) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.releaseLocked(t)
	if exclude {
		t.exclude[m.name] = why.Error()
	} else {
		if t.failedAt.IsZero() {
			t.failedAt = b.now()
		}
		t.lastErr = why.Error()
	}
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
	b.requeueLocked(t)
	b.dispatchLocked()
	return true
}

// buildLocal is the local store as the engine sees it in the broker: reads
// go to the broker's warm read sessions, or for a held input to a session
// of the machine that holds it; outputs go to the client, which makes them
// valid where the store is writable.
type buildLocal struct {
	bd *build

	mu       sync.Mutex
	lostPath string // a held input its machine could not give
}

// held returns what the client said of p, if a machine holds it.
func (l *buildLocal) held(p string) (brokerapi.HeldPath, bool) {
	i := slices.IndexFunc(l.bd.req.Held, func(h brokerapi.HeldPath) bool { return h.Path == p })
	if i < 0 {
		return brokerapi.HeldPath{}, false
	}
	return l.bd.req.Held[i], true
}

func (l *buildLocal) lost() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lostPath
}

// dumpHeld streams held path h from its machine, on a session of that
// machine's pool (either protocol).
func (l *buildLocal) dumpHeld(h brokerapi.HeldPath, w io.Writer) (nar.Stats, error) {
	if l.bd.b.byName[h.Machine] == nil {
		return nar.Stats{}, &engine.LocalError{Err: fmt.Errorf("%s: held by '%s', which is not configured", h.Path, h.Machine)}
	}
	var st nar.Stats
	werr := &engine.ErrWriter{W: w}
	err := l.bd.b.readOn(l.bd.ctx, h.Machine, func(ms engine.MachineStore) error {
		var err error
		info := serveproto.PathInfo{Path: h.Path, NarHash: h.NarHash, NarSize: h.NarSize}
		st, err = ms.Dump(l.bd.ctx, info, werr)
		return err
	})
	if err != nil && werr.Err == nil {
		l.mu.Lock()
		l.lostPath = h.Path
		l.mu.Unlock()
		// Final for this build: the client builds the producer again.
		err = &engine.LocalError{Err: fmt.Errorf("reading %s: %w", h.Path, err)}
	}
	return st, err
}

// apiInfos converts path infos for an event.
func apiInfos(infos []serveproto.PathInfo) []brokerapi.PathInfo {
	out := make([]brokerapi.PathInfo, len(infos))
	for i, in := range infos {
		out[i] = graph.APIInfo(in)
	}
	return out
}

// machine is the machine of the current attempt.
func (l *buildLocal) machine() *machine {
	l.bd.mu.Lock()
	defer l.bd.mu.Unlock()
	return l.bd.machine
}

func (l *buildLocal) PathInfos(paths []string) ([]serveproto.PathInfo, error) {
	var local []string
	for _, p := range paths {
		if _, ok := l.held(p); !ok {
			local = append(local, p)
		}
	}
	var infos []serveproto.PathInfo
	if len(local) > 0 {
		var err error
		if infos, err = l.bd.b.local.pathInfos(local); err != nil {
			return nil, &engine.LocalError{Err: err}
		}
	}
	out := make([]serveproto.PathInfo, 0, len(paths))
	for _, p := range paths {
		if h, ok := l.held(p); ok {
			out = append(out, h.ServeInfo())
			continue
		}
		i := slices.IndexFunc(infos, func(in serveproto.PathInfo) bool { return in.Path == p })
		if i < 0 {
			return nil, &engine.LocalError{Err: fmt.Errorf("%s: not valid in the local store", p)}
		}
		out = append(out, infos[i])
	}
	return out, nil
}

func (l *buildLocal) Dump(p string, w io.Writer) (nar.Stats, error) {
	var st nar.Stats
	var err error
	if h, ok := l.held(p); ok {
		st, err = l.dumpHeld(h, w)
	} else {
		st, err = l.bd.b.local.dump(p, w)
	}
	m := l.machine()
	m.bytesSent.Add(uint64(st.Size))
	l.bd.b.mx.sent(m.name, st.Size)
	if err == nil {
		// Sent whole; made valid there unless the build fails before it is: a hint.
		l.bd.b.know(m, p, uint64(st.Size))
	}
	return st, err
}

func (l *buildLocal) Valid(paths []string) ([]string, error) {
	valid, err := l.bd.b.local.valid(paths)
	if err != nil {
		return nil, &engine.LocalError{Err: err}
	}
	return valid, nil
}

// AddOutputs offers the outputs to the client and waits until it has made
// them valid. The machine's slot is free from here on: the build is over.
func (l *buildLocal) AddOutputs(infos []serveproto.PathInfo, fetch func(path string, w io.Writer) error) error {
	bd := l.bd
	m := l.machine()
	bd.b.mu.Lock()
	bd.b.releaseLocked(bd.t)
	bd.b.mu.Unlock()
	return bd.offer(m, infos, fetch)
}

// offer offers those of infos, outputs on m, that are not valid locally to the client, which
// reads each with fetch (GET .../nar/{base}), and waits until it has made them valid.
func (bd *build) offer(m *machine, infos []serveproto.PathInfo, fetch func(path string, w io.Writer) error) error {
	missing, err := bd.b.local.missingOutputs(infos)
	if err != nil {
		return &engine.LocalError{Err: err}
	}
	bd.b.mu.Lock()
	for _, in := range infos {
		m.knowLocked(in.Path, in.NarSize)
	}
	bd.b.mu.Unlock()

	ho := &handoff{outputs: missing, fetch: fetch, imported: make(chan error, 1)}
	bd.mu.Lock()
	bd.ho = ho
	bd.machine = m
	bd.mu.Unlock()
	bd.end(brokerapi.Event{Type: brokerapi.EventOutputs, Build: bd.t.id, Machine: m.name, Outputs: apiInfos(missing)})
	select {
	case err := <-ho.imported:
		if err != nil {
			return &engine.LocalError{Err: err}
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
