package sshconn

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"

	"github.com/nix-offload/nix-offload/internal/machines"
)

// testServer is an SSH server on 127.0.0.1 with an ECDSA and an Ed25519 host
// key (as OpenSSH has by default) that accepts one client key and answers
// `exec` requests by echoing the command.
type testServer struct {
	addr     string
	ed25519  ssh.PublicKey
	ecdsa    ssh.PublicKey
	clientKF string // private key file of the authorized client
	freeze   chan struct{}
	wg       sync.WaitGroup
}

func newTestServer(t *testing.T) *testServer {
	t.Helper()
	_, edPriv, _ := ed25519.GenerateKey(rand.Reader)
	edSigner, _ := ssh.NewSignerFromKey(edPriv)
	ecPriv, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ecSigner, _ := ssh.NewSignerFromKey(ecPriv)

	_, clientPriv, _ := ed25519.GenerateKey(rand.Reader)
	clientSigner, _ := ssh.NewSignerFromKey(clientPriv)
	block, err := ssh.MarshalPrivateKey(clientPriv, "")
	if err != nil {
		t.Fatal(err)
	}
	kf := filepath.Join(t.TempDir(), "id_ed25519")
	if err := os.WriteFile(kf, pem.EncodeToMemory(block), 0o600); err != nil {
		t.Fatal(err)
	}

	cfg := &ssh.ServerConfig{
		PublicKeyCallback: func(_ ssh.ConnMetadata, k ssh.PublicKey) (*ssh.Permissions, error) {
			if string(k.Marshal()) == string(clientSigner.PublicKey().Marshal()) {
				return nil, nil
			}
			return nil, errors.New("unknown key")
		},
	}
	cfg.AddHostKey(ecSigner)
	cfg.AddHostKey(edSigner)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &testServer{addr: ln.Addr().String(), ed25519: edSigner.PublicKey(), ecdsa: ecSigner.PublicKey(),
		clientKF: kf, freeze: make(chan struct{})}
	t.Cleanup(func() {
		ln.Close()
		s.wg.Wait()
	})
	s.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.wg.Go(func() { s.serve(c, cfg) })
		}
	})
	return s
}

func (s *testServer) serve(c net.Conn, cfg *ssh.ServerConfig) {
	defer c.Close()
	conn, chans, reqs, err := ssh.NewServerConn(&freezableConn{Conn: c, freeze: s.freeze}, cfg)
	if err != nil {
		return
	}
	defer conn.Close()
	go ssh.DiscardRequests(reqs)
	for nc := range chans {
		ch, chReqs, err := nc.Accept()
		if err != nil {
			continue
		}
		go func() {
			defer ch.Close()
			for req := range chReqs {
				if req.Type != "exec" {
					req.Reply(false, nil)
					continue
				}
				req.Reply(true, nil)
				cmd := string(req.Payload[4:])
				fmt.Fprintf(ch, "ran %s\n", cmd)
				ch.SendRequest("exit-status", false, ssh.Marshal(struct{ Status uint32 }{0}))
				return
			}
		}()
	}
}

// freezableConn stops delivering bytes once freeze is closed, like a machine
// that vanished without closing its TCP connection.
type freezableConn struct {
	net.Conn
	freeze chan struct{}
}

func (c *freezableConn) Read(p []byte) (int, error) {
	select {
	case <-c.freeze:
		// Swallow everything until the client hangs up.
		for {
			if _, err := c.Conn.Read(p); err != nil {
				return 0, err
			}
		}
	default:
	}
	return c.Conn.Read(p)
}

func (s *testServer) target(t *testing.T) Target {
	host, port, _ := net.SplitHostPort(s.addr)
	var p int
	fmt.Sscan(port, &p)
	m := machines.Machine{Host: host, Port: p, User: "root", SSHKey: s.clientKF, ConnectTimeout: 5 * time.Second}
	tg := Resolve(m, nil)
	tg.KnownHosts = []string{filepath.Join(t.TempDir(), "absent_known_hosts")}
	return tg
}

func authorized(k ssh.PublicKey) string {
	return strings.TrimSpace(string(ssh.MarshalAuthorizedKey(k)))
}

func TestDialPinnedEd25519(t *testing.T) {
	s := newTestServer(t)
	tg := s.target(t)
	// The server also has an ECDSA key, which x/crypto would ask for first:
	// pinning only the Ed25519 key must still work.
	tg.HostKey = authorized(s.ed25519)
	c, err := Dial(context.Background(), tg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.HostKey.Type() != ssh.KeyAlgoED25519 {
		t.Errorf("verified key type %s, want ed25519", c.HostKey.Type())
	}
	out, err := c.Output(context.Background(), "nix-store --version")
	if err != nil || string(out) != "ran nix-store --version\n" {
		t.Errorf("Output = %q, %v", out, err)
	}
}

func TestDialPinnedMismatch(t *testing.T) {
	s := newTestServer(t)
	tg := s.target(t)
	other, _, _ := ed25519.GenerateKey(rand.Reader)
	otherKey, _ := ssh.NewPublicKey(other)
	tg.HostKey = authorized(otherKey)
	_, err := Dial(context.Background(), tg)
	var he *HostKeyError
	if !errors.As(err, &he) || he.Problem != HostKeyMismatch || !he.Pinned {
		t.Fatalf("err = %v, want pinned HostKeyError mismatch", err)
	}
	for _, want := range []string{"host key mismatch", ssh.FingerprintSHA256(s.ed25519), ssh.FingerprintSHA256(otherKey)} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

func TestDialKnownHosts(t *testing.T) {
	s := newTestServer(t)
	tg := s.target(t)
	kh := filepath.Join(t.TempDir(), "known_hosts")
	// Only the Ed25519 key is on record, at a non-standard port ([host]:port).
	line := knownhosts.Line([]string{knownhosts.Normalize(s.addr)}, s.ed25519)
	if err := os.WriteFile(kh, []byte(line+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	tg.KnownHosts = []string{filepath.Join(t.TempDir(), "missing"), kh}
	c, err := Dial(context.Background(), tg)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()

	// The same file with another host's key on that line is a mismatch.
	other, _, _ := ed25519.GenerateKey(rand.Reader)
	otherKey, _ := ssh.NewPublicKey(other)
	line = knownhosts.Line([]string{knownhosts.Normalize(s.addr)}, otherKey)
	os.WriteFile(kh, []byte(line+"\n"), 0o644)
	_, err = Dial(context.Background(), tg)
	var he *HostKeyError
	if !errors.As(err, &he) || he.Problem != HostKeyMismatch || he.Pinned {
		t.Fatalf("err = %v, want known-hosts mismatch", err)
	}
	if !strings.Contains(err.Error(), kh+":1") {
		t.Errorf("error %q does not name the known_hosts line", err)
	}
}

func TestDialUnknownHostIsRefused(t *testing.T) {
	s := newTestServer(t)
	for _, tc := range []struct {
		name  string
		files func(dir string) []string
		want  string
	}{
		{"no files", func(dir string) []string { return []string{filepath.Join(dir, "none")} }, "none of the known-hosts files exists"},
		{"host not listed", func(dir string) []string {
			f := filepath.Join(dir, "kh")
			os.WriteFile(f, []byte(knownhosts.Line([]string{"elsewhere"}, s.ed25519)+"\n"), 0o644)
			return []string{f}
		}, "not found in"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tg := s.target(t)
			tg.KnownHosts = tc.files(t.TempDir())
			_, err := Dial(context.Background(), tg)
			var he *HostKeyError
			if !errors.As(err, &he) || he.Problem != HostKeyUnknown {
				t.Fatalf("err = %v, want HostKeyError unknown", err)
			}
			if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "SHA256:") {
				t.Errorf("error %q lacks %q or the offered fingerprint", err, tc.want)
			}
		})
	}
}

func TestDialConnectErrors(t *testing.T) {
	s := newTestServer(t)

	t.Run("refused", func(t *testing.T) {
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		addr := ln.Addr().String()
		ln.Close()
		tg := s.target(t)
		tg.Addr = addr
		tg.HostKey = authorized(s.ed25519)
		_, err := Dial(context.Background(), tg)
		var ce *ConnectError
		if !errors.As(err, &ce) || !strings.Contains(err.Error(), "connection refused") {
			t.Fatalf("err = %v, want ConnectError connection refused", err)
		}
	})

	t.Run("wrong client key", func(t *testing.T) {
		tg := s.target(t)
		tg.HostKey = authorized(s.ed25519)
		_, priv, _ := ed25519.GenerateKey(rand.Reader)
		block, _ := ssh.MarshalPrivateKey(priv, "")
		tg.KeyFiles = []string{filepath.Join(t.TempDir(), "k")}
		os.WriteFile(tg.KeyFiles[0], pem.EncodeToMemory(block), 0o600)
		t.Setenv("SSH_AUTH_SOCK", "")
		_, err := Dial(context.Background(), tg)
		var ce *ConnectError
		if !errors.As(err, &ce) || !strings.Contains(err.Error(), "unable to authenticate") {
			t.Fatalf("err = %v, want ConnectError unable to authenticate", err)
		}
	})

	t.Run("handshake never comes", func(t *testing.T) {
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		defer ln.Close()
		go func() {
			c, err := ln.Accept()
			if err == nil {
				defer c.Close()
				c.Read(make([]byte, 1<<16)) // silent until the client gives up
			}
		}()
		tg := s.target(t)
		tg.Addr = ln.Addr().String()
		tg.HostKey = authorized(s.ed25519)
		tg.ConnectTimeout = 200 * time.Millisecond
		_, err := Dial(context.Background(), tg)
		var ce *ConnectError
		if !errors.As(err, &ce) {
			t.Fatalf("err = %v, want ConnectError", err)
		}
	})

	t.Run("missing configured key", func(t *testing.T) {
		tg := s.target(t)
		tg.HostKey = authorized(s.ed25519)
		tg.KeyFiles = []string{"/nonexistent/key"}
		_, err := Dial(context.Background(), tg)
		if err == nil || !strings.Contains(err.Error(), "/nonexistent/key") {
			t.Fatalf("err = %v, want it to name the key file", err)
		}
	})

	t.Run("encrypted key without agent", func(t *testing.T) {
		tg := s.target(t)
		tg.HostKey = authorized(s.ed25519)
		_, priv, _ := ed25519.GenerateKey(rand.Reader)
		block, _ := ssh.MarshalPrivateKeyWithPassphrase(priv, "", []byte("secret passphrase"))
		tg.KeyFiles = []string{filepath.Join(t.TempDir(), "k")}
		os.WriteFile(tg.KeyFiles[0], pem.EncodeToMemory(block), 0o600)
		t.Setenv("SSH_AUTH_SOCK", "")
		_, err := Dial(context.Background(), tg)
		if err == nil || !strings.Contains(err.Error(), "encrypted") || strings.Contains(err.Error(), "secret") {
			t.Fatalf("err = %v, want 'encrypted' and no passphrase", err)
		}
	})
}

func TestKeepAliveClosesDeadConnection(t *testing.T) {
	s := newTestServer(t)
	tg := s.target(t)
	tg.HostKey = authorized(s.ed25519)
	tg.KeepAlive = 20 * time.Millisecond
	c, err := Dial(context.Background(), tg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Lost(); err != nil {
		t.Errorf("Lost() = %v on a live connection", err)
	}
	close(s.freeze) // the machine stops answering
	done := make(chan error, 1)
	go func() { done <- c.Wait() }()
	select {
	case <-done:
	case <-time.After(30 * time.Second): // a bound on a hang, not a timing assertion
		t.Fatal("connection to a silent machine was not closed by keepalives")
	}
	// Sessions only see EOF: Lost says why, naming the machine.
	if err := c.Lost(); err == nil || !strings.Contains(err.Error(), "stopped answering: no reply to 3 keepalives") ||
		!strings.Contains(err.Error(), tg.Name) {
		t.Errorf("Lost() = %v, want the missed keepalives and the machine", err)
	}
}

type fakeSSHConfig map[string]string

func (f fakeSSHConfig) Get(alias, key string) string { return f[alias+"/"+key] }

func TestResolve(t *testing.T) {
	t.Setenv("HOME", "/home/u")
	cfg := fakeSSHConfig{
		"b1/HostName":            "10.1.2.3",
		"b1/Port":                "2222",
		"b1/User":                "nix",
		"b1/IdentityFile":        "~/.ssh/b1_key",
		"b1/UserKnownHostsFile":  "~/.ssh/kh_b1",
		"b1/ConnectTimeout":      "3",
		"b1/ServerAliveInterval": "5",
	}
	got := Resolve(machines.Machine{Host: "b1"}, cfg)
	if got.Addr != "10.1.2.3:2222" || got.User != "nix" || got.ConnectTimeout != 3*time.Second || got.KeepAlive != 5*time.Second {
		t.Errorf("from ssh_config: %+v", got)
	}
	if len(got.KeyFiles) != 1 || got.KeyFiles[0] != "/home/u/.ssh/b1_key" || !got.KeyFilesStrict {
		t.Errorf("key files %v", got.KeyFiles)
	}
	if got.KnownHosts[0] != "/home/u/.ssh/kh_b1" {
		t.Errorf("known hosts %v", got.KnownHosts)
	}

	// The machine's own settings win over ssh_config.
	got = Resolve(machines.Machine{Host: "b1", Port: 22, User: "root", SSHKey: "/k", KnownHosts: []string{"/kh"},
		ConnectTimeout: time.Second, ServerAliveInterval: 2 * time.Second}, cfg)
	if got.Addr != "10.1.2.3:22" || got.User != "root" || got.KeyFiles[0] != "/k" || got.KnownHosts[0] != "/kh" || got.ConnectTimeout != time.Second ||
		got.KeepAlive != 2*time.Second {
		t.Errorf("machine settings did not win: %+v", got)
	}

	// Nothing set anywhere: OpenSSH's defaults; IPv6 addresses are bracketed.
	got = Resolve(machines.Machine{Host: "::1"}, nil)
	if got.Addr != "[::1]:22" || got.ConnectTimeout != DefaultConnectTimeout || got.KeyFilesStrict || got.KeepAlive != 0 {
		t.Errorf("defaults: %+v", got)
	}
	if got.KnownHosts[0] != "/home/u/.ssh/known_hosts" || got.KnownHosts[len(got.KnownHosts)-1] != "/etc/ssh/ssh_known_hosts2" {
		t.Errorf("default known hosts %v", got.KnownHosts)
	}
}
