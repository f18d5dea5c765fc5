package servetest

import (
	"testing"

	"go.uber.org/goleak"
)

// Every session goroutine, of pipes and of the SSH server, must be gone
// when a test ends.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
