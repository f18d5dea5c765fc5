package daemonproto

import (
	"errors"
	"fmt"
	"strings"
)

// ProtocolError reports bytes from the daemon that break the protocol: a
// wrong magic, a count or length above its limit, non-zero padding, a bool
// that is neither 0 nor 1, an unknown stderr message, a malformed store
// path, realisation or NAR. The stream is out of step afterwards, so the
// [Conn] is broken.
type ProtocolError struct {
	// Op is the operation whose reply was malformed ("Handshake",
	// "QueryValidPaths", …).
	Op string
	// Field names the part of the reply, e.g. "path 3" or
	// "stderr: START_ACTIVITY: fields: count".
	Field string
	Err   error
}

func (e *ProtocolError) Error() string {
	return fmt.Sprintf("daemonproto: %s reply: %s: %v", e.Op, e.Field, e.Err)
}

func (e *ProtocolError) Unwrap() error { return e.Err }

// StreamError reports a read or write on the transport that failed: the
// daemon's stdout ended (io.ErrUnexpectedEOF), the pipe broke, or the
// transport was closed because the caller's context ended (then Err wraps
// the context's cause). [Options.Explain] is called with a *StreamError
// so the transport can attach the remote's stderr and exit status. The
// [Conn] is broken.
type StreamError struct {
	Op string
	// Writing is true when the request could not be sent, false when the
	// reply could not be read.
	Writing bool
	// Field names the part of the message being transferred; it may be "".
	Field string
	Err   error
}

func (e *StreamError) Error() string {
	dir := "reply"
	if e.Writing {
		dir = "request"
	}
	if e.Field == "" {
		return fmt.Sprintf("daemonproto: %s %s: %v", e.Op, dir, e.Err)
	}
	return fmt.Sprintf("daemonproto: %s %s: %s: %v", e.Op, dir, e.Field, e.Err)
}

func (e *StreamError) Unwrap() error { return e.Err }

// RemoteError is an error the daemon reported in band (STDERR_ERROR): the
// operation failed on the daemon ("path … is not valid", "you are not
// privileged to build input-addressed derivations", a hash mismatch on
// upload). The daemon goes on serving the connection, so the [Conn] stays
// usable, except after an error in the handshake.
type RemoteError struct {
	Op string
	// Msg is the daemon's message with ANSI escapes removed.
	Msg string
	// Traces are the error's trace lines, innermost last, ANSI removed.
	Traces []string
	// Level is the error's verbosity level (0, lvlError, for errors).
	Level uint64
	// ExitStatus is the status a daemon before protocol 1.26 sends; 0 for
	// structured errors.
	ExitStatus uint64
}

func (e *RemoteError) Error() string {
	msg := strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(e.Msg), "error:"))
	return fmt.Sprintf("daemonproto: %s: the daemon reported: %s", e.Op, msg)
}

// UntrustedError is a request the daemon would refuse because the SSH
// user is not trusted there (handshake trust flag 2, protocol 1.35+):
// building an input-addressed derivation with BuildDerivation. It is
// reported before anything is sent and leaves the Conn usable. It wraps
// [ErrNotTrusted].
type UntrustedError struct {
	Op, DrvPath string
}

func (e *UntrustedError) Error() string {
	return fmt.Sprintf("daemonproto: %s %s: the remote user is not trusted by the machine's nix-daemon, "+
		"which builds only content-addressed derivations for untrusted users: %v\n"+
		"hint: add the SSH user to trusted-users in the machine's nix.conf, or build with BuildPathsWithResults after copying the .drv closure",
		e.Op, e.DrvPath, ErrNotTrusted)
}

func (e *UntrustedError) Unwrap() error { return ErrNotTrusted }

var (
	// ErrUnsupported is wrapped when the daemon's protocol version is
	// older than 1.34 (Nix 2.8) or of another major version.
	ErrUnsupported = errors.New("not supported by the daemon's protocol version")

	// ErrNotTrusted is wrapped by [*UntrustedError].
	ErrNotTrusted = errors.New("not a trusted user")

	// ErrClosed is returned by every operation after [Conn.Close].
	ErrClosed = errors.New("daemonproto: connection closed")
)
