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
	"strings"
	"syscall"
	"time"

	"github.com/nix-community/go-nix/pkg/derivation"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/daemonproto"
	"github.com/nix-offload/nix-offload/internal/engine"
	"github.com/nix-offload/nix-offload/internal/hookproto"
	"github.com/nix-offload/nix-offload/internal/localstore"
	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/offload"
	"github.com/nix-offload/nix-offload/internal/scheduler"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/stopwatch"
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
		sw:  stopwatch.FromEnv(),
	}
	err := h.serve(ctx)
	h.sw.Mark("exit")
	h.sw.Write()
	if err != nil {
		// Said once, as @nix JSON, which Nix shows at any point of the
		// conversation; main must not print it again.
		h.log.Msg(hookproto.LvlError, "error: "+err.Error())
		return &saidError{err}
	}
	return nil
}

type hook struct {
	in  io.Reader
	out io.Writer
	log *hookproto.Logger

	cfg      *machines.Config
	settings hookproto.Settings
	broker   *brokerapi.Client // nil: embedded mode
	alone    *engine.Alone     // the placer without a broker; nil until needed
	drvPath  string            // the request being answered, for messages
	sw       *stopwatch.Watch  // the steps' times, when asked for; nil: not recorded

	// The local store, opened by startLocal while a machine is dialled.
	local     *localstore.Store
	localDone chan error
	localErr  error
}

func (h *hook) serve(ctx context.Context) error {
	settings, err := hookproto.ReadSettings(h.in)
	if err != nil {
		return fmt.Errorf("reading settings from nix: %w", err)
	}
	h.settings = settings
	h.sw.Mark("settings")
	if buildersEmpty(settings) {
		h.log.Msg(hookproto.LvlInfo, "nix-offload: Nix's builders setting is empty (--builders '' or `builders =` in nix.conf); building locally")
		return hookproto.DeclinePermanently(h.out)
	}
	cfg, err := loadConfig("", settings.String("builders", ""), settings.String("system", nixSystem()))
	if err != nil {
		// A broken configuration must not abort every build: say why and let
		// Nix build locally.
		h.log.Msg(hookproto.LvlError, "nix-offload: "+err.Error()+"; building locally")
		return hookproto.DeclinePermanently(h.out)
	}
	h.cfg = cfg
	h.sw.Mark("config")
	if len(cfg.Machines) == 0 {
		h.log.Msg(hookproto.LvlInfo, fmt.Sprintf("nix-offload: no remote machines configured in %s; building locally", cfg.Path))
		return hookproto.DeclinePermanently(h.out)
	}

	h.broker = h.dialBroker(ctx)
	h.sw.Mark("dial")
	if h.broker != nil {
		defer h.broker.Close()
	} else if err := h.openAlone(); err != nil {
		h.log.Msg(hookproto.LvlError, "nix-offload: "+err.Error()+"; building locally")
		return hookproto.DeclinePermanently(h.out)
	}
	defer func() {
		if h.localDone != nil {
			if l, err := h.localStore(); err == nil {
				l.Close()
			}
		}
	}()

	for {
		req, err := hookproto.ReadRequest(h.in)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("reading a request from nix: %w", err)
		}
		h.drvPath = req.DrvPath
		h.sw.Set("drv", req.DrvPath)
		h.sw.Mark("request")
		done, err := h.tryBroker(ctx, req)
		if errors.Is(err, errNoBroker) {
			done, err = h.try(ctx, req)
		}
		if done || err != nil {
			return err
		}
	}
}

// try answers one request alone. done means the request was accepted and
// built (successfully or not): the process must exit.
func (h *hook) try(ctx context.Context, req *hookproto.Request) (done bool, err error) {
	if err := h.openAlone(); err != nil {
		return false, h.declineWith(req, err)
	}
	sreq := scheduler.Request{System: req.System, RequiredFeatures: req.RequiredFeatures, AmWilling: req.AmWilling}
	lease, err := h.alone.Try(ctx, sreq)
	var none *engine.NoMachineError
	switch {
	case errors.As(err, &none):
		return false, h.reply(none.Decision, req)
	case err != nil && ctx.Err() == nil:
		// As Nix's own hook: a build no machine can take now is declined,
		// with the reason, and Nix builds it or fails it at once.
		return false, h.declineWith(req, err)
	case err != nil:
		return false, err
	}
	return true, h.build(ctx, req, lease)
}

// declineWith says why nothing can offload req and declines it.
func (h *hook) declineWith(req *hookproto.Request, err error) error {
	h.log.Msg(hookproto.LvlError, fmt.Sprintf("nix-offload: cannot build '%s' remotely: %v", req.DrvPath, err))
	return hookproto.Decline(h.out)
}

// openAlone makes the placer of a hook without a broker.
func (h *hook) openAlone() error {
	if h.alone != nil {
		return nil
	}
	sl, tracker, err := engine.OpenHostState(h.cfg, func(herr error) {
		h.log.Msg(hookproto.LvlWarn, "nix-offload: "+herr.Error()+"; machine health is kept in this process only")
	})
	if err != nil {
		return err
	}
	h.alone = &engine.Alone{
		Machines: h.cfg.Machines,
		Slots:    sl,
		Health:   tracker,
		GiveUp:   h.cfg.Daemon.MachineWait,
		Connect: func(ctx context.Context, m machines.Machine) (engine.Session, func(), error) {
			h.startLocal()
			return engine.Connect(ctx, m, nil)
		},
		Warn: func(machine string, err error) {
			h.log.Msg(hookproto.LvlWarn, fmt.Sprintf("nix-offload: cannot use '%s' for '%s': %v", machine, h.drvPath, err))
		},
	}
	return nil
}

// startLocal opens the local store and starts its read session in the
// background, while a machine is dialled: both are process or network
// start-up on the critical path. localStore waits for it.
func (h *hook) startLocal() {
	if h.localDone != nil {
		return
	}
	done := make(chan error, 1)
	h.localDone = done
	go func() {
		local, err := localstore.Open(h.storeOptions())
		if err == nil {
			if err = local.Warm(); err != nil {
				local.Close()
			}
		}
		h.local = local
		done <- err
	}()
}

// localStore returns the local store once startLocal's work is done.
func (h *hook) localStore() (*localstore.Store, error) {
	h.startLocal()
	h.localErr = errors.Join(h.localErr, <-h.localDone)
	h.localDone = closedErr
	if h.localErr != nil {
		return nil, fmt.Errorf("local store: %w", h.localErr)
	}
	return h.local, nil
}

// closedErr is a finished startLocal.
var closedErr = func() chan error { c := make(chan error); close(c); return c }()

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

// build accepts a request on lease's machine and runs it to the end.
func (h *hook) build(ctx context.Context, req *hookproto.Request, lease engine.Lease) error {
	drv, err := readDerivation(req.DrvPath)
	if err != nil {
		lease.Release(err)
		// Not accepted yet: this is ours to explain, and Nix can build it.
		h.log.Msg(hookproto.LvlError, "nix-offload: "+err.Error())
		return hookproto.Decline(h.out)
	}
	if err := hookproto.Accept(h.out, lease.Machine()); err != nil {
		lease.Release(err)
		return err
	}
	h.sw.Mark("accept")
	acc, err := h.readAccepted()
	if err != nil {
		lease.Release(err)
		return err
	}
	defer acc.log.Close(2 * time.Second)
	return h.runEngine(ctx, req, drv, acc, &firstLease{lease: lease, then: h.alone})
}

// firstLease hands out the lease the hook accepted on, then asks its
// placer.
type firstLease struct {
	lease engine.Lease
	then  engine.Placer
}

func (f *firstLease) Acquire(ctx context.Context, req scheduler.Request, exclude map[string]string) (engine.Lease, error) {
	if l := f.lease; l != nil {
		f.lease = nil
		return l, nil
	}
	return f.then.Acquire(ctx, req, exclude)
}

// runEngine runs an accepted build to its end with the engine, machines
// from p, and maps the outcome to the hook's exit codes.
func (h *hook) runEngine(ctx context.Context, req *hookproto.Request, drv *derivation.Derivation, acc *accepted, p engine.Placer) error {
	local, err := h.localStore() // closed when the hook ends
	if err != nil {
		return err
	}
	local.StartRegistration() // its start-up overlaps the remote build
	opts := h.buildOptions()
	copying := &copyActivity{log: h.log}
	defer copying.stop()
	relay := hookproto.NewRelay(h.log)
	defer relay.Close()
	err = engine.Run(ctx, p, engine.Build{
		Request: scheduler.Request{System: req.System, RequiredFeatures: req.RequiredFeatures},
		Job: offload.Job{
			DrvPath:       req.DrvPath,
			Drv:           drv,
			Inputs:        acc.inputs,
			WantedOutputs: acc.wanted,
			Options:       opts,
			Substitute:    h.settings.Bool("builders-use-substitutes", false),
		},
		Local:      local,
		Log:        acc.log,
		Activities: relayActivities(relay),
		Events: engine.Events{
			Started: func(m string, n int) {
				if n > 1 {
					h.log.Msg(hookproto.LvlInfo, fmt.Sprintf("nix-offload: building '%s' on '%s'", req.DrvPath, m))
				}
			},
			Copying:  func(m string, n int, bytes uint64) { copying.start(m, n, bytes) },
			Building: func(string) { copying.stop() },
			Retrying: func(m string, err error) {
				h.log.Msg(hookproto.LvlWarn, fmt.Sprintf("nix-offload: lost '%s' while building '%s': %v; trying another machine", m, req.DrvPath, err))
			},
		},
	})
	switch {
	case err == nil:
		return nil
	case engine.TimedOut(err):
		return &exitCodeError{exitTimedOut, err}
	case engine.BuildFailed(err):
		return &exitCodeError{exitBuildFailed, err}
	}
	return err
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
	h.sw.Mark("inputs")
	return &accepted{inputs: inputs, wanted: wanted, log: hookproto.NewBuildLog(logFile, 8<<20)}, nil
}

// storeOptions are the options of the hook's local store: outputs are
// registered by writing Nix's database directly where nix-daemon's
// settings and environment allow it.
func (h *hook) storeOptions() localstore.Options {
	opt := localstore.Options{
		DBDir: localstore.DirectDBDir(func(name string) string { return h.settings.String(name, "") }, os.Getenv),
		Fallback: func(err error) {
			h.log.Msg(hookproto.LvlTalkative, fmt.Sprintf("nix-offload: outputs registered with nix-store: %v", err))
		},
	}
	if h.sw != nil {
		opt.Mark = h.sw.Mark
	}
	return opt
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

// relayActivities passes an ssh-ng machine's activities to r.
func relayActivities(r *hookproto.Relay) func(daemonproto.Message) {
	return func(m daemonproto.Message) {
		switch m.Kind {
		case daemonproto.StartActivity:
			r.Start(m.ID, m.Level, m.Type, m.Text, m.Fields)
		case daemonproto.Result:
			r.Result(m.ID, m.Type, m.Fields)
		case daemonproto.StopActivity:
			r.Stop(m.ID)
		}
	}
}

// copyActivity is the "copying paths" activity Nix shows while inputs go
// to a machine.
type copyActivity struct {
	log *hookproto.Logger
	act hookproto.ActivityID
}

func (c *copyActivity) start(machine string, paths int, bytes uint64) {
	c.stop()
	c.act, _ = c.log.Start(hookproto.ActCopyPaths, hookproto.LvlInfo,
		fmt.Sprintf("copying %d paths (%s) to '%s'", paths, machines.FormatSize(bytes), machine))
}

func (c *copyActivity) stop() {
	if c.act != 0 {
		c.log.Stop(c.act)
		c.act = 0
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
