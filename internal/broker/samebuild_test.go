package broker

import (
	"context"
	"errors"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nix-community/go-nix/pkg/derivation"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/localstore"
	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/scheduler"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/servetest"
)

// These tests run a hook's build and a graph's build of one derivation at once: the one that
// came second waits for the first instead of building it again. The machine is a servetest
// server over pipes and the local store a servetest fake nix-store; the first build is one
// the test ends when it likes.

// TestNixStoreHelper is the fake nix-store that servetest.LocalStore runs; in a normal run it
// has nothing to do and passes.
func TestNixStoreHelper(t *testing.T) {
	servetest.RunNixStoreHelper()
}

const (
	sameDrv = "/nix/store/dddddddddddddddddddddddddddddddd-same.drv"
	sameOut = "/nix/store/kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk-same"
)

var sameDerivation = &derivation.Derivation{
	Outputs:  map[string]*derivation.Output{"out": {Path: sameOut}},
	Platform: "x86_64-linux",
	Builder:  "/bin/sh",
	Env:      map[string]string{"out": sameOut},
}

// pipeSession is a broker Session over a servetest pipe.
type pipeSession struct {
	ps   *servetest.PipeSession
	conn *serveproto.Conn
}

func (s *pipeSession) Conn() *serveproto.Conn                    { return s.conn }
func (s *pipeSession) SetLog(io.Writer)                          {}
func (s *pipeSession) StderrIsLog()                              {}
func (s *pipeSession) Lost() error                               { return nil }
func (s *pipeSession) Close()                                    { s.ps.Close() }
func (s *pipeSession) Locked(p []string) (locked, rest []string) { return nil, p }
func (s *pipeSession) MarkLocked([]string)                       {}

// pipePool gives a new session of srv each time; nothing is reused.
type pipePool struct {
	t   *testing.T
	srv *servetest.Server
}

func (p pipePool) Get(ctx context.Context) (Session, error) {
	ps := p.srv.Pipe(p.t, "b1")
	conn, err := serveproto.Handshake(ps.R, ps.W, serveproto.Options{Explain: ps.Explain})
	if err != nil {
		ps.Close()
		return nil, err
	}
	return &pipeSession{ps: ps, conn: conn}, nil
}
func (p pipePool) Put(s Session, _ bool)      { s.Close() }
func (p pipePool) Warm(context.Context) error { return nil }
func (p pipePool) Stats() PoolStats           { return PoolStats{} }
func (p pipePool) Close()                     {}

// sameEnv is a broker with one machine, b1 (a servetest server), and a fake local store.
type sameEnv struct {
	b     *Broker
	srv   *servetest.Server
	local *servetest.LocalStore
	m     *machine
}

func newSameEnv(t *testing.T) *sameEnv {
	t.Helper()
	e := &sameEnv{srv: &servetest.Server{}, local: servetest.NewLocalStore(t, "TestNixStoreHelper")}
	e.b = New(testOptions(t, Options{
		Config:  &machines.Config{Machines: []machines.Machine{testMachine("b1", 1, "x86_64-linux")}},
		NewPool: func(machines.Machine, func(error)) Pool { return pipePool{t: t, srv: e.srv} },
		OpenLocal: func() (*localstore.Store, error) {
			return localstore.Open(localstore.Options{RealStoreDir: e.local.Dir, Command: e.local.Command})
		},
	}))
	t.Cleanup(e.b.Close)
	e.m = e.b.machines[0]
	return e
}

// leader puts a build of sameDrv in the broker's builds that does nothing until finish:
// a graph's (KeepOutputs) or a hook's.
func (e *sameEnv) leader(keep bool) *build {
	b := e.b
	t := b.newTicket(scheduler.Request{System: "x86_64-linux"}, sameDrv, nil)
	ctx, cancel := context.WithCancelCause(b.ctx)
	bd := &build{
		b: b, t: t, req: brokerapi.BuildRequest{DrvPath: sameDrv, KeepOutputs: keep}, drv: sameDerivation,
		ctx: ctx, cancel: cancel, machine: e.m,
		events: newEventWriter(), terminal: make(chan struct{}), done: make(chan struct{}),
	}
	b.mu.Lock()
	b.builds[t.id] = bd
	b.mu.Unlock()
	return bd
}

// finish ends a leader: with err, or with kept as a KeepOutputs success's outputs event.
func (e *sameEnv) finish(bd *build, err error, kept *brokerapi.Event) {
	bd.mu.Lock()
	bd.kept = kept
	bd.mu.Unlock()
	bd.err = err
	e.b.mu.Lock()
	delete(e.b.builds, bd.t.id)
	e.b.mu.Unlock()
	close(bd.done)
	bd.cancel(nil)
}

// hook tries sameDrv as a hook does and starts its build as submit does (sameBuild, then the
// build), without reading a .drv file; its events go to the returned channel.
func (e *sameEnv) hook(t *testing.T) (*build, chan brokerapi.Event) {
	t.Helper()
	b := e.b
	resp := try(t, b, newClient(b), sameDrv, false)
	if resp.Verdict != brokerapi.Accept || resp.Queued {
		t.Fatalf("try: %+v, want a slot", resp)
	}
	req := brokerapi.BuildRequest{Reservation: resp.Reservation, DrvPath: sameDrv}
	leader, started := b.sameBuild(req)
	b.mu.Lock()
	ctx, cancel := context.WithCancelCause(b.ctx)
	bd := &build{
		b: b, t: b.tickets[resp.Reservation], req: req, drv: sameDerivation, leader: leader,
		ctx: ctx, cancel: cancel,
		events: newEventWriter(), terminal: make(chan struct{}), done: make(chan struct{}),
	}
	b.builds[bd.t.id] = bd
	b.wg.Add(1)
	b.mu.Unlock()
	started()
	ch := make(chan brokerapi.Event, 100)
	bd.events.attach(func(ev brokerapi.Event) bool { ch <- ev; return true })
	go bd.run()
	return bd, ch
}

// next returns the next event of ch that is not a log line.
func next(t *testing.T, ch chan brokerapi.Event) brokerapi.Event {
	t.Helper()
	for {
		select {
		case ev := <-ch:
			if ev.Type != brokerapi.EventLog {
				return ev
			}
		case <-time.After(10 * time.Second):
			t.Fatal("no event within 10 s")
		}
	}
}

// nextOf skips to the next event of type typ.
func nextOf(t *testing.T, ch chan brokerapi.Event, typ string) brokerapi.Event {
	t.Helper()
	var seen []string
	for {
		ev := next(t, ch)
		if ev.Type == typ {
			return ev
		}
		if ev.Type == brokerapi.EventFailed {
			t.Fatalf("after %v: failed: %+v, want %s", seen, ev, typ)
		}
		seen = append(seen, ev.Type)
	}
}

// imported does what the hook does with the outputs offered: fetches each over the build's
// NAR route, makes them valid in the local store, and says so.
func (e *sameEnv) imported(t *testing.T, bd *build) {
	t.Helper()
	bd.mu.Lock()
	ho := bd.ho
	bd.mu.Unlock()
	local, err := localstore.Open(localstore.Options{RealStoreDir: e.local.Dir, Command: e.local.Command})
	if err != nil {
		t.Fatal(err)
	}
	err = local.AddMissing(ho.outputs, func(p string, w io.Writer) error { return bd.fetchNAR(path.Base(p), w) })
	local.Close()
	if err != nil {
		t.Fatal(err)
	}
	ho.imported <- nil
	waitDone(t, bd)
	if bd.err != nil {
		t.Fatalf("the hook's build: %v", bd.err)
	}
	if !e.local.Valid(t, sameOut) {
		t.Fatal("the output is not valid locally")
	}
}

func builtOn(srv *servetest.Server) int {
	n := 0
	for _, op := range srv.Ops() {
		if op == servetest.BuildDerivation {
			n++
		}
	}
	return n
}

// wantBuilt checks that the machine ran n builds, and that the broker counted n.
func (e *sameEnv) wantBuilt(t *testing.T, n int) {
	t.Helper()
	if got, counted := builtOn(e.srv), e.m.builds.Load(); got != n || counted != uint64(n) {
		t.Fatalf("%d builds on the machine, %d counted; want %d", got, counted, n)
	}
}

// TestHookWaitsForGraphsBuild: a hook that asks for a derivation a graph builds now gives up
// its slot, says why it waits, and when the graph's build succeeded is offered the outputs
// from the machine that built them (fetched over its own NAR route): nothing is built twice.
func TestHookWaitsForGraphsBuild(t *testing.T) {
	e := newSameEnv(t)
	e.srv.Add(serveproto.PathInfo{Path: sameOut, Deriver: sameDrv}, servetest.FileNAR("built once\n"))
	out, ok := e.srv.Lookup(sameOut)
	if !ok {
		t.Fatal("the machine does not have the output")
	}
	g := e.leader(true)
	hk, events := e.hook(t)
	if hk.leader != g {
		t.Fatalf("the hook's build waits for %v, want the graph's build", hk.leader)
	}
	ev := next(t, events)
	if ev.Type != brokerapi.EventQueued || !strings.Contains(ev.Reason, "build "+g.t.id) {
		t.Fatalf("first event %+v, want queued naming build %s", ev, g.t.id)
	}
	if n := used(e.b); n != 0 {
		t.Fatalf("%d slots used while the hook waits, want its slot free", n)
	}
	e.finish(g, nil, &brokerapi.Event{Type: brokerapi.EventOutputs, Build: g.t.id, Machine: e.m.name,
		Outputs: []brokerapi.PathInfo{graphAPIInfo(out.Info)}})
	ev = next(t, events)
	if ev.Type != brokerapi.EventOutputs || ev.Build != hk.t.id || ev.Machine != e.m.name ||
		len(ev.Outputs) != 1 || ev.Outputs[0].Path != sameOut {
		t.Fatalf("event %+v, want the outputs of build %s on %s", ev, hk.t.id, e.m.name)
	}
	e.imported(t, hk)
	if got, err := os.ReadFile(filepath.Join(e.local.Dir, path.Base(sameOut))); err != nil || string(got) != "built once\n" {
		t.Fatalf("the output made valid locally holds %q (%v), want the machine's", got, err)
	}
	e.wantBuilt(t, 0) // the graph's build was the one
}

// TestHookBuildsItselfWhenGraphsBuildFails: when the graph's build it waited for fails, the
// hook's build goes back to the queue and builds the derivation itself.
func TestHookBuildsItselfWhenGraphsBuildFails(t *testing.T) {
	e := newSameEnv(t)
	g := e.leader(true)
	hk, events := e.hook(t)
	if ev := next(t, events); ev.Type != brokerapi.EventQueued {
		t.Fatalf("first event %+v, want queued", ev)
	}
	e.finish(g, errors.New("builder failed"), nil)
	if ev := nextOf(t, events, brokerapi.EventStarted); ev.Machine != e.m.name {
		t.Fatalf("started on %q, want %q", ev.Machine, e.m.name)
	}
	ev := nextOf(t, events, brokerapi.EventOutputs)
	if ev.Build != hk.t.id || len(ev.Outputs) != 1 || ev.Outputs[0].Path != sameOut {
		t.Fatalf("outputs event %+v, want %s of build %s", ev, sameOut, hk.t.id)
	}
	e.imported(t, hk)
	e.wantBuilt(t, 1) // the hook's own
}

// TestHookStopsWaitingWhenCancelled: a hook that goes away while it waits for a graph's build
// stops waiting; the graph's build goes on.
func TestHookStopsWaitingWhenCancelled(t *testing.T) {
	e := newSameEnv(t)
	g := e.leader(true)
	hk, events := e.hook(t)
	if ev := next(t, events); ev.Type != brokerapi.EventQueued {
		t.Fatalf("first event %+v, want queued", ev)
	}
	hk.cancel(errClientGone)
	waitDone(t, hk)
	if !errors.Is(hk.err, errClientGone) {
		t.Fatalf("the hook's build ended with %v, want %v", hk.err, errClientGone)
	}
	select {
	case <-g.done:
		t.Fatal("the graph's build ended with the hook")
	default:
	}
	e.finish(g, nil, nil)
}

// TestGraphWaitsForHooksBuild: a graph that needs a derivation a hook builds now waits for it;
// once the hook made the outputs valid locally, the graph has them as local outputs (none
// kept on a machine), and no second build starts.
func TestGraphWaitsForHooksBuild(t *testing.T) {
	e := newSameEnv(t)
	hk := e.leader(false)
	events := make(chan brokerapi.Event, 100)
	done := make(chan error, 1)
	go func() {
		_, err := e.b.submit(context.Background(), brokerapi.BuildRequest{DrvPath: sameDrv, KeepOutputs: true},
			newGraphOwner(e.b), func(ev brokerapi.Event) bool { events <- ev; return true }, nil)
		done <- err
	}()
	ev := next(t, events)
	if ev.Type != brokerapi.EventQueued || !strings.Contains(ev.Reason, "build "+hk.t.id) {
		t.Fatalf("first event %+v, want queued naming build %s", ev, hk.t.id)
	}
	e.local.Add(t, serveproto.PathInfo{Path: sameOut, Deriver: sameDrv}, servetest.FileNAR("built by the hook\n"))
	e.finish(hk, nil, nil)
	ev = next(t, events)
	if ev.Type != brokerapi.EventOutputs || ev.Machine != e.m.name || len(ev.Outputs) != 0 {
		t.Fatalf("event %+v, want outputs on %s with none kept there", ev, e.m.name)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	e.b.mu.Lock()
	n := len(e.b.builds)
	e.b.mu.Unlock()
	if n != 0 || builtOn(e.srv) != 0 {
		t.Fatalf("%d builds running, %d on the machine after the graph's wait; want none", n, builtOn(e.srv))
	}
}

// TestGraphBuildsItselfWhenHooksBuildFails: when the hook's build fails, or succeeds without
// every output valid locally (it wanted only some), the graph's submission builds it itself.
func TestGraphBuildsItselfWhenHooksBuildFails(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
	}{{"failed", errors.New("builder failed")}, {"not every output here", nil}} {
		t.Run(tc.name, func(t *testing.T) {
			e := newSameEnv(t)
			hk := e.leader(false)
			events := make(chan brokerapi.Event, 100)
			done := make(chan struct{})
			go func() {
				defer close(done)
				e.b.submit(context.Background(), brokerapi.BuildRequest{DrvPath: sameDrv, KeepOutputs: true},
					newGraphOwner(e.b), func(ev brokerapi.Event) bool { events <- ev; return true }, nil)
			}()
			if ev := next(t, events); ev.Type != brokerapi.EventQueued {
				t.Fatalf("first event %+v, want queued", ev)
			}
			e.finish(hk, tc.err, nil)
			// Its own build starts by reading the .drv, which this test has not written.
			ev := next(t, events)
			if ev.Type != brokerapi.EventFailed || !strings.Contains(ev.Error, sameDrv) {
				t.Fatalf("event %+v, want the graph's own build of %s (failing to read it)", ev, sameDrv)
			}
			<-done
		})
	}
}

// graphAPIInfo is a machine's path info as an event has it.
func graphAPIInfo(in serveproto.PathInfo) brokerapi.PathInfo {
	return apiInfos([]serveproto.PathInfo{in})[0]
}
