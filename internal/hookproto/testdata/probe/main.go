// Command probe is a build hook for TestRealCapture: it reads the settings
// block and one request with hookproto, records them (and the raw bytes)
// next to its own executable, says hello through a hookproto.Logger and
// replies `# decline-permanently`.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"

	"github.com/nix-offload/nix-offload/internal/hookproto"
)

// Capture is what the probe records, as capture.json.
type Capture struct {
	Argv     []string
	Fds      map[int]bool // fd → open
	Settings hookproto.Settings
	Request  *hookproto.Request
	Err      string `json:",omitempty"`
}

func main() {
	exe, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, "probe:", err)
		os.Exit(1)
	}
	dir := filepath.Dir(exe)
	c := Capture{Argv: os.Args, Fds: map[int]bool{}}
	for _, fd := range []int{0, 1, 2, 3, 4, 5} {
		var st syscall.Stat_t
		c.Fds[fd] = syscall.Fstat(fd, &st) == nil
	}

	var raw bytes.Buffer
	in := io.TeeReader(os.Stdin, &raw)
	c.Settings, err = hookproto.ReadSettings(in)
	if err == nil {
		c.Request, err = hookproto.ReadRequest(in)
	}
	if err != nil {
		c.Err = err.Error()
	}
	j, _ := json.MarshalIndent(c, "", "\t")
	os.WriteFile(filepath.Join(dir, "capture.bin"), raw.Bytes(), 0o644)
	os.WriteFile(filepath.Join(dir, "capture.json"), j, 0o644)

	l := hookproto.NewLogger(os.Stderr)
	l.Msg(hookproto.LvlError, "probe: hello from the hook")
	if id, err := l.Start(hookproto.ActBuildWaiting, hookproto.LvlInfo, "probe: waiting", "x"); err == nil {
		l.Result(id, hookproto.ResProgress, 1, 2, 0, 0)
		l.Stop(id)
	}
	hookproto.DeclinePermanently(os.Stderr)
}
