// Package transport runs `nix-store --serve --write` somewhere and hands its
// stdin and stdout to the serve protocol client.
//
// A [Session] is one running serve process, either local ([Local], used for
// the local store and in tests) or on a machine over an SSH connection
// ([SSH]). Both behave the same:
//
//   - stdin and stdout carry the protocol ([Session.Stdin], [Session.Stdout]);
//   - stderr is drained all the time by the session's own goroutine, so a
//     chatty remote can never stall on a full pipe. The bytes go to
//     Options.Stderr (the build log) and the last few KiB are kept;
//   - when the protocol stream fails (EOF, broken pipe) [Session.Explain]
//     waits briefly for the process to end and turns the failure into a
//     [*RemoteError] that carries the remote's `error: …` text and exit status,
//     because the serve protocol has no in-band errors;
//   - [Session.Close] closes stdin first: `nix-store --serve` watches its stdin
//     for hang-up during a build and interrupts it, so closing a session is how
//     a remote build is cancelled. Then the process or channel is ended.
package transport

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// DefaultStderrTail is how much of the end of stderr a session keeps for
// error messages.
const DefaultStderrTail = 16 << 10

// explainWait bounds how long Explain waits for a failed process to exit and
// flush its stderr before reporting what it has.
const explainWait = 3 * time.Second

// killWait bounds how long Close waits for the process to end once killed.
const killWait = 2 * time.Second

// Options configure a session.
type Options struct {
	// Name identifies the peer in errors ("builder1", "local").
	Name string
	// Stderr receives a copy of everything the process writes to stderr, as
	// it arrives. It is called from the drain goroutine and should not block
	// for long: while it blocks, the remote side's stderr fills up.
	Stderr io.Writer
	// StderrTail is the number of trailing stderr bytes kept for errors
	// (DefaultStderrTail if 0).
	StderrTail int
	// Program names the remote command in errors: "nix-store --serve" if
	// empty, "nix-daemon --stdio" for ssh-ng sessions.
	Program string
}

// RemoteError is a protocol stream failure explained by the process behind it.
type RemoteError struct {
	Name    string
	Program string // the remote command: "nix-store --serve" if empty
	Err     error  // what the protocol client saw (EOF, broken pipe, …)
	Stderr  string // the process's error lines, if any
	Exit    string // "exit status 1", "signal KILL", "" if still running or unknown
}

func (e *RemoteError) Error() string {
	var b strings.Builder
	prog := e.Program
	if prog == "" {
		prog = "nix-store --serve"
	}
	fmt.Fprintf(&b, "%s: %s", e.Name, prog)
	switch {
	case e.Stderr != "":
		fmt.Fprintf(&b, ": %s", e.Stderr)
	default:
		fmt.Fprintf(&b, ": %v", e.Err)
	}
	if e.Exit != "" {
		fmt.Fprintf(&b, " (%s)", e.Exit)
	}
	return b.String()
}
func (e *RemoteError) Unwrap() error { return e.Err }

// process is what differs between a local child and an SSH channel.
type process interface {
	wait() error // blocks until the process has ended
	kill()       // ends it now
}

// Session is one running `nix-store --serve`. Its methods are safe for
// concurrent use; Stdin and Stdout each belong to one protocol client.
type Session struct {
	name    string
	program string // Options.Program
	stdin   io.WriteCloser
	stdout  io.Reader
	proc    process
	tail    *tailBuffer

	logOnly atomic.Bool // stderr is now a build log: only error: lines explain failures

	stderrDone chan struct{} // closed when stderr hit EOF
	exited     chan struct{} // closed when the process ended
	exitErr    error         // valid after exited

	closeOnce sync.Once
}

func newSession(name string, stdin io.WriteCloser, stdout, stderr io.Reader, proc process, opt Options) *Session {
	n := opt.StderrTail
	if n <= 0 {
		n = DefaultStderrTail
	}
	s := &Session{
		name:       name,
		program:    opt.Program,
		stdin:      stdin,
		stdout:     stdout,
		proc:       proc,
		tail:       &tailBuffer{max: n},
		stderrDone: make(chan struct{}),
		exited:     make(chan struct{}),
	}
	go s.drain(stderr, opt.Stderr)
	go func() {
		s.exitErr = proc.wait()
		close(s.exited)
	}()
	return s
}

// drain copies stderr to the sink and the tail until EOF. It never stops
// reading because of the sink: a failing sink is dropped.
func (s *Session) drain(stderr io.Reader, sink io.Writer) {
	defer close(s.stderrDone)
	if c, ok := stderr.(io.Closer); ok {
		defer c.Close()
	}
	buf := make([]byte, 32<<10)
	for {
		n, err := stderr.Read(buf)
		if n > 0 {
			s.tail.Write(buf[:n])
			if sink != nil {
				if _, werr := sink.Write(buf[:n]); werr != nil {
					sink = nil
				}
			}
		}
		if err != nil {
			return
		}
	}
}

// Stdin is the protocol's request stream.
func (s *Session) Stdin() io.Writer { return s.stdin }

// Stdout is the protocol's reply stream.
func (s *Session) Stdout() io.Reader { return s.stdout }

// Done is closed when the process has ended.
func (s *Session) Done() <-chan struct{} { return s.exited }

// StderrIsLog tells the session that from now on stderr carries a build's
// log, so only Nix's own `error:` lines may explain a failure, never the
// last lines a builder printed. Call it when the build command is sent.
func (s *Session) StderrIsLog() { s.logOnly.Store(true) }

// Stderr returns the kept tail of stderr.
func (s *Session) Stderr() string { return s.tail.String() }

// ResetStderr forgets the stderr kept so far and undoes [Session.StderrIsLog],
// as if the session had just started. A session that serves one build after
// another calls it between builds, so that a failure is explained only by
// what the remote printed since, never by an earlier build's log or errors.
// Bytes the remote wrote before the call but that arrive after it count as
// new ones.
func (s *Session) ResetStderr() {
	s.tail.Reset()
	s.logOnly.Store(false)
}

// Explain turns a failed read or write on the protocol stream into a
// *RemoteError that says why the remote stopped talking. It waits up to a
// few seconds for the process to exit; errors that are not stream failures
// are returned unchanged. It has the signature of serveproto.Options.Explain.
func (s *Session) Explain(err error) error {
	if err == nil || !isStreamFailure(err) {
		return err
	}
	t := time.NewTimer(explainWait)
	defer t.Stop()
	select {
	case <-s.exited:
		select {
		case <-s.stderrDone:
		case <-t.C:
		}
	case <-t.C:
	}
	re := &RemoteError{Name: s.name, Program: s.program, Err: err, Stderr: errorText(s.tail.String(), s.logOnly.Load())}
	select {
	case <-s.exited:
		re.Exit = exitText(s.exitErr)
	default:
	}
	return re
}

// Close cancels whatever the session is doing: it closes stdin (which makes
// `nix-store --serve` interrupt a running build), ends the process, and
// waits for it, at most about 3 s in all: an SSH command that outlives its
// channel is the connection's to end. It is idempotent and returns nil.
func (s *Session) Close() error {
	s.closeOnce.Do(func() {
		s.stdin.Close()
		t := time.NewTimer(time.Second)
		defer t.Stop()
		select {
		case <-s.exited:
		case <-t.C:
			s.proc.kill()
			// sshd neither signals a forced-command session nor closes its
			// channel before the command exits: do not wait for that. The
			// connection's end frees the session's goroutines.
			t.Reset(killWait)
			select {
			case <-s.exited:
			case <-t.C:
			}
		}
		if c, ok := s.stdout.(io.Closer); ok {
			c.Close()
		}
	})
	return nil
}

func isStreamFailure(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, io.ErrClosedPipe) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, os.ErrClosed) || errors.Is(err, syscall.ECONNRESET)
}

// errorText picks what explains a failure from the end of stderr: the
// `error: …` paragraph Nix printed, else (unless stderr is a build log) the
// last non-empty lines.
func errorText(tail string, logOnly bool) string {
	lines := strings.Split(strings.TrimRight(tail, "\n"), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.HasPrefix(lines[i], "error:") {
			return joinTrimmed(lines[i:], 8)
		}
	}
	if logOnly {
		return ""
	}
	start := max(len(lines)-3, 0)
	return joinTrimmed(lines[start:], 3)
}

func joinTrimmed(lines []string, n int) string {
	var out []string
	for _, l := range lines {
		if l = strings.TrimSpace(l); l != "" {
			out = append(out, l)
		}
		if len(out) == n {
			break
		}
	}
	return strings.Join(out, "; ")
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf []byte // guarded by mu
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(p) >= t.max {
		t.buf = append(t.buf[:0], p[len(p)-t.max:]...)
		return len(p), nil
	}
	if over := len(t.buf) + len(p) - t.max; over > 0 {
		t.buf = append(t.buf[:0], t.buf[over:]...)
	}
	t.buf = append(t.buf, p...)
	return len(p), nil
}

// Reset empties the buffer.
func (t *tailBuffer) Reset() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = t.buf[:0]
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(bytes.ToValidUTF8(t.buf, []byte("?")))
}
