// Package testbed runs real Nix and real sshd on one Linux machine, for integration tests
// and benchmarks: several Nix versions, private stores, and simulated builder hosts that
// each have their own address, host key and /nix. scripts/setup and scripts/testbed-roots
// install what it needs (the README's test bed section says what); nothing here is a mock.
//
// # Requirements
//
// Everything needs root, mount(8) and chroot(8), because every process the test bed starts
// lives in a private mount namespace (see Isolation). The Nix versions come from:
//
//   - Nix 2.8: the host's Debian 12 nix-bin (apt-get install nix-bin), /usr/bin/nix-store.
//   - Nix 2.26 and Nix 2.34: the Debian trixie and forky roots that scripts/testbed-roots
//     builds under $NIX_OFFLOAD_ROOTS (default /var/cache/nix-offload/roots), run by chroot.
//
// Builders also need sshd in the Nix's root (openssh-server) and ssh on the host
// (openssh-client). When something is missing, [Lookup], [All], [RequireRoot] and
// [StartBuilder] skip the test and say what is missing and how to get it. With
// NIX_OFFLOAD_TESTBED_REQUIRE=1 in the environment they fail instead, so that CI cannot
// pass by skipping; [All] then also fails unless Nix 2.8, 2.26 and 2.34 are all there.
// Tests that need something else of the machine (a program, root to act as another user)
// go without it by the same rule: [Unavailable], [Tool], [GoTool], [RequireUser].
//
// # Isolation
//
// [Nix.Command] and [StartBuilder] start their process in a new private mount namespace in
// which a host directory is bind-mounted over /nix, so each test and each builder host has
// its own store while sharing one machine. In the same namespace /etc/nix is an empty tmpfs
// holding only the test bed's nix.conf (build-users-group =, sandbox = false,
// substituters =), so the host's Nix configuration does not matter. For a chroot Nix
// (Root != "/") the namespace also gets /proc, /dev (rbind), a private tmpfs on /tmp and on
// /root, and bind mounts of the host paths the caller names, at the same path inside the
// root. Nothing is ever mounted in the caller's namespace, so the mounts vanish with the
// last process of the namespace; the Debian roots are only read (a mount target outside
// /tmp is created as an empty directory inside the root).
//
// Builder hosts listen only on loopback addresses, 127.0.0.2 to 127.0.0.254, one address
// per builder. A builder's address is reserved for the life of the builder with an
// abstract unix socket, so test processes running side by side never share one. A
// builder started [WithNetNS] lives in a network namespace of its own instead, reached
// through a veth pair on a /30 of 10.213.0.0/16 (reserved the same way), so that a test
// can cut its link or make it slow and lossy.
//
// # Stopping processes
//
// Nix runs each build with setsid(2), so a build leaves the process group of the nix-build
// or nix-daemon that started it; sshd does the same for every session. The test bed
// therefore finds "the processes of" a command or builder by their mount namespace (and
// their descendants): [Builder.Processes], [Builder.Kill], [Builder.Stop] and [KillCommand]
// work this way. A build that creates its own mount namespace would still be found as a
// descendant unless it also double-forks.
//
// If the test binary dies (a -timeout panic, SIGKILL), Pdeathsig kills the first process
// of each namespace (sshd, nix-build, nix-daemon), but builds and ssh sessions can live
// on. Each namespace is tagged with the test process that made it, and the first
// [RequireRoot] of the next test process ends every namespace whose owner is gone.
package testbed

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
)

// Nix is one Nix installation the test bed can run.
type Nix struct {
	// Version is the version the installation reports, as in "2.26.3".
	Version string
	// Root is "/" for the host's Nix, else the directory of the Debian root that holds it.
	Root string
}

// Series returns the major and minor version, as in "2.26": the form [Lookup] takes.
func (n Nix) Series() string { return series(n.Version) }

// String returns "Nix 2.26.3", with the root for a chroot Nix.
func (n Nix) String() string {
	if n.Root == "/" {
		return "Nix " + n.Version
	}
	return "Nix " + n.Version + " (" + n.Root + ")"
}

// chroot reports whether n runs inside a Debian root rather than on the host.
func (n Nix) chroot() bool { return n.Root != "/" }

// DefaultRoots is where scripts/testbed-roots puts the Debian roots unless
// NIX_OFFLOAD_ROOTS says otherwise.
const DefaultRoots = "/var/cache/nix-offload/roots"

// RootsDir returns the directory that holds the Debian roots: $NIX_OFFLOAD_ROOTS, else
// [DefaultRoots].
func RootsDir() string {
	if d := os.Getenv("NIX_OFFLOAD_ROOTS"); d != "" {
		return d
	}
	return DefaultRoots
}

// candidate is one place a Nix may be: the host or a Debian root.
type candidate struct {
	where string // "host" or the root's name ("trixie")
	root  string // "/" or the root's directory
	hint  string // how to get it
}

// The Nix versions the test bed knows about, in order: Lookup and All search them.
// Lookup accepts any series, so a host with another Debian's nix-bin also works.
func candidates() []candidate {
	roots := RootsDir()
	rootHint := "run scripts/testbed-roots"
	if os.Getenv("NIX_OFFLOAD_ROOTS") == "" {
		rootHint += " (or point NIX_OFFLOAD_ROOTS at a directory that has the roots)"
	} else {
		rootHint = "NIX_OFFLOAD_ROOTS=" + roots + " scripts/testbed-roots"
	}
	return []candidate{
		{where: "host", root: "/", hint: "apt-get install nix-bin (Debian 12 ships Nix 2.8.0)"},
		{where: "trixie", root: filepath.Join(roots, "trixie"), hint: rootHint},
		{where: "forky", root: filepath.Join(roots, "forky"), hint: rootHint},
	}
}

// knownSeries maps each version the project tests against to where it comes from, for
// the skip message when it is missing.
var knownSeries = map[string]string{"2.8": "host", "2.26": "trixie", "2.34": "forky"}

// probe results, one per root directory, computed once per process.
var (
	probeMu    sync.Mutex
	probeCache = map[string]*probeResult{}
)

type probeResult struct {
	once sync.Once
	nix  Nix
	err  error
}

// probeNix runs `nix-store --version` in root and returns what it found.
func probeNix(root string) (Nix, error) {
	probeMu.Lock()
	p := probeCache[root]
	if p == nil {
		p = &probeResult{}
		probeCache[root] = p
	}
	probeMu.Unlock()
	p.once.Do(func() { p.nix, p.err = probeNixOnce(root) })
	return p.nix, p.err
}

func probeNixOnce(root string) (Nix, error) {
	if root == "/" {
		path, err := lookTool("nix-store")
		if err != nil {
			return Nix{}, errors.New("no nix-store in /usr/local/bin, /usr/bin or /bin")
		}
		if real, err := filepath.EvalSymlinks(path); err == nil && strings.HasPrefix(real, "/nix/") {
			return Nix{}, fmt.Errorf("nix-store is %s, inside /nix, which the test bed replaces by a private store", real)
		}
	} else {
		if _, err := os.Stat(root); err != nil {
			return Nix{}, fmt.Errorf("%s does not exist", root)
		}
		if _, err := os.Stat(filepath.Join(root, "usr/bin/nix-store")); err != nil {
			return Nix{}, fmt.Errorf("%s has no usr/bin/nix-store (a half-built root? remove it and rebuild)", root)
		}
	}
	cmd := newNSCommand(nsSpec{root: root, nixConf: baseNixConf, hideHome: root != "/"}, []string{"nix-store", "--version"})
	out, err := cmd.Output()
	if err != nil {
		return Nix{}, fmt.Errorf("nix-store --version in %s: %v%s", root, err, stderrOf(err))
	}
	// "nix-store (Nix) 2.26.3"
	fields := strings.Fields(string(out))
	if len(fields) == 0 {
		return Nix{}, fmt.Errorf("nix-store --version in %s printed nothing", root)
	}
	v := fields[len(fields)-1]
	if series(v) == "" {
		return Nix{}, fmt.Errorf("nix-store --version in %s printed %q, not a version", root, strings.TrimSpace(string(out)))
	}
	return Nix{Version: v, Root: root}, nil
}

// series returns "2.26" for "2.26.3" (and for "2.26"), "" if v does not look like a version.
func series(v string) string {
	parts := strings.SplitN(v, ".", 3)
	if len(parts) < 2 || parts[0] == "" || parts[1] == "" {
		return ""
	}
	for _, p := range parts[:2] {
		for _, c := range p {
			if c < '0' || c > '9' {
				return ""
			}
		}
	}
	return parts[0] + "." + parts[1]
}

// stderrOf returns the stderr an *exec.ExitError captured, as ": <text>".
func stderrOf(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) && len(ee.Stderr) > 0 {
		return ": " + strings.TrimSpace(string(ee.Stderr))
	}
	return ""
}

// Lookup returns the Nix of the given series ("2.8", "2.26", "2.34"; any "MAJOR.MINOR"
// works) from the host or the Debian roots. When there is none, or the machine cannot run
// the test bed at all (see [RequireRoot]), it skips the test with what is missing and how
// to get it.
func Lookup(tb TB, version string) Nix {
	tb.Helper()
	RequireRoot(tb)
	if series(version) != version {
		tb.Fatalf("testbed: Lookup(%q): want a MAJOR.MINOR series such as \"2.26\"", version)
	}
	var seen []string
	for _, c := range candidates() {
		n, err := probeNix(c.root)
		if err != nil {
			seen = append(seen, fmt.Sprintf("%s: %v", c.where, err))
			continue
		}
		if n.Series() == version {
			return n
		}
		seen = append(seen, fmt.Sprintf("%s: Nix %s", c.where, n.Version))
	}
	hint := "install a Nix " + version + " on the host or in a root under " + RootsDir()
	if where, ok := knownSeries[version]; ok {
		for _, c := range candidates() {
			if c.where == where {
				hint = c.hint
			}
		}
	}
	unavailable(tb, "testbed: no Nix %s here (%s)\nhint: %s", version, strings.Join(seen, "; "), hint)
	return Nix{}
}

// All returns every Nix the test bed can run, one per series, the host's first. It skips
// the test if there is none. With NIX_OFFLOAD_TESTBED_REQUIRE=1 it fails the test unless
// every series the project tests against (2.8, 2.26 and 2.34) is among them, so that a
// missing root cannot make a test quietly run fewer versions.
func All(tb TB) []Nix {
	tb.Helper()
	RequireRoot(tb)
	var seen []string
	var nixes []Nix
	have := map[string]bool{}
	for _, c := range candidates() {
		n, err := probeNix(c.root)
		if err != nil {
			seen = append(seen, fmt.Sprintf("%s: %v (hint: %s)", c.where, err, c.hint))
			continue
		}
		if have[n.Series()] {
			continue
		}
		have[n.Series()] = true
		nixes = append(nixes, n)
	}
	if len(nixes) == 0 {
		unavailable(tb, "testbed: no Nix here\n%s", strings.Join(seen, "\n"))
	}
	if missing := missingSeries(have); len(missing) > 0 && required() {
		unavailable(tb, "testbed: no Nix %s here, so the test would run only against %v\n%s",
			strings.Join(missing, ", "), nixes, strings.Join(seen, "\n"))
	}
	return nixes
}

// missingSeries returns the series of knownSeries that have lacks, in the order of
// candidates.
func missingSeries(have map[string]bool) []string {
	var missing []string
	for _, c := range candidates() {
		for v, where := range knownSeries {
			if where == c.where && !have[v] {
				missing = append(missing, v)
			}
		}
	}
	return missing
}

// RequireRoot skips the test unless the process is root and can create a mount namespace
// and find mount, chroot and friends. The first call in a process also ends the processes
// left in the namespaces of test processes that died (see "Stopping processes").
func RequireRoot(tb TB) {
	tb.Helper()
	if err := canRunTestbed(); err != nil {
		unavailable(tb, "testbed: %v", err)
	}
	reapOnce.Do(func() {
		n, err := reapOrphans()
		if n > 0 || err != nil {
			tb.Logf("testbed: ended the processes of %d namespaces left by test processes that died (%v)", n, err)
		}
		// After their processes: a network namespace outlives none of them.
		if n, err := reapNets(); n > 0 || err != nil {
			tb.Logf("testbed: removed %d network namespaces and links left by test processes that died (%v)", n, err)
		}
	})
}

// reapOnce makes the first RequireRoot of a process end what dead test processes left.
var reapOnce sync.Once

var canRunTestbed = sync.OnceValue(func() error {
	if os.Geteuid() != 0 {
		return errors.New("needs root (private mount namespaces, bind mounts, chroot, sshd); run the tests as root")
	}
	for _, t := range []string{"sh", "mount", "chroot", "mkdir", "touch", "readlink"} {
		if _, err := lookTool(t); err != nil {
			return fmt.Errorf("%s not found in /usr/sbin, /usr/bin, /sbin or /bin; hint: apt-get install util-linux coreutils", t)
		}
	}
	cmd := exec.Command("/bin/sh", "-c", "exit 0")
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("cannot create a mount namespace (unshare(CLONE_NEWNS)): %v; a container may need --privileged", err)
	}
	return nil
})

// unavailable skips the test, or fails it when NIX_OFFLOAD_TESTBED_REQUIRE=1.
func unavailable(tb TB, format string, args ...any) {
	tb.Helper()
	if required() {
		tb.Fatalf(format+"\n(NIX_OFFLOAD_TESTBED_REQUIRE=1 turns this skip into a failure)", args...)
	}
	tb.Skipf(format, args...)
}

// required reports whether NIX_OFFLOAD_TESTBED_REQUIRE=1 asks for every test to run.
func required() bool { return os.Getenv("NIX_OFFLOAD_TESTBED_REQUIRE") == "1" }

// Unavailable is the one rule by which a test that needs something of the machine (root,
// a program, a file) goes without it: it skips the test with the message, which should
// say what is missing and how to get it, or fails it when NIX_OFFLOAD_TESTBED_REQUIRE=1
// (as in CI), so that no run can pass by skipping. Every skip of a test that could run
// on a well set-up machine goes through here.
func Unavailable(tb TB, format string, args ...any) {
	tb.Helper()
	unavailable(tb, format, args...)
}

// Tool returns the path of the program name, from PATH or the standard directories
// (/usr/local/sbin … /bin), or goes through [Unavailable] with hint (how to install it).
func Tool(tb TB, name, hint string) string {
	tb.Helper()
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	if p, err := lookTool(name); err == nil {
		return p
	}
	unavailable(tb, "testbed: %s not found in PATH or %s; hint: %s", name, strings.Join(toolDirs, ", "), hint)
	return ""
}

// GoTool returns the go command (from PATH, else /usr/local/go/bin/go), for tests that
// build a helper program or run the Makefile, or goes through [Unavailable].
func GoTool(tb TB) string {
	tb.Helper()
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	const local = "/usr/local/go/bin/go"
	if _, err := os.Stat(local); err == nil {
		return local
	}
	unavailable(tb, "testbed: no go command in PATH or %s; hint: put Go >= 1.26 on PATH", local)
	return ""
}

// System returns the Nix system type of this machine ("x86_64-linux"), or goes through
// [Unavailable] on an architecture the test bed has none for.
func System(tb TB) string {
	tb.Helper()
	switch runtime.GOARCH {
	case "amd64":
		return "x86_64-linux"
	case "arm64":
		return "aarch64-linux"
	}
	unavailable(tb, "testbed: no Nix system type known for GOARCH %s", runtime.GOARCH)
	return ""
}

// RequireUser is [RequireRoot] for tests that need root only to act as other users (to
// chown, to run a helper under another uid), not the mount namespaces of the test bed.
func RequireUser(tb TB, why string) {
	tb.Helper()
	if os.Geteuid() != 0 {
		unavailable(tb, "testbed: needs root, %s; run the tests as root", why)
	}
}

// SharedDir returns a new directory that every user of the machine can reach and read (mode
// 0755, in the system's temporary directory; those of TB.TempDir are 0700), for a test that
// runs something as another user. It is removed at the end of the test.
func SharedDir(tb TB, prefix string) string {
	tb.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		tb.Fatalf("testbed: %v", err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		tb.Fatalf("testbed: %v", err)
	}
	return dir
}

// toolDirs is where the test bed looks for the programs it runs itself, whatever the
// caller's PATH says.
var toolDirs = []string{"/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"}

// defaultPath is the PATH a command gets when the caller's environment has none.
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// lookTool finds a program in toolDirs.
func lookTool(name string) (string, error) {
	for _, d := range toolDirs {
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: not found", name)
}

// mustTool is lookTool for programs canRunTestbed has already checked.
func mustTool(name string) string {
	p, err := lookTool(name)
	if err != nil {
		panic("testbed: " + err.Error())
	}
	return p
}
