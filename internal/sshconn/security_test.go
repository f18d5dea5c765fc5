package sshconn

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	sshconfig "github.com/kevinburke/ssh_config"
	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"

	"github.com/nix-offload/nix-offload/internal/machines"
)

// These tests are about what must never happen: a connection to a host whose key was not
// verified, and key material or passphrases in an error.

func writeKnownHosts(t *testing.T, lines ...string) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "known_hosts")
	if err := os.WriteFile(f, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return f
}

func otherHostKey(t *testing.T) ssh.PublicKey {
	t.Helper()
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	k, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// dialRefused dials tg, which must fail with a *HostKeyError of the given problem.
func dialRefused(t *testing.T, tg Target, problem HostKeyProblem) *HostKeyError {
	t.Helper()
	c, err := Dial(context.Background(), tg)
	if err == nil {
		c.Close()
		t.Fatalf("connected to %s, whose host key is not verified", tg.Addr)
	}
	var he *HostKeyError
	if !errors.As(err, &he) || he.Problem != problem {
		t.Fatalf("err = %v, want a HostKeyError with problem %d", err, problem)
	}
	return he
}

func dialOK(t *testing.T, tg Target) {
	t.Helper()
	c, err := Dial(context.Background(), tg)
	if err != nil {
		t.Fatalf("the control connection failed, so the refusals above prove nothing: %v", err)
	}
	c.Close()
}

// TestPinnedKeyWins: with host-key set, known-hosts files are not consulted at all. A wrong
// pin is refused even when a known-hosts file lists the host's real key, and a right pin
// connects even when a known-hosts file has a stale key for the address.
func TestPinnedKeyWins(t *testing.T) {
	s := newTestServer(t)
	addr := knownhosts.Normalize(s.addr)

	tg := s.target(t)
	tg.KnownHosts = []string{writeKnownHosts(t, knownhosts.Line([]string{addr}, s.ed25519), knownhosts.Line([]string{addr}, s.ecdsa))}
	dialOK(t, tg) // known-hosts alone accepts the host

	tg.HostKey = authorized(otherHostKey(t))
	he := dialRefused(t, tg, HostKeyMismatch)
	if !he.Pinned || !strings.Contains(he.Error(), "host-key pins") {
		t.Errorf("error %q does not say the pin refused it", he)
	}

	tg.HostKey = authorized(s.ed25519)
	tg.KnownHosts = []string{writeKnownHosts(t, knownhosts.Line([]string{addr}, otherHostKey(t)))}
	dialOK(t, tg)
}

// TestNoKnownHostsNoConnection: no pin and no usable known-hosts file (none given, an empty
// list, files that do not exist, an empty file) is a refusal, never trust on first use.
func TestNoKnownHostsNoConnection(t *testing.T) {
	s := newTestServer(t)
	empty := writeKnownHosts(t)
	for name, files := range map[string][]string{
		"nil":           nil,
		"empty list":    {},
		"missing files": {filepath.Join(t.TempDir(), "a"), filepath.Join(t.TempDir(), "b")},
		"empty file":    {empty},
		"/dev/null":     {os.DevNull},
	} {
		t.Run(name, func(t *testing.T) {
			tg := s.target(t)
			tg.KnownHosts = files
			he := dialRefused(t, tg, HostKeyUnknown)
			if he.Offered == nil || !strings.Contains(he.Error(), ssh.FingerprintSHA256(he.Offered)) {
				t.Errorf("error %q does not show the offered key's fingerprint", he)
			}
		})
	}
}

// TestEmptyKnownHostsInConfigRefuses: `known-hosts = []` without host-key, from the TOML file
// through Resolve, means OpenSSH's default files, never "no verification": here none of them
// lists the host (HOME is empty), so the dial is refused.
func TestEmptyKnownHostsInConfigRefuses(t *testing.T) {
	s := newTestServer(t)
	t.Setenv("HOME", t.TempDir())
	host, port, _ := net.SplitHostPort(s.addr)
	cfg, err := machines.Parse("offload.toml", []byte(fmt.Sprintf(
		"[ssh]\nknown-hosts = [%q]\n[[machine]]\nhost = %q\nport = %s\nuser = \"root\"\nssh-key = %q\nsystems = [\"x86_64-linux\"]\nknown-hosts = []\n",
		writeKnownHosts(t, knownhosts.Line([]string{knownhosts.Normalize(s.addr)}, s.ed25519)), host, port, s.clientKF)))
	if err != nil {
		t.Fatal(err)
	}
	tg := Resolve(cfg.Machines[0], nil)
	if len(tg.KnownHosts) == 0 || tg.HostKey != "" {
		t.Fatalf("Resolve: known hosts %v, host key %q; want OpenSSH's default files and no pin", tg.KnownHosts, tg.HostKey)
	}
	dialRefused(t, tg, HostKeyUnknown)
}

// TestKnownHostsEntryMustMatchHostAndPort: a line for the same address on another port (or
// on port 22, written without brackets), for another address, or a hashed line for another
// name, does not vouch for the host, even with the host's own key on it.
func TestKnownHostsEntryMustMatchHostAndPort(t *testing.T) {
	s := newTestServer(t)
	host, port, _ := net.SplitHostPort(s.addr)
	var p int
	fmt.Sscan(port, &p)
	for name, pattern := range map[string]string{
		"port 22":      host,
		"other port":   knownhosts.Normalize(net.JoinHostPort(host, fmt.Sprint(p%60000+1))),
		"other host":   knownhosts.Normalize(net.JoinHostPort("127.0.0.2", port)),
		"hashed other": knownhosts.HashHostname(knownhosts.Normalize(net.JoinHostPort("127.0.0.2", port))),
		"name":         knownhosts.Normalize(net.JoinHostPort("localhost", port)),
	} {
		t.Run(name, func(t *testing.T) {
			tg := s.target(t)
			tg.KnownHosts = []string{writeKnownHosts(t, knownhosts.Line([]string{pattern}, s.ed25519))}
			dialRefused(t, tg, HostKeyUnknown)
		})
	}
	t.Run("control: hashed own address", func(t *testing.T) {
		tg := s.target(t)
		tg.KnownHosts = []string{writeKnownHosts(t, knownhosts.Line([]string{knownhosts.HashHostname(knownhosts.Normalize(s.addr))}, s.ed25519))}
		dialOK(t, tg)
	})
}

// TestRevokedKeyIsRefused: "@revoked" wins over a line that lists the same key.
func TestRevokedKeyIsRefused(t *testing.T) {
	s := newTestServer(t)
	addr := knownhosts.Normalize(s.addr)
	tg := s.target(t)
	tg.KnownHosts = []string{writeKnownHosts(t,
		knownhosts.Line([]string{addr}, s.ed25519),
		"@revoked * "+authorized(s.ed25519))}
	c, err := Dial(context.Background(), tg)
	if err == nil {
		c.Close()
		t.Fatal("connected with a revoked host key")
	}
	if !strings.Contains(err.Error(), "revoked") {
		t.Errorf("err = %v, want it to say the key is revoked", err)
	}
}

// TestBlankPinIsNotNoPin: a host key that is set but does not parse stops the dial; it does
// not fall back to known-hosts (which here would accept the host).
func TestBlankPinIsNotNoPin(t *testing.T) {
	s := newTestServer(t)
	for _, pin := range []string{" ", "ssh-ed25519", "ssh-ed25519 AAAA", "-"} {
		tg := s.target(t)
		tg.KnownHosts = []string{writeKnownHosts(t, knownhosts.Line([]string{knownhosts.Normalize(s.addr)}, s.ed25519))}
		tg.HostKey = pin
		c, err := Dial(context.Background(), tg)
		if err == nil {
			c.Close()
			t.Errorf("host-key %q: connected through known-hosts", pin)
			continue
		}
		if !strings.Contains(err.Error(), "host-key does not parse") {
			t.Errorf("host-key %q: err = %v, want a host-key error", pin, err)
		}
	}
}

// TestSSHConfigCannotTurnOffVerification: Resolve reads HostName, Port, User, IdentityFile,
// UserKnownHostsFile, GlobalKnownHostsFile and ConnectTimeout from ssh_config and nothing
// else, so StrictHostKeyChecking, CheckHostIP, HostKeyAlias or known-hosts files set to
// /dev/null leave the host unverified and refused. The control run (the same file listing
// the key in UserKnownHostsFile) shows that the file was read.
func TestSSHConfigCannotTurnOffVerification(t *testing.T) {
	s := newTestServer(t)
	host, port, _ := net.SplitHostPort(s.addr)
	t.Setenv("HOME", t.TempDir()) // no ~/.ssh/known_hosts of the machine running the test
	t.Setenv("SSH_AUTH_SOCK", "")
	write := func(knownHosts string) *sshconfig.UserSettings {
		f := filepath.Join(t.TempDir(), "ssh_config")
		text := fmt.Sprintf(`Host builder
  HostName %s
  Port %s
  User root
  IdentityFile %s
  StrictHostKeyChecking no
  CheckHostIP no
  HostKeyAlias trusted-alias
  UserKnownHostsFile %s
  GlobalKnownHostsFile /dev/null
  KnownHostsCommand /bin/true
  LogLevel QUIET
`, host, port, s.clientKF, knownHosts)
		if err := os.WriteFile(f, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		u := &sshconfig.UserSettings{}
		u.ConfigFinder(func() string { return f })
		return u
	}
	m := machines.Machine{Host: "builder"}

	tg := Resolve(m, write(os.DevNull))
	if tg.Addr != s.addr || tg.User != "root" || tg.HostKey != "" {
		t.Fatalf("Resolve did not read the ssh_config: %+v", tg)
	}
	he := dialRefused(t, tg, HostKeyUnknown)
	if he.Name != "builder" {
		t.Errorf("error names %q, want the machine", he.Name)
	}

	kh := writeKnownHosts(t, knownhosts.Line([]string{knownhosts.Normalize(s.addr)}, s.ed25519))
	dialOK(t, Resolve(m, write(kh)))
}

// TestKeyMaterialNeverInErrors dials with key files that cannot be used and checks that the
// error names the file but repeats none of its lines, and no passphrase.
func TestKeyMaterialNeverInErrors(t *testing.T) {
	s := newTestServer(t)
	t.Setenv("SSH_AUTH_SOCK", "")
	const passphrase = "correct horse battery staple"
	_, edPriv, _ := ed25519.GenerateKey(rand.Reader)
	rsaPriv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	pemOf := func(b *pem.Block, err error) []byte {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return pem.EncodeToMemory(b)
	}
	plain := pemOf(ssh.MarshalPrivateKey(edPriv, ""))
	encrypted := pemOf(ssh.MarshalPrivateKeyWithPassphrase(edPriv, "", []byte(passphrase)))
	//lint:ignore SA1019 an old encrypted PEM key is exactly what users still have lying around
	legacyBlock, legacyErr := x509.EncryptPEMBlock(rand.Reader, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(rsaPriv), []byte(passphrase), x509.PEMCipherAES256)
	legacy := pemOf(legacyBlock, legacyErr)
	pkcs1 := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rsaPriv)})

	// Corruptions of real keys: a flipped byte inside the body, a body cut short, a key of a
	// type the parser does not know, PKCS#1 bytes labelled as an OpenSSH key.
	flipped := flipBodyByte(t, plain)
	truncated := cutBody(t, plain)
	unknownType := []byte(strings.Replace(string(pkcs1), "RSA PRIVATE KEY", "FANCY PRIVATE KEY", 2))
	mislabelled := []byte(strings.Replace(string(pkcs1), "RSA PRIVATE KEY", "OPENSSH PRIVATE KEY", 2))

	for _, tc := range []struct {
		name    string
		content []byte
		want    string // in the error
	}{
		{"passphrase-protected OpenSSH key", encrypted, "is encrypted; load it into ssh-agent"},
		{"passphrase-protected PEM key", legacy, "is encrypted; load it into ssh-agent"},
		{"flipped byte", flipped, "ssh-key"},
		{"truncated", truncated, "ssh-key"},
		{"unknown key type", unknownType, "ssh-key"},
		{"mislabelled key", mislabelled, "ssh-key"},
		{"valid key the machine does not accept", plain, "unable to authenticate"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kf := filepath.Join(t.TempDir(), "id_test")
			if err := os.WriteFile(kf, tc.content, 0o600); err != nil {
				t.Fatal(err)
			}
			tg := s.target(t)
			tg.HostKey = authorized(s.ed25519)
			tg.KeyFiles = []string{kf}
			c, err := Dial(context.Background(), tg)
			if err == nil {
				c.Close()
				t.Fatal("connected")
			}
			msg := err.Error()
			if !strings.Contains(msg, tc.want) {
				t.Errorf("error %q lacks %q", msg, tc.want)
			}
			if tc.want != "unable to authenticate" && !strings.Contains(msg, kf) {
				t.Errorf("error %q does not name the key file %s", msg, kf)
			}
			assertNoKeyMaterial(t, msg, tc.content, passphrase)
		})
	}

	t.Run("key pasted as the file name", func(t *testing.T) {
		tg := s.target(t)
		tg.HostKey = authorized(s.ed25519)
		tg.KeyFiles, tg.KeyFilesStrict = []string{string(plain)}, true
		_, err := Dial(context.Background(), tg)
		if err == nil || !strings.Contains(err.Error(), "not a file name") {
			t.Fatalf("err = %v, want it to say ssh-key is not a file name", err)
		}
		assertNoKeyMaterial(t, err.Error(), plain, passphrase)
	})

	t.Run("not a regular file", func(t *testing.T) {
		tg := s.target(t)
		tg.HostKey = authorized(s.ed25519)
		tg.KeyFiles, tg.KeyFilesStrict = []string{"/dev/zero"}, true // a plain read would never end
		_, err := Dial(context.Background(), tg)
		if err == nil || !strings.Contains(err.Error(), "/dev/zero is a character device, not a regular file") {
			t.Fatalf("err = %v, want it to refuse /dev/zero", err)
		}
	})
}

// assertNoKeyMaterial fails if msg contains the passphrase or any line (or any 16-byte piece
// of a line) of the key file other than its BEGIN/END markers.
func assertNoKeyMaterial(t *testing.T, msg string, key []byte, passphrase string) {
	t.Helper()
	if strings.Contains(msg, passphrase) {
		t.Errorf("error %q contains the passphrase", msg)
	}
	for line := range strings.SplitSeq(string(key), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "-----") || strings.Contains(line, ":") {
			continue // markers and PEM headers (Proc-Type, DEK-Info) are not secret
		}
		for i := 0; i+16 <= len(line); i += 8 {
			if strings.Contains(msg, line[i:i+16]) {
				t.Errorf("error %q contains key material %q", msg, line[i:i+16])
				return
			}
		}
	}
}

// flipBodyByte changes one byte in the middle of a PEM key's body.
func flipBodyByte(t *testing.T, key []byte) []byte {
	t.Helper()
	b, _ := pem.Decode(key)
	if b == nil {
		t.Fatal("not PEM")
	}
	body := append([]byte(nil), b.Bytes...)
	body[len(body)/2] ^= 0x55
	return pem.EncodeToMemory(&pem.Block{Type: b.Type, Headers: b.Headers, Bytes: body})
}

// cutBody keeps the first half of a PEM key's body.
func cutBody(t *testing.T, key []byte) []byte {
	t.Helper()
	b, _ := pem.Decode(key)
	if b == nil {
		t.Fatal("not PEM")
	}
	return pem.EncodeToMemory(&pem.Block{Type: b.Type, Headers: b.Headers, Bytes: b.Bytes[:len(b.Bytes)/2]})
}
