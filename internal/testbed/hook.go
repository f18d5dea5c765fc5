package testbed

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
)

var hookBin struct {
	once sync.Once
	path string
	err  error
}

// HookBinary builds nix-offload-hook once per process, statically (CGO
// off), so that the same binary runs on the host and inside the Nix 2.26
// and 2.34 roots, and returns its path. A test binary that calls it should
// call [RemoveHookBinary] from TestMain.
func HookBinary(tb TB) string {
	tb.Helper()
	goCmd := GoTool(tb)
	hookBin.once.Do(func() {
		dir, err := os.MkdirTemp("", "nix-offload-hook-bin-")
		if err != nil {
			hookBin.err = err
			return
		}
		path := filepath.Join(dir, "nix-offload-hook")
		cmd := exec.Command(goCmd, "build", "-o", path, "github.com/nix-offload/nix-offload/cmd/nix-offload-hook")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			os.RemoveAll(dir)
			hookBin.err = fmt.Errorf("testbed: building nix-offload-hook: %v\n%s", err, out)
			return
		}
		hookBin.path = path
	})
	if hookBin.err != nil {
		tb.Fatalf("%v", hookBin.err)
	}
	return hookBin.path
}

// RemoveHookBinary removes what [HookBinary] built, if anything.
func RemoveHookBinary() {
	if hookBin.path != "" {
		os.RemoveAll(filepath.Dir(hookBin.path))
	}
}
