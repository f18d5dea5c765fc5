package graph

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nix-community/go-nix/pkg/derivation"

	"github.com/nix-offload/nix-offload/internal/daemonproto"
	"github.com/nix-offload/nix-offload/internal/engine"
	"github.com/nix-offload/nix-offload/internal/nar"
	"github.com/nix-offload/nix-offload/internal/offload"
	"github.com/nix-offload/nix-offload/internal/scheduler"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/servetest"
	"github.com/nix-offload/nix-offload/internal/uploads"
)

// The tests in this file run Remote against fake machines (servetest)
// over real pipes, one speaking the serve protocol (an ssh:// machine),
// one the daemon protocol (ssh-ng://): the outputs stay on the machine
// that built them whichever it speaks, and an input moves from one to the
// other through this host.

// fakeMachines are the fake machines by name; ng ones speak the daemon
// protocol.
type fakeMachines struct {
	t   *testing.T
	srv map[string]*servetest.Server
	ng  map[string]bool
}

// open starts a session on machine m, as a pool's Get does.
func (f *fakeMachines) open(ctx context.Context, m string) (engine.Session, func(), error) {
	srv := f.srv[m]
	if srv == nil {
		return nil, nil, fmt.Errorf("no machine '%s'", m)
	}
	s := &pipeSession{}
	var err error
	if f.ng[m] {
		s.ps = srv.PipeDaemon(f.t, m)
		s.dconn, err = daemonproto.Handshake(ctx, s.ps.R, s.ps.W, daemonproto.Options{Abort: s.Close, Explain: s.ps.Explain})
	} else {
		s.ps = srv.Pipe(f.t, m)
		s.conn, err = serveproto.Handshake(s.ps.R, s.ps.W, serveproto.Options{Explain: s.ps.Explain})
	}
	if err != nil {
		s.Close()
		return nil, nil, err
	}
	return s, s.Close, nil
}

// pipeSession is an engine.Session (a DaemonSession on an ng machine)
// over a servetest pipe.
type pipeSession struct {
	ps    *servetest.PipeSession
	conn  *serveproto.Conn
	dconn *daemonproto.Conn
}

func (s *pipeSession) Conn() *serveproto.Conn        { return s.conn }
func (s *pipeSession) DaemonConn() *daemonproto.Conn { return s.dconn }
func (s *pipeSession) SetLog(io.Writer)              {}
func (s *pipeSession) StderrIsLog()                  {}
func (s *pipeSession) Lost() error                   { return nil }
func (s *pipeSession) Close()                        { s.ps.Close() }

// Locked and MarkLocked: a fresh session per lease has locked nothing.
func (s *pipeSession) Locked(paths []string) (locked, rest []string) { return nil, paths }
func (s *pipeSession) MarkLocked([]string)                           {}

// seqPlacer hands out one lease per build, on the machines of order in
// turn: a chain's builds go where the test says.
type seqPlacer struct {
	f     *fakeMachines
	mu    sync.Mutex
	order []string
	// before, if set, is called with the number of each lease (0 first)
	// before it is handed out.
	before func(n int)
	n      int
}

func (p *seqPlacer) next() engine.Placer { return placerFunc(p.acquire) }

func (p *seqPlacer) acquire(ctx context.Context, _ scheduler.Request, _ map[string]string) (engine.Lease, error) {
	p.mu.Lock()
	if len(p.order) == 0 {
		p.mu.Unlock()
		return nil, errors.New("no machine left in the test's order")
	}
	m := p.order[0]
	p.order = p.order[1:]
	n := p.n
	p.n++
	p.mu.Unlock()
	if p.before != nil {
		p.before(n)
	}
	s, closeConn, err := p.f.open(ctx, m)
	if err != nil {
		return nil, err
	}
	return &pipeLease{m: m, s: s, close: closeConn}, nil
}

type placerFunc func(context.Context, scheduler.Request, map[string]string) (engine.Lease, error)

func (f placerFunc) Acquire(ctx context.Context, req scheduler.Request, exclude map[string]string) (engine.Lease, error) {
	return f(ctx, req, exclude)
}

type pipeLease struct {
	m     string
	s     engine.Session
	close func()
}

func (l *pipeLease) Machine() string         { return l.m }
func (l *pipeLease) Session() engine.Session { return l.s }
func (l *pipeLease) Release(error)           { l.close() }

// memStore is the local store in memory: what is valid, and what came
// home (checked against its narHash, as localstore does).
type memStore struct {
	mu    sync.Mutex
	paths map[string]servetest.Path
}

func (s *memStore) PathInfos(paths []string) ([]serveproto.PathInfo, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []serveproto.PathInfo
	for _, p := range paths {
		if v, ok := s.paths[p]; ok {
			out = append(out, v.Info)
		}
	}
	return out, nil
}

func (s *memStore) Dump(p string, w io.Writer) (nar.Stats, error) {
	s.mu.Lock()
	v, ok := s.paths[p]
	s.mu.Unlock()
	if !ok {
		return nar.Stats{}, fmt.Errorf("%s: not valid here", p)
	}
	return nar.Copy(w, bytes.NewReader(v.NAR), nar.DefaultLimits)
}

func (s *memStore) AddOutputs(infos []serveproto.PathInfo, fetch func(string, io.Writer) error) error {
	for _, info := range infos {
		var buf bytes.Buffer
		if err := fetch(info.Path, &buf); err != nil {
			return err
		}
		if _, err := nar.Verify(io.Discard, bytes.NewReader(buf.Bytes()), int64(info.NarSize), info.NarHash, nar.DefaultLimits); err != nil {
			return fmt.Errorf("%s: %w", info.Path, err)
		}
		s.mu.Lock()
		s.paths[info.Path] = servetest.Path{Info: info, NAR: buf.Bytes()}
		s.mu.Unlock()
	}
	return nil
}

func (s *memStore) Valid(paths []string) ([]string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, p := range paths {
		if _, ok := s.paths[p]; ok {
			out = append(out, p)
		}
	}
	return out, nil
}

func (s *memStore) Closure(paths []string) ([]string, error) { return s.Valid(paths) } // no references here

// chain is c ← b ← a: each derivation's output is the next one's input.
var chain = fakeStore{deps: map[string][]string{"c": {"b"}, "b": {"a"}, "a": {}}}

// buildable is read with what a machine needs to build it.
func buildable(s fakeStore) func(string) (*derivation.Derivation, error) {
	return func(p string) (*derivation.Derivation, error) {
		d, err := s.read(p)
		if err != nil {
			return nil, err
		}
		d.Builder, d.Arguments = "/bin/sh", []string{"-c", "echo > $out"}
		d.Env = map[string]string{"out": d.Outputs["out"].Path}
		return d, nil
	}
}

// A chain built on an ssh-ng machine, then an ssh one, then the ssh-ng
// one again: each intermediate stays where it was built and crosses to the
// next machine through this host, read with the holder's protocol
// (NarFromPath, DumpStorePath) and written with the builder's
// (AddToStoreNar, AddMultipleToStore), never made valid here; only the
// requested output comes home, checked against its narHash.
func TestRemoteHeldInputsCrossProtocols(t *testing.T) {
	ng, ssh := &servetest.Server{}, &servetest.Server{}
	f := &fakeMachines{t: t, srv: map[string]*servetest.Server{"ng": ng, "ssh": ssh}, ng: map[string]bool{"ng": true}}
	placer := &seqPlacer{f: f, order: []string{"ng", "ssh", "ng"}}
	local := &memStore{paths: map[string]servetest.Path{}}
	r := &Remote{Placer: placer.next, Local: local, Open: f.open, Machines: []string{"ng", "ssh"}}
	defer r.Shut()
	plan, err := Load([]string{drvPath("c")}, buildable(chain), local.Valid)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	results := Execute(ctx, plan, r, Options{})
	for _, name := range []string{"a", "b", "c"} {
		res := results[drvPath(name)]
		want := map[string]string{"a": "ng", "b": "ssh", "c": "ng"}[name]
		if res.Err != nil || res.Status != serveproto.Built || res.Machine != want {
			t.Fatalf("%s: %v on %q, %v; want Built on %q", name, res.Status, res.Machine, res.Err, want)
		}
		if got := r.Holder(outPath(name)); got != want {
			t.Errorf("%s is held by %q, want %q", outPath(name), got, want)
		}
	}
	// Each input crossed once, in the builder's protocol.
	if _, ok := ssh.Lookup(outPath("a")); !ok {
		t.Errorf("a's output did not reach the ssh machine")
	}
	if _, ok := ng.Lookup(outPath("b")); !ok {
		t.Errorf("b's output did not reach the ssh-ng machine")
	}
	if !hasRequest(ng, servetest.WorkerNarFromPath, outPath("a")) || !hasRequest(ssh, servetest.AddToStoreNar, outPath("a")) {
		t.Errorf("a's output was not read with NarFromPath and written with AddToStoreNar:\nng %v\nssh %v", ng.Requests(), ssh.Requests())
	}
	if !hasRequest(ssh, servetest.DumpStorePath, outPath("b")) || !slices.Contains(ng.Ops(), servetest.WorkerAddMultipleToStore) {
		t.Errorf("b's output was not read with DumpStorePath and written with AddMultipleToStore:\nng %v\nssh %v", ng.Requests(), ssh.Requests())
	}
	if valid, _ := local.Valid([]string{outPath("a"), outPath("b"), outPath("c")}); len(valid) > 0 {
		t.Fatalf("%v valid here before any fetch", valid)
	}

	if err := r.Fetch(ctx, []string{outPath("c")}); err != nil {
		t.Fatal(err)
	}
	built, _ := ng.Lookup(outPath("c"))
	if got, ok := local.paths[outPath("c")]; !ok || !bytes.Equal(got.NAR, built.NAR) {
		t.Errorf("c's output did not come home as the ssh-ng machine has it")
	}
	if valid, _ := local.Valid([]string{outPath("a"), outPath("b")}); len(valid) > 0 {
		t.Errorf("intermediates %v came home", valid)
	}

	// A run after this one finds the outputs on either machine, with the
	// metadata each reports.
	again := &Remote{Local: local, Open: f.open, Machines: []string{"ng", "ssh"}}
	defer again.Shut()
	found := again.Find(ctx, []string{outPath("a"), outPath("b"), outPath("nowhere")})
	if !slices.Equal(found, []string{outPath("a"), outPath("b")}) {
		t.Fatalf("found %v, want a's and b's outputs", found)
	}
	for _, name := range []string{"a", "b"} {
		h, _ := again.lookup(outPath(name))
		want, _ := f.srv[h.machine].Lookup(outPath(name))
		if h.info.NarHash != want.Info.NarHash || h.info.NarSize != want.Info.NarSize {
			t.Errorf("%s: found %+v on %s, which has %+v", name, h.info, h.machine, want.Info)
		}
	}
}

// A held input its machine lost between its build and the build that
// takes it (garbage-collected there) is found missing by that build, with
// no query of its own before it: its producer is built again, then the
// rest, and the graph succeeds.
func TestRemoteRebuildsAnInputItsHolderLost(t *testing.T) {
	for _, tc := range []struct {
		name, holder, builder string
		tables                bool // the machines' upload tables: a is known on the holder
	}{
		{"same machine", "ssh", "ssh", false},
		{"same machine, known there", "ssh", "ssh", true},
		{"other machine", "ng", "ssh", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ng, ssh := &servetest.Server{}, &servetest.Server{}
			f := &fakeMachines{t: t, srv: map[string]*servetest.Server{"ng": ng, "ssh": ssh}, ng: map[string]bool{"ng": true}}
			// a, b (finds a gone), a again, b, c.
			placer := &seqPlacer{f: f, order: []string{tc.holder, tc.builder, tc.holder, tc.builder, tc.builder}}
			placer.before = func(n int) {
				if n == 1 {
					f.srv[tc.holder].Delete(outPath("a"))
				}
			}
			local := &memStore{paths: map[string]servetest.Path{}}
			r := &Remote{Placer: placer.next, Local: local, Open: f.open, Machines: []string{"ng", "ssh"}}
			var known int // builds that found every input in the table
			if tc.tables {
				tables := map[string]*uploads.Table{"ng": uploads.New(2), "ssh": uploads.New(2)}
				r.Transfers = func(l engine.Lease) offload.Transfers {
					return countKnown{uploads.For(l.Session().(uploads.Session), tables[l.Machine()]), &known}
				}
			}
			defer r.Shut()
			plan, err := Load([]string{drvPath("c")}, buildable(chain), local.Valid)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			results := Execute(ctx, plan, r, Options{})
			for _, name := range []string{"a", "b", "c"} {
				if res := results[drvPath(name)]; res.Err != nil || res.Status != serveproto.Built {
					t.Fatalf("%s: %v, %v; want Built", name, res.Status, res.Err)
				}
			}
			if n := countBuilds(f.srv[tc.holder], drvPath("a")); n != 2 {
				t.Errorf("a built %d times on %s, want 2 (once more after it was lost)", n, tc.holder)
			}
			if _, ok := f.srv[tc.builder].Lookup(outPath("c")); !ok {
				t.Errorf("c's output is not on %s", tc.builder)
			}
			if tc.tables && known == 0 {
				t.Errorf("no build trusted the table: the stale entry was not what found a gone")
			}
		})
	}
}

// countKnown counts the Known calls that said yes.
type countKnown struct {
	offload.Transfers
	n *int
}

func (c countKnown) Known(paths []string) bool {
	ok := c.Transfers.Known(paths)
	if ok {
		*c.n++
	}
	return ok
}

func countBuilds(srv *servetest.Server, drv string) int {
	n := 0
	for _, r := range srv.Requests() {
		if (r.Op == servetest.BuildDerivation || r.Op == servetest.WorkerBuildDerivation) && slices.Contains(r.Paths, drv) {
			n++
		}
	}
	return n
}

func hasRequest(srv *servetest.Server, op servetest.Op, path string) bool {
	return slices.ContainsFunc(srv.Requests(), func(r servetest.Request) bool {
		return r.Op == op && slices.Contains(r.Paths, path)
	})
}
