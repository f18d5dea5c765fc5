package transport

import (
	"testing"

	"go.uber.org/goleak"
)

// Every goroutine the package starts must be gone when the tests end.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
