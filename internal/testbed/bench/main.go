// Command bench measures nix-offload-hook against Nix's own build hook and
// against a local build, on the test bed (docs/TESTBED.md): real Nix, real
// sshd, simulated builder hosts on loopback, nothing mocked.
//
// For each local Nix (default 2.8 and 2.34; the builders run the same Nix)
// and each workload it times the whole nix-build, with a fresh local store,
// fresh builder hosts and a new salt every run, four ways:
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
//     the timing starts once its socket answers and it has warmed a
//     connection to every machine (a production broker is long-lived), and
//     it is stopped (SIGTERM) after the build. Its peak RSS (VmHWM) is read
//     before it is stopped.
//
// Workloads (no nixpkgs, /bin/sh builders): trivial (1 derivation, one
// builder), chain21 (21 derivations, each reading the previous output) and
// wide50 (50 independent derivations and a root that reads them all); the
// graphs use 2 builders × 4 slots.
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
	"github.com/nix-offload/nix-offload/internal/testbed"
)

// stdPath is the PATH every nix-build gets, on the host and inside a root:
// the stock hook looks up ssh in it.
const stdPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

const slotsPerBuilder = 4

var modes = []string{"local", "stock", "ours", "broker"}

type workload struct {
	name     string
	builders int    // builder hosts for the remote modes
	drvs     int    // derivations in the graph
	words    int    // words in the root output, a check that every input was read
	first    string // first word of the root output
	body     string // Nix expression for the graph, given mk
}

var workloads = map[string]workload{
	"trivial": {name: "trivial", builders: 1, drvs: 1, words: 1, first: "t",
		body: `mk "t" []`},
	"chain21": {name: "chain21", builders: 2, drvs: 21, words: 21, first: "c21",
		body: `builtins.head (builtins.foldl' (prev: i: [ (mk "c${toString i}" prev) ]) [] (builtins.genList (i: i + 1) 21))`},
	"wide50": {name: "wide50", builders: 2, drvs: 51, words: 51, first: "root",
		body: `mk "root" (builtins.genList (i: mk "w${toString (i + 1)}" []) 50)`},
}

// expr returns the workload's expression with salt in every derivation.
func (w workload) expr(salt string) string {
	return fmt.Sprintf(`
let
  salt = %q;
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
`, salt, w.body)
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
}

func main() {
	hook := flag.String("hook", "bin/nix-offload-hook", "the nix-offload-hook binary (static, CGO_ENABLED=0)")
	runs := flag.Int("runs", 3, "runs per workload, Nix and mode; the table shows medians")
	nixList := flag.String("nix", "2.8,2.34", "local Nix series to measure (the builders run the same one)")
	wlList := flag.String("workloads", "trivial,chain21,wide50", "workloads: trivial, chain21, wide50")
	modeList := flag.String("modes", strings.Join(modes, ","), "modes: local, stock, ours, broker")
	timeout := flag.Duration("timeout", 10*time.Minute, "limit for each nix-build; it is killed after that")
	rss := flag.Bool("rss", true, "also record the hook's peak RSS in one trivial build per Nix")
	trace := flag.Bool("trace", false, "instead of the table: one build per Nix, workload and mode with nix-build -v, its stderr time-stamped")
	prefix := flag.String("hook-prefix", "", "run our hook as `PREFIX… HOOK args` (sh words, e.g. 'strace -f -tt -o /tmp/hook.strace'); the prefix must exist in the Nix's root")
	flag.Parse()

	cfg := config{hook: *hook, runs: *runs, timeout: *timeout, rss: *rss, trace: *trace, hookPrefix: *prefix}
	cfg.nixes = splitList(*nixList)
	for _, n := range splitList(*wlList) {
		w, ok := workloads[n]
		if !ok {
			fmt.Fprintf(os.Stderr, "bench: unknown workload %q (trivial, chain21, wide50)\n", n)
			os.Exit(2)
		}
		cfg.workloads = append(cfg.workloads, w)
	}
	for _, m := range splitList(*modeList) {
		if !slices.Contains(modes, m) {
			fmt.Fprintf(os.Stderr, "bench: unknown mode %q (local, stock, ours, broker)\n", m)
			os.Exit(2)
		}
		cfg.modes = append(cfg.modes, m)
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
		brokerRSS: map[key][]int{}, brokerWarm: map[key][]time.Duration{}}

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
					if mode == "broker" {
						if kb := b.brokerRSS[k]; len(kb) > 0 {
							extra = fmt.Sprintf(" (broker VmHWM %.1f MiB, warm after %s)", float64(kb[len(kb)-1])/1024,
								fmtDur(b.brokerWarm[k][len(b.brokerWarm[k])-1]))
						}
					}
					fmt.Printf("  Nix %-5s %-8s %-6s run %d: %s%s\n", series, w.name, mode, r, fmtDur(d), extra)
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
	salt := randomHex(8)
	exprFile := filepath.Join(dir, "bench.nix")
	if err := os.WriteFile(exprFile, []byte(w.expr(salt)), 0o644); err != nil {
		return 0, err
	}
	store := testbed.NewStore(b.p)
	defer os.RemoveAll(store)

	mounts := []string{dir}
	env := []string{"PATH=" + stdPath, "HOME=/root"}
	args := []string{"nix-build", "--no-out-link", "--option", "substituters", ""}
	var builders []*testbed.Builder
	if mode != "local" {
		for range w.builders {
			bl := testbed.StartBuilder(b.p, nix)
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
		socket := ""
		if mode == "broker" {
			socket = filepath.Join(dir, "hook.sock")
		}
		conf := writeOffloadConfig(dir, socket, builders)
		mounts = append(mounts, filepath.Dir(b.cfg.hook))
		args = append(args, "--max-jobs", "0", "--option", "build-hook", b.cfg.hook)
		env = append(env, "NIX_OFFLOAD_CONFIG="+conf)
		if mode == "broker" {
			br, err := b.startBroker(nix, store, mounts, conf, socket, len(builders))
			if err != nil {
				return 0, err
			}
			k := key{nix.Series(), w.name, mode}
			b.brokerWarm[k] = append(b.brokerWarm[k], br.warm)
			defer func() {
				if kb := br.hwm(); kb > 0 {
					b.brokerRSS[k] = append(b.brokerRSS[k], kb)
				}
				if err := br.stop(); err != nil {
					fmt.Fprintf(os.Stderr, "bench: broker: %v\n%s", err, tailText(br.log.String(), 2000))
				}
			}()
		}
	}
	if b.cfg.trace {
		args = append(args, "-v")
	}
	args = append(args, exprFile)

	cmd := nix.Command(store, mounts, args...)
	cmd.Env = env
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	t0 := time.Now()
	if b.cfg.trace {
		cmd.Stderr = io.MultiWriter(&stderr, &stamper{w: os.Stdout, t0: t0})
	}
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	var timedOut atomic.Bool
	timer := time.AfterFunc(b.cfg.timeout, func() {
		timedOut.Store(true)
		testbed.KillCommand(cmd)
	})
	err = cmd.Wait()
	elapsed := time.Since(t0)
	timer.Stop()
	testbed.KillCommand(cmd)
	if timedOut.Load() {
		return 0, fmt.Errorf("killed after %v\n%s", b.cfg.timeout, tailText(stderr.String(), 2000))
	}
	if err != nil {
		return 0, fmt.Errorf("nix-build: %v\n%s", err, tailText(stderr.String(), 2000))
	}
	if mode == "broker" && (strings.Contains(stderr.String(), "going on without it") ||
		strings.Contains(stderr.String(), "without the broker")) {
		return 0, fmt.Errorf("broker: the hooks did not use the broker:\n%s", tailText(stderr.String(), 2000))
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
	return elapsed, nil
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

// measureSSH times, against a fresh builder of nix, `ssh -F SSHConfig bN
// true` (the handshake and session that every stock-hook build, and in
// embedded mode every one of ours, pays at least once) and `ssh bN nix-store
// --version` (the same plus starting a Nix process on the machine, as
// `nix-store --serve` does). Medians of 7.
func (b *bench) measureSSH(nix testbed.Nix) {
	bl := testbed.StartBuilder(b.p, nix)
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
	fmt.Fprintf(&s, "## Results: median of %d run(s), wall time of the whole nix-build\n\n", b.cfg.runs)
	s.WriteString("| workload | local Nix | local | stock hook | ours | broker | stock ÷ ours | ours ÷ local | stock ÷ broker | broker ÷ local |\n")
	s.WriteString("|---|---|---|---|---|---|---|---|---|---|\n")
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
				ratio(med["stock"], med["broker"]), ratio(med["broker"], med["local"]))
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
		s.WriteString("\n| Nix | workload | broker peak RSS (VmHWM) after the build: max (min–max over runs) | broker start to warm, median |\n|---|---|---|---|\n")
		for _, series := range b.cfg.nixes {
			for _, w := range b.cfg.workloads {
				k := key{series, w.name, "broker"}
				kb := b.brokerRSS[k]
				if len(kb) == 0 {
					continue
				}
				mib := func(v int) string { return fmt.Sprintf("%.1f MiB", float64(v)/1024) }
				fmt.Fprintf(&s, "| %s | %s | %s (%s–%s) | %s |\n", series, w.name, mib(slices.Max(kb)),
					mib(slices.Min(kb)), mib(slices.Max(kb)), fmtDur(median(b.brokerWarm[k])))
			}
		}
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
	cmd  *exec.Cmd
	log  *syncBuffer
	warm time.Duration // from start until the socket answered and every machine had a connection
}

// startBroker starts `HOOK daemon -config conf` in store's mount namespace,
// waits for its socket, then until every one of its machines has a warm
// connection or session (at most 10 s; the build then starts anyway).
func (b *bench) startBroker(nix testbed.Nix, store string, mounts []string, conf, socket string, machines int) (*runningBroker, error) {
	cmd := nix.Command(store, mounts, b.cfg.hook, "daemon", "-config", conf, "-drain", "30s")
	cmd.Env = []string{"PATH=" + stdPath, "HOME=/root"}
	br := &runningBroker{cmd: cmd, log: &syncBuffer{}}
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
	// Warm: every machine has a connection or an idle session.
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		st, err := c.Status(ctx)
		cancel()
		if err != nil {
			continue
		}
		warm := 0
		for _, m := range st.Machines {
			if m.Idle > 0 || m.Conns > 0 {
				warm++
			}
		}
		if len(st.Machines) == machines && warm == machines {
			break
		}
	}
	br.warm = time.Since(t0)
	return br, nil
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
