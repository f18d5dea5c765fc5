package daemonproto

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/sshconn"
	"github.com/nix-offload/nix-offload/internal/testbed"
	"github.com/nix-offload/nix-offload/internal/transport"
)

// The integration tests drive the real `nix-daemon --stdio` of every Nix
// on the test bed (2.8, 2.26, 2.34), each on a private empty store, over
// the same transport sessions the hook uses.

func nixSystem(t *testing.T) string {
	switch runtime.GOARCH {
	case "amd64":
		return "x86_64-linux"
	case "arm64":
		return "aarch64-linux"
	}
	t.Skipf("skipping: no Nix system type known for GOARCH %s", runtime.GOARCH)
	return ""
}

// wantVersion is the protocol each Nix of the bed speaks with us.
var wantVersion = map[string]Version{"2.8": 1<<8 | 34, "2.26": 1<<8 | 38, "2.34": 1<<8 | 38}

// daemon is one `nix-daemon --stdio` and the Conn on it.
type daemon struct {
	sess *transport.Session
	conn *Conn
	log  *logRecorder
	rec  *recorder // with -update
	// store is the real daemon's store directory; "" in a replay.
	store string
}

// startDaemon runs `nix-daemon --stdio args…` of nix on store and shakes
// hands.
func startDaemon(t *testing.T, nix testbed.Nix, store string, args ...string) *daemon {
	t.Helper()
	cmd := nix.Command(store, nil, append([]string{"nix-daemon", "--stdio"}, args...)...)
	sess, err := transport.LocalCmd(cmd, transport.Options{Name: "daemon " + nix.Version, Program: "nix-daemon --stdio"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		sess.Close()
		testbed.KillCommand(cmd)
		if t.Failed() {
			t.Logf("nix-daemon stderr:\n%s", sess.Stderr())
		}
	})
	d := &daemon{sess: sess, log: &logRecorder{}, store: store}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var r io.Reader = sess.Stdout()
	var w io.Writer = sess.Stdin()
	if *update {
		d.rec = &recorder{r: r, w: w}
		r, w = d.rec, d.rec
	}
	d.conn, err = Handshake(ctx, r, w, Options{
		Log:     d.log.log,
		Abort:   func() { sess.Close() },
		Explain: sess.Explain,
	})
	if err != nil {
		t.Fatalf("Handshake: %v", err)
	}
	return d
}

func opCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func TestIntegration(t *testing.T) {
	system := nixSystem(t)
	for _, nix := range testbed.All(t) {
		t.Run(nix.Version, func(t *testing.T) {
			t.Parallel()
			d := startDaemon(t, nix, testbed.NewStore(t))
			integration(t, d, nix.Version, system)
			if d.rec != nil && !t.Failed() {
				d.rec.save(t, "testdata/session-"+nix.Version+".bin")
			}
		})
	}
}

// integration is the script run against a real daemon and replayed
// against its recording.
func integration(t *testing.T, d *daemon, nixVersion, system string) {
	c := d.conn
	ctx := opCtx(t)
	series := testbed.Nix{Version: nixVersion}.Series()

	if want := wantVersion[series]; c.Version() != want {
		t.Errorf("protocol %s, want %s", c.Version(), want)
	}
	if !strings.Contains(c.NixVersion(), nixVersion) {
		t.Errorf("Nix version %q, want it to contain %q", c.NixVersion(), nixVersion)
	}
	wantTrust := Trusted
	if c.Version().Minor() < 35 {
		wantTrust = TrustUnknown
	}
	if c.Trust() != wantTrust {
		t.Errorf("trust %v, want %v", c.Trust(), wantTrust)
	}

	if err := c.SetOptions(ctx, Settings{MaxSilentTime: time.Minute, BuildTimeout: 2 * time.Minute, MaxLogSize: 1 << 20}); err != nil {
		t.Fatalf("SetOptions: %v", err)
	}

	infoA, narA := sourcePath(t, "daemonproto-a", "hello from a\n")
	infoB, narB := sourcePath(t, "daemonproto-b", "b refers to "+infoA.Path+"\n")
	infoB.References = []string{infoA.Path}
	infoB.CA = ""
	t.Run("AddMultipleToStore", func(t *testing.T) {
		items := []Item{{Info: infoA, NAR: bytes.NewReader(narA)}, {Info: infoB, NAR: bytes.NewReader(narB)}}
		if err := c.AddMultipleToStore(ctx, items, true); err != nil {
			t.Fatal(err)
		}
	})

	missing := fakePath("daemonproto-missing")
	t.Run("QueryValidPaths", func(t *testing.T) {
		got, err := c.QueryValidPaths(ctx, []string{missing, infoA.Path, infoB.Path}, false)
		if err != nil {
			t.Fatal(err)
		}
		want := []string{infoA.Path, infoB.Path}
		slices.Sort(want)
		if !slices.Equal(got, want) {
			t.Errorf("got %q, want %q", got, want)
		}
		// With the substitute flag: nothing to substitute from here.
		got, err = c.QueryValidPaths(ctx, []string{missing}, true)
		if err != nil || len(got) != 0 {
			t.Errorf("with substitute: %q, %v", got, err)
		}
	})

	t.Run("AddTempRoot", func(t *testing.T) {
		if err := c.AddTempRoots(ctx, []string{infoA.Path, missing}); err != nil {
			t.Fatal(err)
		}
		if d.store == "" {
			return // a replay: the bytes alone
		}
		// The daemon writes its temp roots to temproots/<its pid> (the
		// store directory is its /nix), each
		// path followed by a NUL, so that a GC elsewhere reads them.
		files, err := filepath.Glob(filepath.Join(d.store, "var/nix/temproots/*"))
		if err != nil {
			t.Fatal(err)
		}
		var found bool
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err == nil && bytes.Contains(b, []byte(infoA.Path+"\x00")) {
				found = true
			}
		}
		if !found {
			t.Errorf("%s is in none of the daemon's temp roots %q", infoA.Path, files)
		}
	})

	t.Run("QueryPathInfo", func(t *testing.T) {
		got, ok, err := c.QueryPathInfo(ctx, infoB.Path)
		if err != nil || !ok {
			t.Fatalf("%+v, %v, %v", got, ok, err)
		}
		if got.NarHash != infoB.NarHash || got.NarSize != infoB.NarSize || !slices.Equal(got.References, infoB.References) || got.RegistrationTime == 0 {
			t.Errorf("got %+v\nwant %+v", got, infoB)
		}
		if _, ok, err := c.QueryPathInfo(ctx, missing); ok || err != nil {
			t.Errorf("missing path: ok %v, %v", ok, err)
		}
	})

	t.Run("NarFromPath", func(t *testing.T) {
		var buf bytes.Buffer
		st, err := c.NarFromPath(ctx, infoB, &buf)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf.Bytes(), narB) || st.NixHash() != infoB.NarHash {
			t.Errorf("NAR differs: %d bytes, %s", st.Size, st.NixHash())
		}
	})

	t.Run("BuildDerivation", func(t *testing.T) {
		d.log.reset()
		drvPath, drv := shDerivation(system, "daemonproto-hi-"+series, "echo a log line; echo second line; echo hi > $out", infoA.Path)
		res, err := c.BuildDerivation(ctx, drvPath, drv, BuildNormal)
		if err != nil {
			t.Fatal(err)
		}
		out := drv.Outputs["out"].Path
		if res.Status != serveproto.Built || res.BuiltOutputs["out"] != out {
			t.Fatalf("got %+v", res)
		}
		t.Logf("result: %+v", res)
		if lines := d.log.lines(); !slices.Contains(lines, "a log line") || !slices.Contains(lines, "second line") {
			t.Errorf("build log lines %q, want \"a log line\" and \"second line\"", lines)
		}
		info, ok, err := c.QueryPathInfo(ctx, out)
		if err != nil || !ok || info.Deriver != drvPath {
			t.Fatalf("output info: %+v, %v, %v", info, ok, err)
		}
		var buf bytes.Buffer
		if _, err := c.NarFromPath(ctx, info, &buf); err != nil {
			t.Fatal(err)
		}
		if want := fileNAR(t, "hi\n"); !bytes.Equal(buf.Bytes(), want) {
			t.Errorf("output NAR differs")
		}
		// A lie about the size or the hash is caught while the NAR
		// streams, and breaks nothing but this Conn's stream.
		res, err = c.BuildDerivation(ctx, drvPath, drv, BuildNormal)
		if err != nil || res.Status != serveproto.AlreadyValid {
			t.Errorf("rebuild: %+v, %v", res, err)
		}
	})

	t.Run("BuildDerivation failure", func(t *testing.T) {
		drvPath, drv := shDerivation(system, "daemonproto-fail", "echo about to fail; exit 3")
		res, err := c.BuildDerivation(ctx, drvPath, drv, BuildNormal)
		if err != nil {
			t.Fatal(err)
		}
		if res.Status != serveproto.PermanentFailure || len(res.BuiltOutputs) != 0 {
			t.Errorf("got %+v", res)
		}
		if want := "failed with exit code 3"; !strings.Contains(res.ErrorMsg, want) || strings.Contains(res.ErrorMsg, "\x1b") {
			t.Errorf("ErrorMsg %q, want it to contain %q and no escapes", res.ErrorMsg, want)
		}
	})

	t.Run("BuildDerivation timeout", func(t *testing.T) {
		if err := c.SetOptions(ctx, Settings{MaxSilentTime: time.Second}); err != nil {
			t.Fatal(err)
		}
		drvPath, drv := shDerivation(system, "daemonproto-silent", "exec /bin/sleep 30")
		start := time.Now()
		res, err := c.BuildDerivation(ctx, drvPath, drv, BuildNormal)
		if err != nil {
			t.Fatal(err)
		}
		if res.Status != serveproto.TimedOut {
			t.Errorf("got %+v, want TimedOut", res)
		}
		if d := time.Since(start); d > 20*time.Second {
			t.Errorf("the silent build took %v to time out", d)
		}
		t.Logf("timed out after %v: %q", time.Since(start), res.ErrorMsg)
	})

	t.Run("BuildDerivation log limit", func(t *testing.T) {
		if err := c.SetOptions(ctx, Settings{MaxLogSize: 64}); err != nil {
			t.Fatal(err)
		}
		drvPath, drv := shDerivation(system, "daemonproto-chatty", "i=0; while [ $i -lt 100 ]; do echo line $i; i=$((i+1)); done; echo x > $out")
		res, err := c.BuildDerivation(ctx, drvPath, drv, BuildNormal)
		if err != nil {
			t.Fatal(err)
		}
		if res.Status != serveproto.LogLimitExceeded {
			t.Errorf("got %+v, want LogLimitExceeded", res)
		}
		t.Logf("log limit: %q", res.ErrorMsg)
		if err := c.SetOptions(ctx, Settings{}); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("BuildPathsWithResults missing", func(t *testing.T) {
		p := fakePath("daemonproto-nothere.drv") + "!out"
		res, err := c.BuildPathsWithResults(ctx, []string{p}, BuildNormal)
		if err != nil {
			t.Fatal(err)
		}
		// 2.8: MiscFailure "cannot build missing derivation"; 2.26:
		// DependencyFailed "failed to obtain derivation".
		if r, ok := res[p]; !ok || len(res) != 1 || r.Status.Success() || !strings.Contains(r.ErrorMsg, "derivation") {
			t.Errorf("got %+v", res)
		}
	})

	t.Run("RemoteError", func(t *testing.T) {
		// A path whose reference the daemon does not have: it says so
		// in band.
		info, narBytes := sourcePath(t, "daemonproto-dangling", "z\n")
		info.CA = ""
		info.References = []string{missing}
		err := c.AddMultipleToStore(ctx, []Item{{Info: info, NAR: bytes.NewReader(narBytes)}}, true)
		var re *RemoteError
		if !errors.As(err, &re) {
			t.Fatalf("got %v (%T), want a RemoteError", err, err)
		}
		t.Logf("RemoteError: %v", err)
		if _, err := c.QueryValidPaths(ctx, []string{infoA.Path}, false); err != nil {
			t.Errorf("after a RemoteError the Conn is broken: %v", err)
		}
	})

	// Last: a NAR of another hash leaves the stream out of step.
	t.Run("NarFromPath narHash lie", func(t *testing.T) {
		lie := infoA
		lie.NarHash = infoB.NarHash
		_, err := c.NarFromPath(ctx, lie, io.Discard)
		var pe *ProtocolError
		if !errors.As(err, &pe) || !strings.Contains(err.Error(), "hash mismatch") {
			t.Fatalf("got %v, want a ProtocolError for the hash mismatch", err)
		}
	})
}

// A daemon that does not trust the user (--force-untrusted, Nix 2.15+)
// says so in the handshake, and BuildDerivation of an input-addressed
// derivation is declined before anything is sent.
func TestIntegrationUntrusted(t *testing.T) {
	system := nixSystem(t)
	for _, nix := range testbed.All(t) {
		if nix.Series() == "2.8" {
			continue // no trust flag before protocol 1.35
		}
		t.Run(nix.Version, func(t *testing.T) {
			t.Parallel()
			d := startDaemon(t, nix, testbed.NewStore(t), "--extra-experimental-features", "daemon-trust-override", "--force-untrusted")
			c := d.conn
			ctx := opCtx(t)
			if c.Trust() != NotTrusted {
				t.Fatalf("trust %v, want not trusted", c.Trust())
			}
			drvPath, drv := shDerivation(system, "daemonproto-untrusted", "echo hi > $out")
			_, err := c.BuildDerivation(ctx, drvPath, drv, BuildNormal)
			var ue *UntrustedError
			if !errors.As(err, &ue) || !errors.Is(err, ErrNotTrusted) || !strings.Contains(err.Error(), "trusted-users") {
				t.Fatalf("got %v, want an UntrustedError naming trusted-users", err)
			}
			// Unsigned input-addressed paths are refused by the daemon
			// itself, in band.
			info, narBytes := sourcePath(t, "daemonproto-unsigned", "x\n")
			info.CA = ""
			err = c.AddMultipleToStore(ctx, []Item{{Info: info, NAR: bytes.NewReader(narBytes)}}, true)
			var re *RemoteError
			if !errors.As(err, &re) || !strings.Contains(re.Msg, "signature") {
				t.Fatalf("unsigned upload: got %v, want the daemon's signature error", err)
			}
			t.Logf("unsigned upload: %v", err)
			// A content-addressed path needs no signature.
			ca, caNAR := sourcePath(t, "daemonproto-ca", "y\n")
			if err := c.AddMultipleToStore(ctx, []Item{{Info: ca, NAR: bytes.NewReader(caNAR)}}, true); err != nil {
				t.Fatalf("content-addressed upload: %v", err)
			}
		})
	}
}

// The same script over SSH, against builders whose key is restricted to
// `nix-daemon --stdio` (authorized_keys command=…), as hardened ssh-ng
// builders are.
func TestIntegrationSSH(t *testing.T) {
	system := nixSystem(t)
	for _, nix := range testbed.All(t) {
		t.Run(nix.Version, func(t *testing.T) {
			t.Parallel()
			b := testbed.StartBuilder(t, nix, testbed.WithDaemonOnly())
			m := machines.Machine{Host: b.Addr, Port: b.Port, User: b.User, SSHKey: b.ClientKey, HostKey: b.HostKey, Protocol: machines.ProtocolSSHNG}
			client, err := sshconn.Dial(context.Background(), sshconn.Resolve(m, nil))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { client.Close() })
			open := func(command string) *transport.Session {
				s, err := transport.SSH(client.Client, command, transport.Options{Name: b.Name, Program: "nix-daemon --stdio"})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { s.Close() })
				return s
			}

			sess := open(transport.DaemonCommand("", ""))
			d := &daemon{sess: sess, log: &logRecorder{}}
			d.conn, err = HandshakeWithin(context.Background(), 30*time.Second, sess.Stdout(), sess.Stdin(), Options{
				Log: d.log.log, Abort: func() { sess.Close() }, Explain: sess.Explain})
			if err != nil {
				t.Fatalf("Handshake: %v", err)
			}
			integration(t, d, nix.Version, system)

			// The serve protocol on such a builder fails at once, and says
			// why, instead of hanging.
			t.Run("serve protocol refused", func(t *testing.T) {
				s := open(transport.ServeCommand("", ""))
				start := time.Now()
				_, err := serveproto.HandshakeWithin(context.Background(), 20*time.Second, s.Stdout(), s.Stdin(),
					serveproto.Options{Explain: s.Explain}, func() { s.Close() })
				if err == nil {
					t.Fatal("the serve handshake succeeded on a daemon-only builder")
				}
				var ng *serveproto.NoGreetingError
				if errors.As(err, &ng) {
					t.Fatalf("the serve handshake waited for its timeout: %v", err)
				}
				t.Logf("after %v: %v", time.Since(start).Round(time.Millisecond), err)
			})
		})
	}
}

// What Nix's build-remote does for an untrusted user and an
// input-addressed derivation: copy the .drv (content-addressed, so it
// needs no signature) and build it with BuildPathsWithResults. The .drv
// comes from a local store of the same Nix, read with this client too.
func TestIntegrationUntrustedBuildPaths(t *testing.T) {
	system := nixSystem(t)
	for _, nix := range testbed.All(t) {
		if nix.Series() == "2.8" {
			continue // no --force-untrusted
		}
		t.Run(nix.Version, func(t *testing.T) {
			t.Parallel()
			ctx := opCtx(t)
			local := testbed.NewStore(t)
			expr := `derivation { name = "daemonproto-untrusted-ia"; system = "` + system + `"; builder = "/bin/sh"; ` +
				`args = [ "-c" "echo building as an untrusted user; echo ok > $out" ]; }`
			out, err := nix.Command(local, nil, "nix-instantiate", "-E", expr).Output()
			if err != nil {
				t.Fatalf("nix-instantiate: %v", err)
			}
			drvPath := strings.TrimSpace(string(out))
			ld := startDaemon(t, nix, local)
			info, ok, err := ld.conn.QueryPathInfo(ctx, drvPath)
			if err != nil || !ok || !strings.HasPrefix(info.CA, "text:") {
				t.Fatalf("local %s: %+v, %v, %v", drvPath, info, ok, err)
			}
			var narBuf bytes.Buffer
			if _, err := ld.conn.NarFromPath(ctx, info, &narBuf); err != nil {
				t.Fatal(err)
			}

			rd := startDaemon(t, nix, testbed.NewStore(t), "--extra-experimental-features", "daemon-trust-override", "--force-untrusted")
			if err := rd.conn.AddMultipleToStore(ctx, []Item{{Info: info, NAR: &narBuf}}, true); err != nil {
				t.Fatalf("uploading the .drv: %v", err)
			}
			p := drvPath + "!out"
			res, err := rd.conn.BuildPathsWithResults(ctx, []string{p}, BuildNormal)
			if err != nil {
				t.Fatal(err)
			}
			r, ok := res[p]
			if !ok || r.Status != serveproto.Built {
				t.Fatalf("results %+v", res)
			}
			if lines := rd.log.lines(); !slices.Contains(lines, "building as an untrusted user") {
				t.Errorf("build log lines %q", lines)
			}
			outPath := r.BuiltOutputs["out"]
			oi, ok, err := rd.conn.QueryPathInfo(ctx, outPath)
			if err != nil || !ok {
				t.Fatalf("output %q: %v, %v (results %+v)", outPath, ok, err, r)
			}
			var got bytes.Buffer
			if _, err := rd.conn.NarFromPath(ctx, oi, &got); err != nil {
				t.Fatal(err)
			}
			if want := fileNAR(t, "ok\n"); !bytes.Equal(got.Bytes(), want) {
				t.Errorf("output NAR differs")
			}
		})
	}
}
