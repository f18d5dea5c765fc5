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
	for {
		d, slot, m, err := h.takeSlot(ctx, sreq)
		if err != nil {
			return false, err
		}
		if d.Verdict != scheduler.Accept {
			return false, h.reply(d, req)
		}
		if slot == nil {
			continue // lost a race with another hook: decide again
		}
		// The local store's read session starts while we dial: both are
		// process or network start-up on the critical path.
		local, warmed, err := h.openLocal()
		if err != nil {
			slot.Release()
			return false, err
		}
		sess, conn, client, err := h.connect(ctx, m)
		if err != nil {
			warmed()
			local.Close()
			slot.Release()
			h.down[m.Name()] = err.Error()
			h.log.Msg(hookproto.LvlWarn, fmt.Sprintf("nix-offload: cannot use '%s' for '%s': %v", m.Name(), req.DrvPath, err))
			continue // the next machine, or a decline that says why
		}
		err = h.build(ctx, req, m, sess, conn, local, warmed)
		warmed()
		local.Close()
		sess.Close()
		client.Close()
		slot.Release()
		return true, err
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
	client, err := sshconn.Dial(ctx, sshconn.Resolve(m, sshconfig.DefaultUserSettings))
	if err != nil {
		return nil, nil, nil, err
	}
	sess, err := transport.SSH(client.Client, transport.ServeCommand(m.RemoteStore), transport.Options{Name: m.Name(), Stderr: h.remoteLog()})
	if err != nil {
		client.Close()
		return nil, nil, nil, err
	}
	conn, err := serveproto.Handshake(sess.Stdout(), sess.Stdin(), serveproto.Options{Explain: sess.Explain})
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

// build runs an accepted request to the end.
func (h *hook) build(ctx context.Context, req *hookproto.Request, m machines.Machine, sess *transport.Session,
	conn *serveproto.Conn, local *localstore.Store, warmed func() error) error {
	drv, err := readDerivation(req.DrvPath)
	if err != nil {
		// Not accepted yet: this is ours to explain, and Nix can build it.
		h.log.Msg(hookproto.LvlError, "nix-offload: "+err.Error())
		return hookproto.Decline(h.out)
	}
	if err := hookproto.Accept(h.out, m.Name()); err != nil {
		return err
	}
	acc, err := h.readAccepted()
	if err != nil {
		return err
	}
	defer acc.log.Close(2 * time.Second)
	return h.runAccepted(ctx, req, drv, acc, m, sess, conn, local, warmed)
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

// runAccepted builds an accepted request on m over conn.
func (h *hook) runAccepted(ctx context.Context, req *hookproto.Request, drv *derivation.Derivation, acc *accepted,
	m machines.Machine, sess *transport.Session, conn *serveproto.Conn, local *localstore.Store, warmed func() error) error {
	h.gate.attach(acc.log)
	if err := warmed(); err != nil {
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
	err := offload.Run(bctx, conn, local, job, offload.Events{
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
