package localstore

import (
	"fmt"
	"os"
	"slices"
	"time"

	"github.com/nix-offload/nix-offload/internal/flock"
)

// LockPoll is how long AddOutputs waits before it tries again to take an
// output's lock that another process holds ([Options.LockOutputs]).
var LockPoll = 100 * time.Millisecond

// lockOutputs takes Nix's lock on every output of todo, in path order as
// Nix takes several, and returns what releases them. A lock file that its
// last holder deleted while this process waited for it (Nix writes a byte
// into it first, so its size is not 0) is not the lock any more: it opens
// the new one and waits again, as Nix does.
func (s *Store) lockOutputs(todo []*output) (unlock func(), err error) {
	paths := make([]string, len(todo))
	for i, o := range todo {
		paths[i] = o.base
	}
	slices.Sort(paths)
	var held []*os.File
	unlock = func() {
		for _, f := range held {
			// As Nix releases an output's lock once the output is valid:
			// mark the file stale for any waiter, then remove it.
			f.Write([]byte("d"))
			os.Remove(f.Name())
			f.Close()
		}
	}
	for _, base := range paths {
		f, err := s.lockOne(base)
		if err != nil {
			unlock()
			return nil, err
		}
		held = append(held, f)
	}
	return unlock, nil
}

// lockOne takes the lock of the output base, waiting while another
// process holds it.
func (s *Store) lockOne(base string) (*os.File, error) {
	path := s.opt.StoreDir + "/" + base
	name := s.opt.RealStoreDir + "/" + base + ".lock"
	for {
		f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			return nil, fmt.Errorf("localstore: the lock of %s: %w", path, err)
		}
		ok, err := flock.TryLock(f)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("localstore: the lock of %s: flock: %w", path, err)
		}
		if !ok {
			f.Close()
			if s.opt.LockWait != nil {
				if err := s.opt.LockWait(path); err != nil {
					return nil, fmt.Errorf("localstore: waiting for the lock of %s: %w", path, err)
				}
			}
			time.Sleep(LockPoll)
			continue
		}
		st, err := f.Stat()
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("localstore: the lock of %s: %w", path, err)
		}
		if st.Size() != 0 {
			if now, err := os.Stat(name); err == nil && os.SameFile(st, now) {
				// Marked stale but never removed (its holder died between
				// the two): ours now, emptied.
				if err := f.Truncate(0); err != nil {
					f.Close()
					return nil, fmt.Errorf("localstore: the lock of %s: %w", path, err)
				}
				return f, nil
			}
			f.Close() // removed by its last holder: take the new one
			continue
		}
		return f, nil
	}
}
