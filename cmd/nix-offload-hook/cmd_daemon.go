package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/nix-offload/nix-offload/internal/broker"
	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/health"
	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/metrics"
	"github.com/nix-offload/nix-offload/internal/service"
	"github.com/nix-offload/nix-offload/internal/slots"
)

// runDaemon runs the broker until SIGTERM or SIGINT (ctx ends).
func runDaemon(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("daemon", flag.ContinueOnError)
	config := fs.String("config", "", "configuration file (TOML)")
	builders := fs.String("builders", defaultBuilders, "Nix machines specification, used when there is no TOML configuration")
	socket := fs.String("socket", "", "unix socket to listen on (default: [daemon] socket, else "+brokerapi.DefaultSocket+")")
	drain := fs.Duration("drain", 4*time.Minute, "on SIGTERM, how long running builds may go on before they are cancelled")
	debug := fs.Bool("debug", false, "log debug messages")
	if err := parseFlags(fs, args, stdout, "daemon [flags]"); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageError{fmt.Sprintf("daemon: unexpected arguments %q\n\n%s", fs.Args(), usage)}
	}

	level := zapcore.InfoLevel
	if *debug {
		level = zapcore.DebugLevel
	}
	log := service.NewLogger(zapcore.Lock(zapcore.AddSync(stderr)), level, service.UnderJournal())
	defer log.Sync()

	cfg, err := loadConfig(*config, *builders, nixSystem())
	if err != nil {
		return err
	}
	for _, w := range keyWarnings(cfg.Machines) {
		log.Warn(w)
	}
	*socket = brokerSocket(*socket, cfg)
	stateDir := cfg.Daemon.StateDir
	if stateDir == "" {
		stateDir = machines.DefaultStateDir
	}
	hl, err := health.Open(filepath.Join(stateDir, "health.json"))
	if err != nil {
		// A health file we cannot read must not stop builds: the tracker
		// starts empty.
		log.Warn("machine health", zap.Error(err))
	}
	if hl == nil {
		return fmt.Errorf("machine health: %w", err)
	}

	ln, activated, err := service.Listen(*socket)
	if err != nil {
		return err
	}
	defer ln.Close()

	var reg *metrics.Registry
	if cfg.Daemon.Metrics != "" {
		reg = metrics.NewRegistry()
	}
	sl, err := slots.Open(filepath.Join(stateDir, "slots"))
	if err != nil {
		// A full or read-only state directory must not stop builds: the
		// broker counts its slots in memory, the one ledger that works.
		log.Warn("slot files cannot be used; counting slots in memory", zap.Error(err))
		sl = nil
	}
	b := broker.New(broker.Options{Config: cfg, Health: hl, Slots: sl, Metrics: reg, Log: log, Version: version()})
	defer b.Close()
	srv := broker.NewServer(b, service.PeerUID)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	if reg != nil {
		mln, err := net.Listen("tcp", cfg.Daemon.Metrics)
		if err != nil {
			return fmt.Errorf("metrics: %w", err)
		}
		ms := broker.NewMetricsServer(reg.Handler())
		go ms.Serve(mln)
		defer ms.Close()
		log.Info("metrics", zap.String("address", mln.Addr().String()))
	}

	n := service.NewNotifier(log)
	n.Ready(fmt.Sprintf("%d machines", len(cfg.Machines)))
	wctx, stopWatchdog := context.WithCancel(ctx)
	defer stopWatchdog()
	go n.Watchdog(wctx, func() error { return brokerHealthy(wctx, b, ln.Addr().String()) })
	log.Info("broker ready", zap.String("socket", ln.Addr().String()), zap.Bool("socket_activated", activated),
		zap.Int("machines", len(cfg.Machines)), zap.String("config", cfg.Path), zap.String("version", version()))

	select {
	case err := <-served:
		return fmt.Errorf("serving %s: %w", *socket, err)
	case <-ctx.Done():
	}
	n.Stopping()
	log.Info("stopping: queued builds go back to their hooks; running builds may finish", zap.Duration("drain", *drain))
	dctx, cancel := context.WithTimeout(context.Background(), *drain)
	defer cancel()
	srv.Shutdown(dctx)
	if err := <-served; err != nil && !errors.Is(err, net.ErrClosed) {
		log.Warn("serve", zap.Error(err))
	}
	log.Info("stopped")
	return nil
}

// brokerHealthy is the watchdog's check: the dispatcher goes round, and a
// status request on the broker's own socket is accepted and answered in
// time, which needs the accept loop, a handler and the broker's lock.
func brokerHealthy(ctx context.Context, b *broker.Broker, socket string) error {
	if err := b.Healthy(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	c, err := brokerapi.Dial(ctx, socket)
	if err != nil {
		return fmt.Errorf("own socket: %w", err)
	}
	defer c.Close()
	if _, err := c.Status(ctx); err != nil {
		return fmt.Errorf("own socket: status: %w", err)
	}
	return nil
}
