// Command bench measures nix-offload-hook against Nix's own build hook and
// against a local build, on the test bed (docs/TESTBED.md): real Nix, real
// sshd, simulated builder hosts on loopback, nothing mocked.
//
// For each local Nix (default 2.8 and 2.34; the builders run the same Nix)
// and each workload it times the whole nix-build, from its start to the exit
// of its process, with a fresh local store (initialised with `nix-store
// --init` before the clock starts, in every mode), fresh builder hosts and a
// new salt every run, these ways:
//
//   - local: built locally, --max-jobs 4, no hook (the reference);
//   - stock: Nix's own hook (build-remote on 2.8, nix __build-remote on
//     2.34), --max-jobs 0, --builders 'ssh://bN x86_64-linux - 4; …' and
//     NIX_SSHOPTS="-F <ssh_config>";
//   - ours: nix-offload-hook (embedded mode, no broker) as build-hook,
//     --max-jobs 0, the same builders and slots;
//   - broker: like ours, but with a broker (`nix-offload-hook daemon`) for
//     the hooks to hand their builds to: started fresh for each run in the
//     local store's mount namespace, with the run's config plus a socket;
//     the timing starts once its socket answers and every machine has an
//     idle warm session (a production broker is long-lived; a broker not warm
//     within 30 s fails the run), and it is stopped (SIGTERM) after the
//     build. The run fails unless the broker's per-machine build counters
//     add up to the derivations built: a hook that cannot reach the broker
//     builds alone, often silently. Its peak RSS (VmHWM) is read before it is
//     stopped.
//   - build: `nix-offload-hook build` (the graph front door, no nix-build):
//     the whole graph in that one process, fetching only the root;
//   - buildbroker: `nix-offload-hook build` with a broker, started and
//     checked as for broker: the graph runs in the broker (POST /v1/graphs),
//     and the broker's VmHWM is its peak RSS over the whole graph.
//
// Workloads (no nixpkgs, /bin/sh builders): trivial (1 derivation, one
// builder), chain21 (21 derivations, each reading the previous output) and
// wide50 (50 independent derivations and a root that reads them all); the
// graphs use 2 builders × 4 slots. wide1000 (not in the default list) is
// wide50's shape with 1,000 leaves: the broker's memory with a
// 1,000-derivation graph. upload1g (not in the default list) is one
// derivation whose input is 1 GiB of random data, added to the local store
// before the clock starts; each of its runs also times `ssh bN 'cat >
// /dev/null'` of the same file to a fresh builder.
//
// With -rtt every builder is reached through a delay proxy (testbed.WithRTT:
// half the RTT each way) and the bench reports the round trips per
// derivation that the proxies counted during each build. With -logs DIR it
// keeps every run's nix-build -v stderr, time-stamped, the broker's -debug
// log and the step times of every hook of ours (NIX_OFFLOAD_HOOK_TIMES,
// internal/stopwatch; go run ./internal/testbed/hooktimes DIR/*.jsonl sums
// them up).
//
// It also records the hook's peak RSS in one trivial build (GNU time as a
// wrapper, if /usr/bin/time exists) and the cost of a bare `ssh bN true` to a
// builder (and `ssh bN nix-store --version`). It prints a Markdown table of
// medians at the end. With -trace it instead runs one build per Nix, workload
// and mode with `nix-build -v` and prints its stderr time-stamped; with
// -hook-prefix our hook runs behind a command such as strace.
//
// scripts/bench builds the binary and runs this:
//
//	go run ./internal/testbed/bench -hook bin/nix-offload-hook [-runs 3] [-nix 2.8,2.34] [-workloads trivial,chain21,wide50]
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/stopwatch"
	"github.com/nix-offload/nix-offload/internal/testbed"
)

// stdPath is the PATH every nix-build gets, on the host and inside a root:
// the stock hook looks up ssh in it.
const stdPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

const slotsPerBuilder = 4

var modes = []string{"local", "stock", "ours", "broker", "build", "buildbroker"}

// brokerModes are the modes that run a broker: the hooks' (broker) and the
// graph front door's (buildbroker).
var brokerModes = []string{"broker", "buildbroker"}

type workload struct {
	name     string
	builders int    // builder hosts for the remote modes
	drvs     int    // derivations in the graph
	words    int    // words in the root output, a check that every input was read
	first    string // first word of the root output
	body     string // Nix expression for the graph, given mk (and big)
	// inputBytes, if not 0, is the size of a file added to the local store before the
	// clock starts; the expression gets its store path as big.
	inputBytes int64
}

var workloads = map[string]workload{
	"trivial": {name: "trivial", builders: 1, drvs: 1, words: 1, first: "t",
		body: `mk "t" []`},
	"chain21": {name: "chain21", builders: 2, drvs: 21, words: 21, first: "c21",
		body: `builtins.head (builtins.foldl' (prev: i: [ (mk "c${toString i}" prev) ]) [] (builtins.genList (i: i + 1) 21))`},
	"wide50": {name: "wide50", builders: 2, drvs: 51, words: 51, first: "root",
		body: `mk "root" (builtins.genList (i: mk "w${toString (i + 1)}" []) 50)`},
	// wide1000: wide50's shape with 1,000 leaves, for the broker's memory with a
	// 1,000-derivation graph (SPEC: < 100 MiB); not in the default list.
	"wide1000": {name: "wide1000", builders: 2, drvs: 1001, words: 1001, first: "root",
		body: `mk "root" (builtins.genList (i: mk "w${toString (i + 1)}" []) 1000)`},
	// upload1g: one derivation whose input is 1 GiB of random data already in the local
	// store: the input upload, against `ssh bN 'cat > /dev/null'` of the same file.
	"upload1g": {name: "upload1g", builders: 1, drvs: 1, words: 1, first: "1073741824", inputBytes: 1 << 30,
		body: `derivation { inherit salt; name = "bench-up"; system = "x86_64-linux"; builder = "/bin/sh";
		  args = [ "-c" "/usr/bin/wc -c < ${builtins.storePath big} > $out" ]; }`},
}

// workloadNames lists the workloads, for messages.
const workloadNames = "trivial, chain21, wide50, wide1000, upload1g"

// expr returns the workload's expression with salt in every derivation and big, the
// store path of the input file (or "").
func (w workload) expr(salt, big string) string {
	return fmt.Sprintf(`
let
  salt = %q;
  big = %q;
  mk = name: deps: derivation {
    inherit salt;
    name = "bench-${name}";
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" ("echo building ${name}; x=${name}; "
      + builtins.concatStringsSep "" (map (d: "read y < ${d}; x=\"$x $y\"; ") deps)
      + "echo \"$x\" > $out") ];
  };
in %s
`, salt, big, w.body)
}

type config struct {
	hook       string
	runs       int
	nixes      []string
	workloads  []workload
	modes      []string
	timeout    time.Duration
	rss        bool
	trace      bool
	hookPrefix string
	rtt        time.Duration // round-trip time added to every builder link (testbed.WithRTT)
	logs       string        // if set, a directory for every run's time-stamped logs
}

func main() {
	hook := flag.String("hook", "bin/nix-offload-hook", "the nix-offload-hook binary (static, CGO_ENABLED=0)")
	runs := flag.Int("runs", 3, "runs per workload, Nix and mode; the table shows medians")
	nixList := flag.String("nix", "2.8,2.34", "local Nix series to measure (the builders run the same one)")
	wlList := flag.String("workloads", "trivial,chain21,wide50", "workloads: "+workloadNames)
	modeList := flag.String("modes", strings.Join(modes, ","), "modes: "+strings.Join(modes, ", "))
	timeout := flag.Duration("timeout", 10*time.Minute, "limit for each nix-build; it is killed after that")
	rss := flag.Bool("rss", true, "also record the hook's peak RSS in one trivial build per Nix")
	trace := flag.Bool("trace", false, "instead of the table: one build per Nix, workload and mode with nix-build -v, its stderr time-stamped")
	rtt := flag.Duration("rtt", 0, "round-trip time to add to every builder link, through a delay proxy (testbed.WithRTT): half of it each way; 0: plain loopback")
	logs := flag.String("logs", "", "keep every run's logs in this directory: nix-build -v's stderr time-stamped, the broker's -debug log, and every hook's step times")
	prefix := flag.String("hook-prefix", "", "run our hook as `PREFIX… HOOK args` (sh words, e.g. 'strace -f -tt -o /tmp/hook.strace'); the prefix must exist in the Nix's root")
	flag.Parse()

	cfg := config{hook: *hook, runs: *runs, timeout: *timeout, rss: *rss, trace: *trace, hookPrefix: *prefix, rtt: *rtt, logs: *logs}
	cfg.nixes = splitList(*nixList)
	for _, n := range splitList(*wlList) {
		w, ok := workloads[n]
		if !ok {
			fmt.Fprintf(os.Stderr, "bench: unknown workload %q (%s)\n", n, workloadNames)
			os.Exit(2)
		}
		cfg.workloads = append(cfg.workloads, w)
	}
	for _, m := range splitList(*modeList) {
		if !slices.Contains(modes, m) {
			fmt.Fprintf(os.Stderr, "bench: unknown mode %q (%s)\n", m, strings.Join(modes, ", "))
			os.Exit(2)
		}
		cfg.modes = append(cfg.modes, m)
	}
	if cfg.rtt < 0 {
		fmt.Fprintln(os.Stderr, "bench: -rtt must not be negative")
		os.Exit(2)
	}
	if cfg.runs < 1 || len(cfg.nixes) == 0 || len(cfg.workloads) == 0 || len(cfg.modes) == 0 {
		fmt.Fprintln(os.Stderr, "bench: nothing to measure")
		os.Exit(2)
	}
	os.Exit(run(cfg))
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// key names one cell of the table.
type key struct{ nix, workload, mode string }

type bench struct {
	cfg   config
	p     *testbed.Program
	work  string
	times map[key][]time.Duration
	fails map[key]int
	notes []string
	rss   map[string]string // "SERIES hwm" or "SERIES tree" → peak RSS text
	ssh   map[key]time.Duration
	// brokerRSS holds the broker's VmHWM (KiB) after each broker run.
	brokerRSS map[key][]int
	// brokerWarm holds how long each broker took from start to warm.
	brokerWarm map[key][]time.Duration
	// turns holds, with -rtt, the round trips per derivation of each run: the delay
	// proxies' turns during the build (testbed.LinkStats) over the derivations.
	turns map[key][]float64
	// cat holds, for upload1g, how long `ssh bN 'cat > /dev/null'` of the input took.
	cat map[string][]time.Duration
	big string      // the upload1g input, once made
	seq map[key]int // runs so far, for the names of -logs files
}

func run(cfg config) int {
	p := &testbed.Program{}
	defer p.Close()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sig
		fmt.Fprintln(os.Stderr, "bench: interrupted; stopping the builders")
		p.Close()
		os.Exit(130)
	}()

	hook, err := filepath.Abs(cfg.hook)
	if err != nil {
		p.Fatalf("%v", err)
	}
	if _, err := os.Stat(hook); err != nil {
		p.Fatalf("bench: %v (scripts/bench builds it)", err)
	}
	cfg.hook = hook
	testbed.RequireRoot(p)
	b := &bench{cfg: cfg, p: p, work: p.TempDir(),
		times: map[key][]time.Duration{}, fails: map[key]int{},
		rss: map[string]string{}, ssh: map[key]time.Duration{},
		brokerRSS: map[key][]int{}, brokerWarm: map[key][]time.Duration{},
		turns: map[key][]float64{}, cat: map[string][]time.Duration{}, seq: map[key]int{}}
	if cfg.logs != "" {
		if err := os.MkdirAll(cfg.logs, 0o755); err != nil {
			p.Fatalf("bench: -logs: %v", err)
		}
	}

	if cfg.hookPrefix != "" {
		b.cfg.hook = b.wrapHook(cfg.hookPrefix)
		b.cfg.rss = false
	}
	if cfg.trace {
		return b.traceBuilds()
	}
	start := time.Now()
	fmt.Printf("bench: %d run(s); nproc %d; load average %s\n", cfg.runs, runtime.NumCPU(), loadAvg())
	for _, series := range cfg.nixes {
		nix := testbed.Lookup(p, series)
		b.measureSSH(nix)
		for _, w := range cfg.workloads {
			for r := 1; r <= cfg.runs; r++ {
				for _, mode := range cfg.modes {
					d, err := b.measure(nix, w, mode)
					k := key{series, w.name, mode}
					if err != nil {
						b.fails[k]++
						fmt.Printf("  Nix %-5s %-8s %-6s run %d: FAILED: %v\n", series, w.name, mode, r, err)
						continue
					}
					b.times[k] = append(b.times[k], d)
					extra := ""
					if slices.Contains(brokerModes, mode) {
						if kb := b.brokerRSS[k]; len(kb) > 0 {
							extra = fmt.Sprintf(" (broker VmHWM %.1f MiB, warm after %s)", float64(kb[len(kb)-1])/1024,
								fmtDur(b.brokerWarm[k][len(b.brokerWarm[k])-1]))
						}
					}
					if t := b.turns[k]; len(t) > 0 {
						extra += fmt.Sprintf(" (%.1f round trips per derivation)", t[len(t)-1])
					}
					fmt.Printf("  Nix %-5s %-8s %-6s run %d: %s%s\n", series, w.name, mode, r, fmtDur(d), extra)
				}
				if w.inputBytes > 0 {
					b.measureCat(nix, w)
				}
			}
		}
		if b.cfg.rss && slices.Contains(cfg.modes, "ours") {
			b.measureRSS(nix)
		}
	}
	fmt.Printf("\nbench: done in %s; load average now %s\n\n", time.Since(start).Round(time.Second), loadAvg())
	fmt.Print(b.markdown())
	for _, n := range b.fails {
		if n > 0 {
			return 1
		}
	}
	return 0
}

// measure runs one fresh build of w in mode and returns its wall time.
func (b *bench) measure(nix testbed.Nix, w workload, mode string) (time.Duration, error) {
	dir, err := os.MkdirTemp(b.work, "run-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	k := key{nix.Series(), w.name, mode}
	b.seq[k]++
	var stderr, brokerLog bytes.Buffer
	var t0 time.Time // the clock's start
	if b.cfg.logs != "" {
		defer func() {
			base := filepath.Join(b.cfg.logs, fmt.Sprintf("%s-%s-%s-%d", k.nix, k.workload, k.mode, b.seq[k]))
			head := fmt.Sprintf("# nix-build started at %s; seconds since then\n", t0.UTC().Format(time.RFC3339Nano))
			os.WriteFile(base+".nix-build.log", append([]byte(head), stderr.Bytes()...), 0o644)
			if brokerLog.Len() > 0 {
				os.WriteFile(base+".broker.log", brokerLog.Bytes(), 0o644)
			}
			if times, err := os.ReadFile(filepath.Join(dir, "hook-times.jsonl")); err == nil {
				os.WriteFile(base+".hook-times.jsonl", times, 0o644)
			}
		}()
	}
	// Every mode starts its clock on the same initialised store: Nix's first use of a
	// fresh store creates its database (a cost no real machine pays per build), and two
	// processes that make that first use at once can fail (testbed.Nix.InitStore).
	store := testbed.NewStore(b.p)
	defer os.RemoveAll(store)
	nix.InitStore(b.p, store)
	mounts := []string{dir}
	big := ""
	if w.inputBytes > 0 {
		file, err := b.bigInput(w.inputBytes)
		if err != nil {
			return 0, err
		}
		mounts = append(mounts, filepath.Dir(file))
		if big, err = b.addToStore(nix, store, mounts, file); err != nil {
			return 0, err
		}
	}
	salt := randomHex(8)
	exprFile := filepath.Join(dir, "bench.nix")
	if err := os.WriteFile(exprFile, []byte(w.expr(salt, big)), 0o644); err != nil {
		return 0, err
	}

	env := []string{"PATH=" + stdPath, "HOME=/root"}
	args := []string{"nix-build", "--no-out-link", "--option", "substituters", ""}
	var builders []*testbed.Builder
	if mode != "local" {
		for range w.builders {
			bl := testbed.StartBuilder(b.p, nix, b.builderOpts()...)
			builders = append(builders, bl)
			// ClientKey and KnownHosts live in Dir; the chroot Nix must see them
			// under the same names, for ssh (stock) and for our hook.
			mounts = append(mounts, bl.Dir)
		}
		defer func() {
			for _, bl := range builders {
				bl.Stop()
				os.RemoveAll(bl.Dir)
			}
		}()
	}
	var br *runningBroker
	socket, conf := "", "" // the broker's socket, in the broker modes; our configuration
	if slices.Contains(brokerModes, mode) {
		socket = filepath.Join(dir, "hook.sock")
	}
	switch mode {
	case "local":
		args = append(args, "--max-jobs", "4")
	case "stock":
		sshConfig := testbed.SSHConfigFile(b.p, builders...)
		mounts = append(mounts, filepath.Dir(sshConfig))
		var specs []string
		for _, bl := range builders {
			specs = append(specs, fmt.Sprintf("ssh://%s x86_64-linux - %d", bl.Name, slotsPerBuilder))
		}
		args = append(args, "--max-jobs", "0", "--builders", strings.Join(specs, "; "))
		env = append(env, "NIX_SSHOPTS=-F "+sshConfig)
	case "ours", "broker":
		conf = writeOffloadConfig(dir, socket, builders)
		mounts = append(mounts, filepath.Dir(b.cfg.hook))
		args = append(args, "--max-jobs", "0", "--option", "build-hook", b.cfg.hook)
		env = append(env, "NIX_OFFLOAD_CONFIG="+conf)
		if b.cfg.logs != "" {
			// Every hook appends the times of its steps (internal/stopwatch).
			env = append(env, stopwatch.Env+"="+filepath.Join(dir, "hook-times.jsonl"))
		}
	case "build", "buildbroker":
		// The graph front door: our own command sees the whole graph, with no
		// nix-daemon and no hook per derivation; it fetches only the root. With
		// buildbroker the configuration names the broker's socket, and the graph
		// runs in the broker (POST /v1/graphs).
		conf = writeOffloadConfig(dir, socket, builders)
		mounts = append(mounts, filepath.Dir(b.cfg.hook))
		args = []string{b.cfg.hook, "build", "-config", conf, "-no-link"}
	}
	if socket != "" {
		if br, err = b.startRunBroker(k, nix, store, mounts, conf, socket, len(builders), &brokerLog); err != nil {
			return 0, err
		}
		defer br.finish()
	}
	if mode != "build" && mode != "buildbroker" && (b.cfg.trace || b.cfg.logs != "") {
		args = append(args, "-v") // nix-build's; build prints every step anyway
	}
	args = append(args, exprFile)

	cmd := nix.Command(store, mounts, args...)
	cmd.Env = env
	turns0 := linkTurns(builders)
	var stdout bytes.Buffer
	var errOut io.Writer = &stderr
	t0 = time.Now()
	switch {
	case b.cfg.trace:
		errOut = io.MultiWriter(&stderr, &stamper{w: os.Stdout, t0: t0})
	case b.cfg.logs != "":
		errOut = &stamper{w: &stderr, t0: t0}
	}
	elapsed, err := runToExit(cmd, &stdout, errOut, b.cfg.timeout)
	turns := linkTurns(builders) - turns0
	if err != nil {
		return 0, fmt.Errorf("%v\n%s", err, tailText(stderr.String(), 2000))
	}

	// The root output must be right, and for the remote modes it must have been
	// built on a builder: with --max-jobs 0 nothing can be built locally, but
	// check where it is anyway.
	out := strings.TrimSpace(stdout.String())
	content, err := os.ReadFile(filepath.Join(store, strings.TrimPrefix(out, "/nix/")))
	if err != nil {
		return 0, fmt.Errorf("root output %q: %v", out, err)
	}
	words := strings.Fields(string(content))
	if len(words) != w.words || words[0] != w.first {
		return 0, fmt.Errorf("root output %s holds %q, want %d words starting with %q", out, content, w.words, w.first)
	}
	if mode != "local" {
		found := false
		for _, bl := range builders {
			if _, err := os.Stat(filepath.Join(bl.Dir, "nix", strings.TrimPrefix(out, "/nix/"))); err == nil {
				found = true
			}
		}
		if !found {
			return 0, fmt.Errorf("%s: root output %s is on no builder: not offloaded", mode, out)
		}
	}
	// A hook that cannot reach the broker builds alone and may say nothing: only the
	// broker's own counters prove that it ran every build.
	if br != nil {
		if err := br.checkBuilds(w.drvs); err != nil {
			return 0, err
		}
	}
	if b.cfg.rtt > 0 && mode != "local" {
		b.turns[k] = append(b.turns[k], float64(turns)/float64(w.drvs))
	}
	return elapsed, nil
}

// builderOpts are the options of every builder the bench starts.
func (b *bench) builderOpts() []testbed.BuilderOption {
	if b.cfg.rtt > 0 {
		return []testbed.BuilderOption{testbed.WithRTT(b.cfg.rtt)}
	}
	return nil
}

// linkTurns sums the round trips (delay proxy turns) to the builders so far.
func linkTurns(builders []*testbed.Builder) int64 {
	var n int64
	for _, bl := range builders {
		n += bl.LinkStats().Turns
	}
	return n
}

// runToExit runs cmd with stdout and stderr copied to the writers, killed after timeout,
// and returns the time from its start until its process exited. The pipes are the
// bench's own, not exec's: exec's Wait also waits until every descendant that inherited
// them has closed them, which is not when nix-build is done. After the exit the copies
// get a few seconds to end, untimed.
func runToExit(cmd *exec.Cmd, stdout, stderr io.Writer, timeout time.Duration) (time.Duration, error) {
	outR, outW, err := os.Pipe()
	if err != nil {
		return 0, err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return 0, err
	}
	cmd.Stdout, cmd.Stderr = outW, errW
	var copies sync.WaitGroup
	copies.Add(2)
	go func() { defer copies.Done(); io.Copy(stdout, outR) }()
	go func() { defer copies.Done(); io.Copy(stderr, errR) }()
	t0 := time.Now()
	err = cmd.Start()
	outW.Close()
	errW.Close()
	if err != nil {
		outR.Close()
		errR.Close()
		copies.Wait()
		return 0, err
	}
	var timedOut atomic.Bool
	timer := time.AfterFunc(timeout, func() {
		timedOut.Store(true)
		testbed.KillCommand(cmd)
	})
	// Process.Wait, not cmd.Wait: the namespace must still be findable for
	// KillCommand after the exit, and nothing waits for the pipes.
	state, werr := cmd.Process.Wait()
	elapsed := time.Since(t0)
	timer.Stop()
	testbed.KillCommand(cmd) // what is left of the namespace: builds, late hooks
	drained := make(chan struct{})
	go func() { copies.Wait(); close(drained) }()
	select {
	case <-drained:
	case <-time.After(5 * time.Second):
		outR.Close()
		errR.Close()
		<-drained
	}
	outR.Close()
	errR.Close()
	switch {
	case timedOut.Load():
		return 0, fmt.Errorf("killed after %v", timeout)
	case werr != nil:
		return 0, werr
	case !state.Success():
		return 0, fmt.Errorf("nix-build: %v", state)
	}
	return elapsed, nil
}

// bigInput returns a file of n bytes of random data (made once per bench, not timed):
// the input of the upload workload. It does not compress.
func (b *bench) bigInput(n int64) (string, error) {
	if b.big != "" {
		return b.big, nil
	}
	dir, err := os.MkdirTemp(b.work, "input-")
	if err != nil {
		return "", err
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return "", err
	}
	path := filepath.Join(dir, "input")
	f, err := os.Create(path)
	if err != nil {
		return "", err
	}
	block := make([]byte, 1<<20)
	if _, err := rand.Read(block); err != nil {
		f.Close()
		return "", err
	}
	for written := int64(0); written < n; {
		// A new first word in every MiB, so no two blocks are alike.
		copy(block, fmt.Sprintf("%016x", written))
		m := min(int64(len(block)), n-written)
		if _, err := f.Write(block[:m]); err != nil {
			f.Close()
			return "", err
		}
		written += m
	}
	if err := f.Close(); err != nil {
		return "", err
	}
	b.big = path
	return path, nil
}

// addToStore adds file to store with `nix-store --add` (not timed) and returns its path.
func (b *bench) addToStore(nix testbed.Nix, store string, mounts []string, file string) (string, error) {
	cmd := nix.Command(store, mounts, "nix-store", "--add", file)
	cmd.Env = []string{"PATH=" + stdPath, "HOME=/root"}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("nix-store --add %s: %v: %s", file, err, stderr.Bytes())
	}
	return strings.TrimSpace(string(out)), nil
}

// traceBuilds runs one build per Nix, workload and mode with its stderr
// time-stamped on stdout: where the time goes, roughly.
func (b *bench) traceBuilds() int {
	code := 0
	for _, series := range b.cfg.nixes {
		nix := testbed.Lookup(b.p, series)
		for _, w := range b.cfg.workloads {
			for _, mode := range b.cfg.modes {
				fmt.Printf("\n== Nix %s, %s, %s (nix-build -v; seconds since start)\n", series, w.name, mode)
				d, err := b.measure(nix, w, mode)
				if err != nil {
					fmt.Printf("FAILED: %v\n", err)
					code = 1
					continue
				}
				fmt.Printf("== %s\n", fmtDur(d))
			}
		}
	}
	return code
}

// wrapHook returns a script that runs a copy of the hook behind prefix, in a
// directory of its own (mounted into a root like the hook's).
func (b *bench) wrapHook(prefix string) string {
	dir, err := os.MkdirTemp(b.work, "wrap-")
	if err != nil {
		b.p.Fatalf("%v", err)
	}
	hookCopy := filepath.Join(dir, "nix-offload-hook")
	wrapper := filepath.Join(dir, "hook-wrapper")
	if err := os.Chmod(dir, 0o755); err != nil {
		b.p.Fatalf("%v", err)
	}
	if err := copyFile(b.cfg.hook, hookCopy); err != nil {
		b.p.Fatalf("%v", err)
	}
	if err := os.WriteFile(wrapper, []byte("#!/bin/sh\nexec "+prefix+" "+hookCopy+" \"$@\"\n"), 0o755); err != nil {
		b.p.Fatalf("%v", err)
	}
	return wrapper
}

// stamper writes each line with the time since t0 in front.
type stamper struct {
	w       io.Writer
	t0      time.Time
	partial []byte
}

func (s *stamper) Write(p []byte) (int, error) {
	s.partial = append(s.partial, p...)
	for {
		i := bytes.IndexByte(s.partial, '\n')
		if i < 0 {
			break
		}
		fmt.Fprintf(s.w, "%7.3f %s\n", time.Since(s.t0).Seconds(), s.partial[:i])
		s.partial = s.partial[i+1:]
	}
	return len(p), nil
}

// writeOffloadConfig writes an offload.toml for builders in dir, with its
// state directory (slot files) in dir too, so every run starts fresh.
// With a socket, hooks hand their builds to the broker listening there.
func writeOffloadConfig(dir, socket string, builders []*testbed.Builder) string {
	var cfg strings.Builder
	fmt.Fprintf(&cfg, "[daemon]\nstate-dir = %q\n", filepath.Join(dir, "state"))
	if socket != "" {
		fmt.Fprintf(&cfg, "socket = %q\n", socket)
	}
	for _, bl := range builders {
		fmt.Fprintf(&cfg, "\n[[machine]]\nhost = %q\nport = %d\nuser = %q\nssh-key = %q\nhost-key = %q\n"+
			"systems = [\"x86_64-linux\"]\nparallel-builds = %d\n",
			bl.Addr, bl.Port, bl.User, bl.ClientKey, bl.HostKey, slotsPerBuilder)
	}
	p := filepath.Join(dir, "offload.toml")
	if err := os.WriteFile(p, []byte(cfg.String()), 0o644); err != nil {
		panic(err)
	}
	return p
}

// measureCat times `ssh -F SSHConfig bN 'cat > /dev/null'` with the upload
// workload's input as stdin, to a fresh builder on the same kind of link: what
// OpenSSH alone makes of it.
func (b *bench) measureCat(nix testbed.Nix, w workload) {
	series := nix.Series()
	file, err := b.bigInput(w.inputBytes)
	if err == nil {
		var f *os.File
		if f, err = os.Open(file); err == nil {
			bl := testbed.StartBuilder(b.p, nix, b.builderOpts()...)
			cmd := bl.SSH("cat > /dev/null")
			cmd.Stdin = f
			t0 := time.Now()
			var out []byte
			if out, err = cmd.CombinedOutput(); err == nil {
				d := time.Since(t0)
				b.cat[series] = append(b.cat[series], d)
				fmt.Printf("  Nix %-5s %-8s %-6s: %s (%.0f MiB/s)\n", series, w.name, "ssh cat", fmtDur(d),
					float64(w.inputBytes)/(1<<20)/d.Seconds())
			} else {
				err = fmt.Errorf("%v: %s", err, out)
			}
			f.Close()
			bl.Stop()
			os.RemoveAll(bl.Dir)
		}
	}
	if err != nil {
		b.notes = append(b.notes, fmt.Sprintf("ssh bN 'cat > /dev/null' (Nix %s builder): %v", series, err))
	}
}

// measureSSH times, against a fresh builder of nix, `ssh -F SSHConfig bN
// true` (the handshake and session that every stock-hook build, and in
// embedded mode every one of ours, pays at least once) and `ssh bN nix-store
// --version` (the same plus starting a Nix process on the machine, as
// `nix-store --serve` does). Medians of 7.
func (b *bench) measureSSH(nix testbed.Nix) {
	bl := testbed.StartBuilder(b.p, nix, b.builderOpts()...)
	defer bl.Stop()
	for _, argv := range [][]string{{"true"}, {"nix-store", "--version"}} {
		what := "ssh bN " + strings.Join(argv, " ")
		var ds []time.Duration
		for range 7 {
			cmd := bl.SSH(argv...)
			t0 := time.Now()
			if out, err := cmd.CombinedOutput(); err != nil {
				b.notes = append(b.notes, fmt.Sprintf("%s (Nix %s builder): %v: %s", what, nix.Series(), err, out))
				return
			}
			ds = append(ds, time.Since(t0))
		}
		b.ssh[key{nix.Series(), "", what}] = median(ds)
		fmt.Printf("Nix %s builder: %s, median of 7: %s\n", nix.Series(), what, fmtDur(median(ds)))
	}
}

// measureRSS records our hook's peak memory in trivial builds, two ways, each
// in its own build with the hook behind a wrapper script (in a directory that
// is mounted into a root, with a copy of the hook):
//
//   - hwm: the wrapper starts the hook and polls VmHWM in /proc/PID/status
//     every 10 ms until it exits: the hook process alone (a growth in its last
//     10 ms would be missed);
//   - tree: GNU time (a copy of /usr/bin/time, if installed) reports the peak
//     RSS of the largest process of the tree: the hook and the local
//     nix-store processes it runs and waits for.
//
// The wrappers keep the hook's fds (0, 2, 4, 5) as Nix gave them.
func (b *bench) measureRSS(nix testbed.Nix) {
	series := nix.Series()
	b.rss[series+" hwm"] = b.rssRun(nix, "hwm")
	b.rss[series+" tree"] = b.rssRun(nix, "tree")
	fmt.Printf("Nix %s: our hook's peak RSS in a trivial build: %s (hook process); %s (largest of hook and its children)\n",
		series, b.rss[series+" hwm"], b.rss[series+" tree"])
}

func (b *bench) rssRun(nix testbed.Nix, kind string) string {
	dir, err := os.MkdirTemp(b.work, "rss-")
	if err != nil {
		return "not measured: " + err.Error()
	}
	defer os.RemoveAll(dir)
	if err := os.Chmod(dir, 0o755); err != nil {
		return "not measured: " + err.Error()
	}
	hookCopy := filepath.Join(dir, "nix-offload-hook")
	if err := copyFile(b.cfg.hook, hookCopy); err != nil {
		return "not measured: " + err.Error()
	}
	rssFile := filepath.Join(dir, "rss")
	var script string
	switch kind {
	case "tree":
		if _, err := os.Stat("/usr/bin/time"); err != nil {
			return "not measured (no /usr/bin/time; apt-get install time)"
		}
		timeCopy := filepath.Join(dir, "time")
		if err := copyFile("/usr/bin/time", timeCopy); err != nil {
			return "not measured: " + err.Error()
		}
		script = fmt.Sprintf("#!/bin/sh\nexec %s -a -f '%%M' -o %s %s \"$@\"\n", timeCopy, rssFile, hookCopy)
	case "hwm":
		// A non-interactive sh gives a background job /dev/null as stdin: pass
		// the real one through fd 9.
		script = fmt.Sprintf(`#!/bin/sh
exec 9<&0
%s "$@" <&9 9<&- &
pid=$!
exec 9<&-
while kill -0 "$pid" 2>/dev/null; do
	while read -r k v _; do
		if [ "$k" = VmHWM: ]; then echo "$v" >>%s; fi
	done </proc/"$pid"/status 2>/dev/null
	/bin/sleep 0.01
done
wait "$pid"
`, hookCopy, rssFile)
	}
	wrapper := filepath.Join(dir, "hook-wrapper")
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		return "not measured: " + err.Error()
	}
	saved := b.cfg.hook
	b.cfg.hook = wrapper
	_, err = b.measure(nix, workloads["trivial"], "ours")
	b.cfg.hook = saved
	if err != nil {
		return "not measured: the build failed: " + err.Error()
	}
	data, _ := os.ReadFile(rssFile)
	maxKB := 0
	for _, line := range strings.Split(string(data), "\n") {
		if kb, err := strconv.Atoi(strings.TrimSpace(line)); err == nil && kb > maxKB {
			maxKB = kb
		}
	}
	if maxKB == 0 {
		return fmt.Sprintf("not measured: the wrapper wrote %q", tailText(string(data), 200))
	}
	return fmt.Sprintf("%.1f MiB", float64(maxKB)/1024)
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// markdown renders the results.
func (b *bench) markdown() string {
	var s strings.Builder
	link := "loopback"
	if b.cfg.rtt > 0 {
		link = fmt.Sprintf("%v RTT (delay proxy)", b.cfg.rtt)
	}
	fmt.Fprintf(&s, "## Results: median of %d run(s), wall time of the whole nix-build (for build: the whole `nix-offload-hook build`), builders on %s\n\n", b.cfg.runs, link)
	s.WriteString("| workload | local Nix | local | stock hook | ours | broker | build | build (broker) | stock ÷ ours | ours ÷ local | stock ÷ broker | broker ÷ local | stock ÷ build | build ÷ local | build (broker) ÷ local |\n")
	s.WriteString("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, w := range b.cfg.workloads {
		for _, series := range b.cfg.nixes {
			med := map[string]time.Duration{}
			cells := []string{w.name, series}
			for _, mode := range modes {
				ds := b.times[key{series, w.name, mode}]
				if len(ds) == 0 {
					cells = append(cells, b.missing(key{series, w.name, mode}))
					continue
				}
				med[mode] = median(ds)
				cell := fmtDur(med[mode])
				if len(ds) > 1 {
					cell += fmt.Sprintf(" (%s–%s)", fmtDur(slices.Min(ds)), fmtDur(slices.Max(ds)))
				}
				if n := b.fails[key{series, w.name, mode}]; n > 0 {
					cell += fmt.Sprintf(", %d failed", n)
				}
				cells = append(cells, cell)
			}
			cells = append(cells, ratio(med["stock"], med["ours"]), ratio(med["ours"], med["local"]),
				ratio(med["stock"], med["broker"]), ratio(med["broker"], med["local"]),
				ratio(med["stock"], med["build"]), ratio(med["build"], med["local"]), ratio(med["buildbroker"], med["local"]))
			s.WriteString("| " + strings.Join(cells, " | ") + " |\n")
		}
	}
	s.WriteString("\nCells: median (min–max). Builders run the same Nix as the local side; " +
		"trivial uses 1 builder, the graphs 2 builders × 4 slots. ssh times: medians of 7, host ssh client to a builder of that Nix.\n")
	if len(b.ssh) > 0 || len(b.rss) > 0 {
		s.WriteString("\n| Nix | `ssh bN true` | `ssh bN nix-store --version` | our hook's peak RSS, trivial build: hook process (VmHWM) | largest of hook and its children (GNU time) |\n|---|---|---|---|---|\n")
		for _, series := range b.cfg.nixes {
			st, sv := "—", "—"
			if d, ok := b.ssh[key{series, "", "ssh bN true"}]; ok {
				st = fmtDur(d)
			}
			if d, ok := b.ssh[key{series, "", "ssh bN nix-store --version"}]; ok {
				sv = fmtDur(d)
			}
			hwm, tree := b.rss[series+" hwm"], b.rss[series+" tree"]
			if hwm == "" {
				hwm = "—"
			}
			if tree == "" {
				tree = "—"
			}
			fmt.Fprintf(&s, "| %s | %s | %s | %s | %s |\n", series, st, sv, hwm, tree)
		}
	}
	if len(b.brokerRSS) > 0 {
		s.WriteString("\n| Nix | workload | mode | broker peak RSS (VmHWM) after the build: max (min–max over runs) | broker start to warm, median |\n|---|---|---|---|---|\n")
		for _, series := range b.cfg.nixes {
			for _, w := range b.cfg.workloads {
				for _, mode := range brokerModes {
					k := key{series, w.name, mode}
					kb := b.brokerRSS[k]
					if len(kb) == 0 {
						continue
					}
					mib := func(v int) string { return fmt.Sprintf("%.1f MiB", float64(v)/1024) }
					fmt.Fprintf(&s, "| %s | %s | %s | %s (%s–%s) | %s |\n", series, w.name, mode, mib(slices.Max(kb)),
						mib(slices.Min(kb)), mib(slices.Max(kb)), fmtDur(median(b.brokerWarm[k])))
				}
			}
		}
	}
	if len(b.turns) > 0 {
		fmt.Fprintf(&s, "\n| workload | local Nix | mode | round trips per derivation at %v RTT: median (min–max) |\n|---|---|---|---|\n", b.cfg.rtt)
		for _, w := range b.cfg.workloads {
			for _, series := range b.cfg.nixes {
				for _, mode := range modes {
					t := b.turns[key{series, w.name, mode}]
					if len(t) == 0 {
						continue
					}
					fmt.Fprintf(&s, "| %s | %s | %s | %.1f (%.1f–%.1f) |\n", w.name, series, mode, medianF(t), slices.Min(t), slices.Max(t))
				}
			}
		}
		s.WriteString("\nRound trips: turns counted by the delay proxies (testbed.LinkStats) during the build, " +
			"SSH handshakes included, over the derivations built; for one build at a time per connection an upper bound on the round trips waited for; overlapping builds on one connection can share turns.\n")
	}
	for _, w := range b.cfg.workloads {
		if w.inputBytes == 0 {
			continue
		}
		mib := float64(w.inputBytes) / (1 << 20)
		fmt.Fprintf(&s, "\n| Nix | %s: `ssh bN 'cat > /dev/null'` | ours | broker | ours ÷ cat (throughput) | broker ÷ cat |\n|---|---|---|---|---|---|\n", w.name)
		for _, series := range b.cfg.nixes {
			cat := median(b.cat[series])
			cells := []string{series, "—", "—", "—", "—", "—"}
			if cat > 0 {
				cells[1] = fmt.Sprintf("%s (%.0f MiB/s)", fmtDur(cat), mib/cat.Seconds())
			}
			for i, mode := range []string{"ours", "broker"} {
				if ds := b.times[key{series, w.name, mode}]; len(ds) > 0 {
					d := median(ds)
					cells[2+i] = fmt.Sprintf("%s (%.0f MiB/s)", fmtDur(d), mib/d.Seconds())
					cells[4+i] = ratio(cat, d)
				}
			}
			s.WriteString("| " + strings.Join(cells, " | ") + " |\n")
		}
		s.WriteString("\nThe build times are whole nix-builds (evaluation, the 1-line build and the output fetch included); " +
			"the ratio is cat's time over the build's, the build's share of OpenSSH's throughput.\n")
	}
	for _, n := range b.notes {
		fmt.Fprintf(&s, "\nnote: %s\n", n)
	}
	return s.String()
}

func (b *bench) missing(k key) string {
	if n := b.fails[k]; n > 0 {
		return fmt.Sprintf("failed (%d)", n)
	}
	return "—"
}

func median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func medianF(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func ratio(a, b time.Duration) string {
	if a == 0 || b == 0 {
		return "—"
	}
	r := float64(a) / float64(b)
	if math.IsInf(r, 0) || math.IsNaN(r) {
		return "—"
	}
	return fmt.Sprintf("%.2f×", r)
}

func fmtDur(d time.Duration) string {
	return fmt.Sprintf("%.2f s", d.Seconds())
}

func tailText(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

func loadAvg() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func randomHex(n int) string {
	buf := make([]byte, n)
	if _, err := rand.Read(buf); err != nil {
		panic(errors.New("bench: no randomness: " + err.Error()))
	}
	return hex.EncodeToString(buf)
}

// runningBroker is a broker started for one run.
type runningBroker struct {
	cmd    *exec.Cmd
	log    *syncBuffer
	socket string
	warm   time.Duration // from start until the socket answered and every machine had an idle session
	finish func()        // set by startRunBroker: record the peak RSS, stop, keep the log
}

// brokerWarmLimit bounds the wait for a broker to be warm: about 0.2 s on a quiet bed.
const brokerWarmLimit = 30 * time.Second

// startBroker starts `HOOK daemon -config conf` in store's mount namespace,
// waits for its socket, then until every one of its machines has an idle
// warm session. A broker that is not warm within brokerWarmLimit
// fails the run: timed against a cold broker, the run would measure
// something else.
func (b *bench) startBroker(nix testbed.Nix, store string, mounts []string, conf, socket string, machines int) (*runningBroker, error) {
	argv := []string{b.cfg.hook, "daemon", "-config", conf, "-drain", "30s"}
	if b.cfg.logs != "" {
		argv = append(argv, "-debug")
	}
	cmd := nix.Command(store, mounts, argv...)
	cmd.Env = []string{"PATH=" + stdPath, "HOME=/root"}
	br := &runningBroker{cmd: cmd, log: &syncBuffer{}, socket: socket}
	cmd.Stdout, cmd.Stderr = br.log, br.log
	cmd.WaitDelay = 5 * time.Second
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("broker: %v", err)
	}
	fail := func(format string, args ...any) (*runningBroker, error) {
		testbed.KillCommand(cmd)
		cmd.Wait()
		return nil, fmt.Errorf("broker: "+format+"\n%s", append(args, tailText(br.log.String(), 2000))...)
	}
	// The socket: up to a minute.
	var c *brokerapi.Client
	for deadline := time.Now().Add(time.Minute); ; {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		cl, err := brokerapi.Dial(ctx, socket)
		cancel()
		if err == nil {
			c = cl
			break
		}
		if time.Now().After(deadline) {
			return fail("no socket at %s after a minute: %v", socket, err)
		}
		if !processAlive(cmd.Process.Pid) {
			return fail("exited before its socket answered")
		}
		time.Sleep(5 * time.Millisecond)
	}
	defer c.Close()
	// Warm: every machine has an idle session (a connection alone may still be
	// starting its sessions: "machine ready" comes later).
	last := "no status yet"
	for deadline := time.Now().Add(brokerWarmLimit); ; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			return fail("not warm %v after its start (%s)", brokerWarmLimit, last)
		}
		if !processAlive(cmd.Process.Pid) {
			return fail("exited before it was warm")
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		st, err := c.Status(ctx)
		cancel()
		if err != nil {
			last = "status: " + err.Error()
			continue
		}
		warm := 0
		for _, m := range st.Machines {
			if m.Idle > 0 {
				warm++
			}
		}
		last = fmt.Sprintf("%d of %d machines warm", warm, machines)
		if len(st.Machines) == machines && warm == machines {
			break
		}
	}
	br.warm = time.Since(t0)
	return br, nil
}

// startRunBroker starts the broker of run k (startBroker) and records how
// long it took to be warm; its finish records its peak RSS, stops it and
// keeps its log in log.
func (b *bench) startRunBroker(k key, nix testbed.Nix, store string, mounts []string, conf, socket string, machines int, log *bytes.Buffer) (*runningBroker, error) {
	br, err := b.startBroker(nix, store, mounts, conf, socket, machines)
	if err != nil {
		return nil, err
	}
	b.brokerWarm[k] = append(b.brokerWarm[k], br.warm)
	br.finish = func() {
		if kb := br.hwm(); kb > 0 {
			b.brokerRSS[k] = append(b.brokerRSS[k], kb)
		}
		if err := br.stop(); err != nil {
			fmt.Fprintf(os.Stderr, "bench: broker: %v\n%s", err, tailText(br.log.String(), 2000))
		}
		log.WriteString(br.log.String())
	}
	return br, nil
}

// checkBuilds fails unless the broker's per-machine counters say it ran want
// builds, none failed.
func (br *runningBroker) checkBuilds(want int) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := brokerapi.Dial(ctx, br.socket)
	if err != nil {
		return fmt.Errorf("broker: after the build: %v", err)
	}
	defer c.Close()
	st, err := c.Status(ctx)
	if err != nil {
		return fmt.Errorf("broker: status after the build: %v", err)
	}
	var built, failed uint64
	var per []string
	for _, m := range st.Machines {
		built += m.Builds
		failed += m.Failed
		per = append(per, fmt.Sprintf("%s: %d", m.Name, m.Builds))
	}
	if built != uint64(want) || failed != 0 {
		return fmt.Errorf("broker: its counters show %d builds (%s) and %d failures, want %d and 0: "+
			"the hooks built without it", built, strings.Join(per, ", "), failed, want)
	}
	return nil
}

// hwm returns the broker's peak RSS so far in KiB (VmHWM), or 0.
func (br *runningBroker) hwm() int {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", br.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmHWM:" {
			kb, _ := strconv.Atoi(f[1])
			return kb
		}
	}
	return 0
}

// stop sends SIGTERM to the broker and waits for it (a minute at most, then
// it is killed with everything in its namespace).
func (br *runningBroker) stop() error {
	br.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- br.cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("exited with %v after SIGTERM", err)
		}
		return nil
	case <-time.After(time.Minute):
		testbed.KillCommand(br.cmd)
		<-done
		return errors.New("did not stop within a minute of SIGTERM; killed")
	}
}

func processAlive(pid int) bool {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the command's closing parenthesis; Z is a zombie.
	s := string(data)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] != 'Z'
	}
	return true
}

// syncBuffer is a bytes.Buffer safe for concurrent writers.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}
