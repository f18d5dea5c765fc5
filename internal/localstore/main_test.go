package localstore

import (
	"testing"

	"go.uber.org/goleak"
)

// Every read session (its stderr and wait goroutines) and every fetch
// goroutine of AddOutputs must be gone when a test ends.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
