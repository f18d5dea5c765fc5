package graph

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/nix-offload/nix-offload/internal/engine"
	"github.com/nix-offload/nix-offload/internal/offload"
	"github.com/nix-offload/nix-offload/internal/serveproto"
)

// MaxRebuilds bounds how often one derivation is built again because a
// builder lost its outputs before a dependent could use them.
const MaxRebuilds = 2

// Result is what became of one derivation of a plan.
type Result struct {
	DrvPath string
	// Status is Nix's BuildResult status: Built, AlreadyValid, a failure,
	// or DependencyFailed.
	Status  serveproto.BuildStatus
	Machine string // where it was built; "" if it was not
	Start   time.Time
	Stop    time.Time
	Err     error             // why it failed; nil on success
	Outputs map[string]string // output name → store path, on success
}

// Builder builds one derivation whose dependencies are built; started is
// called with the machine once it runs there (again on a retry).
type Builder interface {
	Build(ctx context.Context, n *Node, started func(machine string)) (machine string, outputs map[string]string, err error)
}

// LostInputError is a build that could not start because an input built
// earlier in the plan is no longer on the machine that built it: Execute
// builds Producer again, then the derivation.
type LostInputError struct {
	Producer, Path string
	Err            error
}

func (e *LostInputError) Error() string {
	return fmt.Sprintf("input '%s' (built by '%s') was lost: %v", e.Path, e.Producer, e.Err)
}
func (e *LostInputError) Unwrap() error { return e.Err }

// EventKind is a step of one derivation in [Execute].
type EventKind int

const (
	Queued   EventKind = iota + 1 // its inputs are built; it waits for a machine
	Started                       // it runs on Event.Machine
	Finished                      // Event.Result says how it ended
)

// Event is one derivation's progress.
type Event struct {
	Kind    EventKind
	DrvPath string
	Machine string
	Result  *Result // Finished only
}

// Options shape [Execute].
type Options struct {
	// KeepGoing builds everything that does not depend on a failure.
	// Without it the first failure stops what has not started.
	KeepGoing bool
	// MaxRunning bounds the derivations handed to the Builder at once; 0:
	// no bound (the placer's slots are then the only bound).
	MaxRunning int
	// Events, if set, receives every step, one call at a time.
	Events func(Event)
	// Now is time.Now if nil.
	Now func() time.Time
}

// Execute builds plan with b and returns a result for every node.
func Execute(ctx context.Context, plan *Plan, b Builder, opt Options) map[string]*Result {
	if opt.Now == nil {
		opt.Now = time.Now
	}
	x := &executor{plan: plan, b: b, opt: opt, results: map[string]*Result{},
		dependents: plan.Dependents(), rebuilt: map[string]int{}, running: map[string]bool{}}
	return x.run(ctx)
}

type executor struct {
	plan       *Plan
	b          Builder
	opt        Options
	dependents map[string][]string
	results    map[string]*Result // decided nodes
	running    map[string]bool
	rebuilt    map[string]int
	stopped    bool // a failure without KeepGoing: start nothing more
	evMu       sync.Mutex
}

type done struct {
	n       *Node
	machine string
	outputs map[string]string
	start   time.Time
	err     error
}

func (x *executor) emit(e Event) {
	if x.opt.Events == nil {
		return
	}
	x.evMu.Lock()
	defer x.evMu.Unlock()
	x.opt.Events(e)
}

func (x *executor) run(ctx context.Context) map[string]*Result {
	for _, n := range x.plan.Nodes {
		if n.Valid {
			x.results[n.DrvPath] = &Result{DrvPath: n.DrvPath, Status: serveproto.AlreadyValid, Outputs: n.Outputs()}
		}
	}
	finished := make(chan done)
	queued := map[string]bool{}
	for {
		if ctx.Err() != nil {
			x.stopped = true
		}
		if !x.stopped {
			for _, n := range x.ready() {
				if x.opt.MaxRunning > 0 && len(x.running) >= x.opt.MaxRunning {
					if !queued[n.DrvPath] {
						queued[n.DrvPath] = true
						x.emit(Event{Kind: Queued, DrvPath: n.DrvPath})
					}
					continue
				}
				x.running[n.DrvPath] = true
				if !queued[n.DrvPath] {
					x.emit(Event{Kind: Queued, DrvPath: n.DrvPath})
				}
				delete(queued, n.DrvPath)
				go x.build(ctx, n, finished)
			}
		}
		if len(x.running) == 0 {
			break
		}
		d := <-finished
		delete(x.running, d.n.DrvPath)
		x.finish(ctx, d)
	}
	x.decideRest(ctx)
	return x.results
}

func (x *executor) build(ctx context.Context, n *Node, finished chan<- done) {
	start := x.opt.Now()
	m, outs, err := x.b.Build(ctx, n, func(machine string) {
		x.emit(Event{Kind: Started, DrvPath: n.DrvPath, Machine: machine})
	})
	finished <- done{n: n, machine: m, outputs: outs, start: start, err: err}
}

// ready returns the undecided, not running nodes whose deps are built,
// the longest remaining path first (Rank), then by path: when slots are
// short, the derivations that hold up the most work start first.
func (x *executor) ready() []*Node {
	var out []*Node
	for _, n := range x.plan.Nodes {
		if x.results[n.DrvPath] != nil || x.running[n.DrvPath] {
			continue
		}
		ok := true
		for _, d := range n.Deps {
			r := x.results[d]
			ok = ok && r != nil && r.Status.Success()
		}
		if ok {
			out = append(out, n)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Rank != out[j].Rank {
			return out[i].Rank > out[j].Rank
		}
		return out[i].DrvPath < out[j].DrvPath
	})
	return out
}

func (x *executor) finish(ctx context.Context, d done) {
	var lost *LostInputError
	if errors.As(d.err, &lost) && ctx.Err() == nil && x.results[lost.Producer] != nil && x.rebuilt[lost.Producer] < MaxRebuilds {
		// Build the producer again; d.n waits for it as before.
		x.rebuilt[lost.Producer]++
		delete(x.results, lost.Producer)
		return
	}
	r := &Result{DrvPath: d.n.DrvPath, Machine: d.machine, Start: d.start, Stop: x.opt.Now(), Err: d.err, Outputs: d.outputs}
	r.Status = status(d.err)
	x.results[d.n.DrvPath] = r
	if d.err != nil {
		if !x.opt.KeepGoing {
			x.stopped = true
		}
		x.failDependents(d.n.DrvPath)
	}
	x.emit(Event{Kind: Finished, DrvPath: d.n.DrvPath, Machine: d.machine, Result: r})
}

// failDependents marks everything that depends on drv DependencyFailed.
func (x *executor) failDependents(drv string) {
	for _, dep := range x.dependents[drv] {
		if x.results[dep] != nil || x.running[dep] {
			continue
		}
		r := &Result{DrvPath: dep, Status: serveproto.DependencyFailed,
			Err: fmt.Errorf("dependency '%s' failed", drv)}
		x.results[dep] = r
		x.emit(Event{Kind: Finished, DrvPath: dep, Result: r})
		x.failDependents(dep)
	}
}

// decideRest gives a result to what was never started: stopped after a
// failure, or cancelled.
func (x *executor) decideRest(ctx context.Context) {
	why := errors.New("not started: an earlier build failed (-keep-going builds it)")
	if err := context.Cause(ctx); err != nil {
		why = fmt.Errorf("not started: %w", err)
	}
	var rest []string
	for d := range x.plan.Nodes {
		if x.results[d] == nil {
			rest = append(rest, d)
		}
	}
	sort.Strings(rest)
	for _, d := range rest {
		r := &Result{DrvPath: d, Status: serveproto.MiscFailure, Err: why}
		x.results[d] = r
		x.emit(Event{Kind: Finished, DrvPath: d, Result: r})
	}
}

// status is the BuildResult status of a build that ended with err.
func status(err error) serveproto.BuildStatus {
	var be *offload.BuildError
	switch {
	case err == nil:
		return serveproto.Built
	case engine.TimedOut(err):
		return serveproto.TimedOut
	case errors.As(err, &be):
		return be.Status
	}
	return serveproto.MiscFailure
}
