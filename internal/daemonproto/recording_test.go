package daemonproto

import (
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// Conversations with real `nix-daemon --stdio` of Nix 2.8, 2.26 and 2.34,
// recorded by TestIntegration with -update into testdata/session-*.bin,
// are replayed by TestReplay without the test bed, and seed the fuzzers.

var update = flag.Bool("update", false, "record the conversations of TestIntegration into testdata/session-<version>.bin")

// A recording is a sequence of chunks: u64 direction (0 client to daemon,
// 1 daemon to client), u64 length, the bytes.
type chunk struct {
	fromDaemon bool
	b          []byte
}

// recorder sits between the Conn and the transport and keeps both
// streams in order.
type recorder struct {
	r      io.Reader
	w      io.Writer
	mu     sync.Mutex
	chunks []chunk // guarded by mu
}

func (rec *recorder) add(fromDaemon bool, p []byte) {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if n := len(rec.chunks); n > 0 && rec.chunks[n-1].fromDaemon == fromDaemon {
		rec.chunks[n-1].b = append(rec.chunks[n-1].b, p...)
		return
	}
	rec.chunks = append(rec.chunks, chunk{fromDaemon, bytes.Clone(p)})
}

func (rec *recorder) Read(p []byte) (int, error) {
	n, err := rec.r.Read(p)
	rec.add(true, p[:n])
	return n, err
}

func (rec *recorder) Write(p []byte) (int, error) {
	rec.add(false, p)
	return rec.w.Write(p)
}

func (rec *recorder) save(t *testing.T, file string) {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	var b bytes.Buffer
	for _, c := range rec.chunks {
		dir := uint64(0)
		if c.fromDaemon {
			dir = 1
		}
		b.Write(binary.LittleEndian.AppendUint64(nil, dir))
		b.Write(binary.LittleEndian.AppendUint64(nil, uint64(len(c.b))))
		b.Write(c.b)
	}
	if err := os.WriteFile(file, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("recorded %d chunks, %d bytes to %s", len(rec.chunks), b.Len(), file)
}

func loadRecording(t testing.TB, file string) []chunk {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var out []chunk
	for len(b) > 0 {
		if len(b) < 16 {
			t.Fatalf("%s: truncated", file)
		}
		dir, n := binary.LittleEndian.Uint64(b), binary.LittleEndian.Uint64(b[8:])
		b = b[16:]
		if n > uint64(len(b)) {
			t.Fatalf("%s: chunk of %d bytes, %d left", file, n, len(b))
		}
		out = append(out, chunk{dir == 1, b[:n]})
		b = b[n:]
	}
	return out
}

// replayer plays a recording: writes must be exactly the client's
// recorded bytes, reads return the daemon's, in order.
type replayer struct {
	chunks []chunk
	err    error
}

var errReplayDone = errors.New("recording ends here")

func (rp *replayer) Read(p []byte) (int, error) {
	for len(rp.chunks) > 0 && !rp.chunks[0].fromDaemon {
		return 0, fmt.Errorf("replay: the client reads, but the recording expects it to send %d more bytes first", len(rp.chunks[0].b))
	}
	if len(rp.chunks) == 0 {
		return 0, errReplayDone
	}
	n := copy(p, rp.chunks[0].b)
	if rp.chunks[0].b = rp.chunks[0].b[n:]; len(rp.chunks[0].b) == 0 {
		rp.chunks = rp.chunks[1:]
	}
	return n, nil
}

func (rp *replayer) Write(p []byte) (int, error) {
	w := p
	for len(w) > 0 {
		if len(rp.chunks) == 0 || rp.chunks[0].fromDaemon {
			rp.err = fmt.Errorf("replay: the client sends %d bytes the recording does not have: % x", len(w), w[:min(len(w), 64)])
			return 0, rp.err
		}
		c := rp.chunks[0].b
		n := min(len(c), len(w))
		if !bytes.Equal(c[:n], w[:n]) {
			rp.err = fmt.Errorf("replay: the client sends\n% x\nthe recording has\n% x", w[:min(n, 64)], c[:min(n, 64)])
			return 0, rp.err
		}
		if rp.chunks[0].b = c[n:]; len(rp.chunks[0].b) == 0 {
			rp.chunks = rp.chunks[1:]
		}
		w = w[n:]
	}
	return len(p), nil
}

func recordings(t testing.TB) []string {
	files, err := filepath.Glob("testdata/session-*.bin")
	if err != nil || len(files) == 0 {
		t.Fatalf("no recordings in testdata (run TestIntegration with -update): %v", err)
	}
	return files
}

// TestReplay runs the integration script against each recording: the
// client must send exactly what it sent to the real daemon, and read
// the real daemon's replies to the same results.
func TestReplay(t *testing.T) {
	for _, file := range recordings(t) {
		version := file[len("testdata/session-") : len(file)-len(".bin")]
		t.Run(version, func(t *testing.T) {
			rp := &replayer{chunks: loadRecording(t, file)}
			d := &daemon{log: &logRecorder{}}
			c, err := Handshake(t.Context(), rp, rp, Options{Log: d.log.log})
			if err != nil {
				t.Fatalf("Handshake: %v", err)
			}
			d.conn = c
			integration(t, d, version, "x86_64-linux")
			if rp.err != nil {
				t.Error(rp.err)
			}
			if len(rp.chunks) != 0 {
				t.Errorf("%d chunks of the recording were not replayed", len(rp.chunks))
			}
		})
	}
}
