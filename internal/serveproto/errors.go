package serveproto

import (
	"errors"
	"fmt"
)

// ProtocolError reports bytes from the server that break the protocol: a
// wrong magic, a count or length above its limit, non-zero padding, a bool
// that is neither 0 nor 1, a malformed store path or realisation. The stream
// is out of step afterwards, so the [Conn] is broken.
type ProtocolError struct {
	// Op is the operation whose reply was malformed ("Handshake",
	// "QueryValidPaths", …).
	Op string
	// Field names the part of the reply, e.g. "path 3" or "builtOutputs: count".
	Field string
	Err   error
}

func (e *ProtocolError) Error() string {
	return fmt.Sprintf("serveproto: %s reply: %s: %v", e.Op, e.Field, e.Err)
}

func (e *ProtocolError) Unwrap() error { return e.Err }

// StreamError reports a read or write on the transport that failed: the
// server closed its stdout (io.ErrUnexpectedEOF), the pipe broke, the NAR in
// a reply was cut short. With the serve protocol this is also how the server
// reports every error of its own: it prints "error: …" on its stderr and
// exits. [Options.Explain] is called with a *StreamError so the transport
// can attach that text. The [Conn] is broken.
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
		return fmt.Sprintf("serveproto: %s %s: %v", e.Op, dir, e.Err)
	}
	return fmt.Sprintf("serveproto: %s %s: %s: %v", e.Op, dir, e.Field, e.Err)
}

func (e *StreamError) Unwrap() error { return e.Err }

// BuildPathsError is the in-band failure reply of [Conn.BuildPaths]. The
// stream stays in step: the Conn remains usable.
type BuildPathsError struct {
	// Status is the remote worker's exit status: 1 for a generic failure,
	// else 0x60 with bits 0x04 (build failure), 0x01 (timeout), 0x02 (hash
	// mismatch), 0x08 (check mismatch); nix 2.8.0
	// src/libstore/build/worker.cc Worker::exitStatus.
	Status uint64
	// Msg is the server's message with ANSI escapes removed.
	Msg string
}

func (e *BuildPathsError) Error() string {
	return fmt.Sprintf("serveproto: BuildPaths: remote build failed with status %d: %s", e.Status, e.Msg)
}

var (
	// ErrUnsupported is wrapped when the server's protocol version is too
	// old for an operation (AddToStoreNar before 2.5) or has an unknown
	// major version. The Conn stays usable in the first case.
	ErrUnsupported = errors.New("not supported by the server's protocol version")

	// ErrClosed is returned by every operation after [Conn.Close].
	ErrClosed = errors.New("serveproto: connection closed")
)
