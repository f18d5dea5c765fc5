package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/nix-offload/nix-offload/internal/hookproto"
)

// A broken configuration is reported in full, with file and line, before anything runs:
// `check` exits 2 and the hook declines permanently, and neither connects to any machine.
// The machines point at a TCP listener this test owns, which counts every connection.

// connCounter is a listener on 127.0.0.1 that counts and drops every connection.
type connCounter struct {
	ln       net.Listener
	mu       sync.Mutex
	count    int64           // guarded by mu
	accepted map[string]bool // remote addresses of the connections accepted; guarded by mu
	markers  int64           // connections of connections() itself; guarded by mu
	changed  chan struct{}   // closed and replaced at each accept; guarded by mu
	done     chan struct{}
}

func newConnCounter(t *testing.T) *connCounter {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &connCounter{ln: ln, accepted: map[string]bool{}, changed: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(c.done)
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			c.mu.Lock()
			c.count++
			c.accepted[conn.RemoteAddr().String()] = true
			close(c.changed)
			c.changed = make(chan struct{})
			c.mu.Unlock()
			conn.Close()
		}
	}()
	t.Cleanup(func() { ln.Close(); <-c.done })
	return c
}

func (c *connCounter) port() int { return c.ln.Addr().(*net.TCPAddr).Port }

// connections returns how many connections arrived. A connection that completed its TCP
// handshake is in the accept queue by the time its dialer returned, and the queue is
// first in, first out: so once a marker connection made here has been accepted, every
// earlier one has been counted.
func (c *connCounter) connections(t *testing.T) int64 {
	t.Helper()
	marker, err := net.Dial("tcp", c.ln.Addr().String())
	if err != nil {
		t.Fatalf("connCounter: %v", err)
	}
	defer marker.Close()
	timeout := time.After(10 * time.Second)
	c.mu.Lock()
	c.markers++
	c.mu.Unlock()
	for {
		c.mu.Lock()
		seen, n, changed := c.accepted[marker.LocalAddr().String()], c.count-c.markers, c.changed
		c.mu.Unlock()
		if seen {
			return n
		}
		select {
		case <-changed:
		case <-timeout:
			t.Fatal("connCounter: the marker connection was not accepted within 10 s")
		}
	}
}

// testKeys writes an unencrypted client key and returns its path and a host key line.
func testKeys(t *testing.T) (keyFile, hostKey string) {
	t.Helper()
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	block, err := ssh.MarshalPrivateKey(priv, "")
	if err != nil {
		t.Fatal(err)
	}
	keyFile = filepath.Join(t.TempDir(), "id_ed25519")
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(block), 0o600); err != nil {
		t.Fatal(err)
	}
	sshPub, _ := ssh.NewPublicKey(pub)
	return keyFile, strings.TrimSpace(string(ssh.MarshalAuthorizedKey(sshPub)))
}

// badTOML is an offload.toml with one mistake of each kind, all aimed at port; the comment
// after each line is the error it must give.
func badTOML(port int, keyFile, hostKey string) (text string, wantLines []string) {
	lines := []struct{ line, want string }{
		{"[ssh]", ""},
		{fmt.Sprintf("ssh-key = %q", keyFile), ""},
		{`connect-timeout = "10"`, `3: ssh.connect-timeout: "10" is not a duration; write e.g. "10s" or "1m30s"`},
		{"", ""},
		{"[[machine]]", ""},
		{`host = "127.0.0.1"`, ""},
		{fmt.Sprintf("port = %d", port), ""},
		{fmt.Sprintf("host-key = %q", hostKey), ""},
		{`systems = ["x86_64-linux"]`, ""},
		{"paralel-builds = 2", `10: machine[1]: unknown key "paralel-builds" (did you mean "parallel-builds"?)`},
		{"", ""},
		{"[[machine]]", ""},
		{`host = "127.0.0.1"`, `13: machine[2].host: duplicate machine "127.0.0.1:` + fmt.Sprint(port) + `"; machine[1] at line 6 has the same user, host and port`},
		{fmt.Sprintf("port = %d", port), ""},
		{`systems = []`, `15: machine[2].systems: must not be empty; list the systems this machine builds for, e.g. ["x86_64-linux"]`},
		{"parallel-builds = -4", `16: machine[2].parallel-builds: must be at least 1, got -4`},
		{"speed = nan", `17: machine[2].speed: must be a finite number, got NaN`},
		{"", ""},
		{"[[machine]]", ""},
		{`host = "localhost"`, ""},
		{fmt.Sprintf("port = %d", port), ""},
		{`systems = ["x86_64-linux"]`, ""},
		{`host-key = ""`, `23: machine[3].host-key: must be a public key line such as "ssh-ed25519 AAAA…" (the host's /etc/ssh/ssh_host_ed25519_key.pub): ssh: no key found`},
		{fmt.Sprintf("hostkey = %q", hostKey), `24: machine[3]: unknown key "hostkey" (did you mean "host-key"?)`},
	}
	var b strings.Builder
	for _, l := range lines {
		b.WriteString(l.line + "\n")
		if l.want != "" {
			wantLines = append(wantLines, l.want)
		}
	}
	return b.String(), wantLines
}

// TestCheckReportsConfigErrorsFirst: `check -config bad.toml` prints every error, each as
// "file:line: key: message", exits 2 and connects to nothing. The control run with the same
// machines written correctly does connect, which shows that the counter would have seen it.
func TestCheckReportsConfigErrorsFirst(t *testing.T) {
	lc := newConnCounter(t)
	keyFile, hostKey := testKeys(t)
	text, want := badTOML(lc.port(), keyFile, hostKey)
	path := filepath.Join(t.TempDir(), "bad.toml")
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}

	code, out, errOut := runCLI(t, "check", "-config", path)
	if code != exitUsage {
		t.Errorf("exit %d, want %d", code, exitUsage)
	}
	if out != "" {
		t.Errorf("stdout %q, want nothing: the machines must not be checked", out)
	}
	got := strings.Split(strings.TrimSpace(strings.TrimPrefix(errOut, "nix-offload-hook: ")), "\n")
	var wantFull []string
	for _, w := range want {
		wantFull = append(wantFull, path+":"+w)
	}
	if strings.Join(got, "\n") != strings.Join(wantFull, "\n") {
		t.Errorf("stderr:\n%s\nwant these lines, in this order:\n%s", errOut, strings.Join(wantFull, "\n"))
	}
	if n := lc.connections(t); n != 0 {
		t.Errorf("check made %d connections with a broken configuration", n)
	}

	good := fmt.Sprintf("[ssh]\nssh-key = %q\nconnect-timeout = \"5s\"\n[[machine]]\nhost = \"127.0.0.1\"\nport = %d\nhost-key = %q\nsystems = [\"x86_64-linux\"]\n",
		keyFile, lc.port(), hostKey)
	if err := os.WriteFile(path, []byte(good), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SSH_AUTH_SOCK", "")
	code, _, errOut = runCLI(t, "check", "-config", path)
	if code != exitFailed {
		t.Errorf("control: exit %d, want %d (the counter is no SSH server); stderr %q", code, exitFailed, errOut)
	}
	if n := lc.connections(t); n == 0 {
		t.Errorf("control: check made no connection, so the counter proves nothing")
	}
}

// TestCheckReportsMachinesFileErrorsFirst: the same for Nix's machines format (-builders).
func TestCheckReportsMachinesFileErrorsFirst(t *testing.T) {
	t.Setenv("NIX_OFFLOAD_CONFIG", "")
	lc := newConnCounter(t)
	uri := fmt.Sprintf("ssh://root@127.0.0.1:%d", lc.port())
	spec := uri + " x86_64-linux - -1\n" + // negative max jobs
		uri + " , - 2\n" + // no systems
		"ssh://nix@127.0.0.1:" + fmt.Sprint(lc.port()) + " x86_64-linux - 1 nan ; " + uri + " aarch64-linux - 1 2 - - c3NoLWVkMjU1MTkK"
	code, out, errOut := runCLI(t, "check", "-builders", spec)
	if code != exitUsage || out != "" {
		t.Errorf("exit %d, stdout %q; want %d and nothing", code, out, exitUsage)
	}
	for _, want := range []string{
		`builders:1: field 4 (max jobs): must be a whole number, got "-1"`,
		`builders:2: field 2 (systems): "," lists no system`,
		`builders:3: field 5 (speed factor): must be a finite number, got "nan"`,
		`builders:3: field 8 (public host key): decodes to something that is not a public key line`,
	} {
		if !strings.Contains(errOut, want) {
			t.Errorf("stderr lacks %q:\n%s", want, errOut)
		}
	}
	if n := lc.connections(t); n != 0 {
		t.Errorf("check made %d connections with a broken machines list", n)
	}
}

// hookStdin is the settings block Nix writes first, with the given settings.
func hookStdin(settings ...string) []byte {
	var b bytes.Buffer
	u64 := func(v uint64) { b.Write(binary.LittleEndian.AppendUint64(nil, v)) }
	str := func(s string) {
		u64(uint64(len(s)))
		b.WriteString(s)
		b.Write(make([]byte, (8-len(s)%8)%8))
	}
	for i := 0; i+1 < len(settings); i += 2 {
		u64(1)
		str(settings[i])
		str(settings[i+1])
	}
	u64(0)
	return b.Bytes()
}

// TestHookDeclinesOnBrokenConfig: the hook with a broken offload.toml, or a broken `builders`
// setting, answers "# decline-permanently" (Nix builds locally), logs every error with its
// file and line, and connects to nothing.
func TestHookDeclinesOnBrokenConfig(t *testing.T) {
	lc := newConnCounter(t)
	keyFile, hostKey := testKeys(t)
	text, want := badTOML(lc.port(), keyFile, hostKey)
	path := filepath.Join(t.TempDir(), "offload.toml")
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	uri := fmt.Sprintf("ssh://root@127.0.0.1:%d", lc.port())

	for _, tc := range []struct {
		name, config, builders string
		want                   []string
	}{
		{"offload.toml", path, uri + " x86_64-linux", func() []string {
			var w []string
			for _, l := range want {
				w = append(w, path+":"+l)
			}
			return w
		}()},
		{"builders", "", uri + " x86_64-linux - -1\n" + uri + " x86_64-linux", []string{
			`builders:1: field 4 (max jobs): must be a whole number, got "-1"`,
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("NIX_OFFLOAD_CONFIG", tc.config)
			var out, logBuf bytes.Buffer
			h := &hook{
				in:  bytes.NewReader(hookStdin("builders", tc.builders, "system", "x86_64-linux")),
				out: &out,
				log: hookproto.NewLogger(&logBuf),
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if err := h.serve(ctx); err != nil {
				t.Fatalf("serve: %v", err)
			}
			if got := out.String(); got != "# decline-permanently\n" {
				t.Errorf("reply %q, want # decline-permanently", got)
			}
			// The log is @nix JSON: one message with every error, ending in what happens next.
			logText := logBuf.String()
			if strings.Count(logText, "\n") != 1 || !strings.Contains(logText, `building locally`) {
				t.Errorf("log %q, want one message that says the build happens locally", logText)
			}
			for _, w := range tc.want {
				quoted := strings.ReplaceAll(strings.ReplaceAll(w, `\`, `\\`), `"`, `\"`)
				if !strings.Contains(logText, quoted) {
					t.Errorf("log lacks %q:\n%s", w, logText)
				}
			}
			if n := lc.connections(t); n != 0 {
				t.Errorf("the hook made %d connections with a broken configuration", n)
			}
		})
	}
}
