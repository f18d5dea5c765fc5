package broker

import (
	"context"
	"sync"
)

// uploads is one machine's table of paths being sent to it, so that a path
// several builds need is sent once while the others wait for it, the bound
// on parallel upload streams to the machine, and the paths this broker
// knows are valid there.
type uploads struct {
	mu       sync.Mutex
	inflight map[string]*flight
	streams  chan struct{}
	// valid holds the paths seen valid on the machine during this broker's
	// life: sent whole and accepted, found by a query, or built there. A
	// build whose inputs are all in it checks them in its build's flight
	// instead of asking first (offload.Transfers.Known). Unlike the
	// machine's locality table (machine.has), it holds nothing that is
	// only on its way.
	valid map[string]struct{}
}

// maxValidPaths bounds uploads.valid: past it, the table starts over.
const maxValidPaths = 100_000

type flight struct {
	done    chan struct{}
	err     error
	waiters int // claims waiting for this upload; guarded by uploads.mu
}

func newUploads(streams int) *uploads {
	return &uploads{inflight: map[string]*flight{}, streams: make(chan struct{}, max(streams, 1))}
}

// claim implements offload.Transfers.Claim for the machine.
func (u *uploads) claim(ctx context.Context, path string) (upload bool, done func(error), err error) {
	for {
		u.mu.Lock()
		f := u.inflight[path]
		if f == nil {
			f = &flight{done: make(chan struct{})}
			u.inflight[path] = f
			u.mu.Unlock()
			finish := func(err error) {
				u.mu.Lock()
				delete(u.inflight, path)
				f.err = err
				close(f.done)
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

// known reports whether every one of paths is in the valid table.
func (u *uploads) known(paths []string) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, p := range paths {
		if _, ok := u.valid[p]; !ok {
			return false
		}
	}
	return true
}

// present adds paths to the valid table.
func (u *uploads) present(paths []string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.valid == nil || len(u.valid)+len(paths) > maxValidPaths {
		u.valid = map[string]struct{}{}
	}
	for _, p := range paths {
		u.valid[p] = struct{}{}
	}
}

// forget takes paths found not valid out of the valid table.
func (u *uploads) forget(paths []string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, p := range paths {
		delete(u.valid, p)
	}
}

// waiting returns how many claims wait for the upload of path in flight.
func (u *uploads) waiting(path string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	if f := u.inflight[path]; f != nil {
		return f.waiters
	}
	return 0
}

// transfers is offload.Transfers for one build: the session's memory of
// locked paths and the machine's upload table.
type transfers struct {
	sess Session
	up   *uploads
}

func (t transfers) Locked(paths []string) (locked, rest []string) { return t.sess.Locked(paths) }
func (t transfers) MarkLocked(paths []string) {
	t.sess.MarkLocked(paths)
	t.up.present(paths)
}
func (t transfers) Known(paths []string) bool { return t.up.known(paths) }
func (t transfers) Present(paths []string)    { t.up.present(paths) }
func (t transfers) Forget(paths []string)     { t.up.forget(paths) }
func (t transfers) Claim(ctx context.Context, path string) (bool, func(error), error) {
	return t.up.claim(ctx, path)
}
