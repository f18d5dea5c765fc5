package offload_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nix-community/go-nix/pkg/derivation"

	"github.com/nix-offload/nix-offload/internal/localstore"
	"github.com/nix-offload/nix-offload/internal/offload"
	"github.com/nix-offload/nix-offload/internal/servetest"
	"github.com/nix-offload/nix-offload/internal/testbed"
)

// Integration: the hostile machine against the real local store of the
// test bed (Nix 2.8). A wrong narHash must leave the output invalid and
// absent for Nix itself, through offload.Run and through the whole hook
// run by nix-store --realise.

// lyingBuild builds as servetest.DefaultBuild does and reports a narHash
// that is not the NAR's.
func lyingBuild(req servetest.BuildRequest) servetest.BuildReply {
	r := servetest.DefaultBuild(req)
	for name, o := range r.Outputs {
		o.Info.NarHash = "sha256:" + strings.Repeat("1", 52)
		r.Outputs[name] = o
	}
	return r
}

// bedRun runs a command of the bed's Nix on store and returns its stdout,
// stderr and error.
func bedRun(nix testbed.Nix, store string, env []string, argv ...string) (string, string, error) {
	cmd := nix.Command(store, nil, argv...)
	cmd.Env = append(cmd.Env, env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	testbed.KillCommand(cmd)
	return strings.TrimSpace(stdout.String()), stderr.String(), err
}

// checkInvalidForNix fails unless Nix calls path invalid and it is not in
// the store directory, nor any staging directory of localstore.
func checkInvalidForNix(t *testing.T, nix testbed.Nix, store, path string) {
	t.Helper()
	if _, stderr, err := bedRun(nix, store, nil, "nix-store", "--check-validity", path); err == nil {
		t.Errorf("nix-store --check-validity %s succeeds", path)
	} else if !strings.Contains(stderr, "is not valid") {
		t.Errorf("nix-store --check-validity %s: %v: %s", path, err, stderr)
	}
	storeDir := filepath.Join(store, "store")
	if _, err := os.Lstat(filepath.Join(storeDir, filepath.Base(path))); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("%s is in the store directory (Lstat: %v)", path, err)
	}
	ents, _ := os.ReadDir(storeDir)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".nix-offload-") {
			t.Errorf("staging directory %s left in the store", e.Name())
		}
	}
}

// TestHostileMachineRealStore: offload.Run over SSH to a machine that lies
// about narHash, with localstore on a real Nix 2.8 store. Then the same
// store with an honest machine: the output becomes valid and verifies,
// which shows that only the lie made the difference.
func TestHostileMachineRealStore(t *testing.T) {
	nix := testbed.Lookup(t, "2.8")
	dir := testbed.NewStore(t)
	store, err := localstore.Open(localstore.Options{
		RealStoreDir: filepath.Join(dir, "store"),
		Command:      func(argv ...string) *exec.Cmd { return nix.Command(dir, nil, argv...) },
	})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	srv := &servetest.Server{Build: lyingBuild}
	s := servetest.StartSSH(t, srv)
	e := &env{srv: srv, store: store, job: offload.Job{Machine: machine, DrvPath: drvPath, Drv: &derivation.Derivation{
		Outputs:  map[string]*derivation.Output{"out": {Path: outPath}},
		Platform: "x86_64-linux", Builder: "/bin/sh", Env: map[string]string{"out": outPath},
	}}}

	err = e.runSSH(t, context.Background(), s)
	if err == nil {
		t.Fatal("the output of a machine that lies about narHash was accepted")
	}
	t.Log(err)
	for _, want := range []string{"from '" + machine + "'", outPath, "hash mismatch", "but the machine reported sha256:" + strings.Repeat("1", 52)} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not contain %q", want)
		}
	}
	checkInvalidForNix(t, nix, dir, outPath)

	srv.Build = nil
	if err := e.runSSH(t, context.Background(), s); err != nil {
		t.Fatalf("honest machine: %v", err)
	}
	if _, stderr, err := bedRun(nix, dir, nil, "nix-store", "--verify-path", outPath); err != nil {
		t.Errorf("honest output: nix-store --verify-path: %v: %s", err, stderr)
	}
}

// TestHookAgainstHostileMachine: nix-store --realise on the bed's Nix 2.8
// hands a derivation to our hook, which offloads it over SSH to a machine
// that builds it and lies about the output's narHash. The build fails with
// a message that names the machine, the output and the mismatch, and Nix
// calls the output invalid.
// hostileSetup writes a hook configuration whose only machine is s, and
// instantiates a fresh derivation in a new store on the bed.
func hostileSetup(t *testing.T, nix testbed.Nix, s *servetest.SSHServer, extra string) (cfgFile, store, drv, out string) {
	t.Helper()
	cfgDir := t.TempDir()
	cfg := fmt.Sprintf(`[daemon]
socket = %q
state-dir = %q

[[machine]]
host = %q
port = %d
user = "root"
ssh-key = %q
host-key = %q
systems = ["x86_64-linux"]
`, filepath.Join(cfgDir, "no-broker.sock"), filepath.Join(cfgDir, "state"), s.Host, s.Port, s.ClientKeyFile, s.HostKey) + extra
	cfgFile = filepath.Join(cfgDir, "offload.toml")
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	salt := make([]byte, 8)
	rand.Read(salt)
	expr := filepath.Join(cfgDir, "hostile.nix")
	if err := os.WriteFile(expr, []byte(fmt.Sprintf(`derivation { name = "hostile-e2e"; salt = %q; system = "x86_64-linux";
		builder = "/bin/sh"; args = ["-c" "echo built locally > $out"]; }`, hex.EncodeToString(salt))), 0o644); err != nil {
		t.Fatal(err)
	}
	store = testbed.NewStore(t)
	drv, stderr, err := bedRun(nix, store, nil, "nix-instantiate", expr)
	if err != nil {
		t.Fatalf("nix-instantiate: %v: %s", err, stderr)
	}
	out, stderr, err = bedRun(nix, store, nil, "nix-store", "-q", "--outputs", drv)
	if err != nil {
		t.Fatalf("nix-store -q --outputs: %v: %s", err, stderr)
	}
	return cfgFile, store, drv, out
}

// TestHookMachineNeverGreets: a machine that opens the serve channel but
// never sends the protocol greeting costs the hook its connect timeout: the
// hook gives up on it and says why, and Nix, which may not build locally
// here, waits for a machine (as with Nix's own hook when every machine is
// down) until timeout(1) stops it. Before the fix the hook itself hung in
// the handshake, holding the build's locks, whatever connect-timeout said.
func TestHookMachineNeverGreets(t *testing.T) {
	nix := testbed.Lookup(t, "2.8")
	hook := testbed.HookBinary(t)
	stalled := make(chan servetest.Op, 1)
	srv := &servetest.Server{Stalled: stalled, Tamper: func(r *servetest.Reply) {
		if r.Op == servetest.Handshake {
			r.Bytes, r.After = nil, servetest.Stall
		}
	}}
	s := servetest.StartSSH(t, srv)
	cfgFile, store, drv, out := hostileSetup(t, nix, s, "connect-timeout = \"2s\"\n")
	start := time.Now()
	done := make(chan struct{})
	var stderr string
	var err error
	go func() {
		defer close(done)
		_, stderr, err = bedRun(nix, store, []string{"NIX_OFFLOAD_CONFIG=" + cfgFile},
			"/usr/bin/timeout", "15", "nix-store", "--realise", drv, "--max-jobs", "0", "--option", "build-hook", hook, "--option", "substituters", "")
	}()
	select {
	case <-done:
	case <-time.After(2 * time.Minute): // a bound on a hang, not a timing assertion
		t.Fatal("nix-store --realise still waiting two minutes after a machine stopped greeting")
	}
	t.Logf("after %v nix-store --realise said:\n%s", time.Since(start).Round(time.Millisecond), stderr)
	if err == nil {
		t.Fatal("nix-store --realise succeeded without a machine that speaks the protocol")
	}
	if want := "cannot use '" + s.MachineName() + "' for '" + drv + "': " + s.MachineName() + ": no serve protocol greeting within 2s"; !strings.Contains(stderr, want) {
		t.Errorf("nix-store --realise output lacks %q", want)
	}
	select {
	case <-stalled:
	default:
		t.Error("the machine was never asked for its greeting")
	}
	checkInvalidForNix(t, nix, store, out)
}

func TestHookAgainstHostileMachine(t *testing.T) {
	nix := testbed.Lookup(t, "2.8")
	hook := testbed.HookBinary(t)
	srv := &servetest.Server{Build: lyingBuild}
	s := servetest.StartSSH(t, srv)
	cfgFile, store, drv, out := hostileSetup(t, nix, s, "")
	_, stderr, err := bedRun(nix, store, []string{"NIX_OFFLOAD_CONFIG=" + cfgFile},
		"nix-store", "--realise", drv, "--max-jobs", "0", "--option", "build-hook", hook, "--option", "substituters", "")
	t.Logf("nix-store --realise said:\n%s", stderr)
	if err == nil {
		t.Fatal("nix-store --realise succeeded with the output of a machine that lies about narHash")
	}
	for _, want := range []string{"'" + s.MachineName() + "'", out, "hash mismatch", "but the machine reported sha256:" + strings.Repeat("1", 52)} {
		if !strings.Contains(stderr, want) {
			t.Errorf("nix-store --realise output lacks %q", want)
		}
	}
	// The hook did talk to the fake: it built and was asked for the NAR.
	ops := srv.Ops()
	if !slices.Contains(ops, servetest.BuildDerivation) || !slices.Contains(ops, servetest.DumpStorePath) {
		t.Errorf("operations on the machine: %v", ops)
	}
	if p, ok := srv.Lookup(out); !ok || !strings.HasSuffix(p.Info.NarHash, strings.Repeat("1", 52)) {
		t.Errorf("the machine did not build %s: %+v", out, p)
	}
	checkInvalidForNix(t, nix, store, out)
}
