package pool

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/nix-offload/nix-offload/internal/probe"
)

// ErrNoConn is Probe's answer when the pool has no open connection with room for a channel: it
// never dials for a probe.
var ErrNoConn = errors.New("no open connection to ask on")

// errProbing is Probe's answer while an earlier probe's channel is still open.
var errProbing = errors.New("the last probe has not ended yet")

// Probe asks the machine about itself (internal/probe) in an exec channel of a connection the
// pool has open, without a new SSH handshake, and returns the answer within timeout. The
// channel takes a place on its connection like a session, so the pool never opens more
// channels than SessionsPerConn (below sshd's MaxSessions); one probe at a time runs.
//
// Any error means "state unknown", never "down": a key with a forced command runs something
// else, which Parse refuses, and a probe that does not end in time has its channel closed (the
// connection and its builds go on; its place is freed once the channel has ended).
func (p *Pool) Probe(ctx context.Context, timeout time.Duration) (probe.State, error) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return probe.State{}, ErrClosed
	}
	if p.probing {
		p.mu.Unlock()
		return probe.State{}, errProbing
	}
	var c *conn
	for _, x := range p.conns {
		// The emptiest connection with room: builds keep the fuller ones.
		if !x.isDead() && x.sessions < x.capacity && (c == nil || x.sessions < c.sessions) {
			c = x
		}
	}
	if c == nil {
		p.mu.Unlock()
		return probe.State{}, ErrNoConn
	}
	// An empty connection keeps the time it emptied: a probe every few seconds must not keep
	// a connection that builds no longer use from being closed.
	wasEmpty, emptySince := c.sessions == 0, c.emptySince
	c.sessions++
	p.probing = true
	p.wg.Add(1)
	p.mu.Unlock()

	type answer struct {
		out []byte
		err error
	}
	res := make(chan answer, 1)
	abort := make(chan struct{})
	go func() {
		defer p.wg.Done()
		defer func() {
			p.mu.Lock()
			p.probing = false
			p.releaseConnLocked(c)
			if wasEmpty && c.sessions == 0 {
				c.emptySince = emptySince
			}
			p.dispatchLocked()
			p.mu.Unlock()
		}()
		s, err := c.client.NewSession()
		if err != nil {
			res <- answer{err: fmt.Errorf("opening a channel: %w", err)}
			return
		}
		defer s.Close()
		out := &capped{max: probe.MaxOutput}
		s.Stdout, s.Stderr = out, io.Discard
		done := make(chan error, 1)
		if err := s.Start(probe.Command("/nix/store")); err != nil {
			res <- answer{err: err}
			return
		}
		go func() { done <- s.Wait() }()
		select {
		case err = <-done:
			if err == nil && out.over {
				err = fmt.Errorf("answer longer than %d bytes", probe.MaxOutput)
			}
			res <- answer{out: out.b, err: err}
		case <-abort:
			s.Close()
			// The place stays taken until the channel has ended, or the connection has.
			select {
			case <-done:
			case <-c.gone:
			case <-p.ctx.Done():
			}
		}
	}()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case a := <-res:
		if a.err != nil {
			return probe.State{}, a.err
		}
		return probe.Parse(a.out)
	case <-timer.C:
		close(abort)
		return probe.State{}, fmt.Errorf("no answer within %v", timeout)
	case <-ctx.Done():
		close(abort)
		return probe.State{}, context.Cause(ctx)
	case <-p.ctx.Done():
		close(abort)
		return probe.State{}, ErrClosed
	}
}

// capped keeps the first max bytes written to it and notes whether more came.
type capped struct {
	b    []byte
	max  int
	over bool
}

func (c *capped) Write(p []byte) (int, error) {
	if room := c.max - len(c.b); len(p) > room {
		c.b = append(c.b, p[:room]...)
		c.over = true
		return len(p), nil
	}
	c.b = append(c.b, p...)
	return len(p), nil
}
