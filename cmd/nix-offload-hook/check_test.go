package main

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func base64Line(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func TestParseVersionAndClock(t *testing.T) {
	t0 := time.Unix(1000, 0)
	t1 := time.Unix(1002, 0) // round trip midpoint: 1001
	ver, skew := parseVersionAndClock("nix-store (Nix) 2.26.3\n1031\n", t0, t1)
	if ver != "2.26.3" || skew == nil || *skew != 30 {
		t.Errorf("got %q, %v; want 2.26.3, +30s", ver, skew)
	}
	ver, skew = parseVersionAndClock("nix-store (Nix) 2.8.0\n1001.250000000\n", t0, t1)
	if ver != "2.8.0" || skew == nil || *skew != 0.3 {
		t.Errorf("fractional: got %q, %v; want +0.3s", ver, *skew)
	}
	_, skew = parseVersionAndClock("nix-store (Nix) 2.8.0\n1001.%N\n", t0, t1)
	if skew == nil || *skew != 0 {
		t.Errorf("date without %%N: got %v", skew)
	}
	ver, skew = parseVersionAndClock("garbage\n", t0, t1)
	if ver != "" || skew != nil {
		t.Errorf("garbage parsed as %q, %v", ver, skew)
	}
}

func TestIsHookInvocation(t *testing.T) {
	for args, want := range map[string]bool{
		"3":                   true, // Nix 2.8: <hook> <verbosity>
		"__build-remote 0":    true, // list-valued build-hook with extra args
		"check":               false,
		"":                    false,
		"check 3":             true, // but run() matches subcommands first
		"12":                  false,
		"version --verbose x": false,
	} {
		if got := isHookInvocation(strings.Fields(args)); got != want {
			t.Errorf("isHookInvocation(%q) = %v, want %v", args, got, want)
		}
	}
}

// A broken configuration is a usage error (exit 2) that names file and line,
// before anything is contacted.
func TestCheckConfigErrors(t *testing.T) {
	p := filepath.Join(t.TempDir(), "offload.toml")
	os.WriteFile(p, []byte("[[machine]]\nhost = \"b1\"\nsystems = [\"x86_64-linux\"]\nparalel-builds = 4\n"), 0o644)
	code, _, errOut := runCLI(t, "check", "-config", p)
	if code != exitUsage || !strings.Contains(errOut, "offload.toml:4") || !strings.Contains(errOut, `did you mean "parallel-builds"`) {
		t.Errorf("exit %d, stderr %q", code, errOut)
	}

	empty := filepath.Join(t.TempDir(), "empty.toml")
	os.WriteFile(empty, nil, 0o644)
	code, _, errOut = runCLI(t, "check", "-config", empty)
	if code != exitUsage || !strings.Contains(errOut, "no machines configured") {
		t.Errorf("empty config: exit %d, stderr %q", code, errOut)
	}

	good := filepath.Join(t.TempDir(), "good.toml")
	os.WriteFile(good, []byte("[[machine]]\nhost = \"b1\"\nsystems = [\"x86_64-linux\"]\n"), 0o644)
	code, _, errOut = runCLI(t, "check", "-config", good, "b7")
	if code != exitUsage || !strings.Contains(errOut, `no machine "b7"`) {
		t.Errorf("unknown machine: exit %d, stderr %q", code, errOut)
	}

	code, _, errOut = runCLI(t, "frobnicate")
	if code != exitUsage || !strings.Contains(errOut, "unknown command") {
		t.Errorf("unknown command: exit %d, stderr %q", code, errOut)
	}
}

// The TOML file wins over Nix's machines; without one, the hook takes Nix's
// `builders` exactly as given, so `--builders ”` means no remote builds.
func TestConfigChoice(t *testing.T) {
	dir := t.TempDir()
	toml := filepath.Join(dir, "offload.toml")
	os.WriteFile(toml, []byte("[[machine]]\nhost = \"from-toml\"\nsystems = [\"x86_64-linux\"]\n"), 0o644)

	t.Setenv("NIX_OFFLOAD_CONFIG", toml)
	cfg, err := loadConfig("", "ssh://from-builders x86_64-linux", "x86_64-linux")
	if err != nil || len(cfg.Machines) != 1 || cfg.Machines[0].Host != "from-toml" {
		t.Fatalf("with $NIX_OFFLOAD_CONFIG: %+v, %v", cfg, err)
	}

	t.Setenv("NIX_OFFLOAD_CONFIG", "")
	cfg, err = loadConfig("", "ssh://from-builders x86_64-linux", "x86_64-linux")
	if err != nil || len(cfg.Machines) != 1 || cfg.Machines[0].Host != "from-builders" {
		t.Fatalf("builders fallback: %+v, %v", cfg, err)
	}

	// The default file, once it exists, wins over builders.
	if err := os.WriteFile(defaultConfigPath, []byte("[[machine]]\nhost = \"from-default\"\nsystems = [\"x86_64-linux\"]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err = loadConfig("", "ssh://from-builders x86_64-linux", "x86_64-linux")
	os.Remove(defaultConfigPath)
	if err != nil || len(cfg.Machines) != 1 || cfg.Machines[0].Host != "from-default" || cfg.Path != defaultConfigPath {
		t.Fatalf("with %s: %+v, %v", defaultConfigPath, cfg, err)
	}
	cfg, err = loadConfig("", "", "x86_64-linux")
	if err != nil || len(cfg.Machines) != 0 {
		t.Fatalf("empty builders must mean no machines: %+v, %v", cfg, err)
	}
}

// TestCheckConfigOnly: `check -config-only` reads and checks the configuration, lists the
// machines as the hook will use them, and connects to none of them; a broken configuration
// exits 2 with file and line, as it does without the flag.
func TestCheckConfigOnly(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var accepted atomic.Int32
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			c.Close()
		}
	}()
	port := ln.Addr().(*net.TCPAddr).Port
	cfg := writeConfig(t, fmt.Sprintf(`[daemon]
socket = "/run/x/hook.sock"

[ssh]
user = "builder"

[[machine]]
host = "127.0.0.1"
port = %d
host-key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAII4O16C1i3DMKc7N1Dh+5iiKO0BD+S6kC+OmVVzX2hAc root@b1"
systems = ["x86_64-linux", "i686-linux"]
parallel-builds = 3
speed = 2.5
features = ["kvm"]

[[machine]]
host = "b2.invalid"
systems = ["aarch64-linux"]
mandatory-features = ["big-parallel"]
enabled = false
`, port))

	code, out, errOut := runCLI(t, "check", "-config-only", "-config", cfg)
	if code != exitOK {
		t.Fatalf("exit %d\n%s%s", code, out, errOut)
	}
	if !strings.Contains(out, cfg+": configuration ok; broker socket /run/x/hook.sock, state dir /var/lib/nix-offload, metrics off\n") {
		t.Errorf("no summary line:\n%s", out)
	}
	for _, row := range []string{
		fmt.Sprintf(`builder@127\.0\.0\.1:%d +x86_64-linux,i686-linux +3 +2\.5 +kvm +- +pinned ssh-ed25519 +%s:7`, port, regexp.QuoteMeta(cfg)),
		`builder@b2\.invalid \(disabled\) +aarch64-linux +1 +1 +- +big-parallel +known-hosts +` + regexp.QuoteMeta(cfg) + `:16`,
	} {
		if !regexp.MustCompile(`(?m)^` + row + `$`).MatchString(out) {
			t.Errorf("no row matching %s:\n%s", row, out)
		}
	}

	code, out, _ = runCLI(t, "check", "-config-only", "-json", "-config", cfg, "b2.invalid")
	var m configMachine
	if code != exitOK || json.Unmarshal([]byte(out), &m) != nil || m.Machine != "builder@b2.invalid" || m.Enabled ||
		len(m.MandatoryFeatures) != 1 || m.ParallelBuilds != 1 || m.Speed != 1 {
		t.Errorf("-json for one machine: exit %d, %q → %+v", code, out, m)
	}
	if n := accepted.Load(); n != 0 {
		t.Errorf("check -config-only connected to the machine %d times", n)
	}

	bad := writeConfig(t, "[[machine]]\nhost = \"b1\"\nsystems = []\n")
	code, _, errOut = runCLI(t, "check", "-config-only", "-config", bad)
	if code != exitUsage || !strings.Contains(errOut, "offload.toml:3: machine[1].systems: must not be empty") {
		t.Errorf("broken config: exit %d, stderr %q", code, errOut)
	}

	empty := writeConfig(t, "")
	code, out, _ = runCLI(t, "check", "-config-only", "-config", empty)
	if code != exitOK || !strings.Contains(out, "no machines: the hook declines every build, and Nix builds locally") {
		t.Errorf("no machines: exit %d\n%s", code, out)
	}
}
