package localstore

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nix-community/go-nix/pkg/nixhash"
	"github.com/nix-offload/nix-offload/internal/nar"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/testbed"
)

// The integration test runs on every Nix of the test bed. Store "remote" (B)
// builds a few derivations; their outputs are then added to store "local"
// (A) with AddOutputs while the test holds the locks nix-daemon's worker
// would hold, as it does while the hook runs.

// addBound is how long AddOutputs may take for a few small paths. A method
// that waits for the worker's lock would never finish.
const addBound = 20 * time.Second

// bed is one test bed store and a Store on it.
type bed struct {
	nix   testbed.Nix
	dir   string // bound over /nix
	store *Store
}

func newBed(t *testing.T, nix testbed.Nix) *bed {
	t.Helper()
	dir := testbed.NewStore(t)
	return &bed{nix: nix, dir: dir, store: openStore(t, nix, dir, nil)}
}

// openStore opens a Store on dir. wrap, if set, may replace the commands
// the Store runs.
func openStore(t *testing.T, nix testbed.Nix, dir string, wrap func(argv []string) []string) *Store {
	t.Helper()
	s, err := Open(Options{
		RealStoreDir: filepath.Join(dir, "store"),
		Command: func(argv ...string) *exec.Cmd {
			if wrap != nil {
				argv = wrap(argv)
			}
			return nix.Command(dir, nil, argv...)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// real is where this process finds a store path of the bed.
func (b *bed) real(path string) string {
	return filepath.Join(b.dir, "store", strings.TrimPrefix(path, DefaultStoreDir+"/"))
}

// run runs a command with the bed's Nix on its store and returns stdout.
func (b *bed) run(t *testing.T, argv ...string) string {
	t.Helper()
	out, err := b.try(argv...)
	if err != nil {
		t.Fatalf("%s: %v", strings.Join(argv, " "), err)
	}
	return out
}

func (b *bed) try(argv ...string) (string, error) {
	cmd := b.nix.Command(b.dir, nil, argv...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%w\n%s", err, stderr.String())
	}
	return stdout.String(), nil
}

// holdLock takes the lock nix-daemon's worker holds on an output while the
// hook runs, and keeps it until the test ends.
func (b *bed) holdLock(t *testing.T, path string) {
	t.Helper()
	name := b.real(path) + ".lock"
	f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		t.Fatalf("flock %s: %v", name, err)
	}
	// Proof that it is held: another open file description cannot take it.
	g, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if err := syscall.Flock(int(g.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); !errors.Is(err, syscall.EWOULDBLOCK) {
		t.Fatalf("a second flock on %s: %v, want EWOULDBLOCK", name, err)
	}
}

// checkClean fails unless path is absent, invalid, and the store directory
// holds no staging directory.
func (b *bed) checkClean(t *testing.T, path string) {
	t.Helper()
	if _, err := os.Lstat(b.real(path)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s: Lstat: %v, want it not to exist", path, err)
	}
	ents, err := os.ReadDir(filepath.Join(b.dir, "store"))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), tempPrefix) {
			t.Errorf("staging directory %s left in the store", e.Name())
		}
	}
	valid, err := b.store.Valid([]string{path})
	if err != nil {
		t.Fatal(err)
	}
	if len(valid) != 0 {
		t.Errorf("%s is valid", path)
	}
}

// checkValid fails unless path is valid in the bed with the info the
// remote reported, and passes `nix-store --verify-path`.
func (b *bed) checkValid(t *testing.T, want serveproto.PathInfo) {
	t.Helper()
	got, err := b.store.PathInfos([]string{want.Path})
	if err != nil {
		t.Fatal(err)
	}
	g := got[0]
	if g.NarHash != want.NarHash || g.NarSize != want.NarSize || g.Deriver != want.Deriver || !slices.Equal(g.References, want.References) {
		t.Errorf("recorded %+v\nwant %+v", g, want)
	}
	sha := nixhash.SHA256
	h, err := nixhash.ParseAny(strings.TrimSpace(b.run(t, "nix-store", "-q", "--hash", want.Path)), &sha)
	if err != nil {
		t.Fatal(err)
	}
	w, err := nixhash.ParseAny(want.NarHash, &sha)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(h.Digest(), w.Digest()) {
		t.Errorf("nix-store -q --hash: %s, want %s", h, want.NarHash)
	}
	if d := strings.TrimSpace(b.run(t, "nix-store", "-q", "--deriver", want.Path)); d != want.Deriver {
		t.Errorf("nix-store -q --deriver: %q, want %q", d, want.Deriver)
	}
	b.run(t, "nix-store", "--verify-path", want.Path)
}

func TestIntegration(t *testing.T) {
	system := testbed.System(t)
	for _, nix := range testbed.All(t) {
		t.Run(nix.Series(), func(t *testing.T) {
			t.Parallel()
			testIntegration(t, nix, system)
		})
	}
}

func testIntegration(t *testing.T, nix testbed.Nix, system string) {
	remote := newBed(t, nix)
	local := newBed(t, nix)
	r := remote.store

	// In the remote: a, b referring to a, and m with two outputs, out
	// referring to dev.
	expr := fmt.Sprintf(`let
  mk = name: script: derivation { inherit name; system = %q; builder = "/bin/sh"; args = ["-c" script]; };
  a = mk "localstore-a" "echo a > $out";
  b = mk "localstore-b" "echo ${a} > $out";
  m = derivation { name = "localstore-m"; system = %q; builder = "/bin/sh"; outputs = ["out" "dev"];
                   args = ["-c" "echo dev > $dev; echo $dev > $out"]; };
  c = mk "localstore-c" "echo c > $out";
in [ a b m.out m.dev c ]`, system, system)
	built := strings.Fields(remote.run(t, "nix-build", "--no-out-link", "-E", expr))
	if len(built) != 5 {
		t.Fatalf("nix-build printed %q", built)
	}
	a, b, mOut, mDev, c := built[0], built[1], built[2], built[3], built[4]
	missing := DefaultStoreDir + "/00000000000000000000000000000000-localstore-missing"

	t.Run("read", func(t *testing.T) {
		valid, err := r.Valid([]string{b, missing, a})
		if want := sorted(a, b); err != nil || !slices.Equal(valid, want) {
			t.Errorf("Valid: %q, %v; want %q", valid, err, want)
		}
		closure, err := r.Closure([]string{b})
		if want := sorted(a, b); err != nil || !slices.Equal(closure, want) {
			t.Errorf("Closure: %q, %v; want %q", closure, err, want)
		}
		infos, err := r.PathInfos([]string{b, a})
		if err != nil {
			t.Fatal(err)
		}
		if infos[0].Path != b || infos[1].Path != a || !slices.Equal(infos[0].References, []string{a}) ||
			!strings.HasSuffix(infos[0].Deriver, "-localstore-b.drv") {
			t.Errorf("PathInfos: %+v", infos)
		}
		var buf bytes.Buffer
		st, err := r.Dump(b, &buf)
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(buf.Bytes())
		if st.SHA256 != sum || st.NixHash() != infos[0].NarHash || uint64(buf.Len()) != infos[0].NarSize {
			t.Errorf("Dump: %d bytes hashing to %x; Stats %+v; recorded %s, %d bytes", buf.Len(), sum, st, infos[0].NarHash, infos[0].NarSize)
		}
		// Invalid paths are typed errors, and the session survives them.
		_, err = r.PathInfos([]string{a, missing})
		checkNotValid(t, "PathInfos", err, missing)
		_, err = r.Closure([]string{missing})
		checkNotValid(t, "Closure", err, missing)
		_, err = r.Dump(missing, io.Discard)
		checkNotValid(t, "Dump", err, missing)
		if _, err := r.Valid([]string{"/nix/store/../etc/passwd"}); err == nil {
			t.Error("Valid accepted a malformed path")
		}
		if valid, err := r.Valid([]string{a}); err != nil || len(valid) != 1 {
			t.Errorf("Valid after the errors: %q, %v", valid, err)
		}
	})
	if t.Failed() {
		return
	}

	infos, err := r.PathInfos([]string{a, b, mOut, mDev, c})
	if err != nil {
		t.Fatal(err)
	}
	infoA, infoB, infoOut, infoDev, infoC := infos[0], infos[1], infos[2], infos[3], infos[4]
	nars := make(map[string][]byte)
	for _, p := range built {
		var buf bytes.Buffer
		if _, err := r.Dump(p, &buf); err != nil {
			t.Fatal(err)
		}
		nars[p] = buf.Bytes()
	}
	fetched := 0
	fromRemote := func(path string, w io.Writer) error {
		fetched++
		_, err := r.Dump(path, w)
		return err
	}

	l := local.store
	// Starts the local store, and makes its session see a and b as invalid
	// (Nix caches that), which AddOutputs must not be fooled by.
	if _, err := l.PathInfos([]string{a, b}); !errors.As(err, new(*NotValidError)) {
		t.Fatalf("PathInfos in the empty local store: %v", err)
	}
	for _, p := range built {
		local.holdLock(t, p)
	}

	t.Run("reference not valid", func(t *testing.T) {
		fetched = 0
		err := l.AddOutputs([]serveproto.PathInfo{infoB}, fromRemote)
		checkNotValid(t, "AddOutputs", err, a)
		if fetched != 0 {
			t.Errorf("%d fetches", fetched)
		}
		local.checkClean(t, b)
	})

	t.Run("with the lock held", func(t *testing.T) {
		d := timedAdd(t, l, []serveproto.PathInfo{infoA}, fromRemote)
		t.Logf("%s: AddOutputs of one path with its lock held: %v", nix, d)
		// checkValid asks the Store that was told a is invalid before.
		local.checkValid(t, infoA)
		local.checkClean(t, a+"-none") // no staging directory left
		fetched = 0
		if err := l.AddOutputs([]serveproto.PathInfo{infoA}, fromRemote); err != nil || fetched != 0 {
			t.Errorf("again: %v, %d fetches; want nothing to do", err, fetched)
		}
	})

	t.Run("failures leave nothing", func(t *testing.T) {
		wrongHash := infoB
		wrongHash.NarHash = infoA.NarHash
		tooLong := infoB
		tooLong.NarSize -= 8
		tests := []struct {
			name  string
			info  serveproto.PathInfo
			fetch func(string, io.Writer) error
			want  error
		}{
			{"wrong narHash", wrongHash, fromRemote, nar.ErrHashMismatch},
			{"NAR longer than narSize", tooLong, fromRemote, nar.ErrSizeMismatch},
			{"truncated", infoB, func(path string, w io.Writer) error {
				w.Write(nars[path][:len(nars[path])/2])
				return errors.New("connection to the machine lost")
			}, nil},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				err := l.AddOutputs([]serveproto.PathInfo{tt.info}, tt.fetch)
				if err == nil {
					t.Fatal("accepted")
				}
				t.Log(err)
				if tt.want != nil && !errors.Is(err, tt.want) {
					t.Errorf("error does not wrap %v", tt.want)
				}
				local.checkClean(t, b)
			})
		}
		// The trees were in place when registration failed: they go again.
		t.Run("registration fails", func(t *testing.T) {
			base := strings.TrimPrefix(b, DefaultStoreDir+"/")
			failing := openStore(t, nix, local.dir, func(argv []string) []string {
				if !slices.Contains(argv, "--register-validity") {
					return argv
				}
				return []string{"/bin/sh", "-c", `cat >/dev/null; test -e "/nix/store/$0" && echo "error: injected failure with $0 in place" >&2; exit 1`, base}
			})
			err := failing.AddOutputs([]serveproto.PathInfo{infoB}, fromRemote)
			if err == nil || !strings.Contains(err.Error(), "injected failure with "+base+" in place") {
				t.Fatalf("got %v, want the injected failure", err)
			}
			t.Log(err)
			local.checkClean(t, b)
		})
	})

	t.Run("stale invalid path replaced", func(t *testing.T) {
		stale := local.real(b)
		if err := os.MkdirAll(filepath.Join(stale, "sub"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(stale, "sub", "half-written"), []byte("x"), 0o444); err != nil {
			t.Fatal(err)
		}
		os.Chmod(filepath.Join(stale, "sub"), 0o555)
		d := timedAdd(t, l, []serveproto.PathInfo{infoB}, fromRemote)
		t.Logf("%s: AddOutputs over a stale directory: %v", nix, d)
		local.checkValid(t, infoB)
		var buf bytes.Buffer
		if _, err := l.Dump(b, &buf); err != nil || !bytes.Equal(buf.Bytes(), nars[b]) {
			t.Errorf("local NAR of b differs from the remote's (%v)", err)
		}
	})

	t.Run("registration started early", func(t *testing.T) {
		testEarlyRegistration(t, local, infoC, fromRemote, nars[c])
	})

	t.Run("taking Nix's locks", func(t *testing.T) {
		testLockOutputs(t, nix, infoA, infoC, fromRemote)
	})

	t.Run("outputs referring to each other", func(t *testing.T) {
		if !slices.Equal(infoOut.References, []string{mDev}) {
			t.Fatalf("out's references: %q, want [%s]", infoOut.References, mDev)
		}
		fetched = 0
		d := timedAdd(t, l, []serveproto.PathInfo{infoOut, infoDev}, fromRemote) // referrer first
		t.Logf("%s: AddOutputs of two outputs with their locks held: %v", nix, d)
		if fetched != 2 {
			t.Errorf("%d fetches, want 2", fetched)
		}
		local.checkValid(t, infoOut)
		local.checkValid(t, infoDev)
		if refs := strings.Fields(local.run(t, "nix-store", "-q", "--references", mOut)); !slices.Equal(refs, []string{mDev}) {
			t.Errorf("nix-store -q --references %s: %q", mOut, refs)
		}
	})
}

func timedAdd(t *testing.T, s *Store, infos []serveproto.PathInfo, fetch func(string, io.Writer) error) time.Duration {
	t.Helper()
	start := time.Now()
	done := make(chan error, 1)
	go func() { done <- s.AddOutputs(infos, fetch) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(addBound):
		t.Fatalf("AddOutputs still running after %v: blocked by the lock?", addBound)
	}
	return time.Since(start)
}

func checkNotValid(t *testing.T, op string, err error, paths ...string) {
	t.Helper()
	var nv *NotValidError
	if !errors.As(err, &nv) || !slices.Equal(nv.Paths, paths) {
		t.Errorf("%s: %v; want a NotValidError for %q", op, err, paths)
	}
}

func sorted(paths ...string) []string {
	return slices.Sorted(slices.Values(paths))
}

// testEarlyRegistration: a registration process started before the
// outputs exist (Store.StartRegistration, as the hook does at `# accept`)
// registers nothing of its own, whatever happens to the build, and is the
// one that registers the outputs when they come. info is an output the
// local store does not have yet, with its NAR.
func testEarlyRegistration(t *testing.T, local *bed, info serveproto.PathInfo, fetch func(string, io.Writer) error, narBytes []byte) {
	// inBed returns a new file name in the bed's /nix, as the commands
	// see it and as this process does: the Debian roots hide our /tmp.
	files := 0
	inBed := func() (inside, here string) {
		files++
		name := fmt.Sprintf("early-%d", files)
		return "/nix/" + name, filepath.Join(local.dir, name)
	}
	// counting opens a Store that writes the pid of every registration
	// process it starts to pids, one a line.
	counting := func(t *testing.T, first func(argv []string) []string) (*Store, string) {
		inside, pids := inBed()
		n := 0
		return openStore(t, local.nix, local.dir, func(argv []string) []string {
			if !slices.Contains(argv, "--register-validity") {
				return argv
			}
			n++
			if n == 1 && first != nil {
				argv = first(argv)
			}
			// The pid of the shell that execs the command: nix-store's own.
			return append([]string{"/bin/sh", "-c", `echo $$ >> "$0"; shift; exec "$@"`, inside, "-"}, argv...)
		}), pids
	}
	started := func(t *testing.T, pids string) []int {
		t.Helper()
		data, _ := os.ReadFile(pids)
		var out []int
		for _, f := range strings.Fields(string(data)) {
			var pid int
			fmt.Sscan(f, &pid)
			out = append(out, pid)
		}
		return out
	}
	gone := func(t *testing.T, pid int) {
		t.Helper()
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("registration process %d: kill(0): %v, want it gone", pid, err)
		}
	}
	// waitStarted waits until the process StartRegistration starts is
	// running and returns its pid.
	waitStarted := func(t *testing.T, s *Store, pids string) int {
		t.Helper()
		r := s.takePending()
		if r == nil {
			t.Fatal("StartRegistration started nothing")
		}
		ch := make(chan *registration, 1)
		ch <- r
		s.pending = ch
		testbed.WaitFor(t, 10*time.Second, "the registration process to write its pid", func() bool { return len(started(t, pids)) == 1 })
		return started(t, pids)[0]
	}

	// registeredByASecond adds info with s, whose early process cannot
	// take it: a second one must, and info is made invalid again after.
	registeredByASecond := func(t *testing.T, s *Store, pids string) {
		t.Helper()
		if err := s.AddOutputs([]serveproto.PathInfo{info}, fetch); err != nil {
			t.Fatal(err)
		}
		if n := len(started(t, pids)); n != 2 {
			t.Errorf("%d registration processes started, want 2", n)
		}
		local.checkValid(t, info)
		local.run(t, "nix-store", "--delete", info.Path)
	}

	t.Run("fetch fails", func(t *testing.T) {
		s, pids := counting(t, nil)
		s.StartRegistration()
		pid := waitStarted(t, s, pids)
		err := s.AddOutputs([]serveproto.PathInfo{info}, func(path string, w io.Writer) error {
			w.Write(narBytes[:len(narBytes)/2])
			return errors.New("connection to the machine lost")
		})
		if err == nil {
			t.Fatal("a truncated NAR was accepted")
		}
		s.Close()
		gone(t, pid)
		if n := len(started(t, pids)); n != 1 {
			t.Errorf("%d registration processes started, want the early one only", n)
		}
		local.checkClean(t, info.Path)
	})

	t.Run("this process dies", func(t *testing.T) {
		// The process that started it is gone, so its stdin ends: it
		// registers nothing, even with the tree in place.
		s, pids := counting(t, nil)
		s.StartRegistration()
		pid := waitStarted(t, s, pids)
		r := s.takePending()
		if err := os.WriteFile(local.real(info.Path), []byte("c\n"), 0o444); err != nil {
			t.Fatal(err)
		}
		defer os.Remove(local.real(info.Path))
		r.in.Close() // what the kernel does when the hook dies
		r.in = nil
		if err := r.wait("nix-store"); err != nil {
			t.Errorf("with no input: %v, want a clean exit", err)
		}
		gone(t, pid)
		if valid, err := local.store.Valid([]string{info.Path}); err != nil || len(valid) != 0 {
			t.Errorf("Valid: %q, %v; want it invalid", valid, err)
		}
	})

	t.Run("died before use", func(t *testing.T) {
		// The early process exits at once (it could not open the store, say):
		// a new one registers the outputs.
		s, pids := counting(t, func([]string) []string {
			return []string{"/bin/sh", "-c", "echo error: injected: cannot open the store >&2; exit 1"}
		})
		s.StartRegistration()
		r := s.takePending()
		<-r.done
		ch := make(chan *registration, 1)
		ch <- r
		s.pending = ch
		registeredByASecond(t, s, pids)
	})

	t.Run("stdin closed early", func(t *testing.T) {
		// Writing to it fails with EPIPE: it read none of the input, so a
		// new one registers it.
		markerInside, marker := inBed()
		s, pids := counting(t, func([]string) []string {
			return []string{"/bin/sh", "-c", `exec 0<&-; : > "$0"; sleep 1`, markerInside}
		})
		s.StartRegistration()
		testbed.WaitFor(t, 10*time.Second, "the early process to close its stdin", func() bool {
			_, err := os.Stat(marker)
			return err == nil
		})
		registeredByASecond(t, s, pids)
	})

	t.Run("used", func(t *testing.T) {
		s, pids := counting(t, nil)
		s.StartRegistration()
		pid := waitStarted(t, s, pids)
		if err := s.AddOutputs([]serveproto.PathInfo{info}, fetch); err != nil {
			t.Fatal(err)
		}
		gone(t, pid)
		if got := started(t, pids); !slices.Equal(got, []int{pid}) {
			t.Errorf("registration processes %v, want the early one (%d) only", got, pid)
		}
		local.checkValid(t, info)
	})
}

// testLockOutputs: a Store with LockOutputs (the build command's) waits
// for Nix's lock on an output another process holds, and when it gets it
// finds the output made valid meanwhile and writes nothing; one whose
// LockWait gives up writes nothing either; and with the lock free it adds
// the output and leaves no lock file behind.
func testLockOutputs(t *testing.T, nix testbed.Nix, infoA, infoC serveproto.PathInfo, fromRemote func(string, io.Writer) error) {
	hook := newBed(t, nix) // the hook's Store: it writes under the worker's lock
	waits := make(chan string, 1)
	var giveUp error
	var mu sync.Mutex
	own, err := Open(Options{
		RealStoreDir: filepath.Join(hook.dir, "store"),
		Command:      func(argv ...string) *exec.Cmd { return nix.Command(hook.dir, nil, argv...) },
		LockOutputs:  true,
		LockWait: func(path string) error {
			select {
			case waits <- path:
			default:
			}
			mu.Lock()
			defer mu.Unlock()
			return giveUp
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer own.Close()
	fetched := 0
	countFetch := func(p string, w io.Writer) error { fetched++; return fromRemote(p, w) }

	// Opens the new store, and makes own's session see c as invalid.
	if valid, err := own.Valid([]string{infoC.Path}); err != nil || len(valid) != 0 {
		t.Fatalf("Valid in an empty store: %v, %v", valid, err)
	}
	// The worker holds c's lock; the build command waits for it.
	release := takeLock(t, hook.real(infoC.Path)+".lock")
	done := make(chan error, 1)
	go func() { done <- own.AddOutputs([]serveproto.PathInfo{infoC}, countFetch) }()
	select {
	case p := <-waits:
		if p != infoC.Path {
			t.Fatalf("waited for the lock of %s, want %s", p, infoC.Path)
		}
	case err := <-done:
		t.Fatalf("AddOutputs returned %v with the lock held by another process", err)
	case <-time.After(addBound):
		t.Fatal("AddOutputs neither waited for the lock nor returned")
	}
	// Under the worker's lock, the hook makes c valid.
	if err := hook.store.AddOutputs([]serveproto.PathInfo{infoC}, fromRemote); err != nil {
		t.Fatal(err)
	}
	release()
	select {
	case err := <-done:
		if err != nil || fetched != 0 {
			t.Errorf("after the lock was released: %v, %d fetches; want c found valid and nothing written", err, fetched)
		}
	case <-time.After(addBound):
		t.Fatal("AddOutputs did not return once the lock was released")
	}
	hook.checkValid(t, infoC)

	// Given up while waiting: nothing written.
	release = takeLock(t, hook.real(infoA.Path)+".lock")
	mu.Lock()
	giveUp = errors.New("interrupted")
	mu.Unlock()
	err = own.AddOutputs([]serveproto.PathInfo{infoA}, countFetch)
	if !errors.Is(err, giveUp) || fetched != 0 {
		t.Errorf("with LockWait giving up: %v, %d fetches; want its error and nothing fetched", err, fetched)
	}
	hook.checkClean(t, infoA.Path)

	// The lock free: a is added, and its lock file is gone.
	release()
	if err := own.AddOutputs([]serveproto.PathInfo{infoA}, countFetch); err != nil || fetched != 1 {
		t.Fatalf("with the lock free: %v, %d fetches", err, fetched)
	}
	hook.checkValid(t, infoA)
	if _, err := os.Lstat(hook.real(infoA.Path) + ".lock"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("lock file after AddOutputs: %v, want it removed", err)
	}
}

// takeLock takes an output's lock as Nix's worker does, and returns what
// releases it as Nix does once the output is valid: a byte into the file
// for any waiter, which then knows it is stale, and the file removed.
func takeLock(t *testing.T, name string) (release func()) {
	t.Helper()
	f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		t.Fatalf("flock %s: %v", name, err)
	}
	var once sync.Once
	release = func() {
		once.Do(func() {
			f.Write([]byte("d"))
			os.Remove(name)
			f.Close()
		})
	}
	t.Cleanup(release)
	return release
}

// TestIntegrationDirect checks the rows registerDirect writes against
// those the same Nix's `nix-store --register-validity` writes for the same
// outputs, and that Nix then treats the paths as any other: their info,
// references and contents verify, and the garbage collector sees the
// references.
func TestIntegrationDirect(t *testing.T) {
	system := testbed.System(t)
	for _, nix := range testbed.All(t) {
		t.Run(nix.Series(), func(t *testing.T) {
			t.Parallel()
			testIntegrationDirect(t, nix, system)
		})
	}
}

func testIntegrationDirect(t *testing.T, nix testbed.Nix, system string) {
	remote := newBed(t, nix)
	expr := fmt.Sprintf(`let
  mk = name: script: derivation { inherit name; system = %q; builder = "/bin/sh"; args = ["-c" script]; };
  a = mk "direct-a" "echo a > $out";
  b = mk "direct-b" "/bin/mkdir -p $out/bin; echo ${a} > $out/a; echo '#!/bin/sh' > $out/bin/run; /bin/chmod +x $out/bin/run; /bin/ln -s a $out/link";
  m = derivation { name = "direct-m"; system = %q; builder = "/bin/sh"; outputs = ["out" "dev"];
                   args = ["-c" "echo dev > $dev; echo $dev $out > $out"]; };
in [ a b m.out m.dev ]`, system, system)
	built := strings.Fields(remote.run(t, "nix-build", "--no-out-link", "-E", expr))
	if len(built) != 4 {
		t.Fatalf("nix-build printed %q", built)
	}
	a, b, mOut, mDev := built[0], built[1], built[2], built[3]
	infos, err := remote.store.PathInfos(built)
	if err != nil {
		t.Fatal(err)
	}
	fromRemote := func(path string, w io.Writer) error {
		_, err := remote.store.Dump(path, w)
		return err
	}

	// The same outputs go into two local stores: through nix-store, and
	// written directly.
	viaNix := newBed(t, nix)
	nix.InitStore(t, viaNix.dir)
	direct := &bed{nix: nix, dir: testbed.NewStore(t)}
	nix.InitStore(t, direct.dir)
	var fallbacks []error
	var err2 error
	direct.store, err2 = Open(Options{
		RealStoreDir: filepath.Join(direct.dir, "store"),
		DBDir:        filepath.Join(direct.dir, "var", "nix", "db"),
		Command:      func(argv ...string) *exec.Cmd { return nix.Command(direct.dir, nil, argv...) },
		Fallback:     func(err error) { fallbacks = append(fallbacks, err) },
	})
	if err2 != nil {
		t.Fatal(err2)
	}
	t.Cleanup(func() { direct.store.Close() })
	for _, p := range built {
		viaNix.holdLock(t, p)
		direct.holdLock(t, p)
	}

	missing := infos[1]
	missing.References = append(slices.Clone(missing.References), DefaultStoreDir+"/00000000000000000000000000000000-direct-gone")
	err = direct.store.AddOutputs([]serveproto.PathInfo{missing}, fromRemote)
	checkNotValid(t, "AddOutputs", err, sorted(a, missing.References[len(missing.References)-1])...)
	direct.checkClean(t, b)

	for _, batch := range [][]serveproto.PathInfo{{infos[0]}, {infos[1]}, {infos[2], infos[3]}} {
		if err := viaNix.store.AddOutputs(batch, fromRemote); err != nil {
			t.Fatal(err)
		}
		direct.store.StartRegistration() // as the hook does at accept: it must start nothing
		if direct.store.pending != nil {
			t.Error("StartRegistration started a process")
		}
		if err := direct.store.AddOutputs(batch, fromRemote); err != nil {
			t.Fatal(err)
		}
	}
	if len(fallbacks) > 0 {
		t.Fatalf("fell back to nix-store: %v", fallbacks)
	}
	for _, info := range infos {
		direct.checkValid(t, info)
	}
	if diff := cmp.Diff(readRows(t, filepath.Join(viaNix.dir, "var", "nix", "db")), readRows(t, filepath.Join(direct.dir, "var", "nix", "db"))); diff != "" {
		t.Errorf("rows (-nix-store +direct):\n%s", diff)
	}
	for _, p := range []string{a, b, filepath.Join(b, "bin", "run"), filepath.Join(b, "link")} {
		vst, err1 := os.Lstat(viaNix.real(p))
		dst, err2 := os.Lstat(direct.real(p))
		if err1 != nil || err2 != nil || vst.Mode() != dst.Mode() || !vst.ModTime().Equal(dst.ModTime()) {
			t.Errorf("%s: nix-store made %v %v, direct %v %v (%v, %v)", p, vst.Mode(), vst.ModTime(), dst.Mode(), dst.ModTime(), err1, err2)
		}
	}
	if refs := strings.Fields(direct.run(t, "nix-store", "-q", "--references", mOut)); !slices.Equal(refs, sorted(mDev, mOut)) {
		t.Errorf("nix-store -q --references %s: %q", mOut, refs)
	}
	if out, err := direct.try("nix-store", "--verify", "--check-contents"); err != nil || strings.Contains(out, "error") {
		t.Errorf("nix-store --verify --check-contents: %v\n%s", err, out)
	}
	// The garbage collector sees b's reference to a.
	if _, err := direct.try("nix-store", "--delete", a); err == nil {
		t.Errorf("nix-store --delete %s succeeded while %s refers to it", a, b)
	}
	direct.run(t, "nix-store", "--delete", b)
	direct.run(t, "nix-store", "--delete", a)
	direct.store.Refresh()
	if valid, err := direct.store.Valid([]string{a, b}); err != nil || len(valid) != 0 {
		t.Errorf("after deleting them: valid %q, %v", valid, err)
	}
}
