package main

// `nix-offload-hook build` on the test bed: real nix-instantiate and
// nix-store on the host side, real builders over SSH.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/testbed"
)

// buildDoc is -json's document, as README, "Queue runners" describes it.
type buildDoc struct {
	Roots       []string `json:"roots"`
	Derivations []struct {
		DrvPath string            `json:"drvPath"`
		Status  string            `json:"status"`
		Machine string            `json:"machine"`
		Start   *time.Time        `json:"start"`
		Stop    *time.Time        `json:"stop"`
		Error   string            `json:"error"`
		Outputs map[string]string `json:"outputs"`
		Holders map[string]string `json:"holders"`
	} `json:"derivations"`
}

// byName indexes the document's derivations by derivation name
// (/nix/store/HASH-NAME.drv → NAME).
func (d buildDoc) byName(t *testing.T) map[string]int {
	t.Helper()
	out := map[string]int{}
	for i, r := range d.Derivations {
		name := strings.TrimSuffix(filepath.Base(r.DrvPath)[33:], ".drv")
		out[name] = i
	}
	return out
}

// graphBuild runs `nix-offload-hook build ARGS...` with nix's local store
// in store, in the env's directory; stdout and stderr are returned with
// the exit code.
func graphBuild(t *testing.T, nix testbed.Nix, store string, env offloadEnv, args ...string) (int, string, string) {
	t.Helper()
	cmd := graphBuildCmd(t, nix, store, env, args...)
	stdout, stderr, err := runCmd(cmd)
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0, stdout, stderr
	case errors.As(err, &ee):
		return ee.ExitCode(), stdout, stderr
	}
	t.Fatalf("build: %v\n%s", err, stderr)
	return -1, "", ""
}

// startGraphBuild starts `nix-offload-hook build ARGS...` and returns it
// with its stdout and stderr as they grow; the test's end kills it.
func startGraphBuild(t *testing.T, nix testbed.Nix, store string, env offloadEnv, args ...string) (*exec.Cmd, *syncBuffer, *syncBuffer) {
	t.Helper()
	cmd := graphBuildCmd(t, nix, store, env, args...)
	stdout, stderr := &syncBuffer{}, &syncBuffer{}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { testbed.KillCommand(cmd) })
	return cmd, stdout, stderr
}

func graphBuildCmd(t *testing.T, nix testbed.Nix, store string, env offloadEnv, args ...string) *exec.Cmd {
	t.Helper()
	argv := append([]string{testbed.HookBinary(t), "build", "-config", env.config}, args...)
	cmd := nix.Command(store, env.mounts, argv...)
	cmd.Dir = env.dir
	return cmd
}

// graphDiamondExpr is a chain (c0 → c1 → c2), four independent leaves and
// a diamond (base under l and r) under one root. base's output is unique
// to its build (a timestamp), and l and r copy it: equal copies mean that
// base was built once.
func graphDiamondExpr(salt string) string {
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
  base = derivation { name = "base"; inherit salt; system = "x86_64-linux"; builder = "/bin/sh";
    args = [ "-c" "echo remote log line from base; read t _ < /proc/uptime; echo base-$t$$ > $out" ]; };
  c0 = mk "c0" [];
  c1 = mk "c1" [c0];
  c2 = mk "c2" [c1];
  w = map (i: mk "w${toString i}" []) [1 2 3 4];
  l = mk "l" [base];
  r = mk "r" [base];
in mk "root" ([c2 l r] ++ w)
`, salt)
}

// TestBuildGraph: a chain, a wide layer and a diamond build across two
// machines in one command. stdout is the root's output path, which comes
// home with the out-link as a GC root; the intermediates stay on the
// builders and their logs are where `nix-store -l` reads them; -json names
// every derivation with the documented fields.
func TestBuildGraph(t *testing.T) {
	for _, version := range []string{"2.8", "2.26", "2.34"} {
		t.Run(version, func(t *testing.T) { testBuildGraph(t, testbed.Lookup(t, version)) })
	}
}

func testBuildGraph(t *testing.T, local testbed.Nix) {
	b1, b2 := testbed.StartBuilder(t, local), testbed.StartBuilder(t, local)
	env := newOffloadEnv(t, "", b1, b2)
	store := testbed.NewStore(t)
	expr := env.writeExpr(t, graphDiamondExpr(randomHex(8)))

	code, out, errOut := graphBuild(t, local, store, env, "-json", "-out-link", filepath.Join(env.dir, "result"), expr)
	if code != 0 {
		t.Fatalf("build exited %d\n%s", code, errOut)
	}
	t.Logf("stderr:\n%s", errOut)
	var doc buildDoc
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("-json: %v\n%s", err, out)
	}
	names := doc.byName(t)
	if len(doc.Derivations) != 11 || len(doc.Roots) != 1 {
		t.Fatalf("-json has %d derivations and %d roots, want 11 and 1:\n%s", len(doc.Derivations), len(doc.Roots), out)
	}
	machines := map[string]bool{}
	for _, d := range doc.Derivations {
		if d.Status != "Built" || d.Machine == "" || d.Start == nil || d.Stop == nil || d.Stop.Before(*d.Start) || d.Outputs["out"] == "" || d.Error != "" {
			t.Errorf("derivation %s: status %q machine %q start %v stop %v outputs %v error %q; want Built, with a machine, times and an output",
				d.DrvPath, d.Status, d.Machine, d.Start, d.Stop, d.Outputs, d.Error)
		}
		machines[d.Machine] = true
	}
	if len(machines) != 2 {
		t.Errorf("built on %v, want both machines", machines)
	}

	root := doc.Derivations[names["root"]].Outputs["out"]
	got := strings.Fields(storeFile(t, store, root))
	if len(got) != 12 || got[0] != "root" || got[1] != "c2" || got[4] != "l" || got[6] != "r" || got[5] != got[7] || !strings.HasPrefix(got[5], "base-") {
		t.Errorf("root's output is %q: want root, the chain, l and r with one base, the leaves", got)
	}
	if link, err := os.Readlink(filepath.Join(env.dir, "result")); err != nil || link != root {
		t.Errorf("out-link: %q, %v; want %s", link, err, root)
	}
	roots, _, err := runCmd(local.Command(store, env.mounts, "nix-store", "--gc", "--print-roots"))
	if err != nil || !strings.Contains(roots, filepath.Join(env.dir, "result")) {
		t.Errorf("the out-link is not a GC root (%v):\n%s", err, roots)
	}
	for _, name := range []string{"c0", "c1", "c2", "base", "l", "r", "w1"} {
		d := doc.Derivations[names[name]]
		if _, err := os.Lstat(filepath.Join(store, "store", filepath.Base(d.Outputs["out"]))); err == nil {
			t.Errorf("intermediate %s came home: %s", name, d.Outputs["out"])
		}
		if d.Holders[d.Outputs["out"]] == "" {
			t.Errorf("intermediate %s: -json names no machine that holds it", name)
		}
		log, _, err := runCmd(local.Command(store, env.mounts, "nix-store", "-l", d.DrvPath))
		if err != nil || !strings.Contains(log, "remote log line from "+name) {
			t.Errorf("nix-store -l %s: %v\n%s", d.DrvPath, err, log)
		}
		log, errOut, err := runCmd(local.Command(store, env.mounts, "nix", "--extra-experimental-features", "nix-command", "log", d.DrvPath))
		if err != nil || !strings.Contains(log, "remote log line from "+name) {
			t.Errorf("nix log %s: %v\n%s%s", d.DrvPath, err, log, errOut)
		}
	}
	// Everything is valid now: nothing more is built.
	code, out, errOut = graphBuild(t, local, store, env, "-no-link", expr)
	if code != 0 || out != root || strings.Contains(errOut, "building") {
		t.Errorf("second build: exit %d, stdout %q, stderr:\n%s\nwant exit 0, the root and no build", code, out, errOut)
	}
}

// failingLeafExpr: leaves ok1..ok3, a leaf that fails with a message, and
// a root over all of them; late depends on ok1 only.
func failingLeafExpr(salt string) string {
	return fmt.Sprintf(`
let
  salt = %q;
  mk = name: script: deps: derivation {
    inherit name salt;
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" (script + "; echo ${name} > $out") ];
    inherit deps;
  };
  oks = map (i: mk "ok${toString i}" "true" []) [1 2 3];
  bad = mk "bad" "echo this leaf is broken >&2; exit 3" [];
  late = mk "late" "true" [(builtins.head oks)];
in mk "root" "true" (oks ++ [bad late])
`, salt)
}

// TestBuildFailingLeaf: exit 100 as nix-build, the failed derivation named
// with the machine's message; with -keep-going every derivation that does
// not depend on it is built and the root is DependencyFailed.
func TestBuildFailingLeaf(t *testing.T) {
	local := testbed.Lookup(t, "2.8")
	b := testbed.StartBuilder(t, local)
	env := newOffloadEnv(t, "", b)
	for _, keepGoing := range []bool{false, true} {
		t.Run(fmt.Sprintf("keep-going=%v", keepGoing), func(t *testing.T) {
			store := testbed.NewStore(t)
			expr := env.writeExpr(t, failingLeafExpr(randomHex(8)))
			args := []string{"-json", "-no-link"}
			if keepGoing {
				args = append(args, "-keep-going")
			}
			code, out, errOut := graphBuild(t, local, store, env, append(args, expr)...)
			if code != 100 {
				t.Fatalf("exit %d, want 100\n%s", code, errOut)
			}
			if !regexpMatch(`derivation\(s\) failed:\n  '/nix/store/[a-z0-9]{32}-bad\.drv' \(PermanentFailure\): build of .* failed: .*exit code 3`, errOut) {
				t.Errorf("stderr does not name the failed derivation with its message:\n%s", errOut)
			}
			var doc buildDoc
			if err := json.Unmarshal([]byte(out), &doc); err != nil {
				t.Fatalf("-json: %v\n%s", err, out)
			}
			names := doc.byName(t)
			st := func(n string) string { return doc.Derivations[names[n]].Status }
			if st("bad") != "PermanentFailure" || st("root") != "DependencyFailed" {
				t.Errorf("bad %s, root %s; want PermanentFailure, DependencyFailed", st("bad"), st("root"))
			}
			if keepGoing {
				for _, n := range []string{"ok1", "ok2", "ok3", "late"} {
					if st(n) != "Built" {
						t.Errorf("%s: %s with -keep-going, want Built", n, st(n))
					}
				}
			} else if st("late") == "Built" {
				// MaxRunning is 4 (one machine with 4 slots): bad, ok1..ok3 start
				// together; late waits for ok1 and must not start after bad failed.
				t.Logf("late was built: ok1 finished before bad failed")
			}
		})
	}
}

func regexpMatch(re, s string) bool { return regexp.MustCompile(re).MatchString(s) }

// slowGraphExpr: n independent sleepers under a root.
func slowGraphExpr(salt string, n int) string {
	return fmt.Sprintf(`
let
  salt = %q;
  slow = i: derivation { name = "slow${toString i}"; inherit salt; system = "x86_64-linux"; builder = "/bin/sh";
    args = [ "-c" "echo sleeping; /bin/sleep 300; echo > $out" ]; };
in derivation { name = "root"; inherit salt; system = "x86_64-linux"; builder = "/bin/sh";
  deps = map slow (builtins.genList (i: i) %d); args = [ "-c" "echo > $out" ]; }
`, salt, n)
}

// TestBuildInterruptStopsRemoteBuilds: SIGINT to the command stops every
// remote build within a second, on every machine.
func TestBuildInterruptStopsRemoteBuilds(t *testing.T) {
	local := testbed.Lookup(t, "2.8")
	b1, b2 := testbed.StartBuilder(t, local), testbed.StartBuilder(t, local)
	env := newOffloadEnv(t, "", b1, b2)
	store := testbed.NewStore(t)
	cmd, _, stderr := startGraphBuild(t, local, store, env, "-no-link", env.writeExpr(t, slowGraphExpr(randomHex(8), 4)))
	testbed.WaitFor(t, time.Minute, "sleepers on both machines", func() bool {
		return len(sleepers(b1)) > 0 && len(sleepers(b2)) > 0
	})
	start := time.Now()
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	testbed.WaitFor(t, 5*time.Second, "every remote build to stop", func() bool {
		return len(sleepers(b1)) == 0 && len(sleepers(b2)) == 0
	})
	if d := time.Since(start); d > time.Second {
		t.Errorf("the remote builds stopped %v after SIGINT, want within 1 s", d.Round(time.Millisecond))
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err == nil {
			t.Errorf("the command exited 0 after SIGINT")
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("the command did not exit within 5 s of SIGINT\n%s", stderr.String())
	}
}

// TestBuildMachineKilledMidGraph: a machine dies while it builds; its
// build moves to the other machine, and so do the outputs it held, built
// again there, and the graph completes.
func TestBuildMachineKilledMidGraph(t *testing.T) {
	local := testbed.Lookup(t, "2.8")
	b1, b2 := testbed.StartBuilder(t, local), testbed.StartBuilder(t, local)
	env := newOffloadEnv(t, "", b1, b2)
	store := testbed.NewStore(t)
	mark(t, b1, true)
	mark(t, b2, true)
	// leaves build at once; marked sleeps where the mark is, under a root
	// that needs it and every leaf.
	expr := env.writeExpr(t, fmt.Sprintf(`
let
  salt = %q;
  leaf = i: derivation { name = "leaf${toString i}"; inherit salt; system = "x86_64-linux"; builder = "/bin/sh";
    args = [ "-c" "echo leaf ${toString i} > $out" ]; };
  marked = derivation { name = "marked"; inherit salt; system = "x86_64-linux"; builder = "/bin/sh";
    deps = map leaf [1 2 3 4 5 6]; args = [ "-c" "if [ -e /nix/.slow ]; then /bin/sleep 300; fi; echo done > $out" ]; };
in derivation { name = "root"; inherit salt marked; system = "x86_64-linux"; builder = "/bin/sh";
  deps = map leaf [1 2 3 4 5 6]; args = [ "-c" "for f in $marked $deps; do while read l; do echo \"$l\"; done < $f; done > $out" ]; }
`, randomHex(8)))
	cmd, stdout, stderr := startGraphBuild(t, local, store, env, "-no-link", expr)
	busy, other := runningOn(t, b1, b2)
	mark(t, other, false)
	busy.Kill()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("build: %v\n%s", err, stderr.String())
		}
	case <-time.After(2 * time.Minute):
		t.Fatalf("the build did not finish within 2 minutes of the kill\n%s", stderr.String())
	}
	got := storeFile(t, store, strings.TrimSpace(stdout.String()))
	if !strings.HasPrefix(got, "done\nleaf 1\n") || strings.Count(got, "leaf") != 6 {
		t.Errorf("root's output %q, want done and the six leaves", got)
	}
	// The leaves the dead machine held were built again on the other.
	for i := 1; i <= 6; i++ {
		built := regexp.MustCompile(fmt.Sprintf(`built '/nix/store/[a-z0-9]{32}-leaf%d\.drv' on '([^']*)'`, i)).FindAllStringSubmatch(stderr.String(), -1)
		if len(built) == 0 || built[0][1] == machineName(busy) && (len(built) != 2 || built[1][1] != machineName(other)) {
			t.Errorf("leaf%d was built on %v; want it built again on the survivor if the dead machine held it", i, built)
		}
	}
	t.Logf("stderr:\n%s", stderr.String())
}

// TestBuildLostIntermediateRebuilt: a graph built with -fetch none leaves
// its outputs on the builder; the builder then collects one intermediate
// (nothing holds it once the command's sessions are gone). Run again, the
// command finds what is still there, builds the lost one again and what
// needs it, and nothing else. (Lost in the middle of a run, with the
// machine: TestBuildMachineKilledMidGraph. While the command runs, its warm
// sessions hold what they built as temporary roots, so a collection on the
// machine does not take it.)
func TestBuildLostIntermediateRebuilt(t *testing.T) {
	local := testbed.Lookup(t, "2.8")
	b := testbed.StartBuilder(t, local)
	env := newOffloadEnv(t, "", b)
	store := testbed.NewStore(t)
	expr := env.writeExpr(t, fmt.Sprintf(`
let
  salt = %q;
  c0 = derivation { name = "c0"; inherit salt; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo c0 > $out" ]; };
  c1 = derivation { name = "c1"; inherit salt c0; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "read x < $c0; echo $x c1 > $out" ]; };
in derivation { name = "root"; inherit salt c1; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "read x < $c1; echo $x root > $out" ]; }
`, randomHex(8)))
	code, _, errOut := graphBuild(t, local, store, env, "-fetch", "none", expr)
	if code != 0 {
		t.Fatalf("first build: exit %d\n%s", code, errOut)
	}
	b.Run(t, "sh", "-c", "'nix-store --delete /nix/store/*-c1 /nix/store/*-root'")
	code, out, errOut := graphBuild(t, local, store, env, "-no-link", expr)
	if code != 0 {
		t.Fatalf("second build: exit %d\n%s", code, errOut)
	}
	if got := storeFile(t, store, out); got != "c0 c1 root" {
		t.Errorf("root's output %q", got)
	}
	if strings.Contains(errOut, "-c0.drv' on") || !strings.Contains(errOut, "built '/nix/store/") ||
		strings.Count(errOut, "built '") != 2 {
		t.Errorf("second build: want c1 and root built again and c0 taken from the builder:\n%s", errOut)
	}
}

// TestBuildFetchLater: with -fetch none nothing comes home; the same build
// run again finds every output on the builders, builds nothing, and
// fetches the root with its closure (here the chain below it, which it
// refers to).
func TestBuildFetchLater(t *testing.T) {
	local := testbed.Lookup(t, "2.8")
	b1, b2 := testbed.StartBuilder(t, local), testbed.StartBuilder(t, local)
	env := newOffloadEnv(t, "", b1, b2)
	store := testbed.NewStore(t)
	expr := env.writeExpr(t, fmt.Sprintf(`
let
  salt = %q;
  c0 = derivation { name = "c0"; inherit salt; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo c0 > $out" ]; };
  c1 = derivation { name = "c1"; inherit salt c0; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo $c0 > $out" ]; };
  w = derivation { name = "w"; inherit salt; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo w > $out" ]; };
in derivation { name = "root"; inherit salt c1 w; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "read w < $w; echo $c1 $w > $out" ]; }
`, randomHex(8)))
	code, out, errOut := graphBuild(t, local, store, env, "-fetch", "none", "-json", expr)
	if code != 0 || strings.Count(errOut, "built '") != 4 {
		t.Fatalf("first build: exit %d, want 0 and 4 builds\n%s", code, errOut)
	}
	var first buildDoc
	if err := json.Unmarshal([]byte(out), &first); err != nil {
		t.Fatal(err)
	}
	byName := first.byName(t)
	root := first.Derivations[byName["root"]].Outputs["out"]
	// c1 goes where its input is, which has free slots (c0 and w are all
	// that run before it): nothing to copy.
	if a, b := first.Derivations[byName["c0"]].Machine, first.Derivations[byName["c1"]].Machine; a != b {
		t.Errorf("c0 was built on %s, c1 on %s: want the machine that holds c1's input", a, b)
	}
	if _, err := os.Lstat(filepath.Join(store, "store", filepath.Base(root))); err == nil {
		t.Errorf("-fetch none brought %s home", root)
	}
	if _, err := os.Lstat(filepath.Join(env.dir, "result")); err == nil {
		t.Errorf("-fetch none made an out-link")
	}
	code, out, errOut = graphBuild(t, local, store, env, "-json", expr)
	if code != 0 || strings.Contains(errOut, "building") {
		t.Fatalf("second build: exit %d, want 0 and nothing built\n%s", code, errOut)
	}
	var doc buildDoc
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatal(err)
	}
	r := doc.Derivations[doc.byName(t)["root"]]
	if r.Status != "AlreadyValid" || r.Machine == "" || r.Outputs["out"] != root {
		t.Errorf("root in the second run: %+v; want AlreadyValid on a machine", r)
	}
	got := strings.Fields(storeFile(t, store, root))
	if len(got) != 2 || got[1] != "w" {
		t.Fatalf("root's output %q", got)
	}
	if c0 := storeFile(t, store, got[0]); !strings.HasSuffix(c0, "-c0") {
		t.Errorf("c1 came home with the root's closure, but holds %q", c0)
	}
	if _, err := os.Lstat(filepath.Join(store, "store", filepath.Base(storeFile(t, store, got[0])))); err != nil {
		t.Errorf("c0, in the root's closure, did not come home: %v", err)
	}
	if link, err := os.Readlink(filepath.Join(env.dir, "result")); err != nil || link != root {
		t.Errorf("out-link: %q, %v", link, err)
	}
	// w is not in the root's closure: it stays on its builder.
	if ws, _ := filepath.Glob(filepath.Join(store, "store", "*-w")); len(ws) > 0 {
		t.Errorf("w, outside the root's closure, came home: %v", ws)
	}
	if _, ok := doc.byName(t)["c1"]; ok || len(doc.Derivations) != 1 {
		t.Errorf("the second run read below the root, which a machine holds: %d derivations", len(doc.Derivations))
	}
}

// TestBuildThroughBroker: with a broker running, the graph goes through its
// queue and warm sessions: the same results as alone, intermediates held
// on the builders and streamed between them by the broker, logs kept.
func TestBuildThroughBroker(t *testing.T) {
	local := testbed.Lookup(t, "2.8")
	b1, b2 := testbed.StartBuilder(t, local), testbed.StartBuilder(t, local)
	store := testbed.NewStore(t)
	env := newBrokerEnv(t, local, store, 4, b1, b2)
	expr := env.writeExpr(t, graphDiamondExpr(randomHex(8)))
	code, out, errOut := graphBuild(t, local, store, env.offloadEnv, "-json", "-no-link", expr)
	if code != 0 {
		t.Fatalf("build exited %d\n%s", code, errOut)
	}
	if !strings.Contains(errOut, "in the broker on "+env.socket) {
		t.Errorf("stderr does not say the broker is used:\n%s", errOut)
	}
	var doc buildDoc
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("-json: %v\n%s", err, out)
	}
	names := doc.byName(t)
	for _, d := range doc.Derivations {
		if d.Status != "Built" || d.Machine == "" {
			t.Errorf("%s: %s on %q", d.DrvPath, d.Status, d.Machine)
		}
	}
	root := doc.Derivations[names["root"]].Outputs["out"]
	got := strings.Fields(storeFile(t, store, root))
	if len(got) != 12 || got[5] != got[7] || !strings.HasPrefix(got[5], "base-") {
		t.Errorf("root's output is %q", got)
	}
	for _, name := range []string{"c0", "base", "l"} {
		d := doc.Derivations[names[name]]
		if _, err := os.Lstat(filepath.Join(store, "store", filepath.Base(d.Outputs["out"]))); err == nil {
			t.Errorf("intermediate %s came home", name)
		}
		log, _, err := runCmd(local.Command(store, env.mounts, "nix-store", "-l", d.DrvPath))
		if err != nil || !strings.Contains(log, "remote log line from "+name) {
			t.Errorf("nix-store -l %s: %v\n%s", d.DrvPath, err, log)
		}
	}
	// The broker counts a build and frees its slot just after the outputs
	// event that lets the command go on.
	var built uint64
	var used, queued int
	testbed.WaitFor(t, 10*time.Second, "the broker to count the graph's 11 builds, with every slot free", func() bool {
		st := env.status(t)
		built, used, queued = 0, 0, st.Queued
		for _, m := range st.Machines {
			built += m.Builds
			used += m.SlotsUsed
		}
		return built == 11 && used == 0 && queued == 0
	})
}

// TestBuildBrokerRestartedMidGraph: the broker dies while a graph runs; the
// command fails, and run again on the restarted broker it finds what was
// built on the builders and builds only the rest.
func TestBuildBrokerRestartedMidGraph(t *testing.T) {
	local := testbed.Lookup(t, "2.8")
	b := testbed.StartBuilder(t, local)
	store := testbed.NewStore(t)
	env := newBrokerEnv(t, local, store, 4, b)
	mark(t, b, true)
	expr := env.writeExpr(t, fmt.Sprintf(`
let
  salt = %q;
  c0 = derivation { name = "c0"; inherit salt; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo c0 > $out" ]; };
  c1 = derivation { name = "c1"; inherit salt c0; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "read x < $c0; echo $x c1 > $out" ]; };
  waiter = derivation { name = "waiter"; inherit salt; system = "x86_64-linux"; builder = "/bin/sh";
    args = [ "-c" "while [ -e /nix/.slow ]; do /bin/sleep 0.1; done; echo waited > $out" ]; };
in derivation { name = "root"; inherit salt c1 waiter; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "read a < $c1; read b < $waiter; echo $a $b > $out" ]; }
`, randomHex(8)))
	cmd, _, stderr := startGraphBuild(t, local, store, env.offloadEnv, "-no-link", expr)
	testbed.WaitFor(t, time.Minute, "c0 and c1 to be built", func() bool {
		return strings.Count(stderr.String(), "built '") == 2
	})
	testbed.KillCommand(env.cmd)
	env.cmd.Wait()
	var ee *exec.ExitError
	if err := cmd.Wait(); !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(stderr.String(), "broker: the stream of graph ") {
		t.Fatalf("the build without its broker: %v, want exit 1 saying the broker went away\n%s", err, stderr.String())
	}
	first := stderr.String()
	mark(t, b, false)
	env.start(t, local, store)
	code, out, errOut := graphBuild(t, local, store, env.offloadEnv, "-no-link", expr)
	if code != 0 {
		t.Fatalf("second build: exit %d\n%s\nfirst build:\n%s", code, errOut, first)
	}
	if got := storeFile(t, store, out); got != "c0 c1 waited" {
		t.Errorf("root's output %q", got)
	}
	for _, name := range []string{"c0", "c1"} {
		if strings.Contains(errOut, "-"+name+".drv' on") {
			t.Errorf("%s was built again after the restart:\n%s", name, errOut)
		}
	}
	if strings.Count(errOut, "built '") != 2 {
		t.Errorf("second build: want waiter and root built, and nothing else:\n%s", errOut)
	}
}

// TestBuildTwoGraphsShareBuilds: two build commands of the same graph at
// once, through one broker: every derivation runs once. Each build appends
// a line to a file in its machine's /nix, so every run counts, on either
// machine.
func TestBuildTwoGraphsShareBuilds(t *testing.T) {
	local := testbed.Lookup(t, "2.8")
	b1, b2 := testbed.StartBuilder(t, local), testbed.StartBuilder(t, local)
	store := testbed.NewStore(t)
	env := newBrokerEnv(t, local, store, 4, b1, b2)
	expr := env.writeExpr(t, fmt.Sprintf(`
let
  salt = %q;
  mk = name: deps: derivation { inherit name salt deps; system = "x86_64-linux"; builder = "/bin/sh";
    args = [ "-c" "echo ran >> /nix/.runs-${name}; /bin/sleep 2; echo ${name} > $out" ]; };
in mk "root" (map (i: mk "leaf${toString i}" []) [1 2 3])
`, randomHex(8)))
	type result struct {
		code         int
		out, errText string
	}
	results := make(chan result, 2)
	for range 2 {
		go func() {
			code, out, errOut := graphBuild(t, local, store, env.offloadEnv, "-no-link", expr)
			results <- result{code, out, errOut}
		}()
	}
	for range 2 {
		r := <-results
		if r.code != 0 {
			t.Fatalf("a build exited %d\n%s", r.code, r.errText)
		}
	}
	for _, name := range []string{"root", "leaf1", "leaf2", "leaf3"} {
		runs := 0
		for _, b := range []*testbed.Builder{b1, b2} {
			data, _ := os.ReadFile(filepath.Join(b.Dir, "nix", ".runs-"+name))
			runs += strings.Count(string(data), "ran")
		}
		if runs != 1 {
			t.Errorf("%s ran %d times for the two graphs, want once", name, runs)
		}
	}
}

// TestBuildAttributes: a .nix file with -A, once per attribute (Nix 2.34
// here): stdout has one path per attribute, in order, and the out-links
// are named as nix-build names them (result, result-2, result-2-dev).
func TestBuildAttributes(t *testing.T) {
	local := testbed.Lookup(t, "2.34")
	b := testbed.StartBuilder(t, local)
	env := newOffloadEnv(t, "", b)
	store := testbed.NewStore(t)
	expr := env.writeExpr(t, fmt.Sprintf(`
let salt = %q; in {
  one = derivation { name = "one"; inherit salt; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo one > $out" ]; };
  two = derivation { name = "two"; inherit salt; system = "x86_64-linux"; builder = "/bin/sh"; outputs = [ "out" "dev" ];
    args = [ "-c" "echo two > $out; echo two-dev > $dev" ]; };
}
`, randomHex(8)))
	link := filepath.Join(env.dir, "result")
	code, out, errOut := graphBuild(t, local, store, env, "-out-link", link, "-A", "one", "-A", "two", expr)
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, errOut)
	}
	paths := strings.Fields(out)
	if len(paths) != 3 || !strings.HasSuffix(paths[0], "-one") || !strings.HasSuffix(paths[1], "-two") || !strings.HasSuffix(paths[2], "-two-dev") {
		t.Fatalf("stdout %q, want one, two and two-dev", out)
	}
	for i, name := range []string{"result", "result-2", "result-2-dev"} {
		if got, err := os.Readlink(filepath.Join(env.dir, name)); err != nil || got != paths[i] {
			t.Errorf("out-link %s: %q, %v; want %s", name, got, err, paths[i])
		}
	}
	if got := storeFile(t, store, paths[2]); got != "two-dev" {
		t.Errorf("two's dev output holds %q", got)
	}
}

// What `build` prints as it goes: statusRe is the progress line, eventRe
// one derivation's start or end (the machine in group 1 or 2).
var (
	statusRe = regexp.MustCompile(`^\[(\d+)/(\d+) built, (\d+) running, (\d+) queued, (\d+) failed\](?: (.*))?$`)
	eventRe  = regexp.MustCompile(`^(?:building '/nix/store/[a-z0-9]{32}-[^']+\.drv' on '([^']+)'|built '/nix/store/[a-z0-9]{32}-[^']+\.drv' on '([^']+)' in [0-9.]+[mµn]?s)$`)
)

// TestBuildProgressOnTerminal: with stderr on a terminal (a pseudo-terminal
// here), `build` shows one progress line at the bottom, redrawn in place
// after every derivation's start and end: built out of the total, running
// per machine, queued, failed. Each event line is printed over the erased
// progress line, never after it, so the screen holds the event lines and
// one final count. On a pipe the same build prints plain event lines only,
// without control characters. Alone and through a broker alike.
func TestBuildProgressOnTerminal(t *testing.T) {
	local := testbed.Lookup(t, "2.8")
	for _, viaBroker := range []bool{false, true} {
		name := "alone"
		if viaBroker {
			name = "broker"
		}
		t.Run(name, func(t *testing.T) {
			b1, b2 := testbed.StartBuilder(t, local), testbed.StartBuilder(t, local)
			store := testbed.NewStore(t)
			var env offloadEnv
			if viaBroker {
				env = newBrokerEnv(t, local, store, 4, b1, b2).offloadEnv
			} else {
				env = newOffloadEnv(t, "", b1, b2)
			}
			machines := []string{machineName(b1), machineName(b2)}
			slices.Sort(machines)
			testProgressOnTerminal(t, local, store, env, machines)
			testProgressOnPipe(t, local, store, env)
		})
	}
}

// testProgressOnTerminal builds graphDiamondExpr's 11 derivations with
// stderr on a terminal and checks what the terminal received and shows.
func testProgressOnTerminal(t *testing.T, local testbed.Nix, store string, env offloadEnv, machines []string) {
	term := openTerminal(t)
	cmd := graphBuildCmd(t, local, store, env, "-no-link", env.writeExpr(t, graphDiamondExpr(randomHex(8))))
	var stdout bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, term.tty
	err := cmd.Run()
	testbed.KillCommand(cmd)
	raw := term.Output(t)
	if err != nil {
		t.Fatalf("build on a terminal: %v\n%q", err, raw)
	}
	lines := screen(t, raw)

	// The screen: whatever came before the first derivation (the broker's
	// graph line), then only event lines, the final count and the empty
	// line the cursor is on.
	first := slices.IndexFunc(lines, eventRe.MatchString)
	if first < 0 || len(lines) < first+3 {
		t.Fatalf("the terminal shows no build:\n%s", strings.Join(lines, "\n"))
	}
	events, final := lines[first:len(lines)-2], lines[len(lines)-2:]
	onScreen := map[string]bool{}
	for _, l := range events {
		m := eventRe.FindStringSubmatch(l)
		if m == nil {
			t.Errorf("the terminal shows %q among the event lines: not one derivation's start or end", l)
			continue
		}
		onScreen[m[1]+m[2]] = true
	}
	if len(events) != 22 {
		t.Errorf("the terminal shows %d event lines, want 22 (11 derivations started and built):\n%s", len(events), strings.Join(events, "\n"))
	}
	if final[0] != "[11/11 built, 0 running, 0 queued, 0 failed]" || final[1] != "" {
		t.Errorf("the terminal ends with %q, want the final count [11/11 built, 0 running, 0 queued, 0 failed] and the cursor on an empty line", final)
	}
	if !slices.Equal(slices.Sorted(maps.Keys(onScreen)), machines) {
		t.Errorf("the event lines name the machines %v, want %v", slices.Sorted(maps.Keys(onScreen)), machines)
	}

	// The progress line as drawn: once after each event, redrawn in place
	// (carriage return, erase to the end of the line), its counts moving
	// only forward, its machines the ones that build.
	if n := strings.Count(raw, "\r\033[K"); n != 23 {
		t.Errorf("the progress line was erased %d times, want 23: before each of the 22 event lines and before the final count", n)
	}
	drawn := statusLines(raw)
	if len(drawn) != 22 {
		t.Fatalf("the progress line was drawn %d times, want 22:\n%s", len(drawn), strings.Join(drawn, "\n"))
	}
	prevBuilt := 0
	named := map[string]bool{}
	for _, s := range drawn {
		m := statusRe.FindStringSubmatch(s)
		if m == nil {
			t.Errorf("progress line %q is not [built/total built, running, queued, failed] machines", s)
			continue
		}
		built, total, running, failed := atoi(t, m[1]), atoi(t, m[2]), atoi(t, m[3]), atoi(t, m[5])
		if total != 11 || built < prevBuilt || failed != 0 {
			t.Errorf("progress line %q after %d built: want 11 in all, built only growing, none failed", s, prevBuilt)
		}
		prevBuilt = built
		perMachine := 0
		if m[6] != "" {
			for _, part := range strings.Split(m[6], ", ") {
				name, n, ok := strings.Cut(part, ": ")
				if !ok || !slices.Contains(machines, name) {
					t.Errorf("progress line %q: %q is not MACHINE: RUNNING for one of %v", s, part, machines)
					continue
				}
				named[name] = true
				perMachine += atoi(t, n)
			}
		}
		if perMachine != running {
			t.Errorf("progress line %q: %d running, but the machines run %d", s, running, perMachine)
		}
	}
	if !slices.Equal(slices.Sorted(maps.Keys(named)), machines) {
		t.Errorf("the progress line named the machines %v, want both of %v", slices.Sorted(maps.Keys(named)), machines)
	}
	if prevBuilt != 11 {
		t.Errorf("the last progress line drawn counts %d built, want 11", prevBuilt)
	}
}

// testProgressOnPipe builds a fresh graphDiamondExpr with stderr on a pipe:
// one plain line per derivation's start and end, no progress line, no
// control characters.
func testProgressOnPipe(t *testing.T, local testbed.Nix, store string, env offloadEnv) {
	code, _, errOut := graphBuild(t, local, store, env, "-no-link", env.writeExpr(t, graphDiamondExpr(randomHex(8))))
	if code != 0 {
		t.Fatalf("build on a pipe exited %d\n%s", code, errOut)
	}
	if strings.ContainsAny(errOut, "\r\033") {
		t.Errorf("stderr on a pipe has control characters: %q", errOut)
	}
	events := 0
	for _, l := range strings.Split(errOut, "\n") {
		switch {
		case statusRe.MatchString(l) || strings.Contains(l, " built, "):
			t.Errorf("stderr on a pipe has a progress line: %q", l)
		case eventRe.MatchString(l):
			events++
		}
	}
	if events != 22 {
		t.Errorf("stderr on a pipe has %d event lines, want 22 (11 derivations started and built):\n%s", events, errOut)
	}
}

func atoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatalf("%q: %v", s, err)
	}
	return n
}
