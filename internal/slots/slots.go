package slots

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/nix-offload/nix-offload/internal/flock"
	"github.com/nix-offload/nix-offload/internal/machines"
)

// MainLockName is the file in a [Dir] that [Dir.Lock] locks.
const MainLockName = "main.lock"

// maxNameLen bounds the escaped machine name in a slot file name. Linux allows 255 bytes for a
// file name (NAME_MAX); this leaves room for "-1023" and keeps names readable.
const maxNameLen = 200

// Polling bounds for [Dir.Lock]. flock(2) cannot wait for a lock and a context at once, so Lock
// tries, then sleeps a little longer each time up to lockPollMax. The main lock is held for a
// few hundred system calls at most, so the first retries usually get it.
const (
	lockPollMin = time.Millisecond
	lockPollMax = 20 * time.Millisecond
)

// testOnlyLockBusy, if set, is called each time Lock finds the main lock held by someone else,
// before it waits: tests use it to know that a Lock call is blocked without timing it.
var testOnlyLockBusy func()

// Dir is a directory of slot lock files shared by every process on the host that opens it.
// Its methods may be called from several goroutines at once.
type Dir struct {
	path string
}

// Open returns the slot directory at path, creating it and its parents (mode 0700) if needed.
func Open(path string) (*Dir, error) {
	if err := os.MkdirAll(path, 0o700); err != nil {
		return nil, fmt.Errorf("slots: %w", err)
	}
	return &Dir{path: path}, nil
}

// Path returns the directory's path.
func (d *Dir) Path() string { return d.path }

// Lock takes the main lock of d, waiting while another process or goroutine holds it, and
// returns the function that releases it (safe to call more than once). It gives up with
// ctx's error when ctx is done first. Hold it only to count, pick and acquire: every hook on
// the host waits for it.
func (d *Dir) Lock(ctx context.Context) (unlock func(), err error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	f, err := openLockFile(filepath.Join(d.path, MainLockName), true)
	if err != nil {
		return nil, fmt.Errorf("slots: main lock: %w", err)
	}
	var timer *time.Timer
	for wait := lockPollMin; ; wait = min(2*wait, lockPollMax) {
		ok, err := flock.TryLock(f)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("slots: main lock: flock %s: %w", f.Name(), err)
		}
		if ok {
			break
		}
		if testOnlyLockBusy != nil {
			testOnlyLockBusy()
		}
		if timer == nil {
			timer = time.NewTimer(wait)
			defer timer.Stop()
		} else {
			timer.Reset(wait)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-timer.C:
		}
	}
	var once sync.Once
	return func() { once.Do(func() { f.Close() }) }, nil
}

// Load returns how many slots of each machine (by [machines.Machine.Name]) are held by any
// process, this one included; every machine of ms has an entry. It tells a held slot from a
// free one by trying to lock it, so for a moment it holds the free ones itself: call it with
// the main lock held, where no Acquire runs, and the count also stays true until the decision
// based on it is carried out.
func (d *Dir) Load(ms []machines.Machine) (map[string]int, error) {
	load := make(map[string]int, len(ms))
	for _, m := range ms {
		n := 0
		for i := range m.ParallelBuilds {
			f, err := openLockFile(d.slotPath(m, i), false)
			if errors.Is(err, fs.ErrNotExist) {
				continue // never used, so not held
			}
			if err != nil {
				return nil, fmt.Errorf("slots: machine %s: slot %d: %w", m.Name(), i, err)
			}
			ok, err := flock.TryLock(f)
			f.Close() // drops the lock if we got it
			if err != nil {
				return nil, fmt.Errorf("slots: machine %s: slot %d: flock %s: %w", m.Name(), i, f.Name(), err)
			}
			if !ok {
				n++
			}
		}
		load[m.Name()] = n
	}
	return load, nil
}

// Acquire takes a free slot of m without waiting: the lowest-numbered one no process holds.
// It returns ok false, and no error, when all of m's ParallelBuilds slots are held. Call it
// with the main lock held. The slot stays taken until [Slot.Release] or the end of the process.
func (d *Dir) Acquire(m machines.Machine) (s *Slot, ok bool, err error) {
	for i := range m.ParallelBuilds {
		f, err := openLockFile(d.slotPath(m, i), true)
		if err != nil {
			return nil, false, fmt.Errorf("slots: machine %s: slot %d: %w", m.Name(), i, err)
		}
		ok, err := flock.TryLock(f)
		if err != nil {
			f.Close()
			return nil, false, fmt.Errorf("slots: machine %s: slot %d: flock %s: %w", m.Name(), i, f.Name(), err)
		}
		if ok {
			return &Slot{machine: m.Name(), index: i, f: f}, true, nil
		}
		f.Close()
	}
	return nil, false, nil
}

// slotPath is the lock file of slot i of m.
func (d *Dir) slotPath(m machines.Machine, i int) string {
	return filepath.Join(d.path, FileName(m.Name(), i))
}

// Slot is one build slot of one machine, held by this process.
type Slot struct {
	machine string
	index   int

	mu sync.Mutex
	f  *os.File // guarded by mu; nil once released
}

// Machine returns the [machines.Machine.Name] of the slot's machine.
func (s *Slot) Machine() string { return s.machine }

// Index returns the slot's number, from 0 to the machine's ParallelBuilds-1.
func (s *Slot) Index() int { return s.index }

// Release frees the slot for every process. Calls after the first do nothing and return nil.
func (s *Slot) Release() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.f == nil {
		return nil
	}
	// Closing the only descriptor of the open file drops the lock; the file is opened
	// close-on-exec, so no child shares it.
	err := s.f.Close()
	s.f = nil
	if err != nil {
		return fmt.Errorf("slots: release %s slot %d: %w", s.machine, s.index, err)
	}
	return nil
}

// FileName returns the name of the lock file of slot i of the machine named name:
// "<escaped name>-<i>". See the package documentation for the escaping.
func FileName(name string, i int) string {
	return escapeName(name) + "-" + strconv.Itoa(i)
}

// escapeName makes a machine name safe as (the start of) a file name: bytes outside
// [A-Za-z0-9._@:+=-] become %XX, a leading '.' too (no ".", "..", or hidden files). The result
// is injective and never contains '~', so names that are too long can be cut and given
// "~<hash>" without colliding with a short one.
func escapeName(name string) string {
	const hexDigits = "0123456789ABCDEF"
	b := make([]byte, 0, len(name))
	for i := 0; i < len(name); i++ {
		c := name[i]
		if safeByte(c) && (i > 0 || c != '.') {
			b = append(b, c)
			continue
		}
		b = append(b, '%', hexDigits[c>>4], hexDigits[c&15])
	}
	if len(b) == 0 {
		return "%"
	}
	if len(b) <= maxNameLen {
		return string(b)
	}
	sum := sha256.Sum256([]byte(name))
	suffix := "~" + hex.EncodeToString(sum[:16])
	keep := maxNameLen - len(suffix)
	// Cut before an escape rather than inside it; the hash keeps the name distinct either way.
	for b[keep-1] == '%' || b[keep-2] == '%' {
		keep--
	}
	return string(b[:keep]) + suffix
}

func safeByte(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	switch c {
	case '.', '_', '-', '@', ':', '+', '=':
		return true
	}
	return false
}

// openLockFile opens a lock file read-write and close-on-exec (so children never inherit a
// lock), creating it with mode 0600 if create is set.
func openLockFile(path string, create bool) (*os.File, error) {
	flag := os.O_RDWR | syscall.O_CLOEXEC | syscall.O_NOFOLLOW
	if create {
		flag |= os.O_CREATE
	}
	return os.OpenFile(path, flag, 0o600)
}
