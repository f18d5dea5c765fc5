package hookproto

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"time"
)

// BuildLog is the build-log channel, fd 4. Nix reads that pipe only after
// `# accept` and only when its one thread is free: while it waits on
// another hook's reply (or on anything else) the 64 KiB pipe fills up and a
// direct write blocks, stalling whatever copies the remote log, and with it
// the build (NixOS/nix#5701, #16437). BuildLog decouples the two: Write
// copies into a bounded in-memory buffer and returns at once; one
// goroutine drains the buffer into the pipe.
//
// When the buffer is full, Write drops the data (whole writes, so lines
// written whole stay whole) and counts it; once data fits again the log
// gets one line "nix-offload: N bytes of log dropped (the log reader was
// too slow)" where the gap is. When the pipe fails (Nix gave up on the
// build), everything is dropped from then on. Write never blocks and never
// fails.
//
// Nothing must be written to fd 4 before `# accept`: Nix does not read it
// then, and what is written lands in the log of whatever build it accepts
// next.
type BuildLog struct {
	w        io.Writer
	capacity int

	wake chan struct{} // cap 1: data queued or closing
	done chan struct{} // closed when the drain goroutine ends

	mu       sync.Mutex // guards the fields below
	pending  []byte     // queued, not yet handed to w
	inFlight int        // bytes being written to w
	lastNL   bool       // the last byte queued was '\n' (or nothing was queued)
	gap      int64      // bytes dropped since the last note
	dropped  int64      // bytes dropped in all
	closing  bool
	err      error // the write error that stopped the drain goroutine
}

// NewBuildLog starts a BuildLog that buffers up to capacity bytes for w
// (e.g. 8 MiB; it should well exceed the largest single Write). Use an
// *os.File from [OpenBuildLogFD] for fd 4, so that [BuildLog.Close] can
// abandon a write the reader never takes. [BuildLog.Close] must be called.
func NewBuildLog(w io.Writer, capacity int) *BuildLog {
	b := &BuildLog{
		w:        w,
		capacity: max(capacity, 1),
		wake:     make(chan struct{}, 1),
		done:     make(chan struct{}),
		lastNL:   true,
	}
	go b.drain()
	return b
}

// dropNote is the line that stands for n dropped bytes.
func dropNote(n int64) string {
	return fmt.Sprintf("nix-offload: %d bytes of log dropped (the log reader was too slow)\n", n)
}

// Write queues a copy of p, or drops it if the buffer has no room for it.
// It always returns len(p), nil.
func (b *BuildLog) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closing || b.err != nil {
		b.dropped += int64(len(p))
		return len(p), nil
	}
	var note string
	if b.gap > 0 {
		note = b.noteLocked()
	}
	// The note is not counted: it is short, and once per gap.
	if len(b.pending)+b.inFlight+len(p) > b.capacity {
		b.gap += int64(len(p))
		b.dropped += int64(len(p))
		return len(p), nil
	}
	b.pending = append(b.pending, note...)
	b.gap = 0
	b.pending = append(b.pending, p...)
	b.lastNL = p[len(p)-1] == '\n'
	b.signal()
	return len(p), nil
}

// noteLocked returns the note for the current gap, on a line of its own.
func (b *BuildLog) noteLocked() string {
	note := dropNote(b.gap)
	if !b.lastNL {
		note = "\n" + note
	}
	return note
}

func (b *BuildLog) signal() {
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

// Dropped returns the number of bytes dropped so far.
func (b *BuildLog) Dropped() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.dropped
}

// Err returns the error that made the writer fail for good, if any.
func (b *BuildLog) Err() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.err
}

// Close writes what is buffered, adding the note for a gap at the end,
// waiting at most wait for the reader to take it, and stops the drain
// goroutine. It returns the number of bytes dropped in all, including
// what was still buffered when wait ran out. Writes after Close are
// dropped.
//
// If wait runs out while a write to w is blocked, Close sets a past write
// deadline on w if w has a SetWriteDeadline method (an *os.File on a
// pollable, non-blocking pipe, as from [OpenBuildLogFD]), which ends the
// write and the goroutine at once. Otherwise the goroutine stays blocked
// in w.Write until that returns, and then ends; Close does not wait for
// it.
func (b *BuildLog) Close(wait time.Duration) (dropped int64) {
	b.mu.Lock()
	if !b.closing {
		b.closing = true
		if b.gap > 0 && b.err == nil {
			b.pending = append(b.pending, b.noteLocked()...)
			b.gap = 0
		}
		b.signal()
	}
	b.mu.Unlock()

	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-b.done:
	case <-t.C:
		b.abandon()
	}
	return b.Dropped()
}

// abandon gives up on the bytes not yet written.
func (b *BuildLog) abandon() {
	b.mu.Lock()
	if b.err == nil {
		b.err = errors.New("hookproto: build log: closed before the reader took everything")
	}
	b.dropped += int64(len(b.pending))
	b.pending = nil
	b.mu.Unlock()
	b.signal()
	if d, ok := b.w.(interface{ SetWriteDeadline(time.Time) error }); ok {
		if d.SetWriteDeadline(time.Unix(1, 0)) == nil {
			<-b.done
		}
	}
}

// drain is the one goroutine that writes to w.
func (b *BuildLog) drain() {
	defer close(b.done)
	var spare []byte
	for {
		b.mu.Lock()
		if b.err != nil {
			b.mu.Unlock()
			return
		}
		if len(b.pending) == 0 {
			closing := b.closing
			b.mu.Unlock()
			if closing {
				return
			}
			<-b.wake
			continue
		}
		chunk := b.pending
		b.pending = spare[:0]
		b.inFlight = len(chunk)
		b.mu.Unlock()

		n, err := b.w.Write(chunk)

		b.mu.Lock()
		b.inFlight = 0
		if err != nil {
			lost := int64(len(chunk) - n)
			if b.err == nil {
				b.err = fmt.Errorf("hookproto: writing build log: %w", err)
				lost += int64(len(b.pending))
				b.pending = nil
			} // else abandon already counted pending; chunk was in flight
			b.dropped += lost
			b.mu.Unlock()
			return
		}
		spare = chunk
		b.mu.Unlock()
	}
}
