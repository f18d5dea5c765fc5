package offload

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/nix-offload/nix-offload/internal/serveproto"
)

// LimitGrace is how much longer than the machine we wait before we enforce
// max-silent-time or timeout ourselves: the machine's own message is the
// better one when it comes. Nix enforces neither on hook builds.
const LimitGrace = 5 * time.Second

// LimitError is a limit nix-offload enforced itself.
type LimitError struct{ Msg string }

func (e *LimitError) Error() string { return e.Msg }

// Activity records when a build last printed something.
type Activity struct{ last atomic.Int64 }

// Touch records output now.
func (a *Activity) Touch() { a.last.Store(time.Now().UnixNano()) }

// WatchLimits cancels the build (with a *LimitError as the cause) when
// opts.BuildTimeout passes, or when act saw no output for
// opts.MaxSilentTime, LimitGrace after the machine should have stopped it.
// Call stop when the build has ended.
func WatchLimits(ctx context.Context, cancel context.CancelCauseFunc, opts serveproto.BuildOptions, act *Activity) (stop func()) {
	if opts.BuildTimeout == 0 && opts.MaxSilentTime == 0 {
		return func() {}
	}
	start := time.Now()
	act.Touch()
	done := make(chan struct{})
	go func() {
		tick := time.NewTicker(500 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-ctx.Done():
				return
			case now := <-tick.C:
				if opts.BuildTimeout > 0 && now.Sub(start) > opts.BuildTimeout+LimitGrace {
					cancel(&LimitError{fmt.Sprintf("timed out after %v (enforced by nix-offload)", opts.BuildTimeout)})
					return
				}
				silent := now.Sub(time.Unix(0, act.last.Load()))
				if opts.MaxSilentTime > 0 && silent > opts.MaxSilentTime+LimitGrace {
					cancel(&LimitError{fmt.Sprintf("no output for %v (max-silent-time, enforced by nix-offload)", opts.MaxSilentTime)})
					return
				}
			}
		}
	}()
	return func() { close(done) }
}
