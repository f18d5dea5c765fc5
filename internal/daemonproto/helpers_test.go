package daemonproto

import (
	"bytes"
	"crypto/sha256"
	"sync"
	"testing"

	gonar "github.com/nix-community/go-nix/pkg/nar"
	"github.com/nix-community/go-nix/pkg/nixbase32"
	"go.uber.org/goleak"

	"github.com/nix-offload/nix-offload/internal/serveproto"
)

// go-nix's nar.Writer, used for fixtures, stops its goroutine on Close; the
// package itself starts none.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// fakePath returns a well-formed store path whose hash part is derived
// from name.
func fakePath(name string) string {
	h := sha256.Sum256([]byte("daemonproto-test:" + name))
	return serveproto.StoreDir + "/" + nixbase32.EncodeToString(h[:20]) + "-" + name
}

// makeNAR serialises a tree with go-nix's writer, which writes what
// `nix-store --dump` does.
func makeNAR(t testing.TB, hdrs []gonar.Header, contents map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	w, err := gonar.NewWriter(&buf)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hdrs {
		if err := w.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		if h.Type == gonar.TypeRegular {
			if _, err := w.Write([]byte(contents[h.Path])); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// fileNAR is the NAR of a single regular file.
func fileNAR(t testing.TB, contents string) []byte {
	return makeNAR(t, []gonar.Header{{Path: "/", Type: gonar.TypeRegular, Size: int64(len(contents))}},
		map[string]string{"/": contents})
}

// sourcePath makes a content-addressed path holding a directory with one
// file, and its PathInfo.
func sourcePath(t testing.TB, name, contents string) (serveproto.PathInfo, []byte) {
	narBytes := makeNAR(t, []gonar.Header{
		{Path: "/", Type: gonar.TypeDirectory},
		{Path: "/file", Type: gonar.TypeRegular, Size: int64(len(contents))},
	}, map[string]string{"/file": contents})
	sum := sha256.Sum256(narBytes)
	return serveproto.PathInfo{
		Path:    serveproto.MakeSourcePath(name, sum),
		NarHash: "sha256:" + nixbase32.EncodeToString(sum[:]),
		NarSize: uint64(len(narBytes)),
		CA:      "fixed:r:sha256:" + nixbase32.EncodeToString(sum[:]),
	}, narBytes
}

// shDerivation is an input-addressed derivation running script with
// /bin/sh; its paths are made up, which a trusted daemon accepts.
func shDerivation(system, name, script string, inputs ...string) (string, serveproto.BasicDerivation) {
	drvPath := fakePath(name + ".drv")
	out := fakePath(name)
	return drvPath, serveproto.BasicDerivation{
		Outputs:   map[string]serveproto.DerivationOutput{"out": {Path: out}},
		InputSrcs: inputs,
		Platform:  system,
		Builder:   "/bin/sh",
		Args:      []string{"-c", script},
		Env:       map[string]string{"out": out, "name": name, "system": system, "builder": "/bin/sh"},
	}
}

// logRecorder collects the messages of Options.Log.
type logRecorder struct {
	mu   sync.Mutex
	msgs []Message // guarded by mu
}

func (l *logRecorder) log(m Message) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.msgs = append(l.msgs, m)
}

// lines returns the build log lines received so far.
func (l *logRecorder) lines() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, m := range l.msgs {
		if s, ok := m.LogLine(); ok {
			out = append(out, s)
		}
	}
	return out
}

func (l *logRecorder) reset() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.msgs = nil
}
