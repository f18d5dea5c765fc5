package main

// `nix-offload-hook build` on the test bed: real nix-instantiate and
// nix-store on the host side, real builders over SSH.

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/testbed"
)

// buildDoc is -json's document, as docs/graph-build.md describes it.
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
	local := testbed.Lookup(t, "2.8")
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
	}
	// Everything is valid now: nothing more is built.
	code, out, errOut = graphBuild(t, local, store, env, "-no-link", expr)
	if code != 0 || out != root || strings.Contains(errOut, "building") {
		t.Errorf("second build: exit %d, stdout %q, stderr:\n%s\nwant exit 0, the root and no build", code, out, errOut)
	}
}
