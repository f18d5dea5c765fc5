package broker

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/crypto/ssh"

	"github.com/nix-offload/nix-offload/internal/health"
	"github.com/nix-offload/nix-offload/internal/localstore"
	"github.com/nix-offload/nix-offload/internal/machines"
)

// syncBuffer is a bytes.Buffer safe for the logger's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestNoKeyMaterialInLogs runs the broker with its real SSH pools against machines whose key
// cannot be used, logging at debug level, and checks that the log and the health file name
// each key file and hold none of its lines and no passphrase.
func TestNoKeyMaterialInLogs(t *testing.T) {
	t.Setenv("SSH_AUTH_SOCK", "")
	const passphrase = "correct horse battery staple"
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	encBlock, err := ssh.MarshalPrivateKeyWithPassphrase(priv, "", []byte(passphrase))
	if err != nil {
		t.Fatal(err)
	}
	plainBlock, err := ssh.MarshalPrivateKey(priv, "")
	if err != nil {
		t.Fatal(err)
	}
	encrypted := pem.EncodeToMemory(encBlock)
	plain := pem.EncodeToMemory(plainBlock)
	corruptBlock := *plainBlock
	corruptBlock.Bytes = append([]byte(nil), plainBlock.Bytes...)
	corruptBlock.Bytes[len(corruptBlock.Bytes)/2] ^= 0x55
	corrupt := pem.EncodeToMemory(&corruptBlock)

	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	hostKey, _ := ssh.NewPublicKey(priv.Public())
	machine := func(host, key string) machines.Machine {
		m := testMachine(host, 1, "x86_64-linux")
		m.Port, m.SSHKey = 9, key // the discard port: never dialled, authentication fails first
		m.HostKey = strings.TrimSpace(string(ssh.MarshalAuthorizedKey(hostKey)))
		m.ConnectTimeout = time.Second
		return m
	}
	ms := []machines.Machine{
		machine("127.0.0.1", write("id_encrypted", encrypted)),
		machine("127.0.0.2", write("id_corrupt", corrupt)),
		// Built in code, past the configuration check that refuses it.
		machine("127.0.0.3", string(plain)),
	}

	var logBuf syncBuffer
	enc := zapcore.NewJSONEncoder(zap.NewDevelopmentEncoderConfig())
	log := zap.New(zapcore.NewCore(enc, zapcore.AddSync(&logBuf), zap.DebugLevel))
	healthFile := filepath.Join(dir, "health.json")
	h, err := health.Open(healthFile)
	if err != nil {
		t.Fatal(err)
	}
	b := New(Options{
		Config:    &machines.Config{Machines: ms},
		Health:    h,
		Log:       log,
		OpenLocal: func() (*localstore.Store, error) { return nil, errors.New("no local store in this test") },
	})
	deadline := time.Now().Add(20 * time.Second) // a bound on a hang, not a timing assertion
	for strings.Count(logBuf.String(), "machine unreachable") < len(ms) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	b.Close()
	logs := logBuf.String()
	if n := strings.Count(logs, "machine unreachable"); n < len(ms) {
		t.Fatalf("%d of %d machines logged as unreachable; log:\n%s", n, len(ms), logs)
	}
	healthText, err := os.ReadFile(healthFile)
	if err != nil {
		t.Fatal(err)
	}

	for _, want := range []string{"id_encrypted is encrypted", "id_corrupt", "not a file name"} {
		if !strings.Contains(logs, want) {
			t.Errorf("log lacks %q:\n%s", want, logs)
		}
	}
	for name, text := range map[string]string{"log": logs, "health file": string(healthText)} {
		if strings.Contains(text, passphrase) {
			t.Errorf("%s contains the passphrase", name)
		}
		for _, key := range [][]byte{encrypted, corrupt, plain} {
			for line := range strings.SplitSeq(string(key), "\n") {
				if strings.HasPrefix(line, "-----") || len(line) < 16 {
					continue
				}
				// JSON escapes '/' and '+' as themselves, so a line shows up verbatim.
				if strings.Contains(text, line[:16]) {
					t.Errorf("%s contains key material %q", name, line[:16])
				}
			}
		}
	}
}
