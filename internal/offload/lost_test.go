package offload

import (
	"errors"
	"fmt"
	"io"
	"testing"

	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/transport"
)

// A lost connection is retried elsewhere; a build that failed on the
// machine, or a refused argument, is not.
func TestMachineLost(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		lost bool
	}{
		{"remote process gone", fmt.Errorf("build: %w", &transport.RemoteError{Name: "b1", Err: io.EOF, Exit: "exit status 255"}), true},
		{"reply cut", &serveproto.StreamError{Op: "BuildDerivation", Field: "status", Err: io.ErrUnexpectedEOF}, true},
		{"bare EOF", fmt.Errorf("copying outputs: %w", io.EOF), true},
		{"build failed there", &BuildError{DrvPath: "/nix/store/x.drv", Machine: "b1", Status: serveproto.PermanentFailure}, false},
		{"other", errors.New("drv has no outputs"), false},
		{"nil", nil, false},
	} {
		if got := MachineLost(tc.err); got != tc.lost {
			t.Errorf("%s: MachineLost(%v) = %v, want %v", tc.name, tc.err, got, tc.lost)
		}
	}
}
