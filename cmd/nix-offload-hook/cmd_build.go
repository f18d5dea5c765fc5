package main

// `nix-offload-hook build`: a whole derivation graph across the machines
// (internal/graph), without nix-daemon in between. This file is the front
// door only: flags, installables, what is printed, exit codes.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	sshconfig "github.com/kevinburke/ssh_config"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/engine"
	"github.com/nix-offload/nix-offload/internal/graph"
	"github.com/nix-offload/nix-offload/internal/localstore"
	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/pool"
	"github.com/nix-offload/nix-offload/internal/serveproto"
)

// The -fetch policies.
const (
	fetchRequested = "requested" // the requested outputs and their closures
	fetchAll       = "all"       // every output built
	fetchNone      = "none"      // nothing: outputs stay on the builders
)

// installable is one requested derivation and the outputs wanted of it
// (all if empty).
type installable struct {
	drv     string
	outputs []string
}

func runBuild(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("build", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	configPath := fs.String("config", "", "configuration file")
	socket := fs.String("socket", "", "the broker's socket (default: the configuration's, else "+brokerapi.DefaultSocket+")")
	builders := fs.String("builders", defaultBuilders, "machines in Nix's format, when there is no TOML configuration")
	keepGoing := fs.Bool("keep-going", false, "build everything that does not depend on a failure")
	asJSON := fs.Bool("json", false, "print one JSON document with every derivation's result")
	noLink := fs.Bool("no-link", false, "make no out-link")
	outLink := fs.String("out-link", "result", "the out-link's name, registered as a GC root")
	fetch := fs.String("fetch", fetchRequested, "what comes home: requested, all or none")
	var attrs multiFlag
	fs.Var(&attrs, "A", "attribute of a .nix file to build (repeatable)")
	if err := fs.Parse(args); err != nil {
		return usageError{fmt.Sprintf("build: %v\n\n%s", err, usage)}
	}
	switch *fetch {
	case fetchRequested, fetchAll, fetchNone:
	default:
		return usageError{fmt.Sprintf("build: -fetch %q: want requested, all or none", *fetch)}
	}
	if fs.NArg() == 0 {
		return usageError{"build: no installable: give a /nix/store/…drv path, or a .nix file with -A"}
	}
	insts, err := parseInstallables(ctx, fs.Args(), attrs)
	if err != nil {
		return err
	}
	cfg, err := loadConfig(*configPath, *builders, nixSystem())
	if err != nil {
		return err
	}
	if len(cfg.Machines) == 0 {
		return &configError{fmt.Errorf("%s: no machines to build on", cfg.Path)}
	}

	local, err := localstore.Open(localstore.Options{})
	if err != nil {
		return err
	}
	defer local.Close()
	roots := make([]string, len(insts))
	for i, in := range insts {
		roots[i] = in.drv
	}
	remote, err := newRemote(cfg, local, stderr)
	if err != nil {
		return err
	}
	defer remote.Shut()
	// With a broker running, every derivation goes through its queue and
	// slots, beside the hooks' builds; without, the hook's own placement.
	if c := dialBuildBroker(ctx, brokerSocket(*socket, cfg)); c != nil {
		c.Close()
		sock := brokerSocket(*socket, cfg)
		remote.Broker = func(ctx context.Context) (*brokerapi.Client, error) {
			return brokerapi.DialChecked(ctx, sock, brokerPeer)
		}
		fmt.Fprintf(stderr, "building through the broker on %s\n", sock)
	}
	// Valid here, or held by a machine from an earlier run: not built again.
	plan, err := graph.Load(roots, readDerivation, func(paths []string) ([]string, error) {
		valid, err := local.Valid(paths)
		if err != nil {
			return nil, err
		}
		rest := slices.DeleteFunc(slices.Clone(paths), func(p string) bool { return slices.Contains(valid, p) })
		if len(rest) == 0 {
			return valid, nil
		}
		return append(valid, remote.Find(ctx, rest)...), nil
	})
	if err != nil {
		return err
	}

	progress := newProgress(stderr, plan)
	results := graph.Execute(ctx, plan, remote, graph.Options{
		KeepGoing:  *keepGoing,
		MaxRunning: totalSlots(cfg.Machines),
		Events:     progress.event,
	})
	progress.done()

	var fetchErr error
	if *fetch != fetchNone && ctx.Err() == nil {
		fetchErr = remote.Fetch(ctx, fetchPaths(*fetch, insts, results))
	}
	var requested []string
	for _, in := range insts {
		requested = append(requested, wantedPaths(in, results[in.drv])...)
	}
	if *asJSON {
		if err := writeJSON(stdout, plan, results, remote); err != nil {
			return err
		}
	} else {
		for _, p := range requested {
			fmt.Fprintln(stdout, p)
		}
	}
	failure := buildFailure(results)
	if fetchErr != nil {
		return errors.Join(failure, fmt.Errorf("fetching outputs: %w", fetchErr))
	}
	if failure == nil && !*noLink && *fetch != fetchNone {
		if err := addOutLinks(*outLink, insts, results); err != nil {
			return err
		}
	}
	return failure
}

// multiFlag is a flag given any number of times.
type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

// parseInstallables turns arguments into derivations: a store derivation
// (`/nix/store/…drv`, or `…drv^out,dev`), or a .nix file instantiated
// with nix-instantiate for each -A.
func parseInstallables(ctx context.Context, args []string, attrs []string) ([]installable, error) {
	var out []installable
	for _, a := range args {
		if strings.HasSuffix(a, ".nix") || len(attrs) > 0 && !strings.Contains(a, ".drv") {
			drvs, err := instantiate(ctx, a, attrs)
			if err != nil {
				return nil, err
			}
			out = append(out, drvs...)
			continue
		}
		in, err := parseDrvInstallable(a)
		if err != nil {
			return nil, err
		}
		out = append(out, in)
	}
	return out, nil
}

// parseDrvInstallable reads `DRV`, `DRV^out,dev` or `DRV!out` (as
// nix-instantiate prints a selected output).
func parseDrvInstallable(a string) (installable, error) {
	drv, outs, _ := strings.Cut(a, "^")
	if i := strings.IndexByte(drv, '!'); i >= 0 && outs == "" {
		drv, outs = drv[:i], drv[i+1:]
	}
	if !strings.HasPrefix(drv, serveproto.StoreDir+"/") || !strings.HasSuffix(drv, ".drv") {
		return installable{}, usageError{fmt.Sprintf("build: %q is not a store derivation (/nix/store/…drv, optionally ^OUTPUTS) nor a .nix file", a)}
	}
	in := installable{drv: drv}
	if outs != "" && outs != "*" {
		in.outputs = strings.Split(outs, ",")
	}
	return in, nil
}

// instantiate runs the local nix-instantiate on file for each attribute.
func instantiate(ctx context.Context, file string, attrs []string) ([]installable, error) {
	argv := []string{file}
	for _, a := range attrs {
		argv = append(argv, "-A", a)
	}
	var out, errOut bytes.Buffer
	cmd := exec.CommandContext(ctx, "nix-instantiate", argv...)
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("nix-instantiate %s: %v\n%s", strings.Join(argv, " "), err, strings.TrimSpace(errOut.String()))
	}
	var insts []installable
	for _, line := range strings.Fields(out.String()) {
		in, err := parseDrvInstallable(line)
		if err != nil {
			return nil, fmt.Errorf("nix-instantiate printed %q: %w", line, err)
		}
		insts = append(insts, in)
	}
	if len(insts) == 0 {
		return nil, fmt.Errorf("nix-instantiate %s printed no derivation", strings.Join(argv, " "))
	}
	return insts, nil
}

// newRemote makes the graph's builder over the hook alone's placer: the
// host's slot files and health, shared with every hook of the host.
func newRemote(cfg *machines.Config, local *localstore.Store, stderr io.Writer) (*graph.Remote, error) {
	sl, tracker, err := openHostState(cfg, func(herr error) {
		fmt.Fprintf(stderr, "nix-offload-hook: %v; machine health is kept in this process only\n", herr)
	})
	if err != nil {
		return nil, err
	}
	// Warm sessions, one pool per machine, shared by every derivation of
	// the graph: a derivation costs no SSH handshake and no nix-store start.
	pools := map[string]*pool.Pool{}
	var names []string
	for _, m := range cfg.Machines {
		if m.Enabled {
			pools[m.Name()] = pool.New(pool.Options{Machine: m, SSHConfig: sshconfig.DefaultUserSettings})
			names = append(names, m.Name())
		}
	}
	get := func(ctx context.Context, name string) (engine.Session, func(), error) {
		p, ok := pools[name]
		if !ok {
			return nil, nil, fmt.Errorf("no machine '%s' in %s", name, cfg.Path)
		}
		s, err := p.Get(ctx)
		if err != nil {
			return nil, nil, err
		}
		return s, func() { p.Put(s, false) }, nil
	}
	logDir := os.Getenv("NIX_LOG_DIR")
	if logDir == "" {
		logDir = "/nix/var/log/nix"
	}
	return &graph.Remote{
		Placer: func() engine.Placer {
			return &engine.Alone{
				Machines: cfg.Machines,
				Slots:    sl,
				Health:   tracker,
				GiveUp:   cfg.Daemon.MachineWait,
				Warn: func(machine string, err error) {
					fmt.Fprintf(stderr, "nix-offload-hook: cannot use '%s': %v\n", machine, err)
				},
				Connect: func(ctx context.Context, m machines.Machine) (engine.Session, func(), error) {
					return get(ctx, m.Name())
				},
				Put: func(s engine.Session, reusable bool) {
					ps := s.(*pool.Session)
					pools[ps.Name()].Put(ps, reusable)
				},
			}
		},
		Local: local,
		Open:  get,
		Close: func() {
			for _, p := range pools {
				p.Close()
			}
		},
		LogDir:   logDir,
		Machines: names,
		Down:     tracker.Down,
	}, nil
}

// dialBuildBroker connects to the broker if one runs on socket (and root
// or this user serves it), else returns nil.
func dialBuildBroker(ctx context.Context, socket string) *brokerapi.Client {
	dctx, cancel := context.WithTimeout(ctx, brokerDialTimeout)
	defer cancel()
	c, err := brokerapi.DialChecked(dctx, socket, brokerPeer)
	if err != nil {
		return nil
	}
	if _, err := c.Status(dctx); err != nil {
		c.Close()
		return nil
	}
	return c
}

// totalSlots is the number of builds the machines take at once.
func totalSlots(ms []machines.Machine) int {
	n := 0
	for _, m := range ms {
		if m.Enabled {
			n += max(m.ParallelBuilds, 1)
		}
	}
	return max(n, 1)
}

// wantedPaths are the output paths of in that were asked for, "out" first.
func wantedPaths(in installable, r *graph.Result) []string {
	if r == nil || r.Outputs == nil {
		return nil
	}
	names := in.outputs
	if len(names) == 0 {
		for n := range r.Outputs {
			names = append(names, n)
		}
		sort.Slice(names, func(i, j int) bool {
			return names[i] == "out" || names[j] != "out" && names[i] < names[j]
		})
	}
	var out []string
	for _, n := range names {
		if p, ok := r.Outputs[n]; ok {
			out = append(out, p)
		}
	}
	return out
}

// fetchPaths is what -fetch brings home.
func fetchPaths(policy string, insts []installable, results map[string]*graph.Result) []string {
	var out []string
	switch policy {
	case fetchRequested:
		for _, in := range insts {
			if r := results[in.drv]; r != nil && r.Status.Success() {
				out = append(out, wantedPaths(in, r)...)
			}
		}
	case fetchAll:
		for _, r := range results {
			if r.Status == serveproto.Built {
				for _, p := range r.Outputs {
					out = append(out, p)
				}
			}
		}
	}
	sort.Strings(out)
	return out
}

// buildFailure is the error the command ends with: nil when nothing
// failed, else one naming each failed derivation with an exit status
// computed as nix-build's: 0x60 | 0x04 for a failed build, | 0x01 if one
// timed out, | 0x08 if one was not deterministic (100, 101, 104, …); 1
// when only other failures (machines, connections, the local store) did.
func buildFailure(results map[string]*graph.Result) error {
	var failed []string
	mask := 0
	for d, r := range results {
		if r.Err == nil || r.Start.IsZero() {
			continue // built, or never started: not a failure of its own
		}
		switch r.Status {
		case serveproto.TimedOut:
			mask |= 0x04 | 0x01
		case serveproto.NotDeterministic:
			mask |= 0x08
		case serveproto.PermanentFailure, serveproto.InputRejected, serveproto.OutputRejected, serveproto.LogLimitExceeded:
			mask |= 0x04
		}
		if r.Status != serveproto.DependencyFailed {
			failed = append(failed, fmt.Sprintf("'%s' (%s): %v", d, r.Status, r.Err))
		}
	}
	if len(failed) == 0 {
		return nil
	}
	sort.Strings(failed)
	err := fmt.Errorf("%d derivation(s) failed:\n  %s", len(failed), strings.Join(failed, "\n  "))
	if mask == 0 {
		return err
	}
	return &exitCodeError{0x60 | mask, err}
}

// addOutLinks makes nix-build's out-links (result, result-dev, result-2,
// …), each an indirect GC root registered by the local nix-store.
func addOutLinks(base string, insts []installable, results map[string]*graph.Result) error {
	for i, in := range insts {
		r := results[in.drv]
		for _, p := range wantedPaths(in, r) {
			link := base
			if i > 0 {
				link += fmt.Sprintf("-%d", i+1)
			}
			for name, q := range r.Outputs {
				if q == p && name != "out" {
					link += "-" + name
				}
			}
			abs, err := filepath.Abs(link)
			if err != nil {
				return err
			}
			var errOut bytes.Buffer
			cmd := exec.Command("nix-store", "--realise", p, "--add-root", abs, "--indirect")
			cmd.Stdout, cmd.Stderr = io.Discard, &errOut
			if err := cmd.Run(); err != nil {
				return fmt.Errorf("out-link %s → %s: nix-store --add-root: %v\n%s", abs, p, err, strings.TrimSpace(errOut.String()))
			}
		}
	}
	return nil
}

// jsonResult is one derivation in -json's document (README, "Queue runners").
type jsonResult struct {
	DrvPath string            `json:"drvPath"`
	Status  string            `json:"status"`
	Machine string            `json:"machine,omitempty"`
	Start   *time.Time        `json:"start,omitempty"`
	Stop    *time.Time        `json:"stop,omitempty"`
	Error   string            `json:"error,omitempty"`
	Outputs map[string]string `json:"outputs,omitempty"`
	// Holders: output path → the machine that keeps it, for outputs that
	// did not come home.
	Holders map[string]string `json:"holders,omitempty"`
}

func writeJSON(w io.Writer, plan *graph.Plan, results map[string]*graph.Result, remote *graph.Remote) error {
	doc := struct {
		Roots       []string     `json:"roots"`
		Derivations []jsonResult `json:"derivations"`
	}{Roots: plan.Roots}
	drvs := make([]string, 0, len(results))
	for d := range results {
		drvs = append(drvs, d)
	}
	sort.Strings(drvs)
	for _, d := range drvs {
		r := results[d]
		j := jsonResult{DrvPath: d, Status: r.Status.String(), Machine: r.Machine, Outputs: r.Outputs}
		if j.Machine == "" {
			for _, p := range r.Outputs {
				j.Machine = remote.Holder(p) // AlreadyValid on a machine
			}
		}
		if !r.Start.IsZero() {
			start, stop := r.Start.UTC(), r.Stop.UTC()
			j.Start, j.Stop = &start, &stop
		}
		if r.Err != nil {
			j.Error = r.Err.Error()
		}
		for _, p := range r.Outputs {
			if m := remote.Holder(p); m != "" {
				if j.Holders == nil {
					j.Holders = map[string]string{}
				}
				j.Holders[p] = m
			}
		}
		doc.Derivations = append(doc.Derivations, j)
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(doc)
}

// progress shows the graph's progress on stderr: one line redrawn on a
// terminal, plain lines otherwise.
type progress struct {
	w        io.Writer
	terminal bool
	total    int

	mu            sync.Mutex
	running       map[string]string // drv → machine
	queued        map[string]bool
	built, failed int
}

func newProgress(w io.Writer, plan *graph.Plan) *progress {
	p := &progress{w: w, running: map[string]string{}, queued: map[string]bool{}}
	if f, ok := w.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			p.terminal = true
		}
	}
	for _, n := range plan.Nodes {
		if !n.Valid {
			p.total++
		}
	}
	return p
}

func (p *progress) event(e graph.Event) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch e.Kind {
	case graph.Queued:
		p.queued[e.DrvPath] = true
	case graph.Started:
		delete(p.queued, e.DrvPath)
		p.running[e.DrvPath] = e.Machine
		p.line(fmt.Sprintf("building '%s' on '%s'", e.DrvPath, e.Machine))
	case graph.Finished:
		delete(p.queued, e.DrvPath)
		delete(p.running, e.DrvPath)
		r := e.Result
		switch {
		case r.Err == nil:
			p.built++
			p.line(fmt.Sprintf("built '%s' on '%s' in %v", e.DrvPath, r.Machine, r.Stop.Sub(r.Start).Round(time.Millisecond)))
		default:
			p.failed++
			p.line(fmt.Sprintf("%s: '%s': %v", r.Status, e.DrvPath, r.Err))
		}
	}
}

// line prints one event: on a terminal above the status line.
func (p *progress) line(s string) {
	if !p.terminal {
		fmt.Fprintln(p.w, s)
		return
	}
	fmt.Fprintf(p.w, "\r\033[K%s\n%s", s, p.status())
}

func (p *progress) status() string {
	perMachine := map[string]int{}
	for _, m := range p.running {
		perMachine[m]++
	}
	var ms []string
	for m, n := range perMachine {
		ms = append(ms, fmt.Sprintf("%s: %d", m, n))
	}
	sort.Strings(ms)
	s := fmt.Sprintf("[%d/%d built, %d running, %d queued, %d failed]", p.built, p.total, len(p.running), len(p.queued), p.failed)
	if len(ms) > 0 {
		s += " " + strings.Join(ms, ", ")
	}
	return s
}

func (p *progress) done() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.terminal {
		fmt.Fprintf(p.w, "\r\033[K%s\n", p.status())
	}
}
