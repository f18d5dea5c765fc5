package engine

import (
	"io"
	"sync"
	"sync/atomic"
	"time"
)

// Gate is what a session's stderr is written to during one attempt. It
// passes the bytes on to the build log only once the build command has been
// sent ([Gate.Open]): what the machine prints before (substitutions) is not
// part of the build's log. It remembers when anything last arrived, for
// max-silent-time.
type Gate struct {
	clock Clock
	last  atomic.Int64 // UnixNano of the last write
	open  atomic.Bool

	mu sync.Mutex
	w  io.Writer // guarded by mu
}

// NewGate returns a closed gate in front of w.
func NewGate(w io.Writer, clock Clock) *Gate {
	g := &Gate{clock: clock, w: w}
	g.last.Store(clock.Now().UnixNano())
	return g
}

// Write records activity and, once the gate is open, writes p to the log.
// It never fails: a log that cannot be written must not stop the build.
func (g *Gate) Write(p []byte) (int, error) {
	g.last.Store(g.clock.Now().UnixNano())
	if !g.open.Load() {
		return len(p), nil
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.w != nil {
		g.w.Write(p)
	}
	return len(p), nil
}

// Open lets what follows through to the log.
func (g *Gate) Open() { g.open.Store(true) }

// Close stops the gate for good: nothing reaches the log after it returns.
func (g *Gate) Close() {
	g.mu.Lock()
	g.w = nil
	g.mu.Unlock()
}

// LastOutput is when anything last arrived.
func (g *Gate) LastOutput() time.Time { return time.Unix(0, g.last.Load()) }
