package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/testbed"
)

// ssh-ng machines, with the hook working alone, against builders whose
// key is restricted to `nix-daemon --stdio`: every local Nix against
// every builder Nix of the bed, a failing and a silent build.

const sshNG = `protocol = "ssh-ng"`

func TestHookSSHNGAllPairings(t *testing.T) {
	nixes := testbed.All(t)
	builders := map[string]*testbed.Builder{}
	for _, n := range nixes {
		builders[n.Version] = testbed.StartBuilder(t, n, testbed.WithDaemonOnly())
	}
	for _, local := range nixes {
		for _, remote := range nixes {
			t.Run(fmt.Sprintf("local %s to builder %s", local.Version, remote.Version), func(t *testing.T) {
				b := builders[remote.Version]
				env := newOffloadEnv(t, sshNG, b)
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
				drv := strings.TrimSpace(runNix(t, local, store, env, "nix-store", "-q", "--deriver", out))
				if logText := runNix(t, local, store, env, "nix-store", "-l", drv); !strings.Contains(logText, "remote log line from root") {
					t.Errorf("nix-store -l %s: %q", drv, logText)
				}
				runNix(t, local, store, env, "nix-store", "--verify-path", out)
				if _, err := os.Stat(filepath.Join(b.Dir, "nix", strings.TrimPrefix(out, "/nix/"))); err != nil {
					t.Errorf("root output not on the builder: %v", err)
				}
			})
		}
	}
}

// The machine's activities reach Nix as @nix JSON: a phase the remote
// build sets (its builder's own setPhase message, which the remote Nix
// turns into a result of its build activity) is in nix-build's
// internal-json log, and from Nix 2.19 in the build's log file.
func TestHookSSHNGActivities(t *testing.T) {
	b := testbed.StartBuilder(t, testbed.Lookup(t, "2.34"), testbed.WithDaemonOnly())
	for _, local := range []testbed.Nix{testbed.Lookup(t, "2.8"), testbed.Lookup(t, "2.34")} {
		t.Run("local "+local.Version, func(t *testing.T) {
			env := newOffloadEnv(t, sshNG, b)
			store := testbed.NewStore(t)
			phase := "remotePhase" + randomHex(4)
			expr := env.writeExpr(t, fmt.Sprintf(`derivation { name = "phased"; system = "x86_64-linux"; builder = "/bin/sh";
				args = ["-c" "echo '@nix {\"action\":\"setPhase\",\"phase\":\"%s\"}' >&2; echo in the phase; echo > $out"]; }`, phase))
			out, errOut, err := nixBuild(t, local, store, env, "--log-format", "internal-json", "-v", expr)
			if err != nil {
				t.Fatalf("nix-build: %v\n%s", err, errOut)
			}
			var found bool
			for _, line := range strings.Split(errOut, "\n") {
				js, ok := strings.CutPrefix(line, "@nix ")
				if !ok {
					continue
				}
				var m struct {
					Action string
					Type   int
					Fields []any
				}
				if err := json.Unmarshal([]byte(js), &m); err != nil {
					t.Errorf("nix-build wrote invalid JSON %q: %v", line, err)
				}
				if m.Action == "result" && m.Type == 104 && len(m.Fields) == 1 && m.Fields[0] == phase {
					found = true
				}
			}
			if !found {
				t.Errorf("no setPhase result %q from the machine in:\n%s", phase, errOut)
			}
			if local.Series() == "2.8" {
				return // setPhase lines in the log file come with 2.19
			}
			drv := strings.TrimSpace(runNix(t, local, store, env, "nix-store", "-q", "--deriver", out))
			if logText := runNix(t, local, store, env, "nix-store", "-l", drv); !strings.Contains(logText, `"phase":"`+phase+`"`) ||
				!strings.Contains(logText, "in the phase") {
				t.Errorf("nix-store -l %s: %q", drv, logText)
			}
		})
	}
}

func TestHookSSHNGBuildFailure(t *testing.T) {
	nix := testbed.Lookup(t, "2.34")
	b := testbed.StartBuilder(t, nix, testbed.WithDaemonOnly())
	env := newOffloadEnv(t, sshNG, b)
	store := testbed.NewStore(t)
	expr := env.writeExpr(t, fmt.Sprintf(`derivation { name = "doomed"; salt = %q; system = "x86_64-linux";
		builder = "/bin/sh"; args = ["-c" "echo about to fail; exit 3"]; }`, randomHex(8)))
	_, errOut, err := nixBuild(t, testbed.Lookup(t, "2.8"), store, env, expr)
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

// The machine enforces max-silent-time, which SetOptions carried.
func TestHookSSHNGSilentBuildTimesOut(t *testing.T) {
	nix := testbed.Lookup(t, "2.26")
	b := testbed.StartBuilder(t, nix, testbed.WithDaemonOnly())
	env := newOffloadEnv(t, sshNG, b)
	store := testbed.NewStore(t)
	expr := env.writeExpr(t, fmt.Sprintf(`derivation { name = "silent"; salt = %q; system = "x86_64-linux";
		builder = "/bin/sh"; args = ["-c" "echo going quiet; /bin/sleep 60; echo > $out"]; }`, randomHex(8)))
	start := time.Now()
	_, errOut, err := nixBuild(t, testbed.Lookup(t, "2.8"), store, env, "--option", "max-silent-time", "2", expr)
	if err == nil {
		t.Fatal("a silent build succeeded despite max-silent-time")
	}
	took := time.Since(start)
	t.Logf("failed after %v; nix-build said:\n%s", took.Round(time.Millisecond), errOut)
	if !strings.Contains(errOut, "silence") && !strings.Contains(errOut, "timed out") {
		t.Errorf("no timeout reason in:\n%s", errOut)
	}
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 101 {
		t.Errorf("nix-build exit %v, want 101 (timed out)", err)
	}
	testbed.WaitFor(t, time.Minute, "the remote build to stop", func() bool { return len(sleepers(b)) == 0 })
}

// The same pairings through the broker, whose warm sessions on ssh-ng
// machines are daemon protocol sessions.
func TestBrokerSSHNGAllPairings(t *testing.T) {
	nixes := testbed.All(t)
	builders := map[string]*testbed.Builder{}
	for _, n := range nixes {
		builders[n.Version] = testbed.StartBuilder(t, n, testbed.WithDaemonOnly())
	}
	for _, local := range nixes {
		for _, remote := range nixes {
			t.Run(fmt.Sprintf("local %s to builder %s", local.Version, remote.Version), func(t *testing.T) {
				b := builders[remote.Version]
				store := testbed.NewStore(t)
				env := newBrokerEnvWith(t, local, store, 4, sshNG, b)
				expr := env.writeExpr(t, graphExpr(randomHex(8)))
				out, errOut, err := nixBuild(t, local, store, env.offloadEnv, expr)
				if err != nil {
					t.Fatalf("nix-build: %v\n%s", err, errOut)
				}
				if got := storeFile(t, store, out); got != graphRoot {
					t.Errorf("root output %q, want %q", got, graphRoot)
				}
				if !strings.Contains(errOut, "remote log line from c1") || !strings.Contains(errOut, "remote log line from root") {
					t.Errorf("remote log lines not shown while building:\n%s", errOut)
				}
				if strings.Contains(errOut, "going on without it") || strings.Contains(errOut, "without the broker") {
					t.Errorf("the hooks did not use the broker:\n%s", errOut)
				}
				drv := strings.TrimSpace(runNix(t, local, store, env.offloadEnv, "nix-store", "-q", "--deriver", out))
				if logText := runNix(t, local, store, env.offloadEnv, "nix-store", "-l", drv); !strings.Contains(logText, "remote log line from root") {
					t.Errorf("nix-store -l %s: %q", drv, logText)
				}
				runNix(t, local, store, env.offloadEnv, "nix-store", "--verify-path", out)
				st := env.status(t)
				if len(st.Machines) != 1 || st.Machines[0].Builds != 8 {
					t.Errorf("status: %+v, want 8 builds on one machine", st.Machines)
				}
				env.stop(t)
			})
		}
	}
}

// A failing and a silent build through the broker on an ssh-ng machine.
func TestBrokerSSHNGFailures(t *testing.T) {
	local, remote := testbed.Lookup(t, "2.8"), testbed.Lookup(t, "2.34")
	b := testbed.StartBuilder(t, remote, testbed.WithDaemonOnly())
	store := testbed.NewStore(t)
	env := newBrokerEnvWith(t, local, store, 4, sshNG, b)
	defer env.stop(t)

	expr := env.writeExpr(t, fmt.Sprintf(`derivation { name = "doomed"; salt = %q; system = "x86_64-linux";
		builder = "/bin/sh"; args = ["-c" "echo about to fail; exit 3"]; }`, randomHex(8)))
	_, errOut, err := nixBuild(t, local, store, env.offloadEnv, expr)
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 100 {
		t.Errorf("failing build: nix-build exit %v, want 100\n%s", err, errOut)
	}
	for _, want := range []string{"on '" + machineName(b) + "' failed", "exit code 3", "about to fail"} {
		if !strings.Contains(errOut, want) {
			t.Errorf("nix-build output lacks %q:\n%s", want, errOut)
		}
	}

	expr = env.writeExpr(t, fmt.Sprintf(`derivation { name = "silent"; salt = %q; system = "x86_64-linux";
		builder = "/bin/sh"; args = ["-c" "echo going quiet; /bin/sleep 60; echo > $out"]; }`, randomHex(8)))
	_, errOut, err = nixBuild(t, local, store, env.offloadEnv, "--option", "max-silent-time", "2", expr)
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 101 {
		t.Errorf("silent build: nix-build exit %v, want 101\n%s", err, errOut)
	}
	if !strings.Contains(errOut, "silence") && !strings.Contains(errOut, "timed out") {
		t.Errorf("no timeout reason in:\n%s", errOut)
	}
	testbed.WaitFor(t, time.Minute, "the remote build to stop", func() bool { return len(sleepers(b)) == 0 })
}

// `check` on ssh-ng machines reports the daemon protocol's version, the
// Nix version and the trust the daemon gives the user, and does its round
// trip over the daemon protocol, on builders that run nothing but
// nix-daemon --stdio.
func TestCheckSSHNG(t *testing.T) {
	nixes := testbed.All(t)
	var parts []string
	want := map[string]checkResult{}
	for _, nix := range nixes {
		b := testbed.StartBuilder(t, nix, testbed.WithDaemonOnly())
		parts = append(parts, machineTOML(b, true)+sshNG+"\n")
		r := checkResult{Protocol: "ssh-ng 1.38", NixVersion: nix.Version, Trust: "trusted"}
		if nix.Series() == "2.8" {
			r.Protocol, r.Trust = "ssh-ng 1.34", "unknown"
		}
		want[machineName(b)] = r
	}
	untrusted := testbed.StartBuilder(t, testbed.Lookup(t, "2.34"),
		testbed.WithForcedCommand("nix-daemon --stdio --extra-experimental-features daemon-trust-override --force-untrusted"))
	parts = append(parts, machineTOML(untrusted, true)+sshNG+"\n")
	want[machineName(untrusted)] = checkResult{Protocol: "ssh-ng 1.38", NixVersion: untrusted.Nix.Version, Trust: "not trusted"}

	cfg := writeConfig(t, parts...)
	code, out, errOut := runCLI(t, "check", "-config", cfg, "-json")
	if code != exitOK {
		t.Fatalf("check exited %d\n%s%s", code, out, errOut)
	}
	dec := json.NewDecoder(strings.NewReader(out))
	for dec.More() {
		var r checkResult
		if err := dec.Decode(&r); err != nil {
			t.Fatal(err)
		}
		w, ok := want[r.Machine]
		if !ok {
			t.Errorf("result for an unknown machine: %+v", r)
			continue
		}
		delete(want, r.Machine)
		if !r.OK || r.Protocol != w.Protocol || !strings.Contains(r.NixVersion, w.NixVersion) || r.Trust != w.Trust || r.RoundTrip <= 0 {
			t.Errorf("%s: got %+v, want protocol %q, Nix %q, trust %q", r.Machine, r, w.Protocol, w.NixVersion, w.Trust)
		}
		if (r.Trust == "not trusted") != strings.Contains(r.Hint, "trusted-users") {
			t.Errorf("%s: hint %q for trust %q", r.Machine, r.Hint, r.Trust)
		}
	}
	if len(want) != 0 {
		t.Errorf("no results for %v", want)
	}
	code, out, _ = runCLI(t, "check", "-config", cfg)
	t.Logf("check:\n%s", out)
	if code != exitOK || !strings.Contains(out, "ssh-ng 1.38") || !strings.Contains(out, "ssh-ng 1.34") ||
		!strings.Contains(out, machineName(untrusted)+": not trusted\n  hint: ") {
		t.Errorf("table (exit %d) lacks the protocols or the untrusted machine's hint", code)
	}
}

// TestBuildGraphSSHNG: `build` of TestBuildGraph's chain, wide layer and
// diamond on a builder that allows only nix-daemon --stdio, alone and
// through the broker: every derivation is built there and stays there but
// the root, which comes home valid.
func TestBuildGraphSSHNG(t *testing.T) {
	local := testbed.Lookup(t, "2.8")
	for _, version := range []string{"2.8", "2.26", "2.34"} {
		t.Run("builder "+version, func(t *testing.T) {
			b := testbed.StartBuilder(t, testbed.Lookup(t, version), testbed.WithDaemonOnly())
			for _, viaBroker := range []bool{false, true} {
				t.Run(map[bool]string{false: "alone", true: "broker"}[viaBroker], func(t *testing.T) {
					store := testbed.NewStore(t)
					env := newOffloadEnv(t, sshNG, b)
					if viaBroker {
						env = newBrokerEnvOn(t, local, store, 4, env, nil).offloadEnv
					}
					expr := env.writeExpr(t, graphDiamondExpr(randomHex(8)))
					doc, names, root := graphBuiltOn(t, local, store, env, viaBroker, expr, func(string) *testbed.Builder { return b })
					if got := strings.Fields(root); len(got) != 12 || got[5] != got[7] || !strings.HasPrefix(got[5], "base-") {
						t.Errorf("root's output is %q: want the chain, l and r with one base, the leaves", got)
					}
					d := doc.Derivations[names["c1"]]
					if log, _, err := runCmd(local.Command(store, env.mounts, "nix-store", "-l", d.DrvPath)); err != nil || !strings.Contains(log, "remote log line from c1") {
						t.Errorf("nix-store -l %s: %v\n%s", d.DrvPath, err, log)
					}
				})
			}
		})
	}
}

// crossExpr is a chain a → b → c whose links need a feature of one
// machine or the other: on-ssh, on-ng, on-ssh.
func crossExpr(salt string) string {
	return fmt.Sprintf(`
let
  salt = %q;
  mk = name: feature: deps: derivation {
    inherit name salt;
    system = "x86_64-linux";
    requiredSystemFeatures = [ feature ];
    builder = "/bin/sh";
    args = [ "-c" ("echo remote log line from ${name}; x=${name}; "
      + builtins.concatStringsSep "" (map (d: "read y < ${d}; x=\"$x $y\"; ") deps)
      + "echo \"$x\" > $out") ];
  };
  a = mk "a" "on-ssh" [];
  b = mk "b" "on-ng" [a];
in mk "c" "on-ssh" [b]
`, salt)
}

// TestBuildGraphAcrossProtocols: a chain whose links must go to an ssh
// machine, then an ssh-ng one (nix-daemon --stdio only), then the ssh one
// again, alone and through the broker: each intermediate crosses from the
// machine that built it to the other through this host, in the holder's
// protocol out and the builder's in, and never becomes valid here.
func TestBuildGraphAcrossProtocols(t *testing.T) {
	local := testbed.Lookup(t, "2.8")
	ssh := testbed.StartBuilder(t, testbed.Lookup(t, "2.34"), testbed.WithNixConf("system-features = on-ssh"))
	ng := testbed.StartBuilder(t, testbed.Lookup(t, "2.26"), testbed.WithDaemonOnly(), testbed.WithNixConf("system-features = on-ng"))
	extra := func(b *testbed.Builder) string {
		if b == ng {
			return sshNG + "\nfeatures = [\"on-ng\"]"
		}
		return `features = ["on-ssh"]`
	}
	on := func(name string) *testbed.Builder {
		return map[string]*testbed.Builder{"a": ssh, "b": ng, "c": ssh}[name]
	}
	for _, viaBroker := range []bool{false, true} {
		t.Run(map[bool]string{false: "alone", true: "broker"}[viaBroker], func(t *testing.T) {
			store := testbed.NewStore(t)
			env := newOffloadEnvEach(t, extra, ssh, ng)
			if viaBroker {
				env = newBrokerEnvOn(t, local, store, 4, env, nil).offloadEnv
			}
			expr := env.writeExpr(t, crossExpr(randomHex(8)))
			_, _, root := graphBuiltOn(t, local, store, env, viaBroker, expr, on)
			if root != "c b a" {
				t.Errorf("c's output is %q, want \"c b a\": each input as its machine built it", root)
			}
		})
	}
}

// graphBuiltOn runs `build -json -no-link EXPR` and checks what every
// graph test on ssh-ng machines expects: each derivation Built on the
// machine on(name) names, which still holds its output; the root's output
// home and valid, the others absent here. It returns the document, its
// derivations by name, and the root's output's contents.
func graphBuiltOn(t *testing.T, local testbed.Nix, store string, env offloadEnv, viaBroker bool, expr string,
	on func(name string) *testbed.Builder) (buildDoc, map[string]int, string) {
	t.Helper()
	code, out, errOut := graphBuild(t, local, store, env, "-json", "-no-link", expr)
	if code != 0 {
		t.Fatalf("build exited %d\n%s", code, errOut)
	}
	if strings.Contains(errOut, "not building on") {
		t.Errorf("build left a machine out:\n%s", errOut)
	}
	if viaBroker != strings.Contains(errOut, "in the broker on "+env.socket) {
		t.Errorf("through the broker: want %v\n%s", viaBroker, errOut)
	}
	var doc buildDoc
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("-json: %v\n%s", err, out)
	}
	if len(doc.Roots) != 1 {
		t.Fatalf("-json has %d roots, want 1:\n%s", len(doc.Roots), out)
	}
	names := doc.byName(t)
	var root string
	for name, i := range names {
		d := doc.Derivations[i]
		b := on(name)
		p := d.Outputs["out"]
		if d.Status != "Built" || d.Machine != machineName(b) || p == "" {
			t.Errorf("%s: %s on %q, outputs %v, error %q; want Built on %s", name, d.Status, d.Machine, d.Outputs, d.Error, machineName(b))
			continue
		}
		if _, err := os.Stat(filepath.Join(b.Dir, "nix", strings.TrimPrefix(p, "/nix/"))); err != nil {
			t.Errorf("%s: its output is not on %s: %v", name, b.Name, err)
		}
		if d.DrvPath == doc.Roots[0] {
			runNix(t, local, store, env, "nix-store", "--verify-path", p)
			root = storeFile(t, store, p)
			continue
		}
		if _, err := os.Lstat(filepath.Join(store, "store", filepath.Base(p))); err == nil {
			t.Errorf("intermediate %s came home: %s", name, p)
		}
		if d.Holders[p] != machineName(b) {
			t.Errorf("intermediate %s: -json says %q holds it, want %s", name, d.Holders[p], machineName(b))
		}
	}
	return doc, names, root
}

// TestBuildFetchLaterSSHNG: with -fetch none the outputs stay on the
// ssh-ng builder; run again, the command finds the root there (daemon
// protocol QueryValidPaths and QueryPathInfo), builds nothing, and fetches
// it with NarFromPath, valid here.
func TestBuildFetchLaterSSHNG(t *testing.T) {
	local := testbed.Lookup(t, "2.8")
	b := testbed.StartBuilder(t, testbed.Lookup(t, "2.34"), testbed.WithDaemonOnly())
	env := newOffloadEnv(t, sshNG, b)
	store := testbed.NewStore(t)
	expr := env.writeExpr(t, graphExpr(randomHex(8)))
	if code, _, errOut := graphBuild(t, local, store, env, "-fetch", "none", expr); code != 0 {
		t.Fatalf("first build: exit %d\n%s", code, errOut)
	}
	code, out, errOut := graphBuild(t, local, store, env, "-json", "-no-link", expr)
	if code != 0 || strings.Contains(errOut, "building") {
		t.Fatalf("second build: exit %d, want 0 and nothing built\n%s", code, errOut)
	}
	var doc buildDoc
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatal(err)
	}
	if len(doc.Derivations) != 1 || doc.Derivations[0].Status != "AlreadyValid" || doc.Derivations[0].Machine != machineName(b) {
		t.Fatalf("second build: %+v; want only the root, AlreadyValid on %s", doc.Derivations, machineName(b))
	}
	root := doc.Derivations[0].Outputs["out"]
	runNix(t, local, store, env, "nix-store", "--verify-path", root)
	if got := storeFile(t, store, root); got != graphRoot {
		t.Errorf("root's output %q, want %q", got, graphRoot)
	}
}
