package main

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/testbed"
)

// offloadEnv is what a local side needs to offload to builders: a config
// directory (offload.toml, state dir) and the mounts that make it, the hook
// and the builders' client keys visible inside a chroot Nix.
type offloadEnv struct {
	dir    string
	config string
	// socket is the broker socket config names, in dir: until a test starts a broker
	// there (newBrokerEnv, withBroker), the hook finds none and runs embedded.
	socket string
	mounts []string
}

func newOffloadEnv(t *testing.T, extra string, builders ...*testbed.Builder) offloadEnv {
	t.Helper()
	return newOffloadEnvEach(t, func(*testbed.Builder) string { return extra }, builders...)
}

// newOffloadEnvEach is newOffloadEnv with extra lines of each builder's
// own in its table (a mixed ssh and ssh-ng pair).
func newOffloadEnvEach(t *testing.T, extra func(*testbed.Builder) string, builders ...*testbed.Builder) offloadEnv {
	t.Helper()
	dir := t.TempDir()
	var cfg strings.Builder
	// A socket of the test's own: on the default one a broker of the machine could answer.
	socket := filepath.Join(dir, "hook.sock")
	fmt.Fprintf(&cfg, "[daemon]\nsocket = %q\nstate-dir = %q\n\n", socket, filepath.Join(dir, "state"))
	mounts := []string{dir, filepath.Dir(testbed.HookBinary(t))}
	for _, b := range builders {
		cfg.WriteString(machineTOML(b, true))
		cfg.WriteString("parallel-builds = 4\n" + extra(b) + "\n")
		mounts = append(mounts, filepath.Dir(b.ClientKey))
	}
	p := filepath.Join(dir, "offload.toml")
	if err := os.WriteFile(p, []byte(cfg.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return offloadEnv{dir: dir, config: p, socket: socket, mounts: mounts}
}

// writeExpr writes a Nix expression file into the env's directory.
func (e offloadEnv) writeExpr(t *testing.T, expr string) string {
	t.Helper()
	p := filepath.Join(e.dir, fmt.Sprintf("expr-%s.nix", randomHex(4)))
	if err := os.WriteFile(p, []byte(expr), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// graphExpr is a chain of 3 and 4 independent derivations under one root;
// every builder prints a log line naming itself. The root's output holds
// every name, so a wrong or missing input shows in the result.
func graphExpr(salt string) string {
	return fmt.Sprintf(`
let
  salt = %q;
  mk = name: deps: derivation {
    inherit name salt;
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" ("echo remote log line from ${name}; x=${name}; "
      + builtins.concatStringsSep "" (map (d: "read y < ${d}; x=\"$x $y\"; ") deps)
      + "echo \"$x\" > $out") ];
  };
  c0 = mk "c0" [];
  c1 = mk "c1" [c0];
  c2 = mk "c2" [c1];
  w = map (i: mk "w${toString i}" []) [1 2 3 4];
in mk "root" ([c2] ++ w)
`, salt)
}

const graphRoot = "root c2 c1 c0 w1 w2 w3 w4"

// nixBuild runs nix-build with our hook and everything offloaded.
func nixBuild(t *testing.T, nix testbed.Nix, store string, env offloadEnv, args ...string) (string, string, error) {
	t.Helper()
	return runCmd(nixBuildCmd(t, nix, store, env, args...))
}

func nixBuildCmd(t *testing.T, nix testbed.Nix, store string, env offloadEnv, args ...string) *exec.Cmd {
	t.Helper()
	argv := append([]string{"nix-build", "--max-jobs", "0", "--no-out-link",
		"--option", "build-hook", testbed.HookBinary(t), "--option", "substituters", ""}, args...)
	cmd := nix.Command(store, env.mounts, argv...)
	cmd.Env = append(cmd.Env, "NIX_OFFLOAD_CONFIG="+env.config)
	return cmd
}

// runCmd runs a test bed command to the end, ends whatever it left in its
// namespace, and returns its trimmed stdout and its stderr.
func runCmd(cmd *exec.Cmd) (string, string, error) {
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	testbed.KillCommand(cmd)
	return strings.TrimSpace(stdout.String()), stderr.String(), err
}

// storeFile reads a store path's content from the host view of a test store.
func storeFile(t *testing.T, store, path string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(store, strings.TrimPrefix(path, "/nix/")))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// TestHookAllPairings builds a chain and a wide graph remotely with every
// local Nix against every builder Nix on the test bed.
func TestHookAllPairings(t *testing.T) {
	nixes := testbed.All(t)
	builders := map[string]*testbed.Builder{}
	for _, n := range nixes {
		builders[n.Version] = testbed.StartBuilder(t, n)
	}
	for _, local := range nixes {
		for _, remote := range nixes {
			t.Run(fmt.Sprintf("local %s to builder %s", local.Version, remote.Version), func(t *testing.T) {
				b := builders[remote.Version]
				env := newOffloadEnv(t, "", b)
				store := testbed.NewStore(t)
				expr := env.writeExpr(t, graphExpr(randomHex(8)))
				out, errOut, err := nixBuild(t, local, store, env, expr)
				if err != nil {
					t.Fatalf("nix-build: %v\n%s", err, errOut)
				}
				if got := storeFile(t, store, out); got != graphRoot {
					t.Errorf("root output %q, want %q", got, graphRoot)
				}
				if !strings.Contains(errOut, "remote log line from c1") || !strings.Contains(errOut, "remote log line from root") {
					t.Errorf("remote log lines not shown while building:\n%s", errOut)
				}
				if !strings.Contains(errOut, fmt.Sprintf("on '%s'", machineName(b))) {
					t.Errorf("nix-build does not say the build ran on the builder:\n%s", errOut)
				}
				// The log is kept locally: nix-store -l shows the remote's lines.
				drv := strings.TrimSpace(runNix(t, local, store, env, "nix-store", "-q", "--deriver", out))
				logText := runNix(t, local, store, env, "nix-store", "-l", drv)
				if !strings.Contains(logText, "remote log line from root") {
					t.Errorf("nix-store -l %s: %q", drv, logText)
				}
				// Outputs are valid with the right hash (nix-store --verify-path).
				runNix(t, local, store, env, "nix-store", "--verify-path", out)
				// Nothing was built locally: the builder's store has the root too.
				if _, err := os.Stat(filepath.Join(b.Dir, "nix", strings.TrimPrefix(out, "/nix/"))); err != nil {
					t.Errorf("root output not on the builder: %v", err)
				}
			})
		}
	}
}

func machineName(b *testbed.Builder) string { return fmt.Sprintf("root@%s:%d", b.Addr, b.Port) }

func runNix(t *testing.T, nix testbed.Nix, store string, env offloadEnv, argv ...string) string {
	t.Helper()
	cmd := nix.Command(store, env.mounts, argv...)
	out, err := cmd.Output()
	testbed.KillCommand(cmd)
	if err != nil {
		var stderr string
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		t.Fatalf("%s: %v\n%s", strings.Join(argv, " "), err, stderr)
	}
	return string(out)
}

// TestHookThroughDaemon: a real nix-daemon of each version runs the hook
// for a client.
func TestHookThroughDaemon(t *testing.T) {
	for _, nix := range testbed.All(t) {
		t.Run(nix.Version, func(t *testing.T) {
			b := testbed.StartBuilder(t, nix)
			env := newOffloadEnv(t, "", b)
			store := testbed.NewStore(t)
			daemon := nix.Command(store, env.mounts, "nix-daemon", "--option", "build-hook", testbed.HookBinary(t),
				"--option", "max-jobs", "0", "--option", "substituters", "")
			daemon.Env = append(daemon.Env, "NIX_OFFLOAD_CONFIG="+env.config)
			var daemonErr bytes.Buffer
			daemon.Stderr = &daemonErr
			if err := daemon.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { testbed.KillCommand(daemon); daemon.Wait() })
			sock := filepath.Join(store, "var/nix/daemon-socket/socket")
			testbed.WaitFor(t, time.Minute, "daemon socket", func() bool { _, err := os.Stat(sock); return err == nil })

			expr := env.writeExpr(t, graphExpr(randomHex(8)))
			client := nix.Command(store, env.mounts, "nix-build", "--no-out-link", expr)
			client.Env = append(client.Env, "NIX_REMOTE=daemon")
			out, errOut, err := runCmd(client)
			if err != nil {
				t.Fatalf("nix-build through the daemon: %v\n%s\ndaemon:\n%s", err, errOut, daemonErr.String())
			}
			if got := storeFile(t, store, out); got != graphRoot {
				t.Errorf("root output %q", got)
			}
			if !strings.Contains(errOut, "remote log line from root") {
				t.Errorf("client did not see the remote log:\n%s", errOut)
			}
		})
	}
}

// TestHookBuildFailure: the machine's message reaches the user, with the
// exit status Nix maps to a build failure.
func TestHookBuildFailure(t *testing.T) {
	nix := testbed.Lookup(t, "2.8")
	b := testbed.StartBuilder(t, nix)
	env := newOffloadEnv(t, "", b)
	store := testbed.NewStore(t)
	expr := env.writeExpr(t, fmt.Sprintf(`derivation { name = "doomed"; salt = %q; system = "x86_64-linux";
		builder = "/bin/sh"; args = ["-c" "echo about to fail; exit 3"]; }`, randomHex(8)))
	_, errOut, err := nixBuild(t, nix, store, env, expr)
	if err == nil {
		t.Fatal("nix-build of a failing derivation succeeded")
	}
	t.Logf("nix-build said:\n%s", errOut)
	for _, want := range []string{"build of '", "on '" + machineName(b) + "' failed", "exit code 3", "about to fail"} {
		if !strings.Contains(errOut, want) {
			t.Errorf("nix-build output lacks %q:\n%s", want, errOut)
		}
	}
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 100 {
		t.Errorf("nix-build exit %v, want 100 (build failure)", err)
	}
}

// TestHookDeclinesUnsupportedFeature: a derivation needing a feature no
// machine has is declined with the reason and built locally.
func TestHookDeclinesUnsupportedFeature(t *testing.T) {
	nix := testbed.Lookup(t, "2.8")
	b := testbed.StartBuilder(t, nix)
	env := newOffloadEnv(t, "", b)
	store := testbed.NewStore(t)
	expr := env.writeExpr(t, fmt.Sprintf(`derivation { name = "needs-kvm"; salt = %q; system = "x86_64-linux";
		requiredSystemFeatures = ["kvm"]; builder = "/bin/sh"; args = ["-c" "echo local > $out"]; }`, randomHex(8)))
	cmd := nix.Command(store, env.mounts, "nix-build", "--max-jobs", "1", "--no-out-link",
		"--option", "build-hook", testbed.HookBinary(t), "--option", "substituters", "",
		"--option", "system-features", "kvm", expr)
	cmd.Env = append(cmd.Env, "NIX_OFFLOAD_CONFIG="+env.config)
	out, errOut, err := runCmd(cmd)
	if err != nil {
		t.Fatalf("nix-build: %v\n%s", err, errOut)
	}
	if got := storeFile(t, store, out); got != "local" {
		t.Errorf("output %q", got)
	}
	if !strings.Contains(errOut, "not offloading") || !strings.Contains(errOut, "kvm") {
		t.Errorf("no reason given for building locally:\n%s", errOut)
	}
}

// TestHookInterrupt: interrupting nix-build leaves no build running on the
// machine, although Nix kills the hook with SIGKILL.
func TestHookInterrupt(t *testing.T) {
	nix := testbed.Lookup(t, "2.8")
	b := testbed.StartBuilder(t, nix)
	env := newOffloadEnv(t, "", b)
	store := testbed.NewStore(t)
	expr := env.writeExpr(t, fmt.Sprintf(`derivation { name = "sleeper"; salt = %q; system = "x86_64-linux";
		builder = "/bin/sh"; args = ["-c" "echo sleeping; /bin/sleep 300; echo > $out"]; }`, randomHex(8)))
	argv := []string{"nix-build", "--max-jobs", "0", "--no-out-link",
		"--option", "build-hook", testbed.HookBinary(t), "--option", "substituters", "", expr}
	cmd := nix.Command(store, env.mounts, argv...)
	cmd.Env = append(cmd.Env, "NIX_OFFLOAD_CONFIG="+env.config)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { testbed.KillCommand(cmd) })
	testbed.WaitFor(t, time.Minute, "the build to run on the builder", func() bool { return len(sleepers(b)) > 0 })
	// Ctrl-C: SIGINT to nix-build's process group.
	syscall.Kill(-cmd.Process.Pid, syscall.SIGINT)
	cmd.Wait()
	stopped := time.Now()
	testbed.WaitFor(t, time.Minute, "the remote build to stop", func() bool { return len(sleepers(b)) == 0 })
	t.Logf("remote build gone %v after nix-build exited", time.Since(stopped).Round(time.Millisecond))
}

func sleepers(b *testbed.Builder) []int {
	var out []int
	for _, pid := range b.Processes() {
		c, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if bytes.Contains(c, []byte("sleep")) {
			out = append(out, pid)
		}
	}
	return out
}

// TestHookSilentBuildTimesOut: max-silent-time reaches the machine, the
// build stops with a clear message and Nix's timeout status.
func TestHookSilentBuildTimesOut(t *testing.T) {
	nix := testbed.Lookup(t, "2.8")
	b := testbed.StartBuilder(t, nix)
	env := newOffloadEnv(t, "", b)
	store := testbed.NewStore(t)
	expr := env.writeExpr(t, fmt.Sprintf(`derivation { name = "silent"; salt = %q; system = "x86_64-linux";
		builder = "/bin/sh"; args = ["-c" "echo going quiet; /bin/sleep 60; echo > $out"]; }`, randomHex(8)))
	start := time.Now()
	_, errOut, err := nixBuild(t, nix, store, env, "--option", "max-silent-time", "2", expr)
	if err == nil {
		t.Fatal("a silent build succeeded despite max-silent-time")
	}
	t.Logf("failed after %v; nix-build said:\n%s", time.Since(start).Round(time.Millisecond), errOut)
	if !strings.Contains(errOut, "silence") && !strings.Contains(errOut, "timed out") {
		t.Errorf("no timeout reason in:\n%s", errOut)
	}
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 101 {
		t.Errorf("nix-build exit %v, want 101 (timed out)", err)
	}
	testbed.WaitFor(t, time.Minute, "the remote build to stop", func() bool { return len(sleepers(b)) == 0 })
}

// TestHookMachineDiesMidBuild: after acceptance, a lost machine with no
// other capable machine fails the build clearly (it is not left hanging)
// and names the machine. With another machine the build moves there
// (faults_integration_test.go).
func TestHookMachineDiesMidBuild(t *testing.T) {
	nix := testbed.Lookup(t, "2.8")
	b := testbed.StartBuilder(t, nix)
	env := newOffloadEnv(t, "", b)
	store := testbed.NewStore(t)
	expr := env.writeExpr(t, fmt.Sprintf(`derivation { name = "orphan"; salt = %q; system = "x86_64-linux";
		builder = "/bin/sh"; args = ["-c" "echo sleeping; /bin/sleep 300; echo > $out"]; }`, randomHex(8)))
	done := make(chan struct{})
	var errOut string
	var err error
	go func() {
		defer close(done)
		_, errOut, err = nixBuild(t, nix, store, env, expr)
	}()
	testbed.WaitFor(t, time.Minute, "the build to run on the builder", func() bool { return len(sleepers(b)) > 0 })
	b.Kill()
	select {
	case <-done:
	case <-time.After(60 * time.Second): // a bound on a hang, not a timing assertion
		t.Fatal("nix-build still running a minute after its machine died")
	}
	if err == nil {
		t.Fatal("nix-build succeeded although its machine died")
	}
	t.Logf("nix-build said:\n%s", errOut)
	if !strings.Contains(errOut, machineName(b)) {
		t.Errorf("the failure does not name the machine:\n%s", errOut)
	}
}

// TestHookSkipsUnreachableMachine: the preferred machine is down; the build
// goes to the next one and the log says why.
func TestHookSkipsUnreachableMachine(t *testing.T) {
	nix := testbed.Lookup(t, "2.8")
	dead := testbed.StartBuilder(t, nix)
	good := testbed.StartBuilder(t, nix)
	dead.Stop()
	env := newOffloadEnv(t, "", good)
	// The dead machine is faster, so it is tried first.
	extra := machineTOML(dead, true) + "parallel-builds = 4\nspeed = 10.0\n"
	cfg, _ := os.ReadFile(env.config)
	os.WriteFile(env.config, append(cfg, []byte("\n"+extra)...), 0o644)
	env.mounts = append(env.mounts, filepath.Dir(dead.ClientKey))
	store := testbed.NewStore(t)
	expr := env.writeExpr(t, graphExpr(randomHex(8)))
	out, errOut, err := nixBuild(t, nix, store, env, expr)
	if err != nil {
		t.Fatalf("nix-build: %v\n%s", err, errOut)
	}
	if got := storeFile(t, store, out); got != graphRoot {
		t.Errorf("root output %q", got)
	}
	if !strings.Contains(errOut, "cannot use '"+machineName(dead)+"'") || !strings.Contains(errOut, "connection refused") {
		t.Errorf("no word about skipping the dead machine:\n%s", errOut)
	}
}

// TestHookUsesNixBuilders: without offload.toml the hook takes Nix's own
// `builders` setting, so an existing setup moves over by changing only
// build-hook; `--builders ”` still turns remote builds off.
func TestHookUsesNixBuilders(t *testing.T) {
	nix := testbed.Lookup(t, "2.26")
	b := testbed.StartBuilder(t, nix)
	env := newOffloadEnv(t, "", b)
	store := testbed.NewStore(t)
	spec := fmt.Sprintf("ssh://root@%s:%d x86_64-linux %s 4 1 - - %s", b.Addr, b.Port, b.ClientKey, base64Line(b.HostKey))
	expr := env.writeExpr(t, graphExpr(randomHex(8)))
	run := func(builders string) (string, string, error) {
		cmd := nix.Command(store, env.mounts, "nix-build", "--max-jobs", "0", "--no-out-link",
			"--option", "build-hook", testbed.HookBinary(t), "--option", "substituters", "", "--builders", builders, expr)
		cmd.Env = append(cmd.Env, "NIX_OFFLOAD_CONFIG=")
		return runCmd(cmd)
	}

	if _, errOut, err := run(""); err == nil || !strings.Contains(errOut, "builders setting is empty") {
		t.Errorf("--builders '' with max-jobs 0: err %v, want a failure that says builders is empty:\n%s", err, errOut)
	}
	out, errOut, err := run(spec)
	if err != nil {
		t.Fatalf("nix-build --builders: %v\n%s", err, errOut)
	}
	if got := storeFile(t, store, out); got != graphRoot {
		t.Errorf("root output %q", got)
	}
}
