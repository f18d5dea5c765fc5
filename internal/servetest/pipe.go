package servetest

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/transport"
)

// PipeSession is one session of a Server over two real pipes (os.Pipe), as
// a local `nix-store --serve` child would have.
type PipeSession struct {
	// Name names the fake machine in errors.
	Name string
	// R is the server's stdout, W its stdin: hand them to
	// serveproto.Handshake.
	R, W *os.File

	program string // names the command in Explain's errors; "" for nix-store --serve
	stderr  syncBuffer
	done    chan struct{} // closed when Serve has returned
	status  int           // valid after done

	closeOnce sync.Once
}

// Pipe starts a session of s over a pipe pair. The server runs on its own
// goroutine until the client closes W (or R, once the server writes), or
// the server hangs up. The session is closed when the test ends.
func (s *Server) Pipe(t testing.TB, name string) *PipeSession {
	t.Helper()
	return s.pipe(t, name, s.Serve)
}

// PipeDaemon is [Server.Pipe] for a worker protocol session
// ([Server.ServeDaemon]), as a local `nix-daemon --stdio` child would
// have.
func (s *Server) PipeDaemon(t testing.TB, name string) *PipeSession {
	t.Helper()
	p := s.pipe(t, name, s.ServeDaemon)
	p.program = "nix-daemon --stdio"
	return p
}

func (s *Server) pipe(t testing.TB, name string, serve func(io.Reader, io.Writer, io.Writer) int) *PipeSession {
	t.Helper()
	cr, sw, err := os.Pipe() // server → client
	if err != nil {
		t.Fatal(err)
	}
	sr, cw, err := os.Pipe() // client → server
	if err != nil {
		t.Fatal(err)
	}
	p := &PipeSession{Name: name, R: cr, W: cw, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		p.status = serve(sr, sw, &p.stderr)
		// As when nix-store exits: the client sees its stdout end, and
		// its writes fail.
		sw.Close()
		sr.Close()
	}()
	t.Cleanup(func() { p.Close() })
	return p
}

// Close closes the client's ends, which ends the session the way closing a
// transport does: a stalled server sees its stdin end, a blocked read of
// the client returns. It waits for the server to return.
func (p *PipeSession) Close() error {
	p.closeOnce.Do(func() {
		p.W.Close()
		p.R.Close()
	})
	<-p.done
	return nil
}

// Done is closed when the server has ended the session.
func (p *PipeSession) Done() <-chan struct{} { return p.done }

// Exit returns the server's exit status and stderr once it has ended.
func (p *PipeSession) Exit() (int, string) {
	<-p.done
	return p.status, p.stderr.String()
}

// Stderr returns what the server has written to stderr so far.
func (p *PipeSession) Stderr() string { return p.stderr.String() }

// Explain is serveproto.Options.Explain for the session, as
// transport.Session.Explain is for a real one: it waits briefly for the
// server to end and returns a *transport.RemoteError with its "error: …"
// text and exit status.
func (p *PipeSession) Explain(err error) error {
	select {
	case <-p.done:
	case <-time.After(3 * time.Second):
		return &transport.RemoteError{Name: p.Name, Program: p.program, Err: err}
	}
	return &transport.RemoteError{Name: p.Name, Program: p.program, Err: err, Stderr: errorText(p.stderr.String()),
		Exit: fmt.Sprintf("exit status %d", p.status)}
}

// errorText returns Nix's last "error: …" paragraph of stderr, on one line.
func errorText(stderr string) string {
	lines := strings.Split(strings.TrimRight(stderr, "\n"), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.HasPrefix(lines[i], "error:") {
			var out []string
			for _, l := range lines[i:] {
				if l = strings.TrimSpace(l); l != "" {
					out = append(out, l)
				}
			}
			return strings.Join(out, "; ")
		}
	}
	return ""
}

// syncBuffer is a bytes.Buffer safe for concurrent use.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

var _ io.Writer = (*syncBuffer)(nil)
