package serveproto

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	gonar "github.com/nix-community/go-nix/pkg/nar"
	"github.com/nix-community/go-nix/pkg/nixbase32"
)

// The integration test drives the real `nix-store --serve --write` of this
// machine (Debian's nix-bin 2.8) on a private, empty store: each server runs
// in its own mount namespace with a temporary directory bound over /nix, so
// the host's store is never touched.

const nixStore = "/usr/bin/nix-store"

func requireNix(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("skipping the integration test in -short mode")
	}
	if os.Geteuid() != 0 {
		t.Skip("skipping: the integration test must run as root (it bind-mounts a private /nix in a mount namespace)")
	}
	if _, err := os.Stat(nixStore); err != nil {
		t.Skipf("skipping: %s not found (install Debian's nix-bin): %v", nixStore, err)
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Skipf("skipping: unshare (util-linux) not found: %v", err)
	}
	if _, err := os.Stat("/nix"); err != nil {
		t.Skipf("skipping: /nix must exist as a mount point: %v", err)
	}
}

// nixSystem is the Nix system type of this machine.
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

// lockedBuffer collects the server's stderr.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer // guarded by mu
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

// nixServe is one `nix-store --serve --write` process.
type nixServe struct {
	cmd    *exec.Cmd
	stdin  *os.File // our end of its stdin
	stderr lockedBuffer
	done   chan struct{} // closed when the process has exited
	err    error         // its exit status, once done is closed
	conn   *Conn
}

// startServe starts a server on the store in dir (bound over /nix) and
// shakes hands with it. Options.Explain waits for the process to exit and
// appends its exit status and stderr, as the real transport does.
func startServe(t *testing.T, dir string) *nixServe {
	t.Helper()
	s := &nixServe{done: make(chan struct{})}
	// "$0" is dir: no quoting needed.
	s.cmd = exec.Command("unshare", "-m", "--propagation", "private", "sh", "-c",
		`mount --bind "$0" /nix && exec `+nixStore+` --serve --write`, dir)
	s.cmd.Stderr = &s.stderr
	s.cmd.WaitDelay = 5 * time.Second
	inR, inW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	s.cmd.Stdin, s.cmd.Stdout = inR, outW
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	inR.Close()
	outW.Close()
	s.stdin = inW
	go func() {
		s.err = s.cmd.Wait()
		close(s.done)
	}()
	// A watchdog, so a hang fails the test instead of stalling it.
	watchdog := time.AfterFunc(3*time.Minute, func() { s.cmd.Process.Kill() })
	t.Cleanup(func() {
		watchdog.Stop()
		inW.Close() // EOF on stdin: the server exits
		select {
		case <-s.done:
		case <-time.After(10 * time.Second):
			s.cmd.Process.Kill()
			<-s.done
		}
		outR.Close()
		if t.Failed() {
			t.Logf("nix-store stderr:\n%s", s.stderr.String())
		}
	})
	s.conn, err = Handshake(outR, inW, Options{Explain: s.explain})
	if err != nil {
		t.Fatalf("Handshake: %v", err)
	}
	return s
}

func (s *nixServe) explain(err error) error {
	select {
	case <-s.done:
	case <-time.After(5 * time.Second):
		return fmt.Errorf("%w\nnix-store is still running; stderr so far:\n%s", err, s.stderr.String())
	}
	return fmt.Errorf("%w\nnix-store: %v; stderr:\n%s", err, s.err, strings.TrimSpace(s.stderr.String()))
}

// storeDir returns an empty directory to bind over /nix. It must be
// traversable by the build users.
func storeDir(t *testing.T) string {
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// fakePath returns a well-formed store path whose hash part is derived
// from name.
func fakePath(name string) string {
	h := sha256.Sum256([]byte("serveproto-test:" + name))
	return StoreDir + "/" + nixbase32.EncodeToString(h[:20]) + "-" + name
}

// sourcePath makes a content-addressed path holding a directory with one
// file, and its PathInfo for AddToStoreNar.
func sourcePath(t *testing.T, name, contents string) (PathInfo, []byte) {
	narBytes := makeNAR(t, []gonar.Header{
		{Path: "/", Type: gonar.TypeDirectory},
		{Path: "/file", Type: gonar.TypeRegular, Size: int64(len(contents))},
	}, map[string]string{"/file": contents})
	sum := sha256.Sum256(narBytes)
	return PathInfo{
		Path:    MakeSourcePath(name, sum),
		NarHash: "sha256:" + nixbase32.EncodeToString(sum[:]),
		NarSize: uint64(len(narBytes)),
		CA:      "fixed:r:sha256:" + nixbase32.EncodeToString(sum[:]),
	}, narBytes
}

func shDerivation(system, name, script string, inputs ...string) (string, BasicDerivation) {
	drvPath := fakePath(name + ".drv")
	out := fakePath(name)
	return drvPath, BasicDerivation{
		Outputs:   map[string]DerivationOutput{"out": {Path: out}},
		InputSrcs: inputs,
		Platform:  system,
		Builder:   "/bin/sh",
		Args:      []string{"-c", script},
		Env:       map[string]string{"out": out, "name": name, "system": system, "builder": "/bin/sh"},
	}
}

func TestIntegration(t *testing.T) {
	requireNix(t)
	system := nixSystem(t)
	dir := storeDir(t)
	s := startServe(t, dir)
	c := s.conn

	if got := c.ServerVersion(); got != 0x207 {
		t.Fatalf("server version %s, want 2.7", got)
	}

	infoA, narA := sourcePath(t, "serveproto-a", "hello from a\n")
	t.Run("AddToStoreNar", func(t *testing.T) {
		if err := c.AddToStoreNar(infoA, bytes.NewReader(narA)); err != nil {
			t.Fatal(err)
		}
		// Again: an already valid path is accepted.
		if err := c.AddToStoreNar(infoA, bytes.NewReader(narA)); err != nil {
			t.Fatal(err)
		}
	})

	missing := fakePath("serveproto-missing")
	t.Run("QueryValidPaths", func(t *testing.T) {
		got, err := c.QueryValidPaths([]string{missing, infoA.Path}, true, false)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, []string{infoA.Path}) {
			t.Errorf("got %q, want [%s]", got, infoA.Path)
		}
	})

	t.Run("QueryPathInfos", func(t *testing.T) {
		got, err := c.QueryPathInfos([]string{infoA.Path, missing})
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 1 {
			t.Fatalf("got %d infos: %+v", len(got), got)
		}
		g := got[0]
		if g.Path != infoA.Path || g.NarHash != infoA.NarHash || g.NarSize != infoA.NarSize || g.CA != infoA.CA || len(g.References) != 0 {
			t.Errorf("got %+v\nwant %+v", g, infoA)
		}
	})

	t.Run("DumpStorePath", func(t *testing.T) {
		var buf bytes.Buffer
		st, err := c.DumpStorePath(infoA.Path, &buf)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf.Bytes(), narA) || st.NixHash() != infoA.NarHash || uint64(st.Size) != infoA.NarSize {
			t.Errorf("NAR differs: %d bytes, %s", st.Size, st.NixHash())
		}
	})

	// B refers to A; ImportPaths does not check either the path or the
	// references against the contents.
	infoB, narB := sourcePath(t, "serveproto-b", "b refers to "+infoA.Path+"\n")
	infoB.References = []string{infoA.Path}
	infoB.CA = ""
	t.Run("ImportPaths", func(t *testing.T) {
		if err := c.ImportPaths([]ExportItem{{Info: infoB, NAR: bytes.NewReader(narB)}}); err != nil {
			t.Fatal(err)
		}
		got, err := c.QueryPathInfos([]string{infoB.Path})
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 1 || got[0].NarHash != infoB.NarHash || !slices.Equal(got[0].References, []string{infoA.Path}) {
			t.Errorf("got %+v", got)
		}
	})

	t.Run("QueryClosure", func(t *testing.T) {
		got, err := c.QueryClosure([]string{infoB.Path}, false)
		if err != nil {
			t.Fatal(err)
		}
		want := []string{infoA.Path, infoB.Path}
		slices.Sort(want)
		if !slices.Equal(got, want) {
			t.Errorf("got %q, want %q", got, want)
		}
	})

	t.Run("BuildDerivation", func(t *testing.T) {
		drvPath, drv := shDerivation(system, "serveproto-hi", "echo hi > $out", infoA.Path)
		res, err := c.BuildDerivation(drvPath, drv, BuildOptions{MaxSilentTime: time.Minute, BuildTimeout: 2 * time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		out := drv.Outputs["out"].Path
		if res.Status != Built || res.BuiltOutputs["out"] != out || res.TimesBuilt != 1 || res.StartTime.IsZero() {
			t.Fatalf("got %+v", res)
		}
		var buf bytes.Buffer
		if _, err := c.DumpStorePath(out, &buf); err != nil {
			t.Fatal(err)
		}
		if want := fileNAR(t, "hi\n"); !bytes.Equal(buf.Bytes(), want) {
			t.Errorf("output NAR differs:\n%q\nwant\n%q", buf.Bytes(), want)
		}
		infos, err := c.QueryPathInfos([]string{out})
		if err != nil || len(infos) != 1 || infos[0].Deriver != drvPath {
			t.Errorf("path info of the output: %+v, %v", infos, err)
		}
		// Built again: AlreadyValid, with the outputs.
		res, err = c.BuildDerivation(drvPath, drv, BuildOptions{})
		if err != nil || res.Status != AlreadyValid || res.BuiltOutputs["out"] != out {
			t.Errorf("rebuild: %+v, %v", res, err)
		}
	})

	t.Run("BuildDerivation failure", func(t *testing.T) {
		drvPath, drv := shDerivation(system, "serveproto-fail", "exit 3")
		res, err := c.BuildDerivation(drvPath, drv, BuildOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if res.Status != PermanentFailure || res.Status.Success() || len(res.BuiltOutputs) != 0 {
			t.Errorf("got %+v", res)
		}
		want := "builder for '" + drvPath + "' failed with exit code 3"
		if !strings.Contains(res.ErrorMsg, want) || strings.Contains(res.ErrorMsg, "\x1b") {
			t.Errorf("ErrorMsg %q, want it to contain %q and no escapes", res.ErrorMsg, want)
		}
		t.Logf("failure message: %q", res.ErrorMsg)
	})

	t.Run("BuildPaths missing", func(t *testing.T) {
		err := c.BuildPaths([]string{fakePath("serveproto-nothere.drv") + "!out"}, BuildOptions{})
		if err == nil {
			t.Fatal("no error")
		}
		t.Logf("BuildPaths error: %v", err)
		var be *BuildPathsError
		if errors.As(err, &be) {
			// In band: the Conn is still usable.
			if _, err := c.QueryValidPaths([]string{infoA.Path}, false, false); err != nil {
				t.Errorf("after BuildPathsError: %v", err)
			}
		}
	})

	// Last: this makes the server exit.
	t.Run("DumpStorePath invalid", func(t *testing.T) {
		if c.Err() != nil {
			t.Skipf("Conn already broken: %v", c.Err())
		}
		_, err := c.DumpStorePath(missing, io.Discard)
		var se *StreamError
		if !errors.As(err, &se) || !strings.Contains(err.Error(), "is not valid") {
			t.Fatalf("got %v, want a StreamError explained by the server's 'is not valid'", err)
		}
		t.Logf("DumpStorePath error: %v", err)
		if _, err2 := c.QueryValidPaths([]string{infoA.Path}, false, false); err2 != err {
			t.Errorf("broken Conn returned %v", err2)
		}
	})
}

// Closing the server's stdin during a build cancels it: the server exits
// at once, without a reply (§3.8.5).
func TestIntegrationCancel(t *testing.T) {
	requireNix(t)
	system := nixSystem(t)
	s := startServe(t, storeDir(t))

	drvPath, drv := shDerivation(system, "serveproto-sleep", "echo started >&2; exec /bin/sleep 20")
	type result struct {
		res *BuildResult
		err error
	}
	done := make(chan result, 1)
	go func() {
		res, err := s.conn.BuildDerivation(drvPath, drv, BuildOptions{})
		done <- result{res, err}
	}()

	// The builder's output reaches the server's stderr once it runs.
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(30 * time.Second)
	for !strings.Contains(s.stderr.String(), "started") {
		select {
		case <-tick.C:
		case r := <-done:
			t.Fatalf("build ended before it was cancelled: %+v, %v", r.res, r.err)
		case <-deadline:
			t.Fatalf("the build did not start; stderr:\n%s", s.stderr.String())
		}
	}

	closed := time.Now()
	s.stdin.Close()
	select {
	case <-s.done:
	case <-time.After(5 * time.Second):
		t.Fatal("the server did not exit within 5 s of stdin being closed")
	}
	if d := time.Since(closed); d > time.Second {
		t.Errorf("the server took %v to exit", d)
	}
	r := <-done
	var se *StreamError
	if r.res != nil || !errors.As(r.err, &se) {
		t.Fatalf("got %+v, %v; want a StreamError", r.res, r.err)
	}
	t.Logf("cancelled build: %v", r.err)
	if !strings.Contains(r.err.Error(), "interrupted") {
		t.Errorf("error does not carry the server's 'interrupted by the user': %v", r.err)
	}
}
