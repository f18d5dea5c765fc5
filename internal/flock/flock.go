// Package flock takes advisory file locks (flock(2)) without blocking, so
// that callers can wait with their own deadline or context. The kernel
// drops a lock when its holder dies, SIGKILL included, which is why the
// slot files and the health file use them.
package flock

import (
	"os"
	"syscall"
)

// TryLock takes an exclusive flock on f without waiting; ok is false if
// another open file holds it.
func TryLock(f *os.File) (ok bool, err error) { return try(f, syscall.LOCK_EX) }

// TryLockShared takes a shared flock on f without waiting; ok is false if
// another open file holds it exclusively.
func TryLockShared(f *os.File) (ok bool, err error) { return try(f, syscall.LOCK_SH) }

func try(f *os.File, how int) (ok bool, err error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return false, err
	}
	var ferr error
	err = rc.Control(func(fd uintptr) {
		for {
			ferr = syscall.Flock(int(fd), how|syscall.LOCK_NB)
			if ferr != syscall.EINTR {
				return
			}
		}
	})
	if err != nil {
		return false, err
	}
	if ferr == syscall.EWOULDBLOCK {
		return false, nil
	}
	return ferr == nil, ferr
}
