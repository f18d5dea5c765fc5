package hookproto

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// hangGuard runs f and fails the test if it has not returned within 2 s:
// a guard against hangs, not a timing assertion.
func hangGuard(t *testing.T, what string, f func()) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
	case <-ctx.Done():
		t.Fatalf("%s: still blocked after 2 s", what)
	}
}

func TestBuildLogPassesThrough(t *testing.T) {
	var out safeBuffer
	b := NewBuildLog(&out, 1<<20)
	var want bytes.Buffer
	for i := range 1000 {
		line := fmt.Sprintf("line %d\n", i)
		want.WriteString(line)
		if n, err := b.Write([]byte(line)); n != len(line) || err != nil {
			t.Fatalf("Write = %d, %v", n, err)
		}
	}
	b.Write([]byte("no newline"))
	want.WriteString("no newline")
	if dropped := b.Close(time.Minute); dropped != 0 {
		t.Errorf("dropped %d", dropped)
	}
	if out.String() != want.String() {
		t.Errorf("log differs: got %d bytes, want %d", out.Len(), want.Len())
	}
}

// TestBuildLogStalledReader: the reader stops (a pipe nobody reads);
// Write never blocks, drops are counted, and when the reader resumes the
// log has the note where the gap is and everything accepted, in order.
func TestBuildLogStalledReader(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	const capacity = 4096
	b := NewBuildLog(w, capacity)

	var written bytes.Buffer // what Write was given, in order
	line := func(i int) []byte { return fmt.Appendf(nil, "line %06d %s\n", i, strings.Repeat("x", 100)) }
	i := 0
	// Write until the pipe (64 KiB) and the buffer are full and writes drop.
	hangGuard(t, "Write with a stalled reader", func() {
		for b.Dropped() == 0 {
			written.Write(line(i))
			b.Write(line(i))
			i++
		}
		for range 10 { // more drops
			written.Write(line(i))
			b.Write(line(i))
			i++
		}
	})
	droppedBefore := b.Dropped()
	if droppedBefore == 0 {
		t.Fatal("nothing dropped")
	}

	// The reader resumes.
	var got bytes.Buffer
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		io.Copy(&got, r)
	}()
	// Write until a line is accepted again: the note goes before it.
	hangGuard(t, "Write after the reader resumed", func() {
		for {
			d := b.Dropped()
			written.Write(line(i))
			b.Write(line(i))
			i++
			if b.Dropped() == d {
				break
			}
		}
	})
	dropped := b.Close(time.Minute)
	w.Close()
	<-readDone

	notes := regexp.MustCompile(`nix-offload: (\d+) bytes of log dropped \(the log reader was too slow\)\n`)
	var noted int64
	for _, m := range notes.FindAllStringSubmatch(got.String(), -1) {
		n, _ := strconv.ParseInt(m[1], 10, 64)
		noted += n
	}
	if noted != dropped || dropped < droppedBefore {
		t.Errorf("notes say %d bytes dropped, Close says %d (%d before the reader resumed)", noted, dropped, droppedBefore)
	}
	// Without the notes, the log is what was written minus whole dropped
	// lines, in order.
	kept := notes.ReplaceAllString(got.String(), "")
	if int64(len(kept))+dropped != int64(written.Len()) {
		t.Errorf("%d bytes kept + %d dropped != %d written", len(kept), dropped, written.Len())
	}
	if !isSubsequence(kept, written.String()) {
		t.Error("the log is not the written lines in order")
	}
	if last := notes.FindStringIndex(got.String()); last == nil || !strings.HasSuffix(got.String(), string(line(i-1))) {
		t.Errorf("the log does not end with the note and then the last line:\n%s", tail(got.String()))
	}
}

// TestBuildLogCloseStalled: Close returns even if the reader never
// resumes, ends the goroutine (goleak checks), and counts what it gave
// up.
func TestBuildLogCloseStalled(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	b := NewBuildLog(w, 1<<20)
	chunk := bytes.Repeat([]byte("y"), 32<<10)
	var total int64
	hangGuard(t, "Write", func() {
		for range 8 { // 256 KiB: the pipe takes 64 KiB
			b.Write(chunk)
			total += int64(len(chunk))
		}
	})
	var dropped int64
	hangGuard(t, "Close(10ms) with a stalled reader", func() { dropped = b.Close(10 * time.Millisecond) })
	if dropped == 0 || dropped > total {
		t.Errorf("Close = %d dropped of %d", dropped, total)
	}
	if b.Err() == nil {
		t.Error("no Err after giving up")
	}
	if n, err := b.Write([]byte("late\n")); n != 5 || err != nil || b.Dropped() != dropped+5 {
		t.Errorf("Write after Close = %d, %v; dropped %d", n, err, b.Dropped())
	}
}

// TestBuildLogCloseNoDeadline: with a writer that cannot be interrupted,
// Close still returns; the goroutine ends once the write returns.
func TestBuildLogCloseNoDeadline(t *testing.T) {
	w := newGateWriter()
	b := NewBuildLog(w, 1<<20)
	b.Write([]byte("first\n"))
	<-w.entered
	b.Write([]byte("second\n"))
	var dropped int64
	hangGuard(t, "Close(0) with a blocked writer", func() { dropped = b.Close(0) })
	if dropped != int64(len("second\n")) {
		t.Errorf("Close = %d dropped, want %d", dropped, len("second\n"))
	}
	close(w.release) // the goroutine ends; goleak checks at exit
	<-b.done
}

// TestBuildLogBrokenPipe: once the reader is gone, Write still returns
// at once and everything counts as dropped.
func TestBuildLogBrokenPipe(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	defer w.Close()
	b := NewBuildLog(w, 1<<20)
	b.Write([]byte("a\n"))
	<-b.done // the write failed with EPIPE
	if err := b.Err(); err == nil || !strings.Contains(err.Error(), "broken pipe") && !isEPIPE(err) {
		t.Errorf("Err = %v", err)
	}
	b.Write([]byte("bc\n"))
	if dropped := b.Close(time.Minute); dropped != 5 {
		t.Errorf("dropped %d, want 5", dropped)
	}
}

func isEPIPE(err error) bool {
	for err != nil {
		if err == syscall.EPIPE {
			return true
		}
		u, ok := err.(interface{ Unwrap() error })
		if !ok {
			return false
		}
		err = u.Unwrap()
	}
	return false
}

// TestBuildLogNoteOnOwnLine: the note starts a line even when the gap
// follows a partial line.
func TestBuildLogNoteOnOwnLine(t *testing.T) {
	w := newGateWriter()
	b := NewBuildLog(w, 16)
	b.Write([]byte("0123456789")) // in flight, blocked
	<-w.entered
	b.Write([]byte("abcdefghij")) // does not fit: dropped
	close(w.release)
	<-w.wrote // 10 bytes at most still count as in flight: "tail\n" fits
	b.Write([]byte("tail\n"))
	b.Close(time.Minute)
	want := "0123456789\n" + dropNote(10) + "tail\n"
	if got := w.buf.String(); got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

// gateWriter blocks every Write until release is closed.
type gateWriter struct {
	release chan struct{} // closed by the test
	entered chan struct{} // a Write started
	wrote   chan struct{} // a Write returned
	mu      sync.Mutex
	buf     bytes.Buffer
}

func newGateWriter() *gateWriter {
	return &gateWriter{release: make(chan struct{}), entered: make(chan struct{}, 1), wrote: make(chan struct{}, 1)}
}

func (g *gateWriter) Write(p []byte) (int, error) {
	select {
	case g.entered <- struct{}{}:
	default:
	}
	<-g.release
	g.mu.Lock()
	defer g.mu.Unlock()
	defer func() {
		select {
		case g.wrote <- struct{}{}:
		default:
		}
	}()
	return g.buf.Write(p)
}

type safeBuffer struct {
	mu sync.Mutex
	bytes.Buffer
}

func (s *safeBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.Buffer.Write(p)
}

func (s *safeBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.Buffer.String()
}

// isSubsequence reports whether the lines of sub appear in whole in s,
// in order.
func isSubsequence(sub, s string) bool {
	lines := strings.SplitAfter(s, "\n")
	j := 0
	for _, l := range strings.SplitAfter(sub, "\n") {
		if l == "" {
			continue
		}
		for j < len(lines) && lines[j] != l {
			j++
		}
		if j == len(lines) {
			return false
		}
		j++
	}
	return true
}

func tail(s string) string {
	if len(s) > 500 {
		return "…" + s[len(s)-500:]
	}
	return s
}
