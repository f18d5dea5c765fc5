package pool

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nix-community/go-nix/pkg/nixbase32"
	"go.uber.org/goleak"

	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/sshconn"
	"github.com/nix-offload/nix-offload/internal/testbed"
	"github.com/nix-offload/nix-offload/internal/transport"
)

// The integration tests run the pool against builder hosts of the test bed:
// a real sshd and a real nix-store --serve on a loopback address.

// bed is a builder and a pool on it whose connection attempts are counted.
type bed struct {
	b     *testbed.Builder
	p     *Pool
	dials atomic.Int64
}

func startBed(t *testing.T, nix testbed.Nix, opt Options) *bed {
	t.Helper()
	e := &bed{b: testbed.StartBuilder(t, nix)}
	opt.Machine = machines.Machine{Host: e.b.Addr, Port: e.b.Port, User: e.b.User, SSHKey: e.b.ClientKey,
		HostKey: e.b.HostKey, Systems: []string{testbed.System(t)}, ParallelBuilds: opt.Machine.ParallelBuilds}
	opt.Dial = func(ctx context.Context, t sshconn.Target) (*sshconn.Client, error) {
		e.dials.Add(1)
		return sshconn.Dial(ctx, t)
	}
	e.p = New(opt)
	t.Cleanup(e.p.Close) // before the builder stops
	return e
}

func get(t *testing.T, p *Pool) *Session {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := p.Get(ctx)
	if err != nil {
		t.Fatalf("Get: %v", err)
	}
	return s
}

// query makes one protocol round trip on s that locks a path, as a build's
// first step does.
func query(s *Session) error {
	_, err := s.Conn().QueryValidPaths([]string{"/nix/store/" + randomHash() + "-absent"}, true, false)
	return err
}

func randomHash() string {
	b := make([]byte, 20)
	rand.Read(b)
	return nixbase32.EncodeToString(b)
}

// derivation is a build of script with /bin/sh; the output path is any
// well-formed one (serve servers do not recompute it).
func derivation(t *testing.T, name, script string) (string, serveproto.BasicDerivation, serveproto.BuildOptions) {
	out := "/nix/store/" + randomHash() + "-" + name
	system := testbed.System(t)
	return "/nix/store/" + randomHash() + "-" + name + ".drv", serveproto.BasicDerivation{
		Outputs:  map[string]serveproto.DerivationOutput{"out": {Path: out}},
		Platform: system,
		Builder:  "/bin/sh",
		Args:     []string{"-c", script},
		Env:      map[string]string{"out": out, "name": name, "system": system, "builder": "/bin/sh"},
	}, serveproto.BuildOptions{MaxSilentTime: time.Hour}
}

func build(t *testing.T, s *Session, name, script string) {
	t.Helper()
	drvPath, drv, opts := derivation(t, name, script)
	s.StderrIsLog()
	res, err := s.Conn().BuildDerivation(drvPath, drv, opts)
	if err != nil {
		t.Fatalf("BuildDerivation: %v", err)
	}
	if !res.Status.Success() {
		t.Fatalf("build %s: %v %s", name, res.Status, res.ErrorMsg)
	}
}

// serveProcesses returns the pids of the host's nix-store --serve processes.
func serveProcesses(b *testbed.Builder) []int {
	var out []int
	for _, pid := range b.Processes() {
		cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err == nil && strings.Contains(string(cmdline), "nix-store\x00--serve") {
			out = append(out, pid)
		}
	}
	return out
}

// A session that is Put comes back from the next Get: no new connection,
// no new remote process. On every Nix of the test bed.
func TestIntegrationReuse(t *testing.T) {
	for _, nix := range testbed.All(t) {
		t.Run(nix.Series(), func(t *testing.T) {
			e := startBed(t, nix, Options{Idle: -1})
			start := time.Now()
			s1 := get(t, e.p)
			cold := time.Since(start)
			if err := query(s1); err != nil {
				t.Fatal(err)
			}
			e.p.Put(s1, true)
			start = time.Now()
			s2 := get(t, e.p)
			warm := time.Since(start)
			if s2 != s1 {
				t.Fatal("the second Get started a new session")
			}
			if err := query(s2); err != nil {
				t.Fatal(err)
			}
			e.p.Put(s2, true)
			st := e.p.Stats()
			if e.dials.Load() != 1 || st.Dials != 1 || st.Started != 1 || st.Reused != 1 || st.Idle != 1 || st.Conns != 1 || st.InUse != 0 {
				t.Errorf("%d dials, stats %+v", e.dials.Load(), st)
			}
			if got := s2.Name(); got != e.p.opt.Machine.Name() {
				t.Errorf("Name() = %q", got)
			}
			t.Logf("cold Get %v, warm Get %v", cold.Round(time.Millisecond), warm.Round(time.Microsecond))
		})
	}
}

// Twenty Gets at once with 8 sessions per connection open exactly 3
// connections and 20 working sessions; the 21st Get waits for a Put.
func TestIntegrationConcurrentGets(t *testing.T) {
	e := startBed(t, testbed.Lookup(t, "2.34"), Options{MaxSessions: 20, SessionsPerConn: 8, Idle: -1})
	start := time.Now()
	sessions := make([]*Session, 20)
	errs := make([]error, 20)
	var wg sync.WaitGroup
	for i := range sessions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := e.p.Get(context.Background())
			if err == nil {
				err = query(s)
			}
			sessions[i], errs[i] = s, err
		}()
	}
	wg.Wait()
	t.Logf("20 sessions from cold in %v", time.Since(start).Round(time.Millisecond))
	seen := map[*Session]bool{}
	for i, s := range sessions {
		if errs[i] != nil {
			t.Fatalf("session %d: %v", i, errs[i])
		}
		seen[s] = true
	}
	if len(seen) != 20 {
		t.Errorf("%d distinct sessions, want 20", len(seen))
	}
	st := e.p.Stats()
	if e.dials.Load() != 3 || st.Conns != 3 || st.InUse != 20 || st.Started != 20 {
		t.Errorf("%d dials, stats %+v; want 3 connections and 20 sessions in use", e.dials.Load(), st)
	}
	if n := len(serveProcesses(e.b)); n != 20 {
		t.Errorf("%d nix-store --serve processes on the host, want 20", n)
	}

	// The 21st waits.
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	s, err := e.p.Get(ctx)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("21st Get = %v, %v; want it to block until its context ends", s, err)
	}
	got := make(chan *Session, 1)
	go func() {
		s, err := e.p.Get(context.Background())
		if err != nil {
			t.Error(err)
		}
		got <- s
	}()
	select {
	case s := <-got:
		t.Fatalf("21st Get returned %p while 20 sessions are in use", s)
	case <-time.After(200 * time.Millisecond):
	}
	e.p.Put(sessions[7], true)
	select {
	case s := <-got:
		if s != sessions[7] {
			t.Error("the 21st Get did not get the session that was Put")
		}
		sessions[7] = s
	case <-time.After(10 * time.Second):
		t.Fatal("the 21st Get still waits 10 s after a Put")
	}
	for _, s := range sessions {
		e.p.Put(s, true)
	}
	if st := e.p.Stats(); st.Idle != 20 || st.InUse != 0 || e.dials.Load() != 3 {
		t.Errorf("after Put: stats %+v", st)
	}
}

// sshd refuses channels beyond its MaxSessions (64 on the test bed) and
// keeps serving the connection; the pool then puts the sessions on another
// connection instead of failing them.
func TestIntegrationSSHDRefusesExtraChannels(t *testing.T) {
	e := startBed(t, testbed.Lookup(t, "2.34"), Options{MaxSessions: 66, SessionsPerConn: 100, Idle: -1})
	sessions := make([]*Session, 66)
	errs := make([]error, 66)
	var wg sync.WaitGroup
	for i := range sessions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := e.p.Get(context.Background())
			if err == nil {
				err = query(s)
			}
			sessions[i], errs[i] = s, err
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("session %d: %v", i, err)
		}
	}
	if st := e.p.Stats(); e.dials.Load() != 2 || st.Conns != 2 || st.InUse != 66 {
		t.Errorf("%d dials, stats %+v; want 2 connections", e.dials.Load(), st)
	}
	for _, s := range sessions {
		e.p.Put(s, true)
	}
}

// A machine that dies takes its idle sessions with it; the pool forgets
// them and the next Get fails at once with the connection error. When the
// machine is back, Get works again.
func TestIntegrationKilledBuilder(t *testing.T) {
	e := startBed(t, testbed.Lookup(t, "2.34"), Options{Machine: machines.Machine{ParallelBuilds: 2}, Idle: 2})
	if err := e.p.Warm(context.Background()); err != nil {
		t.Fatal(err)
	}
	if st := e.p.Stats(); st.Idle != 2 || st.Conns != 1 {
		t.Fatalf("after Warm: %+v", st)
	}
	e.b.Kill()
	testbed.WaitFor(t, 20*time.Second, "the pool to see the machine die", func() bool {
		st := e.p.Stats()
		return st.Idle == 0 && st.Conns == 0
	})
	if st := e.p.Stats(); st.Dropped != 2 || e.dials.Load() != 1 {
		t.Errorf("%d dials, stats %+v; want 2 dropped sessions and no connection attempt before a Get", e.dials.Load(), st)
	}
	start := time.Now()
	s, err := e.p.Get(context.Background())
	var ce *sshconn.ConnectError
	if !errors.As(err, &ce) {
		t.Fatalf("Get on a dead machine = %v, %v; want a *sshconn.ConnectError", s, err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Get took %v to fail", d)
	}
	t.Logf("Get on the dead machine: %v after %v", err, time.Since(start).Round(time.Millisecond))
	if st := e.p.Stats(); st.LastError != err || st.DialFailures != 1 {
		t.Errorf("stats %+v", st)
	}

	e.b.Restart(t)
	s = get(t, e.p)
	if err := query(s); err != nil {
		t.Fatal(err)
	}
	e.p.Put(s, true)
	if n := e.dials.Load(); n != 3 {
		t.Errorf("%d connection attempts, want 3 (first, failed, after restart)", n)
	}
}

// Closing the pool cancels a build running on one of its sessions: the
// session ends, the build returns an error, the remote build stops, and no
// goroutine of the pool is left.
func TestIntegrationCloseCancelsBuild(t *testing.T) {
	nix := testbed.Lookup(t, "2.34")
	e := startBed(t, nix, Options{Machine: machines.Machine{ParallelBuilds: 3}, Idle: 2})
	ignore := goleak.IgnoreCurrent()
	s := get(t, e.p)
	var log lockedBuffer
	s.SetLog(&log)
	drvPath, drv, opts := derivation(t, "sleeper", `echo started; /bin/sleep 300; echo never > $out`)
	done := make(chan error, 1)
	go func() {
		s.StderrIsLog()
		_, err := s.Conn().BuildDerivation(drvPath, drv, opts)
		done <- err
	}()
	testbed.WaitFor(t, 30*time.Second, "the build to start", func() bool { return strings.Contains(log.String(), "started") })
	testbed.WaitFor(t, 30*time.Second, "the idle sessions", func() bool { return e.p.Stats().Idle == 2 })

	closed := time.Now()
	e.p.Close()
	t.Logf("Close took %v", time.Since(closed).Round(time.Millisecond))
	select {
	case <-s.Done():
	default:
		t.Fatal("session still running after Close")
	}
	if err := <-done; err == nil {
		t.Fatal("the build returned no error after Close")
	}
	testbed.WaitFor(t, 20*time.Second, "the remote build to stop", func() bool {
		for _, pid := range e.b.Processes() {
			if cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); strings.Contains(string(cmdline), "sleep") {
				return false
			}
		}
		return len(serveProcesses(e.b)) == 0
	})
	e.p.Put(s, true) // after Close: harmless
	goleak.VerifyNone(t, ignore)
}

// Each build's log goes to the writer set for it, and an error explained on
// a reused session never quotes what an earlier build printed.
func TestIntegrationLogPerBuild(t *testing.T) {
	e := startBed(t, testbed.Lookup(t, "2.34"), Options{Idle: -1})
	first, second := "first-"+randomHash(), "second-"+randomHash()

	var log1, log2 lockedBuffer
	s := get(t, e.p)
	s.SetLog(&log1)
	build(t, s, "one", "echo error: "+first+" >&2; echo ok > $out")
	atReply := strings.Contains(log1.String(), first)
	testbed.WaitFor(t, 10*time.Second, "the first build's log", func() bool { return strings.Contains(log1.String(), first) })
	e.p.Put(s, true)

	s2 := get(t, e.p)
	if s2 != s {
		t.Fatal("the second Get did not reuse the session")
	}
	s2.SetLog(&log2)
	build(t, s2, "two", "echo "+second+" >&2; echo ok > $out")
	atReply = atReply && strings.Contains(log2.String(), second)
	testbed.WaitFor(t, 10*time.Second, "the second build's log", func() bool { return strings.Contains(log2.String(), second) })
	if strings.Contains(log1.String(), second) || strings.Contains(log2.String(), first) {
		t.Errorf("logs mixed up:\nfirst build's:\n%s\nsecond build's:\n%s", log1.String(), log2.String())
	}
	t.Logf("logs complete when the build replied: %v", atReply)
	e.p.Put(s2, true)

	// The remote process dies without a word: the explanation has only
	// the exit, not the first build's "error:" line.
	s3 := get(t, e.p)
	if s3 != s {
		t.Fatal("the third Get did not reuse the session")
	}
	pids := serveProcesses(e.b)
	if len(pids) != 1 {
		t.Fatalf("%d serve processes on the host, want 1", len(pids))
	}
	if err := syscall.Kill(pids[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-s3.Done()
	err := query(s3)
	var re *transport.RemoteError
	if !errors.As(err, &re) {
		t.Fatalf("query on a killed session: %v, want a *transport.RemoteError", err)
	}
	if strings.Contains(err.Error(), first) || re.Exit != "signal KILL" {
		t.Errorf("explanation %q (exit %q) quotes an earlier build or lacks the exit", err, re.Exit)
	}
	t.Logf("explained: %v", err)
	e.p.Put(s3, true) // dead: not kept
	if st := e.p.Stats(); st.Idle != 0 || st.InUse != 0 {
		t.Errorf("a dead session was kept: %+v", st)
	}
}

// Sessions are retired after MaxUses builds and when MaxAge old, so that
// the temporary GC roots they hold on the machine do not live forever.
func TestIntegrationRetire(t *testing.T) {
	e := startBed(t, testbed.Lookup(t, "2.34"), Options{Idle: -1, MaxUses: 2, MaxAge: time.Hour})
	s1 := get(t, e.p)
	e.p.Put(s1, true)
	if s := get(t, e.p); s != s1 {
		t.Fatal("second Get did not reuse the session")
	}
	e.p.Put(s1, true) // second use: retired
	testbed.WaitFor(t, 10*time.Second, "the retired session to end", func() bool { return closed(s1.Done()) })
	s2 := get(t, e.p)
	if s2 == s1 {
		t.Fatal("a session was used beyond MaxUses")
	}
	e.p.Put(s2, true)
	if st := e.p.Stats(); st.Retired != 1 || st.Started != 2 || e.dials.Load() != 1 {
		t.Errorf("stats %+v", st)
	}

	f := startBed(t, testbed.Lookup(t, "2.34"), Options{Idle: -1, MaxAge: time.Minute})
	// The pool's clock runs an offset ahead of the real one, moved by the test, so that
	// neither a slow machine nor a sleep decides the sessions' ages.
	var ahead atomic.Int64
	f.p.now = func() time.Time { return time.Now().Add(time.Duration(ahead.Load())) }
	s3 := get(t, f.p)
	f.p.Put(s3, true)
	ahead.Store(int64(2 * time.Minute))
	s4 := get(t, f.p)
	if s4 == s3 {
		t.Fatal("a session older than MaxAge was handed out")
	}
	if err := query(s4); err != nil {
		t.Fatal(err)
	}
	f.p.Put(s4, true)
	if st := f.p.Stats(); st.Retired != 1 || f.dials.Load() != 1 {
		t.Errorf("stats %+v", st)
	}
}

// After a Get the pool starts sessions in the background until Idle are
// ready again, on the connection it has, but no more than the machine's
// builds not holding a session could use: one for each slot left.
func TestIntegrationRefill(t *testing.T) {
	e := startBed(t, testbed.Lookup(t, "2.34"), Options{Machine: machines.Machine{ParallelBuilds: 3}, Idle: 2, MaxSessions: 5})
	if err := e.p.Warm(context.Background()); err != nil {
		t.Fatal(err)
	}
	s := get(t, e.p) // 2 slots left: a second session starts
	testbed.WaitFor(t, 20*time.Second, "two idle sessions again", func() bool { return e.p.Stats().Idle == 2 })
	s2 := get(t, e.p) // 1 slot left, and 1 session for it: nothing starts
	if st := e.p.Stats(); st.Started != 3 || st.Starting != 0 || st.Idle != 1 {
		t.Errorf("with 2 of 3 slots in use: stats %+v, want 3 started, 1 idle and none starting", st)
	}
	for _, s := range []*Session{s, s2} {
		if err := query(s); err != nil {
			t.Fatal(err)
		}
		e.p.Put(s, true)
	}
	if st := e.p.Stats(); st.Started != 3 || st.Idle != 3 || e.dials.Load() != 1 {
		t.Errorf("stats %+v", st)
	}
}

// Surplus idle sessions and connections left empty are closed once unused
// for a while.
func TestIntegrationTrim(t *testing.T) {
	e := startBed(t, testbed.Lookup(t, "2.34"), Options{Idle: 1, MaxSessions: 4})
	e.p.tick, e.p.trim = 20*time.Millisecond, 200*time.Millisecond
	var held []*Session
	for range 4 {
		held = append(held, get(t, e.p))
	}
	for _, s := range held {
		e.p.Put(s, true)
	}
	testbed.WaitFor(t, 10*time.Second, "surplus idle sessions to go", func() bool { return e.p.Stats().Idle == 1 })
	if st := e.p.Stats(); st.Retired != 3 || st.Conns != 1 {
		t.Errorf("stats %+v", st)
	}
}
