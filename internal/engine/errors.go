package engine

import (
	"errors"
	"io"
	"net"
	"os/exec"

	"github.com/nix-offload/nix-offload/internal/daemonproto"
	"github.com/nix-offload/nix-offload/internal/offload"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/sshconn"
	"github.com/nix-offload/nix-offload/internal/transport"
)

// LostError is an attempt whose machine was lost before any output was
// fetched: the connection, the link or the machine's nix-store went away.
// Another machine may finish the build.
type LostError struct {
	Machine string
	Err     error
}

func (e *LostError) Error() string { return e.Err.Error() }
func (e *LostError) Unwrap() error { return e.Err }

// LocalError marks a failure of the local store, which another machine
// would not fix. Local stores are reached through the same session types as
// a remote one and fail with the same error types, so callers wrap what
// their [offload.Local] returns in it.
type LocalError struct{ Err error }

func (e *LocalError) Error() string { return "local store: " + e.Err.Error() }
func (e *LocalError) Unwrap() error { return e.Err }

// RetryElsewhere is the one rule for moving a build: it reports whether err,
// from an attempt, means the machine was lost before any output was fetched
// ([*LostError]), so that another capable machine may do the build. Every
// other error is final for the build.
func RetryElsewhere(err error) bool {
	var lost *LostError
	return errors.As(err, &lost)
}

// streamLost reports whether err from [offload.Run] shows the session's
// stream ending under it: the machine, the link or nix-store went away.
func streamLost(err error) bool {
	var re *transport.RemoteError
	var se *serveproto.StreamError
	var dse *daemonproto.StreamError
	return errors.As(err, &re) || errors.As(err, &se) || errors.As(err, &dse) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
}

// exitCommandNotFound is the status a shell gives a command it cannot find.
const exitCommandNotFound = "exit status 127"

// Permanent reports whether err, from connecting to a machine, says that
// the machine cannot serve until someone changes the configuration: its
// host key does not match or is unknown ([*sshconn.HostKeyError]), its
// name does not resolve, it refused our keys ([*sshconn.AuthError]), or it
// has no nix-store (the serve command was not found). Refused, timed out
// and lost connections are transient: the machine may come back by itself.
func Permanent(err error) bool {
	var hk *sshconn.HostKeyError
	var auth *sshconn.AuthError
	var dns *net.DNSError
	var re *transport.RemoteError
	var ee *exec.ExitError
	switch {
	case errors.As(err, &hk), errors.As(err, &auth):
		return true
	case errors.As(err, &dns):
		return dns.IsNotFound
	case errors.As(err, &re):
		return re.Exit == exitCommandNotFound
	case errors.As(err, &ee):
		return ee.ExitCode() == 127
	}
	return false
}

// TimedOut reports whether a build failed because max-silent-time or
// timeout passed: on the machine, or enforced here ([*LimitError]).
func TimedOut(err error) bool {
	var le *LimitError
	var be *offload.BuildError
	return errors.As(err, &le) || errors.As(err, &be) && be.TimedOut()
}

// BuildFailed reports whether the build ran on the machine and failed
// there (a timeout included).
func BuildFailed(err error) bool {
	var be *offload.BuildError
	return errors.As(err, &be)
}
