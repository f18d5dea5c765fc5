package main

// Hook mode: the contract with nix-daemon.
//
// Nix starts us as `<build-hook> [extra args…] <verbosity>` in its own mount
// namespace, as root, in a new session, and talks to us over:
//
//   - fd 0: the settings block, then one "try" per derivation it may hand
//     off, then (after `# accept`) the input closure and the wanted outputs;
//   - fd 2: our replies (`# accept`, `# decline`, `# decline-permanently`,
//     `# postpone`) and `@nix` JSON log messages. Plain lines are only shown
//     before a reply and dropped after `# accept`, so everything we say goes
//     out as `@nix` JSON. The build ends at the first EOF on fd 2: no child
//     may inherit it;
//   - fd 4: the build log, read only after `# accept`, through a 64 KiB pipe
//     that Nix sometimes stops draining. It is written through a bounded
//     buffer (hookproto.BuildLog) so a slow reader never stalls the protocol.
//     Nothing is written to it before `# accept`.
//
// One process answers "try" requests until it accepts one, builds it and
// exits: 0 with every wanted output valid, 100 for a failed build, 101 for a
// timeout (Nix ≤ 2.28 maps these to its own failure kinds), 1 otherwise.
// Nix enforces neither max-silent-time nor timeout on hook builds, so we
// pass them to the machine and also enforce them here.
//
// When a broker listens on the configured socket, the hook hands each
// request to it instead (hook_broker.go) and keeps only the last step,
// making the outputs valid; this file is the hook working alone.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	sshconfig "github.com/kevinburke/ssh_config"
	"github.com/nix-community/go-nix/pkg/derivation"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/hookproto"
	"github.com/nix-offload/nix-offload/internal/localstore"
	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/offload"
	"github.com/nix-offload/nix-offload/internal/scheduler"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/slots"
	"github.com/nix-offload/nix-offload/internal/sshconn"
	"github.com/nix-offload/nix-offload/internal/transport"
)

// Exit codes Nix ≤ 2.28 understands for hook builds.
const (
	exitBuildFailed = 100
	exitTimedOut    = 101
)

// maxDrvSize bounds how much of a .drv file we read.
const maxDrvSize = 64 << 20

// exitCodeError carries the exit code a hook failure must end with.
type exitCodeError struct {
	code int
	err  error
}

func (e *exitCodeError) Error() string { return e.err.Error() }
func (e *exitCodeError) Unwrap() error { return e.err }

// runHook serves one hook process. It returns nil after a successful build
// or when Nix closes stdin without anything accepted.
func runHook(ctx context.Context, args []string) error {
	// A write to fd 2 after nix-daemon went away must be an error, not a
	// SIGPIPE death.
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)
	// fd 5 is the read end of the log pipe; we never read it. fd 4 must not
	// reach children (ssh has none, but nix-store runs locally).
	syscall.Close(5)

	h := &hook{
		in:  bufio.NewReader(os.Stdin),
		out: os.Stderr,
		log: hookproto.NewLogger(os.Stderr),
	}
	err := h.serve(ctx)
	if err != nil {
		h.log.Msg(hookproto.LvlError, "error: "+err.Error())
	}
	return err
}

type hook struct {
	in  io.Reader
	out io.Writer
	log *hookproto.Logger

	cfg      *machines.Config
	settings hookproto.Settings
	slots    *slots.Dir        // embedded mode's slot files; nil until needed
	broker   *brokerapi.Client // nil: embedded mode
	down     map[string]string // machines that failed in this process: name → reason
	gate     logGate           // remote stderr → build log
}

func (h *hook) serve(ctx context.Context) error {
	settings, err := hookproto.ReadSettings(h.in)
	if err != nil {
		return fmt.Errorf("reading settings from nix: %w", err)
	}
	h.settings = settings
	cfg, err := loadConfig("", settings.String("builders", ""), settings.String("system", nixSystem()))
	if err != nil {
		// A broken configuration must not abort every build: say why and let
		// Nix build locally.
		h.log.Msg(hookproto.LvlError, "nix-offload: "+err.Error()+"; building locally")
		return hookproto.DeclinePermanently(h.out)
	}
	h.cfg = cfg
	if len(cfg.Machines) == 0 {
		h.log.Msg(hookproto.LvlInfo, fmt.Sprintf("nix-offload: no remote machines configured in %s; building locally", cfg.Path))
		return hookproto.DeclinePermanently(h.out)
	}
	h.down = map[string]string{}

	h.broker = h.dialBroker(ctx)
	if h.broker != nil {
		defer h.broker.Close()
	} else {
		sl, err := slots.Open(h.slotsDir())
		if err != nil {
			h.log.Msg(hookproto.LvlError, "nix-offload: "+err.Error()+"; building locally")
			return hookproto.DeclinePermanently(h.out)
		}
		h.slots = sl
	}

	for {
		req, err := hookproto.ReadRequest(h.in)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("reading a request from nix: %w", err)
		}
		done, err := h.tryBroker(ctx, req)
		if errors.Is(err, errNoBroker) {
			done, err = h.try(ctx, req)
		}
		if done || err != nil {
			return err
		}
	}
}

// try answers one request. done means the request was accepted and built
// (successfully or not): the process must exit.
func (h *hook) try(ctx context.Context, req *hookproto.Request) (done bool, err error) {
	sreq := scheduler.Request{System: req.System, RequiredFeatures: req.RequiredFeatures, AmWilling: req.AmWilling}
	run, d, err := h.open(ctx, req, sreq, false)
	if err != nil {
		return false, err
	}
	if run == nil {
		return false, h.reply(d, req)
	}
	return true, h.build(ctx, req, run)
}

// allDown reports whether every machine that could build sreq failed in
// this process.
func (h *hook) allDown(sreq scheduler.Request) bool {
	for _, m := range h.cfg.Machines {
		if _, down := h.down[m.Name()]; scheduler.Matches(m, sreq) && !down {
			return false
		}
	}
	return true
}

// noMachine says why open found no machine for an accepted build.
func (h *hook) noMachine(sreq scheduler.Request, d scheduler.Decision) string {
	if !h.allDown(sreq) {
		return d.Reason
	}
	var why []string
	for _, m := range h.cfg.Machines {
		if reason, down := h.down[m.Name()]; down && scheduler.Matches(m, sreq) {
			why = append(why, fmt.Sprintf("'%s': %s", m.Name(), reason))
		}
	}
	return "every machine that can build it failed: " + strings.Join(why, "; ")
}

// maxMachines bounds the machines one accepted build is tried on when
// machines are lost under it, as in the broker.
const maxMachines = 3

// machineRun is what one attempt at a build holds: a slot on a machine, a
// serve session there and a session with the local store.
type machineRun struct {
	m      machines.Machine
	slot   *slots.Slot
	local  *localstore.Store
	warmed func() error // see openLocal
	sess   *transport.Session
	conn   *serveproto.Conn
	client *sshconn.Client
}

// close ends the sessions and frees the slot.
func (r *machineRun) close() {
	r.warmed()
	r.local.Close()
	r.sess.Close()
	r.client.Close()
	r.slot.Release()
}

// open takes a slot on the best machine for sreq and connects to it, before
// anything is accepted on it: a machine that cannot be reached is skipped
// (and said so), not reported as a failed build. run is nil when the
// verdict is not Accept; d says why. With wait, a Postpone verdict waits
// for a slot instead (after "# accept" there is no postponing), unless
// every capable machine failed in this process: h.down is never cleared,
// so that wait would never end.
func (h *hook) open(ctx context.Context, req *hookproto.Request, sreq scheduler.Request, wait bool) (run *machineRun, d scheduler.Decision, err error) {
	for {
		d, slot, m, err := h.takeSlot(ctx, sreq)
		if err != nil {
			return nil, d, err
		}
		switch {
		case d.Verdict == scheduler.Postpone && wait && !h.allDown(sreq):
			select {
			case <-time.After(postponeWait):
				continue
			case <-ctx.Done():
				return nil, d, context.Cause(ctx)
			}
		case d.Verdict != scheduler.Accept:
			return nil, d, nil
		case slot == nil:
			continue // lost a race with another hook: decide again
		}
		// The local store's read session starts while we dial: both are
		// process or network start-up on the critical path.
		local, warmed, err := h.openLocal()
		if err != nil {
			slot.Release()
			return nil, d, err
		}
		sess, conn, client, err := h.connect(ctx, m)
		if err != nil {
			warmed()
			local.Close()
			slot.Release()
			h.down[m.Name()] = err.Error()
			h.log.Msg(hookproto.LvlWarn, fmt.Sprintf("nix-offload: cannot use '%s' for '%s': %v", m.Name(), req.DrvPath, err))
			continue // the next machine, or a verdict that says why
		}
		return &machineRun{m: m, slot: slot, local: local, warmed: warmed, sess: sess, conn: conn, client: client}, d, nil
	}
}

// takeSlot decides for sreq under the host-wide lock and, on Accept, takes
// a slot on the best candidate that has one. slot is nil when the verdict
// is not Accept, or when other hooks took the free slots first (decide
// again).
func (h *hook) takeSlot(ctx context.Context, sreq scheduler.Request) (scheduler.Decision, *slots.Slot, machines.Machine, error) {
	if h.slots == nil {
		sl, err := slots.Open(h.slotsDir())
		if err != nil {
			return scheduler.Decision{}, nil, machines.Machine{}, err
		}
		h.slots = sl
	}
	unlock, err := h.slots.Lock(ctx)
	if err != nil {
		return scheduler.Decision{}, nil, machines.Machine{}, err
	}
	defer unlock()
	load, err := h.slots.Load(h.cfg.Machines)
	if err != nil {
		return scheduler.Decision{}, nil, machines.Machine{}, err
	}
	d := scheduler.Decide(h.cfg.Machines, sreq, load, h.down)
	for _, c := range d.Candidates {
		s, ok, err := h.slots.Acquire(c)
		if err != nil {
			return d, nil, machines.Machine{}, err
		}
		if ok {
			return d, s, c, nil
		}
	}
	return d, nil, machines.Machine{}, nil
}

// slotsDir is where embedded mode keeps its slot files.
func (h *hook) slotsDir() string {
	stateDir := h.cfg.Daemon.StateDir
	if stateDir == "" {
		stateDir = machines.DefaultStateDir
	}
	return filepath.Join(stateDir, "slots")
}

// openLocal opens the local store and starts its read session in the
// background. warmed waits until that is done and says whether it worked;
// the store must not be used, or closed, before warmed returned.
func (h *hook) openLocal() (local *localstore.Store, warmed func() error, err error) {
	local, err = localstore.Open(localstore.Options{})
	if err != nil {
		return nil, nil, err
	}
	done := make(chan error, 1)
	go func() { done <- local.Warm() }()
	return local, sync.OnceValue(func() error { return <-done }), nil
}

// reply sends a non-accepting verdict and says why.
func (h *hook) reply(d scheduler.Decision, req *hookproto.Request) error {
	why := fmt.Sprintf("nix-offload: not offloading '%s': %s", req.DrvPath, d.Reason)
	switch d.Verdict {
	case scheduler.DeclinePermanently:
		h.log.Msg(hookproto.LvlInfo, why)
		return hookproto.DeclinePermanently(h.out)
	case scheduler.Postpone:
		h.log.Msg(hookproto.LvlTalkative, why+" (waiting for a free slot)")
		return hookproto.Postpone(h.out)
	default:
		h.log.Msg(hookproto.LvlInfo, why)
		return hookproto.Decline(h.out)
	}
}

// connect dials m and starts a serve session there, before we accept: a
// machine that cannot be reached is skipped, not reported as a failed build.
func (h *hook) connect(ctx context.Context, m machines.Machine) (*transport.Session, *serveproto.Conn, *sshconn.Client, error) {
	target := sshconn.Resolve(m, sshconfig.DefaultUserSettings)
	client, err := sshconn.Dial(ctx, target)
	if err != nil {
		return nil, nil, nil, err
	}
	sess, err := transport.SSH(client.Client, transport.ServeCommand(m.RemoteStore), transport.Options{Name: m.Name(), Stderr: h.remoteLog()})
	if err != nil {
		client.Close()
		return nil, nil, nil, err
	}
	conn, err := serveproto.HandshakeWithin(ctx, target.ConnectTimeout, sess.Stdout(), sess.Stdin(),
		serveproto.Options{Explain: sess.Explain}, func() { sess.Close() })
	if late := (*serveproto.NoGreetingError)(nil); errors.As(err, &late) {
		err = fmt.Errorf("%s: %w", m.Name(), err)
	}
	if err != nil {
		sess.Close()
		client.Close()
		return nil, nil, nil, err
	}
	return sess, conn, client, nil
}

// logGate forwards the remote's stderr to the build log once the build
// command has been sent; what the machine prints before (substitution
// messages) is not part of the build's log.
type logGate struct {
	open     atomic.Bool
	mu       sync.Mutex
	w        io.Writer // guarded by mu; nil until accept
	activity offload.Activity
}

func (h *hook) remoteLog() io.Writer { return &h.gate }

func (g *logGate) Write(p []byte) (int, error) {
	g.activity.Touch()
	if !g.open.Load() {
		return len(p), nil
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.w != nil {
		g.w.Write(p)
	}
	return len(p), nil
}

func (g *logGate) attach(w io.Writer) {
	g.mu.Lock()
	g.w = w
	g.mu.Unlock()
}

// build accepts a request on run's machine and runs it to the end.
func (h *hook) build(ctx context.Context, req *hookproto.Request, run *machineRun) error {
	drv, err := readDerivation(req.DrvPath)
	if err != nil {
		run.close()
		// Not accepted yet: this is ours to explain, and Nix can build it.
		h.log.Msg(hookproto.LvlError, "nix-offload: "+err.Error())
		return hookproto.Decline(h.out)
	}
	if err := hookproto.Accept(h.out, run.m.Name()); err != nil {
		run.close()
		return err
	}
	acc, err := h.readAccepted()
	if err != nil {
		run.close()
		return err
	}
	defer acc.log.Close(2 * time.Second)
	return h.buildOn(ctx, req, drv, acc, run)
}

// buildOn runs an accepted build on run's machine. When that machine is
// lost (it died, or its link did) before any output was fetched, the build
// goes to another machine that can do it, up to maxMachines in all, as the
// broker does: after "# accept" the build is ours to finish, and a user
// expects it to finish while another capable machine exists. A build that
// ran and failed on the machine is not retried. run is closed on return.
func (h *hook) buildOn(ctx context.Context, req *hookproto.Request, drv *derivation.Derivation, acc *accepted, run *machineRun) error {
	sreq := scheduler.Request{System: req.System, RequiredFeatures: req.RequiredFeatures}
	for attempt := 1; ; attempt++ {
		err := h.runAccepted(ctx, req, drv, acc, run)
		run.close()
		var lost *lostError
		if !errors.As(err, &lost) {
			return err
		}
		err = lost.err
		if ctx.Err() != nil {
			return err
		}
		if attempt >= maxMachines {
			return fmt.Errorf("%w (%d machines lost; giving up)", err, attempt)
		}
		h.down[run.m.Name()] = err.Error()
		if h.allDown(sreq) {
			return fmt.Errorf("%w; no other machine can build it", err)
		}
		h.log.Msg(hookproto.LvlWarn, fmt.Sprintf("nix-offload: lost '%s' while building '%s': %v; trying another machine", run.m.Name(), req.DrvPath, err))
		next, d, oerr := h.open(ctx, req, sreq, true)
		switch {
		case oerr != nil:
			return fmt.Errorf("%w; no other machine: %v", err, oerr)
		case next == nil && h.allDown(sreq):
			return fmt.Errorf("%w; no other machine can build it: %s", err, h.noMachine(sreq, d))
		case next == nil:
			return fmt.Errorf("%w; no other machine can build it: %s", err, d.Reason)
		}
		h.log.Msg(hookproto.LvlInfo, fmt.Sprintf("nix-offload: building '%s' on '%s'", req.DrvPath, next.m.Name()))
		run = next
	}
}

// lostError is a build that lost its machine before any output was
// fetched: another machine may do better.
type lostError struct{ err error }

func (e *lostError) Error() string { return e.err.Error() }
func (e *lostError) Unwrap() error { return e.err }

// localError marks a failure of the local store, which another machine
// would not fix: its sessions fail with the same error types as a remote.
type localError struct{ err error }

func (e *localError) Error() string { return "local store: " + e.err.Error() }
func (e *localError) Unwrap() error { return e.err }

// hookLocal is the local store as offload.Run sees it in the hook, with
// its read failures marked as local.
type hookLocal struct{ *localstore.Store }

func (l hookLocal) PathInfos(paths []string) ([]serveproto.PathInfo, error) {
	infos, err := l.Store.PathInfos(paths)
	if err != nil {
		return nil, &localError{err}
	}
	return infos, nil
}

func (l hookLocal) Valid(paths []string) ([]string, error) {
	valid, err := l.Store.Valid(paths)
	if err != nil {
		return nil, &localError{err}
	}
	return valid, nil
}

// accepted is what Nix sends after `# accept`, and the open build log.
type accepted struct {
	inputs, wanted []string
	log            *hookproto.BuildLog
}

func (h *hook) readAccepted() (*accepted, error) {
	inputs, wanted, err := hookproto.ReadAccepted(h.in)
	if err != nil {
		return nil, fmt.Errorf("reading inputs from nix: %w", err)
	}
	logFile, err := hookproto.OpenBuildLogFD(hookproto.BuildLogFD)
	if err != nil {
		return nil, err
	}
	return &accepted{inputs: inputs, wanted: wanted, log: hookproto.NewBuildLog(logFile, 8<<20)}, nil
}

// buildOptions are the settings of nix-daemon that shape a remote build.
func (h *hook) buildOptions() serveproto.BuildOptions {
	return serveproto.BuildOptions{
		MaxSilentTime: h.settings.Seconds("max-silent-time", 0),
		BuildTimeout:  h.settings.Seconds("timeout", 0),
		MaxLogSize:    h.settings.Uint("max-build-log-size", 0),
		KeepFailed:    h.settings.Bool("keep-failed", false),
	}
}

// runAccepted builds an accepted request on run's machine. A *lostError
// means the machine was lost before any output was fetched.
func (h *hook) runAccepted(ctx context.Context, req *hookproto.Request, drv *derivation.Derivation, acc *accepted, run *machineRun) error {
	m, sess, conn := run.m, run.sess, run.conn
	// What a machine prints before the build command (substitutions) is
	// not the build's log, on a second machine too.
	h.gate.open.Store(false)
	h.gate.attach(acc.log)
	if err := run.warmed(); err != nil {
		return fmt.Errorf("local store: %w", err)
	}
	opts := h.buildOptions()
	job := offload.Job{
		Machine:       m.Name(),
		DrvPath:       req.DrvPath,
		Drv:           drv,
		Inputs:        acc.inputs,
		WantedOutputs: acc.wanted,
		Options:       opts,
		Substitute:    h.settings.Bool("builders-use-substitutes", false),
	}

	// Cancel the build when Nix's limits pass (plus grace), or when we are
	// asked to stop: closing the session makes the machine stop the build.
	bctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stopWatch := offload.WatchLimits(bctx, cancel, opts, &h.gate.activity)
	defer stopWatch()
	stopOnCancel := context.AfterFunc(bctx, func() { sess.Close() })
	defer stopOnCancel()

	var copyAct hookproto.ActivityID
	fetching := false
	err := offload.Run(bctx, conn, hookLocal{run.local}, job, offload.Events{
		Copying: func(n int, bytes uint64) {
			copyAct, _ = h.log.Start(hookproto.ActCopyPaths, hookproto.LvlInfo,
				fmt.Sprintf("copying %d paths (%s) to '%s'", n, humanBytes(bytes), m.Name()))
		},
		Building: func() {
			if copyAct != 0 {
				h.log.Stop(copyAct)
			}
			h.gate.open.Store(true)
			sess.StderrIsLog()
		},
		Fetching: func(int, uint64) { fetching = true },
	})
	var be *offload.BuildError
	var le *offload.LimitError
	switch {
	case err == nil:
		return nil
	case errors.As(context.Cause(bctx), &le):
		return &exitCodeError{exitTimedOut, fmt.Errorf("build of '%s' on '%s' failed: %w", req.DrvPath, m.Name(), le)}
	case errors.As(err, &be) && be.TimedOut():
		return &exitCodeError{exitTimedOut, err}
	case errors.As(err, &be):
		return &exitCodeError{exitBuildFailed, err}
	case ctx.Err() == nil && !fetching && !errors.As(err, new(*localError)) && offload.MachineLost(err):
		// A link that went dead shows only as the end of the stream; say
		// why the connection was closed.
		if why := run.client.Lost(); why != nil {
			err = fmt.Errorf("%w: %v", err, why)
		}
		return &lostError{err}
	default:
		return err
	}
}

// readDerivation parses a .drv from the local store.
func readDerivation(path string) (*derivation.Derivation, error) {
	if !strings.HasSuffix(path, ".drv") {
		return nil, fmt.Errorf("%s: not a derivation", path)
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	d, err := offload.ReadDerivation(io.LimitReader(f, maxDrvSize))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return d, nil
}

func humanBytes(n uint64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
