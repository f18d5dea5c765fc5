package main

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/broker"
	"github.com/nix-offload/nix-offload/internal/health"
	"github.com/nix-offload/nix-offload/internal/localstore"
	"github.com/nix-offload/nix-offload/internal/machines"
)

// The daemon's watchdog check needs the accept loop: on a socket that
// nobody serves it fails within its bound, so systemd stops getting pings;
// served by the broker it passes. Before, the check was a func that
// returned nil.
func TestBrokerHealthyNeedsTheAcceptLoop(t *testing.T) {
	dir := t.TempDir()
	h, err := health.Open(filepath.Join(dir, "health.json"))
	if err != nil {
		t.Fatal(err)
	}
	b := broker.New(broker.Options{
		Config:    &machines.Config{},
		Health:    h,
		OpenLocal: func() (*localstore.Store, error) { return nil, errors.New("no local store in this test") },
	})
	defer b.Close()

	stuck, err := net.Listen("unix", filepath.Join(dir, "stuck.sock")) // the kernel queues, nobody accepts
	if err != nil {
		t.Fatal(err)
	}
	defer stuck.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	if err := brokerHealthy(ctx, b, stuck.Addr().String()); err == nil || !strings.Contains(err.Error(), "own socket") {
		t.Errorf("brokerHealthy on a socket nobody serves: %v, want an error about the broker's own socket", err)
	}

	ln, err := net.Listen("unix", filepath.Join(dir, "hook.sock"))
	if err != nil {
		t.Fatal(err)
	}
	srv := broker.NewServer(b, nil)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	defer func() { srv.Shutdown(context.Background()); <-served }()
	if err := brokerHealthy(context.Background(), b, ln.Addr().String()); err != nil {
		t.Errorf("brokerHealthy on the served socket: %v", err)
	}
}
