package engine

import (
	"context"
	"fmt"
	"time"

	"github.com/nix-offload/nix-offload/internal/serveproto"
)

// LimitGrace is how much longer than the machine we wait before we enforce
// max-silent-time or timeout ourselves: the machine's own message is the
// better one when it comes. Nix enforces neither on hook builds.
const LimitGrace = 5 * time.Second

// limitTick is how often [WatchLimits] looks at the clock.
const limitTick = 500 * time.Millisecond

// LimitError is a limit nix-offload enforced itself.
type LimitError struct{ Msg string }

func (e *LimitError) Error() string { return e.Msg }

// Clock is the time as the engine sees it; tests inject their own.
type Clock interface {
	Now() time.Time
	// Tick returns a channel that receives the time every d, and the
	// function that stops it.
	Tick(d time.Duration) (<-chan time.Time, func())
}

// RealClock is the wall clock.
var RealClock Clock = realClock{}

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }
func (realClock) Tick(d time.Duration) (<-chan time.Time, func()) {
	t := time.NewTicker(d)
	return t.C, t.Stop
}

// WatchLimits cancels the build (with a *LimitError as the cause) when
// opts.BuildTimeout passes, or when lastOutput is older than
// opts.MaxSilentTime, LimitGrace after the machine should have stopped it.
// Call stop when the build has ended: the watching goroutine has ended when
// stop returns.
func WatchLimits(ctx context.Context, cancel context.CancelCauseFunc, opts serveproto.BuildOptions, lastOutput func() time.Time, clock Clock) (stop func()) {
	if opts.BuildTimeout == 0 && opts.MaxSilentTime == 0 {
		return func() {}
	}
	start := clock.Now()
	ticks, stopTick := clock.Tick(limitTick)
	done, ended := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(ended)
		defer stopTick()
		for {
			select {
			case <-done:
				return
			case <-ctx.Done():
				return
			case now := <-ticks:
				if opts.BuildTimeout > 0 && now.Sub(start) > opts.BuildTimeout+LimitGrace {
					cancel(&LimitError{fmt.Sprintf("timed out after %v (enforced by nix-offload)", opts.BuildTimeout)})
					return
				}
				last := lastOutput()
				if last.Before(start) {
					last = start
				}
				if opts.MaxSilentTime > 0 && now.Sub(last) > opts.MaxSilentTime+LimitGrace {
					cancel(&LimitError{fmt.Sprintf("no output for %v (max-silent-time, enforced by nix-offload)", opts.MaxSilentTime)})
					return
				}
			}
		}
	}()
	return func() { close(done); <-ended }
}
