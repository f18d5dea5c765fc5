package graph

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/nix-community/go-nix/pkg/derivation"

	"github.com/nix-offload/nix-offload/internal/offload"
	"github.com/nix-offload/nix-offload/internal/serveproto"
)

// fakeStore is a set of derivations by name: name → input names, and the
// outputs valid "locally".
type fakeStore struct {
	deps  map[string][]string
	valid map[string]bool
}

func drvPath(name string) string {
	return "/nix/store/" + strings.Repeat("a", 32) + "-" + name + ".drv"
}
func outPath(name string) string { return "/nix/store/" + strings.Repeat("b", 32) + "-" + name }
func nameOf(p string) string {
	return strings.TrimSuffix(strings.TrimPrefix(p, "/nix/store/"+strings.Repeat("a", 32)+"-"), ".drv")
}

func (s fakeStore) read(p string) (*derivation.Derivation, error) {
	name := nameOf(p)
	deps, ok := s.deps[name]
	if !ok {
		return nil, fmt.Errorf("%s: no such derivation", p)
	}
	d := &derivation.Derivation{
		Outputs:          map[string]*derivation.Output{"out": {Path: outPath(name)}},
		InputDerivations: map[string][]string{},
		Platform:         "x86_64-linux",
	}
	for _, dep := range deps {
		d.InputDerivations[drvPath(dep)] = []string{"out"}
	}
	return d, nil
}

func (s fakeStore) validPaths(paths []string) ([]string, error) {
	var out []string
	for _, p := range paths {
		if s.valid[p] {
			out = append(out, p)
		}
	}
	return out, nil
}

func load(t *testing.T, s fakeStore, roots ...string) *Plan {
	t.Helper()
	var rs []string
	for _, r := range roots {
		rs = append(rs, drvPath(r))
	}
	p, err := Load(rs, s.read, s.validPaths)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// fakeBuilder builds by name: fail names fail with PermanentFailure, lose
// names return a LostInputError for their first dep the first time, and
// block names wait until release is closed.
type fakeBuilder struct {
	fail, lose map[string]bool
	release    chan struct{}
	block      map[string]bool

	mu      sync.Mutex
	order   []string
	running int
	peak    int
	lost    map[string]bool
}

func (b *fakeBuilder) Build(ctx context.Context, n *Node, started func(string)) (string, map[string]string, error) {
	name := nameOf(n.DrvPath)
	b.mu.Lock()
	b.running++
	b.peak = max(b.peak, b.running)
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		b.running--
		b.mu.Unlock()
	}()
	started("m1")
	if b.block[name] {
		select {
		case <-b.release:
		case <-ctx.Done():
			return "m1", nil, context.Cause(ctx)
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.lose[name] && !b.lost[name] {
		if b.lost == nil {
			b.lost = map[string]bool{}
		}
		b.lost[name] = true
		return "", nil, &LostInputError{Producer: n.Deps[0], Path: outPath(nameOf(n.Deps[0])), Err: errors.New("gone")}
	}
	b.order = append(b.order, name)
	if b.fail[name] {
		return "m1", nil, &offload.BuildError{DrvPath: n.DrvPath, Machine: "m1", Status: serveproto.PermanentFailure, Msg: "builder failed with exit code 1"}
	}
	return "m1", n.Outputs(), nil
}

func statuses(res map[string]*Result) map[string]string {
	out := map[string]string{}
	for d, r := range res {
		out[nameOf(d)] = r.Status.String()
	}
	return out
}

// diamond: root ← l, r ← base; plus a leaf w and a valid input v.
var diamond = fakeStore{
	deps: map[string][]string{
		"root": {"l", "r", "w", "v"}, "l": {"base"}, "r": {"base"}, "base": {}, "w": {}, "v": {"v0"}, "v0": {},
	},
	valid: map[string]bool{outPath("v"): true},
}

func TestLoadKeepsWhatIsNotValid(t *testing.T) {
	p := load(t, diamond, "root")
	if _, ok := p.Nodes[drvPath("v0")]; ok {
		t.Error("the input of a valid derivation was read")
	}
	if !p.Nodes[drvPath("v")].Valid {
		t.Error("v's output is valid, but v is not marked Valid")
	}
	if got := p.Nodes[drvPath("root")].Deps; len(got) != 3 || slices.Contains(got, drvPath("v")) {
		t.Errorf("root's deps = %v, want l, r and w", got)
	}
}

func TestExecuteBuildsSharedInputOnceAndInOrder(t *testing.T) {
	b := &fakeBuilder{}
	res := Execute(context.Background(), load(t, diamond, "root"), b, Options{})
	want := map[string]string{"root": "Built", "l": "Built", "r": "Built", "base": "Built", "w": "Built", "v": "AlreadyValid"}
	if got := statuses(res); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("statuses %v, want %v", got, want)
	}
	count := map[string]int{}
	pos := map[string]int{}
	for i, n := range b.order {
		count[n]++
		pos[n] = i
	}
	if count["base"] != 1 || len(b.order) != 5 {
		t.Errorf("built %v: want each once", b.order)
	}
	if pos["base"] > pos["l"] || pos["base"] > pos["r"] || pos["l"] > pos["root"] || pos["w"] > pos["root"] {
		t.Errorf("built in the order %v: an input after its dependent", b.order)
	}
}

// wide: 6 independent leaves under one root.
var wide = fakeStore{deps: map[string][]string{"root": {"a", "b", "c", "d", "e", "f"}, "a": {}, "b": {}, "c": {}, "d": {}, "e": {}, "f": {}}}

func TestExecuteRunsReadyDerivationsAtOnce(t *testing.T) {
	release := make(chan struct{})
	b := &fakeBuilder{release: release, block: map[string]bool{"a": true, "b": true, "c": true, "d": true, "e": true, "f": true}}
	var mu sync.Mutex
	started := 0
	res := Execute(context.Background(), load(t, wide, "root"), b, Options{MaxRunning: 4, Events: func(e Event) {
		mu.Lock()
		defer mu.Unlock()
		if e.Kind == Started {
			started++
			if started == 4 {
				close(release) // all four ran at once: let them finish
			}
		}
	}})
	if b.peak != 4 {
		t.Errorf("at most %d ran at once, want MaxRunning = 4", b.peak)
	}
	if res[drvPath("root")].Status != serveproto.Built {
		t.Errorf("root: %v", res[drvPath("root")].Status)
	}
}

func TestExecuteFirstFailureStopsWhatHasNotStarted(t *testing.T) {
	s := fakeStore{deps: map[string][]string{"root": {"a", "z"}, "a": {}, "z": {"y"}, "y": {}}}
	b := &fakeBuilder{fail: map[string]bool{"y": true}}
	res := Execute(context.Background(), load(t, s, "root"), b, Options{MaxRunning: 1})
	got := statuses(res)
	// y runs first (the longest path: z and root wait on it) and fails; a
	// was not started; z and root depend on y.
	if got["y"] != "PermanentFailure" || got["z"] != "DependencyFailed" || got["root"] != "DependencyFailed" || got["a"] != "MiscFailure" {
		t.Errorf("statuses %v", got)
	}
	if r := res[drvPath("a")]; r == nil || r.Err == nil || !strings.Contains(r.Err.Error(), "-keep-going") {
		t.Errorf("a's result %+v does not say why it did not start", r)
	}
	if r := res[drvPath("y")]; r == nil || r.Err == nil || !strings.Contains(r.Err.Error(), "exit code 1") {
		t.Errorf("y's result %+v lacks the machine's message", r)
	}
}

func TestExecuteKeepGoingBuildsWhatDoesNotDependOnTheFailure(t *testing.T) {
	s := fakeStore{deps: map[string][]string{"root": {"a", "z"}, "a": {}, "z": {"y"}, "y": {}, "top": {"root"}}}
	b := &fakeBuilder{fail: map[string]bool{"a": true}}
	res := Execute(context.Background(), load(t, s, "top"), b, Options{KeepGoing: true, MaxRunning: 1})
	got := statuses(res)
	want := map[string]string{"a": "PermanentFailure", "root": "DependencyFailed", "top": "DependencyFailed", "y": "Built", "z": "Built"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("statuses %v, want %v", got, want)
	}
}

func TestExecuteRebuildsALostInput(t *testing.T) {
	s := fakeStore{deps: map[string][]string{"c1": {"c0"}, "c0": {}}}
	b := &fakeBuilder{lose: map[string]bool{"c1": true}}
	res := Execute(context.Background(), load(t, s, "c1"), b, Options{})
	if got := fmt.Sprint(b.order); got != "[c0 c0 c1]" {
		t.Errorf("built %s, want c0, c0 again once c1 found it lost, then c1", got)
	}
	if res[drvPath("c1")].Status != serveproto.Built {
		t.Errorf("c1: %v", res[drvPath("c1")].Status)
	}
}

func TestExecuteCancelStopsEverything(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	b := &fakeBuilder{release: make(chan struct{}), block: map[string]bool{"a": true, "b": true}}
	s := fakeStore{deps: map[string][]string{"root": {"a", "b"}, "a": {}, "b": {}}}
	running := 0
	res := Execute(ctx, load(t, s, "root"), b, Options{Events: func(e Event) {
		if e.Kind == Started {
			if running++; running == 2 {
				cancel()
			}
		}
	}})
	for d, r := range res {
		if r.Status.Success() || r.Err == nil {
			t.Errorf("%s: %v after cancel", d, r.Status)
		}
	}
}

// Rank is the longest path of builds above a node: the broker starts long chains first.
func TestLoadRanksByLongestRemainingPath(t *testing.T) {
	// root needs chain2 and leaf; chain2 needs chain1, which needs chain0.
	s := fakeStore{deps: map[string][]string{
		"root": {"chain2", "leaf"}, "chain2": {"chain1"}, "chain1": {"chain0"}, "chain0": {}, "leaf": {},
	}}
	p := load(t, s, "root")
	for name, want := range map[string]int{"root": 0, "chain2": 1, "leaf": 1, "chain1": 2, "chain0": 3} {
		if got := p.Nodes[drvPath(name)].Rank; got != want {
			t.Errorf("%s: rank %d, want %d", name, got, want)
		}
	}
}

// With one slot, the ready derivation with the longest path of work behind
// it starts first, although another sorts before it by name.
func TestExecuteStartsTheLongestPathFirst(t *testing.T) {
	// "aleaf" sorts first by path, but "zchain0" has two builds behind it.
	s := fakeStore{deps: map[string][]string{
		"root": {"zchain1", "aleaf"}, "zchain1": {"zchain0"}, "zchain0": {}, "aleaf": {},
	}}
	b := &fakeBuilder{}
	res := Execute(context.Background(), load(t, s, "root"), b, Options{MaxRunning: 1})
	if res[drvPath("root")].Status != serveproto.Built {
		t.Fatalf("root: %v", res[drvPath("root")].Status)
	}
	if len(b.order) == 0 || b.order[0] != "zchain0" {
		t.Errorf("build order %v, want zchain0 (rank 2) before aleaf (rank 1)", b.order)
	}
}
