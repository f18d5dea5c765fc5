package graph

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"

	"github.com/nix-community/go-nix/pkg/derivation"

	"github.com/nix-offload/nix-offload/internal/engine"
	"github.com/nix-offload/nix-offload/internal/localstore"
	"github.com/nix-offload/nix-offload/internal/nar"
	"github.com/nix-offload/nix-offload/internal/offload"
	"github.com/nix-offload/nix-offload/internal/scheduler"
	"github.com/nix-offload/nix-offload/internal/serveproto"
)

// Store is the local store as a graph build uses it; *localstore.Store
// implements it. Remote calls it one method at a time.
type Store interface {
	offload.Local
	// Closure returns the closure of valid paths.
	Closure(paths []string) ([]string, error)
}

// Remote builds derivations on the machines with the engine and keeps
// their outputs there. It is safe for concurrent use by [Execute].
type Remote struct {
	// Placer returns the placer for one derivation's build (the hook
	// alone's placer is one build's: a fresh one per derivation).
	Placer func() engine.Placer
	// Submit, if set, runs each build in the broker (internal/broker runs
	// graphs so): builds then go through its queue and warm sessions
	// instead of Placer.
	Submit Submit
	// Priority is added to each build's rank with Submit.
	Priority int
	// Local is the local store.
	Local Store
	// Open opens a session on a machine that reads outputs from it, for
	// inputs that go to another machine and for fetching.
	Open func(ctx context.Context, machine string) (engine.Session, func(), error)
	// Read, if set, runs each read on machine with f instead of the
	// reading sessions Open makes (the broker's pools, where a session a
	// graph kept would be one a build waits for).
	Read func(ctx context.Context, machine string, f func(engine.MachineStore) error) error
	// Close, if set, is called by [Remote.Close] after the reading
	// sessions are closed (to close the pools behind Placer and Open).
	Close func()
	// Transfers, if set, gives each build the upload table of its lease's
	// machine (engine.Build.Transfers): builds on one machine send a
	// path once, and inputs known valid there are checked in the build's
	// own flight.
	Transfers func(engine.Lease) offload.Transfers
	// Options are the build options every derivation gets.
	Options    serveproto.BuildOptions
	Substitute bool // builders-use-substitutes
	// LogDir is Nix's log directory (/nix/var/log/nix): every build log
	// goes to LogDir/drvs/XX/REST. "": logs are not kept.
	LogDir string
	// LogWarn, if set, hears why a build log cannot be written, and the
	// build goes on without it; unset, that fails the build.
	LogWarn func(error)
	// Machines are the machines [Remote.Find] asks; Down, if set, names
	// those to skip (on backoff).
	Machines []string
	Down     func() map[string]string

	// MaxNodes, if not 0, bounds the derivations [Remote.Load] reads.
	MaxNodes int

	localMu sync.Mutex // Local is one session

	mu       sync.Mutex
	held     map[string]heldPath // output path → where it is
	producer map[string]string   // output path → its derivation
	readers  map[string]*reader  // machine → reading session
}

// heldPath is an output that stays on the machine that built it.
type heldPath struct {
	machine string
	info    serveproto.PathInfo
}

// Build implements [Builder].
func (r *Remote) Build(ctx context.Context, n *Node, started func(string)) (string, map[string]string, error) {
	inputs, err := r.inputClosure(ctx, n)
	if err != nil {
		return "", nil, err
	}
	log, closeLog, err := r.openLog(n.DrvPath)
	if err != nil && r.LogWarn != nil {
		r.LogWarn(err)
		log, closeLog, err = io.Discard, func() {}, nil
	}
	if err != nil {
		return "", nil, err
	}
	defer closeLog()
	if r.Submit != nil {
		m, err := r.buildThroughBroker(ctx, n, inputs, log, started)
		if err != nil {
			return m, nil, err
		}
		return m, n.Outputs(), nil
	}
	local := &buildLocal{r: r}
	var machine string
	outputs := map[string]string{}
	ev := engine.Events{
		Started: func(m string, _ int) {
			machine = m
			started(m)
		},
		Outputs: func(m string, infos []serveproto.PathInfo) {
			r.record(n, m, infos)
			maps.Copy(outputs, n.Outputs())
		},
	}
	err = engine.Run(ctx, r.Placer(), engine.Build{
		Request: scheduler.Request{
			System:           n.Drv.Platform,
			RequiredFeatures: offload.RequiredFeatures(n.Drv),
			Present:          r.present(inputs),
		},
		Job: offload.Job{
			DrvPath:     n.DrvPath,
			Drv:         n.Drv,
			Inputs:      inputs,
			Options:     r.Options,
			Substitute:  r.Substitute,
			KeepOutputs: true,
		},
		Local:     local,
		Log:       log,
		Events:    ev,
		Transfers: r.Transfers,
	})
	if lost := local.lostInput(); err != nil && lost != nil {
		return machine, nil, lost
	}
	if err != nil {
		return machine, nil, err
	}
	return machine, outputs, nil
}

// Load reads the plan of roots with read ([Load]): what is valid
// locally, or held by a machine from an earlier run ([Remote.Find]), is
// not built again.
func (r *Remote) Load(ctx context.Context, roots []string, read func(drvPath string) (*derivation.Derivation, error)) (*Plan, error) {
	n := 0
	bounded := func(p string) (*derivation.Derivation, error) {
		if n++; r.MaxNodes > 0 && n > r.MaxNodes {
			return nil, fmt.Errorf("the graph has more than %d derivations", r.MaxNodes)
		}
		return read(p)
	}
	return Load(roots, bounded, func(paths []string) ([]string, error) {
		r.localMu.Lock()
		valid, err := r.Local.Valid(paths)
		r.localMu.Unlock()
		if err != nil {
			return nil, err
		}
		rest := slices.DeleteFunc(slices.Clone(paths), func(p string) bool { return slices.Contains(valid, p) })
		if len(rest) == 0 {
			return valid, nil
		}
		return append(valid, r.Find(ctx, rest)...), nil
	})
}

// present is the placement hint for a build with inputs: the bytes of
// them each machine holds.
func (r *Remote) present(inputs []string) map[string]uint64 {
	var out map[string]uint64
	for _, p := range inputs {
		if h, ok := r.lookup(p); ok {
			if out == nil {
				out = map[string]uint64{}
			}
			out[h.machine] += h.info.NarSize
		}
	}
	return out
}

// record notes that n's outputs are on m.
func (r *Remote) record(n *Node, m string, infos []serveproto.PathInfo) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.held == nil {
		r.held, r.producer = map[string]heldPath{}, map[string]string{}
	}
	for _, info := range infos {
		r.held[info.Path] = heldPath{machine: m, info: info}
		r.producer[info.Path] = n.DrvPath
	}
}

// forget drops what r knew of the outputs of drv.
func (r *Remote) forget(drv string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for p, d := range r.producer {
		if d == drv {
			delete(r.held, p)
			delete(r.producer, p)
		}
	}
}

func (r *Remote) lookup(p string) (heldPath, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	h, ok := r.held[p]
	return h, ok
}

// inputClosure is the input closure of n as Nix hands it to a hook: its
// input sources and the wanted outputs of its input derivations, with
// everything they refer to, whether valid here or held by a machine.
func (r *Remote) inputClosure(ctx context.Context, n *Node) ([]string, error) {
	var roots []string
	roots = append(roots, n.Drv.InputSources...)
	for drv, names := range n.Drv.InputDerivations {
		node := n.inputs[drv]
		if node == nil {
			return nil, fmt.Errorf("%s: input derivation '%s' was not read", n.DrvPath, drv)
		}
		outs := node.Outputs()
		for _, name := range names {
			p, ok := outs[name]
			if !ok {
				return nil, fmt.Errorf("%s: input '%s' has no output '%s' with a known path "+
					"(floating content-addressed outputs are not supported)", n.DrvPath, drv, name)
			}
			roots = append(roots, p)
		}
	}
	return r.closure(ctx, roots)
}

// closure follows references through held paths to local ones, and takes
// the local ones' closure from the local store. A reference neither held
// nor valid here is looked for on the machines ([Remote.Find]).
func (r *Remote) closure(ctx context.Context, roots []string) ([]string, error) {
	seen := map[string]bool{}
	var local []string
	todo := slices.Clone(roots)
	for len(todo) > 0 {
		var unknown []string
		for len(todo) > 0 {
			p := todo[len(todo)-1]
			todo = todo[:len(todo)-1]
			if seen[p] {
				continue
			}
			seen[p] = true
			h, ok := r.lookup(p)
			if !ok {
				unknown = append(unknown, p)
				continue
			}
			todo = append(todo, h.info.References...)
		}
		if len(unknown) == 0 {
			break
		}
		r.localMu.Lock()
		valid, err := r.Local.Valid(unknown)
		r.localMu.Unlock()
		if err != nil {
			return nil, &engine.LocalError{Err: err}
		}
		local = append(local, valid...)
		rest := slices.DeleteFunc(unknown, func(p string) bool { return slices.Contains(valid, p) })
		if len(rest) == 0 {
			continue
		}
		found := r.Find(ctx, rest)
		if missing := slices.DeleteFunc(rest, func(p string) bool { return slices.Contains(found, p) }); len(missing) > 0 {
			return nil, fmt.Errorf("%s: valid neither here nor on any machine", strings.Join(missing, ", "))
		}
		for _, p := range found {
			h, _ := r.lookup(p)
			todo = append(todo, h.info.References...)
		}
	}
	out := make([]string, 0, len(seen))
	for p := range seen {
		if _, ok := r.lookup(p); ok {
			out = append(out, p)
		}
	}
	if len(local) > 0 {
		r.localMu.Lock()
		c, err := r.Local.Closure(local)
		r.localMu.Unlock()
		if err != nil {
			return nil, &engine.LocalError{Err: err}
		}
		out = append(out, c...)
	}
	sort.Strings(out)
	return slices.Compact(out), nil
}

// lost is a *LostInputError for held path p; r forgets p's producer's
// outputs, so that they are built again.
func (r *Remote) lost(p string, why error) error {
	r.mu.Lock()
	producer := r.producer[p]
	r.mu.Unlock()
	r.forget(producer)
	return &LostInputError{Producer: producer, Path: p, Err: why}
}

// reader is one machine's reading session, one operation at a time.
type reader struct {
	mu        sync.Mutex
	s         engine.Session
	closeConn func()
}

// withReader runs f on the store of machine m's reading session (either
// protocol), opened on first use and again after it broke.
func (r *Remote) withReader(ctx context.Context, m string, f func(engine.MachineStore) error) error {
	if r.Read != nil {
		return r.Read(ctx, m, f)
	}
	r.mu.Lock()
	if r.readers == nil {
		r.readers = map[string]*reader{}
	}
	rd := r.readers[m]
	if rd == nil {
		rd = &reader{}
		r.readers[m] = rd
	}
	r.mu.Unlock()
	rd.mu.Lock()
	defer rd.mu.Unlock()
	if rd.s == nil {
		s, closeConn, err := r.Open(ctx, m)
		if err != nil {
			return fmt.Errorf("reading from '%s': %w", m, err)
		}
		rd.s, rd.closeConn = s, closeConn
	}
	st := engine.StoreOf(rd.s)
	err := f(st)
	if err != nil && st.Err() != nil {
		rd.s.Close()
		rd.closeConn()
		rd.s = nil
	}
	return err
}

// Shut ends the reading sessions, then calls Close.
func (r *Remote) Shut() {
	r.mu.Lock()
	for m, rd := range r.readers {
		rd.mu.Lock()
		if rd.s != nil {
			rd.s.Close()
			rd.closeConn()
		}
		rd.mu.Unlock()
		delete(r.readers, m)
	}
	r.mu.Unlock()
	if r.Close != nil {
		r.Close()
	}
}

// Fetch makes paths valid in the local store with their closures: what is
// held by a machine is streamed from it, checked against its narHash and
// registered (localstore's AddOutputs: nothing partial stays valid).
func (r *Remote) Fetch(ctx context.Context, paths []string) error {
	infos, err := r.ToFetch(ctx, paths)
	if err != nil || len(infos) == 0 {
		return err
	}
	r.localMu.Lock()
	defer r.localMu.Unlock()
	return r.Local.AddOutputs(infos, func(p string, w io.Writer) error {
		return r.DumpHeld(ctx, p, w)
	})
}

// ToFetch returns the paths of the closure of paths that machines hold
// and are not valid locally, each after its references.
func (r *Remote) ToFetch(ctx context.Context, paths []string) ([]serveproto.PathInfo, error) {
	closure, err := r.closure(ctx, paths)
	if err != nil {
		return nil, err
	}
	var infos []serveproto.PathInfo
	for _, p := range closure {
		if h, ok := r.lookup(p); ok {
			infos = append(infos, h.info)
		}
	}
	if len(infos) == 0 {
		return nil, nil
	}
	return localstore.TopoSort(infos)
}

// DumpHeld writes the NAR of p, which a machine holds, from that machine
// to w.
func (r *Remote) DumpHeld(ctx context.Context, p string, w io.Writer) error {
	h, ok := r.lookup(p)
	if !ok {
		return fmt.Errorf("%s: no machine holds it for this graph", p)
	}
	return r.withReader(ctx, h.machine, func(st engine.MachineStore) error {
		_, err := st.Dump(ctx, h.info, w)
		return err
	})
}

// Find returns the paths, of those given, that a machine holds already
// (built there by an earlier run, or for a hook), and remembers where, so
// that a graph run again does not build them again and can fetch them. A
// machine that cannot be asked is skipped: its outputs are built again.
func (r *Remote) Find(ctx context.Context, paths []string) []string {
	var down map[string]string
	if r.Down != nil {
		down = r.Down()
	}
	type found struct {
		machine string
		infos   []serveproto.PathInfo
	}
	results := make(chan found, len(r.Machines))
	asked := 0
	for _, m := range r.Machines {
		if _, ok := down[m]; ok {
			continue
		}
		asked++
		go func() {
			var infos []serveproto.PathInfo
			r.withReader(ctx, m, func(st engine.MachineStore) error {
				have, err := st.Valid(ctx, paths, false)
				if err != nil || len(have) == 0 {
					return err
				}
				infos, err = st.PathInfos(ctx, have)
				return err
			})
			results <- found{m, infos}
		}()
	}
	var out []string
	for range asked {
		f := <-results
		r.mu.Lock()
		if r.held == nil {
			r.held, r.producer = map[string]heldPath{}, map[string]string{}
		}
		for _, info := range f.infos {
			if _, ok := r.held[info.Path]; ok || !slices.Contains(paths, info.Path) {
				continue
			}
			r.held[info.Path] = heldPath{machine: f.machine, info: info}
			r.producer[info.Path] = info.Deriver
			out = append(out, info.Path)
		}
		r.mu.Unlock()
	}
	sort.Strings(out)
	return out
}

// Holder returns the machine that holds p, or "" if none does.
func (r *Remote) Holder(p string) string {
	h, _ := r.lookup(p)
	return h.machine
}

// openLog opens drv's build log where Nix keeps it. The directories and the log are readable
// by all, as Nix leaves them, whatever the umask (the broker's unit has UMask=0077): `nix log`
// reads the file as the user who runs it.
func (r *Remote) openLog(drv string) (io.Writer, func(), error) {
	if r.LogDir == "" {
		return io.Discard, func() {}, nil
	}
	base := filepath.Base(drv)
	dir := filepath.Join(r.LogDir, "drvs", base[:2])
	for _, d := range []string{r.LogDir, filepath.Dir(dir), dir} {
		if _, err := os.Stat(d); err == nil {
			continue
		}
		err := os.MkdirAll(d, 0o755)
		if err == nil {
			err = os.Chmod(d, 0o755) // not subject to the umask, unlike MkdirAll's mode
		}
		if err != nil {
			return nil, nil, &engine.LocalError{Err: fmt.Errorf("build log: %w", err)}
		}
	}
	p := filepath.Join(dir, base[2:])
	// A compressed log of an earlier build would be read instead of this
	// one by some Nix versions: this build's log replaces it.
	os.Remove(p + ".bz2")
	f, err := os.Create(p)
	if err == nil {
		err = f.Chmod(0o644)
	}
	if err != nil {
		if f != nil {
			f.Close()
		}
		return nil, nil, &engine.LocalError{Err: fmt.Errorf("build log: %w", err)}
	}
	return f, func() { f.Close() }, nil
}

// buildLocal is the local store as one build sees it: a path held by a
// machine reads from there.
type buildLocal struct {
	r    *Remote
	mu   sync.Mutex
	lost *LostInputError // a held input that could not be read
}

func (l *buildLocal) lostInput() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.lost == nil {
		return nil
	}
	return l.lost
}

func (l *buildLocal) PathInfos(paths []string) ([]serveproto.PathInfo, error) {
	out := make([]serveproto.PathInfo, 0, len(paths))
	var local []string
	for _, p := range paths {
		if _, ok := l.r.lookup(p); !ok {
			local = append(local, p)
		}
	}
	var infos []serveproto.PathInfo
	if len(local) > 0 {
		l.r.localMu.Lock()
		var err error
		infos, err = l.r.Local.PathInfos(local)
		l.r.localMu.Unlock()
		if err != nil {
			return nil, err
		}
	}
	for _, p := range paths {
		if h, ok := l.r.lookup(p); ok {
			out = append(out, h.info)
			continue
		}
		i := slices.IndexFunc(infos, func(info serveproto.PathInfo) bool { return info.Path == p })
		if i < 0 {
			return nil, fmt.Errorf("%s: not valid in the local store", p)
		}
		out = append(out, infos[i])
	}
	return out, nil
}

func (l *buildLocal) Dump(p string, w io.Writer) (nar.Stats, error) {
	h, ok := l.r.lookup(p)
	if !ok {
		l.r.localMu.Lock()
		defer l.r.localMu.Unlock()
		return l.r.Local.Dump(p, w)
	}
	var st nar.Stats
	ew := &engine.ErrWriter{W: w}
	err := l.r.withReader(context.Background(), h.machine, func(ms engine.MachineStore) error {
		var err error
		st, err = ms.Dump(context.Background(), h.info, ew)
		return err
	})
	if err != nil && ew.Err == nil {
		l.mu.Lock()
		if l.lost == nil {
			l.lost = l.r.lost(p, err).(*LostInputError)
		}
		l.mu.Unlock()
		// Final for this build, not the builder's loss: the producer is
		// built again first.
		err = &engine.LocalError{Err: fmt.Errorf("reading %s: %w", p, err)}
	}
	return st, err
}

func (l *buildLocal) AddOutputs([]serveproto.PathInfo, func(string, io.Writer) error) error {
	return errors.New("graph: outputs stay on the builders")
}

func (l *buildLocal) Valid(paths []string) ([]string, error) {
	l.r.localMu.Lock()
	defer l.r.localMu.Unlock()
	return l.r.Local.Valid(paths)
}
