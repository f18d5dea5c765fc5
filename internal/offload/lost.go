package offload

import (
	"errors"
	"io"

	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/transport"
)

// MachineLost reports whether err from [Run] means that the connection to
// the machine, or its nix-store, went away: the build did not fail there,
// and another machine may finish it. The hook and the broker retry on this.
// A local store reached through a transport session fails with the same
// error types; callers that care mark local failures themselves.
func MachineLost(err error) bool {
	var re *transport.RemoteError
	var se *serveproto.StreamError
	return errors.As(err, &re) || errors.As(err, &se) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
}
