// Package pool keeps warm serve sessions to one build machine, so that the
// broker can run many builds there at once without paying an SSH handshake
// and a remote `nix-store --serve` start for each.
//
// A [Pool] holds SSH connections ([sshconn.Client]) to one machine and serve
// sessions on them: each session is an SSH channel running
// `nix-store --serve --write` ([transport.SSH]) after the protocol handshake
// ([serveproto.Handshake]). [Pool.Get] hands out a session for one build and
// [Pool.Put] takes it back:
//
//   - Get prefers an idle session, else starts one on a connection with
//     room, else dials a new connection. At most [Options.MaxSessions]
//     sessions exist at once (idle, in use, starting or closing); Get blocks
//     while they are all taken, until one comes back or its context ends.
//   - A connection carries at most [Options.SessionsPerConn] sessions:
//     OpenSSH's sshd allows MaxSessions (10 by default) channels per
//     connection. If a machine's sshd allows fewer, its refusal ("open
//     failed") marks the connection full and the session goes to another
//     connection.
//   - At most two connection attempts to a machine are under way at a time,
//     and each one serves up to SessionsPerConn waiting Gets. A failed
//     attempt fails every Get that was waiting for a new connection when it
//     failed, with its error ([*sshconn.ConnectError], [*sshconn.HostKeyError]);
//     Get never retries. The broker decides about backoff; a later Get dials
//     again.
//   - Sessions and connections die: sshd restarts, keepalives go
//     unanswered, the remote process is killed. The pool watches every one of
//     them and forgets a dead idle session at once (it counts as
//     [Stats.Dropped]); Get never hands out a session whose process has ended
//     or whose connection has closed. A connection is closed and forgotten
//     when it is broken and its last session has ended.
//   - Between builds a session's kept stderr and its "stderr is a log" mode
//     are reset ([transport.Session.ResetStderr]) and its log target is
//     detached, so one build's log never explains another's failure.
//   - A session is retired after [Options.MaxUses] builds or when it is
//     [Options.MaxAge] old: every path it reported valid with
//     QueryValidPaths(lock=true) or rooted with AddTempRoot (ssh-ng), and
//     every path it added, is a temporary GC root on the machine for as
//     long as the remote process runs.
//   - After a Get (or Warm) the pool starts sessions in the background
//     until [Options.Idle] are ready again, but no more than the machine's
//     parallel builds not holding a session: a build holds one of the
//     machine's slots while it uses its session, so no further build
//     could use more. It replaces the ones it retires.
//     A failed start, or a session that died, stops that until the next Get:
//     the pool does not probe a machine nobody asked for. Idle sessions
//     beyond Idle that stay unused for a minute are closed, and so are
//     connections that carry no session for a minute.
//
// The methods of a Pool are safe for concurrent use. A [Session] belongs to
// one build at a time, from Get to Put.
package pool

import (
	"context"
	"errors"
	"io"
	"slices"
	"sync"
	"time"

	"github.com/nix-offload/nix-offload/internal/daemonproto"
	"github.com/nix-offload/nix-offload/internal/engine"
	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/sshconn"
	"github.com/nix-offload/nix-offload/internal/transport"
)

// Defaults for what [Options] leaves zero.
const (
	DefaultSessionsPerConn = 8
	DefaultMaxUses         = 50
	DefaultMaxAge          = 10 * time.Minute
	// DefaultMaxIdle caps the default of Options.Idle.
	DefaultMaxIdle = 4
)

const (
	// maxDials is how many connection attempts to one machine may be under
	// way at once.
	maxDials = 2
	// idleTrim is how long a surplus idle session or an empty connection is
	// kept.
	idleTrim = time.Minute
	// tidyEvery is how often idle sessions are checked for age and surplus.
	tidyEvery = 5 * time.Second
)

// ErrClosed is returned by Get and Warm on a closed pool.
var ErrClosed = errors.New("pool: closed")

// Options configure a [Pool]. Only Machine is required.
type Options struct {
	Machine machines.Machine
	// SSHConfig fills in what Machine leaves unset ([sshconn.Resolve]);
	// the broker passes ssh_config.DefaultUserSettings. nil: none.
	SSHConfig sshconn.SSHConfig
	// MaxSessions bounds the sessions on the machine: idle, in use,
	// starting and closing ones. Default: the machine's parallel builds
	// plus 2.
	MaxSessions int
	// SessionsPerConn bounds the sessions on one SSH connection. Default
	// [DefaultSessionsPerConn], below sshd's default MaxSessions of 10.
	SessionsPerConn int
	// Idle is how many idle sessions the pool keeps ready once it has been
	// used (Get or Warm), at most the machine's parallel builds less the
	// sessions in use. 0: the machine's parallel builds, at most
	// [DefaultMaxIdle]; negative: none.
	Idle int
	// MaxUses retires a session after this many builds (Gets). 0:
	// [DefaultMaxUses]; negative: no limit.
	MaxUses int
	// MaxAge retires a session this long after it started. 0:
	// [DefaultMaxAge]; negative: no limit.
	MaxAge time.Duration
	// Dial opens a connection. Default [sshconn.Dial]. The context ends
	// when the pool is closed.
	Dial func(ctx context.Context, t sshconn.Target) (*sshconn.Client, error)
	// OnDial, if set, is called after every connection attempt, with nil
	// for success, from the goroutine that dialled. Attempts cut short by
	// Close are not reported.
	OnDial func(err error)
}

func (o Options) withDefaults() Options {
	jobs := max(o.Machine.ParallelBuilds, 1)
	if o.MaxSessions <= 0 {
		o.MaxSessions = jobs + 2
	}
	if o.SessionsPerConn <= 0 {
		o.SessionsPerConn = DefaultSessionsPerConn
	}
	switch {
	case o.Idle == 0:
		o.Idle = min(jobs, DefaultMaxIdle)
	case o.Idle < 0:
		o.Idle = 0
	}
	o.Idle = min(o.Idle, o.MaxSessions)
	if o.MaxUses == 0 {
		o.MaxUses = DefaultMaxUses
	}
	if o.MaxAge == 0 {
		o.MaxAge = DefaultMaxAge
	}
	if o.Dial == nil {
		o.Dial = sshconn.Dial
	}
	return o
}

// Stats is a snapshot of a pool.
type Stats struct {
	Conns    int // open SSH connections
	Idle     int // sessions ready for Get
	InUse    int // sessions handed out and not yet Put
	Starting int // sessions being started (dialling, opening, handshaking)

	Dials        int64 // connection attempts
	DialFailures int64 // failed connection attempts
	Started      int64 // sessions started
	Reused       int64 // Gets served by a session that had served an earlier Get
	Dropped      int64 // idle sessions found dead (process or connection ended)
	Retired      int64 // sessions closed for MaxUses, MaxAge, or as surplus idle ones

	// LastError is the latest failed connection attempt or session start,
	// nil if none has failed.
	LastError error
}

// Pool is the set of warm connections and sessions to one machine. Create
// it with [New]; Close it when done.
type Pool struct {
	opt    Options
	target sshconn.Target
	name   string // machine name, for errors and sessions
	cmd    string // the remote serve command, or nix-daemon --stdio for ssh-ng
	ng     bool   // the machine speaks the daemon protocol (ssh-ng)

	ctx    context.Context // ends with Close: dials and handshakes stop
	cancel context.CancelFunc
	wg     sync.WaitGroup // every goroutine the pool starts

	// tick and trim are tidyEvery and idleTrim; tests shorten them.
	tick, trim time.Duration
	// now is the clock of MaxAge and of idle trimming; tests move it.
	now func() time.Time

	mu       sync.Mutex
	closed   bool
	probing  bool // a Probe's channel is open
	tidying  bool // the tidy goroutine runs
	refill   bool // keep Idle sessions ready: set by Get and Warm, cleared by a failure
	conns    []*conn
	dials    []*dialing
	idle     []*Session // least recently used first
	live     map[*Session]struct{}
	waiters  []*waiter // Gets in arrival order
	slots    int       // sessions counted against MaxSessions
	starting int       // starts under way
	inUse    int
	// dialFails counts failed connection attempts; a start made for demand
	// older than the latest failure does not dial again but reports it.
	dialFails   int64
	lastDialErr error
	stats       Stats // the counters and LastError
}

// New returns a pool for opt.Machine. It connects nothing yet: the first
// Get, or Warm, does.
func New(opt Options) *Pool {
	opt = opt.withDefaults()
	ctx, cancel := context.WithCancel(context.Background())
	m := opt.Machine
	ng := m.ProtocolOrDefault() == machines.ProtocolSSHNG
	cmd := transport.ServeCommand(m.RemoteProgram, m.RemoteStore)
	if ng {
		cmd = transport.DaemonCommand(m.RemoteProgram, m.RemoteStore)
	}
	return &Pool{
		opt:    opt,
		target: sshconn.Resolve(opt.Machine, opt.SSHConfig),
		name:   opt.Machine.Name(),
		cmd:    cmd,
		ng:     ng,
		ctx:    ctx,
		cancel: cancel,
		tick:   tidyEvery,
		trim:   idleTrim,
		now:    time.Now,
		live:   map[*Session]struct{}{},
	}
}

// waiter is one Get waiting for a session.
type waiter struct {
	ch       chan result // buffered: the pool never blocks on it
	gen      int64       // dialFails when the Get arrived
	starting bool        // a start was made for it
	done     bool        // it has its result or gave up
}

type result struct {
	s   *Session
	err error
}

// start is one session being started, for a Get (w) or to keep sessions
// ready (w nil; report, if set, gets the outcome: Warm).
type start struct {
	w      *waiter
	report chan<- error
	gen    int64
}

// Get returns a session for one build: an idle one if there is one, else a
// new one. It blocks while MaxSessions sessions exist, until one is Put or
// ends, or ctx ends; a session being started for a Get whose ctx ends
// becomes idle. A failed connection attempt that this Get waited for is
// returned as it is ([*sshconn.ConnectError], [*sshconn.HostKeyError]);
// so is a remote nix-store that fails to start or does not greet within the
// machine's connect timeout. The session must be given back with Put,
// whatever happened to it.
func (p *Pool) Get(ctx context.Context) (*Session, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, ErrClosed
	}
	p.refill = true
	w := &waiter{ch: make(chan result, 1), gen: p.dialFails}
	p.waiters = append(p.waiters, w)
	p.dispatchLocked()
	p.mu.Unlock()

	var r result
	select {
	case r = <-w.ch:
	case <-ctx.Done():
		p.mu.Lock()
		if !w.done {
			// A start made for this Get goes on; its session becomes idle.
			p.removeWaiterLocked(w)
			p.mu.Unlock()
			return nil, ctx.Err()
		}
		p.mu.Unlock()
		r = <-w.ch // handed over just now: take it
	}
	if r.s != nil {
		r.s.ts.ResetStderr()
	}
	return r.s, r.err
}

// Put gives back a session from Get, once the build no longer uses it (its
// last protocol call has returned). With reusable, a live session that is
// not due for retirement becomes idle for the next Get; otherwise, or if
// its serve connection broke, it is closed (in the background). Put
// detaches the session's log (see [Session.SetLog]) and never blocks on
// the machine. Putting a session twice does nothing.
func (p *Pool) Put(s *Session, reusable bool) {
	if s == nil || s.p != p {
		return
	}
	s.log.Set(nil)
	p.mu.Lock()
	defer p.mu.Unlock()
	if !s.inUse {
		return
	}
	s.inUse = false
	p.inUse--
	switch {
	case p.closed:
		// Close has closed it, or closes it now.
	case s.ended:
		p.slots--
		p.closeLocked(s)
	case !reusable:
		p.closeLocked(s)
	default:
		switch p.checkLocked(s, p.now()) {
		case retire:
			p.stats.Retired++
			p.closeLocked(s)
		case dead:
			p.closeLocked(s)
		default:
			s.ts.ResetStderr()
			s.idleSince = p.now()
			p.idle = append(p.idle, s)
		}
	}
	p.dispatchLocked()
}

// Warm starts sessions until Idle are ready, and waits for them. It returns
// the first error, or ctx's if ctx ends first (the sessions still start).
// With Idle 0 it does nothing.
func (p *Pool) Warm(ctx context.Context) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return ErrClosed
	}
	p.refill = true
	n := min(p.wantReadyLocked()-len(p.idle)-p.unboundStartsLocked(), p.opt.MaxSessions-p.slots)
	if n <= 0 {
		p.mu.Unlock()
		return nil
	}
	report := make(chan error, n)
	for range n {
		p.launchLocked(&start{report: report, gen: p.dialFails})
	}
	p.mu.Unlock()
	var first error
	for range n {
		select {
		case err := <-report:
			if first == nil {
				first = err
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return first
}

// Stats returns the pool's counters and sizes.
func (p *Pool) Stats() Stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	st := p.stats
	for _, c := range p.conns {
		if !c.isDead() {
			st.Conns++
		}
	}
	st.Idle, st.InUse, st.Starting = len(p.idle), p.inUse, p.starting
	return st
}

// Close closes every session, which cancels the builds running on them,
// and every connection, fails waiting Gets with ErrClosed, and returns when
// every goroutine of the pool has ended. Put still works afterwards.
func (p *Pool) Close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		p.wg.Wait()
		return
	}
	p.closed = true
	p.cancel()
	for len(p.waiters) > 0 {
		p.deliverLocked(p.waiters[0], result{err: ErrClosed})
	}
	sessions := make([]*Session, 0, len(p.live))
	for s := range p.live {
		sessions = append(sessions, s)
	}
	conns := slices.Clone(p.conns)
	p.idle = nil
	p.mu.Unlock()

	// Closing stdin first lets the remote stop its build itself; a session
	// takes up to a second to end, so all at once.
	var wg sync.WaitGroup
	for _, s := range sessions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.ts.Close()
		}()
	}
	wg.Wait()
	for _, c := range conns {
		c.client.Close()
	}
	p.wg.Wait()
}

// dispatchLocked matches waiting Gets with idle sessions, starts sessions
// for the ones left while MaxSessions allows, and keeps Idle sessions
// coming.
func (p *Pool) dispatchLocked() {
	if p.closed {
		return
	}
	now := p.now()
	for len(p.waiters) > 0 && len(p.idle) > 0 {
		s := p.idle[len(p.idle)-1]
		p.idle = p.idle[:len(p.idle)-1]
		switch p.checkLocked(s, now) {
		case dead:
			p.stats.Dropped++
			p.refill = false
			p.closeLocked(s)
		case retire:
			p.stats.Retired++
			p.closeLocked(s)
		default:
			p.handOutLocked(s, p.waiters[0])
		}
	}
	for _, w := range p.waiters {
		if p.slots >= p.opt.MaxSessions {
			break
		}
		if !w.starting {
			w.starting = true
			p.launchLocked(&start{w: w, gen: w.gen})
		}
	}
	if p.refill {
		for len(p.idle)+p.unboundStartsLocked() < p.wantReadyLocked() && p.slots < p.opt.MaxSessions {
			p.launchLocked(&start{gen: p.dialFails})
		}
	}
}

// wantReadyLocked is how many sessions the pool keeps ready now: Idle, but
// no more than the builds the machine can start beside the sessions in
// use. Replacing at once the session a build took, when the slots left
// have one each, would start a session (channel, exec and greeting: round
// trips on the machine's connection, in the build's time) that the
// build's return makes surplus.
func (p *Pool) wantReadyLocked() int {
	return min(p.opt.Idle, max(p.opt.Machine.ParallelBuilds, 1)-p.inUse)
}

// unboundStartsLocked counts the starts whose session will become idle: those
// not made for a Get that still waits.
func (p *Pool) unboundStartsLocked() int {
	n := p.starting
	for _, w := range p.waiters {
		if w.starting {
			n--
		}
	}
	return n
}

func (p *Pool) handOutLocked(s *Session, w *waiter) {
	s.inUse = true
	p.inUse++
	if s.uses > 0 {
		p.stats.Reused++
	}
	s.uses++
	p.deliverLocked(w, result{s: s})
}

func (p *Pool) deliverLocked(w *waiter, r result) {
	p.removeWaiterLocked(w)
	w.ch <- r
}

func (p *Pool) removeWaiterLocked(w *waiter) {
	w.done = true
	if i := slices.Index(p.waiters, w); i >= 0 {
		p.waiters = slices.Delete(p.waiters, i, i+1)
	}
}

func (p *Pool) removeIdleLocked(s *Session) bool {
	i := slices.Index(p.idle, s)
	if i >= 0 {
		p.idle = slices.Delete(p.idle, i, i+1)
	}
	return i >= 0
}

type verdict int

const (
	usable verdict = iota
	dead           // the process, the connection or the protocol stream ended
	retire         // MaxUses or MaxAge reached
)

func (p *Pool) checkLocked(s *Session, now time.Time) verdict {
	switch {
	case s.ended || s.closing || closed(s.ts.Done()) || s.c.isDead() || s.protoErr() != nil:
		return dead
	case p.opt.MaxUses > 0 && s.uses >= p.opt.MaxUses:
		return retire
	case p.opt.MaxAge > 0 && now.Sub(s.born) >= p.opt.MaxAge:
		return retire
	}
	return usable
}

// launchLocked starts a session in the background; it counts against
// MaxSessions from now on.
func (p *Pool) launchLocked(st *start) {
	p.slots++
	p.starting++
	if !p.tidying {
		p.tidying = true
		p.wg.Add(1)
		go p.tidyLoop()
	}
	p.wg.Add(1)
	go p.run(st)
}

// run starts one session and hands it to its Get, or makes it idle.
func (p *Pool) run(st *start) {
	defer p.wg.Done()
	s, err := p.open(st.gen)
	p.mu.Lock()
	p.starting--
	if err == nil && p.closed {
		// Close did not see this session: close it here.
		p.mu.Unlock()
		s.ts.Close()
		p.mu.Lock()
		p.releaseConnLocked(s.c)
		err = ErrClosed
	}
	if err != nil {
		p.slots--
		if !p.closed {
			p.stats.LastError = err
			p.refill = false
		}
		if w := st.w; w != nil && !w.done {
			p.deliverLocked(w, result{err: err})
		}
		p.dispatchLocked()
		p.mu.Unlock()
		if st.report != nil {
			st.report <- err
		}
		return
	}
	p.stats.Started++
	p.live[s] = struct{}{}
	p.wg.Add(1)
	go p.watch(s)
	if w := st.w; w != nil && !w.done {
		p.handOutLocked(s, w)
	} else {
		s.idleSince = p.now()
		p.idle = append(p.idle, s)
	}
	p.dispatchLocked()
	p.mu.Unlock()
	if st.report != nil {
		st.report <- nil
	}
}

// watch does the accounting when a session's process ends, however it
// ends.
func (p *Pool) watch(s *Session) {
	defer p.wg.Done()
	<-s.ts.Done()
	p.mu.Lock()
	s.ended = true
	delete(p.live, s)
	if p.removeIdleLocked(s) && !s.closing {
		p.stats.Dropped++
	}
	if !s.closing {
		// Something else ended it (the machine, the connection, a
		// cancelled build): no background session start until the next
		// Get, which would only probe a machine that may be down.
		p.refill = false
	}
	p.releaseConnLocked(s.c)
	held := s.inUse
	if !held {
		p.slots--
	}
	p.dispatchLocked()
	p.mu.Unlock()
	if !held {
		s.ts.Close() // frees the channel; quick, the process has ended
	}
}

// closeLocked closes a session in the background; watch does the
// accounting.
func (p *Pool) closeLocked(s *Session) {
	if s.closing {
		return
	}
	s.closing = true
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		s.ts.Close()
	}()
}

func (p *Pool) tidyLoop() {
	defer p.wg.Done()
	t := time.NewTicker(p.tick)
	defer t.Stop()
	for {
		select {
		case <-p.ctx.Done():
			return
		case <-t.C:
			p.tidy(p.now())
		}
	}
}

// tidy retires idle sessions that are too old, closes surplus idle
// sessions and empty connections that went unused for p.trim, and refills.
func (p *Pool) tidy(now time.Time) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	surplus := len(p.idle) - p.opt.Idle
	keep := p.idle[:0]
	for _, s := range p.idle { // least recently used first
		switch v := p.checkLocked(s, now); {
		case v == dead:
			p.stats.Dropped++
			p.refill = false
			p.closeLocked(s)
		case v == retire, surplus > 0 && now.Sub(s.idleSince) >= p.trim:
			p.stats.Retired++
			surplus--
			p.closeLocked(s)
		default:
			keep = append(keep, s)
		}
	}
	clear(p.idle[len(keep):])
	p.idle = keep
	var unused []*conn
	for _, c := range p.conns {
		if c.sessions == 0 && !c.isDead() && now.Sub(c.emptySince) >= p.trim {
			unused = append(unused, c)
		}
	}
	for _, c := range unused {
		p.forgetConnLocked(c)
	}
	p.dispatchLocked()
	p.mu.Unlock()
	for _, c := range unused {
		c.client.Close()
	}
}

// Session is one warm serve session, handed out by [Pool.Get] for one build
// at a time.
type Session struct {
	p     *Pool
	c     *conn
	ts    *transport.Session
	conn  *serveproto.Conn  // nil for an ssh-ng machine
	dconn *daemonproto.Conn // the daemon protocol client of an ssh-ng machine
	log   engine.LogSwitch
	born  time.Time

	// Guarded by p.mu.
	uses      int  // Gets it served
	inUse     bool // handed out, not yet Put
	ended     bool // its process has ended
	closing   bool // the pool is closing it
	idleSince time.Time

	// Used by the build that holds the session.
	locked map[string]struct{}
}

// Conn is the session's serve protocol client; nil on an ssh-ng machine.
func (s *Session) Conn() *serveproto.Conn { return s.conn }

// DaemonConn is the session's daemon protocol client on an ssh-ng machine
// (its log goes to SetLog's writer); nil on others.
func (s *Session) DaemonConn() *daemonproto.Conn { return s.dconn }

// protoErr is the error that broke the session's protocol client.
func (s *Session) protoErr() error {
	if s.dconn != nil {
		return s.dconn.Err()
	}
	return s.conn.Err()
}

// SetLog sends the remote's stderr to w from now on; nil discards it.
// Writes come from the session's stderr goroutine and should be quick:
// while one blocks, the remote's stderr is not read. If w fails, it gets
// nothing more. Once SetLog returns, the previous target gets no more
// bytes; Put detaches the log.
func (s *Session) SetLog(w io.Writer) { s.log.Set(w) }

// SetActivities sends an ssh-ng machine's activities to f from now on
// (see [engine.LogSwitch.SetActivities]); nil discards them.
func (s *Session) SetActivities(f func(daemonproto.Message)) { s.log.SetActivities(f) }

// StderrIsLog tells the session that stderr now carries the build's log:
// only Nix's own "error:" lines explain a failure from now on (see
// [transport.Session.StderrIsLog]). It lasts until Put.
func (s *Session) StderrIsLog() { s.ts.StderrIsLog() }

// Close cancels what the session is doing: it closes the remote nix-store's
// stdin, which interrupts a running build, and ends the session. It may be
// called from any goroutine; the session must still be Put.
func (s *Session) Close() { s.ts.Close() }

// Done is closed when the session's remote process has ended.
func (s *Session) Done() <-chan struct{} { return s.ts.Done() }

// Lost says why the session's connection was closed when the machine
// stopped answering keepalives ([sshconn.Client.Lost]); nil otherwise. The
// session itself only sees its stream end.
func (s *Session) Lost() error { return s.c.client.Lost() }

// Name is the machine's name.
func (s *Session) Name() string { return s.p.name }

// Locked splits paths into those this session already holds as temporary
// GC roots on the machine ([Session.MarkLocked]) and the rest, keeping
// their order.
func (s *Session) Locked(paths []string) (locked, rest []string) {
	for _, path := range paths {
		if _, ok := s.locked[path]; ok {
			locked = append(locked, path)
		} else {
			rest = append(rest, path)
		}
	}
	return locked, rest
}

// MarkLocked records paths that this session has seen valid with
// QueryValidPaths(lock=true), added itself or built: the remote process holds
// them as temporary GC roots for as long as it runs, so later builds on the
// session need not query them again.
func (s *Session) MarkLocked(paths []string) {
	if s.locked == nil {
		s.locked = make(map[string]struct{}, len(paths))
	}
	for _, path := range paths {
		s.locked[path] = struct{}{}
	}
}

func closed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}
