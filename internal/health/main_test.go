package health

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

// The test binary doubles as the other process of TestFailuresFromTwoProcesses: with helperEnv
// set it runs helperMain instead of the tests (the os/exec TestHelperProcess pattern).
const (
	helperEnv  = "NIX_OFFLOAD_HEALTH_TEST_HELPER" // the state file
	helperJobs = "NIX_OFFLOAD_HEALTH_TEST_JOBS"   // how many failures to record
)

func TestMain(m *testing.M) {
	if path := os.Getenv(helperEnv); path != "" {
		os.Exit(helperMain(path))
	}
	goleak.VerifyTestMain(m)
}

// helperMain says "ready", waits for a line on stdin, records one failure of each of the
// machines h0, h1, … and says "done".
func helperMain(path string) int {
	fail := func(err error) int {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 2
	}
	jobs, err := strconv.Atoi(os.Getenv(helperJobs))
	if err != nil {
		return fail(err)
	}
	t, err := Open(path)
	if err != nil {
		return fail(err)
	}
	fmt.Println("ready")
	if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
		return fail(err)
	}
	for i := range jobs {
		if _, err := t.Failed(fmt.Sprintf("h%d", i), errors.New("helper failure")); err != nil {
			return fail(err)
		}
	}
	fmt.Println("done")
	return 0
}

// startHelper runs helperMain on path and returns once it is ready; go starts its failures
// and wait waits for it to finish them.
func startHelper(t *testing.T, path string, jobs int) (start func(), wait func()) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	// GORACE: a race-enabled child would otherwise sleep 1 s before exiting.
	cmd.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=0", helperEnv+"="+path, helperJobs+"="+strconv.Itoa(jobs))
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
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	out := bufio.NewReader(stdout)
	expect := func(want string) {
		t.Helper()
		line, err := out.ReadString('\n')
		if got := strings.TrimSuffix(line, "\n"); err != nil || got != want {
			t.Fatalf("helper said %q (%v), want %q", got, err, want)
		}
	}
	expect("ready")
	start = func() {
		if _, err := stdin.Write([]byte("go\n")); err != nil {
			t.Fatal(err)
		}
	}
	wait = func() {
		t.Helper()
		expect("done")
		stdin.Close()
		if err := cmd.Wait(); err != nil {
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				t.Fatalf("helper: %v", err)
			}
			t.Fatal(err)
		}
	}
	return start, wait
}
