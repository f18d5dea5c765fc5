package serveproto

import (
	"context"
	"errors"
	"io"
	"testing"
	"time"
)

// A machine that takes the greeting request and never answers: the
// handshake ends when its timeout passes, abort closes the pipe, and the
// error says so; a greeting in time gives a Conn; a cancelled ctx gives
// its cause.
func TestHandshakeWithin(t *testing.T) {
	silent := func() (io.Reader, io.Writer, func()) {
		sr, sw := io.Pipe() // the machine's stdin: read and dropped
		go io.Copy(io.Discard, sr)
		cr, _ := io.Pipe() // the machine's stdout: nothing ever comes
		// abort closes both, as closing a session does.
		return cr, sw, func() { cr.CloseWithError(io.ErrClosedPipe); sr.Close() }
	}

	r, w, abort := silent()
	aborted := false
	_, err := HandshakeWithin(context.Background(), 50*time.Millisecond, r, w, Options{}, func() { aborted = true; abort() })
	var late *NoGreetingError
	if !errors.As(err, &late) || late.Timeout != 50*time.Millisecond {
		t.Fatalf("silent machine: %v, want a NoGreetingError after 50ms", err)
	}
	if !aborted {
		t.Error("abort was not called")
	}
	if want := "no serve protocol greeting within 50ms"; len(err.Error()) < len(want) || err.Error()[:len(want)] != want {
		t.Errorf("error %q does not start with %q", err, want)
	}

	cause := errors.New("hook interrupted")
	ctx, cancel := context.WithCancelCause(context.Background())
	r, w, abort = silent()
	time.AfterFunc(20*time.Millisecond, func() { cancel(cause) })
	if _, err := HandshakeWithin(ctx, time.Minute, r, w, Options{}, abort); !errors.Is(err, cause) {
		t.Errorf("cancelled: %v, want the context's cause", err)
	}

	cr, cw := io.Pipe()
	sr, sw := io.Pipe()
	go func() {
		io.ReadFull(sr, make([]byte, 16))
		cw.Write(new(wb).u(0x5452eecb, 0x207).b())
	}()
	c, err := HandshakeWithin(context.Background(), time.Minute, cr, sw, Options{}, func() { t.Error("abort called for a machine that greeted") })
	if err != nil {
		t.Fatal(err)
	}
	if got := c.ServerVersion().String(); got != "2.7" {
		t.Errorf("version %s", got)
	}
}
