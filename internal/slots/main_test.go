package slots

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/nix-offload/nix-offload/internal/machines"
	"go.uber.org/goleak"
)

// The test binary doubles as the other process of the cross-process tests: with helperEnv set
// it runs helperMain instead of the tests (the os/exec TestHelperProcess pattern).
const (
	helperEnv = "NIX_OFFLOAD_SLOTS_TEST_HELPER" // mode: "hold" or "lock"
	dirEnv    = "NIX_OFFLOAD_SLOTS_TEST_DIR"
	hostEnv   = "NIX_OFFLOAD_SLOTS_TEST_HOST"
	jobsEnv   = "NIX_OFFLOAD_SLOTS_TEST_JOBS"
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(helperEnv); mode != "" {
		os.Exit(helperMain(mode))
	}
	goleak.VerifyTestMain(m)
}

// helperMain talks to the parent in lines on stdout and exits when its stdin ends:
//
//	hold: takes a slot of the machine → "held <index>"; releases it at stdin EOF.
//	lock: takes the main lock → "busy" first if it had to wait, then "locked"; unlocks at EOF.
func helperMain(mode string) int {
	fail := func(err error) int {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 2
	}
	d, err := Open(os.Getenv(dirEnv))
	if err != nil {
		return fail(err)
	}
	switch mode {
	case "hold":
		jobs, err := strconv.Atoi(os.Getenv(jobsEnv))
		if err != nil {
			return fail(err)
		}
		m := machines.Machine{Host: os.Getenv(hostEnv), ParallelBuilds: jobs}
		unlock, err := d.Lock(context.Background())
		if err != nil {
			return fail(err)
		}
		s, ok, err := d.Acquire(m)
		unlock()
		if err != nil {
			return fail(err)
		}
		if !ok {
			return fail(fmt.Errorf("no free slot of %s", m.Name()))
		}
		fmt.Printf("held %d\n", s.Index())
		io.Copy(io.Discard, os.Stdin)
		if err := s.Release(); err != nil {
			return fail(err)
		}
	case "lock":
		var once sync.Once
		testOnlyLockBusy = func() { once.Do(func() { fmt.Println("busy") }) }
		unlock, err := d.Lock(context.Background())
		if err != nil {
			return fail(err)
		}
		fmt.Println("locked")
		io.Copy(io.Discard, os.Stdin)
		unlock()
	default:
		return fail(fmt.Errorf("unknown mode %q", mode))
	}
	return 0
}

// helper is a running helperMain process.
type helper struct {
	t     *testing.T
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Reader
}

// startHelper runs helperMain in mode on dir, for machine host with jobs slots.
func startHelper(t *testing.T, mode, dir, host string, jobs int) *helper {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	// GORACE: a race-enabled child would otherwise sleep 1 s before exiting.
	cmd.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=0", helperEnv+"="+mode, dirEnv+"="+dir, hostEnv+"="+host, jobsEnv+"="+strconv.Itoa(jobs))
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	h := &helper{t: t, cmd: cmd, stdin: stdin, out: bufio.NewReader(stdout)}
	t.Cleanup(func() {
		if h.cmd.ProcessState == nil {
			h.cmd.Process.Kill()
			h.cmd.Wait()
		}
	})
	return h
}

// expect reads the helper's next line and fails the test unless it is want.
func (h *helper) expect(want string) {
	h.t.Helper()
	line, err := h.out.ReadString('\n')
	if got := strings.TrimSuffix(line, "\n"); err != nil || got != want {
		h.t.Fatalf("helper said %q (%v), want %q", got, err, want)
	}
}

// finish closes the helper's stdin and waits for it to exit cleanly.
func (h *helper) finish() {
	h.t.Helper()
	h.stdin.Close()
	if err := h.cmd.Wait(); err != nil {
		h.t.Fatalf("helper: %v", err)
	}
}
