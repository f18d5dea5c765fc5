package serveproto

import (
	"bytes"
	"errors"
	"io"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// pipelineCase is a build whose requests go out together: the input
// query (with lock), the build, the output query and the output's NAR.
type pipelineCase struct {
	drv      BasicDerivation
	requests []byte // the four requests, back to back
	narBytes []byte
}

func newPipelineCase(t *testing.T) pipelineCase {
	narBytes := sampleNAR(t)
	drv := BasicDerivation{
		Outputs:   map[string]DerivationOutput{"out": {Path: outPath}},
		InputSrcs: []string{pathA},
		Platform:  "x86_64-linux",
		Builder:   "/bin/sh",
		Args:      []string{"-c", "cp -r $in $out"},
		Env:       map[string]string{"out": outPath},
	}
	requests := new(wb).
		u(1, 1, 0).list(pathA). // QueryValidPaths lock, no substitute
		u(8).s(drvPath).u(1).s("out", outPath, "", "").list(pathA).s("x86_64-linux", "/bin/sh").
		list("-c", "cp -r $in $out").u(1).s("out", outPath).u(0, 0, 0, 0, 0, 0). // BuildDerivation, 2.7 options
		u(2).list(outPath).                                                      // QueryPathInfos
		u(3).s(outPath).                                                         // DumpStorePath
		b()
	return pipelineCase{drv: drv, requests: requests, narBytes: narBytes}
}

// send queues the four requests.
func (pc pipelineCase) send(t *testing.T, c *Conn) (*Reply[[]string], *Reply[*BuildResult], *Reply[[]PathInfo], *DumpReply) {
	t.Helper()
	valid, err := c.SendQueryValidPaths([]string{pathA}, true, false)
	if err != nil {
		t.Fatal(err)
	}
	build, err := c.SendBuildDerivation(drvPath, pc.drv, BuildOptions{})
	if err != nil {
		t.Fatal(err)
	}
	infos, err := c.SendQueryPathInfos([]string{outPath})
	if err != nil {
		t.Fatal(err)
	}
	dump, err := c.SendDumpStorePath(outPath)
	if err != nil {
		t.Fatal(err)
	}
	return valid, build, infos, dump
}

// expectEnd checks that the client sends nothing more until it closes.
func expectEnd(f *fake) {
	var b [1]byte
	if n, err := f.in.Read(b[:]); err != io.EOF {
		f.t.Errorf("fake server: the client sent %d more bytes (%v), want nothing", n, err)
	}
}

// The four requests reach the server as one flight, before it has answered
// any of them: the server here reads all of them first. The replies, sent
// back to back, are read in order and the Conn is in step after them.
func TestPipelineOneFlight(t *testing.T) {
	pc := newPipelineCase(t)
	built := new(wb).u(0).s("").u(1, 0, 1700000000, 1700000001).u(1).
		s("sha256:"+hexSHA256([]byte("x"))+"!out", `{"outPath":"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk-test"}`).b()
	replies := new(wb).
		list(pathA).
		raw(built).
		s(outPath, drvPath).list(pathA).u(704, 704).s(sampleNARHash, "").list().s("").
		raw(pc.narBytes).
		b()
	c := dial(t, 0x207, Options{}, func(f *fake) {
		if !f.expect("pipelined requests", pc.requests) {
			return
		}
		f.send(replies)
		exchange(new(wb).u(1, 0, 0).list(pathB).b(), new(wb).list().b())(f)
		expectEnd(f)
	})
	valid, build, infos, dump := pc.send(t, c)
	var pe *PendingError
	if err := c.Err(); !errors.As(err, &pe) || len(pe.Pending) != 4 {
		t.Fatalf("Err() with 4 replies pending = %v", err)
	}
	// A plain call would read the first pending reply as its own: refused,
	// and nothing is sent.
	if _, err := c.QueryValidPaths([]string{pathB}, false, false); !errors.As(err, &pe) || pe.Op != "QueryValidPaths" {
		t.Fatalf("QueryValidPaths with replies pending: %v", err)
	}
	gotValid, err := valid.Read()
	if err != nil {
		t.Fatal(err)
	}
	res, err := build.Read()
	if err != nil {
		t.Fatal(err)
	}
	gotInfos, err := infos.Read()
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	st, err := dump.ReadTo(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{pathA}, gotValid); diff != "" {
		t.Errorf("valid (-want +got):\n%s", diff)
	}
	if res.Status != Built || res.BuiltOutputs["out"] != outPath {
		t.Errorf("build result %+v", res)
	}
	want := []PathInfo{{Path: outPath, Deriver: drvPath, References: []string{pathA}, DownloadSize: 704, NarSize: 704, NarHash: sampleNARHash}}
	if diff := cmp.Diff(want, gotInfos); diff != "" {
		t.Errorf("infos (-want +got):\n%s", diff)
	}
	if !bytes.Equal(buf.Bytes(), pc.narBytes) || st.NixHash() != sampleNARHash {
		t.Errorf("NAR: %d bytes, %s", buf.Len(), st.NixHash())
	}
	if err := c.Err(); err != nil {
		t.Fatalf("Err() after every reply = %v", err)
	}
	if _, err := c.QueryValidPaths([]string{pathB}, false, false); err != nil {
		t.Fatalf("in step after the flight: %v", err)
	}
}

// A reply read out of turn reads nothing: the Conn stays in step, and the
// replies then read in turn are right. Reading one twice is refused too.
func TestPipelineOutOfTurn(t *testing.T) {
	c := dial(t, 0x207, Options{}, func(f *fake) {
		if f.expect("requests", new(wb).u(1, 0, 0).list(pathA).u(1, 0, 0).list(pathB).b()) {
			f.send(new(wb).list(pathA).list().b())
		}
		expectEnd(f)
	})
	first, err := c.SendQueryValidPaths([]string{pathA}, false, false)
	if err != nil {
		t.Fatal(err)
	}
	second, err := c.SendQueryValidPaths([]string{pathB}, false, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := second.Read(); err == nil {
		t.Fatal("second reply read before the first: no error")
	}
	if got, err := first.Read(); err != nil || !slicesEqual(got, []string{pathA}) {
		t.Fatalf("first: %v, %v", got, err)
	}
	if _, err := first.Read(); err == nil {
		t.Fatal("first reply read twice: no error")
	}
	if got, err := second.Read(); err != nil || len(got) != 0 {
		t.Fatalf("second: %v, %v", got, err)
	}
	if err := c.Err(); err != nil {
		t.Fatal(err)
	}
}

func slicesEqual(a, b []string) bool { return cmp.Equal(a, b) }

// A failed build is answered in band; the output query after it gets no
// record; the NAR request makes the real server exit ("path … is not
// valid"), which ends the stream: the dump's read is an explained
// StreamError, and the Conn is broken, not pending.
func TestPipelineFailedBuildEndsAtDump(t *testing.T) {
	pc := newPipelineCase(t)
	explained := 0
	opt := Options{Explain: func(err error) error { explained++; return err }}
	c := dial(t, 0x207, opt, func(f *fake) {
		if !f.expect("pipelined requests", pc.requests) {
			return
		}
		f.send(new(wb).list(). // pathA is not valid (a stale hint)
					u(9).s("error: path '"+pathA+"' is not valid").u(0, 0, 0, 0).u(0). // MiscFailure
					s("").                                                             // no infos
					b())
		// and the server exits
	})
	valid, build, infos, dump := pc.send(t, c)
	if got, err := valid.Read(); err != nil || len(got) != 0 {
		t.Fatalf("valid: %v, %v", got, err)
	}
	res, err := build.Read()
	if err != nil || res.Status != MiscFailure {
		t.Fatalf("build: %+v, %v", res, err)
	}
	if got, err := infos.Read(); err != nil || len(got) != 0 {
		t.Fatalf("infos: %v, %v", got, err)
	}
	_, err = dump.ReadTo(io.Discard)
	var se *StreamError
	if !errors.As(err, &se) || explained != 1 {
		t.Fatalf("dump: %T %v (explained %d), want an explained StreamError", err, err, explained)
	}
	if c.Err() != err {
		t.Fatalf("Err() = %v, want the dump's error", c.Err())
	}
}

// A malformed reply mid-flight breaks the Conn: every reply still pending
// returns the same error and nothing more is read.
func TestPipelineMalformedBreaksTheRest(t *testing.T) {
	pc := newPipelineCase(t)
	c := dial(t, 0x207, Options{}, func(f *fake) {
		if !f.expect("pipelined requests", pc.requests) {
			return
		}
		f.send(new(wb).list(pathA).u(0).s("").u(1, 2).b()) // isNonDeterministic 2: not a bool
	})
	valid, build, infos, dump := pc.send(t, c)
	if _, err := valid.Read(); err != nil {
		t.Fatal(err)
	}
	_, err := build.Read()
	var pe *ProtocolError
	if !errors.As(err, &pe) {
		t.Fatalf("build: %T %v, want a ProtocolError", err, err)
	}
	if _, err2 := infos.Read(); err2 != err {
		t.Errorf("infos after the break: %v, want %v", err2, err)
	}
	if _, err2 := dump.ReadTo(io.Discard); err2 != err {
		t.Errorf("dump after the break: %v, want %v", err2, err)
	}
	if c.Err() != err {
		t.Errorf("Err() = %v", c.Err())
	}
}
