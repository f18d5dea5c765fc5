package testbed

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// baseNixConf is the nix.conf every Nix in the test bed reads: single-user as root, no
// sandbox (Debian's Nix cannot sandbox here), no network.
const baseNixConf = "build-users-group =\nsandbox = false\nsubstituters =\n"

// Command returns a command that runs argv with this Nix against a private store: in a new
// private mount namespace where storeDir (a host directory, as from [NewStore]) is
// bind-mounted at /nix. argv[0] is looked up in PATH inside the Nix's root (the caller's
// PATH, or a standard one if the caller's environment has none).
//
// For a chroot Nix the namespace also has /proc, /dev (rbind), empty private tmpfs on /tmp
// and /root, and each host path in mounts (a directory or a file) bind-mounted at the same
// path inside the root, so a test's directories, the hook binary and a builder's ssh files
// keep their names. For the host's Nix, mounts is ignored: every host path is visible.
//
// The environment is whatever the caller sets on the Cmd (by default the test process's),
// plus NIX_CONF_DIR=/etc/nix, where the namespace has only the test bed's nix.conf
// (build-users-group =, sandbox = false, substituters =), and NIX_USER_CONF_FILES= so no
// user nix.conf is read either. To add settings, set NIX_CONFIG or pass --option.
//
// The working directory is cmd.Dir, "/" unless the caller changes it; for a chroot Nix it
// must be "/" or lie under one of mounts.
//
// The command is its own process group (Setpgid) and gets SIGKILL if the test process dies
// (Pdeathsig); change cmd.SysProcAttr's fields rather than replacing it, because it also
// asks for the new mount namespace (and the command refuses to run without one).
// syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) ends the command and everything that
// stays in its process group, which includes nix-build, nix-daemon and their workers but
// not the builds they start: those call setsid. [KillCommand] ends those too.
//
// Errors in the arguments (a relative path, an empty storeDir, a zero Nix) are reported by
// cmd.Start.
func (n Nix) Command(storeDir string, mounts []string, argv ...string) *exec.Cmd {
	spec := nsSpec{root: n.Root, store: storeDir, mounts: mounts, nixConf: baseNixConf, hideHome: n.chroot()}
	cmd := newNSCommand(spec, argv)
	switch {
	case n.Root == "" || n.Version == "":
		cmd.Err = errors.New("testbed: Command on a zero Nix; get one from Lookup or All")
	case len(argv) == 0:
		cmd.Err = errors.New("testbed: Command without argv")
	case storeDir == "":
		cmd.Err = errors.New("testbed: Command without a store directory; use NewStore")
	default:
		cmd.Err = spec.check()
	}
	return cmd
}

// NixConfEnv returns the environment variables that make a Nix command run outside
// [Nix.Command] (nix-hash, nix-instantiate --store dummy://) read the test bed's nix.conf
// instead of the machine's: a fresh Debian has no /etc/nix/nix.conf, and Nix's built-in
// build-users-group = nixbld names a group that does not exist there. Append them to
// os.Environ().
func NixConfEnv(tb TB) []string {
	tb.Helper()
	dir := tb.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "nix.conf"), []byte(baseNixConf), 0o644); err != nil {
		tb.Fatalf("testbed: %v", err)
	}
	return []string{"NIX_CONF_DIR=" + dir, "NIX_USER_CONF_FILES=", "NIX_CONFIG="}
}

// NewStore returns a new empty directory that [Nix.Command] can mount at /nix; Nix creates
// its store and database there on first use. It is removed when the test ends, after the
// test's cleanups registered later have run; stop every process using it before then.
func NewStore(tb TB) string {
	tb.Helper()
	dir := tb.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		tb.Fatalf("testbed: %v", err)
	}
	return dir
}

// InitStore makes storeDir (a new directory, as from [NewStore]) an initialised store of
// this Nix, by running `nix-store --init` in it, and fails the test if that fails.
//
// Call it before two processes may open the store at once: a broker and a nix-build,
// say. Nix initialises a store on first use, and that first use is not safe to race:
// every Nix 2.8 process that finds no /nix/var/nix/gcroots creates it and then the
// symlink gcroots/profiles, so of two processes opening a fresh store together one can
// fail with "creating symlink from '/nix/var/nix/gcroots/profiles' to
// '/nix/var/nix/profiles': File exists" (3 of 80 processes, four at a time, on the test
// bed; Nix 2.26 and 2.34 make no such link), and both create the database, which can
// fail with "SQLite database '/nix/var/nix/db/db.sqlite' is busy". A real machine's
// store is initialised once, by its installer. It also keeps the cost of creating the
// database out of whatever is timed next.
func (n Nix) InitStore(tb TB, storeDir string) {
	tb.Helper()
	if err := n.initStore(storeDir); err != nil {
		tb.Fatalf("testbed: %v", err)
	}
}

func (n Nix) initStore(storeDir string) error {
	cmd := n.Command(storeDir, nil, "nix-store", "--init")
	cmd.Env = []string{"PATH=" + defaultPath, "HOME=/root"}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nix-store --init in %s (%v): %v: %s", storeDir, n, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// KillCommand ends a started command from [Nix.Command] and everything it started: SIGKILL
// to its process group, then to every process left in its mount namespace (builds, which
// Nix puts in sessions of their own, and their children), until none is left. It does not
// wait for cmd; call cmd.Wait afterwards. It must be called before cmd.Wait: once the
// command's first process has exited, its namespace can no longer be found and only the
// process group is killed.
func KillCommand(cmd *exec.Cmd) error {
	if cmd.Process == nil {
		return errors.New("testbed: KillCommand: command was not started")
	}
	pid := cmd.Process.Pid
	// The namespace is held open while its processes are killed: a namespace that
	// nothing holds is freed when its last process exits, and the kernel gives its
	// number to the next new one, a parallel test's nix-store among them.
	nsFile, nsErr := os.Open("/proc/" + strconv.Itoa(pid) + "/ns/mnt")
	var ns nsID
	if nsErr == nil {
		defer nsFile.Close()
		ns, nsErr = nsOfFile(nsFile)
	}
	if err := syscall.Kill(-pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("testbed: KillCommand: %v", err)
	}
	if nsErr != nil {
		return nil // exited already (or a zombie): only its group was left to kill
	}
	return killNS(ns, killTimeout)
}

// CommandProcesses returns a function that lists the processes of a started command from
// [Nix.Command]: those in its mount namespaces and their descendants, sorted, including the
// builds that Nix starts in sessions of their own, and still after the command itself has
// exited. Nix can move itself into a mount namespace of its own (Nix 2.8's nix-store
// --serve does, as it starts), so each call while the command runs also notes the one it
// is in then; call it once after the command has got going. Call CommandProcesses right
// after cmd.Start; the namespaces are held until the test ends.
func CommandProcesses(tb TB, cmd *exec.Cmd) func() []int {
	tb.Helper()
	if cmd.Process == nil {
		tb.Fatalf("testbed: CommandProcesses: command was not started")
	}
	var mu sync.Mutex
	var held []nsID
	hold := func() error {
		f, err := os.Open(fmt.Sprintf("/proc/%d/ns/mnt", cmd.Process.Pid))
		if err != nil {
			return err
		}
		ns, err := nsOfFile(f)
		if err != nil || sharedNS(ns) || slices.Contains(held, ns) {
			f.Close()
			return err
		}
		held = append(held, ns)
		tb.Cleanup(func() { f.Close() })
		return nil
	}
	if err := hold(); err != nil || len(held) == 0 {
		tb.Fatalf("testbed: CommandProcesses: the command is not in a mount namespace of its own (%v)", err)
	}
	return func() []int {
		mu.Lock()
		defer mu.Unlock()
		_ = hold() // fails once the command has exited: its namespaces are all held by then
		var pids []int
		for _, ns := range held {
			pids = append(pids, pidsIn(ns)...)
		}
		slices.Sort(pids)
		return slices.Compact(pids)
	}
}

// killTimeout bounds how long the test bed waits for SIGKILLed processes to disappear.
const killTimeout = 10 * time.Second

// nsSpec describes the mount namespace a test bed process starts in.
type nsSpec struct {
	root     string   // "/" for the host, else the chroot directory
	store    string   // host directory mounted at /nix; "" mounts none
	mounts   []string // host paths mounted at the same path inside root (chroot only)
	nixConf  string   // contents of /etc/nix/nix.conf, on a tmpfs that also tags the owner
	hideHome bool     // mount an empty tmpfs over /root
	// storeTmpfs, if not 0, mounts a tmpfs of this many bytes at /nix instead of store.
	storeTmpfs int64
	// netns, if set, is a network namespace file (/run/netns/NAME) the command enters.
	netns string
	// loadavg, if set, is a host file bind-mounted over /proc/loadavg (a path in mounts, or
	// under one, for a chroot).
	loadavg string
}

// check reports arguments the script cannot handle.
func (s nsSpec) check() error {
	if !filepath.IsAbs(s.root) {
		return fmt.Errorf("testbed: root %q is not an absolute path", s.root)
	}
	if s.netns != "" && !filepath.IsAbs(s.netns) {
		return fmt.Errorf("testbed: network namespace %q is not an absolute path", s.netns)
	}
	if s.store != "" && !filepath.IsAbs(s.store) {
		return fmt.Errorf("testbed: store directory %q is not an absolute path", s.store)
	}
	for _, m := range s.mounts {
		if !filepath.IsAbs(m) {
			return fmt.Errorf("testbed: mount %q is not an absolute path", m)
		}
		if _, err := os.Stat(m); err != nil {
			return fmt.Errorf("testbed: mount: %v", err)
		}
	}
	return nil
}

// newNSCommand returns a command that runs s.script() with argv as its arguments in a new
// mount namespace. Go's Unshareflags makes the namespace before exec (and marks every
// mount private), so once Start returns the process is in it.
func newNSCommand(s nsSpec, argv []string) *exec.Cmd {
	cmd := exec.Command("/bin/sh", append([]string{"-c", s.script(), "testbed"}, argv...)...)
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid:      true,
		Pdeathsig:    syscall.SIGKILL,
		Unshareflags: syscall.CLONE_NEWNS,
	}
	return cmd
}

// script returns the sh script that sets up the namespace and execs "$@".
func (s nsSpec) script() string {
	r := strings.TrimSuffix(filepath.Clean(s.root), "/") // "" for the host
	q := shQuote
	mount, mkdir := q(mustTool("mount")), q(mustTool("mkdir"))
	var b strings.Builder
	line := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }

	line("set -eu")
	// Never mount in the caller's namespace: that would put a test store over the
	// machine's /nix. This happens only if the caller replaced cmd.SysProcAttr.
	if self, err := os.Readlink("/proc/self/ns/mnt"); err == nil {
		line(`if [ "$(%s /proc/self/ns/mnt)" = %s ]; then echo 'testbed: not in a private mount namespace (was cmd.SysProcAttr replaced rather than changed?); mounting nothing' >&2; exit 125; fi`,
			q(mustTool("readlink")), q(self))
	}
	line(`: "${PATH:=%s}"; export PATH`, defaultPath)
	switch {
	case s.storeTmpfs > 0:
		line("%s -p %s", mkdir, q(r+"/nix"))
		line("%s -t tmpfs -o size=%d,mode=0755 testbed-store %s", mount, s.storeTmpfs, q(r+"/nix"))
	case s.store != "":
		line("%s -p %s", mkdir, q(r+"/nix"))
		line("%s --bind %s %s", mount, q(s.store), q(r+"/nix"))
	}
	// Entering a network namespace is the last step before exec: the mounts above need
	// none, and the chroot would hide nsenter.
	enter := ""
	if s.netns != "" {
		enter = q(mustTool("nsenter")) + " --net=" + q(s.netns) + " "
	}
	// This tmpfs's source names the test process, for reapOrphans.
	line("%s -p %s", mkdir, q(r+"/etc/nix"))
	line("%s -t tmpfs -o mode=0755 %s %s", mount, q(ownerTag()), q(r+"/etc/nix"))
	line("printf '%%s' %s >%s", q(s.nixConf), q(r+"/etc/nix/nix.conf"))
	line("NIX_CONF_DIR=/etc/nix NIX_USER_CONF_FILES=; export NIX_CONF_DIR NIX_USER_CONF_FILES")
	if s.hideHome {
		line("%s -t tmpfs -o mode=0700 testbed-home %s", mount, q(r+"/root"))
	}
	if r == "" {
		if s.loadavg != "" {
			line("%s --bind %s /proc/loadavg", mount, q(s.loadavg))
		}
		line(`exec %s"$@"`, enter)
		return b.String()
	}
	line("%s -t proc proc %s", mount, q(r+"/proc"))
	line("%s --rbind /dev %s", mount, q(r+"/dev"))
	line("%s -t tmpfs -o mode=1777 testbed-tmp %s", mount, q(r+"/tmp"))
	for _, m := range s.mounts {
		m = filepath.Clean(m)
		t := q(r + m)
		line("if [ -d %s ]; then %s -p %s; else %s -p %s; [ -e %s ] || %s %s; fi",
			q(m), mkdir, t, mkdir, q(r+filepath.Dir(m)), t, q(mustTool("touch")), t)
		line("%s --bind %s %s", mount, q(m), t)
	}
	if s.loadavg != "" {
		line("%s --bind %s %s", mount, q(s.loadavg), q(r+"/proc/loadavg"))
	}
	// chroot(8) changes to the new /; go back to the caller's directory inside.
	line(`exec %s%s %s /bin/sh -c 'cd "$1" || { echo "testbed: working directory $1 is not visible inside the Nix root (add it to mounts)" >&2; exit 125; }; shift; exec "$@"' testbed "$PWD" "$@"`,
		enter, q(mustTool("chroot")), q(r))
	return b.String()
}

// shQuote quotes s for sh.
func shQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
