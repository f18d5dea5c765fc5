package offload

import (
	"os"
	"testing"

	"github.com/nix-offload/nix-offload/internal/testbed"
)

func TestMain(m *testing.M) {
	code := m.Run()
	testbed.RemoveHookBinary()
	os.Exit(code)
}
