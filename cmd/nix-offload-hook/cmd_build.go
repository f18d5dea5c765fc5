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
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/graph"
	"github.com/nix-offload/nix-offload/internal/localstore"
	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/serveproto"
)

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
	fetch := fs.String("fetch", brokerapi.FetchRequested, "what comes home: requested, all or none")
	follow := fs.String("follow", "", "follow the broker's graph ID (printed when it was submitted) to its end, then fetch and link as if it had been submitted here")
	var attrs multiFlag
	fs.Var(&attrs, "A", "attribute of a .nix file to build (repeatable)")
	if err := fs.Parse(args); err != nil {
		return usageError{fmt.Sprintf("build: %v\n\n%s", err, usage)}
	}
	switch *fetch {
	case brokerapi.FetchRequested, brokerapi.FetchAll, brokerapi.FetchNone:
	default:
		return usageError{fmt.Sprintf("build: -fetch %q: want requested, all or none", *fetch)}
	}
	switch {
	case *follow != "" && fs.NArg() > 0:
		return usageError{"build: -follow takes no installable: the graph has its own"}
	case *follow == "" && fs.NArg() == 0:
		return usageError{"build: no installable: give a /nix/store/…drv path, or a .nix file with -A"}
	}
	var roots []brokerapi.GraphRoot
	if *follow == "" {
		var err error
		if roots, err = parseInstallables(ctx, fs.Args(), attrs); err != nil {
			return err
		}
	}
	cfg, err := loadConfig(*configPath, *builders, nixSystem())
	if err != nil {
		return err
	}
	// This process adds what it fetches by itself, not under a nix-daemon
	// worker's locks: it takes Nix's own, as nix-store --import would, so
	// that a hook or a local build writing the same output is not raced.
	// It writes the outputs' rows itself where the default store's
	// database allows it (no nix-daemon settings to consult here).
	waited := map[string]bool{}
	local, err := localstore.Open(localstore.Options{
		DBDir:       localstore.DirectDBDir(func(string) string { return "" }, os.Getenv),
		LockOutputs: true,
		LockWait: func(p string) error {
			if !waited[p] {
				waited[p] = true
				fmt.Fprintf(stderr, "nix-offload-hook: waiting for the lock on '%s' (another Nix process is adding it)\n", p)
			}
			return context.Cause(ctx)
		},
	})
	if err != nil {
		return err
	}
	defer local.Close()
	out := buildOutput{stdout: stdout, asJSON: *asJSON, noLink: *noLink, outLink: *outLink}

	// With a broker running, the graph runs in it, beside the hooks' builds,
	// and survives this process; without, it runs here on the hook's own
	// placement.
	sock := brokerSocket(*socket, cfg)
	if c := dialBuildBroker(ctx, sock); c != nil {
		defer c.Close()
		g := brokerGraph{c: c, sock: sock, local: local, stderr: stderr, id: *follow,
			req: brokerapi.GraphRequest{Roots: roots, Fetch: *fetch, KeepGoing: *keepGoing, Detach: true}}
		return g.run(ctx, out)
	}
	if *follow != "" {
		return fmt.Errorf("build -follow: no broker answers on %s", sock)
	}
	return buildAlone(ctx, cfg, local, roots, *fetch, *keepGoing, stderr, out)
}

// buildAlone builds the graph in this process (internal/graph) on the
// machines of cfg, ssh:// and ssh-ng:// alike.
func buildAlone(ctx context.Context, cfg *machines.Config, local *localstore.Store, roots []brokerapi.GraphRoot, fetch string, keepGoing bool, stderr io.Writer, out buildOutput) error {
	if len(cfg.Machines) == 0 {
		return &configError{fmt.Errorf("%s: no machines to build on", cfg.Path)}
	}
	// Warnings come while the graph runs too: above the progress line.
	progress := newProgress(stderr)
	remote, err := graph.NewAlone(cfg, local, func(msg string) { progress.note("nix-offload-hook: " + msg) })
	if err != nil {
		return err
	}
	defer remote.Shut()
	drvs := make([]string, len(roots))
	for i, r := range roots {
		drvs[i] = r.DrvPath
	}
	plan, err := remote.Load(ctx, drvs, readDerivation)
	if err != nil {
		return err
	}
	toBuild := 0
	for _, n := range plan.Nodes {
		if !n.Valid {
			toBuild++
		}
	}
	progress.start(toBuild)
	results := graph.Execute(ctx, plan, remote, graph.Options{
		KeepGoing:  keepGoing,
		MaxRunning: graph.TotalSlots(cfg.Machines),
		Events:     func(e graph.Event) { progress.event(e.API(remote.Holder)) },
	})
	progress.done()
	var fetchErr error
	if fetch != brokerapi.FetchNone && ctx.Err() == nil {
		fetchErr = remote.Fetch(ctx, graph.FetchPaths(fetch, roots, results))
	}
	var report []brokerapi.GraphDerivation
	for _, r := range results {
		report = append(report, graph.Report(r, remote.Holder))
	}
	return out.finish(roots, report, fetch, fetchErr)
}

// brokerGraph is one graph run in the broker, as this command follows it.
type brokerGraph struct {
	c      *brokerapi.Client
	sock   string
	local  *localstore.Store
	stderr io.Writer
	req    brokerapi.GraphRequest // submitted unless id is set
	id     string                 // the graph to follow

	progress *progress // what is printed to stderr while the graph runs
}

// graphCancelTimeout bounds how long an interrupted build waits for the
// broker to stop the graph and send its results.
const graphCancelTimeout = 30 * time.Second

// run submits or follows the graph to its done event, fetches what it
// lists, and prints the results. An interrupt (ctx) cancels the graph in
// the broker (DELETE) and waits for its results, which say what stopped.
func (g *brokerGraph) run(ctx context.Context, out buildOutput) error {
	// The stream is not ctx's: after an interrupt it still brings the
	// results. A killed process leaves the detached graph running.
	var st *brokerapi.GraphStream
	var err error
	if g.id == "" {
		st, err = g.c.SubmitGraph(context.Background(), g.req)
	} else {
		st, err = g.c.FollowGraph(context.Background(), g.id)
	}
	if err != nil {
		return err
	}
	defer st.Close()
	first, err := st.Next()
	if err != nil {
		return err
	}
	if first.Type != brokerapi.GraphEventGraph || first.Summary == nil {
		return fmt.Errorf("broker: the graph's stream began with %q", first.Type)
	}
	g.id = first.Graph
	sum := first.Summary
	fmt.Fprintf(g.stderr, "building graph %s in the broker on %s (%d of %d derivations to build; after an interruption, resume with: nix-offload-hook build -follow %s)\n",
		g.id, g.sock, sum.ToBuild, sum.Derivations, g.id)
	progress := newProgress(g.stderr)
	g.progress = progress
	progress.start(sum.ToBuild)
	stopCancel := context.AfterFunc(ctx, g.cancel)
	defer stopCancel()
	var timer *time.Timer
	for {
		ev, err := st.Next()
		if err != nil {
			progress.done()
			return fmt.Errorf("broker: the stream of graph %s ended: %w (resume with: nix-offload-hook build -follow %s)", g.id, err, g.id)
		}
		if ev.Type != brokerapi.GraphEventDone {
			progress.event(ev)
			if ctx.Err() != nil && timer == nil {
				timer = time.AfterFunc(graphCancelTimeout, func() { st.Close() })
				defer timer.Stop()
			}
			continue
		}
		progress.done()
		sum = ev.Summary
		break
	}
	var fetchErr error
	if sum.FetchError != "" {
		fetchErr = errors.New(sum.FetchError)
	}
	if len(sum.FetchPaths) > 0 && ctx.Err() == nil {
		infos := make([]serveproto.PathInfo, len(sum.FetchPaths))
		for i, f := range sum.FetchPaths {
			infos[i] = f.ServeInfo()
		}
		fetchErr = errors.Join(fetchErr, g.local.AddOutputs(infos, func(p string, w io.Writer) error {
			return g.c.GraphNAR(ctx, g.id, p, w)
		}))
	}
	return out.finish(sum.Roots, sum.Results, sum.Fetch, fetchErr)
}

// cancel asks the broker, on a connection of its own (the stream holds
// the other), to stop the graph.
func (g *brokerGraph) cancel() {
	g.progress.note(fmt.Sprintf("nix-offload-hook: interrupted: cancelling graph %s", g.id))
	ctx, stop := context.WithTimeout(context.Background(), graphCancelTimeout)
	defer stop()
	c, err := brokerapi.DialChecked(ctx, g.sock, brokerPeer)
	if err == nil {
		defer c.Close()
		err = c.CancelGraph(ctx, g.id)
	}
	if err != nil {
		g.progress.note(fmt.Sprintf("nix-offload-hook: cancelling graph %s: %v", g.id, err))
	}
}

// buildOutput is what the command prints and links once the graph ended.
type buildOutput struct {
	stdout         io.Writer
	asJSON, noLink bool
	outLink        string
}

// finish prints the requested output paths (or -json's document), makes
// the out-links, and returns the command's error: the failed derivations,
// with nix-build's exit status.
func (o buildOutput) finish(roots []brokerapi.GraphRoot, results []brokerapi.GraphDerivation, fetch string, fetchErr error) error {
	sort.Slice(results, func(i, j int) bool { return results[i].DrvPath < results[j].DrvPath })
	byDrv := map[string]brokerapi.GraphDerivation{}
	for _, r := range results {
		byDrv[r.DrvPath] = r
	}
	if o.asJSON {
		doc := struct {
			Roots       []string                    `json:"roots"`
			Derivations []brokerapi.GraphDerivation `json:"derivations"`
		}{Derivations: results}
		for _, r := range roots {
			doc.Roots = append(doc.Roots, r.DrvPath)
		}
		enc := json.NewEncoder(o.stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(doc); err != nil {
			return err
		}
	} else {
		for _, r := range roots {
			for _, p := range graph.Wanted(r, byDrv[r.DrvPath].Outputs) {
				fmt.Fprintln(o.stdout, p)
			}
		}
	}
	failure := buildFailure(results)
	if fetchErr != nil {
		return errors.Join(failure, fmt.Errorf("fetching outputs: %w", fetchErr))
	}
	if failure == nil && !o.noLink && fetch != brokerapi.FetchNone {
		if err := addOutLinks(o.outLink, roots, byDrv); err != nil {
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
func parseInstallables(ctx context.Context, args []string, attrs []string) ([]brokerapi.GraphRoot, error) {
	var out []brokerapi.GraphRoot
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
func parseDrvInstallable(a string) (brokerapi.GraphRoot, error) {
	drv, outs, _ := strings.Cut(a, "^")
	if i := strings.IndexByte(drv, '!'); i >= 0 && outs == "" {
		drv, outs = drv[:i], drv[i+1:]
	}
	if !strings.HasPrefix(drv, serveproto.StoreDir+"/") || !strings.HasSuffix(drv, ".drv") {
		return brokerapi.GraphRoot{}, usageError{fmt.Sprintf("build: %q is not a store derivation (/nix/store/…drv, optionally ^OUTPUTS) nor a .nix file", a)}
	}
	in := brokerapi.GraphRoot{DrvPath: drv}
	if outs != "" && outs != "*" {
		in.Outputs = strings.Split(outs, ",")
	}
	return in, nil
}

// instantiate runs the local nix-instantiate on file for each attribute.
func instantiate(ctx context.Context, file string, attrs []string) ([]brokerapi.GraphRoot, error) {
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
	var insts []brokerapi.GraphRoot
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

// buildFailure is the error the command ends with: nil when nothing
// failed, else one naming each failed derivation with an exit status
// computed as nix-build's: 0x60 | 0x04 for a failed build, | 0x01 if one
// timed out, | 0x08 if one was not deterministic (100, 101, 104, …); 1
// when only other failures (machines, connections, the local store) did.
func buildFailure(results []brokerapi.GraphDerivation) error {
	var failed []string
	mask := 0
	for _, r := range results {
		if r.Error == "" || r.Start == nil {
			continue // built, or never started: not a failure of its own
		}
		switch r.Status {
		case serveproto.TimedOut.String():
			mask |= 0x04 | 0x01
		case serveproto.NotDeterministic.String():
			mask |= 0x08
		case serveproto.PermanentFailure.String(), serveproto.InputRejected.String(), serveproto.OutputRejected.String(), serveproto.LogLimitExceeded.String():
			mask |= 0x04
		}
		if r.Status != serveproto.DependencyFailed.String() {
			failed = append(failed, fmt.Sprintf("'%s' (%s): %s", r.DrvPath, r.Status, r.Error))
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
func addOutLinks(base string, roots []brokerapi.GraphRoot, results map[string]brokerapi.GraphDerivation) error {
	for i, in := range roots {
		r := results[in.DrvPath]
		for _, p := range graph.Wanted(in, r.Outputs) {
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

// progress shows the graph's progress on stderr: one line redrawn on a
// terminal, plain lines otherwise. Everything else the command prints
// while the graph runs goes through note, above that line.
type progress struct {
	w        io.Writer
	terminal bool

	mu            sync.Mutex
	shown         bool // between start and done: the status line is on the terminal
	total         int
	running       map[string]string // drv → machine
	queued        map[string]bool
	built, failed int
}

func newProgress(w io.Writer) *progress {
	p := &progress{w: w, running: map[string]string{}, queued: map[string]bool{}}
	if f, ok := w.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			p.terminal = true
		}
	}
	return p
}

// start begins the graph of total derivations to build: from now on, on a
// terminal, the status line is drawn below every line printed.
func (p *progress) start(total int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.total, p.shown = total, true
}

// note prints a message of the command's own, on a line of its own.
func (p *progress) note(s string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.line(s)
}

func (p *progress) event(e brokerapi.GraphEvent) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch e.Type {
	case brokerapi.EventQueued:
		if _, running := p.running[e.DrvPath]; !running {
			p.queued[e.DrvPath] = true
		}
	case brokerapi.EventStarted:
		delete(p.queued, e.DrvPath)
		p.running[e.DrvPath] = e.Machine
		p.line(fmt.Sprintf("building '%s' on '%s'", e.DrvPath, e.Machine))
	case brokerapi.GraphEventBuilt, brokerapi.GraphEventFailed:
		delete(p.queued, e.DrvPath)
		delete(p.running, e.DrvPath)
		r := e.Result
		switch {
		case e.Type == brokerapi.GraphEventBuilt:
			p.built++
			took := time.Duration(0)
			if r != nil && r.Start != nil {
				took = r.Stop.Sub(*r.Start)
			}
			p.line(fmt.Sprintf("built '%s' on '%s' in %v", e.DrvPath, e.Machine, took.Round(time.Millisecond)))
		default:
			p.failed++
			p.line(fmt.Sprintf("%s: '%s': %s", e.Status, e.DrvPath, e.Error))
		}
	}
}

// line prints one event: on a terminal above the status line.
func (p *progress) line(s string) {
	if !p.terminal || !p.shown {
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
	if p.terminal && p.shown {
		fmt.Fprintf(p.w, "\r\033[K%s\n", p.status())
	}
	p.shown = false
}
