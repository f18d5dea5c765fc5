package nar

import (
	"testing"

	"go.uber.org/goleak"
)

// The reader must not start goroutines; go-nix's Writer, used to build
// fixtures, stops its own on Close.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
