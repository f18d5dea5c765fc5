package testbed

import "time"

// WaitFor polls cond every 20 ms until it holds, and fails the test when
// it has not held within limit. The limit only keeps a broken build or host
// from hanging a test run: it is not a timing assertion.
func WaitFor(tb TB, limit time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out after %v waiting for %s", limit, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
