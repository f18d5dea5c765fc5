package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/testbed"
)

// asNobody starts argv as uid and gid 65534, an unprivileged local user,
// and stops it at the end of the test.
func asNobody(t *testing.T, argv ...string) {
	t.Helper()
	setpriv := testbed.Tool(t, "setpriv", "apt-get install util-linux")
	cmd := exec.Command(setpriv, append([]string{"--reuid=65534", "--regid=65534", "--clear-groups"}, argv...)...)
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	// A group of its own, which KillCommand kills: flock's child (the sleep, which holds
	// the lock) goes too, not only flock.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		testbed.KillCommand(cmd)
		if t.Failed() {
			t.Logf("%v said: %s", argv, out.String())
		}
	})
}

// lockedBy reports whether a process holds a flock on the file at path,
// from /proc/locks, whose lines read
//
//	1: FLOCK  ADVISORY  READ  1234 08:01:5678 0 EOF
//
// with the file as major:minor:inode (the inode is enough in a test).
func lockedBy(t *testing.T, path string) bool {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		return false
	}
	ino := strconv.FormatUint(fi.Sys().(*syscall.Stat_t).Ino, 10)
	locks, err := os.ReadFile("/proc/locks")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(locks), "\n") {
		f := strings.Fields(line)
		if len(f) > 5 && f[1] == "FLOCK" && strings.HasSuffix(f[5], ":"+ino) {
			return true
		}
	}
	return false
}

// TestBrokerHostileStateDir: an unprivileged user who holds the health
// lock, or owns or pre-creates files in the state directory, slows a
// 3-derivation build through the broker by no more than a second; and in
// those cases and in a read-only state directory the backoff is kept in
// memory: a machine that failed is not dialled again by the next build,
// across the broker's reload of the file every second. The machine that
// fails is the preferred one, so the broker records its failure while the
// build runs. Before, the broker waited up to 10 s for the lock, holding
// its main lock: 29.7 s for such a build.
func TestBrokerHostileStateDir(t *testing.T) {
	testbed.RequireRoot(t)
	local := testbed.Lookup(t, "2.8")
	good := testbed.StartBuilder(t, testbed.Lookup(t, "2.34"))
	flockTool := testbed.Tool(t, "flock", "apt-get install util-linux")
	sleepTool := testbed.Tool(t, "sleep", "apt-get install coreutils")

	// Each case gets a state directory that nobody can reach (under a
	// directory of mode 0755 in /tmp) and may spoil before the broker starts.
	cases := []struct {
		name  string
		setUp func(t *testing.T, state string)
	}{
		{"baseline", func(*testing.T, string) {}},
		{"lock held from before the directory was tightened", func(t *testing.T, state string) {
			// As earlier versions left it: 0644 in a 0755 directory, so
			// that anyone can open it to take a shared lock.
			lock := filepath.Join(state, "health.json.lock")
			if err := os.WriteFile(lock, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			asNobody(t, flockTool, "-s", lock, sleepTool, "1000")
			testbed.WaitFor(t, 10*time.Second, "nobody to hold "+lock, func() bool { return lockedBy(t, lock) })
			if err := os.Chmod(state, 0o700); err != nil {
				t.Fatal(err)
			}
		}},
		{"directory writable by all, lock held", func(t *testing.T, state string) {
			if err := os.Chmod(state, 0o777); err != nil {
				t.Fatal(err)
			}
			lock := filepath.Join(state, "health.json.lock")
			asNobody(t, flockTool, "-s", lock, sleepTool, "1000")
			testbed.WaitFor(t, 10*time.Second, "nobody to hold "+lock, func() bool { return lockedBy(t, lock) })
		}},
		{"directory owned by nobody, files pre-created", func(t *testing.T, state string) {
			if err := os.Chown(state, 65534, 65534); err != nil {
				t.Fatal(err)
			}
			health := filepath.Join(state, "health.json")
			asNobody(t, "/bin/sh", "-c", fmt.Sprintf(`echo '{"version": 1, "machines": {}}' > %s && exec %s -x %s.lock %s 1000`, health, flockTool, health, sleepTool))
			testbed.WaitFor(t, 10*time.Second, "nobody's files", func() bool { return lockedBy(t, health+".lock") })
		}},
		// Root writes through mode bits, not through the immutable flag: a
		// directory that no process may add a file to, as on a read-only
		// disk, with the files an earlier run left.
		{"read-only state directory", func(t *testing.T, state string) {
			if err := os.Chmod(state, 0o700); err != nil {
				t.Fatal(err)
			}
			health := filepath.Join(state, "health.json")
			if err := os.WriteFile(health, []byte(`{"version": 1, "machines": {}}`+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(health+".lock", nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Mkdir(filepath.Join(state, "slots"), 0o700); err != nil {
				t.Fatal(err)
			}
			chattr := testbed.Tool(t, "chattr", "apt-get install e2fsprogs")
			for _, d := range []string{filepath.Join(state, "slots"), state} {
				if out, err := exec.Command(chattr, "+i", d).CombinedOutput(); err != nil {
					t.Fatalf("chattr +i %s: %v: %s (the test needs a file system with the immutable flag, such as ext4)", d, err, out)
				}
				t.Cleanup(func() { exec.Command(chattr, "-i", d).Run() })
			}
			if err := os.WriteFile(filepath.Join(state, "probe"), nil, 0o600); err == nil {
				t.Fatal("root could still add a file to the immutable directory")
			}
		}},
	}
	var baseline time.Duration
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			base := testbed.SharedDir(t, "nix-offload-state-")
			state := filepath.Join(base, "state")
			if err := os.Mkdir(state, 0o755); err != nil {
				t.Fatal(err)
			}
			tc.setUp(t, state)

			dead := newHangUpListener(t)
			env := newFaultEnv(t, "", faultMachine{b: good, slots: 4})
			cfg, err := os.ReadFile(env.config)
			if err != nil {
				t.Fatal(err)
			}
			text := strings.Replace(string(cfg), fmt.Sprintf("state-dir = %q", filepath.Join(env.dir, "state")), fmt.Sprintf("state-dir = %q", state), 1)
			text += fmt.Sprintf("\n[[machine]]\nhost = \"127.0.0.1\"\nport = %d\nuser = \"root\"\nssh-key = %q\nhost-key = %q\n"+
				"systems = [\"x86_64-linux\"]\nspeed = 10\nparallel-builds = 4\n", dead.port(), good.ClientKey, good.HostKey)
			if err := os.WriteFile(env.config, []byte(text), 0o644); err != nil {
				t.Fatal(err)
			}
			env.mounts = append(env.mounts, base)
			store := testbed.NewStore(t)
			withBroker(t, local, store, env)

			build := func(n int) time.Duration {
				t.Helper()
				expr := env.writeExpr(t, fmt.Sprintf(`let salt = %q; in map (i: derivation {
					name = "s${toString i}"; inherit salt; system = "x86_64-linux"; builder = "/bin/sh";
					args = [ "-c" "echo ${toString i} > $out" ]; }) (builtins.genList (i: i + 1) %d)`, randomHex(8), n))
				start := time.Now()
				out, errOut, err := startBuild(t, local, store, env, expr).wait(t, 2*time.Minute)
				took := time.Since(start)
				if err != nil {
					t.Fatalf("nix-build: %v\n%s", err, errOut)
				}
				if got := len(strings.Fields(out)); got != n {
					t.Fatalf("%d outputs, want %d", got, n)
				}
				return took
			}
			took := build(3)
			dials := dead.count.Load()
			t.Logf("3 derivations in %v; the failing machine dialled %d times", took.Round(time.Millisecond), dials)
			if tc.name == "baseline" {
				baseline = took
			} else if baseline == 0 {
				t.Fatal("no baseline")
			} else if took > baseline+time.Second {
				t.Errorf("3 derivations took %v, %v without a hostile state directory: slowed by more than a second", took.Round(time.Millisecond), baseline.Round(time.Millisecond))
			}
			if dials == 0 {
				t.Fatal("the failing machine was never dialled: the case tests nothing")
			}
			// An absence needs a window: the broker reloads the health file
			// every second, and used to replace what it knew with the stale
			// file then. 1.5 s holds at least one reload.
			time.Sleep(1500 * time.Millisecond)
			build(1)
			if got := dead.count.Load(); got != dials {
				t.Errorf("the failing machine was dialled %d times more by the next build, within its backoff", got-dials)
			}
		})
	}
}
