//go:build unix

package hookproto

import (
	"fmt"
	"os"
	"syscall"
)

// BuildLogFD is the descriptor Nix gives the hook for the build log: the
// write end of the pipe whose read end it polls after `# accept`. Nix also
// passes that read end as fd 5 (for its own hook to read ssh's errors);
// a hook that does not read it should close it.
const BuildLogFD = 4

// OpenBuildLogFD returns fd (normally [BuildLogFD]) as an *os.File for
// [NewBuildLog]: close-on-exec, so that children such as ssh do not hold
// the pipe, and non-blocking, so that the Go runtime polls it and a write
// the reader never takes can be abandoned with a deadline. The
// non-blocking flag is set on the pipe's open file description, which Nix
// holds too but never writes to.
func OpenBuildLogFD(fd int) (*os.File, error) {
	syscall.CloseOnExec(fd)
	if err := syscall.SetNonblock(fd, true); err != nil {
		return nil, fmt.Errorf("hookproto: build log fd %d: %w", fd, os.NewSyscallError("fcntl", err))
	}
	return os.NewFile(uintptr(fd), "build-log"), nil
}
