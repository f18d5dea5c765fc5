package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nix-offload/nix-offload/internal/testbed"
)

func TestMain(m *testing.M) {
	// No test may read this machine's /etc/nix/offload.toml: in-process, the default
	// configuration is a file that does not exist unless a test writes it.
	dir, err := os.MkdirTemp("", "nix-offload-hook-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defaultConfigPath = filepath.Join(dir, "offload.toml")
	code := m.Run()
	testbed.RemoveHookBinary()
	os.RemoveAll(dir)
	os.Exit(code)
}

// TestBrokerMustBeRootOrSelf: the hook takes outputs only from a broker run
// by root or by its own user; a socket anyone else serves is refused with
// the uid named.
func TestBrokerMustBeRootOrSelf(t *testing.T) {
	for _, tc := range []struct {
		uid, self uint32
		ok        bool
	}{
		{0, 0, true},
		{0, 1000, true},
		{1000, 1000, true},
		{65534, 0, false},
		{1000, 1001, false},
	} {
		err := trustBrokerUID(tc.uid, tc.self)
		if (err == nil) != tc.ok {
			t.Errorf("broker uid %d, hook uid %d: %v, want ok=%v", tc.uid, tc.self, err, tc.ok)
		}
		if err != nil && !strings.Contains(err.Error(), fmt.Sprintf("uid %d", tc.uid)) {
			t.Errorf("the refusal does not name the uid: %v", err)
		}
	}
}
