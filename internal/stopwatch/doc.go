// Package stopwatch records when the steps of one short-lived process
// happened, for an operator or a benchmark that asks, and costs nothing
// otherwise.
//
// The build hook is one process per derivation on nix-daemon's critical
// path, and what it spends between its start and `# accept`, and between
// the first byte of an output and its exit, adds up over a graph. To see
// where that time goes without a tracer (strace or perf slow every step
// they watch), set
//
//	NIX_OFFLOAD_HOOK_TIMES=/some/file.jsonl
//
// in nix-daemon's environment (or nix-build's, which starts the hook
// itself on a local store): every hook process then appends one line to
// that file when it ends, with one write, so that lines of hooks running
// at once never mix:
//
//	{"pid":4711,"start":"2026-12-02T08:00:00.000000001Z","attrs":{"drv":"/nix/store/…-a.drv"},
//	 "steps":[["settings",120],["config",310],…,["exit",51200]]}
//
// start is when main began (after the Go runtime and package
// initialisation, which GODEBUG=inittrace=1 shows); each step is a name and
// the microseconds since start at which it ended. The file is written as
// the hook's user, which is root under nix-daemon.
//
// A nil *Watch records nothing: [FromEnv] returns nil when the variable
// is not set, and every method of a nil Watch returns at once.
package stopwatch
