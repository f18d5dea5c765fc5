package pool

import (
	"testing"

	"go.uber.org/goleak"
)

// Every goroutine of every pool (dials, starts, watchers, the tidy loop,
// session closers) and of its connections must be gone when the tests end.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
