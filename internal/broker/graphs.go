package broker

// Graphs: POST /v1/graphs builds a whole derivation graph inside the broker. internal/graph
// plans it (Load, against the local store and what the machines hold) and runs it (Execute);
// each derivation is one of the broker's own submissions (submit: sameBuild, startBuild, the
// queue and the placer), so a graph shares slots, queue and priorities with the hooks'
// builds, and two graphs, or a graph and a hook, that need one derivation build it once.
// Intermediate outputs stay on the machines; the client makes what the graph's fetch policy
// asks valid locally, reading each NAR through GET /v1/graphs/{id}/nar/{base}.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"path"
	"slices"
	"sort"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/engine"
	"github.com/nix-offload/nix-offload/internal/graph"
	"github.com/nix-offload/nix-offload/internal/nar"
	"github.com/nix-offload/nix-offload/internal/serveproto"
)

// Bounds of the graphs a broker runs and keeps (docs/broker-api.md, "Whole graphs").
const (
	// maxGraphs bounds the graphs running at once; one more is answered 503.
	maxGraphs = 64
	// maxFinishedGraphs and finishedGraphTTL bound the finished graphs kept for follow,
	// summary and fetch: the oldest beyond the count, and any older than the TTL, are dropped.
	maxFinishedGraphs = 64
	finishedGraphTTL  = time.Hour
	// maxGraphRoots bounds a request's roots, and maxGraphNodes the derivations one graph
	// reads, those already valid included: a NixOS system built from nothing is a few
	// thousand. Its done event, about 500 bytes a derivation, stays under an event line's
	// bound.
	maxGraphRoots = 1_000
	maxGraphNodes = 10_000
	// maxGraphReplay bounds the events a graph keeps for those who follow it later; past it,
	// only each derivation's result and the last event are kept. Log lines are never kept:
	// they are in the build logs (nix log DRV).
	maxGraphReplay = 16 * maxGraphNodes
	// followerBuffer is how many events wait for one slow reader; past it the reader misses
	// log lines until it catches up, and nothing else.
	followerBuffer = 1024
	// graphLoadTimeout bounds planning (reading derivations, asking the machines what they
	// hold), and graphFetchTimeout working out the fetch list at the end.
	graphLoadTimeout  = 2 * time.Minute
	graphFetchTimeout = 2 * time.Minute
)

var (
	errGraphCancelled  = errors.New("the graph was cancelled")
	errGraphClientGone = errors.New("the graph's client went away (submit with detach to keep it running)")
)

// graphRun is one graph, running or finished.
type graphRun struct {
	b       *Broker
	id      string
	req     brokerapi.GraphRequest
	created time.Time
	ctx     context.Context
	cancel  context.CancelCauseFunc
	owner   *client       // owns the graph's builds
	remote  *graph.Remote // nil with a test's builder
	builder graph.Builder
	done    chan struct{}

	mu        sync.Mutex
	plan      *graph.Plan // dropped when the graph ends
	replay    []brokerapi.GraphEvent
	followers map[*follower]bool
	nodes     map[string]*brokerapi.GraphDerivation
	order     []string // the derivations, sorted
	toBuild   int
	state     string
	finished  time.Time
	fetch     map[string]brokerapi.FetchPath // by base name, once done
	last      *brokerapi.GraphEvent          // the done event
	logWarned bool
}

// follower is one reader of a graph's events.
type follower struct {
	ch chan graphItem
	// behind is set, under graphRun.mu, when ch was full: nothing more is sent on it until
	// the reader has caught up from the replay.
	behind bool
}

type graphItem struct {
	ev   brokerapi.GraphEvent
	kept bool // it is in the replay too
}

// graphSeams are what unit tests replace: how a graph is planned and built.
type graphSeams struct {
	load    func(ctx context.Context, g *graphRun) (*graph.Plan, error)
	builder func(g *graphRun) graph.Builder
}

// checkGraph checks a GraphRequest's paths and values.
func checkGraph(req *brokerapi.GraphRequest) error {
	if len(req.Roots) == 0 {
		return errors.New("roots: none")
	}
	if len(req.Roots) > maxGraphRoots {
		return fmt.Errorf("roots: %d, at most %d", len(req.Roots), maxGraphRoots)
	}
	for i, r := range req.Roots {
		if err := checkDrvPath(r.DrvPath); err != nil {
			return fmt.Errorf("roots[%d].drvPath: %w", i, err)
		}
		for j, o := range r.Outputs {
			if o == "" || len(o) > 255 || path.Base(o) != o {
				return fmt.Errorf("roots[%d].outputs[%d]: %q is not an output name", i, j, o)
			}
		}
	}
	switch req.Fetch {
	case "", brokerapi.FetchRequested, brokerapi.FetchAll, brokerapi.FetchNone:
	default:
		return fmt.Errorf("fetch: %q, want requested, all or none", req.Fetch)
	}
	if req.Priority < 0 || req.Priority > brokerapi.MaxPriority {
		return fmt.Errorf("priority: %d, want 0 to %d", req.Priority, brokerapi.MaxPriority)
	}
	return nil
}

// newGraphID is a graph's id: random, so that an id from before a broker restart names no
// other graph.
func newGraphID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// startGraph plans req and starts it. The code is the HTTP status for an error.
func (b *Broker) startGraph(req brokerapi.GraphRequest) (*graphRun, int, error) {
	if req.Fetch == "" {
		req.Fetch = brokerapi.FetchRequested
	}
	b.retireGraphs()
	b.mu.Lock()
	stopping := b.stopping
	b.mu.Unlock()
	if stopping {
		return nil, 503, errStopping
	}
	if n := b.runningGraphs(); n >= maxGraphs {
		return nil, 503, fmt.Errorf("%d graphs are running, at most %d; try again later", n, maxGraphs)
	}
	ctx, cancel := context.WithCancelCause(b.ctx)
	g := &graphRun{
		b: b, id: newGraphID(), req: req, created: b.now(), ctx: ctx, cancel: cancel,
		owner: newGraphOwner(b), done: make(chan struct{}),
		followers: map[*follower]bool{}, nodes: map[string]*brokerapi.GraphDerivation{},
		state: brokerapi.GraphRunning,
	}
	g.remote = b.graphRemote(g)
	g.builder = g.remote
	if b.seams.builder != nil {
		g.builder = b.seams.builder(g)
	}
	load := b.seams.load
	if load == nil {
		load = func(ctx context.Context, g *graphRun) (*graph.Plan, error) {
			roots := make([]string, len(g.req.Roots))
			for i, r := range g.req.Roots {
				roots[i] = r.DrvPath
			}
			return g.remote.Load(ctx, roots, readDerivation)
		}
	}
	lctx, lcancel := context.WithTimeout(ctx, graphLoadTimeout)
	plan, err := load(lctx, g)
	lcancel()
	if err != nil {
		cancel(nil)
		return nil, 422, fmt.Errorf("planning the graph: %w", err)
	}
	g.setPlan(plan)
	b.mu.Lock()
	if b.stopping {
		b.mu.Unlock()
		cancel(nil)
		return nil, 503, errStopping
	}
	b.wg.Add(1)
	b.mu.Unlock()
	b.graphMu.Lock()
	b.graphs[g.id] = g
	b.graphMu.Unlock()
	b.log.Info("graph starts", zap.String("graph", g.id), zap.Int("derivations", len(plan.Nodes)), zap.Int("to_build", g.toBuild))
	go g.run()
	return g, 0, nil
}

// newGraphOwner is the owner of a graph's builds: they end with the graph, not with the
// connection that submitted it.
func newGraphOwner(b *Broker) *client { return &client{b: b, tickets: map[string]bool{}} }

// graphRemote is the graph's Builder: internal/graph's Remote over the broker's local read
// sessions and machine pools, whose builds are the broker's own (submit).
func (b *Broker) graphRemote(g *graphRun) *graph.Remote {
	var names []string
	for _, m := range b.machines {
		if m.cfg.Enabled {
			names = append(names, m.name)
		}
	}
	o := g.req.Options
	return &graph.Remote{
		Submit: func(ctx context.Context, req brokerapi.BuildRequest, events func(brokerapi.Event)) error {
			_, err := b.submit(ctx, req, g.owner, func(ev brokerapi.Event) bool {
				g.buildEvent(req.DrvPath, ev)
				events(ev)
				return true
			}, nil)
			return err
		},
		Priority: g.req.Priority,
		Local:    graphStore{b.local},
		Read:     b.readOn,
		Options: serveproto.BuildOptions{
			MaxSilentTime: time.Duration(o.MaxSilentTime) * time.Second,
			BuildTimeout:  time.Duration(o.Timeout) * time.Second,
			MaxLogSize:    o.MaxLogSize,
			KeepFailed:    o.KeepFailed,
		},
		Substitute: o.Substitute,
		LogDir:     b.opt.LogDir,
		LogWarn:    g.logWarn,
		Machines:   names,
		Down:       b.health.Down,
		MaxNodes:   maxGraphNodes,
	}
}

// logWarn says once per graph that its build logs cannot be written.
func (g *graphRun) logWarn(err error) {
	g.mu.Lock()
	warned := g.logWarned
	g.logWarned = true
	g.mu.Unlock()
	if !warned {
		g.b.log.Warn("graph build logs cannot be written; nix log will not show them", zap.String("graph", g.id), zap.Error(err))
	}
}

// readOn runs f on the store of a session of machine name's pool (either
// protocol), returned to it right after.
func (b *Broker) readOn(ctx context.Context, name string, f func(engine.MachineStore) error) error {
	m := b.byName[name]
	if m == nil {
		return fmt.Errorf("reading from '%s': not a configured machine", name)
	}
	sess, err := m.pool.Get(ctx)
	if err != nil {
		return fmt.Errorf("reading from '%s': %w", name, err)
	}
	stop := context.AfterFunc(ctx, sess.Close)
	err = f(engine.StoreOf(sess))
	stopped := stop()
	m.pool.Put(sess, err == nil && stopped)
	return err
}

// graphStore is the local store as a graph's Remote reads it: the broker's read sessions.
type graphStore struct{ p *localPool }

func (s graphStore) PathInfos(paths []string) ([]serveproto.PathInfo, error) {
	return s.p.pathInfos(paths)
}
func (s graphStore) Dump(p string, w io.Writer) (nar.Stats, error) { return s.p.dump(p, w) }
func (s graphStore) Valid(paths []string) ([]string, error)        { return s.p.valid(paths) }
func (s graphStore) Closure(paths []string) ([]string, error)      { return s.p.closure(paths) }
func (s graphStore) AddOutputs([]serveproto.PathInfo, func(string, io.Writer) error) error {
	return errors.New("the broker does not write the local store: its client fetches the outputs")
}

// setPlan records the plan and every derivation's first state.
func (g *graphRun) setPlan(plan *graph.Plan) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.plan = plan
	for d, n := range plan.Nodes {
		g.order = append(g.order, d)
		if n.Valid {
			r := graph.Report(&graph.Result{DrvPath: d, Status: serveproto.AlreadyValid, Outputs: n.Outputs()}, g.holder)
			g.nodes[d] = &r
			continue
		}
		g.toBuild++
		g.nodes[d] = &brokerapi.GraphDerivation{DrvPath: d, Status: brokerapi.DrvWaiting}
	}
	sort.Strings(g.order)
	g.emitLocked(brokerapi.GraphEvent{Type: brokerapi.GraphEventGraph, Graph: g.id, Summary: g.summaryLocked(false)})
}

func (g *graphRun) holder(p string) string {
	if g.remote == nil {
		return ""
	}
	return g.remote.Holder(p)
}

// run executes the plan, then works out what to fetch and ends the stream.
func (g *graphRun) run() {
	b := g.b
	defer b.wg.Done()
	results := graph.Execute(g.ctx, g.plan, g.builder, graph.Options{
		KeepGoing:  g.req.KeepGoing,
		MaxRunning: graph.TotalSlots(b.cfgMs),
		Events:     g.onEvent,
		Now:        b.now,
	})
	cancelled := g.ctx.Err() != nil
	var fetch []brokerapi.FetchPath
	var fetchErr error
	if !cancelled && g.remote != nil {
		paths := graph.FetchPaths(g.req.Fetch, g.req.Roots, results)
		ctx, cancel := context.WithTimeout(b.ctx, graphFetchTimeout)
		infos, err := g.remote.ToFetch(ctx, paths)
		cancel()
		fetchErr = err
		for _, in := range infos {
			fetch = append(fetch, brokerapi.FetchPath{PathInfo: graph.APIInfo(in), Machine: g.remote.Holder(in.Path)})
		}
	}
	g.mu.Lock()
	for d, r := range results {
		rep := graph.Report(r, g.holder)
		g.nodes[d] = &rep
	}
	g.state = brokerapi.GraphDone
	if cancelled {
		g.state = brokerapi.GraphCancelled
	}
	g.finished = b.now()
	g.fetch = map[string]brokerapi.FetchPath{}
	for _, f := range fetch {
		g.fetch[path.Base(f.Path)] = f
	}
	sum := g.summaryLocked(true)
	sum.FetchPaths = fetch
	if fetchErr != nil {
		sum.FetchError = fetchErr.Error()
	}
	g.plan = nil
	g.emitLocked(brokerapi.GraphEvent{Type: brokerapi.GraphEventDone, Graph: g.id, Summary: sum})
	g.followers = map[*follower]bool{}
	g.mu.Unlock()
	b.log.Info("graph ends", zap.String("graph", g.id), zap.String("state", sum.State), zap.Int("built", sum.Built), zap.Int("failed", sum.Failed))
	close(g.done)
	g.cancel(nil)
}

// onEvent records one step of Execute and passes it on.
func (g *graphRun) onEvent(e graph.Event) {
	ev := e.API(g.holder)
	g.mu.Lock()
	defer g.mu.Unlock()
	n := g.nodes[e.DrvPath]
	switch e.Kind {
	case graph.Queued:
		n.Status = brokerapi.DrvQueued
	case graph.Started:
		start := g.b.now().UTC()
		n.Status, n.Machine, n.Start = brokerapi.DrvRunning, e.Machine, &start
	case graph.Finished:
		r := *ev.Result
		g.nodes[e.DrvPath] = &r
	}
	g.emitLocked(ev)
}

// buildEvent passes on the steps of one derivation's build that Execute does not see.
func (g *graphRun) buildEvent(drv string, ev brokerapi.Event) {
	switch ev.Type {
	case brokerapi.EventQueued, brokerapi.EventCopying, brokerapi.EventBuilding, brokerapi.EventLog, brokerapi.EventRetrying:
	default:
		return // started comes from Execute, the last events as built or failed
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.emitLocked(brokerapi.GraphEvent{Type: ev.Type, DrvPath: drv, Machine: ev.Machine, Position: ev.Position,
		Reason: ev.Reason, Paths: ev.Paths, Bytes: ev.Bytes, Text: ev.Text})
}

// emitLocked keeps ev for later readers (log lines excepted, and past maxGraphReplay all but
// results) and sends it to every reader that keeps up.
func (g *graphRun) emitLocked(ev brokerapi.GraphEvent) {
	kept := false
	switch ev.Type {
	case brokerapi.EventLog:
	case brokerapi.GraphEventGraph, brokerapi.GraphEventBuilt, brokerapi.GraphEventFailed, brokerapi.GraphEventDone:
		kept = true
	default:
		kept = len(g.replay) < maxGraphReplay
	}
	if kept {
		g.replay = append(g.replay, ev)
	}
	if ev.Type == brokerapi.GraphEventDone {
		g.last = &g.replay[len(g.replay)-1]
	}
	for f := range g.followers {
		if f.behind {
			continue
		}
		select {
		case f.ch <- graphItem{ev, kept}:
		default:
			f.behind = true
		}
	}
}

// follow gives send g's events: those kept so far, then live ones, until the done event,
// ctx ends or send fails. It reports whether the done event was sent.
func (g *graphRun) follow(ctx context.Context, send func(brokerapi.GraphEvent) bool) bool {
	f := &follower{ch: make(chan graphItem, followerBuffer)}
	defer func() {
		g.mu.Lock()
		delete(g.followers, f)
		g.mu.Unlock()
	}()
	next := 0 // the replay events sent so far
	for {
		g.mu.Lock()
		batch := slices.Clone(g.replay[next:])
		next = len(g.replay)
		over := g.last != nil
		f.behind = false
		if !over {
			g.followers[f] = true
		}
		g.mu.Unlock()
		for _, ev := range batch {
			if !send(ev) {
				return false
			}
		}
		if over {
			return true
		}
		for caughtUp := false; !caughtUp; {
			select {
			case it := <-f.ch:
				if it.kept {
					next++
				}
				if !send(it.ev) {
					return false
				}
				if it.ev.Type == brokerapi.GraphEventDone {
					return true
				}
			case <-ctx.Done():
				return false
			}
			if len(f.ch) == 0 {
				g.mu.Lock()
				caughtUp = f.behind // then read what it missed from the replay
				g.mu.Unlock()
			}
		}
	}
}

// summaryLocked is the graph's summary, with every derivation if results.
func (g *graphRun) summaryLocked(results bool) *brokerapi.GraphSummary {
	s := &brokerapi.GraphSummary{
		ID: g.id, State: g.state, Created: g.created.UTC(), Roots: g.req.Roots, Fetch: g.req.Fetch,
		KeepGoing: g.req.KeepGoing, Detach: g.req.Detach, Derivations: len(g.nodes), ToBuild: g.toBuild,
	}
	if !g.finished.IsZero() {
		s.Finished = g.finished.UTC()
	}
	for _, d := range g.order {
		n := g.nodes[d]
		switch n.Status {
		case brokerapi.DrvWaiting, brokerapi.DrvQueued, serveproto.AlreadyValid.String():
		case brokerapi.DrvRunning:
			s.Running++
		case serveproto.Built.String():
			s.Built++
		default:
			s.Failed++
		}
		if results {
			s.Results = append(s.Results, *n)
		}
	}
	if g.last != nil && results {
		s.FetchPaths, s.FetchError = g.last.Summary.FetchPaths, g.last.Summary.FetchError
	}
	return s
}

func (g *graphRun) summary(results bool) *brokerapi.GraphSummary {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.summaryLocked(results)
}

// graph returns the graph id, or nil.
func (b *Broker) graph(id string) *graphRun {
	b.graphMu.Lock()
	defer b.graphMu.Unlock()
	return b.graphs[id]
}

// runningGraphs counts the graphs not finished.
func (b *Broker) runningGraphs() int {
	b.graphMu.Lock()
	defer b.graphMu.Unlock()
	n := 0
	for _, g := range b.graphs {
		select {
		case <-g.done:
		default:
			n++
		}
	}
	return n
}

// listGraphs returns every graph's summary, oldest first.
func (b *Broker) listGraphs() []brokerapi.GraphSummary {
	b.retireGraphs()
	b.graphMu.Lock()
	gs := make([]*graphRun, 0, len(b.graphs))
	for _, g := range b.graphs {
		gs = append(gs, g)
	}
	b.graphMu.Unlock()
	out := make([]brokerapi.GraphSummary, 0, len(gs))
	for _, g := range gs {
		out = append(out, *g.summary(false))
	}
	sort.Slice(out, func(i, j int) bool {
		return out[i].Created.Before(out[j].Created) || out[i].Created.Equal(out[j].Created) && out[i].ID < out[j].ID
	})
	return out
}

// retireGraphs forgets finished graphs older than finishedGraphTTL, and the oldest beyond
// maxFinishedGraphs.
func (b *Broker) retireGraphs() {
	now := b.now()
	b.graphMu.Lock()
	defer b.graphMu.Unlock()
	type fin struct {
		id string
		at time.Time
	}
	var done []fin
	for id, g := range b.graphs {
		select {
		case <-g.done:
		default:
			continue
		}
		g.mu.Lock()
		at := g.finished
		g.mu.Unlock()
		if now.Sub(at) > finishedGraphTTL {
			delete(b.graphs, id)
			continue
		}
		done = append(done, fin{id, at})
	}
	sort.Slice(done, func(i, j int) bool { return done[i].at.After(done[j].at) })
	for _, f := range done[min(len(done), maxFinishedGraphs):] {
		delete(b.graphs, f.id)
	}
}

// fetchable returns the output whose base name is base, of those the done event of g lists
// to fetch; the code is the HTTP status for an error.
func (g *graphRun) fetchable(base string) (brokerapi.FetchPath, int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	f, ok := g.fetch[base]
	switch {
	case g.last == nil:
		return f, http.StatusConflict, errors.New("the graph is still running: the outputs to fetch are listed in its done event")
	case !ok:
		return f, http.StatusNotFound, fmt.Errorf("graph %s has no output %q to fetch", g.id, base)
	}
	return f, 0, nil
}

// dumpOutput writes the NAR of f from the machine that holds it to w.
func (g *graphRun) dumpOutput(ctx context.Context, f brokerapi.FetchPath, w io.Writer) error {
	cw := &countWriter{w: w}
	err := g.remote.DumpHeld(ctx, f.Path, cw)
	if m := g.b.byName[f.Machine]; m != nil {
		m.bytesRcv.Add(uint64(cw.n))
		g.b.mx.received(m.name, cw.n)
	}
	return err
}

// graphCancelWait bounds how long DELETE /v1/graphs/{id} waits for the graph to end.
const graphCancelWait = 10 * time.Second

func (s *Server) submitGraph(w http.ResponseWriter, r *http.Request) {
	var req brokerapi.GraphRequest
	if !readRequest(w, r, &req, checkGraph) {
		return
	}
	g, code, err := s.b.startGraph(req)
	if err != nil {
		writeError(w, code, err)
		return
	}
	send, _ := ndjson[brokerapi.GraphEvent](w)
	if !g.follow(r.Context(), send) && !req.Detach {
		g.cancel(errGraphClientGone)
	}
}

// graphOf returns the graph the path names, or answers 404.
func (s *Server) graphOf(w http.ResponseWriter, r *http.Request) *graphRun {
	id := r.PathValue("id")
	if g := s.b.graph(id); g != nil {
		return g
	}
	writeError(w, http.StatusNotFound, fmt.Errorf("no graph %q (finished graphs are kept for %v, at most %d)", id, finishedGraphTTL, maxFinishedGraphs))
	return nil
}

func (s *Server) graphEvents(w http.ResponseWriter, r *http.Request) {
	if g := s.graphOf(w, r); g != nil {
		send, _ := ndjson[brokerapi.GraphEvent](w)
		g.follow(r.Context(), send)
	}
}

func (s *Server) graphSummary(w http.ResponseWriter, r *http.Request) {
	if g := s.graphOf(w, r); g != nil {
		writeJSON(w, g.summary(true))
	}
}

func (s *Server) listGraphs(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, s.b.listGraphs())
}

func (s *Server) cancelGraph(w http.ResponseWriter, r *http.Request) {
	g := s.graphOf(w, r)
	if g == nil {
		return
	}
	g.cancel(errGraphCancelled)
	select {
	case <-g.done:
	case <-time.After(graphCancelWait):
	case <-r.Context().Done():
	}
	writeJSON(w, g.summary(true))
}

func (s *Server) graphNAR(w http.ResponseWriter, r *http.Request) {
	base := r.PathValue("base")
	if err := serveproto.CheckStorePathBase(base); err != nil {
		writeError(w, http.StatusBadRequest, fmt.Errorf("nar: %w", err))
		return
	}
	g := s.graphOf(w, r)
	if g == nil {
		return
	}
	f, code, err := g.fetchable(base)
	if err != nil {
		writeError(w, code, err)
		return
	}
	w.Header().Set("Content-Type", "application/x-nix-nar")
	if err := g.dumpOutput(r.Context(), f, w); err != nil {
		// Part of the NAR may be out: the client sees a truncated body, and AddOutputs
		// checks every NAR against its narHash anyway.
		s.b.log.Warn("fetching a graph's output failed", zap.String("graph", g.id), zap.String("path", f.Path), zap.Error(err))
		panic(http.ErrAbortHandler)
	}
}
