package serveproto

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	gonar "github.com/nix-community/go-nix/pkg/nar"
	"github.com/nix-community/go-nix/pkg/nixbase32"

	"github.com/nix-offload/nix-offload/internal/testbed"
)

// The integration tests drive the real `nix-store --serve --write` of every Nix of the
// test bed (2.8 on the host, 2.26 and 2.34 in their Debian roots) on a private, empty
// store: testbed.Nix.Command runs each server in its own mount namespace with a new
// directory over /nix and the test bed's nix.conf, so neither the machine's store nor its
// Nix configuration matters.

// forEachNix runs f as a subtest for every Nix of the test bed.
func forEachNix(t *testing.T, f func(t *testing.T, nix testbed.Nix)) {
	for _, nix := range testbed.All(t) {
		t.Run(nix.Series(), func(t *testing.T) {
			t.Parallel()
			f(t, nix)
		})
	}
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

// startServe starts a server of nix on a new store and shakes hands with it.
// Options.Explain waits for the process to exit and appends its exit status and stderr,
// as the real transport does.
func startServe(t *testing.T, nix testbed.Nix) *nixServe {
	t.Helper()
	s := &nixServe{done: make(chan struct{})}
	s.cmd = nix.Command(testbed.NewStore(t), nil, "nix-store", "--serve", "--write")
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
	watchdog := time.AfterFunc(3*time.Minute, func() { testbed.KillCommand(s.cmd) })
	t.Cleanup(func() {
		watchdog.Stop()
		inW.Close() // EOF on stdin: the server exits
		select {
		case <-s.done:
		case <-time.After(10 * time.Second):
			testbed.KillCommand(s.cmd)
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
	system := testbed.System(t)
	forEachNix(t, func(t *testing.T, nix testbed.Nix) { testIntegration(t, nix, system) })
}

func testIntegration(t *testing.T, nix testbed.Nix, system string) {
	s := startServe(t, nix)
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

	// C refers to D, and both go in one flight, D first: the server adds
	// them in order, so C's reference is valid when C arrives.
	infoD, narD := sourcePath(t, "serveproto-d", "d\n")
	infoC, narC := sourcePath(t, "serveproto-c", "c refers to "+infoD.Path+"\n")
	infoC.References = []string{infoD.Path}
	infoC.CA = ""
	t.Run("AddToStoreNar pipelined", func(t *testing.T) {
		rd, err := c.SendAddToStoreNar(infoD, bytes.NewReader(narD))
		if err != nil {
			t.Fatal(err)
		}
		rc, err := c.SendAddToStoreNar(infoC, bytes.NewReader(narC))
		if err != nil {
			t.Fatal(err)
		}
		rv, err := c.SendQueryValidPaths([]string{infoC.Path, infoD.Path}, false, false)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := rd.Read(); err != nil {
			t.Fatalf("D: %v", err)
		}
		if _, err := rc.Read(); err != nil {
			t.Fatalf("C: %v", err)
		}
		want := []string{infoC.Path, infoD.Path}
		slices.Sort(want)
		if got, err := rv.Read(); err != nil || !slices.Equal(got, want) {
			t.Errorf("valid after the flight: %q, %v; want %q", got, err, want)
		}
		// A reader with bytes after the NAR: said at Read, and the Conn is in step.
		r, err := c.SendAddToStoreNar(infoD, io.MultiReader(bytes.NewReader(narD), strings.NewReader("extra")))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := r.Read(); err == nil || !strings.Contains(err.Error(), "more bytes after the NAR") {
			t.Errorf("trailing bytes: %v", err)
		}
		if _, err := c.QueryValidPaths([]string{infoD.Path}, false, false); err != nil {
			t.Errorf("the Conn after trailing bytes: %v", err)
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
		if res.Status != Built || res.BuiltOutputs["out"] != out {
			t.Fatalf("got %+v", res)
		}
		// Nix 2.34's serve server sends timesBuilt, startTime and stopTime as 0 after a
		// build (its serve-protocol.cc writes the BuildResult's fields as they are; its
		// nix-store --serve leaves them unset). Older servers report the build.
		if nix.Series() == "2.34" {
			if res.TimesBuilt != 0 || !res.StartTime.IsZero() {
				t.Errorf("Nix 2.34 sent timesBuilt %d, start %v; this test expects 0: has Nix changed?", res.TimesBuilt, res.StartTime)
			}
		} else if res.TimesBuilt != 1 || res.StartTime.IsZero() || res.StopTime.Before(res.StartTime) {
			t.Errorf("timesBuilt %d, start %v, stop %v; want 1 build with its times", res.TimesBuilt, res.StartTime, res.StopTime)
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
		// "builder for '<drv>' failed with exit code 3" up to 2.26; from 2.34 on
		// "Cannot build '<drv>'.\nReason: builder failed with exit code 3.".
		if !strings.Contains(res.ErrorMsg, "'"+drvPath+"'") || !strings.Contains(res.ErrorMsg, "failed with exit code 3") || strings.Contains(res.ErrorMsg, "\x1b") {
			t.Errorf("ErrorMsg %q, want it to name %s and exit code 3, and no escapes", res.ErrorMsg, drvPath)
		}
		t.Logf("failure message: %q", res.ErrorMsg)
	})

	t.Run("BuildPaths missing", func(t *testing.T) {
		drv := fakePath("serveproto-nothere.drv")
		err := c.BuildPaths([]string{drv + "!out"}, BuildOptions{})
		t.Logf("BuildPaths error: %v", err)
		// The server answers in band, with a status and its message, and stays in step.
		var be *BuildPathsError
		if !errors.As(err, &be) || be.Status == 0 || !strings.Contains(be.Msg, drv) {
			t.Fatalf("got %v (%T), want a BuildPathsError with a status and a message naming %s", err, err, drv)
		}
		if got, err := c.QueryValidPaths([]string{infoA.Path}, false, false); err != nil || !slices.Equal(got, []string{infoA.Path}) {
			t.Errorf("after the BuildPathsError: %q, %v; want the Conn usable", got, err)
		}
	})

	// Last: this makes the server exit.
	t.Run("DumpStorePath invalid", func(t *testing.T) {
		if c.Err() != nil {
			t.Fatalf("Conn already broken: %v", c.Err())
		}
		_, err := c.DumpStorePath(missing, io.Discard)
		var se *StreamError
		// "is not valid" up to 2.26, "is not a valid store path" from 2.34 on.
		if !errors.As(err, &se) || !regexp.MustCompile(`'`+regexp.QuoteMeta(missing)+`' is not (a )?valid`).MatchString(err.Error()) {
			t.Fatalf("got %v, want a StreamError explained by the server's '%s' is not valid", err, missing)
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
	system := testbed.System(t)
	forEachNix(t, func(t *testing.T, nix testbed.Nix) { testIntegrationCancel(t, nix, system) })
}

func testIntegrationCancel(t *testing.T, nix testbed.Nix, system string) {
	s := startServe(t, nix)

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
