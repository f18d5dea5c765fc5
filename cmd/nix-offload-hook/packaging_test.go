package main

import (
	"bytes"
	"debug/elf"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/nix-community/go-nix/pkg/nixbase32"

	"github.com/nix-offload/nix-offload/internal/graph"
	"github.com/nix-offload/nix-offload/internal/testbed"
)

// make runs the Makefile's target with vars, returning its output.
func runMake(t *testing.T, vars ...string) string {
	t.Helper()
	mk := testbed.Tool(t, "make", "apt-get install make")
	cmd := exec.Command(mk, append([]string{"-C", repoRoot(t), "--no-print-directory"}, vars...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("make %s: %v\n%s", strings.Join(vars, " "), err, out)
	}
	return string(out)
}

// TestMakeInstall: `make install` puts a static, version-stamped binary, the units with
// ExecStart= pointing at it and the example configuration where PREFIX, DESTDIR and friends
// say; it never touches an existing /etc/nix/offload.toml; `make uninstall` removes what it
// installed and nothing else. Installed without DESTDIR, the units pass systemd-analyze verify.
func TestMakeInstall(t *testing.T) {
	tmp := t.TempDir()
	bin := filepath.Join(tmp, "build", "nix-offload-hook")
	dest := filepath.Join(tmp, "dest")
	mine := filepath.Join(dest, "etc", "nix", "offload.toml")
	if err := os.MkdirAll(filepath.Dir(mine), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(mine, []byte("# the operator's own\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	vars := []string{"GO=" + testbed.GoTool(t), "BIN=" + bin, "VERSION=v9.8.7-test", "DESTDIR=" + dest, "PREFIX=/usr"}
	runMake(t, append([]string{"install"}, vars...)...)

	hook := filepath.Join(dest, "usr", "bin", "nix-offload-hook")
	for path, mode := range map[string]os.FileMode{
		hook: 0o755,
		filepath.Join(dest, "etc/systemd/system/nix-offload.socket"):  0o644,
		filepath.Join(dest, "etc/systemd/system/nix-offload.service"): 0o644,
		filepath.Join(dest, "etc/nix/offload.toml.example"):           0o644,
	} {
		fi, err := os.Stat(path)
		if err != nil {
			t.Errorf("not installed: %v", err)
		} else if fi.Mode().Perm() != mode {
			t.Errorf("%s has mode %v, want %v", path, fi.Mode().Perm(), mode)
		}
	}
	if out, err := exec.Command(hook, "version").Output(); err != nil || string(out) != "nix-offload-hook v9.8.7-test\n" {
		t.Errorf("installed binary: version %q, %v; want the stamped v9.8.7-test", out, err)
	}
	if f, err := elf.Open(hook); err != nil {
		t.Error(err)
	} else {
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP {
				t.Error("the installed binary is dynamically linked (PT_INTERP); it must be static (CGO_ENABLED=0)")
			}
		}
		f.Close()
	}
	svc, _ := os.ReadFile(filepath.Join(dest, "etc/systemd/system/nix-offload.service"))
	if !strings.Contains(string(svc), "\nExecStart=/usr/bin/nix-offload-hook daemon\n") || strings.Contains(string(svc), "/usr/local/bin/nix-offload-hook") {
		t.Errorf("installed service's ExecStart does not name the installed binary:\n%s", svc)
	}
	same := func(installed, source string) {
		a, _ := os.ReadFile(filepath.Join(dest, installed))
		b, _ := os.ReadFile(filepath.Join(repoRoot(t), source))
		if len(b) == 0 || !bytes.Equal(a, b) {
			t.Errorf("%s differs from %s", installed, source)
		}
	}
	same("etc/systemd/system/nix-offload.socket", "systemd/nix-offload.socket")
	same("etc/nix/offload.toml.example", "examples/offload.toml")
	if b, _ := os.ReadFile(mine); string(b) != "# the operator's own\n" {
		t.Errorf("install changed the existing offload.toml: %q", b)
	}

	runMake(t, append([]string{"uninstall"}, vars...)...)
	for _, gone := range []string{hook, "etc/systemd/system/nix-offload.socket", "etc/systemd/system/nix-offload.service", "etc/nix/offload.toml.example"} {
		if !filepath.IsAbs(gone) {
			gone = filepath.Join(dest, gone)
		}
		if _, err := os.Stat(gone); err == nil {
			t.Errorf("uninstall left %s", gone)
		}
	}
	if _, err := os.Stat(mine); err != nil {
		t.Errorf("uninstall removed the operator's offload.toml: %v", err)
	}

	// Installed for real under a prefix of its own: the units name a binary that exists,
	// and systemd checks them.
	prefix := filepath.Join(tmp, "prefix")
	units := filepath.Join(tmp, "units")
	runMake(t, "install", "GO="+testbed.GoTool(t), "BIN="+bin, "PREFIX="+prefix, "SYSTEMDUNITDIR="+units, "SYSCONFDIR="+filepath.Join(tmp, "etc"))
	analyze := testbed.Tool(t, "systemd-analyze", "apt-get install systemd")
	out, err := exec.Command(analyze, "verify", filepath.Join(units, "nix-offload.socket"), filepath.Join(units, "nix-offload.service")).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("systemd-analyze verify of the installed units: %v\n%s", err, out)
	}
}

// TestExampleConfig: examples/offload.toml, which `make install` ships, is accepted by
// `check -config-only`, and its [daemon] paths are the ones the units use.
func TestExampleConfig(t *testing.T) {
	root := repoRoot(t)
	code, out, errOut := runCLI(t, "check", "-config-only", "-config", filepath.Join(root, "examples", "offload.toml"))
	if code != exitOK {
		t.Fatalf("check -config-only examples/offload.toml: exit %d\n%s%s", code, out, errOut)
	}
	socket := parseUnitFile(t, filepath.Join(root, "systemd", "nix-offload.socket"))["Socket"]["ListenStream"]
	state := parseUnitFile(t, filepath.Join(root, "systemd", "nix-offload.service"))["Service"]["StateDirectory"]
	if len(socket) != 1 || len(state) != 1 {
		t.Fatalf("units: ListenStream %q, StateDirectory %q", socket, state)
	}
	want := "broker socket " + socket[0] + ", state dir /var/lib/" + state[0] + ","
	if !strings.Contains(out, want) || !strings.Contains(out, "root@builder1.example.org") || !strings.Contains(out, "nixbuild@builder2.example.org:2222") {
		t.Errorf("summary lacks %q or the two machines:\n%s", want, out)
	}
}

// TestServiceWritesNixLogDir: under ProtectSystem=strict the broker can write only what the
// service makes writable, and it writes every graph derivation's build log to Nix's log
// directory (graph.DefaultLogDir: NIX_LOG_DIR, else /nix/var/log/nix) for `nix log`. The
// service's ReadWritePaths= names the directory the broker uses with the service's
// environment.
func TestServiceWritesNixLogDir(t *testing.T) {
	service := parseUnitFile(t, filepath.Join(repoRoot(t), "systemd", "nix-offload.service"))["Service"]
	if got := service["ProtectSystem"]; !slices.Equal(got, []string{"strict"}) {
		t.Fatalf("ProtectSystem=%q; this test is about strict", got)
	}
	logDir := graph.NixLogDir
	for _, e := range service["Environment"] {
		if v, ok := strings.CutPrefix(e, "NIX_LOG_DIR="); ok {
			logDir = v
		}
	}
	var paths []string
	for _, v := range service["ReadWritePaths"] {
		for _, p := range strings.Fields(v) {
			paths = append(paths, strings.TrimPrefix(p, "-"))
		}
	}
	if !slices.Contains(paths, logDir) {
		t.Errorf("ReadWritePaths=%q does not name %s, where the broker writes graphs' build logs", service["ReadWritePaths"], logDir)
	}
}

// TestFlakeVendorHash: the vendorHash in nixos-module/package.nix is the NAR hash of what
// buildGoModule vendors (`go mod vendor`), so the flake builds. It goes stale when go.mod,
// go.sum or the set of imported packages changes.
func TestFlakeVendorHash(t *testing.T) {
	if strings.Contains(os.Getenv("GOFLAGS"), "-mod=vendor") {
		t.Skip("skipping: running inside a Nix build, where the vendor directory is the fixed-output derivation this hash describes")
	}
	nixHash := testbed.Tool(t, "nix-hash", "apt-get install nix-bin")
	root := repoRoot(t)
	pkg, err := os.ReadFile(filepath.Join(root, "nixos-module", "package.nix"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^\s*vendorHash = "(sha256-[A-Za-z0-9+/=]+)";`).FindSubmatch(pkg)
	if m == nil {
		t.Fatal(`nixos-module/package.nix has no vendorHash = "sha256-…";`)
	}
	vendor := filepath.Join(t.TempDir(), "vendor")
	cmd := exec.Command(testbed.GoTool(t), "mod", "vendor", "-o", vendor)
	cmd.Dir = root
	// go mod vendor needs the modules of every platform's imports, golang.org/x/sys among
	// them, which no linux/amd64 build or test downloads: it fetches them as the go command
	// does everything else (GOPROXY as set), so the test does not depend on what an earlier
	// run left in the module cache. go.sum is checked; go.mod and go.sum are only read.
	cmd.Env = append(os.Environ(), "GOFLAGS=-mod=readonly", "GOTOOLCHAIN=local")
	goOut, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("go mod vendor: %v\n%s", err, goOut)
	}
	hash := exec.Command(nixHash, "--type", "sha256", "--base32", vendor)
	hash.Env = append(os.Environ(), testbed.NixConfEnv(t)...)
	out, err := hash.Output()
	if err != nil {
		t.Fatalf("nix-hash: %v", err)
	}
	sum, err := nixbase32.DecodeString(strings.TrimSpace(string(out)))
	if err != nil {
		t.Fatalf("nix-hash printed %q: %v", out, err)
	}
	got := "sha256-" + base64.StdEncoding.EncodeToString(sum)
	if got != string(m[1]) {
		t.Errorf("nixos-module/package.nix has vendorHash %s, but the vendor directory hashes to %s.\n"+
			"If go.mod, go.sum or the packages imported from them changed, set vendorHash = %q (README, \"Install\").\n"+
			"go mod vendor said:\n%s", m[1], got, got, goOut)
	}
}

// copyTree copies the regular files and directories under src (a file or a directory) to dst.
func copyTree(t *testing.T, src, dst string) {
	t.Helper()
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		target := filepath.Join(dst, rel)
		if d.IsDir() {
			return os.MkdirAll(target, 0o755)
		}
		if !d.Type().IsRegular() {
			return nil
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
			return err
		}
		return os.WriteFile(target, data, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestFlakeEvaluates evaluates flake.nix with the Nix 2.34 of the test bed, which has flakes,
// against a stand-in nixpkgs input (nixos-module/tests/stub-nixpkgs: the real lib, and
// packages that can be instantiated but not built), since nothing can be fetched here. `nix
// flake show` must list every output for every system (darwin: the package only), and `nix flake check --no-build` must
// accept them: the package, overlay, module, dev shell and checks evaluate, and
// nixos-module/package.nix gives buildGoModule only arguments it takes, with source files
// that exist. Whether the package builds with the real nixpkgs is not shown here.
func TestFlakeEvaluates(t *testing.T) {
	nix := testbed.Lookup(t, "2.34")
	root := repoRoot(t)
	dir := t.TempDir()
	// The flake's files, as a `path:` flake: the repository may not track new files yet, and
	// a git flake would not see them.
	src := filepath.Join(dir, "src")
	for _, p := range []string{"flake.nix", "go.mod", "go.sum", "Makefile", "cmd", "internal", "systemd", "examples", "nixos-module"} {
		copyTree(t, filepath.Join(root, p), filepath.Join(src, p))
	}
	stub := filepath.Join(dir, "nixpkgs")
	copyTree(t, filepath.Join(root, "nixos-module", "tests", "stub-nixpkgs"), stub)
	copyTree(t, nixpkgsLib(t), filepath.Join(stub, "lib"))

	store := testbed.NewStore(t)
	nixCmd := func(args ...string) string {
		t.Helper()
		argv := append([]string{"nix", "--extra-experimental-features", "nix-command flakes", "--option", "flake-registry", ""}, args...)
		cmd := nix.Command(store, []string{dir}, argv...)
		cmd.Env = append(cmd.Env, "HOME="+dir)
		out, errOut, err := runCmd(cmd)
		if err != nil {
			t.Fatalf("nix %s: %v\n%s", strings.Join(args, " "), err, errOut)
		}
		return out
	}
	flake := func(args ...string) string {
		t.Helper()
		return nixCmd(append(append([]string{"flake"}, args...),
			"--override-input", "nixpkgs", "path:"+stub, "--no-write-lock-file", "path:"+src)...)
	}

	var show map[string]map[string]any
	if err := json.Unmarshal([]byte(flake("show", "--json", "--all-systems")), &show); err != nil {
		t.Fatalf("nix flake show --json: %v", err)
	}
	for _, system := range []string{"x86_64-linux", "aarch64-linux", "x86_64-darwin", "aarch64-darwin"} {
		outputs := map[string][]string{"packages": {"default", "nix-offload"}}
		if strings.HasSuffix(system, "-linux") {
			// The test bed and the units are Linux's: no dev shell or checks on darwin.
			outputs["devShells"] = []string{"default"}
			outputs["checks"] = []string{"package", "go-tests", "nixos-module"}
		}
		for output, names := range outputs {
			got, _ := show[output][system].(map[string]any)
			for _, n := range names {
				if _, ok := got[n]; !ok {
					t.Errorf("nix flake show: no %s.%s.%s (got %v)", output, system, n, got)
				}
			}
		}
	}
	if _, ok := show["nixosModules"]["default"]; !ok {
		t.Errorf("nix flake show: no nixosModules.default: %v", show["nixosModules"])
	}
	if _, ok := show["overlays"]["default"]; !ok {
		t.Errorf("nix flake show: no overlays.default: %v", show["overlays"])
	}
	flake("check", "--no-build", "--all-systems")

	// nixosModules.default, evaluated with the NixOS stand-ins of eval.nix and the stand-in
	// pkgs: the flake's own package is the default, and the units and build-hook use it.
	apply := fmt.Sprintf(`module: let
  pkgs = (builtins.getFlake "path:%s").legacyPackages.x86_64-linux;
  stubs = import %s { inherit (pkgs) lib; };
  config = (pkgs.lib.evalModules { modules = [ stubs.module module {
    _module.args.pkgs = pkgs;
    nix.package = stubs.nixPackage "2.34.8";
    services.nix-offload.enable = true;
    services.nix-offload.machines = [ { host = "b1"; systems = [ "x86_64-linux" ]; } ];
  } ]; }).config;
in {
  package = config.services.nix-offload.package.name;
  execStart = config.systemd.services.nix-offload.serviceConfig.ExecStart;
  buildHook = config.nix.settings.build-hook;
  assertions = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
}`, stub, filepath.Join(src, "nixos-module", "tests", "stubs.nix"))
	out := nixCmd("eval", "--impure", "--json", "--override-input", "nixpkgs", "path:"+stub, "--no-write-lock-file",
		"path:"+src+"#nixosModules.default", "--apply", apply)
	var mod struct {
		Package    string   `json:"package"`
		ExecStart  string   `json:"execStart"`
		BuildHook  []string `json:"buildHook"`
		Assertions []string `json:"assertions"`
	}
	if err := json.Unmarshal([]byte(out), &mod); err != nil {
		t.Fatalf("nix eval of nixosModules.default: %v\n%s", err, out)
	}
	if mod.Package != "nix-offload-devel" || !regexp.MustCompile(`^/nix/store/[a-z0-9]{32}-nix-offload-devel/bin/nix-offload-hook daemon$`).MatchString(mod.ExecStart) ||
		len(mod.BuildHook) != 1 || mod.BuildHook[0]+" daemon" != mod.ExecStart || len(mod.Assertions) > 0 {
		t.Errorf("nixosModules.default does not run the flake's package: %+v", mod)
	}
}
