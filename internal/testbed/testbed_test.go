package testbed

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// output runs cmd and returns its stdout, failing the test with its stderr.
func output(t *testing.T, cmd *exec.Cmd) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(cmd.Args, " "), err, stderr.Bytes())
	}
	return stdout.String()
}

// hostMountinfo returns /proc/self/mountinfo as a new process in the test's namespace
// sees it.
func hostMountinfo(t *testing.T) string {
	t.Helper()
	return output(t, exec.Command("cat", "/proc/self/mountinfo"))
}

// proc names one process: pid and start time, so a reused pid does not count.
type proc struct {
	pid   int
	start uint64
}

func snapshot(t *testing.T, pids []int) []proc {
	t.Helper()
	var ps []proc
	for _, pid := range pids {
		if _, start, err := procStat(pid); err == nil {
			ps = append(ps, proc{pid, start})
		}
	}
	return ps
}

// alive returns the processes of ps that still run (zombies count as gone).
func alive(ps []proc) []int {
	var live []int
	for _, p := range ps {
		if _, start, err := procStat(p.pid); err == nil && start == p.start {
			if _, err := nsOf(p.pid); err == nil {
				live = append(live, p.pid)
			}
		}
	}
	return live
}

func TestSeries(t *testing.T) {
	for v, want := range map[string]string{"2.26.3": "2.26", "2.8": "2.8", "2.34.8pre": "2.34", "2": "", "x.y": "", "": "", "2.x.1": ""} {
		if got := series(v); got != want {
			t.Errorf("series(%q) = %q, want %q", v, got, want)
		}
	}
}

func TestShQuote(t *testing.T) {
	for _, s := range []string{"", "plain", "it's", `a "b" $c \d`, "new\nline"} {
		out, err := exec.Command("/bin/sh", "-c", "printf %s "+shQuote(s)).Output()
		if err != nil || string(out) != s {
			t.Errorf("sh printed %q (%v) for %s, want %q", out, err, shQuote(s), s)
		}
	}
}

func TestLookup(t *testing.T) {
	all := All(t)
	for _, n := range all {
		t.Logf("available: %v", n)
		if got := Lookup(t, n.Series()); got != n {
			t.Errorf("Lookup(%q) = %v, want %v", n.Series(), got, n)
		}
	}
}

// recorder is a TB whose Fatalf and Skipf end the goroutine and say which was called.
type recorder struct {
	TB
	fatal, skip string
}

func (r *recorder) Fatalf(format string, args ...any) {
	r.fatal = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

func (r *recorder) Skipf(format string, args ...any) {
	r.skip = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// run calls f with r in a goroutine of its own, for Goexit.
func (r *recorder) run(f func(TB)) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f(r)
	}()
	<-done
}

// TestAllRequiresEverySeries: with the roots missing, All gives the host's Nix alone, and
// under NIX_OFFLOAD_TESTBED_REQUIRE=1 fails instead, naming the missing versions.
func TestAllRequiresEverySeries(t *testing.T) {
	host := Lookup(t, "2.8")
	t.Setenv("NIX_OFFLOAD_ROOTS", t.TempDir()) // no roots in it
	t.Setenv("NIX_OFFLOAD_TESTBED_REQUIRE", "")
	r := &recorder{TB: t}
	var got []Nix
	r.run(func(tb TB) { got = All(tb) })
	if r.fatal != "" || r.skip != "" || !slices.Equal(got, []Nix{host}) {
		t.Errorf("without the roots: All = %v (fatal %q, skip %q), want only %v", got, r.fatal, r.skip, host)
	}

	t.Setenv("NIX_OFFLOAD_TESTBED_REQUIRE", "1")
	r = &recorder{TB: t}
	got = nil
	r.run(func(tb TB) { got = All(tb) })
	if got != nil || !strings.Contains(r.fatal, "no Nix 2.26, 2.34 here") || !strings.Contains(r.fatal, "NIX_OFFLOAD_TESTBED_REQUIRE=1") {
		t.Errorf("without the roots, under NIX_OFFLOAD_TESTBED_REQUIRE=1: All = %v, fatal %q, skip %q; want a failure naming 2.26 and 2.34", got, r.fatal, r.skip)
	}

	// Unavailable and Tool follow the same rule.
	r = &recorder{TB: t}
	r.run(func(tb TB) { Tool(tb, "no-such-tool-here", "apt-get install nothing") })
	if !strings.Contains(r.fatal, "no-such-tool-here not found") || !strings.Contains(r.fatal, "apt-get install nothing") {
		t.Errorf("Tool of a missing program under NIX_OFFLOAD_TESTBED_REQUIRE=1: fatal %q, skip %q", r.fatal, r.skip)
	}
	t.Setenv("NIX_OFFLOAD_TESTBED_REQUIRE", "")
	r = &recorder{TB: t}
	r.run(func(tb TB) { Unavailable(tb, "gone: %d", 7) })
	if r.skip != "gone: 7" || r.fatal != "" {
		t.Errorf("Unavailable without NIX_OFFLOAD_TESTBED_REQUIRE: skip %q, fatal %q", r.skip, r.fatal)
	}
}

func TestCommand(t *testing.T) {
	for _, n := range All(t) {
		t.Run(n.Series(), func(t *testing.T) {
			t.Parallel()
			store := NewStore(t)

			if out := output(t, n.Command(store, nil, "nix-store", "--version")); !strings.Contains(out, n.Version) {
				t.Errorf("nix-store --version = %q, want %s", out, n.Version)
			}

			// The caller's environment, even without PATH, plus the test bed's nix.conf.
			cmd := n.Command(store, nil, "sh", "-c", `echo "FOO=$FOO"; echo "NIX_CONF_DIR=$NIX_CONF_DIR"; cat "$NIX_CONF_DIR/nix.conf"`)
			cmd.Env = []string{"FOO=bar"}
			out := output(t, cmd)
			for _, want := range []string{"FOO=bar\n", "NIX_CONF_DIR=/etc/nix\n", "build-users-group =\n", "sandbox = false\n", "substituters =\n"} {
				if !strings.Contains(out, want) {
					t.Errorf("environment and nix.conf:\n%s\nwant %q", out, want)
				}
			}

			output(t, n.Command(store, nil, "nix-store", "--init"))
			if _, err := os.Stat(filepath.Join(store, "var/nix/db/db.sqlite")); err != nil {
				t.Errorf("nix-store --init made no database in the store directory: %v", err)
			}
			if out := output(t, n.Command(store, nil, "nix-instantiate", "--eval", "-E", "1 + 1")); out != "2\n" {
				t.Errorf("nix-instantiate --eval -E '1 + 1' = %q, want 2", out)
			}

			// A real build that reads a file from a mounted directory, run from it.
			dir := t.TempDir()
			salt := strconv.FormatInt(time.Now().UnixNano(), 10)
			if err := os.WriteFile(filepath.Join(dir, "in"), []byte(salt+"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			expr := fmt.Sprintf(`derivation { name = "testbed-hello"; system = builtins.currentSystem; builder = "/bin/sh";
				args = ["-c" "read x < %s/in; echo $x > $out"]; }`, dir)
			cmd = n.Command(store, []string{dir}, "nix-build", "--no-out-link", "-E", expr)
			cmd.Dir = dir
			outPath := strings.TrimSpace(output(t, cmd))
			if !strings.HasPrefix(outPath, "/nix/store/") {
				t.Fatalf("nix-build printed %q, want a store path", outPath)
			}
			if got, err := os.ReadFile(filepath.Join(store, strings.TrimPrefix(outPath, "/nix"))); err != nil || string(got) != salt+"\n" {
				t.Errorf("output in the private store = %q (%v), want %q", got, err, salt+"\n")
			}
			if _, err := os.Stat(outPath); err == nil {
				t.Errorf("%s exists in the host's /nix", outPath)
			}
		})
	}
}

func TestCommandRefusesBadArguments(t *testing.T) {
	n := All(t)[0]
	store := NewStore(t)
	for name, cmd := range map[string]*exec.Cmd{
		"relative store": n.Command("store", nil, "true"),
		"no store":       n.Command("", nil, "true"),
		"relative mount": n.Command(store, []string{"dir"}, "true"),
		"zero Nix":       Nix{}.Command(store, nil, "true"),
		"no argv":        n.Command(store, nil),
	} {
		if err := cmd.Run(); err == nil {
			t.Errorf("%s: ran, want an error", name)
		}
	}
	// Without the private namespace the script must refuse to mount anything. The root
	// is a scratch directory, so that even a broken guard would mount only under it.
	fake := t.TempDir()
	t.Cleanup(func() { _ = exec.Command(mustTool("umount"), "-R", "-l", fake).Run() })
	cmd := Nix{Version: n.Version, Root: fake}.Command(store, nil, "true")
	cmd.SysProcAttr = &syscall.SysProcAttr{}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err == nil || !strings.Contains(stderr.String(), "not in a private mount namespace") {
		t.Errorf("Command with SysProcAttr replaced: %v, stderr %q; want a refusal", err, stderr.String())
	}
}

// TestKillCommand checks that KillCommand ends builds, which Nix runs in sessions of their
// own, out of reach of the process group.
func TestKillCommand(t *testing.T) {
	for _, n := range All(t) {
		t.Run(n.Series(), func(t *testing.T) {
			t.Parallel()
			store, dir := NewStore(t), t.TempDir()
			fifo := filepath.Join(dir, "started")
			if err := syscall.Mkfifo(fifo, 0o600); err != nil {
				t.Fatal(err)
			}
			expr := fmt.Sprintf(`derivation { name = "testbed-sleep"; system = builtins.currentSystem; builder = "/bin/sh";
				args = ["-c" "echo $$ > %s; exec /bin/sleep 1000"]; salt = "%d"; }`, fifo, time.Now().UnixNano())
			cmd := n.Command(store, []string{dir}, "nix-build", "--no-out-link", "-E", expr)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			exited := make(chan error, 1)
			go func() { exited <- cmd.Wait() }()
			started := make(chan string, 1)
			go func() {
				b, _ := os.ReadFile(fifo) // blocks until the builder opens the fifo
				started <- strings.TrimSpace(string(b))
			}()
			var builder int
			select {
			case s := <-started:
				builder, _ = strconv.Atoi(s)
			case err := <-exited:
				t.Fatalf("nix-build ended before the build started: %v\n%s", err, stderr.Bytes())
			case <-time.After(30 * time.Second):
				t.Fatalf("the build did not start within 30 s\n%s", stderr.Bytes())
			}
			ns, err := nsOf(cmd.Process.Pid)
			if err != nil {
				t.Fatal(err)
			}
			pids := pidsIn(ns)
			if !slices.Contains(pids, builder) {
				t.Fatalf("builder %d not among the command's processes %v", builder, pids)
			}
			pgid, _ := syscall.Getpgid(builder)
			if pgid == cmd.Process.Pid {
				t.Errorf("the builder is in the command's process group; KillCommand is not needed then")
			}
			before := snapshot(t, pids)
			if err := KillCommand(cmd); err != nil {
				t.Fatal(err)
			}
			<-exited
			if live := alive(before); len(live) > 0 {
				t.Errorf("processes %v survived KillCommand", live)
			}
		})
	}
}

func TestBuilders(t *testing.T) {
	nixes := All(t)
	var bs []*Builder
	for i, n := range append(nixes, nixes[0]) { // two of the first, to compare like with like
		begin := time.Now()
		var opts []BuilderOption
		if i == 0 {
			opts = append(opts, WithNixConf("system-features = testbed-feature"))
		}
		b := StartBuilder(t, n, opts...)
		t.Logf("%s: %v at %s:%d: StartBuilder took %v", b.Name, n, b.Addr, b.Port, time.Since(begin).Round(time.Millisecond))
		bs = append(bs, b)
	}

	t.Run("ssh", func(t *testing.T) {
		addrs := map[string]bool{}
		for _, b := range bs {
			if addrs[b.Addr] {
				t.Errorf("%s: address %s used twice", b.Name, b.Addr)
			}
			addrs[b.Addr] = true
			out := output(t, exec.Command("ssh", "-F", b.SSHConfig, b.Name, "nix-store", "--version"))
			if !strings.Contains(out, b.Nix.Version) {
				t.Errorf("%s: nix-store --version = %q, want %s", b.Name, out, b.Nix.Version)
			}
			known, _ := os.ReadFile(b.KnownHosts)
			if want := fmt.Sprintf("[%s]:%d %s\n", b.Addr, b.Port, b.HostKey); string(known) != want {
				t.Errorf("%s: known_hosts = %q, want %q", b.Name, known, want)
			}
		}
		conf := bs[0].Run(t, `echo "NIX_CONF_DIR=$NIX_CONF_DIR"; cat /etc/nix/nix.conf`)
		for _, want := range []string{"NIX_CONF_DIR=/etc/nix\n", "substituters =\n", "system-features = testbed-feature\n"} {
			if !strings.Contains(conf, want) {
				t.Errorf("%s: nix.conf and environment:\n%s\nwant %q", bs[0].Name, conf, want)
			}
		}
		// One ssh_config for all, as Nix's own hook takes it.
		all := SSHConfigFile(t, bs...)
		for _, b := range bs {
			output(t, exec.Command("ssh", "-F", all, b.Name, "true"))
		}
	})

	t.Run("separate stores", func(t *testing.T) {
		for _, b := range bs {
			b.Run(t, "echo", b.Name, ">", "/nix/marker-"+b.Name)
			if got, err := os.ReadFile(filepath.Join(b.Dir, "nix", "marker-"+b.Name)); err != nil || string(got) != b.Name+"\n" {
				t.Errorf("%s: marker in Dir/nix = %q (%v)", b.Name, got, err)
			}
		}
		for _, b := range bs {
			ls := strings.Fields(b.Run(t, "ls", "/nix"))
			for _, other := range bs {
				if has := slices.Contains(ls, "marker-"+other.Name); has != (other == b) {
					t.Errorf("%s: ls /nix = %v; has %s's marker: %v", b.Name, ls, other.Name, has)
				}
			}
			if _, err := os.Stat("/nix/marker-" + b.Name); err == nil {
				t.Errorf("the host's /nix has %s's marker", b.Name)
			}
			if mi := b.Run(t, "cat", "/proc/self/mountinfo"); !strings.Contains(mi, " /nix ") {
				t.Errorf("%s: no /nix mount in a session's mountinfo:\n%s", b.Name, mi)
			}
		}
		if mi := hostMountinfo(t); strings.Contains(mi, "testbed-") || strings.Contains(mi, bs[0].Dir) {
			t.Errorf("test bed mounts visible in the host's namespace:\n%s", mi)
		}
	})

	t.Run("kill and restart", func(t *testing.T) {
		for _, b := range bs {
			// The remote shell prints its pid, then becomes a long sleep.
			session := b.SSH("echo $$; exec sleep 1000")
			stdout, err := session.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := session.Start(); err != nil {
				t.Fatal(err)
			}
			line, err := bufio.NewReader(stdout).ReadString('\n')
			shell, _ := strconv.Atoi(strings.TrimSpace(line))
			if shell == 0 {
				t.Fatalf("%s: session printed %q (%v), want its pid", b.Name, line, err)
			}
			pids := b.Processes()
			if !slices.Contains(pids, shell) {
				t.Errorf("%s: the session's shell %d is not among Processes() %v", b.Name, shell, pids)
			}
			before := snapshot(t, pids)
			b.Kill()
			if err := session.Wait(); err == nil {
				t.Errorf("%s: the session survived Kill", b.Name)
			}
			if live := alive(before); len(live) > 0 {
				t.Errorf("%s: processes %v survived Kill", b.Name, live)
			}
			if p := b.Processes(); len(p) > 0 {
				t.Errorf("%s: Processes() = %v after Kill", b.Name, p)
			}
			c, err := net.Dial("tcp4", net.JoinHostPort(b.Addr, strconv.Itoa(b.Port)))
			if err == nil {
				c.Close()
			}
			if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("%s: connecting after Kill: %v, want connection refused", b.Name, err)
			}

			begin := time.Now()
			b.Restart(t)
			t.Logf("%s: Restart took %v", b.Name, time.Since(begin).Round(time.Millisecond))
			if got := b.Run(t, "cat", "/nix/marker-"+b.Name); got != b.Name+"\n" {
				t.Errorf("%s: the store lost its marker across Kill and Restart: %q", b.Name, got)
			}
		}
	})

	t.Run("stop", func(t *testing.T) {
		for _, b := range bs {
			pids := b.Processes()
			if len(pids) == 0 {
				t.Fatalf("%s: no processes before Stop", b.Name)
			}
			before := snapshot(t, pids)
			b.Stop()
			b.Stop() // idempotent
			if live := alive(before); len(live) > 0 {
				t.Errorf("%s: processes %v survived Stop", b.Name, live)
			}
			if p := b.Processes(); p != nil {
				t.Errorf("%s: Processes() = %v after Stop", b.Name, p)
			}
			if mi := hostMountinfo(t); strings.Contains(mi, b.Dir) || strings.Contains(mi, "testbed-") {
				t.Errorf("%s: mounts left behind:\n%s", b.Name, mi)
			}
			// The address is free again for another builder.
			l, err := net.Listen("unix", addrLockPrefix+b.Addr)
			if err != nil {
				t.Errorf("%s: address %s still reserved after Stop: %v", b.Name, b.Addr, err)
			} else {
				l.Close()
			}
		}
	})
}

// TestReapOrphans leaves a process behind in a namespace whose owner, a helper test
// process, exits; the next RequireRoot (here reapOrphans) must end it.
func TestReapOrphans(t *testing.T) {
	n := All(t)[0]
	store := NewStore(t)
	helper := exec.Command(os.Args[0], "-test.run=^TestHelperOrphan$")
	helper.Env = append(os.Environ(), "TESTBED_HELPER_ORPHAN="+n.Version+"\n"+n.Root+"\n"+store)
	out := output(t, helper)
	pid, err := strconv.Atoi(strings.TrimSpace(strings.Split(out, "\n")[0]))
	if err != nil {
		t.Fatalf("helper printed %q, want a pid", out)
	}
	orphan := snapshot(t, []int{pid})
	if len(alive(orphan)) != 1 {
		t.Fatalf("the orphan %d is not running", pid)
	}
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGKILL) })
	if owner, ok := nsOwner(pid); !ok || ownerAlive(owner) {
		t.Fatalf("orphan %d: owner %q (tagged: %v), want a dead owner", pid, owner, ok)
	}
	// Another test process's first RequireRoot may end the orphan before this call does,
	// so how many namespaces this call ended says nothing; that the orphan is gone does.
	if _, err := reapOrphans(); err != nil {
		t.Errorf("reapOrphans: %v", err)
	}
	if live := alive(orphan); len(live) > 0 {
		t.Errorf("orphan %d survived reapOrphans", pid)
	}
	// A namespace whose owner lives is left alone.
	cmd := n.Command(store, nil, "sleep", "1000")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = KillCommand(cmd); _ = cmd.Wait() }()
	if _, err := reapOrphans(); err != nil {
		t.Error(err)
	}
	if _, err := nsOf(cmd.Process.Pid); err != nil {
		t.Errorf("reapOrphans killed a command whose owner lives: %v", err)
	}
}

// TestHelperOrphan is TestReapOrphans's helper process: it starts a command that leaves a
// process of its own session behind, prints that process's pid and exits.
func TestHelperOrphan(t *testing.T) {
	spec := os.Getenv("TESTBED_HELPER_ORPHAN")
	if spec == "" {
		return // only a helper process for TestReapOrphans
	}
	f := strings.Split(spec, "\n")
	n := Nix{Version: f[0], Root: f[1]}
	out := output(t, n.Command(f[2], nil, "sh", "-c", "setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $!"))
	fmt.Print(out)
}
