package daemonproto

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nix-offload/nix-offload/internal/wire"
)

// Handshake constants (nix 2.8.0 src/libstore/worker-protocol.hh).
const (
	workerMagic1 = 0x6e697863 // "cxin": client → daemon
	workerMagic2 = 0x6478696f // "oixd": daemon → client

	// ClientVersion is the protocol version this client announces: 1.38,
	// the newest any Nix speaks (2.24–2.35). Both sides then use the
	// smaller of the two versions.
	ClientVersion Version = 1<<8 | 38

	// MinVersion is the oldest daemon protocol this client speaks: 1.34,
	// Nix 2.8. It has everything the build path needs: the substitute
	// flag of QueryValidPaths (1.27), structured errors (1.26), framed
	// AddMultipleToStore (1.32), the Nix version string (1.33) and
	// BuildPathsWithResults (1.34).
	MinVersion Version = 1<<8 | 34
)

// Version is a worker protocol version: the major version in bits 8–15,
// the minor in bits 0–7.
type Version uint64

// Major returns the major version, 1 for every Nix.
func (v Version) Major() int { return int(v>>8) & 0xff }

// Minor returns the minor version; see the package documentation for what
// each one adds.
func (v Version) Minor() int { return int(v) & 0xff }

func (v Version) String() string { return fmt.Sprintf("%d.%d", v.Major(), v.Minor()) }

// Trust is what the daemon says of the connecting user in the handshake
// (protocol 1.35+; nix 2.34.8 src/libstore/worker-protocol.cc
// Serialise<std::optional<TrustedFlag>>).
type Trust uint64

const (
	// TrustUnknown: the daemon does not say (before 1.35, Nix 2.8–2.14).
	// Nix's build-remote treats it as trusted, and so does [Conn].
	TrustUnknown Trust = 0
	// Trusted: the user is in trusted-users (root over `nix-daemon --stdio`
	// without a running daemon is always trusted).
	Trusted Trust = 1
	// NotTrusted: the daemon checks signatures on every upload and builds
	// only content-addressed derivations with BuildDerivation.
	NotTrusted Trust = 2
)

func (t Trust) String() string {
	switch t {
	case TrustUnknown:
		return "unknown"
	case Trusted:
		return "trusted"
	case NotTrusted:
		return "not trusted"
	}
	return fmt.Sprintf("Trust(%d)", uint64(t))
}

// Options configure a [Conn].
type Options struct {
	// Log receives every log message the daemon sends while an operation
	// runs (the handshake included), in order, on the caller's goroutine.
	// Build output arrives as [ResultBuildLogLine] results of the build's
	// activity. Nil drops them. Log must not block for long: while it
	// blocks, the daemon's output backs up and the build stalls.
	Log func(Message)
	// Abort, when set, is called once when the context of an operation
	// ends before the operation does. It must unblock the pending read or
	// write, by closing the transport (for `nix-daemon --stdio` over SSH,
	// the session). The operation then returns the context's cause in a
	// [*StreamError] and the Conn is broken. Without Abort, contexts are
	// checked only between operations.
	Abort func()
	// Explain, when set, is called with the error of any read or write
	// that failed on the stream (always a [*StreamError]); its result
	// replaces that error, e.g. with the remote's stderr and exit status.
	// nil keeps err.
	Explain func(err error) error
}

// Conn is the client side of one daemon protocol connection (usually
// `nix-daemon --stdio` over SSH).
//
// Operations run one at a time: a Conn is not safe for concurrent use,
// except that [Conn.Close] may be called at any time. After an operation
// fails with anything but an argument error, a [*RemoteError] or an
// [*UntrustedError], the stream may be out of step, so the Conn is broken:
// every later call returns the same error at once.
type Conn struct {
	rr  *recordingReader
	r   *bufio.Reader
	w   *bufio.Writer
	opt Options

	version       Version // negotiated: min(daemon's, ClientVersion)
	daemonVersion Version // as the daemon announced it
	nixVersion    string
	trust         Trust
	features      []string // offered by the daemon

	err    error // sticky: the error that broke the Conn
	closed atomic.Bool
}

// Handshake opens a connection on a transport whose r is the daemon's
// stdout and w its stdin (nix 2.34.8
// src/libstore/worker-protocol-connection.cc BasicClientConnection
// handshake and postHandshake):
//
//  1. send magic 0x6e697863 and [ClientVersion]; read magic 0x6478696f
//     and the daemon's version, which must be 1.x with x ≥ 34;
//  2. from 1.38, send an empty feature list and read the daemon's;
//  3. send cpu affinity 0 and reserveSpace 0;
//  4. read the daemon's Nix version (1.33+) and trust flag (1.35+);
//  5. read log messages up to STDERR_LAST.
//
// If the daemon sends something else first (a login shell printing text,
// `command not found`), the error quotes what arrived. ctx bounds the
// whole exchange through [Options.Abort].
func Handshake(ctx context.Context, r io.Reader, w io.Writer, opt Options) (*Conn, error) {
	rr := &recordingReader{r: r}
	c := &Conn{rr: rr, r: bufio.NewReader(rr), w: bufio.NewWriter(w), opt: opt}
	h := &handshakeOp{}
	if err := c.do(ctx, h); err != nil {
		return nil, err
	}
	return c, nil
}

// HandshakeWithin is [Handshake] bounded by timeout as well as by ctx: a
// machine that opens the channel but never greets (a wedged nix-daemon, a
// login shell waiting for input) answers SSH keepalives, so only a
// deadline ends the wait. When the bound passes, opt.Abort is called and
// the error is a [*NoGreetingError], or ctx's cause when ctx ended.
func HandshakeWithin(ctx context.Context, timeout time.Duration, r io.Reader, w io.Writer, opt Options) (*Conn, error) {
	hctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := Handshake(hctx, r, w, opt)
	if err == nil || hctx.Err() == nil {
		return c, err
	}
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
	return fmt.Sprintf("no daemon protocol greeting within %v: %v", e.Timeout, e.Err)
}

func (e *NoGreetingError) Unwrap() error { return e.Err }

// handshakeOp is the greeting (no opcode precedes the magic).
type handshakeOp struct{}

func (*handshakeOp) name() string   { return "Handshake" }
func (*handshakeOp) opcode() uint64 { return 0 }

// The handshake is written in steps by readReply: what the client sends
// after the versions depends on the negotiated one.
func (*handshakeOp) writeRequest(c *Conn, e *wire.Writer) error {
	e.Uint64(workerMagic1)
	e.Uint64(uint64(ClientVersion))
	return nil
}

func (*handshakeOp) readReply(c *Conn, d *decoder) error {
	var magic [8]byte
	n, err := io.ReadFull(d.r, magic[:])
	if err != nil || binary.LittleEndian.Uint64(magic[:]) != workerMagic2 {
		got := quoteGreeting(magic[:n], d.r)
		if err != nil {
			if n == 0 {
				return d.streamErr("magic", err)
			}
			return d.streamErr("magic", fmt.Errorf("got %s, then: %w", got, err))
		}
		return d.protoErr("magic", "the machine did not speak the daemon protocol; got %s", got)
	}
	v, err := d.max("daemon version", 0xffff)
	if err != nil {
		return err
	}
	c.daemonVersion = Version(v)
	if c.daemonVersion.Major() != 1 || c.daemonVersion < MinVersion {
		return d.protoErr("daemon version", "version %s (%#x): %w; this client speaks 1.34 (Nix 2.8) to 1.38",
			c.daemonVersion, v, ErrUnsupported)
	}
	c.version = min(c.daemonVersion, ClientVersion)

	e := wire.NewWriter(c.w)
	if c.version.Minor() >= 38 {
		e.Strings(nil) // no features offered
		if err := e.Flush(); err != nil {
			return &StreamError{Op: d.op, Writing: true, Field: "features", Err: err}
		}
		if c.features, err = d.strs("features", "feature", MaxFeatures, MaxFeatureLen); err != nil {
			return err
		}
	}
	e.Uint64(0)   // cpu affinity: none (1.14+)
	e.Bool(false) // reserveSpace (1.11+)
	if err := e.Flush(); err != nil {
		return &StreamError{Op: d.op, Writing: true, Field: "cpu affinity", Err: err}
	}
	if c.nixVersion, err = d.str("nix version", MaxVersionLen); err != nil {
		return err
	}
	if c.version.Minor() >= 35 {
		t, err := d.max("trust", 2)
		if err != nil {
			return err
		}
		c.trust = Trust(t)
	}
	return c.stderr(d)
}

// quoteGreeting quotes what the daemon sent instead of the magic, with
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

// Version returns the protocol version in use: the smaller of the
// daemon's and [ClientVersion].
func (c *Conn) Version() Version { return c.version }

// DaemonVersion returns the protocol version the daemon announced.
func (c *Conn) DaemonVersion() Version { return c.daemonVersion }

// NixVersion returns the daemon's Nix version string ("2.34.8").
func (c *Conn) NixVersion() string { return c.nixVersion }

// Trust returns what the daemon said of the user's trust; [TrustUnknown]
// before protocol 1.35.
func (c *Conn) Trust() Trust { return c.trust }

// Features returns the features both sides share; always empty, since
// this client offers none.
func (c *Conn) Features() []string { return nil }

// DaemonFeatures returns the features the daemon offered (protocol 1.38),
// for reports such as `check`.
func (c *Conn) DaemonFeatures() []string { return c.features }

// Err returns the error that broke the Conn, [ErrClosed] after Close, or
// nil while the Conn is usable.
func (c *Conn) Err() error {
	if c.err != nil {
		return c.err
	}
	if c.closed.Load() {
		return ErrClosed
	}
	return nil
}

// Close marks the Conn unusable. It closes nothing: the reader and writer
// belong to the transport. To cancel a build under way, close the
// transport (or let [Options.Abort] do it): the daemon notices its stdin
// hang up and stops the build (nix 2.8.0 src/libstore/daemon.cc
// MonitorFdHup around every operation).
func (c *Conn) Close() error {
	c.closed.Store(true)
	return nil
}

// operation is one request and its reply. Each has a struct in ops.go
// holding the request's fields and the decoded reply.
type operation interface {
	name() string
	// opcode is the u64 sent first, or 0 for the handshake.
	opcode() uint64
	// writeRequest writes everything after the opcode. Transport errors
	// stay in the writer; a returned error is one of the caller's side
	// (e.g. a NAR reader that failed).
	writeRequest(c *Conn, e *wire.Writer) error
	// readReply reads the log messages up to STDERR_LAST (with c.stderr)
	// and then the reply.
	readReply(c *Conn, d *decoder) error
}

// do runs one operation and keeps the Conn's state: on failure the Conn is
// broken (except after a RemoteError), and stream errors pass through
// Options.Explain. ctx bounds the whole operation through Options.Abort.
func (c *Conn) do(ctx context.Context, op operation) error {
	if err := c.Err(); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("daemonproto: %s: %w", op.name(), context.Cause(ctx))
	}
	var aborted struct {
		sync.Mutex
		cause error
	}
	abortErr := func() error {
		aborted.Lock()
		defer aborted.Unlock()
		return aborted.cause
	}
	if c.opt.Abort != nil {
		stop := context.AfterFunc(ctx, func() {
			aborted.Lock()
			aborted.cause = context.Cause(ctx)
			aborted.Unlock()
			c.opt.Abort()
		})
		defer stop()
	}
	e := wire.NewWriter(c.w)
	if code := op.opcode(); code != 0 {
		e.Uint64(code)
	}
	err := op.writeRequest(c, e)
	if err == nil {
		err = e.Flush()
	}
	if err != nil {
		if e.Err() == nil {
			// What the request copies (a NAR from elsewhere) failed, not
			// this stream: the daemon has nothing to explain, and the
			// Conn is broken all the same, mid-request.
			c.err = err
			return err
		}
		// The transport failed, whatever the NAR copy reported on top.
		werr := e.Err()
		if cause := abortErr(); cause != nil {
			werr = fmt.Errorf("%w (the transport was closed: %w)", cause, werr)
		}
		return c.fail(&StreamError{Op: op.name(), Writing: true, Err: werr})
	}
	err = op.readReply(c, newDecoder(c.r, op.name(), abortErr))
	if cause := abortErr(); err == nil && cause != nil {
		// The reply arrived as the context ended: the transport is
		// closed under the Conn all the same.
		err = &StreamError{Op: op.name(), Err: fmt.Errorf("%w (the transport was closed)", cause)}
	}
	var re *RemoteError
	if errors.As(err, &re) && op.opcode() != 0 {
		return err // in band: the daemon serves the next request
	}
	if err != nil {
		return c.fail(err)
	}
	return nil
}

func (c *Conn) fail(err error) error {
	var se *StreamError
	if c.opt.Explain != nil && errors.As(err, &se) {
		if e := c.opt.Explain(err); e != nil {
			err = e
		}
	}
	c.err = err
	return err
}
