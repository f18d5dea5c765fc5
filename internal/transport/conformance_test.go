package transport_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	gonar "github.com/nix-community/go-nix/pkg/nar"
	"github.com/nix-community/go-nix/pkg/nixbase32"

	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/sshconn"
	"github.com/nix-offload/nix-offload/internal/testbed"
	"github.com/nix-offload/nix-offload/internal/transport"
)

// opener starts a fresh serve session whose stderr goes to sink, and
// reports which processes of the peer are still alive (for cancellation).
type opener struct {
	// open starts a session; leftovers, if set, returns the command lines of the build
	// processes of that session still running.
	open func(t *testing.T, sink io.Writer) (s *transport.Session, leftovers func() []string)
}

// TestConformance runs one suite over every transport and every Nix on the
// test bed: the local process (the local store's side) and an SSH session to
// a builder host.
func TestConformance(t *testing.T) {
	for _, nix := range testbed.All(t) {
		t.Run("local/"+nix.Version, func(t *testing.T) {
			store := testbed.NewStore(t)
			suite(t, opener{
				open: func(t *testing.T, sink io.Writer) (*transport.Session, func() []string) {
					cmd := nix.Command(store, nil, transport.ServeArgv("")...)
					s, err := transport.LocalCmd(cmd, transport.Options{Name: "local " + nix.Version, Stderr: sink})
					if err != nil {
						t.Fatal(err)
					}
					t.Cleanup(func() { s.Close(); testbed.KillCommand(cmd) })
					// Nix starts the build in a session of its own: it is found by the
					// command's namespace, where it would outlive the session's process.
					procs := testbed.CommandProcesses(t, cmd)
					return s, func() []string { return buildProcesses(procs()) }
				},
			})
		})
		t.Run("ssh/"+nix.Version, func(t *testing.T) {
			b := testbed.StartBuilder(t, nix)
			m := machines.Machine{Host: b.Addr, Port: b.Port, User: b.User, SSHKey: b.ClientKey, HostKey: b.HostKey}
			client, err := sshconn.Dial(context.Background(), sshconn.Resolve(m, nil))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { client.Close() })
			suite(t, opener{
				open: func(t *testing.T, sink io.Writer) (*transport.Session, func() []string) {
					s, err := transport.SSH(client.Client, transport.ServeCommand("", ""), transport.Options{Name: b.Name, Stderr: sink})
					if err != nil {
						t.Fatal(err)
					}
					t.Cleanup(func() { s.Close() })
					return s, func() []string { return buildProcesses(b.Processes()) }
				},
			})
		})
	}
}

func suite(t *testing.T, o opener) {
	t.Run("round trip", func(t *testing.T) {
		s, _ := o.open(t, nil)
		c := handshake(t, s)
		narBytes := oneFileNAR(t, fmt.Sprintf("conformance %x\n", randomBytes(8)))
		sum := sha256.Sum256(narBytes)
		path := serveproto.MakeSourcePath("conformance", sum)
		info := serveproto.PathInfo{Path: path, NarHash: "sha256:" + nixbase32.EncodeToString(sum[:]),
			NarSize: uint64(len(narBytes)), CA: "fixed:r:sha256:" + nixbase32.EncodeToString(sum[:])}
		if err := c.AddToStoreNar(info, bytes.NewReader(narBytes)); err != nil {
			t.Fatal(err)
		}
		var back bytes.Buffer
		st, err := c.DumpStorePath(path, &back)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(back.Bytes(), narBytes) || st.SHA256 != sum {
			t.Fatal("fetched NAR differs from the one sent")
		}
	})

	t.Run("errors are explained", func(t *testing.T) {
		s, _ := o.open(t, nil)
		c := handshake(t, s)
		missing := "/nix/store/" + nixbase32.EncodeToString(randomBytes(20)) + "-missing"
		_, err := c.DumpStorePath(missing, io.Discard)
		var re *transport.RemoteError
		if !errors.As(err, &re) {
			t.Fatalf("err = %v (%T), want *transport.RemoteError", err, err)
		}
		// 2.8 and 2.26 say "is not valid", 2.34 "is not a valid store path".
		if !regexp.MustCompile(`is not (a )?valid`).MatchString(err.Error()) || !strings.Contains(err.Error(), missing) {
			t.Errorf("error %q does not carry the remote's explanation", err)
		}
		if re.Exit != "exit status 1" {
			t.Errorf("exit %q, want exit status 1", re.Exit)
		}
	})

	t.Run("log reaches the sink", func(t *testing.T) {
		var log lockedBuffer
		s, _ := o.open(t, &log)
		c := handshake(t, s)
		// More than a pipe's worth of log: the session must keep draining.
		script := `i=0; while [ $i -lt 3000 ]; do echo "log line $i of a chatty build"; i=$((i+1)); done; echo done > $out`
		res, err := c.BuildDerivation(derivation("chatty", script))
		if err != nil {
			t.Fatal(err)
		}
		if !res.Status.Success() {
			t.Fatalf("build failed: %v %s", res.Status, res.ErrorMsg)
		}
		testbed.WaitFor(t, 20*time.Second, "last log line in the sink", func() bool { return strings.Contains(log.String(), "log line 2999 of a chatty build") })
		if !strings.Contains(log.String(), "log line 0 of a chatty build\n") {
			t.Errorf("first log line missing from the sink")
		}
	})

	t.Run("closing cancels a build", func(t *testing.T) {
		var log lockedBuffer
		s, leftovers := o.open(t, &log)
		c := handshake(t, s)
		done := make(chan error, 1)
		go func() {
			_, err := c.BuildDerivation(derivation("sleeper", `echo started; /bin/sleep 300; echo never > $out`))
			done <- err
		}()
		testbed.WaitFor(t, 20*time.Second, "build to start", func() bool { return strings.Contains(log.String(), "started") })
		// The check below would pass if it could not see the build at all.
		if len(leftovers()) == 0 {
			t.Fatal("the running build's processes cannot be found")
		}
		closed := time.Now()
		s.Close()
		if err := <-done; err == nil {
			t.Fatal("BuildDerivation returned no error after the session was closed")
		}
		select {
		case <-s.Done():
		default:
			t.Fatal("session process still running after Close returned")
		}
		// The remote's MonitorFdHup sees stdin hang up and stops the build.
		testbed.WaitFor(t, 20*time.Second, "remote build processes to end", func() bool { return len(leftovers()) == 0 })
		t.Logf("build stopped %v after Close", time.Since(closed).Round(time.Millisecond))
	})
}

func handshake(t *testing.T, s *transport.Session) *serveproto.Conn {
	t.Helper()
	c, err := serveproto.Handshake(s.Stdout(), s.Stdin(), serveproto.Options{Explain: s.Explain})
	if err != nil {
		t.Fatal(err)
	}
	if v := c.ServerVersion(); v.Major() != 2 || v.Minor() < 5 {
		t.Fatalf("server version %v", v)
	}
	return c
}

// derivation is a trivial input-addressed build of script; the output path
// is any well-formed path (serve servers do not recompute it).
func derivation(name, script string) (string, serveproto.BasicDerivation, serveproto.BuildOptions) {
	hash := nixbase32.EncodeToString(randomBytes(20))
	out := "/nix/store/" + hash + "-" + name
	drvPath := "/nix/store/" + nixbase32.EncodeToString(randomBytes(20)) + "-" + name + ".drv"
	return drvPath, serveproto.BasicDerivation{
		Outputs:  map[string]serveproto.DerivationOutput{"out": {Path: out}},
		Platform: "x86_64-linux",
		Builder:  "/bin/sh",
		Args:     []string{"-c", script},
		Env:      map[string]string{"out": out, "name": name, "system": "x86_64-linux", "builder": "/bin/sh"},
	}, serveproto.BuildOptions{MaxSilentTime: time.Hour}
}

func oneFileNAR(t *testing.T, content string) []byte {
	var buf bytes.Buffer
	w, err := gonar.NewWriter(&buf)
	if err != nil {
		t.Fatal(err)
	}
	w.WriteHeader(&gonar.Header{Path: "/", Type: gonar.TypeRegular, Size: int64(len(content))})
	io.WriteString(w, content)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// buildProcesses keeps the processes that belong to a build or a serve
// session (not sshd itself).
func buildProcesses(pids []int) []string {
	var out []string
	for _, pid := range pids {
		cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil {
			continue
		}
		c := strings.ReplaceAll(string(cmdline), "\x00", " ")
		if strings.Contains(c, "sleep") || strings.Contains(c, "nix-store") {
			out = append(out, c)
		}
	}
	return out
}

type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
