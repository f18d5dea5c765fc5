package slots

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/nix-offload/nix-offload/internal/machines"
)

func openDir(t *testing.T) *Dir {
	t.Helper()
	d, err := Open(filepath.Join(t.TempDir(), "state", "slots"))
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func machine(host string, jobs int) machines.Machine {
	return machines.Machine{Host: host, User: "root", ParallelBuilds: jobs, Systems: []string{"x86_64-linux"}, Enabled: true}
}

func mustLoad(t *testing.T, d *Dir, ms ...machines.Machine) map[string]int {
	t.Helper()
	load, err := d.Load(ms)
	if err != nil {
		t.Fatal(err)
	}
	return load
}

func mustAcquire(t *testing.T, d *Dir, m machines.Machine) *Slot {
	t.Helper()
	s, ok, err := d.Acquire(m)
	if err != nil || !ok {
		t.Fatalf("Acquire(%s) = %v, %v; want a slot", m.Name(), ok, err)
	}
	return s
}

func TestOpenCreatesPrivateDir(t *testing.T) {
	d := openDir(t)
	fi, err := os.Stat(d.Path())
	if err != nil {
		t.Fatal(err)
	}
	if !fi.IsDir() || fi.Mode().Perm() != 0o700 {
		t.Errorf("%s: mode %v, want a directory with mode 0700", d.Path(), fi.Mode())
	}
	if _, err := Open(d.Path()); err != nil {
		t.Errorf("Open of an existing directory: %v", err)
	}
	file := filepath.Join(d.Path(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(file); err == nil || !strings.HasPrefix(err.Error(), "slots: ") {
		t.Errorf("Open of a file: err = %v, want a slots: error", err)
	}
}

func TestAcquireUpToParallelBuilds(t *testing.T) {
	d := openDir(t)
	b1, b2 := machine("b1", 3), machine("b2", 1)
	if got := mustLoad(t, d, b1, b2); got["root@b1"] != 0 || got["root@b2"] != 0 || len(got) != 2 {
		t.Fatalf("Load of an empty dir = %v, want both 0", got)
	}

	var held []*Slot
	for i := range 3 {
		s := mustAcquire(t, d, b1)
		if s.Index() != i || s.Machine() != "root@b1" {
			t.Errorf("slot %d is %s #%d", i, s.Machine(), s.Index())
		}
		held = append(held, s)
		if got := mustLoad(t, d, b1)["root@b1"]; got != i+1 {
			t.Errorf("after %d acquired, Load = %d", i+1, got)
		}
	}
	if s, ok, err := d.Acquire(b1); ok || err != nil || s != nil {
		t.Fatalf("Acquire of a full machine = %v, %v, %v; want nil, false, nil", s, ok, err)
	}
	// Another machine's slots are separate.
	s2 := mustAcquire(t, d, b2)
	if got := mustLoad(t, d, b1, b2); got["root@b1"] != 3 || got["root@b2"] != 1 {
		t.Errorf("Load = %v, want b1 3, b2 1", got)
	}

	// Releasing the middle slot frees exactly that one, and it is the one handed out next.
	if err := held[1].Release(); err != nil {
		t.Fatal(err)
	}
	if err := held[1].Release(); err != nil {
		t.Errorf("second Release: %v", err)
	}
	if got := mustLoad(t, d, b1)["root@b1"]; got != 2 {
		t.Errorf("after a release, Load = %d, want 2", got)
	}
	if s := mustAcquire(t, d, b1); s.Index() != 1 {
		t.Errorf("reacquired slot %d, want 1", s.Index())
	} else {
		held[1] = s
	}

	for _, s := range append(held, s2) {
		if err := s.Release(); err != nil {
			t.Fatal(err)
		}
	}
	if got := mustLoad(t, d, b1, b2); got["root@b1"] != 0 || got["root@b2"] != 0 {
		t.Errorf("after releasing all, Load = %v", got)
	}
}

// Load only looks at the first ParallelBuilds slots: after parallel-builds is lowered, builds
// still running in higher slots are not counted, and the machine does not look overloaded.
func TestLoadFollowsConfiguredSlots(t *testing.T) {
	d := openDir(t)
	s0, s1 := mustAcquire(t, d, machine("b", 2)), mustAcquire(t, d, machine("b", 2))
	defer s0.Release()
	defer s1.Release()
	if got := mustLoad(t, d, machine("b", 1))["root@b"]; got != 1 {
		t.Errorf("Load with 1 slot = %d, want 1", got)
	}
	if got := mustLoad(t, d, machine("b", 4))["root@b"]; got != 2 {
		t.Errorf("Load with 4 slots = %d, want 2", got)
	}
}

// Slot files are close-on-exec: a process started while a slot is held does not keep it.
func TestSlotNotInherited(t *testing.T) {
	d := openDir(t)
	m := machine("b", 1)
	s := mustAcquire(t, d, m)
	h := startHelper(t, "lock", d.Path(), "", 0) // any child that stays alive will do
	h.expect("locked")
	if err := s.Release(); err != nil {
		t.Fatal(err)
	}
	if got := mustLoad(t, d, m)["root@b"]; got != 0 {
		t.Errorf("with a child alive, Load after Release = %d, want 0", got)
	}
	h.finish()
}

func TestFilesAreCloseOnExec(t *testing.T) {
	d := openDir(t)
	s := mustAcquire(t, d, machine("b", 1))
	defer s.Release()
	flags, _, errno := syscall.Syscall(syscall.SYS_FCNTL, s.f.Fd(), syscall.F_GETFD, 0)
	if errno != 0 {
		t.Fatal(errno)
	}
	if flags&syscall.FD_CLOEXEC == 0 {
		t.Errorf("slot file descriptor flags %#x lack FD_CLOEXEC", flags)
	}
}

// A slot held by another process counts, and comes free when that process is killed with
// SIGKILL: nothing is left to clean up.
func TestSlotHeldByOtherProcess(t *testing.T) {
	d := openDir(t)
	m := machine("b1", 2)
	h := startHelper(t, "hold", d.Path(), m.Host, m.ParallelBuilds)
	// The helper's machine has no user; use the same name here.
	m.User = ""
	h.expect("held 0")

	if got := mustLoad(t, d, m)["b1"]; got != 1 {
		t.Fatalf("Load with the helper holding a slot = %d, want 1", got)
	}
	// This process gets the other slot, then none.
	s := mustAcquire(t, d, m)
	if s.Index() != 1 {
		t.Errorf("got slot %d, want 1", s.Index())
	}
	if _, ok, err := d.Acquire(m); ok || err != nil {
		t.Errorf("Acquire with both slots held = %v, %v; want false, nil", ok, err)
	}
	if err := s.Release(); err != nil {
		t.Fatal(err)
	}

	if err := h.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	err := h.cmd.Wait()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("helper ended with %v, want killed by SIGKILL", err)
	}
	// The kernel closed the helper's files before it could be waited for.
	if got := mustLoad(t, d, m)["b1"]; got != 0 {
		t.Errorf("Load after the holder was killed = %d, want 0", got)
	}
}

// The main lock excludes another process: its Lock waits until this one unlocks, and then
// this process waits for it.
func TestMainLockAcrossProcesses(t *testing.T) {
	d := openDir(t)
	unlock, err := d.Lock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	h := startHelper(t, "lock", d.Path(), "", 0)
	h.expect("busy") // the helper found the lock held and is waiting
	unlock()
	unlock() // harmless
	h.expect("locked")

	// Now the helper holds it: our Lock waits, and gives up when its context ends.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	testOnlyLockBusy = cancel
	defer func() { testOnlyLockBusy = nil }()
	if unlock, err := d.Lock(ctx); !errors.Is(err, context.Canceled) {
		if err == nil {
			unlock()
		}
		t.Fatalf("Lock while the helper holds it: err = %v, want context.Canceled", err)
	}
	testOnlyLockBusy = nil

	h.finish()
	unlock, err = d.Lock(context.Background())
	if err != nil {
		t.Fatalf("Lock after the helper exited: %v", err)
	}
	unlock()
}

func TestLockDoneContext(t *testing.T) {
	d := openDir(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := d.Lock(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Lock with a done context: err = %v, want context.Canceled", err)
	}
}

// Goroutines of one process exclude each other too (flock locks belong to open files), and
// together never take more slots than a machine has.
func TestConcurrentGoroutines(t *testing.T) {
	d := openDir(t)
	m := machine("b", 3)
	const workers = 16
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		inside  int // goroutines holding the main lock; guarded by mu
		maxIn   int // guarded by mu
		got     []*Slot
		refused int
	)
	errs := make(chan error, workers)
	for range workers {
		wg.Go(func() {
			unlock, err := d.Lock(context.Background())
			if err != nil {
				errs <- err
				return
			}
			mu.Lock()
			inside++
			maxIn = max(maxIn, inside)
			mu.Unlock()

			load, err := d.Load([]machines.Machine{m})
			var (
				s  *Slot
				ok bool
			)
			if err == nil && load[m.Name()] < m.ParallelBuilds {
				s, ok, err = d.Acquire(m)
			}

			mu.Lock()
			inside--
			if ok {
				got = append(got, s)
			} else {
				refused++
			}
			mu.Unlock()
			unlock()
			if err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if maxIn != 1 {
		t.Errorf("%d goroutines held the main lock at once", maxIn)
	}
	if len(got) != 3 || refused != workers-3 {
		t.Errorf("%d slots taken, %d refused; want 3 and %d", len(got), refused, workers-3)
	}
	for _, s := range got {
		s.Release()
	}
}

func TestFileName(t *testing.T) {
	long := strings.Repeat("a", 300)
	longSlash := strings.Repeat("/", 100)
	tests := []struct{ name, want string }{
		{"root@builder1.example.org:2222", "root@builder1.example.org:2222-3"},
		{"[::1]:22", "%5B::1%5D:22-3"},
		{"a/b", "a%2Fb-3"},
		{"a%2Fb", "a%252Fb-3"},
		{"..", "%2E.-3"},
		{".hidden", "%2Ehidden-3"},
		{"a b\x00c\nd", "a%20b%00c%0Ad-3"},
		{"héllo", "h%C3%A9llo-3"},
		{"", "%-3"},
	}
	for _, tt := range tests {
		if got := FileName(tt.name, 3); got != tt.want {
			t.Errorf("FileName(%q, 3) = %q, want %q", tt.name, got, tt.want)
		}
	}

	// Long names are cut and hashed: short enough, stable, distinct, safe.
	seen := map[string]string{}
	for _, name := range []string{long, long + "b", long[:199], long[:200], long[:201], longSlash, longSlash + "/", "a/b", "a_b", "a%2Fb"} {
		f := FileName(name, 1023)
		if len(f) > 255 {
			t.Errorf("FileName(%q) is %d bytes", name, len(f))
		}
		if strings.ContainsAny(f, "/\x00") || f == "." || f == ".." || strings.HasPrefix(f, ".") {
			t.Errorf("FileName(%q) = %q is not a safe file name", name, f)
		}
		if f != FileName(name, 1023) {
			t.Errorf("FileName(%q) is not stable", name)
		}
		if other, dup := seen[f]; dup {
			t.Errorf("FileName(%q) = FileName(%q) = %q", name, other, f)
		}
		seen[f] = name
	}
	if got := FileName(long, 0); !strings.HasPrefix(got, strings.Repeat("a", 100)) || !strings.Contains(got, "~") {
		t.Errorf("FileName(300 × a) = %q, want a readable prefix and a ~hash", got)
	}
	if got := FileName(long[:200], 0); got != long[:200]+"-0" {
		t.Errorf("a 200-byte name is hashed: %q", got)
	}
}

// Machines with odd names get working slot files.
func TestOddMachineNames(t *testing.T) {
	d := openDir(t)
	for _, m := range []machines.Machine{
		{Host: "::1", Port: 2222, ParallelBuilds: 1},
		{Host: strings.Repeat("x", 300), ParallelBuilds: 1},
		{Host: "../../escape", ParallelBuilds: 1},
	} {
		s := mustAcquire(t, d, m)
		if got := mustLoad(t, d, m)[m.Name()]; got != 1 {
			t.Errorf("%s: Load = %d, want 1", m.Name(), got)
		}
		s.Release()
	}
	entries, err := os.ReadDir(d.Path())
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 3 {
		t.Errorf("%d files in the slot dir, want 3: %v", len(entries), entries)
	}
}
