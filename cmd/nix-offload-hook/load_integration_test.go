package main

// Load: hundreds of builds at once through one broker on two builders,
// with the broker's memory, file descriptors and goroutines sampled while
// they run and checked for leaks afterwards.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/localstore"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/testbed"
)

// loadBuilds is how many independent derivations each load test builds.
const loadBuilds = 500

// Bounds on the broker's resources. What is not bounded by a constant is
// bounded by the clients connected at the moment: each hook (or queue
// runner) that waits for its build holds one unix-socket connection, so
// those descriptors and their goroutines grow with the builds submitted,
// and must go away with them.
const (
	// unixSlack is the unix sockets beyond the client connections a
	// sample may see (loadSample.mayHave): the listener, a connection
	// accepted but not yet counted (the accept loop counts each before it
	// takes the next), and a margin.
	unixSlack = 8
	// tcpPerMachine bounds the SSH connections to one machine: the pool
	// allows slots+2 = 6 sessions, fewer than the 8 one connection carries,
	// and at most 2 connection attempts at a time (internal/pool).
	tcpPerMachine = 2
	// maxOtherFDs bounds every descriptor that is neither a socket nor a
	// .drv being read (those are bounded by the requests in flight): the
	// broker's stdio and the Go runtime's (epoll, eventfd, the cgroup CPU
	// files; 8 with a margin), a lock file per slot held (internal/slots:
	// 2 machines × 4 slots, two for a slot changing hands: 16), and up to 8
	// local read sessions (localSessions in internal/broker), 4 descriptors
	// each (stdin, stdout and stderr pipes and a pidfd) but up to 10 while
	// one starts (the load's first requests open all 8 at once) or is
	// replaced (localPool.pathInfos starts a fresh one when a path is
	// reported missing): the child's ends of the new one's pipes and
	// exec's status pipe while it starts, the old one's stderr until it
	// drains (80). CI saw 73 under load, .drv files included, over the
	// former bound of 64, which left out the slots' files and the starts.
	maxOtherFDs = 8 + 16 + 8*10
	// goroutinesPerClient bounds the goroutines a connected client costs:
	// its HTTP connection's (2 while a request is in flight) and its
	// build's run (measured: 3.0 per client with 500 hooks connected).
	goroutinesPerClient = 4
	// maxPeakRSSMiB bounds the broker's peak resident memory under the
	// load: about 11 MiB at rest with warm sessions, plus about 60 KiB per
	// connected client (measured: 43 MiB with 500 hooks connected).
	maxPeakRSSMiB = 80
)

// fdCounts classifies a process's open file descriptors.
type fdCounts struct {
	Total, Unix, TCP, Pipe, Other int
	Drv                           int // of Other: .drv files, being read
}

func (f fdCounts) String() string {
	return fmt.Sprintf("%d (unix %d, tcp %d, pipe %d, other %d, of them .drv %d)", f.Total, f.Unix, f.TCP, f.Pipe, f.Other, f.Drv)
}

// readFDs lists /proc/PID/fd and sorts the sockets by the kernel's socket
// tables of the process's network namespace. The tables are read after
// the list, so a socket missing from both closed in between; it is
// counted as a unix socket: client connections are what come and go.
func readFDs(pid int) (fdCounts, error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fdCounts{}, err
	}
	links := make([]string, 0, len(ents))
	for _, e := range ents {
		if l, err := os.Readlink(filepath.Join(dir, e.Name())); err == nil {
			links = append(links, l)
		}
	}
	tcp := map[string]bool{}
	for _, table := range []string{"tcp", "tcp6"} {
		if err := socketInodes(pid, table, 9, tcp); err != nil {
			return fdCounts{}, err
		}
	}
	var c fdCounts
	for _, l := range links {
		c.Total++
		switch {
		case strings.HasPrefix(l, "socket:["):
			if tcp[strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")] {
				c.TCP++
			} else {
				c.Unix++
			}
		case strings.HasPrefix(l, "pipe:["):
			c.Pipe++
		default:
			c.Other++
			if strings.HasSuffix(l, ".drv") {
				c.Drv++
			}
		}
	}
	return c, nil
}

// socketInodes adds the inodes listed in /proc/PID/net/TABLE (column col)
// to into.
func socketInodes(pid int, table string, col int, into map[string]bool) error {
	f, err := os.Open(fmt.Sprintf("/proc/%d/net/%s", pid, table))
	if err != nil {
		return err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Scan() // the header
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) > col {
			into[fields[col]] = true
		}
	}
	return sc.Err()
}

// procKiB reads a "Vm…:  N kB" line of /proc/PID/status.
func procKiB(pid int, key string) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, key+":"); ok {
			return strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		}
	}
	return 0, fmt.Errorf("/proc/%d/status has no %s", pid, key)
}

// brokerStatus asks the broker on socket for its status, on a connection
// of its own.
func brokerStatus(socket string) (brokerapi.Status, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := brokerapi.Dial(ctx, socket)
	if err != nil {
		return brokerapi.Status{}, err
	}
	defer c.Close()
	return c.Status(ctx)
}

// loadSample is one look at the broker.
type loadSample struct {
	fds     fdCounts
	rssKiB  int64
	clients int // the larger of the counts before and after fds was read
	// mayHave is the most client connections the read of fds can have
	// seen: those counted before it, and every one accepted between the
	// two counts. Neither count alone bounds them: while clients come and
	// go (a queue runner dials again to fetch its outputs, and hangs up),
	// connections opened before the read and closed after it are in
	// neither.
	mayHave int
	st      brokerapi.Status
}

// sampleBroker looks at the broker: status, descriptors, status again.
func sampleBroker(env *brokerEnv) (loadSample, error) {
	pid := env.cmd.Process.Pid
	before, err := brokerStatus(env.socket)
	if err != nil {
		return loadSample{}, err
	}
	fds, err := readFDs(pid)
	if err != nil {
		return loadSample{}, err
	}
	rss, err := procKiB(pid, "VmRSS")
	if err != nil {
		return loadSample{}, err
	}
	after, err := brokerStatus(env.socket)
	if err != nil {
		return loadSample{}, err
	}
	return loadSample{fds: fds, rssKiB: rss, clients: max(before.Clients, after.Clients),
		mayHave: before.Clients + int(after.Accepted-before.Accepted), st: after}, nil
}

// check returns what in s breaks the bounds.
func (s loadSample) check(machines int) []string {
	var bad []string
	if s.fds.Unix > s.mayHave+unixSlack {
		bad = append(bad, fmt.Sprintf("%d unix sockets with %d client connections open or accepted while sampling (bound: those + %d)", s.fds.Unix, s.mayHave, unixSlack))
	}
	if s.fds.TCP > machines*tcpPerMachine {
		bad = append(bad, fmt.Sprintf("%d TCP sockets to %d machines (bound: %d)", s.fds.TCP, machines, machines*tcpPerMachine))
	}
	if n := s.fds.Pipe + s.fds.Other - s.fds.Drv; n > maxOtherFDs {
		bad = append(bad, fmt.Sprintf("%d descriptors other than sockets and .drv files (bound: %d)", n, maxOtherFDs))
	}
	if s.fds.Drv > s.mayHave {
		bad = append(bad, fmt.Sprintf("%d .drv files open with %d client connections (bound: one per connection)", s.fds.Drv, s.mayHave))
	}
	if g := s.st.Goroutines; g > goroutinesPerClient*s.clients+200 {
		bad = append(bad, fmt.Sprintf("%d goroutines with %d clients (bound: %d per client + 200)", g, s.clients, goroutinesPerClient))
	}
	return bad
}

// loadMonitor samples the broker every 200 ms until stopped and keeps the
// peaks and every bound a sample broke.
type loadMonitor struct {
	env      *brokerEnv
	machines int
	stop     chan struct{}
	stopOnce sync.Once
	done     chan struct{}

	mu                                    sync.Mutex
	samples                               int
	peakFDs                               fdCounts
	peakUnix, peakClients, peakGoroutines int
	peakQueued, peakRunning               int
	peakRSSKiB                            int64
	violations                            []string
	errs                                  []error
}

// startLoadMonitor starts sampling; it stops with finish, or at the end
// of the test.
func startLoadMonitor(t *testing.T, env *brokerEnv, machines int) *loadMonitor {
	m := &loadMonitor{env: env, machines: machines, stop: make(chan struct{}), done: make(chan struct{})}
	go m.run()
	t.Cleanup(m.halt)
	return m
}

func (m *loadMonitor) halt() {
	m.stopOnce.Do(func() { close(m.stop) })
	<-m.done
}

func (m *loadMonitor) run() {
	defer close(m.done)
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		s, err := sampleBroker(m.env)
		m.mu.Lock()
		if err != nil {
			m.errs = append(m.errs, err)
		} else {
			m.samples++
			if s.fds.Total > m.peakFDs.Total {
				m.peakFDs = s.fds
			}
			m.peakUnix = max(m.peakUnix, s.fds.Unix)
			m.peakClients = max(m.peakClients, s.clients)
			m.peakGoroutines = max(m.peakGoroutines, s.st.Goroutines)
			m.peakQueued = max(m.peakQueued, s.st.Queued)
			m.peakRunning = max(m.peakRunning, s.st.Running)
			m.peakRSSKiB = max(m.peakRSSKiB, s.rssKiB)
			for _, v := range s.check(m.machines) {
				m.violations = append(m.violations, fmt.Sprintf("fds %v, %d clients: %s", s.fds, s.clients, v))
			}
		}
		m.mu.Unlock()
		select {
		case <-m.stop:
			return
		case <-tick.C:
		}
	}
}

// finish stops the sampling and fails t for every bound broken.
func (m *loadMonitor) finish(t *testing.T) {
	t.Helper()
	m.halt()
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.errs) > 0 {
		t.Errorf("%d of %d samples of the broker failed; first: %v", len(m.errs), len(m.errs)+m.samples, m.errs[0])
	}
	if m.samples < 5 {
		t.Errorf("only %d samples of the broker under load", m.samples)
	}
	for i, v := range m.violations {
		if i == 10 {
			t.Errorf("… and %d more samples out of bounds", len(m.violations)-i)
			break
		}
		t.Errorf("broker under load: %s", v)
	}
	if m.peakRSSKiB > maxPeakRSSMiB<<10 {
		t.Errorf("broker RSS peaked at %.1f MiB (bound %d MiB)", float64(m.peakRSSKiB)/1024, maxPeakRSSMiB)
	}
}

// report says what the monitor saw, with the broker's VmHWM and the CPU
// time it has used.
func (m *loadMonitor) report(pid int) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	hwm, _ := procKiB(pid, "VmHWM")
	return fmt.Sprintf("%d samples; broker peak RSS %.1f MiB (VmHWM %.1f MiB), CPU %s; peak fds %v; peak unix sockets %d, clients %d, goroutines %d; peak queued %d, running %d",
		m.samples, float64(m.peakRSSKiB)/1024, float64(hwm)/1024, cpuTime(pid), m.peakFDs, m.peakUnix, m.peakClients, m.peakGoroutines, m.peakQueued, m.peakRunning)
}

// cpuTime reads the user and system time of a process from
// /proc/PID/stat (in clock ticks of 10 ms, as on every Linux with
// USER_HZ 100).
func cpuTime(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "unknown"
	}
	// The fields after the command name, which ends with the last ")":
	// state is field 3, utime 14 and stime 15.
	i := strings.LastIndexByte(string(b), ')')
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return "unknown"
	}
	user, _ := strconv.Atoi(f[11])
	sys, _ := strconv.Atoi(f[12])
	return fmt.Sprintf("%.1f s user + %.1f s system", float64(user)/100, float64(sys)/100)
}

// waitWarm waits until every machine has idle sessions, and returns the
// broker's resting state: the baseline for the leak check.
func waitWarm(t *testing.T, env *brokerEnv) loadSample {
	t.Helper()
	testbed.WaitFor(t, time.Minute, "the broker's sessions to be warm", func() bool {
		st, err := brokerStatus(env.socket)
		if err != nil {
			return false
		}
		for _, m := range st.Machines {
			if m.Idle < 4 {
				return false
			}
		}
		return true
	})
	// The baseline once the status clients above are gone: the asker is
	// the only client.
	var s loadSample
	var err error
	testbed.WaitFor(t, time.Minute, "the broker at rest with only the asker connected", func() bool {
		s, err = sampleBroker(env)
		return err == nil && s.clients == 1
	})
	return s
}

// checkNoLeaks waits until the broker is idle again: no slot used, nothing
// queued or running, no client but the asker, and its descriptors and
// goroutines back to their resting numbers. What may stay is bounded by a
// constant: the local read sessions the load opened (up to 8, 4
// descriptors each) and the pool's sessions beyond the warm ones (SSH
// channels: no descriptor; a few goroutines each). One descriptor or
// goroutine left per build would be 500.
func checkNoLeaks(t *testing.T, env *brokerEnv, base loadSample, machines int) loadSample {
	t.Helper()
	// 7 more local sessions of 4 descriptors, 2 more SSH connections, a
	// lingering status connection, and a margin.
	const fdSlack, goroutineSlack = 40, 120
	var last loadSample
	var why string
	deadline := time.Now().Add(10 * time.Second)
	for {
		s, err := sampleBroker(env)
		switch {
		case err != nil:
			why = err.Error()
		case slotsUsed(s.st) != 0 || s.st.Queued != 0 || s.st.Running != 0:
			why = fmt.Sprintf("%d slots used, %d queued, %d running", slotsUsed(s.st), s.st.Queued, s.st.Running)
		case s.st.Clients != 1:
			why = fmt.Sprintf("%d clients connected, want only the one asking", s.st.Clients)
		case s.fds.Unix > base.fds.Unix+1:
			why = fmt.Sprintf("%d unix sockets, %d before the load", s.fds.Unix, base.fds.Unix)
		case s.fds.TCP > machines*tcpPerMachine:
			why = fmt.Sprintf("%d TCP sockets", s.fds.TCP)
		case s.fds.Total > base.fds.Total+fdSlack:
			why = fmt.Sprintf("%v descriptors, %v before the load", s.fds, base.fds)
		case s.st.Goroutines > base.st.Goroutines+goroutineSlack:
			why = fmt.Sprintf("%d goroutines, %d before the load", s.st.Goroutines, base.st.Goroutines)
		default:
			return s
		}
		last = s
		if time.Now().After(deadline) {
			t.Errorf("10 s after the load the broker is not back at rest: %s\nstatus: %+v", why, last.st)
			return last
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func machineBuilds(st brokerapi.Status) (per string, total, failed uint64) {
	var parts []string
	for _, m := range st.Machines {
		parts = append(parts, fmt.Sprintf("%s: %d", m.Name, m.Builds))
		total += m.Builds
		failed += m.Failed
	}
	return strings.Join(parts, ", "), total, failed
}

// wideExpr is a root derivation over n independent ones; input i waits
// until the file gate exists on its machine, then writes "line i", and
// the root's output lists the lines in order.
func wideExpr(salt, gate string, n int) string {
	return fmt.Sprintf(`
let
  salt = %q;
  mk = i: derivation {
    name = "load${toString i}";
    inherit salt;
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" "while [ ! -e %s ]; do /bin/sleep 0.2; done; echo line ${toString i} > $out" ];
  };
in derivation {
  name = "load-root";
  inherit salt;
  system = "x86_64-linux";
  builder = "/bin/sh";
  deps = map mk (builtins.genList (i: i + 1) %d);
  args = [ "-c" "for d in $deps; do read y < $d; echo \"$y\"; done > $out" ];
}
`, salt, gate, n)
}

func wideLines(n int) string {
	lines := make([]string, n)
	for i := range lines {
		lines[i] = fmt.Sprintf("line %d", i+1)
	}
	return strings.Join(lines, "\n")
}

func lastBytes(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "…" + s[len(s)-n:]
}

// loadBed starts a 2.34 and a 2.26 builder, 4 slots each, and a broker
// for a fresh local Nix 2.8 store.
func loadBed(t *testing.T) (testbed.Nix, string, *brokerEnv, []*testbed.Builder) {
	t.Helper()
	local := testbed.Lookup(t, "2.8")
	bs := []*testbed.Builder{testbed.StartBuilder(t, testbed.Lookup(t, "2.34")), testbed.StartBuilder(t, testbed.Lookup(t, "2.26"))}
	store := testbed.NewStore(t)
	return local, store, newBrokerEnv(t, local, store, 4, bs...), bs
}

// TestBrokerLoad500: one nix-build of a root over 500 independent
// derivations, with max-jobs 0, hands every one to the broker through its
// own hook process: Nix starts a hook per derivation, one at a time, and
// every hook stays connected until its build is done. The builds wait for
// a gate file on their machine, which the test makes only when all 500
// are in the broker (8 holding slots, 492 queued), so the broker really
// serves 500 hooks at once. Then all succeed; the broker's memory,
// descriptors and goroutines stay within bounds set by the clients
// connected; afterwards no slot, client, descriptor or goroutine is left.
func TestBrokerLoad500(t *testing.T) {
	local, store, env, builders := loadBed(t)
	base := waitWarm(t, env)
	t.Logf("broker at rest: fds %v, %d goroutines, RSS %.1f MiB", base.fds, base.st.Goroutines, float64(base.rssKiB)/1024)

	salt := randomHex(8)
	gate := "/nix/store/load-gate-" + salt
	expr := env.writeExpr(t, wideExpr(salt, gate, loadBuilds))
	mon := startLoadMonitor(t, env, len(builders))
	start := time.Now()
	type result struct {
		out, errOut string
		err         error
	}
	// nixBuild, started here so that a failed test can end it.
	cmd := local.Command(store, env.mounts, "nix-build", "--max-jobs", "0", "--no-out-link",
		"--option", "build-hook", testbed.HookBinary(t), "--option", "substituters", "", expr)
	cmd.Env = append(cmd.Env, "NIX_OFFLOAD_CONFIG="+env.config)
	var stdout, stderr syncBuffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { testbed.KillCommand(cmd) })
	done := make(chan result, 1)
	go func() {
		err := cmd.Wait()
		done <- result{strings.TrimSpace(stdout.String()), stderr.String(), err}
	}()
	var r result
	var accepted time.Duration
	func() {
		deadline := time.Now().Add(3 * time.Minute) // a bound on a hang
		for {
			select {
			case r = <-done:
				t.Fatalf("nix-build ended before all %d builds were in the broker: %v\n%s", loadBuilds, r.err, lastBytes(r.errOut, 8000))
			case <-time.After(100 * time.Millisecond):
			}
			if st, err := brokerStatus(env.socket); err == nil && st.Running >= loadBuilds {
				accepted = time.Since(start)
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("not all %d builds reached the broker within 3 minutes", loadBuilds)
			}
		}
	}()
	// The peak: every hook connected, 8 builds running, 492 queued.
	peak, err := sampleBroker(env)
	if err != nil {
		t.Fatalf("sampling the broker at the peak: %v", err)
	}
	if peak.clients < loadBuilds {
		t.Errorf("%d clients connected with all builds in the broker, want at least %d", peak.clients, loadBuilds)
	}
	for _, v := range peak.check(len(builders)) {
		t.Errorf("broker with all hooks connected: %s", v)
	}
	for _, b := range builders {
		if err := os.WriteFile(filepath.Join(b.Dir, gate), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case r = <-done:
	case <-time.After(3 * time.Minute): // a bound on a hang
		t.Fatalf("nix-build still running 3 minutes after the gate opened; broker status: %+v", env.status(t))
	}
	took := time.Since(start)
	mon.finish(t)
	if r.err != nil {
		t.Fatalf("nix-build of %d derivations after %v: %v\n%s", loadBuilds+1, took, r.err, lastBytes(r.errOut, 8000))
	}
	if got, want := storeFile(t, store, r.out), wideLines(loadBuilds); got != want {
		t.Errorf("root output:\n%s\nwant %d lines \"line 1\" … \"line %d\"", lastBytes(got, 2000), loadBuilds, loadBuilds)
	}
	if strings.Contains(r.errOut, "going on without it") || strings.Contains(r.errOut, "without the broker") {
		t.Errorf("some hooks did not use the broker:\n%s", lastBytes(r.errOut, 8000))
	}
	after := checkNoLeaks(t, env, base, len(builders))
	per, total, failed := machineBuilds(after.st)
	if total != loadBuilds+1 || failed != 0 {
		t.Errorf("broker counts %d builds (%s) and %d failures, want %d and 0", total, per, failed, loadBuilds+1)
	}
	for _, m := range after.st.Machines {
		if m.Builds == 0 {
			t.Errorf("machine %s built nothing: %s", m.Name, per)
		}
	}
	t.Logf("%d builds through one nix-build in %v: all %d hooks in the broker after %v, then %v to finish (%.1f builds/s); builds per machine: %s",
		loadBuilds+1, took.Round(time.Millisecond), loadBuilds, accepted.Round(time.Millisecond), (took - accepted).Round(time.Millisecond),
		float64(loadBuilds+1)/(took-accepted).Seconds(), per)
	t.Logf("with all hooks connected: fds %v, %d clients, %d goroutines, %d queued, RSS %.1f MiB",
		peak.fds, peak.clients, peak.st.Goroutines, peak.st.Queued, float64(peak.rssKiB)/1024)
	t.Logf("under load: %s", mon.report(env.cmd.Process.Pid))
	t.Logf("after: fds %v (%v at rest before), %d goroutines (%d before)", after.fds, base.fds, after.st.Goroutines, base.st.Goroutines)
}

// How a submission client of TestBrokerLoad500Submissions ends, by its
// index modulo 20; the others build and import.
const (
	closeEarly      = 1 // closes its connection after the first event
	cancelAtHandoff = 2 // DELETEs the build instead of importing its outputs
	closeAtHandoff  = 3 // closes its connection instead of importing
)

var errGaveUp = errors.New("gave up as planned")

// TestBrokerLoad500Submissions: 500 queue-runner clients at once, each on
// its own connection, submit a build without a reservation (the broker
// decides and computes the inputs), import the outputs into the local
// store themselves and report. 75 of them give up midway, in three ways:
// they close the connection after the first event (queued or started),
// cancel with DELETE when the outputs are offered, or close the
// connection then. Every other build succeeds with the right output, and
// afterwards no slot, client, descriptor or goroutine is left.
func TestBrokerLoad500Submissions(t *testing.T) {
	local, store, env, builders := loadBed(t)
	expr := env.writeExpr(t, fmt.Sprintf(`let salt = %q; in map (i: derivation {
		name = "sub${toString i}"; inherit salt; system = "x86_64-linux"; builder = "/bin/sh";
		args = [ "-c" "echo line ${toString i} > $out" ]; }) (builtins.genList (i: i) %d)`, randomHex(8), loadBuilds))
	drvs := strings.Fields(runNix(t, local, store, env.offloadEnv, "nix-instantiate", expr))
	if len(drvs) != loadBuilds {
		t.Fatalf("nix-instantiate gave %d derivations, want %d", len(drvs), loadBuilds)
	}
	// A few stores shared by the clients, as a queue runner would import.
	stores := make(chan *localstore.Store, 4)
	for range cap(stores) {
		s, err := localstore.Open(localstore.Options{
			RealStoreDir: filepath.Join(store, "store"),
			Command:      func(argv ...string) *exec.Cmd { return local.Command(store, env.mounts, argv...) },
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		stores <- s
	}
	base := waitWarm(t, env)
	t.Logf("broker at rest: fds %v, %d goroutines, RSS %.1f MiB", base.fds, base.st.Goroutines, float64(base.rssKiB)/1024)

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	mon := startLoadMonitor(t, env, len(builders))
	start := time.Now()
	outs := make([]string, loadBuilds)
	errs := make([]error, loadBuilds)
	var wg sync.WaitGroup
	for i, drv := range drvs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			outs[i], errs[i] = submit(ctx, env.socket, drv, i%20, stores)
		}()
	}
	wg.Wait()
	took := time.Since(start)
	mon.finish(t)

	succeeded, gaveUp := 0, 0
	for i, err := range errs {
		switch {
		case errors.Is(err, errGaveUp):
			gaveUp++
		case err != nil:
			if i%20 == closeEarly || i%20 == cancelAtHandoff || i%20 == closeAtHandoff {
				t.Errorf("client %d (gives up in way %d): %v", i, i%20, err)
			} else {
				t.Errorf("build %d (%s): %v", i, drvs[i], err)
			}
		default:
			succeeded++
			if got, want := storeFile(t, store, outs[i]), fmt.Sprintf("line %d", i); got != want {
				t.Errorf("build %d: output %s holds %q, want %q", i, outs[i], got, want)
			}
		}
	}
	if want := loadBuilds * 3 / 20; gaveUp != want {
		t.Errorf("%d clients gave up, want %d", gaveUp, want)
	}
	after := checkNoLeaks(t, env, base, len(builders))
	per, total, failed := machineBuilds(after.st)
	if total != uint64(succeeded) || failed != 0 {
		t.Errorf("broker counts %d builds (%s) and %d failures, want %d and 0", total, per, failed, succeeded)
	}
	t.Logf("%d submissions from %d clients at once in %v (%.1f/s): %d built and imported, %d gave up; builds per machine: %s",
		loadBuilds, loadBuilds, took.Round(time.Millisecond), float64(loadBuilds)/took.Seconds(), succeeded, gaveUp, per)
	t.Logf("under load: %s", mon.report(env.cmd.Process.Pid))
	t.Logf("after: fds %v (%v at rest before), %d goroutines (%d before)", after.fds, base.fds, after.st.Goroutines, base.st.Goroutines)
}

// submit is one queue-runner client: it builds drv through the broker on a
// connection of its own and imports the output, or gives up as way says.
func submit(ctx context.Context, socket, drv string, way int, stores chan *localstore.Store) (string, error) {
	c, err := brokerapi.Dial(ctx, socket)
	if err != nil {
		return "", err
	}
	defer c.Close()
	stream, err := c.Build(ctx, brokerapi.BuildRequest{DrvPath: drv})
	if err != nil {
		return "", err
	}
	defer stream.Close()
	for {
		ev, err := stream.Next()
		if err != nil {
			return "", fmt.Errorf("events: %w", err)
		}
		switch ev.Type {
		case brokerapi.EventQueued, brokerapi.EventStarted:
			if way == closeEarly {
				stream.Close()
				return "", errGaveUp
			}
		case brokerapi.EventFailed:
			return "", fmt.Errorf("failed (%s): %s", ev.Kind, ev.Error)
		case brokerapi.EventHandback:
			return "", fmt.Errorf("handed back: %s", ev.Reason)
		case brokerapi.EventOutputs:
			switch way {
			case cancelAtHandoff:
				if err := c.Cancel(ctx, ev.Build); err != nil {
					return "", fmt.Errorf("cancel: %w", err)
				}
				return "", errGaveUp
			case closeAtHandoff:
				return "", errGaveUp
			}
			if len(ev.Outputs) != 1 {
				return "", fmt.Errorf("%d outputs offered, want 1", len(ev.Outputs))
			}
			o := ev.Outputs[0]
			s := <-stores
			ierr := s.AddMissing([]serveproto.PathInfo{{Path: o.Path, Deriver: o.Deriver, NarHash: o.NarHash, NarSize: o.NarSize, References: o.References}},
				func(p string, w io.Writer) error { return c.FetchNAR(ctx, ev.Build, p, w) })
			stores <- s
			resp, err := c.Imported(ctx, ev.Build, ierr)
			switch {
			case ierr != nil:
				return "", fmt.Errorf("import: %w", ierr)
			case err != nil:
				return "", fmt.Errorf("imported: %w", err)
			case resp.Error != "":
				return "", fmt.Errorf("imported: %s", resp.Error)
			}
			return o.Path, nil
		}
	}
}
