package serveproto

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nix-offload/nix-offload/internal/wire"
)

// Handshake constants (nix 2.8.0 src/libstore/serve-protocol.hh).
const (
	serveMagic1 = 0x390c9deb // client → server
	serveMagic2 = 0x5452eecb // server → client

	// ClientVersion is the protocol version this client announces: 2.7, as
	// every Nix from 2.4 to 2.34 and Lix do. Servers from 2.23 on use the
	// smaller of both versions, so a 2.35 server (0x208) answers in the 2.7
	// form too.
	ClientVersion = 0x207

	// serverMajor is the only major version spoken.
	serverMajor = 0x200
)

// Version is a serve protocol version: the major version in bits 8–15, the
// minor in bits 0–7.
type Version uint64

// Major returns the major version, 2 for every Nix 2.x.
func (v Version) Major() int { return int(v>>8) & 0xff }

// Minor returns the minor version; see the package documentation for what
// each one adds.
func (v Version) Minor() int { return int(v) & 0xff }

func (v Version) String() string { return fmt.Sprintf("%d.%d", v.Major(), v.Minor()) }

// Options configure a [Conn].
type Options struct {
	// Explain, when set, is called with the error of any read/write that
	// failed on the stream (EOF, broken pipe) — always a [*StreamError] —
	// and its result replaces that error. The serve protocol has no error
	// frames: the server reports a failure ("error: path … is not valid")
	// on its stderr and exits, so the transport uses Explain to wait
	// briefly for the remote process and attach its stderr and exit
	// status. The returned error should wrap err; nil keeps err. With
	// Explain nil, errors are returned as they are.
	Explain func(err error) error
}

// Conn is the client side of one `nix-store --serve --write` session.
//
// Operations run one at a time: a Conn is not safe for concurrent use,
// except that [Conn.Close] may be called at any time. After an operation
// fails with anything but an argument error or a [*BuildPathsError], the
// stream may be out of step, so the Conn is broken: every later call
// returns the same error at once.
//
// Requests can also be sent ahead of their replies (pipelined): the Send
// methods ([Conn.SendBuildDerivation], …) write a request and return a
// handle whose Read reads its reply later. The server answers one command
// after the other on one stream, so replies are read in the order the
// requests were sent; reading one out of turn is an error that reads
// nothing. Any failure while a reply is read breaks the Conn, and with it
// every reply still pending. While replies are pending, the plain methods
// refuse to run and [Conn.Err] reports them, so a Conn given up with
// replies unread is never taken for one in step.
type Conn struct {
	rr  *recordingReader // the transport's reader, to tell a dead stream from a bad NAR
	r   *bufio.Reader
	w   *bufio.Writer
	opt Options

	server  Version
	err     error       // sticky: the error that broke the Conn
	pending []operation // requests sent whose replies are unread, oldest first
	closed  atomic.Bool
}

// HandshakeWithin is [Handshake] bounded by timeout and by ctx. A machine
// that opens the channel but never greets (a wedged nix-store, a login
// shell waiting for input) answers SSH keepalives, so only a deadline ends
// the wait. When the bound passes first, abort is called (it must unblock
// r, e.g. by closing the session) and the error says that no greeting came
// in time, or is ctx's cause when ctx ended.
func HandshakeWithin(ctx context.Context, timeout time.Duration, r io.Reader, w io.Writer, opt Options, abort func()) (*Conn, error) {
	hctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	stop := context.AfterFunc(hctx, abort)
	c, err := Handshake(r, w, opt)
	if stop() {
		return c, err
	}
	// abort ran: whatever Handshake returned, the session is going away.
	if ctx.Err() != nil {
		return nil, context.Cause(ctx)
	}
	return nil, &NoGreetingError{Timeout: timeout, Err: err}
}

// NoGreetingError is a [HandshakeWithin] whose timeout passed.
type NoGreetingError struct {
	Timeout time.Duration
	Err     error // what the aborted Handshake returned; may be nil
}

func (e *NoGreetingError) Error() string {
	if e.Err == nil {
		return fmt.Sprintf("no serve protocol greeting within %v", e.Timeout)
	}
	return fmt.Sprintf("no serve protocol greeting within %v: %v", e.Timeout, e.Err)
}

func (e *NoGreetingError) Unwrap() error { return e.Err }

// Handshake starts a session on a transport whose r is the server's stdout
// and w its stdin. It sends the magic 0x390c9deb and [ClientVersion],
// expects 0x5452eecb and the server's version, and accepts any server of
// major version 2. If the server sends something else first (a login shell
// printing text, a `command not found`), the error quotes what arrived.
//
// Handshake blocks until the server has sent 8 bytes or its stdout ends;
// a transport that needs a deadline closes the pipes when it passes. The
// Conn buffers r and w and flushes w after each request; it never closes
// either.
func Handshake(r io.Reader, w io.Writer, opt Options) (*Conn, error) {
	rr := &recordingReader{r: r}
	c := &Conn{rr: rr, r: bufio.NewReader(rr), w: bufio.NewWriter(w), opt: opt}
	h := &handshakeOp{}
	if err := c.do(h); err != nil {
		return nil, err
	}
	c.server = h.server
	return c, nil
}

// handshakeOp is the greeting exchange (nix 2.8.0 src/nix-store/nix-store.cc
// opServe, src/libstore/legacy-ssh-store.cc openConnection). It is no
// command: nothing precedes the magic.
type handshakeOp struct {
	server Version
}

func (*handshakeOp) name() string     { return "Handshake" }
func (*handshakeOp) command() command { return 0 }

func (*handshakeOp) writeRequest(e *encoder) error {
	e.Uint64(serveMagic1)
	e.Uint64(ClientVersion)
	return nil
}

func (h *handshakeOp) readReply(d *decoder) error {
	var magic [8]byte
	n, err := io.ReadFull(d.r, magic[:])
	if err == nil && binary.LittleEndian.Uint64(magic[:]) == serveMagic2 {
		v, err := d.uint32("server version")
		if err != nil {
			return err
		}
		h.server = Version(v)
		if v&0xff00 != serverMajor {
			return &ProtocolError{Op: d.op, Field: "server version",
				Err: fmt.Errorf("version %s (%#x): %w; this client speaks 2.x", h.server, v, ErrUnsupported)}
		}
		return nil
	}
	got := quoteGreeting(magic[:n], d.r)
	if err != nil {
		if n == 0 {
			return d.streamErr("magic", err)
		}
		return d.streamErr("magic", fmt.Errorf("got %s, then: %w", got, err))
	}
	return d.protoErr("magic", "the server did not speak the serve protocol; got %s", got)
}

// quoteGreeting quotes what the server sent instead of the magic, with
// whatever else is already buffered, without blocking for more.
func quoteGreeting(first []byte, r *bufio.Reader) string {
	b := bytes.Clone(first)
	if k := min(r.Buffered(), maxGreetingQuote-len(b)); k > 0 {
		more, _ := r.Peek(k)
		b = append(b, more...)
	}
	s := fmt.Sprintf("%q", b)
	if r.Buffered() > maxGreetingQuote-len(first) {
		s += " (truncated)"
	}
	return s
}

// ServerVersion returns the version the server announced.
func (c *Conn) ServerVersion() Version { return c.server }

// minor is the minor version that shapes messages: the server's, but at
// most ClientVersion's. Servers before Nix 2.23 never exceed 7; later ones
// use the smaller of both versions themselves.
func (c *Conn) minor() int { return min(c.server.Minor(), Version(ClientVersion).Minor()) }

// Err returns the error that broke the Conn, [ErrClosed] after Close, a
// [*PendingError] while replies of pipelined requests are unread, or nil
// while the Conn is usable.
func (c *Conn) Err() error {
	if err := c.broken(); err != nil {
		return err
	}
	if len(c.pending) > 0 {
		return c.pendingErr("")
	}
	return nil
}

// broken is the error that ends every use of the Conn, or nil.
func (c *Conn) broken() error {
	if c.err != nil {
		return c.err
	}
	if c.closed.Load() {
		return ErrClosed
	}
	return nil
}

// PendingError says that replies of requests sent ahead are still unread:
// the next bytes on the stream are theirs.
type PendingError struct {
	Op      string // the operation that could not run, or ""
	Pending []string
}

func (e *PendingError) Error() string {
	what := fmt.Sprintf("%d replies unread (%s)", len(e.Pending), strings.Join(e.Pending, ", "))
	if e.Op == "" {
		return "serveproto: " + what
	}
	return fmt.Sprintf("serveproto: %s: %s", e.Op, what)
}

func (c *Conn) pendingErr(op string) error {
	names := make([]string, len(c.pending))
	for i, p := range c.pending {
		names[i] = p.name()
	}
	return &PendingError{Op: op, Pending: names}
}

// Flush sends the requests written by the Send methods that are still in
// the buffer. Reading a reply flushes too; Flush is for letting the
// server start while the caller does something else first.
func (c *Conn) Flush() error {
	if err := c.broken(); err != nil {
		return err
	}
	if err := c.w.Flush(); err != nil {
		name := "request"
		if len(c.pending) > 0 {
			name = c.pending[len(c.pending)-1].name()
		}
		return c.fail(&StreamError{Op: name, Writing: true, Err: err})
	}
	return nil
}

// Close marks the Conn unusable. It closes nothing: the reader and writer
// belong to the transport.
//
// To cancel a build that is under way, close the transport's stdin (the
// writer given to Handshake; over ssh, the ssh process's stdin): the server
// watches its stdin for hang-up during BuildPaths and BuildDerivation,
// interrupts the build and exits without a reply (nix 2.8.0 MonitorFdHup in
// src/nix-store/nix-store.cc). Never half-close stdin while waiting for a
// reply for any other reason.
func (c *Conn) Close() error {
	c.closed.Store(true)
	return nil
}

// command is the u64 that starts every request (ServeCommand in nix 2.8.0
// src/libstore/serve-protocol.hh).
type command uint64

const (
	cmdQueryValidPaths command = 1
	cmdQueryPathInfos  command = 2
	cmdDumpStorePath   command = 3
	cmdImportPaths     command = 4
	cmdExportPaths     command = 5 // not used: removed from servers in Nix 2.32
	cmdBuildPaths      command = 6
	cmdQueryClosure    command = 7
	cmdBuildDerivation command = 8
	cmdAddToStoreNar   command = 9
)

// operation is one request and its reply. Each has a struct in ops.go or
// build.go holding the request's fields and the decoded reply.
type operation interface {
	name() string
	// command is the opcode sent first, or 0 for the handshake.
	command() command
	// writeRequest writes everything after the opcode. Transport errors
	// stay in the encoder; a returned error is one of the caller's side
	// (e.g. a NAR reader that failed).
	writeRequest(e *encoder) error
	readReply(d *decoder) error
}

// do runs one operation and keeps the Conn's state: on failure the Conn is
// broken, and stream errors pass through Options.Explain. It refuses to
// run while replies of pipelined requests are unread.
func (c *Conn) do(op operation) error {
	if err := c.Err(); err != nil {
		if errors.As(err, new(*PendingError)) {
			return c.pendingErr(op.name())
		}
		return err
	}
	if err := c.send(op); err != nil {
		return err
	}
	return c.receive(op)
}

// send writes op's request into the buffer, unflushed, and queues op for
// its reply. A request that could not be written whole breaks the Conn.
func (c *Conn) send(op operation) error {
	if err := c.broken(); err != nil {
		return err
	}
	e := wire.NewWriter(c.w)
	if cmd := op.command(); cmd != 0 {
		e.Uint64(uint64(cmd))
	}
	if err := op.writeRequest(e); err != nil || e.Err() != nil {
		if e.Err() == nil {
			// What the request copies (a NAR from elsewhere) failed, not
			// this stream: the machine has nothing to explain, and the
			// Conn is broken all the same, mid-request.
			return c.broke(err)
		}
		// The transport writer failed, whatever the NAR copy reported on
		// top of it.
		return c.fail(&StreamError{Op: op.name(), Writing: true, Err: e.Err()})
	}
	c.pending = append(c.pending, op)
	return nil
}

// receive flushes what is buffered and reads the reply of op, which must
// be the oldest one pending.
func (c *Conn) receive(op operation) error {
	if err := c.broken(); err != nil {
		return err
	}
	i := slices.Index(c.pending, op)
	switch {
	case i < 0:
		return fmt.Errorf("serveproto: %s: no such reply pending (read twice?)", op.name())
	case i > 0:
		return fmt.Errorf("serveproto: %s: reply read out of turn: %w", op.name(), c.pendingErr(""))
	}
	if err := c.w.Flush(); err != nil {
		return c.fail(&StreamError{Op: op.name(), Writing: true, Err: err})
	}
	c.pending = c.pending[1:]
	if err := op.readReply(&decoder{r: c.r, op: op.name()}); err != nil {
		return c.fail(err)
	}
	return nil
}

// fail breaks the Conn with err, explained by Options.Explain if it is
// a stream error.
func (c *Conn) fail(err error) error {
	var se *StreamError
	if c.opt.Explain != nil && errors.As(err, &se) {
		if e := c.opt.Explain(err); e != nil {
			err = e
		}
	}
	return c.broke(err)
}

// broke breaks the Conn with err as it is.
func (c *Conn) broke(err error) error {
	c.err = err
	c.pending = nil // their replies can no longer be read
	return err
}

// Reply is the reply to a request sent ahead by one of the Send methods.
type Reply[T any] struct {
	c      *Conn
	op     operation
	result func() T
	// check, if set, may fail a reply that was read whole (the Conn
	// stays usable).
	check func() error
}

// Read reads the reply, flushing what was sent before if it is still
// buffered. Replies are read in the order their requests were sent.
func (r *Reply[T]) Read() (T, error) {
	if err := r.c.receive(r.op); err != nil {
		var zero T
		return zero, err
	}
	if r.check != nil {
		if err := r.check(); err != nil {
			return r.result(), err
		}
	}
	return r.result(), nil
}

// call runs a Send method and reads its reply at once: the plain methods.
// It refuses to run while other replies are pending.
func call[T any](c *Conn, name string, send func() (*Reply[T], error)) (T, error) {
	var zero T
	if err := c.Err(); err != nil {
		if errors.As(err, new(*PendingError)) {
			return zero, c.pendingErr(name)
		}
		return zero, err
	}
	r, err := send()
	if err != nil {
		return zero, err
	}
	return r.Read()
}

func sendFor[T any](c *Conn, op operation, result func() T) (*Reply[T], error) {
	if err := c.send(op); err != nil {
		return nil, err
	}
	return &Reply[T]{c: c, op: op, result: result}, nil
}

// checkPaths validates store paths given by the caller, before anything is
// sent: a bad path would make the server exit.
func checkPaths(op, what string, paths []string) error {
	for _, p := range paths {
		if err := checkStorePath(p); err != nil {
			return fmt.Errorf("serveproto: %s: %s: %w", op, what, err)
		}
	}
	return nil
}

// seconds converts a duration to the whole seconds Nix takes, rounding up
// so that a positive duration never becomes 0 ("no limit").
func seconds(field string, d time.Duration) (uint64, error) {
	s := math.Ceil(d.Seconds())
	if s <= 0 {
		return 0, nil
	}
	if s > math.MaxUint32 {
		return 0, fmt.Errorf("%s: %v s exceeds %d s", field, s, uint64(math.MaxUint32))
	}
	return uint64(s), nil
}
