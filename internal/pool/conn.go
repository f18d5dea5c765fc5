package pool

import (
	"errors"
	"fmt"
	"slices"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/nix-offload/nix-offload/internal/daemonproto"
	"github.com/nix-offload/nix-offload/internal/engine"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/sshconn"
	"github.com/nix-offload/nix-offload/internal/transport"
)

// conn is one SSH connection of the pool.
type conn struct {
	client *sshconn.Client
	gone   chan struct{} // closed when the connection has ended

	// Guarded by Pool.mu.
	sessions   int // sessions on it, counting those being opened
	capacity   int // SessionsPerConn, or less once sshd refused a channel
	emptySince time.Time
}

func (c *conn) isDead() bool { return closed(c.gone) }

// dialing is one connection attempt. The starts that wait for it have
// claimed a place on the connection it will bring.
type dialing struct {
	done   chan struct{} // closed when conn or err is set
	claims int           // guarded by Pool.mu
	conn   *conn
	err    error
}

// open starts a session: on a connection with room, else on a new one.
func (p *Pool) open(gen int64) (*Session, error) {
	for attempt := 0; ; attempt++ {
		c, err := p.reserve(gen)
		if err != nil {
			return nil, err
		}
		s, err := p.openOn(c)
		if err == nil {
			return s, nil
		}
		var refused *ssh.OpenChannelError
		p.mu.Lock()
		p.releaseConnLocked(c)
		// sshd refuses a channel beyond its MaxSessions ("open failed")
		// and goes on serving the others: the connection is full at what
		// it has. Look again, a few times at most.
		full := errors.As(err, &refused) && c.sessions > 0 && !c.isDead()
		if full {
			c.capacity = min(c.capacity, c.sessions)
		}
		p.mu.Unlock()
		if !full || attempt == 2 {
			return nil, err
		}
	}
}

// reserve returns a connection with a place taken for one session: one that
// has room, or a new one. A start made before the latest failed connection
// attempt reports that failure instead of dialling again.
func (p *Pool) reserve(gen int64) (*conn, error) {
	p.mu.Lock()
	for {
		if p.closed {
			p.mu.Unlock()
			return nil, ErrClosed
		}
		var best *conn
		for _, c := range p.conns {
			// The fullest connection with room, so that others can empty.
			if !c.isDead() && c.sessions < c.capacity && (best == nil || c.sessions > best.sessions) {
				best = c
			}
		}
		if best != nil {
			best.sessions++
			p.mu.Unlock()
			return best, nil
		}
		var d *dialing
		for _, x := range p.dials {
			if x.claims < p.opt.SessionsPerConn {
				d = x
				break
			}
		}
		if d == nil && p.dialFails > gen {
			err := p.lastDialErr
			p.mu.Unlock()
			return nil, err
		}
		if d == nil && len(p.dials) < maxDials {
			d = &dialing{done: make(chan struct{})}
			p.dials = append(p.dials, d)
			p.wg.Add(1)
			go p.dial(d)
		}
		if d != nil {
			d.claims++
			p.mu.Unlock()
			<-d.done
			if d.err != nil {
				return nil, d.err
			}
			return d.conn, nil // our place is counted in its sessions
		}
		// Every attempt under way is spoken for: wait for one, look again.
		wait := p.dials[0].done
		p.mu.Unlock()
		<-wait
		p.mu.Lock()
	}
}

// dial makes one connection attempt and publishes its outcome.
func (p *Pool) dial(d *dialing) {
	defer p.wg.Done()
	client, err := p.opt.Dial(p.ctx, p.target)
	if err == nil && client == nil {
		err = fmt.Errorf("pool: %s: Dial returned no connection", p.name)
	}
	if p.opt.OnDial != nil && p.ctx.Err() == nil {
		p.opt.OnDial(err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.dials = slices.DeleteFunc(p.dials, func(x *dialing) bool { return x == d })
	p.stats.Dials++
	switch {
	case err == nil && p.closed:
		client.Close()
		d.err = ErrClosed
	case err != nil && p.closed:
		d.err = ErrClosed
	case err != nil:
		p.stats.DialFailures++
		p.stats.LastError = err
		p.dialFails++
		p.lastDialErr = err
		p.refill = false
		d.err = err
	default:
		c := &conn{client: client, gone: make(chan struct{}), sessions: d.claims, capacity: p.opt.SessionsPerConn}
		p.conns = append(p.conns, c)
		d.conn = c
		p.wg.Add(1)
		go p.watchConn(c)
	}
	close(d.done)
}

// watchConn forgets a connection once it has ended and carries no session.
func (p *Pool) watchConn(c *conn) {
	defer p.wg.Done()
	_ = c.client.Wait()
	close(c.gone)
	c.client.Close() // stops its keepalives now
	p.mu.Lock()
	if c.sessions == 0 {
		p.forgetConnLocked(c)
	}
	p.dispatchLocked()
	p.mu.Unlock()
}

func (p *Pool) releaseConnLocked(c *conn) {
	c.sessions--
	if c.sessions > 0 {
		return
	}
	if c.isDead() {
		p.forgetConnLocked(c)
	} else {
		c.emptySince = p.now()
	}
}

func (p *Pool) forgetConnLocked(c *conn) {
	p.conns = slices.DeleteFunc(p.conns, func(x *conn) bool { return x == c })
}

// openOn opens a channel on c that runs the serve command, and shakes hands
// with it (engine.OpenServe). The handshake is bounded by the machine's
// connect timeout.
func (p *Pool) openOn(c *conn) (*Session, error) {
	s := &Session{p: p, c: c, born: p.now()}
	// A machine that never greets gets its connection closed: the pool's
	// watcher then forgets it, and every session on it fails.
	var err error
	if p.ng {
		s.ts, s.dconn, err = engine.OpenDaemon(p.ctx, c.client, p.cmd, p.target.ConnectTimeout, p.name, engine.LogMessages(&s.log))
	} else {
		s.ts, s.conn, err = engine.OpenServe(p.ctx, c.client, p.cmd, p.target.ConnectTimeout, transport.Options{Name: p.name, Stderr: &s.log})
	}
	var late *serveproto.NoGreetingError
	var dlate *daemonproto.NoGreetingError
	switch {
	case err != nil && p.ctx.Err() != nil:
		err = ErrClosed
	case errors.As(err, &late), errors.As(err, &dlate):
		err = fmt.Errorf("pool: %w", err)
	}
	if err != nil {
		return nil, err
	}
	return s, nil
}
