package engine

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nix-community/go-nix/pkg/derivation"

	"github.com/nix-offload/nix-offload/internal/offload"
	"github.com/nix-offload/nix-offload/internal/scheduler"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/sshconn"
	"github.com/nix-offload/nix-offload/internal/transport"
)

// A lost attempt moves; a build that failed there, a local failure, or a
// refused argument does not.
func TestRetryElsewhere(t *testing.T) {
	for _, tc := range []struct {
		name  string
		err   error
		retry bool
	}{
		{"lost", &LostError{Machine: "b1", Err: io.EOF}, true},
		{"lost, wrapped", fmt.Errorf("x: %w", &LostError{Machine: "b1", Err: io.EOF}), true},
		{"bare EOF is not typed as lost", io.EOF, false},
		{"build failed there", &offload.BuildError{DrvPath: "/nix/store/x.drv", Machine: "b1", Status: serveproto.PermanentFailure}, false},
		{"local", &LocalError{io.EOF}, false},
		{"nil", nil, false},
	} {
		if got := RetryElsewhere(tc.err); got != tc.retry {
			t.Errorf("%s: RetryElsewhere(%v) = %v, want %v", tc.name, tc.err, got, tc.retry)
		}
	}
}

// What cannot get better without a configuration change is permanent.
func TestPermanent(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want bool
	}{
		{"host key mismatch", &sshconn.HostKeyError{Name: "b1", Addr: "b1:22", Problem: sshconn.HostKeyMismatch}, true},
		{"auth refused", &sshconn.ConnectError{Name: "b1", Addr: "b1:22", Err: &sshconn.AuthError{User: "root", Err: errors.New("ssh: unable to authenticate")}}, true},
		{"unknown host name", &sshconn.ConnectError{Name: "b1", Err: &net.DNSError{Err: "no such host", Name: "b1", IsNotFound: true}}, true},
		{"dns timeout", &sshconn.ConnectError{Name: "b1", Err: &net.DNSError{Err: "timeout", Name: "b1", IsTimeout: true}}, false},
		{"no nix-store", &transport.RemoteError{Name: "b1", Err: io.EOF, Stderr: "sh: nix-store: not found", Exit: "exit status 127"}, true},
		{"nix-store failed", &transport.RemoteError{Name: "b1", Err: io.EOF, Exit: "exit status 1"}, false},
		{"refused", &sshconn.ConnectError{Name: "b1", Err: errors.New("connection refused")}, false},
		{"no greeting", &serveproto.NoGreetingError{Timeout: time.Second}, false},
	} {
		if got := Permanent(tc.err); got != tc.want {
			t.Errorf("%s: Permanent(%v) = %v, want %v", tc.name, tc.err, got, tc.want)
		}
	}
}

// fakeClock moves only when told to; Tick channels fire on Advance.
type fakeClock struct {
	mu    sync.Mutex
	now   time.Time
	ticks []chan time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Unix(1e9, 0)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Tick(time.Duration) (<-chan time.Time, func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := make(chan time.Time)
	c.ticks = append(c.ticks, ch)
	return ch, func() {}
}

// Advance moves the clock and delivers one tick to every ticker, waiting
// until each was taken.
func (c *fakeClock) Advance(d time.Duration, stop <-chan struct{}) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	now, ticks := c.now, append([]chan time.Time(nil), c.ticks...)
	c.mu.Unlock()
	for _, ch := range ticks {
		select {
		case ch <- now:
		case <-stop:
		}
	}
}

// The watchdog enforces max-silent-time LimitGrace after the machine
// should have, counting from the last output, and timeout from the start.
func TestWatchLimits(t *testing.T) {
	t.Run("silence", func(t *testing.T) {
		clock := newFakeClock()
		gate := NewGate(io.Discard, clock)
		ctx, cancel := context.WithCancelCause(context.Background())
		defer cancel(nil)
		stop := WatchLimits(ctx, cancel, serveproto.BuildOptions{MaxSilentTime: 10 * time.Second}, gate.LastOutput, clock)
		defer stop()
		clock.Advance(14*time.Second, ctx.Done())
		gate.Write([]byte("still here\n"))
		clock.Advance(14*time.Second, ctx.Done()) // 14 s since the output: within grace
		if ctx.Err() != nil {
			t.Fatalf("cancelled %v after output within max-silent-time + grace", context.Cause(ctx))
		}
		clock.Advance(2*time.Second, ctx.Done())
		<-ctx.Done()
		var le *LimitError
		if !errors.As(context.Cause(ctx), &le) || !TimedOut(le) {
			t.Fatalf("cause %v, want a LimitError", context.Cause(ctx))
		}
	})
	t.Run("timeout", func(t *testing.T) {
		clock := newFakeClock()
		gate := NewGate(io.Discard, clock)
		ctx, cancel := context.WithCancelCause(context.Background())
		defer cancel(nil)
		stop := WatchLimits(ctx, cancel, serveproto.BuildOptions{BuildTimeout: 10 * time.Second}, gate.LastOutput, clock)
		defer stop()
		for range 3 {
			gate.Write([]byte("busy\n"))
			clock.Advance(5*time.Second, ctx.Done())
		}
		if ctx.Err() != nil {
			t.Fatalf("cancelled at 15 s with timeout 10 s + 5 s grace")
		}
		clock.Advance(time.Second, ctx.Done())
		<-ctx.Done()
	})
}

// The gate keeps what the machine prints before the build command out of
// the log, and lets the build's own output through.
func TestGate(t *testing.T) {
	var log syncBuf
	g := NewGate(&log, RealClock)
	g.Write([]byte("copying path from cache\n"))
	g.Open()
	g.Write([]byte("build output\n"))
	g.Close()
	g.Write([]byte("after the end\n"))
	if got := log.String(); got != "build output\n" {
		t.Errorf("log %q, want only the build's output", got)
	}
}

type syncBuf struct {
	mu    sync.Mutex
	b     []byte
	first chan struct{} // closed at the first write
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.b = append(s.b, p...)
	s.wroteLocked()
	if s.first != closedChan {
		close(s.first)
		s.first = closedChan
	}
	return len(p), nil
}

var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

func (s *syncBuf) wroteLocked() {
	if s.first == nil {
		s.first = make(chan struct{})
	}
}

// wrote is closed once something was written.
func (s *syncBuf) wrote() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.wroteLocked()
	return s.first
}

func (s *syncBuf) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.b)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return string(s.b)
}

// fakePlacer hands out leases whose sessions fail at once, and records
// what it was asked.
type fakePlacer struct {
	machines []string
	excluded [][]string
	released []string
}

func (p *fakePlacer) Acquire(_ context.Context, _ scheduler.Request, exclude map[string]string) (Lease, error) {
	var ex []string
	for _, m := range p.machines {
		if _, ok := exclude[m]; ok {
			ex = append(ex, m)
		}
	}
	p.excluded = append(p.excluded, ex)
	for _, m := range p.machines {
		if _, ok := exclude[m]; !ok {
			return &fakeLease{p: p, m: m}, nil
		}
	}
	return nil, errors.New("no other machine can build it")
}

type fakeLease struct {
	p *fakePlacer
	m string
}

func (l *fakeLease) Machine() string  { return l.m }
func (l *fakeLease) Session() Session { return lostSession{} }
func (l *fakeLease) Release(err error) {
	l.p.released = append(l.p.released, fmt.Sprintf("%s: %v", l.m, RetryElsewhere(err)))
}

// lostSession is a machine whose stream is already gone.
type lostSession struct{}

// Conn shakes hands with a server that then goes away.
func (lostSession) Conn() *serveproto.Conn {
	client, server := net.Pipe()
	go func() {
		var hello [16]byte
		io.ReadFull(server, hello[:]) // magic and version
		binary.LittleEndian.PutUint64(hello[:8], 0x5452eecb)
		binary.LittleEndian.PutUint64(hello[8:], 0x205)
		server.Write(hello[:])
		server.Close()
	}()
	c, err := serveproto.Handshake(client, client, serveproto.Options{})
	if err != nil {
		panic(err)
	}
	return c
}
func (lostSession) SetLog(io.Writer) {}
func (lostSession) StderrIsLog()     {}
func (lostSession) Lost() error      { return errors.New("no keepalive answered") }
func (lostSession) Close()           {}

// A build lost on every machine is tried on each, the lost ones excluded,
// at most MaxMachines times, and then fails with the last loss.
func TestRunRetriesElsewhere(t *testing.T) {
	p := &fakePlacer{machines: []string{"b1", "b2", "b3", "b4"}}
	var retried []string
	err := Run(context.Background(), p, Build{
		Job: offload.Job{DrvPath: "/nix/store/x.drv", Drv: &derivation.Derivation{
			InputSources: []string{"/nix/store/00000000000000000000000000000000-src"},
		}},
		Events: Events{Retrying: func(m string, _ error) { retried = append(retried, m) }},
	})
	if !RetryElsewhere(err) {
		t.Fatalf("err %v, want the last loss", err)
	}
	if want := "(3 machines lost; giving up)"; !strings.Contains(err.Error(), want) {
		t.Errorf("err %q lacks %q", err, want)
	}
	if fmt.Sprint(retried) != "[b1 b2]" || fmt.Sprint(p.excluded) != "[[] [b1] [b1 b2]]" {
		t.Errorf("retried on %v, excluded %v", retried, p.excluded)
	}
	if fmt.Sprint(p.released) != "[b1: true b2: true b3: true]" {
		t.Errorf("released %v", p.released)
	}
}

type failingWriter struct{ n int }

func (w *failingWriter) Write(p []byte) (int, error) {
	w.n++
	return 0, io.ErrClosedPipe
}

// The log switch never fails the transport's stderr drain, forgets a target
// that fails, and writes nothing to a target after it was replaced.
func TestLogSwitch(t *testing.T) {
	var l LogSwitch
	if n, err := l.Write([]byte("nowhere")); n != 7 || err != nil {
		t.Errorf("Write without a target = %d, %v", n, err)
	}
	var a, b bytes.Buffer
	l.Set(&a)
	l.Write([]byte("one"))
	l.Set(&b)
	l.Write([]byte("two"))
	l.Set(nil)
	l.Write([]byte("three"))
	if a.String() != "one" || b.String() != "two" {
		t.Errorf("targets got %q and %q", a.String(), b.String())
	}

	fw := &failingWriter{}
	l.Set(fw)
	for range 3 {
		if n, err := l.Write([]byte("x")); n != 1 || err != nil {
			t.Errorf("Write to a failing target = %d, %v", n, err)
		}
	}
	if fw.n != 1 {
		t.Errorf("failing target written %d times, want once", fw.n)
	}

	// Switching while the drain writes: once set returns, the old target
	// is never written again.
	var old, next syncBuf
	l.Set(&old)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
				l.Write([]byte("x"))
			}
		}
	}()
	<-old.wrote()
	l.Set(&next)
	n := old.Len()
	<-next.wrote()
	close(stop)
	wg.Wait()
	if old.Len() != n || next.Len() == 0 {
		t.Errorf("old target grew from %d to %d bytes after the switch; new target has %d", n, old.Len(), next.Len())
	}
}
