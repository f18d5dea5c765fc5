package offload_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/daemonproto"
	"github.com/nix-offload/nix-offload/internal/localstore"
	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/offload"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/sshconn"
	"github.com/nix-offload/nix-offload/internal/testbed"
	"github.com/nix-offload/nix-offload/internal/transport"
)

// RunDaemon end to end on the bed: a derivation instantiated in a real
// local store, built over SSH on a builder whose key is restricted to
// `nix-daemon --stdio`, its output made valid in the local store. Every
// Nix of the bed on both sides (the same version), trusted, and for 2.26
// and 2.34 untrusted too (the .drv-closure path).
func TestRunDaemonOnTheBed(t *testing.T) {
	for _, nix := range testbed.All(t) {
		for _, untrusted := range []bool{false, true} {
			if untrusted && nix.Series() == "2.8" {
				continue // no --force-untrusted before 2.15
			}
			name := nix.Version
			if untrusted {
				name += "/untrusted"
			}
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				runDaemonOnTheBed(t, nix, untrusted)
			})
		}
	}
}

// lines collects the build log lines of a Conn.
type lines struct {
	mu sync.Mutex
	l  []string // guarded by mu
}

func (l *lines) log(m daemonproto.Message) {
	if s, ok := m.LogLine(); ok {
		l.mu.Lock()
		l.l = append(l.l, s)
		l.mu.Unlock()
	}
}

func (l *lines) get() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.l)
}

func runDaemonOnTheBed(t *testing.T, nix testbed.Nix, untrusted bool) {
	dir := testbed.NewStore(t)
	var instantiateWith func(inputName, script string) (string, *offload.Job)
	salt := strings.ReplaceAll(t.Name(), "/", "-")
	instantiate := func(script string) (string, *offload.Job) { return instantiateWith("rundaemon-input", script) }
	instantiateWith = func(inputName, script string) (string, *offload.Job) {
		expr := `let input = builtins.toFile "` + inputName + `" "hello from the input"; in derivation { name = "rundaemon"; ` +
			`system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" ''` + script + `'' ]; salt = "` + salt + `"; }`
		drvPath, stderr, err := bedRun(nix, dir, nil, "nix-instantiate", "-E", expr)
		if err != nil {
			t.Fatalf("nix-instantiate: %v: %s", err, stderr)
		}
		f, err := os.Open(filepath.Join(dir, "store", filepath.Base(drvPath)))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		drv, err := offload.ReadDerivation(f)
		if err != nil {
			t.Fatal(err)
		}
		return drvPath, &offload.Job{DrvPath: drvPath, Drv: drv, Inputs: drv.InputSources,
			Options: serveproto.BuildOptions{MaxSilentTime: time.Minute, BuildTimeout: 2 * time.Minute}}
	}
	store, err := localstore.Open(localstore.Options{
		RealStoreDir: filepath.Join(dir, "store"),
		Command:      func(argv ...string) *exec.Cmd { return nix.Command(dir, nil, argv...) },
	})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()

	opt := testbed.WithDaemonOnly()
	if untrusted {
		opt = testbed.WithForcedCommand("nix-daemon --stdio --extra-experimental-features daemon-trust-override --force-untrusted")
	}
	b := testbed.StartBuilder(t, nix, opt)
	m := machines.Machine{Host: b.Addr, Port: b.Port, User: b.User, SSHKey: b.ClientKey, HostKey: b.HostKey, Protocol: machines.ProtocolSSHNG}
	client, err := sshconn.Dial(context.Background(), sshconn.Resolve(m, nil))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	var connectClosable func() (*daemonproto.Conn, *lines, func())
	connect := func() (*daemonproto.Conn, *lines) {
		c, l, _ := connectClosable()
		return c, l
	}
	connectClosable = func() (*daemonproto.Conn, *lines, func()) {
		sess, err := transport.SSH(client.Client, transport.DaemonCommand("", ""), transport.Options{Name: b.Name, Program: "nix-daemon --stdio"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { sess.Close() })
		l := &lines{}
		c, err := daemonproto.HandshakeWithin(context.Background(), 30*time.Second, sess.Stdout(), sess.Stdin(),
			daemonproto.Options{Log: l.log, Abort: func() { sess.Close() }, Explain: sess.Explain})
		if err != nil {
			t.Fatal(err)
		}
		if want := map[bool]daemonproto.Trust{false: daemonproto.Trusted, true: daemonproto.NotTrusted}[untrusted]; c.Version().Minor() >= 35 && c.Trust() != want {
			t.Fatalf("trust %v, want %v", c.Trust(), want)
		}
		return c, l, func() { sess.Close() }
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	t.Run("built", func(t *testing.T) {
		_, job := instantiate(`read x < ${input}; echo "building: $x"; echo "$x" > $out`)
		job.Machine = b.Name
		c, l := connect()
		var copied, fetched int
		ev := offload.Events{Copying: func(n int, _ uint64) { copied = n }, Fetching: func(n int, _ uint64) { fetched = n }}
		if err := offload.RunDaemon(ctx, c, store, *job, ev); err != nil {
			t.Fatal(err)
		}
		want := 1 // the input
		if untrusted {
			want = 2 // and the .drv
		}
		if copied != want {
			t.Errorf("copied %d paths, want %d", copied, want)
		}
		if fetched != 1 {
			t.Errorf("fetched %d outputs", fetched)
		}
		if got := l.get(); !slices.Contains(got, "building: hello from the input") {
			t.Errorf("log lines %q", got)
		}
		out := job.Drv.Outputs["out"].Path
		if _, stderr, err := bedRun(nix, dir, nil, "nix-store", "--verify-path", out); err != nil {
			t.Errorf("nix-store --verify-path %s: %v: %s", out, err, stderr)
		}
		got, err := os.ReadFile(filepath.Join(dir, "store", filepath.Base(out)))
		if err != nil || string(got) != "hello from the input\n" {
			t.Errorf("output %q, %v", got, err)
		}
	})

	t.Run("failed", func(t *testing.T) {
		drvPath, job := instantiate(`echo "about to fail"; exit 3`)
		job.Machine = b.Name
		c, _ := connect()
		err := offload.RunDaemon(ctx, c, store, *job, offload.Events{})
		var be *offload.BuildError
		if !errors.As(err, &be) || be.Status != serveproto.PermanentFailure ||
			!strings.Contains(err.Error(), "build of '"+drvPath+"' on '"+b.Name+"' failed") {
			t.Fatalf("got %v", err)
		}
		t.Logf("%v", err)
	})

	// An input the machine already has is a temp root of the build's
	// connection: a GC on the machine between the upload and the build
	// leaves it, and once the connection is gone a GC takes it.
	t.Run("input kept against a GC", func(t *testing.T) {
		builderStore := filepath.Join(b.Dir, "nix")
		gc := func() {
			t.Helper()
			if _, stderr, err := bedRun(nix, builderStore, nil, "nix-store", "--gc"); err != nil {
				t.Fatalf("nix-store --gc on the builder: %v: %s", err, stderr)
			}
		}
		// One build uploads the input; its connection ends.
		_, first := instantiateWith("rundaemon-gc-input", `read x < ${input}; echo "$x" > $out`)
		first.Machine = b.Name
		c, _, closeConn := connectClosable()
		if err := offload.RunDaemon(ctx, c, store, *first, offload.Events{}); err != nil {
			t.Fatal(err)
		}
		closeConn()
		input := first.Inputs[0]
		onBuilder := filepath.Join(builderStore, "store", filepath.Base(input))
		if _, err := os.Stat(onBuilder); err != nil {
			t.Fatalf("the input is not on the builder after the first build: %v", err)
		}
		// The next finds it there, and a GC runs before it builds.
		_, job := instantiateWith("rundaemon-gc-input", `read x < ${input}; echo "again: $x" > $out`)
		job.Machine = b.Name
		c, _, closeConn = connectClosable()
		var copied int
		ev := offload.Events{Copying: func(n int, _ uint64) { copied = n }, Building: func() {
			gc()
			if _, err := os.Stat(onBuilder); err != nil {
				t.Errorf("a GC on the builder took the input before the build: %v", err)
			}
		}}
		if err := offload.RunDaemon(ctx, c, store, *job, ev); err != nil {
			t.Fatal(err)
		}
		want := 0
		if untrusted {
			want = 1 // the new .drv
		}
		if copied != want {
			t.Errorf("copied %d paths, want %d: the input was on the builder", copied, want)
		}
		closeConn()
		gc()
		if _, err := os.Stat(onBuilder); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("a GC after the connection ended kept the input (%v): the test shows nothing", err)
		}
	})
}
