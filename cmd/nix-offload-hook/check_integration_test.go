package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"golang.org/x/crypto/ssh"

	"github.com/nix-offload/nix-offload/internal/testbed"
)

// machineTOML is one [[machine]] table for a test bed builder. With pin,
// the host key is pinned; else the builder's known_hosts file is used.
func machineTOML(b *testbed.Builder, pin bool) string {
	var s strings.Builder
	fmt.Fprintf(&s, "[[machine]]\nhost = %q\nport = %d\nuser = %q\nssh-key = %q\nsystems = [\"x86_64-linux\"]\n",
		b.Addr, b.Port, b.User, b.ClientKey)
	if pin {
		fmt.Fprintf(&s, "host-key = %q\n", b.HostKey)
	} else {
		fmt.Fprintf(&s, "known-hosts = [%q]\n", b.KnownHosts)
	}
	return s.String()
}

func writeConfig(t *testing.T, parts ...string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "offload.toml")
	if err := os.WriteFile(p, []byte(strings.Join(parts, "\n")), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func runCLI(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), args, &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

// TestCheckAgainstRealBuilders runs `check` against one builder per Nix
// version on the test bed: every machine passes and the table reports the
// serve protocol and remote Nix version that machine really has.
func TestCheckAgainstRealBuilders(t *testing.T) {
	nixes := testbed.All(t)
	var parts []string
	builders := map[string]*testbed.Builder{}
	for i, nix := range nixes {
		b := testbed.StartBuilder(t, nix)
		builders[nix.Version] = b
		parts = append(parts, machineTOML(b, i%2 == 0)) // pinned and known-hosts alike
	}
	cfg := writeConfig(t, parts...)

	code, out, errOut := runCLI(t, "check", "-config", cfg)
	t.Logf("check output:\n%s%s", out, errOut)
	if code != exitOK {
		t.Fatalf("check exited %d, want 0", code)
	}
	for ver, b := range builders {
		row := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(fmt.Sprintf("root@%s:%d", b.Addr, b.Port)) + `\s.*$`).FindString(out)
		if row == "" {
			t.Errorf("no row for the Nix %s builder", ver)
			continue
		}
		// Every Nix from 2.4 to 2.34 speaks serve protocol 2.7.
		for _, want := range []string{" 2.7 ", " " + ver + " ", " ok"} {
			if !strings.Contains(row, want) {
				t.Errorf("Nix %s row %q lacks %q", ver, row, want)
			}
		}
	}

	// -json gives the same verdicts, one object per machine.
	code, out, _ = runCLI(t, "check", "-config", cfg, "-json")
	if code != exitOK {
		t.Fatalf("check -json exited %d", code)
	}
	dec := json.NewDecoder(strings.NewReader(out))
	n := 0
	for dec.More() {
		var r checkResult
		if err := dec.Decode(&r); err != nil {
			t.Fatal(err)
		}
		if !r.OK || r.Protocol != "ssh 2.7" || r.NixVersion == "" || r.RoundTrip <= 0 || r.ClockSkew == nil {
			t.Errorf("json result %+v", r)
		}
		n++
	}
	if n != len(nixes) {
		t.Errorf("%d json results for %d machines", n, len(nixes))
	}
}

// TestCheckFailsCleanly: a wrong pinned host key and an unreachable host
// each fail their own row with the reason and a hint, the healthy machine
// still passes, and the exit status is 1.
func TestCheckFailsCleanly(t *testing.T) {
	nix := testbed.Lookup(t, "2.8")
	good := testbed.StartBuilder(t, nix)
	impostor := testbed.StartBuilder(t, nix)
	gone := testbed.StartBuilder(t, nix)
	gone.Stop()

	// The impostor's config pins a key the host does not have.
	_, other, _ := ed25519.GenerateKey(rand.Reader)
	otherKey, _ := ssh.NewPublicKey(other.Public())
	wrongPin := strings.Replace(machineTOML(impostor, true), impostor.HostKey,
		strings.TrimSpace(string(ssh.MarshalAuthorizedKey(otherKey))), 1)
	cfg := writeConfig(t, machineTOML(good, true), wrongPin, machineTOML(gone, true))

	code, out, errOut := runCLI(t, "check", "-config", cfg)
	t.Logf("check output:\n%s%s", out, errOut)
	if code != exitFailed {
		t.Fatalf("check exited %d, want %d", code, exitFailed)
	}
	name := func(b *testbed.Builder) string { return fmt.Sprintf("root@%s:%d", b.Addr, b.Port) }
	if !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name(good)) + `\s.*\sok$`).MatchString(out) {
		t.Errorf("healthy machine not ok")
	}
	for _, want := range []string{
		name(impostor) + ": connect: ssh: host key mismatch",
		ssh.FingerprintSHA256(otherKey),
		name(gone) + ": connect: ssh: cannot connect",
		"connection refused",
		"hint: ",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	if !strings.Contains(errOut, "2 of 3 machines failed") {
		t.Errorf("stderr %q does not summarise the failures", errOut)
	}

	// Naming one machine checks only that one.
	code, out, _ = runCLI(t, "check", "-config", cfg, good.Addr)
	if code != exitOK || strings.Contains(out, impostor.Addr) {
		t.Errorf("check %s: exit %d, output:\n%s", good.Addr, code, out)
	}
}

// TestCheckBuildersFormat: without a TOML file, check reads Nix's machines
// format, including the base64 host key column.
func TestCheckBuildersFormat(t *testing.T) {
	nix := testbed.Lookup(t, "2.8")
	b := testbed.StartBuilder(t, nix)
	t.Setenv("NIX_OFFLOAD_CONFIG", "")
	spec := fmt.Sprintf("ssh://root@%s:%d x86_64-linux %s 2 1 - - %s", b.Addr, b.Port, b.ClientKey, base64Line(b.HostKey))
	code, out, errOut := runCLI(t, "check", "-builders", spec)
	if code != exitOK {
		t.Fatalf("check exited %d:\n%s%s", code, out, errOut)
	}
}
