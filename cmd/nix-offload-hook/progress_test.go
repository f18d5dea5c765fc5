package main

import (
	"bytes"
	"errors"
	"io"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/creack/pty"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
)

// terminal is a pseudo-terminal: tty is the end a program writes to, as it
// would to the user's terminal; Output is everything that reached the
// terminal once every copy of tty is closed.
type terminal struct {
	tty  *os.File
	out  bytes.Buffer
	read chan error
}

func openTerminal(t *testing.T) *terminal {
	t.Helper()
	ptm, tty, err := pty.Open()
	if err != nil {
		t.Skipf("no pseudo-terminal: %v", err)
	}
	term := &terminal{tty: tty, read: make(chan error, 1)}
	// Read all along: a pty's buffer is a few KiB, and a writer blocks once it is full.
	go func() {
		_, err := io.Copy(&term.out, ptm)
		ptm.Close()
		term.read <- err
	}()
	t.Cleanup(func() { tty.Close() })
	return term
}

// Output closes this process's copy of tty and returns what the terminal
// received, once no process holds tty open (Linux then ends the read with
// EIO), within a minute.
func (term *terminal) Output(t *testing.T) string {
	t.Helper()
	term.tty.Close()
	select {
	case err := <-term.read:
		if err != nil && !errors.Is(err, syscall.EIO) {
			t.Fatalf("reading the terminal: %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("the terminal was still open a minute after the writer was done")
	}
	return term.out.String()
}

// screen is what a terminal shows after out: a carriage return goes back to
// the start of the line, ESC [ K erases from there to the line's end, a
// newline starts the next line. Any other control character or escape
// sequence fails the test: the progress display uses only these.
func screen(t *testing.T, out string) []string {
	t.Helper()
	lines := [][]rune{nil}
	col := 0
	rs := []rune(out)
	for i := 0; i < len(rs); i++ {
		row := len(lines) - 1
		switch r := rs[i]; {
		case r == '\r':
			col = 0
		case r == '\n':
			lines = append(lines, nil)
			col = 0
		case r == '\033':
			if i+2 >= len(rs) || rs[i+1] != '[' || rs[i+2] != 'K' {
				t.Fatalf("escape sequence other than ESC [ K at byte %d of %q", i, out)
			}
			lines[row] = lines[row][:col]
			i += 2
		case r < ' ' || r == 0x7f:
			t.Fatalf("control character %q at %d of %q", r, i, out)
		default:
			if col < len(lines[row]) {
				lines[row][col] = r
			} else {
				lines[row] = append(lines[row], r)
			}
			col++
		}
	}
	s := make([]string, len(lines))
	for i, l := range lines {
		s[i] = string(l)
	}
	return s
}

// statusLines returns the status lines that out drew below the events, in
// order: each starts after an event's newline and ends at the carriage
// return that erases it (the final one, after the last, stays).
func statusLines(out string) []string {
	out = strings.ReplaceAll(out, "\r\n", "\n") // the terminal's output processing (ONLCR)
	var s []string
	for _, part := range strings.Split(out, "\n")[1:] {
		if st, _, _ := strings.Cut(part, "\r"); st != "" {
			s = append(s, st)
		}
	}
	return s
}

// runProgress shows a graph of three derivations on two machines: b
// fails, a and c are built, c on the machine that a freed; a warning of
// the command's own comes in the middle, and one before the graph starts.
func runProgress(p *progress) {
	started, stopped := time.Unix(100, 0), time.Unix(102, 0)
	built := &brokerapi.GraphDerivation{Start: &started, Stop: &stopped}
	p.note("nix-offload-hook: before the graph")
	p.start(3)
	for _, e := range []brokerapi.GraphEvent{
		{Type: brokerapi.EventQueued, DrvPath: "a.drv"},
		{Type: brokerapi.EventQueued, DrvPath: "b.drv"},
		{Type: brokerapi.EventQueued, DrvPath: "c.drv"},
		{Type: brokerapi.EventStarted, DrvPath: "a.drv", Machine: "m1"},
		{Type: brokerapi.EventStarted, DrvPath: "b.drv", Machine: "m2"},
		{Type: brokerapi.EventLog, DrvPath: "a.drv", Text: "a log line"},
		{Type: brokerapi.GraphEventBuilt, DrvPath: "a.drv", Machine: "m1", Result: built},
		{Type: brokerapi.EventStarted, DrvPath: "c.drv", Machine: "m1"},
		{Type: brokerapi.GraphEventFailed, DrvPath: "b.drv", Status: "PermanentFailure", Error: "exit code 1"},
	} {
		p.event(e)
	}
	p.note("nix-offload-hook: cannot use 'm2': gone")
	p.event(brokerapi.GraphEvent{Type: brokerapi.GraphEventBuilt, DrvPath: "c.drv", Machine: "m1", Result: built})
	p.done()
}

// progressLines are the lines runProgress prints, on a terminal and off
// one.
var progressLines = []string{
	"nix-offload-hook: before the graph",
	"building 'a.drv' on 'm1'",
	"building 'b.drv' on 'm2'",
	"built 'a.drv' on 'm1' in 2s",
	"building 'c.drv' on 'm1'",
	"PermanentFailure: 'b.drv': exit code 1",
	"nix-offload-hook: cannot use 'm2': gone",
	"built 'c.drv' on 'm1' in 2s",
}

// On a terminal, the progress is one status line at the bottom, redrawn in
// place after every event: what is done, running (on which machines),
// queued and failed. The events and the command's warnings scroll above
// it, and when the graph is done only the final count is left.
func TestProgressOnTerminal(t *testing.T) {
	term := openTerminal(t)
	runProgress(newProgress(term.tty))
	out := term.Output(t)

	want := append(append([]string{}, progressLines...), "[2/3 built, 0 running, 0 queued, 1 failed]", "")
	if got := screen(t, out); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("the terminal shows:\n%s\nwant:\n%s\n(raw %q)", strings.Join(got, "\n"), strings.Join(want, "\n"), out)
	}
	wantStatus := []string{
		"[0/3 built, 1 running, 2 queued, 0 failed] m1: 1",
		"[0/3 built, 2 running, 1 queued, 0 failed] m1: 1, m2: 1",
		"[1/3 built, 1 running, 1 queued, 0 failed] m2: 1",
		"[1/3 built, 2 running, 0 queued, 0 failed] m1: 1, m2: 1",
		"[1/3 built, 1 running, 0 queued, 1 failed] m1: 1",
		"[1/3 built, 1 running, 0 queued, 1 failed] m1: 1",
		"[2/3 built, 0 running, 0 queued, 1 failed]",
	}
	if got := statusLines(out); strings.Join(got, "\n") != strings.Join(wantStatus, "\n") {
		t.Errorf("status lines drawn:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(wantStatus, "\n"))
	}
}

// Off a terminal (a pipe, a file), every event is one plain line, with no
// status line and no control characters: what a log or CI keeps.
func TestProgressOffTerminal(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	read := make(chan []byte, 1)
	go func() { b, _ := io.ReadAll(r); read <- b }()
	runProgress(newProgress(w))
	w.Close()
	out := string(<-read)
	if want := strings.Join(progressLines, "\n") + "\n"; out != want {
		t.Errorf("a pipe got %q, want %q", out, want)
	}
}
