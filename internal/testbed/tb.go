package testbed

import (
	"fmt"
	"os"
	"sync"
)

// TB is the part of testing.TB the test bed uses. *testing.T and
// *testing.B satisfy it; [Program] is an implementation for commands (the
// demo, the benchmark script) that run test bed hosts outside `go test`.
type TB interface {
	Helper()
	Cleanup(func())
	Errorf(format string, args ...any)
	Fatalf(format string, args ...any)
	Logf(format string, args ...any)
	Skipf(format string, args ...any)
	TempDir() string
}

// Program is a TB for a main function: Fatalf and Skipf print the message,
// run the cleanups (stopping every host) and exit 1; Close runs the cleanups.
// Call Close before returning from main.
type Program struct {
	mu       sync.Mutex
	cleanups []func()
	failed   bool
}

var _ TB = (*Program)(nil)

func (p *Program) Helper() {}

func (p *Program) Cleanup(f func()) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cleanups = append(p.cleanups, f)
}

func (p *Program) Errorf(format string, args ...any) {
	p.mu.Lock()
	p.failed = true
	p.mu.Unlock()
	fmt.Fprintf(os.Stderr, "error: "+format+"\n", args...)
}

func (p *Program) Fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "error: "+format+"\n", args...)
	p.Close()
	os.Exit(1)
}

func (p *Program) Logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
}

func (p *Program) Skipf(format string, args ...any) { p.Fatalf(format, args...) }

// TempDir makes a directory that Close removes.
func (p *Program) TempDir() string {
	dir, err := os.MkdirTemp("", "nix-offload-testbed-")
	if err != nil {
		p.Fatalf("%v", err)
	}
	p.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// Failed reports whether Errorf was called.
func (p *Program) Failed() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.failed
}

// Close runs the cleanups in reverse order, once.
func (p *Program) Close() {
	p.mu.Lock()
	cs := p.cleanups
	p.cleanups = nil
	p.mu.Unlock()
	for i := len(cs) - 1; i >= 0; i-- {
		cs[i]()
	}
}
