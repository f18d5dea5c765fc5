// Package uploads is one machine's table of what is being sent to it and
// what is known valid there, shared by the builds that run on it at once
// (in the broker, or in one graph build alone): a path several builds
// need is sent once, the upload streams are bounded, and inputs known
// valid are checked in the build's own flight (offload.Transfers).
package uploads

import (
	"context"
	"sync"

	"github.com/nix-offload/nix-offload/internal/offload"
)

// Table is one machine's table of paths being sent to it, so that a path
// several builds need is sent once while the others wait for it, the bound
// on parallel upload streams to the machine, and the paths this process
// knows are valid there. It is safe for concurrent use.
type Table struct {
	mu       sync.Mutex
	inflight map[string]*flight
	streams  chan struct{}
	// valid holds the paths seen valid on the machine during this
	// process's life: sent whole and accepted, found by a query, or built there. A
	// build whose inputs are all in it checks them in its build's flight
	// instead of asking first (offload.Transfers.Known). Unlike the
	// broker's locality table, it holds nothing that is only on its way.
	valid map[string]struct{}
}

// maxValidPaths bounds Table.valid: past it, the table starts over.
const maxValidPaths = 100_000

type flight struct {
	done    chan struct{}
	err     error
	waiters int // claims waiting for this upload; guarded by Table.mu
}

// New returns an empty table that allows streams parallel uploads (at
// least 1).
func New(streams int) *Table {
	return &Table{inflight: map[string]*flight{}, streams: make(chan struct{}, max(streams, 1))}
}

// Claim implements offload.Transfers.Claim for the machine.
func (u *Table) Claim(ctx context.Context, path string) (upload bool, done func(error), err error) {
	for {
		u.mu.Lock()
		f := u.inflight[path]
		if f == nil {
			f = &flight{done: make(chan struct{})}
			u.inflight[path] = f
			u.mu.Unlock()
			finish := func(err error) {
				u.mu.Lock()
				u.endLocked(path, f, err)
				u.mu.Unlock()
			}
			select {
			case u.streams <- struct{}{}:
			case <-ctx.Done():
				finish(ctx.Err())
				return false, nil, context.Cause(ctx)
			}
			return true, func(err error) { <-u.streams; finish(err) }, nil
		}
		f.waiters++
		u.mu.Unlock()
		select {
		case <-f.done:
			if f.err == nil {
				return false, nil, nil
			}
			// The other upload failed: this build tries itself.
		case <-ctx.Done():
			u.mu.Lock()
			f.waiters--
			u.mu.Unlock()
			return false, nil, context.Cause(ctx)
		}
	}
}

// endLocked ends the upload f of path with err: the claims waiting for it
// go on. u.mu is held.
func (u *Table) endLocked(path string, f *flight, err error) {
	delete(u.inflight, path)
	f.err = err
	close(f.done)
}

// ClaimAll implements offload.Transfers.ClaimAll for the machine: it
// waits for one upload stream, then claims every one of paths at once if
// no other build is sending any of them; otherwise it claims nothing and
// gives the stream back (ok false). It never waits while it holds a claim,
// so builds that claim paths this way and one at a time cannot wait for
// each other in a circle. The stream is held until done has been called
// for every path.
func (u *Table) ClaimAll(ctx context.Context, paths []string) (ok bool, done func(path string, err error), err error) {
	select {
	case u.streams <- struct{}{}:
	case <-ctx.Done():
		return false, nil, context.Cause(ctx)
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, p := range paths {
		if u.inflight[p] != nil {
			<-u.streams
			return false, nil, nil
		}
	}
	mine := make(map[string]*flight, len(paths))
	for _, p := range paths {
		f := &flight{done: make(chan struct{})}
		u.inflight[p] = f
		mine[p] = f
	}
	return true, func(path string, err error) {
		u.mu.Lock()
		defer u.mu.Unlock()
		f := mine[path]
		if f == nil {
			return // not claimed here, or done already
		}
		delete(mine, path)
		u.endLocked(path, f, err)
		if len(mine) == 0 {
			<-u.streams
		}
	}, nil
}

// Known reports whether every one of paths is in the valid table.
func (u *Table) Known(paths []string) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, p := range paths {
		if _, ok := u.valid[p]; !ok {
			return false
		}
	}
	return true
}

// Present adds paths to the valid table.
func (u *Table) Present(paths []string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.valid == nil || len(u.valid)+len(paths) > maxValidPaths {
		u.valid = map[string]struct{}{}
	}
	for _, p := range paths {
		u.valid[p] = struct{}{}
	}
}

// Forget takes paths found not valid out of the valid table.
func (u *Table) Forget(paths []string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, p := range paths {
		delete(u.valid, p)
	}
}

// Waiting returns how many claims wait for the upload of path in flight.
func (u *Table) Waiting(path string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	if f := u.inflight[path]; f != nil {
		return f.waiters
	}
	return 0
}

// Session is what a build's session knows of the paths it locked on the
// machine (a pool.Session).
type Session interface {
	Locked(paths []string) (locked, rest []string)
	MarkLocked(paths []string)
}

// For is offload.Transfers for one build: the session's memory of locked
// paths and the machine's table t.
func For(sess Session, t *Table) offload.Transfers { return transfers{sess: sess, up: t} }

type transfers struct {
	sess Session
	up   *Table
}

func (t transfers) Locked(paths []string) (locked, rest []string) { return t.sess.Locked(paths) }
func (t transfers) MarkLocked(paths []string) {
	t.sess.MarkLocked(paths)
	t.up.Present(paths)
}
func (t transfers) Known(paths []string) bool { return t.up.Known(paths) }
func (t transfers) Present(paths []string)    { t.up.Present(paths) }
func (t transfers) Forget(paths []string)     { t.up.Forget(paths) }
func (t transfers) Claim(ctx context.Context, path string) (bool, func(error), error) {
	return t.up.Claim(ctx, path)
}
func (t transfers) ClaimAll(ctx context.Context, paths []string) (bool, func(string, error), error) {
	return t.up.ClaimAll(ctx, paths)
}
