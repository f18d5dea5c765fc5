package health

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"
)

// clock is a settable time source for Tracker.now.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)} }

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) advance(d time.Duration) time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
	return c.t
}

// open opens a Tracker at path ("" for memory only) with clk and a fixed jitter, and fails the
// test on any error.
func open(t *testing.T, path string, clk *clock, jitter time.Duration) *Tracker {
	t.Helper()
	tr, err := Open(path)
	if err != nil {
		t.Fatalf("Open(%q): %v", path, err)
	}
	tr.now = clk.now
	tr.jitter = func() time.Duration { return jitter }
	return tr
}

func mustFail(t *testing.T, tr *Tracker, machine string, err error) State {
	t.Helper()
	s, ferr := tr.Failed(machine, err)
	if ferr != nil {
		t.Fatalf("Failed(%s): %v", machine, ferr)
	}
	return s
}

var errRefused = errors.New("dial tcp 10.0.0.1:22: connect: connection refused")

func TestBackoffIsHydras(t *testing.T) {
	want := []time.Duration{60 * time.Second, 180 * time.Second, 540 * time.Second, 1620 * time.Second, 1620 * time.Second, 1620 * time.Second}
	for _, jitter := range []time.Duration{0, maxJitter - time.Nanosecond} {
		clk := newClock()
		tr := open(t, "", clk, jitter)
		for i, w := range want {
			now := clk.now()
			s := mustFail(t, tr, "b1", errRefused)
			if s.Failures != i+1 {
				t.Errorf("jitter %v: failure %d: Failures = %d", jitter, i+1, s.Failures)
			}
			if got := s.Until.Sub(now); got != w+jitter {
				t.Errorf("jitter %v: failure %d: down for %v, want %v", jitter, i+1, got, w+jitter)
			}
			if !s.LastErrorAt.Equal(now) || s.LastError != errRefused.Error() {
				t.Errorf("jitter %v: failure %d: last error %q at %v", jitter, i+1, s.LastError, s.LastErrorAt)
			}
			if got := tr.Get("b1"); got != s {
				t.Errorf("Get = %+v, Failed returned %+v", got, s)
			}
			// The next attempt comes when the backoff is over, as it would for real.
			clk.advance(s.Until.Sub(now))
		}
	}
}

func TestDefaultJitter(t *testing.T) {
	tr, err := Open("")
	if err != nil {
		t.Fatal(err)
	}
	seen := map[time.Duration]bool{}
	for range 1000 {
		j := tr.jitter()
		if j < 0 || j >= maxJitter {
			t.Fatalf("jitter %v, want within [0, 30s)", j)
		}
		seen[j] = true
	}
	if len(seen) < 900 {
		t.Errorf("1000 jitters gave %d distinct values; want random ones", len(seen))
	}
	before := time.Now()
	s, err := tr.Failed("b1", errRefused)
	if err != nil {
		t.Fatal(err)
	}
	if s.Until.Before(before.Add(retryInterval)) || s.Until.After(time.Now().Add(retryInterval+maxJitter)) {
		t.Errorf("first failure at %v: down until %v, want 60–90 s later", before, s.Until)
	}
}

func TestFailuresWhileDownCountOnce(t *testing.T) {
	clk := newClock()
	tr := open(t, "", clk, 0)
	first := mustFail(t, tr, "b1", errRefused) // down for 60 s

	// Another build's attempt, or a probe, fails while the machine is down.
	clk.advance(retryInterval - time.Second)
	s := mustFail(t, tr, "b1", errors.New("another error"))
	if s.Failures != 1 || !s.Until.Equal(first.Until) {
		t.Errorf("failure while down: %+v; want the count and backoff of the first: %+v", s, first)
	}
	if s.LastError != "another error" || !s.LastErrorAt.Equal(clk.now()) {
		t.Errorf("failure while down: last error %q at %v; want the new one, now", s.LastError, s.LastErrorAt)
	}

	clk.advance(time.Second)
	second := mustFail(t, tr, "b1", errRefused)
	if second.Failures != 2 || second.Until.Sub(clk.now()) != 3*retryInterval {
		t.Errorf("failure once the backoff is over: %+v, want it counted", second)
	}

	// A success ends the outage: the next failure is the first again.
	if err := tr.Succeeded("b1"); err != nil {
		t.Fatal(err)
	}
	clk.advance(time.Second)
	if s := mustFail(t, tr, "b1", errRefused); s.Failures != 1 || s.Until.Sub(clk.now()) != retryInterval {
		t.Errorf("failure 1 s after a success: %+v, want the first", s)
	}
}

func TestSucceededResets(t *testing.T) {
	clk := newClock()
	tr := open(t, "", clk, 0)
	for range 3 {
		mustFail(t, tr, "b1", errRefused)
		clk.advance(time.Hour)
	}
	mustFail(t, tr, "b2", errRefused)
	if err := tr.Succeeded("b1"); err != nil {
		t.Fatal(err)
	}
	if s := tr.Get("b1"); s != (State{}) {
		t.Errorf("after a success: %+v, want the zero State", s)
	}
	if down := tr.Down(); len(down) != 1 || down["b2"] == "" {
		t.Errorf("Down = %q, want only b2", down)
	}
	now := clk.now()
	if s := mustFail(t, tr, "b1", errRefused); s.Failures != 1 || s.Until.Sub(now) != retryInterval {
		t.Errorf("first failure after a success: %+v, want 1 failure and 60 s", s)
	}
}

func TestDownSaysWhy(t *testing.T) {
	clk := newClock()
	tr := open(t, "", clk, 19*time.Second+500*time.Millisecond)
	mustFail(t, tr, "b1", errRefused)
	mustFail(t, tr, "b2", nil)
	clk.advance(38 * time.Second)
	want := map[string]string{
		// 79.5 s of backoff, 38 s gone: 41.5 s, rounded up.
		"b1": "dial tcp 10.0.0.1:22: connect: connection refused (failed once, next try in 42s)",
		"b2": "unknown error (failed once, next try in 42s)",
	}
	if got := tr.Down(); !equalMaps(got, want) {
		t.Errorf("Down = %q\nwant %q", got, want)
	}

	clk.advance(time.Minute)
	mustFail(t, tr, "b1", errRefused)
	clk.advance(time.Minute)
	want = map[string]string{"b1": "dial tcp 10.0.0.1:22: connect: connection refused (failed 2 times, next try in 2m20s)"}
	if got := tr.Down(); !equalMaps(got, want) {
		t.Errorf("Down = %q\nwant %q", got, want)
	}

	clk.advance(139 * time.Second)
	if got := tr.Down(); len(got) != 1 {
		t.Errorf("Down half a second before the end of the backoff = %q, want b1", got)
	}
	clk.advance(500 * time.Millisecond)
	if got := tr.Down(); len(got) != 0 {
		t.Errorf("Down at the end of the backoff = %q, want none", got)
	}
	if s := tr.Get("b1"); s.Failures != 2 {
		t.Errorf("a machine whose backoff ended still has %d failures; want 2 until it succeeds", s.Failures)
	}
}

func equalMaps(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || v != w {
			return false
		}
	}
	return true
}

func TestErrorsAreOneBoundedLine(t *testing.T) {
	long := strings.Repeat("é", 400) // 800 bytes
	for _, tc := range []struct {
		err  error
		want string
	}{
		{nil, "unknown error"},
		{errors.New(" \n\t"), "unknown error"},
		{errors.New("ssh: handshake failed:\n  error: \x1b[31mno\x1b[0m\r\nkey\t"), "ssh: handshake failed: error: [31mno [0m key"},
		{errors.New("bad \xff byte"), "bad \uFFFD byte"},
		{errors.New(long), strings.Repeat("é", 248) + "…"},
	} {
		got := oneLine(tc.err)
		if got != tc.want {
			t.Errorf("oneLine(%q) = %q, want %q", tc.err, got, tc.want)
		}
		if len(got) > maxErrorLen || !utf8.ValidString(got) || strings.ContainsAny(got, "\n\r") {
			t.Errorf("oneLine(%q) = %q: not one valid line of at most %d bytes", tc.err, got, maxErrorLen)
		}
	}
	// Odd and even cuts: the ellipsis must never split a character.
	for n := 490; n < 510; n++ {
		got := oneLine(errors.New("x" + strings.Repeat("€", n)))
		if len(got) > maxErrorLen || !utf8.ValidString(got) || !strings.HasSuffix(got, "…") {
			t.Errorf("%d euros: %q (%d bytes)", n, got, len(got))
		}
	}
}

func TestProbeThrottles(t *testing.T) {
	path := filepath.Join(t.TempDir(), "health.json")
	clk := newClock()
	a := open(t, path, clk, 0)
	b := open(t, path, clk, 0)
	const every = 20 * time.Second
	probe := func(tr *Tracker, machine string) bool {
		t.Helper()
		ok, err := tr.Probe(machine, every)
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}

	if !probe(a, "up") {
		t.Error("Probe of a healthy machine = false, want true")
	}
	if s := a.Get("up"); s != (State{}) {
		t.Errorf("Probe of a healthy machine recorded %+v", s)
	}

	failedAt := clk.now()
	mustFail(t, a, "b1", errRefused) // down for 60 s
	clk.advance(every - time.Second)
	if probe(a, "b1") {
		t.Error("Probe 19 s after a failure = true, want false: the failure was an attempt")
	}
	clk.advance(time.Second)
	if !probe(a, "b1") {
		t.Error("Probe 20 s after a failure = false, want true")
	}
	if s := a.Get("b1"); !s.LastProbe.Equal(failedAt.Add(every)) {
		t.Errorf("LastProbe = %v, want %v", s.LastProbe, failedAt.Add(every))
	}
	// The grant holds for every process, not only the one that got it.
	clk.advance(every - time.Second)
	if probe(b, "b1") || probe(a, "b1") {
		t.Error("Probe 19 s after a grant = true, want false")
	}
	clk.advance(time.Second)
	if !probe(b, "b1") {
		t.Error("Probe 20 s after a grant = false, want true")
	}
	if probe(a, "b1") {
		t.Error("second Probe at the same time = true, want false")
	}
	// Past the backoff the machine is up, and anyone may try it.
	clk.advance(20 * time.Second)
	if !probe(a, "b1") || !probe(b, "b1") {
		t.Error("Probe after the backoff = false, want true")
	}
	if s := a.Get("b1"); !s.LastProbe.Equal(failedAt.Add(2 * every)) {
		t.Errorf("Probe of an up machine moved LastProbe to %v", s.LastProbe)
	}

	// A probe that fails does not lengthen the backoff, and the next one waits every after it.
	first := mustFail(t, a, "b2", errRefused)
	clk.advance(every)
	if !probe(b, "b2") {
		t.Fatal("Probe of b2 = false, want true")
	}
	clk.advance(time.Second)
	if s := mustFail(t, b, "b2", errRefused); s.Failures != 1 || !s.Until.Equal(first.Until) {
		t.Errorf("after a failed probe: %+v; want the first failure's count and backoff: %+v", s, first)
	}
	clk.advance(every - time.Second)
	if probe(a, "b2") {
		t.Error("Probe 19 s after a failed probe = true, want false")
	}
	clk.advance(time.Second)
	if !probe(a, "b2") {
		t.Error("Probe 20 s after a failed probe = false, want true")
	}
}

func TestStateIsSharedThroughTheFile(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state", "nix-offload")
	path := filepath.Join(dir, "health.json")
	clk := newClock()
	a := open(t, path, clk, 7*time.Second)
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Open created %s (%v); a missing file already means all healthy", path, err)
	}
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() || fi.Mode().Perm() != 0o700 {
		t.Fatalf("state directory: %v, %v; want a directory of this user alone (0700)", fi, err)
	}

	s := mustFail(t, a, "root@b1:22", errRefused)
	b := open(t, path, clk, 0)
	if got := b.Get("root@b1:22"); got != s {
		t.Errorf("a second Tracker reads %+v, want %+v", got, s)
	}
	if got, want := b.Down(), a.Down(); !equalMaps(got, want) || len(got) != 1 {
		t.Errorf("Down: second Tracker %q, first %q", got, want)
	}

	// b's success reaches a only when a reads the file again.
	if err := b.Succeeded("root@b1:22"); err != nil {
		t.Fatal(err)
	}
	if got := a.Get("root@b1:22"); got != s {
		t.Errorf("before Reload a has %+v, want its own %+v", got, s)
	}
	if err := a.Reload(); err != nil {
		t.Fatal(err)
	}
	if got := a.Get("root@b1:22"); got != (State{}) {
		t.Errorf("after Reload: %+v, want healthy", got)
	}
	// A failure recorded by one Tracker counts with those recorded by another.
	clk.advance(time.Hour)
	mustFail(t, a, "root@b1:22", errRefused)
	clk.advance(time.Hour)
	if s := mustFail(t, b, "root@b1:22", errRefused); s.Failures != 2 {
		t.Errorf("second failure, recorded by the other Tracker: Failures = %d, want 2", s.Failures)
	}

	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("%s has mode %v, want 0600", path, fi.Mode())
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if strings.Join(names, " ") != "health.json health.json.lock" {
		t.Errorf("state directory holds %q, want the file and its lock only", names)
	}
}

func TestSucceededOfAHealthyMachineWritesNothing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "health.json")
	clk := newClock()
	tr := open(t, path, clk, 0)
	if err := tr.Succeeded("b1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Succeeded with no file created it (%v)", err)
	}
	mustFail(t, tr, "b2", errRefused)
	before := inode(t, path)
	if err := tr.Succeeded("b1"); err != nil {
		t.Fatal(err)
	}
	if inode(t, path) != before {
		t.Error("Succeeded of a healthy machine rewrote the file")
	}
	if err := tr.Succeeded("b2"); err != nil {
		t.Fatal(err)
	}
	if inode(t, path) == before {
		t.Error("Succeeded of a failed machine did not rewrite the file")
	}
	fresh := open(t, path, clk, 0)
	if s := fresh.Get("b2"); s != (State{}) {
		t.Errorf("after the success the file says %+v", s)
	}
}

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Ino
}

// steppingClock moves an hour on at every reading, more than the longest backoff, so that
// every failure finds the machine up and counts. Trackers read the clock with the file locked,
// so the times follow the order of the updates.
type steppingClock struct{ n atomic.Int64 }

func (c *steppingClock) now() time.Time {
	return time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC).Add(time.Duration(c.n.Add(1)) * time.Hour)
}

// Failures recorded at once by goroutines of two Trackers on one file all count: none is lost
// to another's read-modify-write.
func TestConcurrentFailuresAllCount(t *testing.T) {
	path := filepath.Join(t.TempDir(), "health.json")
	const goroutines, each = 8, 25
	var clk steppingClock
	var trackers [2]*Tracker
	for i := range trackers {
		tr, err := Open(path)
		if err != nil {
			t.Fatal(err)
		}
		tr.now = clk.now
		trackers[i] = tr
	}
	var wg sync.WaitGroup
	errs := make(chan error, 2*goroutines*each)
	for _, tr := range trackers {
		for g := range goroutines {
			wg.Go(func() {
				machine := []string{"b1", "b2"}[g%2]
				for i := range each {
					if _, err := tr.Failed(machine, fmt.Errorf("failure %d.%d", g, i)); err != nil {
						errs <- err
					}
					if i%5 == 0 {
						// Readers take no lock; they must never see half a file.
						if err := tr.Reload(); err != nil {
							errs <- err
						}
						tr.Down()
					}
				}
			})
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	final, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []string{"b1", "b2"} {
		if got, want := final.Get(m).Failures, goroutines*each; got != want {
			t.Errorf("%s: %d failures in the file, want %d", m, got, want)
		}
	}
}

// The same across processes, with real time: each failure is of a machine of its own, so a
// lost update shows as a missing machine.
func TestFailuresFromTwoProcesses(t *testing.T) {
	path := filepath.Join(t.TempDir(), "health.json")
	const jobs = 100
	start, wait := startHelper(t, path, jobs)
	tr, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	start()
	for i := range jobs {
		if _, err := tr.Failed(fmt.Sprintf("p%d", i), errRefused); err != nil {
			t.Fatal(err)
		}
	}
	wait()
	if err := tr.Reload(); err != nil {
		t.Fatal(err)
	}
	for _, who := range []string{"p", "h"} {
		for i := range jobs {
			if s := tr.Get(fmt.Sprintf("%s%d", who, i)); s.Failures != 1 {
				t.Errorf("%s%d: %+v, want one failure", who, i, s)
			}
		}
	}
	if n := len(tr.Down()); n != 2*jobs {
		t.Errorf("%d machines down, want %d", n, 2*jobs)
	}
}

func TestCorruptFileMeansAllHealthy(t *testing.T) {
	for name, content := range map[string]string{
		"garbage":        "{\"version\": 1, \"machines\": {\"b1\": {\"failures\": 2,",
		"wrong type":     `{"version": 1, "machines": {"b1": {"failures": "two"}}}`,
		"other version":  `{"version": 2, "machines": {}}`,
		"no version":     `{"machines": {}}`,
		"empty":          ``,
		"binary garbage": "\x00\x01\x02",
	} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "health.json")
			if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
			tr, err := Open(path)
			if tr == nil {
				t.Fatal("Open returned no Tracker")
			}
			if err == nil || !strings.Contains(err.Error(), path+" is corrupt") {
				t.Fatalf("Open: err = %v, want one that says the file is corrupt", err)
			}
			if down := tr.Down(); len(down) != 0 {
				t.Errorf("Down = %q, want none", down)
			}
			// The next change replaces the file, and says what it replaced.
			s, err := tr.Failed("b1", errRefused)
			if err == nil || !strings.Contains(err.Error(), "corrupt") {
				t.Errorf("Failed on a corrupt file: err = %v, want the corruption reported", err)
			}
			if s.Failures != 1 {
				t.Errorf("Failed on a corrupt file: Failures = %d, want 1", s.Failures)
			}
			fresh, err := Open(path)
			if err != nil {
				t.Fatalf("the file is still bad after a change: %v", err)
			}
			if got := fresh.Get("b1"); got != s {
				t.Errorf("the replaced file says %+v, want %+v", got, s)
			}
		})
	}
}

func TestCorruptFileIsReplacedByASuccessToo(t *testing.T) {
	path := filepath.Join(t.TempDir(), "health.json")
	tr := open(t, path, newClock(), 0)
	mustFail(t, tr, "b1", errRefused)
	if err := os.WriteFile(path, []byte("nonsense"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := tr.Reload(); err == nil {
		t.Error("Reload of a corrupt file: no error")
	}
	if s := tr.Get("b1"); s != (State{}) {
		t.Errorf("after reading a corrupt file, b1 is %+v; want forgotten", s)
	}
	if err := tr.Succeeded("b2"); err == nil {
		t.Error("Succeeded on a corrupt file: no error")
	}
	if err := tr.Reload(); err != nil {
		t.Errorf("Succeeded did not replace the corrupt file: %v", err)
	}
}

func TestUnreadableFileKeepsStateInMemory(t *testing.T) {
	// A directory where the file should be cannot be read, even by root.
	path := filepath.Join(t.TempDir(), "health.json")
	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatal(err)
	}
	tr, err := Open(path)
	if tr == nil || err == nil {
		t.Fatalf("Open of a directory = %v, %v; want a Tracker and an error", tr, err)
	}
	clk := newClock()
	tr.now = clk.now
	s, err := tr.Failed("b1", errRefused)
	if err == nil || !strings.HasPrefix(err.Error(), "health: ") {
		t.Errorf("Failed: err = %v, want a health: error", err)
	}
	if s.Failures != 1 || tr.Get("b1") != s || len(tr.Down()) != 1 {
		t.Errorf("Failed returned %+v, Get %+v, Down %q: want the failure kept in memory", s, tr.Get("b1"), tr.Down())
	}
	if err := tr.Reload(); err == nil {
		t.Error("Reload: no error")
	}
	if tr.Get("b1") != s {
		t.Error("a failed Reload forgot what the Tracker knew")
	}
	if ok, err := tr.Probe("b1", time.Second); ok || err == nil {
		t.Errorf("Probe right after a failure = %v, %v; want false and the error", ok, err)
	}
	if err := tr.Succeeded("b1"); err == nil || tr.Get("b1") != (State{}) {
		t.Errorf("Succeeded: %v; b1 is %+v, want healthy and an error", err, tr.Get("b1"))
	}
}

func TestOpenWithoutADirectoryStillWorks(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	tr, err := Open(filepath.Join(file, "health.json"))
	if tr == nil || err == nil || !strings.HasPrefix(err.Error(), "health: ") {
		t.Fatalf("Open under a regular file = %v, %v; want a Tracker and a health: error", tr, err)
	}
	// Open said it; the Tracker goes on in memory without repeating it.
	if s, err := tr.Failed("b1", errRefused); s.Failures != 1 || err != nil || tr.Path() != "" {
		t.Errorf("Failed = %+v, %v (path %q); want the failure in memory, said once by Open", s, err, tr.Path())
	}
	if len(tr.Down()) != 1 {
		t.Errorf("Down = %q, want b1", tr.Down())
	}
}

func TestMemoryOnly(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	clk := newClock()
	tr := open(t, "", clk, 0)
	if tr.Path() != "" {
		t.Errorf("Path = %q", tr.Path())
	}
	mustFail(t, tr, "b1", errRefused)
	if ok, err := tr.Probe("b1", time.Second); ok || err != nil {
		t.Errorf("Probe right after a failure = %v, %v", ok, err)
	}
	clk.advance(time.Second)
	if ok, err := tr.Probe("b1", time.Second); !ok || err != nil {
		t.Errorf("Probe a second after a failure = %v, %v", ok, err)
	}
	if err := tr.Reload(); err != nil {
		t.Errorf("Reload: %v", err)
	}
	if tr.Get("b1").Failures != 1 || len(tr.Down()) != 1 {
		t.Errorf("the failure was lost: %+v", tr.Get("b1"))
	}
	if err := tr.Succeeded("b1"); err != nil || len(tr.Down()) != 0 {
		t.Errorf("Succeeded: %v; Down = %q", err, tr.Down())
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("a memory-only Tracker wrote %v", entries)
	}
}
