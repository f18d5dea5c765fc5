package offload_test

import (
	"context"
	"errors"
	"io"
	"slices"
	"sync"
	"testing"

	"github.com/nix-community/go-nix/pkg/derivation"

	"github.com/nix-offload/nix-offload/internal/offload"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/servetest"
)

// turns counts a client's turns on a session as the bed's delay proxy
// does: each time it writes after it has read since its last write, a
// round trip it may have waited for.
type turns struct {
	mu        sync.Mutex
	n         int
	readSince bool
}

type turnReader struct {
	r io.Reader
	t *turns
}

func (r turnReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if n > 0 {
		r.t.mu.Lock()
		r.t.readSince = true
		r.t.mu.Unlock()
	}
	return n, err
}

type turnWriter struct {
	w io.Writer
	t *turns
}

func (w turnWriter) Write(p []byte) (int, error) {
	w.t.mu.Lock()
	if w.t.n == 0 || w.t.readSince {
		w.t.n++
		w.t.readSince = false
	}
	w.t.mu.Unlock()
	return w.w.Write(p)
}

// fakeTransfers is a broker's memory of one machine: known paths, and
// what Run told it.
type fakeTransfers struct {
	known                   []string
	locked, present, forgot []string
}

func (f *fakeTransfers) Locked(paths []string) (locked, rest []string) { return nil, paths }
func (f *fakeTransfers) MarkLocked(paths []string)                     { f.locked = append(f.locked, paths...) }
func (f *fakeTransfers) Known(paths []string) bool {
	return !slices.ContainsFunc(paths, func(p string) bool { return !slices.Contains(f.known, p) })
}
func (f *fakeTransfers) Present(paths []string) { f.present = append(f.present, paths...) }
func (f *fakeTransfers) Forget(paths []string)  { f.forgot = append(f.forgot, paths...) }
func (f *fakeTransfers) Claim(context.Context, string) (bool, func(error), error) {
	return true, func(error) {}, nil
}
func (f *fakeTransfers) ClaimAll(context.Context, []string) (bool, func(string, error), error) {
	return true, func(string, error) {}, nil
}

// runCounted runs e's build on a session whose turns it counts, and
// returns the Conn for a look at its state afterwards.
func (e *env) runCounted(t *testing.T) (*serveproto.Conn, int, error) {
	t.Helper()
	ps := e.srv.Pipe(t, machine)
	tc := &turns{}
	conn, err := serveproto.Handshake(turnReader{ps.R, tc}, turnWriter{ps.W, tc}, serveproto.Options{Explain: ps.Explain})
	if err != nil {
		t.Fatal(err)
	}
	err = offload.Run(context.Background(), conn, e.store, e.job, offload.Events{})
	tc.mu.Lock()
	defer tc.mu.Unlock()
	return conn, tc.n, err
}

func checkOps(t *testing.T, srv *servetest.Server, want ...servetest.Op) {
	t.Helper()
	if got := srv.Ops(); !slices.Equal(got, want) {
		t.Errorf("operations %v, want %v", got, want)
	}
}

// A build without inputs takes two flights after the greeting: the build,
// then, once its result is in, the query for its output with the output's
// NAR (that exchange lets the build's last log lines arrive before the log
// is closed).
func TestBuildThenOutputsFlight(t *testing.T) {
	e := newEnv(t)
	e.job.Drv.InputSources = nil
	conn, n, err := e.runCounted(t)
	if err != nil {
		t.Fatal(err)
	}
	if n != 3 {
		t.Errorf("%d turns, want 3 (greeting, build, output query and NAR)", n)
	}
	checkOps(t, e.srv, servetest.BuildDerivation, servetest.QueryPathInfos, servetest.DumpStorePath)
	if !e.local.Valid(t, outPath) {
		t.Errorf("%s is not valid here", outPath)
	}
	if err := conn.Err(); err != nil {
		t.Errorf("session out of use after a good build: %v", err)
	}
}

// Inputs the broker knows are on the machine are not asked for first:
// a locking query goes out with the build, and the NARs follow as soon as
// it says they are there, while the build runs.
func TestKnownInputsCheckedInFlight(t *testing.T) {
	e := newEnv(t)
	e.srv.Add(serveproto.PathInfo{Path: inputPath}, inputNAR)
	tr := &fakeTransfers{known: []string{inputPath}}
	e.job.Transfers = tr
	_, n, err := e.runCounted(t)
	if err != nil {
		t.Fatal(err)
	}
	checkOps(t, e.srv, servetest.QueryValidPaths, servetest.BuildDerivation, servetest.QueryPathInfos, servetest.DumpStorePath)
	if n != 3 {
		t.Errorf("%d turns, want 3 (greeting, check+build, output query and NAR)", n)
	}
	// The input was locked by the check, the output by the build.
	if !slices.Equal(tr.locked, []string{inputPath, outPath}) || tr.present != nil || tr.forgot != nil {
		t.Errorf("locked %v, present %v, forgot %v", tr.locked, tr.present, tr.forgot)
	}
	if !e.local.Valid(t, outPath) {
		t.Errorf("%s is not valid here", outPath)
	}
}

// A stale hint: the broker believes the input is on the machine, but it
// is gone (collected). The build fails for want of it, in band; Run
// forgets the hint, asks, sends the input and builds again, on the same
// session, and the build ends well.
func TestStaleHintRecovers(t *testing.T) {
	e := newEnv(t)
	tr := &fakeTransfers{known: []string{inputPath}}
	e.job.Transfers = tr
	conn, _, err := e.runCounted(t)
	if err != nil {
		t.Fatal(err)
	}
	checkOps(t, e.srv,
		servetest.QueryValidPaths, servetest.BuildDerivation, // the hint's flight: fails
		servetest.QueryValidPaths, servetest.AddToStoreNar, // asked for, and sent
		servetest.BuildDerivation, servetest.QueryPathInfos, servetest.DumpStorePath)
	if !slices.Contains(tr.forgot, inputPath) {
		t.Errorf("forgot %v, want the stale input", tr.forgot)
	}
	if _, ok := e.srv.Lookup(inputPath); !ok {
		t.Error("the input was not sent")
	}
	if !e.local.Valid(t, outPath) {
		t.Errorf("%s is not valid here", outPath)
	}
	if err := conn.Err(); err != nil {
		t.Errorf("session out of use: %v", err)
	}
}

// A build that fails is reported as the build's failure after one
// exchange that asks about nothing (it lets the build's last log lines,
// which can come after the result, reach the log), and no NAR was asked
// for: the session stays in step and can be used again.
func TestFailedBuildKeepsTheSession(t *testing.T) {
	e := newEnv(t)
	e.job.Drv.InputSources = nil
	e.srv.Build = func(servetest.BuildRequest) servetest.BuildReply {
		return servetest.BuildReply{Status: serveproto.PermanentFailure, ErrorMsg: "builder failed with exit code 1"}
	}
	conn, n, err := e.runCounted(t)
	var be *offload.BuildError
	if !errors.As(err, &be) || be.Status != serveproto.PermanentFailure {
		t.Fatalf("got %v, want the build's failure", err)
	}
	checkOps(t, e.srv, servetest.BuildDerivation, servetest.QueryValidPaths)
	if n != 3 {
		t.Errorf("%d turns, want 3 (greeting, build, the exchange after its result)", n)
	}
	if err := conn.Err(); err != nil {
		t.Errorf("session out of use after a failed build: %v", err)
	}
	e.checkNothingValid(t)
}

// The local store takes the outputs references first, not in the order
// their NARs were asked for, and skips one that is valid here already:
// NARs it does not take are read past, one taken out of turn is asked
// for again, and the session stays in step.
func TestOutputsFetchedInAnotherOrder(t *testing.T) {
	const devPath = "/nix/store/vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv-hostile-dev"
	const docPath = "/nix/store/wwwwwwwwwwwwwwwwwwwwwwwwwwwwwwww-hostile-doc"
	e := newEnv(t)
	e.job.Drv.InputSources = nil
	e.job.Drv.Outputs = map[string]*derivation.Output{"out": {Path: outPath}, "dev": {Path: devPath}, "doc": {Path: docPath}}
	docNAR := servetest.FileNAR("docs\n")
	e.local.Add(t, output(docNAR, func(i *serveproto.PathInfo) { i.Path = docPath }).Info, docNAR)
	e.srv.Build = func(req servetest.BuildRequest) servetest.BuildReply {
		r := servetest.DefaultBuild(req)
		dev := r.Outputs["dev"]
		dev.Info.References = []string{outPath} // dev refers to out: out is registered first
		r.Outputs["dev"] = dev
		for name, o := range r.Outputs {
			o.Info.NarSize = uint64(len(o.NAR))
			o.Info.NarHash = output(o.NAR, nil).Info.NarHash
			r.Outputs[name] = o
		}
		return r
	}
	conn, _, err := e.runCounted(t)
	if err != nil {
		t.Fatal(err)
	}
	checkOps(t, e.srv, servetest.BuildDerivation, servetest.QueryPathInfos,
		servetest.DumpStorePath, servetest.DumpStorePath, servetest.DumpStorePath, // dev, doc, out: sent together
		servetest.DumpStorePath) // dev again, after out
	for _, p := range []string{outPath, devPath, docPath} {
		if !e.local.Valid(t, p) {
			t.Errorf("%s is not valid here", p)
		}
	}
	if err := conn.Err(); err != nil {
		t.Fatalf("session out of step: %v", err)
	}
	if _, err := conn.QueryValidPaths([]string{outPath}, false, false); err != nil {
		t.Fatalf("a query after the build: %v", err)
	}
}

// Missing inputs go to the machine in one flight, references first: a
// turn for all of them, not one each.
func TestUploadsInOneFlight(t *testing.T) {
	for _, broker := range []bool{false, true} {
		name := map[bool]string{false: "alone", true: "with a transfers table"}[broker]
		t.Run(name, func(t *testing.T) {
			e := newEnv(t)
			dep := "/nix/store/dddddddddddddddddddddddddddddddd-dep"
			top := "/nix/store/ssssssssssssssssssssssssssssssss-top"
			e.local.Add(t, serveproto.PathInfo{Path: dep}, inputNAR)
			e.local.Add(t, serveproto.PathInfo{Path: top, References: []string{dep, inputPath}}, inputNAR)
			e.job.Drv.InputSources = []string{top, inputPath, dep}
			if broker {
				e.job.Transfers = &fakeTransfers{}
			}
			_, n, err := e.runCounted(t)
			if err != nil {
				t.Fatal(err)
			}
			if n != 5 {
				t.Errorf("%d turns, want 5 (greeting, input query, the three uploads, build, outputs)", n)
			}
			checkOps(t, e.srv, servetest.QueryValidPaths, servetest.AddToStoreNar, servetest.AddToStoreNar, servetest.AddToStoreNar,
				servetest.BuildDerivation, servetest.QueryPathInfos, servetest.DumpStorePath)
			for _, p := range []string{dep, inputPath, top} {
				if _, ok := e.srv.Lookup(p); !ok {
					t.Errorf("%s was not sent", p)
				}
			}
		})
	}
}
