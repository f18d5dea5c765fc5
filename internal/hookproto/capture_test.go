package hookproto

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/testbed"
)

var update = flag.Bool("update", false, "rewrite testdata/nix-*.bin from the real captures")

// probeCapture mirrors testdata/probe's Capture.
type probeCapture struct {
	Argv     []string
	Fds      map[int]bool
	Settings Settings
	Request  *Request
	Err      string
}

// TestRealCapture runs real Nix (2.8 from the host, 2.26 and 2.34 from the
// test bed's Debian roots) with testdata/probe as build hook, on a
// derivation that needs "kvm", with max-jobs 0, and checks what the probe
// read with this package: the settings block and one "try". The probe
// also logs through a Logger, which Nix must show without complaint, and
// declines permanently, after which nix-build fails (nothing can build the
// derivation): expected. With -update the raw bytes become
// testdata/nix-<series>.bin.
//
// Each Nix runs a second time with `--builders ""`, the one value of
// `builders` nix-daemon takes from an untrusted client (NixOS/nix 2.8
// src/nix-daemon/nix-daemon.cc, wopSetOptions; the same test in 2.34's
// daemon.cc): Nix still starts the hook and sends "builders" with an empty
// value, which the hook must tell apart from the default
// "@/etc/nix/machines" (testdata/nix-<series>-no-builders.bin).
func TestRealCapture(t *testing.T) {
	testbed.RequireRoot(t)
	goTool := testbed.GoTool(t)
	bin := filepath.Join(t.TempDir(), "probe")
	build := exec.Command(goTool, "build", "-o", bin, "./testdata/probe")
	build.Env = append(os.Environ(), "CGO_ENABLED=0") // static: runs in the Debian roots too
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the probe: %v\n%s", err, out)
	}
	probe, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}

	type variant struct {
		name     string   // subtest and fixture suffix
		args     []string // extra nix-build arguments
		builders string   // the "builders" the hook must be sent
	}
	variants := []variant{
		{"", nil, "@/etc/nix/machines"},
		{"-no-builders", []string{"--builders", ""}, ""},
	}
	for _, series := range []string{"2.8", "2.26", "2.34"} {
		for _, v := range variants {
			t.Run(series+v.name, func(t *testing.T) {
				t.Parallel()
				captureOnce(t, probe, series, v.name, v.args, v.builders)
			})
		}
	}
}

// captureOnce is one TestRealCapture run: nix-build of series with args
// added, and what the probe read checked; builders is the value the
// "builders" setting must have.
func captureOnce(t *testing.T, probe []byte, series, suffix string, args []string, builders string) {
	nix := testbed.Lookup(t, series)
	dir := t.TempDir()
	hook := filepath.Join(dir, "probe")
	if err := os.WriteFile(hook, probe, 0o755); err != nil {
		t.Fatal(err)
	}
	store := testbed.NewStore(t)
	expr := `derivation { name = "x"; system = "x86_64-linux"; builder = "/bin/sh"; args = ["-c" "echo > $out"]; requiredSystemFeatures = ["kvm"]; }`
	argv := []string{"nix-build", "--no-out-link", "--max-jobs", "0",
		"--option", "build-hook", hook, "--option", "substituters", ""}
	argv = append(append(argv, args...), "-E", expr)
	cmd := nix.Command(store, []string{dir}, argv...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	guard := time.AfterFunc(2*time.Minute, func() { testbed.KillCommand(cmd) })
	err := cmd.Wait()
	guard.Stop()
	t.Logf("%v: nix-build: %v (a failure is expected)\n%s", nix, err, stderr.String())

	j, err := os.ReadFile(filepath.Join(dir, "capture.json"))
	if err != nil {
		t.Fatalf("the probe recorded nothing: %v", err)
	}
	var c probeCapture
	if err := json.Unmarshal(j, &c); err != nil {
		t.Fatal(err)
	}
	if c.Err != "" {
		t.Fatalf("the probe could not read stdin: %s", c.Err)
	}
	t.Logf("argv %q, fds %v, %d settings, request %+v", c.Argv, c.Fds, len(c.Settings), *c.Request)

	if len(c.Argv) < 2 || !regexp.MustCompile(`^[0-7]$`).MatchString(c.Argv[len(c.Argv)-1]) {
		t.Errorf("argv %q does not end with a verbosity", c.Argv)
	}
	for _, fd := range []int{0, 1, 2, 4, 5} {
		if !c.Fds[fd] {
			t.Errorf("fd %d not open in the hook", fd)
		}
	}
	for _, name := range []string{"builders", "max-silent-time", "timeout", "system", "max-jobs", "builders-use-substitutes"} {
		if _, ok := c.Settings[name]; !ok {
			t.Errorf("setting %q not sent", name)
		}
	}
	if got, ok := c.Settings["builders"]; !ok || got != builders {
		t.Errorf("builders = %q (sent: %v), want %q", got, ok, builders)
	}
	if got := c.Settings.String("system", ""); got != "x86_64-linux" {
		t.Errorf("system = %q", got)
	}
	if got := c.Settings.String("max-jobs", ""); got != "0" {
		t.Errorf("max-jobs = %q, want 0", got)
	}
	r := c.Request
	if r.AmWilling || r.System != "x86_64-linux" || !regexp.MustCompile(`^/nix/store/[0-9a-z]{32}-x\.drv$`).MatchString(r.DrvPath) ||
		!slices.Equal(r.RequiredFeatures, []string{"kvm"}) {
		t.Errorf("request %+v, want amWilling false, x86_64-linux, /nix/store/…-x.drv, [kvm]", *r)
	}
	if _, err := os.Stat(filepath.Join(store, strings.TrimPrefix(r.DrvPath, "/nix"))); err != nil {
		t.Errorf("the drv path is not in the store: %v", err)
	}

	// The Logger's messages: shown, and no parser complaint.
	log := stderr.String()
	if !strings.Contains(log, "probe: hello from the hook") {
		t.Error("the probe's @nix msg did not reach nix-build's stderr")
	}
	for _, bad := range []string{"bad JSON", "unable to handle", "@nix", "bad hook reply"} {
		if strings.Contains(log, bad) {
			t.Errorf("nix-build's stderr has %q", bad)
		}
	}

	raw, err := os.ReadFile(filepath.Join(dir, "capture.bin"))
	if err != nil {
		t.Fatal(err)
	}
	if *update {
		if err := os.WriteFile(filepath.Join("testdata", "nix-"+series+suffix+".bin"), raw, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TestRecorded replays the captures of TestRealCapture: settings and one
// "try" as Nix 2.8, 2.26 and 2.34 wrote them, read back to the last byte;
// "builders" is empty exactly in the -no-builders ones.
func TestRecorded(t *testing.T) {
	files, _ := filepath.Glob("testdata/nix-*.bin")
	if len(files) == 0 {
		t.Fatal("no testdata/nix-*.bin: run TestRealCapture with -update as root")
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		r := bytes.NewReader(b)
		s, err := ReadSettings(r)
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		req, err := ReadRequest(r)
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if r.Len() != 0 {
			t.Errorf("%s: %d bytes left", f, r.Len())
		}
		if _, ok := s["builders"]; !ok || s.String("system", "") != "x86_64-linux" {
			t.Errorf("%s: settings lack builders or system", f)
		}
		if empty := strings.HasSuffix(f, "-no-builders.bin"); empty != (s["builders"] == "") {
			t.Errorf("%s: builders = %q", f, s["builders"])
		}
		if req.AmWilling || !slices.Equal(req.RequiredFeatures, []string{"kvm"}) {
			t.Errorf("%s: request %+v", f, *req)
		}
		t.Logf("%s: %d settings, request %+v", f, len(s), *req)
	}
}
