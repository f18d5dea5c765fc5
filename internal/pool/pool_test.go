package pool

import (
	"bytes"
	"context"
	"errors"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/sshconn"
	"github.com/nix-offload/nix-offload/internal/testbed"
)

// The unit tests need no machine: a connection attempt that fails (or never
// ends) is all the pool sees of one, which is enough for its bounds on
// dialling, how Gets wait and fail, and Close. Sessions on real machines are
// in integration_test.go.

// fakeDialer fails every connection attempt once released, or ends it with
// the context.
type fakeDialer struct {
	release chan struct{}
	err     error

	mu          sync.Mutex
	calls       int
	inFlight    int
	maxInFlight int
}

func newFakeDialer() *fakeDialer {
	return &fakeDialer{release: make(chan struct{}), err: &sshconn.ConnectError{Name: "b", Addr: "127.0.0.9:22", Err: errors.New("connection refused")}}
}

func (f *fakeDialer) dial(ctx context.Context, _ sshconn.Target) (*sshconn.Client, error) {
	f.mu.Lock()
	f.calls++
	f.inFlight++
	f.maxInFlight = max(f.maxInFlight, f.inFlight)
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		f.inFlight--
		f.mu.Unlock()
	}()
	select {
	case <-f.release:
		return nil, f.err
	case <-ctx.Done():
		return nil, &sshconn.ConnectError{Name: "b", Addr: "127.0.0.9:22", Err: ctx.Err()}
	}
}

func (f *fakeDialer) counts() (calls, inFlight, maxInFlight int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls, f.inFlight, f.maxInFlight
}

var testMachine = machines.Machine{Host: "127.0.0.9", Port: 22, User: "root", Systems: []string{"x86_64-linux"}}

// blockedIn counts the goroutines blocked on a channel receive in fn.
func blockedIn(fn string) int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	count := 0
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "[chan receive") && strings.Contains(g, fn+"(") {
			count++
		}
	}
	return count
}

// Fifty Gets on a machine that cannot be reached make two connection
// attempts, not fifty, and every one of those Gets fails with the
// attempt's error; a later Get tries again.
func TestFailedDialFailsTheGetsWaitingForIt(t *testing.T) {
	f := newFakeDialer()
	var mu sync.Mutex
	var reported []error
	p := New(Options{Machine: testMachine, MaxSessions: 20, SessionsPerConn: 8, Idle: -1, Dial: f.dial,
		OnDial: func(err error) {
			mu.Lock()
			reported = append(reported, err)
			mu.Unlock()
		}})
	defer p.Close()

	errs := make(chan error, 50)
	for range 50 {
		go func() {
			s, err := p.Get(context.Background())
			if s != nil {
				p.Put(s, false)
			}
			errs <- err
		}()
	}
	testbed.WaitFor(t, 10*time.Second, "20 sessions starting", func() bool { return p.Stats().Starting == 20 })
	// Every start decides under the pool's lock whether to dial, and then
	// waits on a channel in reserve: once all 20 wait there, no attempt
	// can be added until one ends.
	testbed.WaitFor(t, 10*time.Second, "the 20 starts waiting for connection attempts", func() bool {
		return blockedIn("pool.(*Pool).reserve") == 20
	})
	p.mu.Lock()
	dials := len(p.dials)
	p.mu.Unlock()
	if dials != 2 {
		t.Fatalf("%d connection attempts in flight for 20 starting sessions, want 2", dials)
	}
	close(f.release)
	for range 50 {
		select {
		case err := <-errs:
			if err != f.err {
				t.Errorf("Get: %v, want the dial error %v", err, f.err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("a Get still waits 10 s after the connection attempts failed")
		}
	}
	calls, _, maxInFlight := f.counts()
	if calls != 2 || maxInFlight != 2 {
		t.Errorf("%d connection attempts, %d at once; want 2, 2", calls, maxInFlight)
	}
	st := p.Stats()
	if st.Dials != 2 || st.DialFailures != 2 || st.LastError != f.err || st.Starting != 0 || st.InUse != 0 || st.Conns != 0 {
		t.Errorf("stats %+v", st)
	}
	mu.Lock()
	if len(reported) != 2 || reported[0] != f.err || reported[1] != f.err {
		t.Errorf("OnDial got %v", reported)
	}
	mu.Unlock()

	// No backoff inside the pool: a later Get dials again.
	if _, err := p.Get(context.Background()); err != f.err {
		t.Errorf("later Get: %v", err)
	}
	if calls, _, _ := f.counts(); calls != 3 {
		t.Errorf("later Get made %d attempts in all, want 3", calls)
	}
}

// A Get gives up when its context ends; the connection attempt it started
// goes on for the pool, and Close ends it.
func TestGetHonoursItsContext(t *testing.T) {
	f := newFakeDialer()
	dialed := 0
	p := New(Options{Machine: testMachine, Idle: -1, Dial: f.dial, OnDial: func(error) { dialed++ }})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	s, err := p.Get(ctx)
	if s != nil || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Get = %v, %v; want the context's error", s, err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Get returned %v after its context ended", d)
	}
	if st := p.Stats(); st.Starting != 1 {
		t.Errorf("stats %+v: the start should go on", st)
	}
	p.Close()
	if _, inFlight, _ := f.counts(); inFlight != 0 {
		t.Error("Close returned with a connection attempt under way")
	}
	if dialed != 0 {
		t.Error("OnDial reported an attempt that Close cut short")
	}
	if _, err := p.Get(context.Background()); err != ErrClosed {
		t.Errorf("Get after Close: %v", err)
	}
	if err := p.Warm(context.Background()); err != ErrClosed {
		t.Errorf("Warm after Close: %v", err)
	}
}

func TestCloseFailsWaitingGets(t *testing.T) {
	f := newFakeDialer()
	p := New(Options{Machine: testMachine, Idle: -1, Dial: f.dial})
	errs := make(chan error, 3)
	for range 3 {
		go func() {
			_, err := p.Get(context.Background())
			errs <- err
		}()
	}
	testbed.WaitFor(t, 10*time.Second, "sessions starting", func() bool { return p.Stats().Starting == 3 })
	p.Close()
	for range 3 {
		if err := <-errs; err != ErrClosed {
			t.Errorf("Get: %v, want ErrClosed", err)
		}
	}
	p.Close() // again: nothing happens
}

// Warm starts Idle sessions over one connection attempt and reports its
// failure; with Idle off it does nothing.
func TestWarm(t *testing.T) {
	f := newFakeDialer()
	close(f.release)
	m := testMachine
	m.ParallelBuilds = 3
	p := New(Options{Machine: m, Idle: 3, Dial: f.dial})
	defer p.Close()
	if err := p.Warm(context.Background()); err != f.err {
		t.Errorf("Warm: %v, want the dial error", err)
	}
	if calls, _, _ := f.counts(); calls != 1 {
		t.Errorf("%d connection attempts for 3 sessions, want 1", calls)
	}

	q := New(Options{Machine: testMachine, Idle: -1, Dial: f.dial})
	defer q.Close()
	if err := q.Warm(context.Background()); err != nil {
		t.Errorf("Warm without idle sessions: %v", err)
	}
	if calls, _, _ := f.counts(); calls != 1 {
		t.Error("Warm without idle sessions dialled")
	}
}

func TestDefaults(t *testing.T) {
	for _, c := range []struct {
		jobs, idle, maxSessions int
		wantMax, wantIdle       int
	}{
		{jobs: 0, wantMax: 3, wantIdle: 1},
		{jobs: 3, wantMax: 5, wantIdle: 3},
		{jobs: 16, wantMax: 18, wantIdle: 4},
		{jobs: 16, idle: -1, wantMax: 18, wantIdle: 0},
		{jobs: 2, idle: 10, wantMax: 4, wantIdle: 4},
		{jobs: 2, maxSessions: 40, idle: 10, wantMax: 40, wantIdle: 10},
	} {
		m := testMachine
		m.ParallelBuilds = c.jobs
		o := Options{Machine: m, Idle: c.idle, MaxSessions: c.maxSessions}.withDefaults()
		if o.MaxSessions != c.wantMax || o.Idle != c.wantIdle || o.SessionsPerConn != 8 || o.MaxUses != 50 || o.MaxAge != 10*time.Minute || o.Dial == nil {
			t.Errorf("%d parallel builds, Idle %d, MaxSessions %d: got MaxSessions %d, Idle %d, SessionsPerConn %d, MaxUses %d, MaxAge %v",
				c.jobs, c.idle, c.maxSessions, o.MaxSessions, o.Idle, o.SessionsPerConn, o.MaxUses, o.MaxAge)
		}
	}
}

type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func (b *lockedBuffer) Len() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Len()
}

func TestLocked(t *testing.T) {
	var s Session
	if locked, rest := s.Locked([]string{"/nix/store/a", "/nix/store/b"}); locked != nil || !slices.Equal(rest, []string{"/nix/store/a", "/nix/store/b"}) {
		t.Errorf("fresh session: locked %q, rest %q", locked, rest)
	}
	s.MarkLocked([]string{"/nix/store/b", "/nix/store/c"})
	locked, rest := s.Locked([]string{"/nix/store/c", "/nix/store/a", "/nix/store/b", "/nix/store/d"})
	if !slices.Equal(locked, []string{"/nix/store/c", "/nix/store/b"}) || !slices.Equal(rest, []string{"/nix/store/a", "/nix/store/d"}) {
		t.Errorf("locked %q, rest %q", locked, rest)
	}
}
