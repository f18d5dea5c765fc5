package broker

import (
	"os"
	"testing"

	"go.uber.org/goleak"
)

// Every goroutine a Broker starts (the dispatcher, the warm-up, builds,
// client watchers) must be gone when the tests end. The socket test's
// helper process, run as another user, only makes one request.
func TestMain(m *testing.M) {
	if os.Getenv(socketHelperEnv) != "" {
		os.Exit(m.Run())
	}
	goleak.VerifyTestMain(m)
}
