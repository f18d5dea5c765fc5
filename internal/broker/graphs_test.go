package broker

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nix-community/go-nix/pkg/derivation"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/graph"
	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/testbed"
)

// These tests run graphs through the API on a real socket, with the planning and the builder
// replaced (graphSeams): a plan of derivations held in memory, and a builder whose builds end
// when the test says. The per-derivation builds themselves are the bed's business.

func graphDrv(name string) string {
	return "/nix/store/" + strings.Repeat("a", 32) + "-" + name + ".drv"
}
func graphOut(name string) string { return "/nix/store/" + strings.Repeat("b", 32) + "-" + name }

// graphNames is a graph of derivations by name: name → input names.
type graphNames map[string][]string

func (gn graphNames) read(p string) (*derivation.Derivation, error) {
	name := strings.TrimSuffix(p[len("/nix/store/")+33:], ".drv")
	deps, ok := gn[name]
	if !ok {
		return nil, fmt.Errorf("%s: no such derivation", p)
	}
	d := &derivation.Derivation{Platform: "x86_64-linux",
		Outputs:          map[string]*derivation.Output{"out": {Path: graphOut(name)}},
		InputDerivations: map[string][]string{}}
	for _, dep := range deps {
		d.InputDerivations[graphDrv(dep)] = []string{"out"}
	}
	return d, nil
}

// gateBuilder builds a derivation when the test releases it, on "root@b1".
type gateBuilder struct {
	mu        sync.Mutex
	gates     map[string]chan error
	started   chan string
	cancelled atomic.Int32
	builds    atomic.Int32
}

func newGateBuilder() *gateBuilder {
	return &gateBuilder{gates: map[string]chan error{}, started: make(chan string, 100)}
}

func (g *gateBuilder) gate(drv string) chan error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.gates[drv] == nil {
		g.gates[drv] = make(chan error, 1)
	}
	return g.gates[drv]
}

// release ends the build of name with err (nil: built).
func (g *gateBuilder) release(name string, err error) { g.gate(graphDrv(name)) <- err }

func (g *gateBuilder) Build(ctx context.Context, n *graph.Node, started func(string)) (string, map[string]string, error) {
	g.builds.Add(1)
	started("root@b1")
	g.started <- n.DrvPath
	select {
	case err := <-g.gate(n.DrvPath):
		if err != nil {
			return "root@b1", nil, err
		}
		return "root@b1", n.Outputs(), nil
	case <-ctx.Done():
		g.cancelled.Add(1)
		return "root@b1", nil, context.Cause(ctx)
	}
}

// waitStarted waits until the builder has started each of names, in any order.
func (g *gateBuilder) waitStarted(t *testing.T, names ...string) {
	t.Helper()
	want := map[string]bool{}
	for _, n := range names {
		want[graphDrv(n)] = true
	}
	for len(want) > 0 {
		select {
		case d := <-g.started:
			delete(want, d)
		case <-time.After(10 * time.Second):
			t.Fatalf("builds not started: %v", want)
		}
	}
}

// newGraphBroker is a broker whose graphs are gn, built by a gateBuilder, served on a
// socket; it returns the socket too.
func newGraphBroker(t *testing.T, gn graphNames, opt Options) (*Broker, *gateBuilder, string) {
	t.Helper()
	opt.Config = &machines.Config{Machines: []machines.Machine{testMachine("b1", 2, "x86_64-linux")}}
	b := New(testOptions(t, opt))
	gb := newGateBuilder()
	b.seams = graphSeams{
		load: func(ctx context.Context, g *graphRun) (*graph.Plan, error) {
			var roots []string
			for _, r := range g.req.Roots {
				roots = append(roots, r.DrvPath)
			}
			return graph.Load(roots, gn.read, func([]string) ([]string, error) { return nil, nil })
		},
		builder: func(*graphRun) graph.Builder { return gb },
	}
	sock := serveOn(t, b, t.TempDir(), asRoot)
	t.Cleanup(b.Close)
	return b, gb, sock
}

func dialBroker(t *testing.T, sock string) *brokerapi.Client {
	t.Helper()
	c, err := brokerapi.Dial(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// diamond: root needs l and r, both need base.
var diamond = graphNames{"base": nil, "l": {"base"}, "r": {"base"}, "root": {"l", "r"}}

func submitGraph(t *testing.T, c *brokerapi.Client, req brokerapi.GraphRequest) (*brokerapi.GraphStream, string) {
	t.Helper()
	st, err := c.SubmitGraph(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	ev, err := st.Next()
	if err != nil || ev.Type != brokerapi.GraphEventGraph || ev.Graph == "" || ev.Summary == nil {
		t.Fatalf("first event %+v, %v; want the graph event with its id", ev, err)
	}
	return st, ev.Graph
}

// readToDone reads st to its done event and returns the types of the events before it.
func readToDone(t *testing.T, st *brokerapi.GraphStream) ([]string, *brokerapi.GraphSummary) {
	t.Helper()
	var types []string
	for {
		ev, err := st.Next()
		if err != nil {
			t.Fatalf("after %v: %v", types, err)
		}
		if ev.Type == brokerapi.GraphEventDone {
			return types, ev.Summary
		}
		types = append(types, ev.Type+" "+ev.DrvPath)
	}
}

func resultsByDrv(s *brokerapi.GraphSummary) map[string]brokerapi.GraphDerivation {
	out := map[string]brokerapi.GraphDerivation{}
	for _, r := range s.Results {
		out[r.DrvPath] = r
	}
	return out
}

// TestGraphSubmitAndFollow: a diamond is built in dependency order; its stream names the
// graph first and ends with every derivation's result; following it afterwards replays the
// same events, and its summary says the same.
func TestGraphSubmitAndFollow(t *testing.T) {
	_, gb, sock := newGraphBroker(t, diamond, Options{})
	c := dialBroker(t, sock)
	st, id := submitGraph(t, c, brokerapi.GraphRequest{Roots: []brokerapi.GraphRoot{{DrvPath: graphDrv("root")}}, Detach: true})
	gb.waitStarted(t, "base")
	gb.release("base", nil)
	gb.waitStarted(t, "l", "r")
	gb.release("l", nil)
	gb.release("r", nil)
	gb.waitStarted(t, "root")
	gb.release("root", nil)
	types, sum := readToDone(t, st)
	if sum.ID != id || sum.State != brokerapi.GraphDone || sum.Built != 4 || sum.Failed != 0 || len(sum.Results) != 4 {
		t.Fatalf("done summary %+v", sum)
	}
	for d, r := range resultsByDrv(sum) {
		if r.Status != "Built" || r.Machine != "root@b1" || r.Start == nil || r.Outputs["out"] == "" {
			t.Errorf("%s: %+v", d, r)
		}
	}
	if gb.builds.Load() != 4 {
		t.Errorf("%d builds, want 4", gb.builds.Load())
	}

	again, err := dialBroker(t, sock).FollowGraph(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	if ev, err := again.Next(); err != nil || ev.Type != brokerapi.GraphEventGraph || ev.Graph != id {
		t.Fatalf("follow: first event %+v, %v", ev, err)
	}
	replayed, sum2 := readToDone(t, again)
	if strings.Join(replayed, "\n") != strings.Join(types, "\n") || sum2.Built != 4 {
		t.Errorf("replay:\n%s\nwant:\n%s", strings.Join(replayed, "\n"), strings.Join(types, "\n"))
	}
	got, err := c.Graph(context.Background(), id)
	if err != nil || got.State != brokerapi.GraphDone || len(got.Results) != 4 {
		t.Errorf("GET /v1/graphs/%s: %+v, %v", id, got, err)
	}
	list, err := c.Graphs(context.Background())
	if err != nil || len(list) != 1 || list[0].ID != id || list[0].Results != nil {
		t.Errorf("GET /v1/graphs: %+v, %v", list, err)
	}
}

// TestGraphFollowWhileRunning: a second reader that joins mid-graph gets what happened so
// far, then the rest live; a failure without keepGoing stops what has not started.
func TestGraphFollowWhileRunning(t *testing.T) {
	_, gb, sock := newGraphBroker(t, diamond, Options{})
	st, id := submitGraph(t, dialBroker(t, sock), brokerapi.GraphRequest{Roots: []brokerapi.GraphRoot{{DrvPath: graphDrv("root")}}, Detach: true})
	gb.waitStarted(t, "base")
	gb.release("base", nil)
	gb.waitStarted(t, "l", "r")
	follow, err := dialBroker(t, sock).FollowGraph(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	gb.release("l", errors.New("boom"))
	gb.release("r", nil)
	types, sum := readToDone(t, follow)
	if !strings.Contains(strings.Join(types, "\n"), "built "+graphDrv("base")) {
		t.Errorf("the late reader did not get base's result replayed: %v", types)
	}
	byDrv := resultsByDrv(sum)
	if l := byDrv[graphDrv("l")]; l.Status != "MiscFailure" || l.Error != "boom" {
		t.Errorf("l: %+v", l)
	}
	if root := byDrv[graphDrv("root")]; root.Status != "DependencyFailed" {
		t.Errorf("root: %+v", root)
	}
	if _, sum1 := readToDone(t, st); sum1.Failed != sum.Failed {
		t.Errorf("the submitter's summary %+v, the follower's %+v", sum1, sum)
	}
}

// TestGraphClosingCancelsUnlessDetached: the submitter's connection owns a graph submitted
// without detach: closing it stops the running builds and the graph ends cancelled. With
// detach, the graph goes on and is followed to its end by another connection.
func TestGraphClosingCancelsUnlessDetached(t *testing.T) {
	b, gb, sock := newGraphBroker(t, graphNames{"a": nil}, Options{})
	c := dialBroker(t, sock)
	st, id := submitGraph(t, c, brokerapi.GraphRequest{Roots: []brokerapi.GraphRoot{{DrvPath: graphDrv("a")}}})
	gb.waitStarted(t, "a")
	st.Close()
	c.Close()
	g := b.graph(id)
	select {
	case <-g.done:
	case <-time.After(10 * time.Second):
		t.Fatal("closing the submitter's connection did not end the graph")
	}
	if s := g.summary(true); s.State != brokerapi.GraphCancelled || gb.cancelled.Load() != 1 {
		t.Errorf("after the close: %+v, %d builds cancelled", s, gb.cancelled.Load())
	}

	c2 := dialBroker(t, sock)
	st2, id2 := submitGraph(t, c2, brokerapi.GraphRequest{Roots: []brokerapi.GraphRoot{{DrvPath: graphDrv("a")}}, Detach: true})
	gb.waitStarted(t, "a")
	st2.Close()
	c2.Close()
	follow, err := dialBroker(t, sock).FollowGraph(context.Background(), id2)
	if err != nil {
		t.Fatal(err)
	}
	gb.release("a", nil)
	if _, sum := readToDone(t, follow); sum.State != brokerapi.GraphDone || sum.Built != 1 {
		t.Errorf("detached graph: %+v", sum)
	}
	if gb.cancelled.Load() != 1 {
		t.Errorf("%d builds cancelled, want only the first graph's", gb.cancelled.Load())
	}
}

// TestGraphDelete: DELETE stops the running builds, starts nothing more and answers with the
// results; the submitter's stream ends with them too.
func TestGraphDelete(t *testing.T) {
	_, gb, sock := newGraphBroker(t, diamond, Options{})
	st, id := submitGraph(t, dialBroker(t, sock), brokerapi.GraphRequest{Roots: []brokerapi.GraphRoot{{DrvPath: graphDrv("root")}}, Detach: true})
	gb.waitStarted(t, "base")
	gb.release("base", nil)
	gb.waitStarted(t, "l", "r")
	if err := dialBroker(t, sock).CancelGraph(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	_, sum := readToDone(t, st)
	byDrv := resultsByDrv(sum)
	if sum.State != brokerapi.GraphCancelled || gb.cancelled.Load() != 2 {
		t.Errorf("after DELETE: %+v, %d builds cancelled, want l and r", sum, gb.cancelled.Load())
	}
	if r := byDrv[graphDrv("root")]; r.Start != nil || r.Status != "DependencyFailed" {
		t.Errorf("root after DELETE: %+v", r)
	}
	if r := byDrv[graphDrv("base")]; r.Status != "Built" {
		t.Errorf("base after DELETE: %+v", r)
	}
	if code, body := request(t, sock, http.MethodDelete, "/v1/graphs/nosuch", ""); code != http.StatusNotFound || !strings.Contains(body, "no graph") {
		t.Errorf("DELETE of an unknown graph: %d %s", code, body)
	}
}

// TestGraphSlowReaderMissesOnlyLogLines: a reader that stops reading while a build logs
// more than followerBuffer lines misses log lines, and nothing else.
func TestGraphSlowReaderMissesOnlyLogLines(t *testing.T) {
	b, gb, sock := newGraphBroker(t, graphNames{"a": nil, "b": {"a"}}, Options{})
	st, id := submitGraph(t, dialBroker(t, sock), brokerapi.GraphRequest{Roots: []brokerapi.GraphRoot{{DrvPath: graphDrv("b")}}, Detach: true})
	gb.waitStarted(t, "a")
	g := b.graph(id)
	st.Close() // detached: the graph goes on, with no reader
	testbed.WaitFor(t, 5*time.Second, "the submitter's reader to end", func() bool {
		g.mu.Lock()
		defer g.mu.Unlock()
		return len(g.followers) == 0
	})
	unblock := make(chan struct{})
	var seen []string
	logs := 0
	done := make(chan bool)
	go func() {
		done <- g.follow(context.Background(), func(ev brokerapi.GraphEvent) bool {
			if ev.Type == brokerapi.GraphEventGraph {
				<-unblock // stalls with the graph event
			}
			if ev.Type == brokerapi.EventLog {
				logs++
			} else {
				seen = append(seen, ev.Type)
			}
			return true
		})
	}()
	testbed.WaitFor(t, 5*time.Second, "the reader to be registered", func() bool {
		g.mu.Lock()
		defer g.mu.Unlock()
		return len(g.followers) == 1
	})
	for range 3 * followerBuffer {
		g.buildEvent(graphDrv("a"), brokerapi.Event{Type: brokerapi.EventLog, Text: "line\n"})
	}
	gb.release("a", nil)
	gb.waitStarted(t, "b")
	gb.release("b", nil)
	<-g.done
	close(unblock)
	if !<-done {
		t.Fatal("the slow reader did not get the done event")
	}
	want := "graph queued started built queued started built done"
	if got := strings.Join(seen, " "); got != want {
		t.Errorf("slow reader saw %q, want %q", got, want)
	}
	if logs == 0 || logs >= 3*followerBuffer {
		t.Errorf("slow reader saw %d log lines, want some but not all %d", logs, 3*followerBuffer)
	}
}

// TestGraphBounds: bad requests are refused with 400 naming the field, a plan that cannot be
// read with 422, and a graph beyond maxGraphs with 503; finished graphs are forgotten after
// finishedGraphTTL.
func TestGraphBounds(t *testing.T) {
	clock := newTestClock()
	b, _, sock := newGraphBroker(t, graphNames{"a": nil}, Options{Now: clock.Now})
	root := `{"drvPath":"` + graphDrv("a") + `"}`
	for _, tc := range []struct{ body, want string }{
		{`{"roots":[]}`, "roots: none"},
		{`{"roots":[{"drvPath":"/nix/store/../../etc/passwd.drv"}]}`, "roots[0].drvPath"},
		{`{"roots":[` + root + `],"fetch":"some"}`, "fetch"},
		{`{"roots":[` + root + `],"priority":-1}`, "priority"},
		{`{"roots":[{"drvPath":"` + graphDrv("a") + `","outputs":["../x"]}]}`, "roots[0].outputs[0]"},
		{`{"roots":[` + strings.Repeat(root+",", maxGraphRoots) + root + `]}`, "at most"},
	} {
		code, body := request(t, sock, http.MethodPost, "/v1/graphs", tc.body)
		wantJSONError(t, tc.want, code, http.StatusBadRequest, body, tc.want)
	}
	code, body := request(t, sock, http.MethodPost, "/v1/graphs", `{"roots":[{"drvPath":"`+graphDrv("nosuch")+`"}]}`)
	wantJSONError(t, "a derivation that cannot be read", code, http.StatusUnprocessableEntity, body, "no such derivation")

	c := dialBroker(t, sock)
	var streams []*brokerapi.GraphStream
	var ids []string
	for range maxGraphs {
		st, id := submitGraph(t, dialBroker(t, sock), brokerapi.GraphRequest{Roots: []brokerapi.GraphRoot{{DrvPath: graphDrv("a")}}, Detach: true})
		streams, ids = append(streams, st), append(ids, id)
	}
	code, body = request(t, sock, http.MethodPost, "/v1/graphs", `{"roots":[`+root+`]}`)
	wantJSONError(t, "one graph too many", code, http.StatusServiceUnavailable, body, "graphs are running")
	if st, err := c.Status(context.Background()); err != nil || st.Graphs != maxGraphs {
		t.Errorf("status: %d graphs, %v", st.Graphs, err)
	}
	for _, id := range ids {
		if err := c.CancelGraph(context.Background(), id); err != nil {
			t.Fatal(err)
		}
	}
	for _, st := range streams {
		readToDone(t, st)
	}
	if n := len(b.listGraphs()); n != maxGraphs {
		t.Errorf("%d finished graphs kept, want %d", n, maxGraphs)
	}
	clock.Advance(finishedGraphTTL + time.Second)
	if n := len(b.listGraphs()); n != 0 {
		t.Errorf("%d finished graphs kept past the TTL", n)
	}
	if code, _ := request(t, sock, http.MethodGet, "/v1/graphs/"+ids[0]+"/events", ""); code != http.StatusNotFound {
		t.Errorf("following a forgotten graph: %d, want 404", code)
	}
}

// TestGraphNARNeedsTheDoneEvent: outputs are fetched only once the graph has ended, and only
// those its done event lists.
func TestGraphNARNeedsTheDoneEvent(t *testing.T) {
	_, gb, sock := newGraphBroker(t, graphNames{"a": nil}, Options{})
	st, id := submitGraph(t, dialBroker(t, sock), brokerapi.GraphRequest{Roots: []brokerapi.GraphRoot{{DrvPath: graphDrv("a")}}, Detach: true})
	gb.waitStarted(t, "a")
	base := strings.TrimPrefix(graphOut("a"), "/nix/store/")
	code, body := request(t, sock, http.MethodGet, "/v1/graphs/"+id+"/nar/"+base, "")
	wantJSONError(t, "a NAR while running", code, http.StatusConflict, body, "still running")
	gb.release("a", nil)
	readToDone(t, st)
	code, body = request(t, sock, http.MethodGet, "/v1/graphs/"+id+"/nar/"+base, "")
	wantJSONError(t, "an output not to fetch", code, http.StatusNotFound, body, "no output")
	code, body = request(t, sock, http.MethodGet, "/v1/graphs/"+id+"/nar/x", "")
	wantJSONError(t, "a NAR of no store path", code, http.StatusBadRequest, body, "nar:")
}
