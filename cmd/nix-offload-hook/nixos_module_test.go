package main

import (
	"bufio"
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/BurntSushi/toml"
	"golang.org/x/crypto/ssh"

	"github.com/nix-offload/nix-offload/internal/graph"
	"github.com/nix-offload/nix-offload/internal/testbed"
)

// The NixOS module is tested by evaluating it with nixpkgs' lib and lib.evalModules
// (nixos-module/tests/eval.nix, with stand-ins for the NixOS options it sets) and checking
// what it produces here: the offload.toml text, which this binary must accept, the
// build-hook setting, the units and the assertions.

// repoRoot is the top of the repository (this package is cmd/nix-offload-hook).
func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// nixpkgsLib returns a nixpkgs lib/ directory: $NIXPKGS/lib when NIXPKGS names a full nixpkgs
// tree, else the lib-only copy in ../shared/third_party/nixpkgs-lib next to the repository.
func nixpkgsLib(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("NIXPKGS"); p != "" {
		lib := filepath.Join(p, "lib")
		if _, err := os.Stat(filepath.Join(lib, "default.nix")); err != nil {
			t.Fatalf("NIXPKGS=%s is not a nixpkgs tree: %v", p, err)
		}
		return lib
	}
	lib := filepath.Join(repoRoot(t), "..", "shared", "third_party", "nixpkgs-lib", "lib")
	if _, err := os.Stat(filepath.Join(lib, "default.nix")); err != nil {
		testbed.Unavailable(t, "no nixpkgs lib: set NIXPKGS to a nixpkgs checkout, or provide %s (%v)", lib, err)
	}
	return lib
}

func nixInstantiate(t *testing.T) string {
	t.Helper()
	return testbed.Tool(t, "nix-instantiate", "apt-get install nix-bin")
}

// runNixInstantiate runs nix-instantiate on a dummy store: evaluation only, nothing is
// written, and it works without root.
func runNixInstantiate(t *testing.T, args ...string) ([]byte, error) {
	t.Helper()
	cmd := exec.Command(nixInstantiate(t), append([]string{"--option", "store", "dummy://"}, args...)...)
	cmd.Env = append(os.Environ(), testbed.NixConfEnv(t)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("nix-instantiate %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return out, nil
}

// moduleCase is what eval.nix reports for one configuration.
type moduleCase struct {
	FailedAssertions []string        `json:"failedAssertions"`
	Warnings         []string        `json:"warnings"`
	OffloadTOML      *string         `json:"offloadToml"`
	ConfigFile       *string         `json:"configFile"`
	ConfigScript     *string         `json:"configScript"`
	BuildHook        json.RawMessage `json:"buildHook"`
	Builders         json.RawMessage `json:"builders"`
	Service          *moduleUnit     `json:"service"`
	Socket           *moduleUnit     `json:"socket"`
	FirewallTCP      []int           `json:"firewallTCP"`
	SystemPackages   []string        `json:"systemPackages"`
}

// moduleUnit is a systemd.services.<name> or systemd.sockets.<name> of NixOS.
type moduleUnit struct {
	Description     string            `json:"description"`
	Documentation   []string          `json:"documentation"`
	Requires        []string          `json:"requires"`
	Wants           []string          `json:"wants"`
	After           []string          `json:"after"`
	Before          []string          `json:"before"`
	WantedBy        []string          `json:"wantedBy"`
	UnitConfig      map[string]any    `json:"unitConfig"`
	Path            []string          `json:"path"`
	Environment     map[string]string `json:"environment"`
	RestartTriggers []string          `json:"restartTriggers"`
	ServiceConfig   map[string]any    `json:"serviceConfig"`
	ListenStreams   []string          `json:"listenStreams"`
	SocketConfig    map[string]any    `json:"socketConfig"`
}

type moduleEval struct {
	Cases      map[string]moduleCase `json:"cases"`
	TOMLWriter struct {
		Value      map[string]any `json:"value"`
		TOML       string         `json:"toml"`
		NullInList bool           `json:"nullInList"`
		PathValue  bool           `json:"pathValue"`
	} `json:"tomlWriter"`
	Base64 []*string `json:"base64"`
}

var (
	moduleEvalOnce sync.Once
	moduleEvalRes  *moduleEval
	moduleEvalErr  error
)

// evalModule evaluates nixos-module/tests/eval.nix once per test process.
func evalModule(t *testing.T) *moduleEval {
	t.Helper()
	lib := nixpkgsLib(t)
	nixInstantiate(t)
	moduleEvalOnce.Do(func() {
		out, err := runNixInstantiate(t, "--eval", "--strict", "--json",
			filepath.Join(repoRoot(t), "nixos-module", "tests", "eval.nix"), "--argstr", "libPath", lib)
		if err != nil {
			moduleEvalErr = err
			return
		}
		moduleEvalRes = &moduleEval{}
		moduleEvalErr = json.Unmarshal(out, moduleEvalRes)
	})
	if moduleEvalErr != nil {
		t.Fatal(moduleEvalErr)
	}
	return moduleEvalRes
}

func moduleCaseNamed(t *testing.T, name string) moduleCase {
	t.Helper()
	c, ok := evalModule(t).Cases[name]
	if !ok {
		t.Fatalf("eval.nix has no case %q", name)
	}
	return c
}

// okCase is a case whose configuration is valid: no assertion fails, and it writes
// offload.toml.
func okCase(t *testing.T, name string) moduleCase {
	t.Helper()
	c := moduleCaseNamed(t, name)
	if len(c.FailedAssertions) > 0 {
		t.Fatalf("case %s: assertions failed:\n%s", name, strings.Join(c.FailedAssertions, "\n"))
	}
	if c.OffloadTOML == nil {
		t.Fatalf("case %s: no /etc/nix/offload.toml", name)
	}
	return c
}

// checkConfigOnly runs `check -config-only` on text, as the module's build step does, and
// returns the exit code and output; with asJSON, the machines it parsed.
func checkConfigOnly(t *testing.T, text string, asJSON bool) (int, string, string, []configMachine) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "offload.toml")
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	args := []string{"check", "-config-only", "-config", p}
	if asJSON {
		args = append(args, "-json")
	}
	code, out, errOut := runCLI(t, args...)
	var ms []configMachine
	if asJSON && code == exitOK {
		sc := bufio.NewScanner(strings.NewReader(out))
		for sc.Scan() {
			var m configMachine
			if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
				t.Fatalf("check -config-only -json: %v in %q", err, sc.Text())
			}
			ms = append(ms, m)
		}
	}
	return code, out, errOut, ms
}

const (
	testHostKeyLine = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAII4O16C1i3DMKc7N1Dh+5iiKO0BD+S6kC+OmVVzX2hAc root@builder1"
	testHookPath    = "/nix/store/00000000000000000000000000000000-nix-offload-test/bin/nix-offload-hook"
	moduleHeader    = "# Written by the NixOS module services.nix-offload: change the NixOS configuration, not this file.\n\n"
)

// TestNixOSModuleFromBuildMachines: an existing nix.buildMachines configuration plus
// `services.nix-offload.enable = true` gives one machine per entry, with every field carried
// over, that the binary accepts; on Nix 2.8 build-hook is a single path.
func TestNixOSModuleFromBuildMachines(t *testing.T) {
	c := okCase(t, "buildMachines")
	want := moduleHeader + `[daemon]
socket = "/run/nix-offload/hook.sock"
state-dir = "/var/lib/nix-offload"

[[machine]]
host = "builder1.example.org"
user = "nixbuild"
ssh-key = "/etc/nix/id_builder"
host-key = "` + testHostKeyLine + `"
systems = ["x86_64-linux"]
parallel-builds = 4
speed = 2
features = ["kvm", "big-parallel", "benchmark"]
mandatory-features = ["benchmark"]
enabled = true

[[machine]]
host = "b2.example.org"
port = 2222
user = "root"
systems = ["aarch64-linux", "armv7l-linux"]
parallel-builds = 1
speed = 1
enabled = true
`
	if *c.OffloadTOML != want {
		t.Errorf("offload.toml:\n%s\nwant:\n%s", *c.OffloadTOML, want)
	}
	code, out, errOut, ms := checkConfigOnly(t, *c.OffloadTOML, true)
	if code != exitOK || len(ms) != 2 {
		t.Fatalf("check -config-only: exit %d, %d machines\n%s%s", code, len(ms), out, errOut)
	}
	// What the hook will use, after its own parsing: the key line decoded from
	// publicHostKey (comment dropped), mandatory features counted as supported.
	m := ms[0]
	if m.Machine != "nixbuild@builder1.example.org" || m.HostKey != strings.TrimSuffix(testHostKeyLine, " root@builder1") ||
		m.ParallelBuilds != 4 || m.Speed != 2 || m.SSHKey != "/etc/nix/id_builder" ||
		!slices.Equal(m.Features, []string{"kvm", "big-parallel", "benchmark"}) || !slices.Equal(m.MandatoryFeatures, []string{"benchmark"}) {
		t.Errorf("machine 1 as the hook reads it: %+v", m)
	}
	if m := ms[1]; m.Machine != "root@b2.example.org:2222" || !slices.Equal(m.Systems, []string{"aarch64-linux", "armv7l-linux"}) {
		t.Errorf("machine 2 as the hook reads it: %+v", m)
	}
	if got := string(c.BuildHook); got != `"`+testHookPath+`"` {
		t.Errorf("build-hook on Nix 2.8 = %s, want the single path %q", got, testHookPath)
	}
	if !slices.Contains(c.SystemPackages, "/nix/store/00000000000000000000000000000000-nix-offload-test") {
		t.Errorf("the package is not in environment.systemPackages: %q", c.SystemPackages)
	}
	if c.ConfigScript == nil || !strings.Contains(*c.ConfigScript, testHookPath+" check --config-only -config offload.toml") {
		t.Errorf("offload.toml is not checked by the binary when the system is built:\n%v", c.ConfigScript)
	}
	if c.Service == nil || c.ConfigFile == nil || !slices.Equal(c.Service.RestartTriggers, []string{*c.ConfigFile}) {
		t.Errorf("the broker does not restart when offload.toml changes: triggers %v, file %v", c.Service, c.ConfigFile)
	}
	if c.Socket == nil || !slices.Equal(c.Socket.ListenStreams, []string{"/run/nix-offload/hook.sock"}) || !slices.Equal(c.Socket.WantedBy, []string{"sockets.target"}) {
		t.Errorf("socket unit: %+v", c.Socket)
	}
	if c.Service != nil && (len(c.Service.WantedBy) != 0 || c.Service.ServiceConfig["ExecStart"] != testHookPath+" daemon" ||
		!slices.Equal(c.Service.Path, []string{"/nix/store/00000000000000000000000000000000-nix-2.8.0"})) {
		t.Errorf("service unit (started by its socket only, runs the package, nix-store on PATH): %+v", c.Service)
	}
}

// TestNixOSModuleMachines: services.nix-offload.machines maps option by option onto
// [[machine]] keys; with useNixBuildMachines off, nix.buildMachines is left alone; Nix 2.34
// gets build-hook as a list.
func TestNixOSModuleMachines(t *testing.T) {
	c := okCase(t, "machines")
	want := moduleHeader + `[daemon]
socket = "/run/nix-offload/hook.sock"
state-dir = "/var/lib/nix-offload"

[[machine]]
host = "b1.example.org"
port = 2201
user = "root"
ssh-key = "/etc/nix/offload_ed25519"
host-key = "` + testHostKeyLine + `"
known-hosts = ["/etc/ssh/ssh_known_hosts"]
connect-timeout = "5s"
server-alive-interval = "20s"
systems = ["x86_64-linux"]
parallel-builds = 8
speed = 1.5
features = ["kvm"]
mandatory-features = ["kvm"]
remote-store = "/mnt/store"
enabled = false
min-free-space = "10G"
max-load = 2.5

[[machine]]
host = "2001:db8::7"
systems = ["x86_64-linux"]
parallel-builds = 1
speed = 1.0
enabled = true
`
	if *c.OffloadTOML != want {
		t.Errorf("offload.toml:\n%s\nwant:\n%s", *c.OffloadTOML, want)
	}
	code, out, errOut, ms := checkConfigOnly(t, *c.OffloadTOML, true)
	if code != exitOK || len(ms) != 2 {
		t.Fatalf("check -config-only: exit %d\n%s%s", code, out, errOut)
	}
	if m := ms[0]; m.Enabled || m.RemoteStore != "/mnt/store" || m.Port != 2201 || m.MinFreeSpace != 10<<30 || m.MaxLoad != 2.5 || !slices.Equal(m.KnownHosts, []string{"/etc/ssh/ssh_known_hosts"}) {
		t.Errorf("machine 1 as the hook reads it: %+v", m)
	}
	if got := string(c.BuildHook); got != `["`+testHookPath+`"]` {
		t.Errorf("build-hook on Nix 2.34 = %s, want a one-element list", got)
	}
}

// TestNixOSModuleSettings: settings fills [daemon] and [ssh]; a socket elsewhere moves the
// socket unit with it, a state dir elsewhere becomes writable for the service, and so does a
// log dir elsewhere, which the broker is told (NIX_LOG_DIR); metrics are written and their port
// opened. Lix 2.91 gets build-hook as a list.
func TestNixOSModuleSettings(t *testing.T) {
	c := okCase(t, "settings")
	want := moduleHeader + `[daemon]
socket = "/run/nix-offload-alt/broker.sock"
state-dir = "/srv/nix-offload"
metrics = "0.0.0.0:9500"

[ssh]
user = "nixbuild"
ssh-key = "/etc/nix/offload_ed25519"
known-hosts = ["/etc/ssh/ssh_known_hosts", "/etc/nix/builders_known_hosts"]
connect-timeout = "20s"

[[machine]]
host = "b3.example.org"
systems = ["x86_64-linux"]
parallel-builds = 1
speed = 1.0
enabled = true
`
	if *c.OffloadTOML != want {
		t.Errorf("offload.toml:\n%s\nwant:\n%s", *c.OffloadTOML, want)
	}
	code, out, errOut, ms := checkConfigOnly(t, *c.OffloadTOML, true)
	if code != exitOK || len(ms) != 1 {
		t.Fatalf("check -config-only: exit %d\n%s%s", code, out, errOut)
	}
	// [ssh] reaches the machine as the hook resolves it.
	if m := ms[0]; m.User != "nixbuild" || m.SSHKey != "/etc/nix/offload_ed25519" || len(m.KnownHosts) != 2 {
		t.Errorf("machine as the hook reads it: %+v", m)
	}
	code, out, _, _ = checkConfigOnly(t, *c.OffloadTOML, false)
	if code != exitOK || !strings.Contains(out, "broker socket /run/nix-offload-alt/broker.sock, state dir /srv/nix-offload, metrics 0.0.0.0:9500") {
		t.Errorf("check -config-only summary (exit %d):\n%s", code, out)
	}
	if c.Socket == nil || !slices.Equal(c.Socket.ListenStreams, []string{"/run/nix-offload-alt/broker.sock"}) {
		t.Errorf("the socket unit does not listen where [daemon] socket says: %+v", c.Socket)
	}
	// The broker writes graphs' build logs where NIX_LOG_DIR says (graph.DefaultLogDir).
	if rw := c.Service.ServiceConfig["ReadWritePaths"]; !reflect.DeepEqual(rw, []any{"-/srv/nix-logs", "/srv/nix-offload"}) {
		t.Errorf("ReadWritePaths = %v, want the log dir and the state dir", rw)
	}
	if got := c.Service.Environment["NIX_LOG_DIR"]; got != "/srv/nix-logs" {
		t.Errorf("NIX_LOG_DIR = %q, want logDir, where the service may write", got)
	}
	if !slices.Equal(c.FirewallTCP, []int{9500}) {
		t.Errorf("firewall TCP ports %v, want [9500]", c.FirewallTCP)
	}
	if got := string(c.BuildHook); got != `["`+testHookPath+`"]` {
		t.Errorf("build-hook on Lix 2.91 = %s, want a one-element list", got)
	}
	// By default only Nix's log directory, the broker's own default: the state dir is the
	// StateDirectory.
	def := okCase(t, "buildMachines").Service
	if rw := def.ServiceConfig["ReadWritePaths"]; !reflect.DeepEqual(rw, []any{"-" + graph.NixLogDir}) {
		t.Errorf("default ReadWritePaths = %v, want only Nix's log dir %s", rw, graph.NixLogDir)
	}
	if got, ok := def.Environment["NIX_LOG_DIR"]; ok {
		t.Errorf("NIX_LOG_DIR = %q set with the default log dir", got)
	}
}

// TestNixOSModuleChecksConfig: a key the binary does not know is written as given, and the
// check that runs while the system is built rejects it with its line; checkConfig = false
// leaves the check out.
func TestNixOSModuleChecksConfig(t *testing.T) {
	c := okCase(t, "settingsTypo")
	code, _, errOut, _ := checkConfigOnly(t, *c.OffloadTOML, false)
	if code != exitUsage || !strings.Contains(errOut, `offload.toml:8: ssh: unknown key "usr" (did you mean "user"?)`) {
		t.Errorf("check -config-only on a typo: exit %d, stderr %q", code, errOut)
	}
	off := moduleCaseNamed(t, "checkOff")
	if off.ConfigScript == nil || strings.Contains(*off.ConfigScript, "check") || !strings.Contains(*off.ConfigScript, `cp offload.toml "$out"`) {
		t.Errorf("checkConfig = false: script %v", off.ConfigScript)
	}
}

// TestNixOSModuleKeepsBuilders: an empty `builders` makes the hook build locally, and NixOS
// writes `builders =` whenever nix.distributedBuilds is false, so the module turns
// distributed builds on (Nix's default `builders` stays); a configuration that forces them
// off is warned that nothing will be offloaded.
func TestNixOSModuleKeepsBuilders(t *testing.T) {
	for _, name := range []string{"buildMachines", "machines", "noMachines"} {
		if c := moduleCaseNamed(t, name); string(c.Builders) != `"unset"` {
			t.Errorf("case %s: nix.settings.builders = %s, want it unset (Nix's default)", name, c.Builders)
		}
	}
	off := moduleCaseNamed(t, "distributedBuildsOff")
	if string(off.Builders) != "null" {
		t.Errorf("distributedBuilds = false: builders = %s, want null (as NixOS: `builders =`)", off.Builders)
	}
	if !slices.ContainsFunc(off.Warnings, func(w string) bool { return strings.Contains(w, "nothing is offloaded") }) {
		t.Errorf("distributedBuilds = false gives no warning that nothing is offloaded: %q", off.Warnings)
	}
}

// TestNixOSModuleDisabled: importing the module changes nothing until it is enabled.
func TestNixOSModuleDisabled(t *testing.T) {
	c := moduleCaseNamed(t, "disabled")
	if c.OffloadTOML != nil || string(c.BuildHook) != "null" || c.Service != nil || c.Socket != nil ||
		len(c.FailedAssertions) > 0 || len(c.Warnings) > 0 || len(c.SystemPackages) > 0 {
		t.Errorf("disabled module set something: %+v", c)
	}
}

// TestNixOSModuleAssertions: each impossible configuration fails with a message that names
// the machine and says what to do; a valid one with no machines only warns.
func TestNixOSModuleAssertions(t *testing.T) {
	for name, wants := range map[string][]string{
		"noSystems": {
			`nix.buildMachines entry 1 (nosys.example.org) has no systems; list the systems it builds for, e.g. [ "x86_64-linux" ], in nix.buildMachines, or set services.nix-offload.useNixBuildMachines = false`,
			`services.nix-offload.machines entry 1 (nosys2.example.org) has no systems`,
		},
		"zeroSlots": {
			`nix.buildMachines entry 1 (zero.example.org) has 0 parallel builds (maxJobs); it must have 1 to 1024`,
			`services.nix-offload.machines entry 1 (many.example.org) has 2000 parallel builds (maxJobs); it must have 1 to 1024`,
		},
		"duplicate": {
			`machine root@dup.example.org is listed twice: nix.buildMachines entry 1 (dup.example.org) and services.nix-offload.machines entry 1 (DUP.example.org)`,
		},
		"badHostKey": {
			"nix.buildMachines entry 1 (badkey.example.org): publicHostKey is not base64 of a public key line; NixOS expects the output of `base64 -w0 /etc/ssh/ssh_host_ed25519_key.pub`",
		},
		"settingsMachine":            {"settings.machine is not where machines go: use services.nix-offload.machines"},
		"metricsInSettings":          {"settings.daemon.metrics is set by services.nix-offload.metrics.enable and .address"},
		"openFirewallWithoutMetrics": {"openFirewall opens the metrics port, but metrics.enable is false"},
		"badMetricsAddress":          {`metrics.address must be host:port, such as "127.0.0.1:9464"; got "localhost"`},
	} {
		t.Run(name, func(t *testing.T) {
			c := moduleCaseNamed(t, name)
			if len(c.FailedAssertions) != len(wants) {
				t.Errorf("%d assertions failed, want %d:\n%s", len(c.FailedAssertions), len(wants), strings.Join(c.FailedAssertions, "\n"))
			}
			for _, w := range wants {
				if !slices.ContainsFunc(c.FailedAssertions, func(m string) bool { return strings.Contains(m, w) }) {
					t.Errorf("no failed assertion says %q; got:\n%s", w, strings.Join(c.FailedAssertions, "\n"))
				}
			}
		})
	}
	for _, name := range []string{"buildMachines", "machines", "settings", "settingsTypo"} {
		if c := moduleCaseNamed(t, name); len(c.FailedAssertions) > 0 || len(c.Warnings) > 0 {
			t.Errorf("valid case %s: assertions %q, warnings %q", name, c.FailedAssertions, c.Warnings)
		}
	}
	c := moduleCaseNamed(t, "noMachines")
	if len(c.FailedAssertions) > 0 || len(c.Warnings) != 1 || !strings.Contains(c.Warnings[0], "without machines") {
		t.Errorf("no machines: assertions %q, warnings %q; want one warning", c.FailedAssertions, c.Warnings)
	}
	code, out, errOut, _ := checkConfigOnly(t, *c.OffloadTOML, false)
	if code != exitOK || !strings.Contains(out, "no machines: the hook declines every build") {
		t.Errorf("check -config-only without machines: exit %d\n%s%s", code, out, errOut)
	}
}

// TestNixOSModuleTOMLWriter: the module's TOML writer, on strings that need escaping, keys
// that need quoting, floats that look like integers, nested and array tables: the TOML
// decoder reads back the value that was written. null is left out; null in a list and a Nix
// path are refused.
func TestNixOSModuleTOMLWriter(t *testing.T) {
	w := evalModule(t).TOMLWriter
	var got map[string]any
	if _, err := toml.Decode(w.TOML, &got); err != nil {
		t.Fatalf("the module's TOML does not parse: %v\n%s", err, w.TOML)
	}
	want := w.Value
	delete(want, "dropped")
	if !reflect.DeepEqual(normalizeTOML(got), normalizeTOML(want)) {
		t.Errorf("read back:\n%#v\nwritten:\n%#v\nTOML:\n%s", normalizeTOML(got), normalizeTOML(want), w.TOML)
	}
	if _, ok := got["float"].(float64); !ok {
		t.Errorf("2.0 was read back as %T", got["float"])
	}
	if _, ok := got["int"].(int64); !ok {
		t.Errorf("42 was read back as %T", got["int"])
	}
	if w.NullInList || w.PathValue {
		t.Errorf("the writer accepted null in a list (%v) or a Nix path (%v)", w.NullInList, w.PathValue)
	}
}

// normalizeTOML makes decoded TOML and decoded JSON comparable: numbers as float64, and
// arrays of tables as []any.
func normalizeTOML(v any) any {
	switch x := v.(type) {
	case map[string]any:
		out := make(map[string]any, len(x))
		for k, e := range x {
			out[k] = normalizeTOML(e)
		}
		return out
	case []map[string]any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = normalizeTOML(e)
		}
		return out
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = normalizeTOML(e)
		}
		return out
	case int64:
		return float64(x)
	}
	return v
}

// TestNixOSModuleBase64: the decoder for nix.buildMachines' publicHostKey gives back what Go
// encoded (with and without padding, every length mod 3), and rejects what is not base64 of
// text.
func TestNixOSModuleBase64(t *testing.T) {
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	sshPub, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	line := string(ssh.MarshalAuthorizedKey(sshPub)) // "ssh-ed25519 AAAA…\n"
	plain := []string{line, strings.TrimSuffix(line, "\n") + " root@host\n", "a", "ab", "abc", "abcd", "~!\t"}
	var inputs, wants []string
	for _, s := range plain {
		inputs = append(inputs, base64.StdEncoding.EncodeToString([]byte(s)), base64.RawStdEncoding.EncodeToString([]byte(s)))
		wants = append(wants, s, s)
	}
	// Wrapped at 76 columns, as `base64` without -w0 writes it.
	long := base64.StdEncoding.EncodeToString([]byte(line))
	inputs = append(inputs, long[:76]+"\n"+long[76:]+"\n")
	wants = append(wants, line)
	bad := []string{strings.TrimSuffix(line, "\n"), "a", "abc=d", "ab=", "****", "", base64.StdEncoding.EncodeToString([]byte{0, 1, 2}),
		base64.StdEncoding.EncodeToString([]byte("é"))}
	inputs = append(inputs, bad...)
	arg, _ := json.Marshal(inputs)

	out, err := runNixInstantiate(t, "--eval", "--strict", "--json", "-E",
		`{ libPath, inputs }: map (import `+filepath.Join(repoRoot(t), "nixos-module", "lib.nix")+` { lib = import libPath; }).decodeBase64Text (builtins.fromJSON inputs)`,
		"--argstr", "libPath", nixpkgsLib(t), "--argstr", "inputs", string(arg))
	if err != nil {
		t.Fatal(err)
	}
	var got []*string
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatal(err)
	}
	for i, in := range inputs {
		switch {
		case i < len(wants) && (got[i] == nil || *got[i] != wants[i]):
			t.Errorf("decode(%q) = %v, want %q", in, deref(got[i]), wants[i])
		case i >= len(wants) && got[i] != nil:
			t.Errorf("decode(%q) = %q, want null (not base64 of text)", in, *got[i])
		}
	}
}

func deref(s *string) any {
	if s == nil {
		return nil
	}
	return *s
}

// TestNixOSModuleUnitsMatchUnitFiles: the units the module declares are the unit files in
// systemd/, directive by directive, apart from what NixOS must differ in (ExecStart's store
// path, PATH for nix-store, the restart trigger, ReadWritePaths for a state dir elsewhere).
// A directive added to one and not the other fails here.
func TestNixOSModuleUnitsMatchUnitFiles(t *testing.T) {
	c := okCase(t, "buildMachines")
	for _, u := range []struct {
		file    string
		unit    *moduleUnit
		section string
		config  map[string]any
	}{
		{"nix-offload.service", c.Service, "Service", c.Service.ServiceConfig},
		{"nix-offload.socket", c.Socket, "Socket", c.Socket.SocketConfig},
	} {
		t.Run(u.file, func(t *testing.T) {
			file := parseUnitFile(t, filepath.Join(repoRoot(t), "systemd", u.file))
			mod := map[string]map[string][]string{"Unit": {}, u.section: {}}
			add := func(section, key string, vals ...string) {
				if len(vals) > 0 {
					mod[section][key] = append(mod[section][key], vals...)
				}
			}
			add("Unit", "Description", u.unit.Description)
			add("Unit", "Documentation", u.unit.Documentation...)
			add("Unit", "Requires", u.unit.Requires...)
			add("Unit", "Wants", u.unit.Wants...)
			add("Unit", "After", u.unit.After...)
			add("Unit", "Before", u.unit.Before...)
			for k, v := range u.unit.UnitConfig {
				add("Unit", k, unitValues(v)...)
			}
			for k, v := range u.config {
				add(u.section, k, unitValues(v)...)
			}
			for k, v := range u.unit.Environment {
				add(u.section, "Environment", k+"="+v)
			}
			add(u.section, "ListenStream", u.unit.ListenStreams...)
			if len(u.unit.WantedBy) > 0 {
				mod["Install"] = map[string][]string{"WantedBy": u.unit.WantedBy}
			}
			// Where NixOS differs from the file on purpose.
			if es := mod[u.section]["ExecStart"]; len(es) == 1 {
				mod[u.section]["ExecStart"] = []string{strings.Replace(es[0], testHookPath, "/usr/local/bin/nix-offload-hook", 1)}
			}
			if inst := file["Install"]; inst != nil {
				delete(inst, "Also") // NixOS has no [Install]: enabling is wantedBy on the socket
				if len(inst) == 0 {
					delete(file, "Install")
				}
			}
			for section, keys := range file {
				for k, v := range keys {
					if got := mod[section][k]; !slices.Equal(got, v) {
						t.Errorf("[%s] %s: unit file %q, module %q", section, k, v, got)
					}
				}
			}
			for section, keys := range mod {
				for k, v := range keys {
					if _, ok := file[section][k]; !ok {
						t.Errorf("[%s] %s=%q is in the module but not in systemd/%s", section, k, v, u.file)
					}
				}
			}
		})
	}
}

// parseUnitFile reads a systemd unit file into section → key → values, in order, with
// boolean spellings made one ("yes" → "true") and space-separated lists of RestrictAddressFamilies
// kept as written.
func parseUnitFile(t *testing.T, path string) map[string]map[string][]string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]map[string][]string{}
	var section string
	for n, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
			out[section] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("%s:%d: not a directive: %q", path, n+1, line)
			}
			out[section][k] = append(out[section][k], normalizeUnitValue(v))
		}
	}
	return out
}

func normalizeUnitValue(v string) string {
	switch v {
	case "yes", "on", "1":
		return "true"
	case "no", "off", "0":
		return "false"
	}
	return v
}

// unitValues renders a NixOS unit option as NixOS writes it: one directive per list element.
func unitValues(v any) []string {
	switch x := v.(type) {
	case []any:
		var out []string
		for _, e := range x {
			out = append(out, unitValues(e)...)
		}
		return out
	case bool:
		return []string{fmt.Sprint(x)}
	case float64:
		return []string{fmt.Sprint(x)}
	}
	return []string{normalizeUnitValue(fmt.Sprint(v))}
}

// TestNixFilesParse: every .nix file of the repository (tracked or new, not ignored) parses.
func TestNixFilesParse(t *testing.T) {
	root := repoRoot(t)
	nixInstantiate(t)
	var files []string
	if out, err := exec.Command("git", "-C", root, "ls-files", "--cached", "--others", "--exclude-standard", "--", "*.nix").Output(); err == nil {
		for _, f := range strings.Fields(string(out)) {
			if _, err := os.Stat(filepath.Join(root, f)); err == nil { // deleted but not yet staged
				files = append(files, f)
			}
		}
	} else {
		err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.IsDir() && d.Name() == ".git" {
				return filepath.SkipDir
			}
			if strings.HasSuffix(p, ".nix") {
				rel, _ := filepath.Rel(root, p)
				files = append(files, rel)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, must := range []string{"flake.nix", "nixos-module/default.nix", "nixos-module/lib.nix", "nixos-module/package.nix", "nixos-module/tests/eval.nix"} {
		if !slices.Contains(files, must) {
			t.Errorf("%s is missing from the .nix files found: %q", must, files)
		}
	}
	paths := make([]string, len(files))
	for i, f := range files {
		paths[i] = filepath.Join(root, f)
	}
	if _, err := runNixInstantiate(t, append([]string{"--parse"}, paths...)...); err == nil {
		t.Logf("%d .nix files parse", len(files))
		return
	}
	for _, f := range files { // one at a time, to name the ones that fail
		if _, err := runNixInstantiate(t, "--parse", filepath.Join(root, f)); err != nil {
			t.Errorf("%s does not parse: %v", f, err)
		}
	}
}
