// Package broker is the long-lived side of nix-offload: one process per
// host that owns the machines' warm connections, every build slot, the
// queue and machine health, and runs the builds the hook processes hand it
// (brokerapi describes the API; server.go serves it).
//
// # Slots and the queue
//
// A build holds a ticket. A ticket either holds a slot on one machine or
// waits in one queue, ordered by priority (hooks' builds above every
// submission, submissions by their BuildRequest.Priority), then arrival.
// The scheduler's rules decide (internal/scheduler):
// where Nix's own hook would answer "postpone" (every capable machine busy
// or down, and the local side cannot build), the broker accepts and queues
// instead, so the build starts the moment a slot frees instead of after
// build-poll-interval. When no slot is free anywhere, freeing nothing costs
// nothing: the dispatcher stops at once, so an event costs O(1) however
// long the queue is.
//
// # Placement
//
// Among the machines that can take a build now, the scheduler prefers the
// one that holds most of the build's input bytes, as far as this broker
// knows from what it sent or built there (place.go), and skips machines
// over their min-free-space or max-load by what they said when last asked
// over their warm connection (every Options.StateEvery).
//
// # Health
//
// A machine that cannot be reached goes on Hydra's backoff (internal/health),
// shared through the state directory with hooks that run without a broker.
// A queued build whose every capable machine is down probes one of them at
// most every probeEvery, instead of waiting out the backoff.
//
// # Failures
//
// A build whose connection dies before its outputs were handed over is
// retried on another machine, up to engine.MaxMachines machines
// (internal/engine runs every build; placer is the broker's side of it). A
// build that ran and failed on the machine is not. A machine that cannot
// give a build a session is skipped for it: for good on a permanent error
// (engine.Permanent), and on backoff otherwise, in which case the build
// waits for it, or another, up to [daemon] machine-wait, the rule of the
// hook alone.
package broker

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/engine"
	"github.com/nix-offload/nix-offload/internal/graph"
	"github.com/nix-offload/nix-offload/internal/health"
	"github.com/nix-offload/nix-offload/internal/localstore"
	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/metrics"
	"github.com/nix-offload/nix-offload/internal/scheduler"
	"github.com/nix-offload/nix-offload/internal/slots"
	"github.com/nix-offload/nix-offload/internal/uploads"
)

const (
	// probeEvery is how often a machine on backoff is tried anyway when a
	// queued build has no other.
	probeEvery = 10 * time.Second
	// reservationTTL frees a slot reserved by a "try" that no build quoted.
	reservationTTL = 2 * time.Minute
	// localSessions bounds the warm read sessions on the local store.
	localSessions = 8
)

// Session is one warm serve session on a machine, used by one build at a
// time (internal/pool implements it): the engine's session, and the
// session's memory of the paths it holds locked on the machine.
type Session interface {
	engine.Session
	Locked(paths []string) (locked, rest []string)
	MarkLocked(paths []string)
}

// PoolStats is what a Pool tells the status page.
type PoolStats struct {
	Conns, Idle, InUse int
}

// Pool holds a machine's connections and sessions.
type Pool interface {
	Get(ctx context.Context) (Session, error)
	Put(s Session, reusable bool)
	Warm(ctx context.Context) error
	Stats() PoolStats
	Close()
}

// Options configure a Broker.
type Options struct {
	Config  *machines.Config
	Health  *health.Tracker
	Metrics *metrics.Registry // nil: none
	Log     *zap.Logger
	Version string
	// NewPool makes the pool of machine m; onDial must be called after each
	// connection attempt. NewSSHPool if nil.
	NewPool func(m machines.Machine, onDial func(error)) Pool
	// Slots, if set, is the host's slot directory (internal/slots): the
	// broker holds a slot file for every slot it grants, so that hooks
	// working alone at the same time (before it started, after it handed
	// builds back) and the broker never run more than parallel-builds on a
	// machine between them.
	Slots *slots.Dir
	// OpenLocal opens a read session on the local store;
	// localstore.Open(localstore.Options{}) if nil.
	OpenLocal func() (*localstore.Store, error)
	// Now is the clock of machine-wait and of Healthy; time.Now if nil.
	Now func() time.Time
	// LogDir is Nix's log directory, where graphs' build logs go (graph.DefaultLogDir() if
	// ""): `nix log DRV` shows them.
	LogDir string
	// StateEvery is how often each machine is asked about its load and free space over its
	// warm connection (a Pool that is a Prober); 5 s if 0.
	StateEvery time.Duration
}

// Broker is the scheduler and build runner of one host.
type Broker struct {
	opt     Options
	log     *zap.Logger
	health  *health.Tracker
	started time.Time
	// probeEvery is how often a machine on backoff is tried for a build
	// that has no other (probeEvery; tests shorten it).
	probeEvery time.Duration
	// machineWait bounds how long a build waits for machines that failed
	// it transiently ([daemon] machine-wait, engine.DefaultGiveUp if unset).
	machineWait time.Duration
	now         func() time.Time // Options.Now
	local       *localPool
	mx          *brokerMetrics

	machines []*machine
	byName   map[string]*machine
	cfgMs    []machines.Machine // config order, for the scheduler

	ctx    context.Context // ends when the broker is stopped hard
	cancel context.CancelFunc
	seq    atomic.Uint64
	wake   chan struct{}
	wg     sync.WaitGroup // running builds
	loops  sync.WaitGroup // the dispatcher and warm-up, which Close waits for
	// healthFailing is set while the health file cannot be written, and
	// slotsFailing while the slot files cannot be made.
	healthFailing, slotsFailing atomic.Bool
	// beat is when the dispatcher last went round (UnixNano), for Healthy.
	beat atomic.Int64

	mu      sync.Mutex
	probes  map[string]bool // machines on backoff granted a probe, not used yet
	queue   []*ticket
	tickets map[string]*ticket // by id, while they hold a slot or wait
	builds  map[string]*build  // by ticket id
	// starting holds the keepOutputs submissions being started, by
	// derivation, until they are in builds (see sameBuild).
	starting map[string]chan struct{}
	stopping bool

	graphMu sync.Mutex
	graphs  map[string]*graphRun // running and recently finished, by id
	seams   graphSeams           // tests' planning and builder
}

type machine struct {
	cfg     machines.Machine
	name    string
	pool    Pool
	uploads *uploads.Table
	used    int // slots held, under Broker.mu

	builds, failed      atomic.Uint64
	bytesSent, bytesRcv atomic.Uint64

	// Under Broker.mu:
	live liveState         // what it last said about itself (watchState)
	has  map[string]uint64 // store paths this broker sent or built there → NAR bytes
}

// ticket is one build's claim: a slot on machine, or a place in the queue.
type ticket struct {
	id      string
	req     scheduler.Request
	drvPath string
	owner   *client // nil for none
	created time.Time

	machine *machine          // the slot held; nil while queued
	slot    *slots.Slot       // its slot file, with Options.Slots
	granted chan struct{}     // wake-ups of the build waiting for a slot or a failure
	failure string            // why no machine will take it (after granted)
	exclude map[string]string // machines that failed this build: name → why
	queued  bool
	// failedAt is when a machine first failed this build transiently, and
	// lastErr what the last one said: the build waits machine-wait from
	// then for one to come back.
	failedAt time.Time
	lastErr  string
	// priority orders it in the queue: higher first (brokerapi.PriorityHook for hooks).
	priority int
	// hint is some of the paths the build needs on its machine, for placement (inputHint),
	// and sizes their NAR sizes where the local store knows them.
	hint  []string
	sizes map[string]uint64
	// held counts, per machine, the inputs only it holds (a graph's kept outputs):
	// scheduler.View.Held.
	held map[string]int
}

// New starts a broker: it opens the machines' pools and the local store
// and warms both in the background.
func New(opt Options) *Broker {
	if opt.Log == nil {
		opt.Log = zap.NewNop()
	}
	if opt.NewPool == nil {
		opt.NewPool = NewSSHPool
	}
	if opt.Now == nil {
		opt.Now = time.Now
	}
	if opt.LogDir == "" {
		opt.LogDir = graph.DefaultLogDir()
	}
	if opt.StateEvery <= 0 {
		opt.StateEvery = stateEvery
	}
	if opt.OpenLocal == nil {
		opt.OpenLocal = func() (*localstore.Store, error) { return localstore.Open(localstore.Options{}) }
	}
	ctx, cancel := context.WithCancel(context.Background())
	b := &Broker{
		opt:         opt,
		log:         opt.Log,
		health:      opt.Health,
		started:     time.Now(),
		probeEvery:  probeEvery,
		machineWait: cmp.Or(opt.Config.Daemon.MachineWait, engine.DefaultGiveUp),
		now:         opt.Now,
		local:       newLocalPool(localSessions, opt.OpenLocal),
		byName:      map[string]*machine{},
		ctx:         ctx,
		cancel:      cancel,
		wake:        make(chan struct{}, 1),
		tickets:     map[string]*ticket{},
		probes:      map[string]bool{},
		builds:      map[string]*build{},
		graphs:      map[string]*graphRun{},
	}
	for _, m := range opt.Config.Machines {
		mm := &machine{cfg: m, name: m.Name(), uploads: uploads.New(max(m.ParallelBuilds, 2))}
		mm.pool = opt.NewPool(m, b.onDial(mm))
		b.machines = append(b.machines, mm)
		b.byName[mm.name] = mm
		b.cfgMs = append(b.cfgMs, m)
	}
	b.mx = newBrokerMetrics(b, opt.Metrics)
	for _, m := range b.machines {
		if pr, ok := m.pool.(Prober); ok {
			b.loops.Add(1)
			go func() { defer b.loops.Done(); b.watchState(m, pr) }()
		}
	}
	b.loops.Add(2)
	go func() { defer b.loops.Done(); b.dispatcher() }()
	go func() { defer b.loops.Done(); b.warm() }()
	return b
}

// onDial feeds machine health with the outcome of every connection attempt.
func (b *Broker) onDial(m *machine) func(error) {
	return func(err error) {
		if err == nil {
			if b.health.Get(m.name).Failures > 0 {
				b.log.Info("machine is back", zap.String("machine", m.name))
			}
			b.healthError(b.health.Succeeded(m.name))
			b.kick()
			return
		}
		st, herr := b.health.Failed(m.name, err)
		b.healthError(herr)
		b.log.Warn("machine unreachable", zap.String("machine", m.name), zap.Error(err),
			zap.Int("failures", st.Failures), zap.Time("retry_at", st.Until))
	}
}

// healthError says once that the health file cannot be used (the backoff
// stays in memory), and again only after it worked in between.
func (b *Broker) healthError(err error) {
	if err == nil {
		b.healthFailing.Store(false)
		return
	}
	if !b.healthFailing.Swap(true) {
		b.log.Warn("recording machine health; keeping it in memory until the file works", zap.Error(err))
	}
}

func (b *Broker) warm() {
	if err := b.local.warm(); err != nil {
		b.log.Warn("local store", zap.Error(err))
	}
	var wg sync.WaitGroup
	for _, m := range b.machines {
		if !m.cfg.Enabled {
			continue
		}
		if _, down := b.health.Down()[m.name]; down {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(b.ctx, time.Minute)
			defer cancel()
			if err := m.pool.Warm(ctx); err == nil {
				b.log.Info("machine ready", zap.String("machine", m.name))
			}
		}()
	}
	wg.Wait()
}

// Close stops everything now: running builds are cancelled.
func (b *Broker) Close() {
	b.mu.Lock()
	b.stopping = true
	b.mu.Unlock()
	b.cancel()
	b.wg.Wait()
	b.loops.Wait()
	for _, m := range b.machines {
		m.pool.Close()
	}
	b.local.close()
}

// Drain stops taking builds: new tries are refused, queued builds are
// handed back to their hooks, and Drain waits until the running builds
// have finished or ctx ends (then it cancels them).
func (b *Broker) Drain(ctx context.Context) {
	b.mu.Lock()
	b.stopping = true
	for _, t := range b.queue {
		t.failure = handBack
		t.queued = false
		t.wake()
	}
	b.queue = nil
	b.mu.Unlock()
	done := make(chan struct{})
	go func() { b.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		b.log.Warn("stopping: cancelling the builds still running")
		b.cancel()
		<-done
	}
}

// handBack is a ticket's failure when the broker stops before the build
// got a machine: the hook runs it itself.
const handBack = "the broker is stopping"

func (b *Broker) kick() {
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

// dispatcher gives free slots to queued tickets, when woken and every
// second (backoffs end and probes come due without an event).
func (b *Broker) dispatcher() {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		b.beat.Store(b.now().UnixNano())
		select {
		case <-b.ctx.Done():
			return
		case <-b.wake:
		case <-tick.C:
			b.expireReservations()
			b.retireGraphs()
			// Hooks that work without the broker record failures too.
			b.health.Reload()
		}
		b.grantProbes()
		b.mu.Lock()
		b.dispatchLocked()
		b.mu.Unlock()
	}
}

// stuckAfter is how long the dispatcher may go without a round (it has one
// every second) before Healthy reports it stuck.
const stuckAfter = 30 * time.Second

// Healthy reports an error when the dispatcher has stopped going round:
// it waits for the broker's lock every second, so a lock held for good, or
// a dispatcher that died, shows here. The daemon's systemd watchdog is fed
// only while this and a request on the broker's own socket succeed.
func (b *Broker) Healthy() error {
	if b.ctx.Err() != nil {
		return errors.New("the broker is closed")
	}
	last := time.Unix(0, b.beat.Load())
	if since := b.now().Sub(last); b.beat.Load() != 0 && since > stuckAfter {
		return fmt.Errorf("the dispatcher has not run for %v", since.Round(time.Second))
	}
	return nil
}

// freeSlots reports whether any enabled machine has a free slot.
func (b *Broker) freeSlotsLocked() bool {
	for _, m := range b.machines {
		if m.cfg.Enabled && m.used < m.cfg.ParallelBuilds {
			return true
		}
	}
	return false
}

func (b *Broker) dispatchLocked() {
	if len(b.queue) == 0 || b.stopping {
		return
	}
	kept := b.queue[:0]
	for i, t := range b.queue {
		if !b.freeSlotsLocked() {
			kept = append(kept, b.queue[i:]...)
			break
		}
		d := b.decideLocked(t)
		switch d.Verdict {
		case scheduler.Accept:
			present := b.presentLocked(t)
			if m := b.grantFirstLocked(t, d.Candidates); m != nil {
				b.logPlacement(t, m, present)
				continue
			}
			kept = append(kept, t) // hooks working alone hold those slots
		case scheduler.Postpone:
			if m := b.probeLocked(t); m != nil && b.grantLocked(t, m) {
				b.log.Info("probing a machine on backoff for a waiting build",
					zap.String("machine", m.name), zap.String("drv", t.drvPath))
				continue
			}
			if why := b.waitedOutLocked(t); why != "" {
				t.failure = why
				t.queued = false
				t.wake()
				continue
			}
			kept = append(kept, t)
		default:
			t.failure = d.Reason
			t.queued = false
			t.wake()
		}
	}
	clear(b.queue[len(kept):])
	b.queue = kept
}

// grantProbes asks health, outside b.mu (it may wait for the health file's
// lock), for a probe of each machine on backoff that has a free slot while
// builds are queued; probeLocked hands the grants out.
func (b *Broker) grantProbes() {
	down := b.health.Down()
	b.mu.Lock()
	var due []string
	if len(b.queue) > 0 {
		for _, m := range b.machines {
			if _, isDown := down[m.name]; isDown && !b.probes[m.name] && m.cfg.Enabled && m.used < m.cfg.ParallelBuilds {
				due = append(due, m.name)
			}
		}
	}
	every := b.probeEvery
	b.mu.Unlock()
	var granted []string
	for _, name := range due {
		if ok, _ := b.health.Probe(name, every); ok {
			granted = append(granted, name)
		}
	}
	if len(granted) == 0 {
		return
	}
	b.mu.Lock()
	for _, name := range granted {
		b.probes[name] = true
	}
	b.mu.Unlock()
}

// probeLocked picks a machine that can build t, has a free slot and was
// granted a probe (grantProbes), and spends the grant.
func (b *Broker) probeLocked(t *ticket) *machine {
	for _, m := range b.machines {
		if _, excluded := t.exclude[m.name]; excluded || m.used >= m.cfg.ParallelBuilds || !b.probes[m.name] {
			continue
		}
		if !scheduler.Matches(m.cfg, t.req) {
			continue
		}
		delete(b.probes, m.name)
		return m
	}
	return nil
}

// waitedOutLocked returns why t's build fails, when it has waited
// machine-wait since a machine first failed it transiently and every
// machine that can build it is still down or has failed it: the rule of
// the hook alone (engine.Alone), with the same setting. It returns "" while
// the build may wait on.
func (b *Broker) waitedOutLocked(t *ticket) string {
	if t.failedAt.IsZero() || b.now().Sub(t.failedAt) < b.machineWait {
		return ""
	}
	down := b.health.Down()
	for _, m := range b.machines {
		_, excluded := t.exclude[m.name]
		_, isDown := down[m.name]
		if scheduler.Matches(m.cfg, t.req) && !excluded && !isDown {
			return ""
		}
	}
	return fmt.Sprintf("%s; no machine that can build it came back within machine-wait (%v)", t.lastErr, b.machineWait)
}

func (b *Broker) loadLocked() map[string]int {
	load := make(map[string]int, len(b.machines))
	for _, m := range b.machines {
		load[m.name] = m.used
	}
	return load
}

func (b *Broker) decideLocked(t *ticket) scheduler.Decision {
	return scheduler.Place(b.cfgMs, t.req, b.viewLocked(t))
}

func (b *Broker) grantLocked(t *ticket, m *machine) bool {
	if b.opt.Slots != nil {
		// The host's one slot ledger: hooks working alone count these
		// files, and hold some while the broker starts or stops.
		s, ok, err := b.opt.Slots.Acquire(m.cfg)
		switch {
		case err != nil:
			// The state directory is full or read-only: hooks alone cannot
			// take slot files either, so the broker's count is the one
			// that works. Refusing would queue every build for good.
			if !b.slotsFailing.Swap(true) {
				b.log.Warn("slot files cannot be used; counting slots in memory until they can", zap.String("machine", m.name), zap.Error(err))
			}
		case !ok:
			return false
		default:
			b.slotsFailing.Store(false)
			t.slot = s
		}
	}
	m.used++
	t.machine = m
	// Its inputs are on their way there: later builds that need them count them as present.
	for p, n := range t.sizes {
		m.knowLocked(p, n)
	}
	if t.queued {
		t.queued = false
		t.wake()
	}
	return true
}

// grantFirstLocked grants t the first of candidates whose slot it can
// take, and returns that machine, or nil.
func (b *Broker) grantFirstLocked(t *ticket, candidates []machines.Machine) *machine {
	for _, c := range candidates {
		if m := b.byName[c.Name()]; b.grantLocked(t, m) {
			return m
		}
	}
	return nil
}

// wake tells the build waiting on t that t got a slot or a failure. It
// never blocks (it is called under Broker.mu): one pending wake-up is
// enough, because waitSlot looks at the ticket after each one, and one may
// be left over from a grant that came before the build started to wait.
func (t *ticket) wake() {
	select {
	case t.granted <- struct{}{}:
	default:
	}
}

// releaseLocked frees t's slot and takes it out of the queue.
func (b *Broker) releaseLocked(t *ticket) {
	if t.machine != nil {
		t.machine.used--
		t.machine = nil
		if t.slot != nil {
			t.slot.Release()
			t.slot = nil
		}
		b.kick()
	}
	if t.queued {
		t.queued = false
		if i := slices.Index(b.queue, t); i >= 0 {
			b.queue = slices.Delete(b.queue, i, i+1)
		}
	}
}

// forget frees t and forgets it.
func (b *Broker) forget(t *ticket) {
	b.mu.Lock()
	b.releaseLocked(t)
	delete(b.tickets, t.id)
	b.mu.Unlock()
}

func (b *Broker) newTicket(req scheduler.Request, drvPath string, owner *client) *ticket {
	return &ticket{
		id:      strconv.FormatUint(b.seq.Add(1), 10),
		req:     req,
		drvPath: drvPath,
		owner:   owner,
		created: time.Now(),
		granted: make(chan struct{}, 1),
		exclude: map[string]string{},
	}
}

// errStopping refuses work while the broker stops; errHandBack ends a
// build that had no machine yet when it began to.
var (
	errStopping = errors.New(handBack)
	errHandBack = errors.New(handBack)
)

// Try answers a hook's "try". An accepted build holds a ticket for owner:
// a slot, or a place in the queue, ahead of every submission's.
func (b *Broker) Try(req brokerapi.TryRequest, owner *client) (brokerapi.TryResponse, error) {
	return b.try(req, owner, brokerapi.PriorityHook, nil)
}

// try is Try for a build of the given priority, whose inputs include held (a graph's outputs
// that stay on the machines that built them).
func (b *Broker) try(req brokerapi.TryRequest, owner *client, priority int, held []brokerapi.HeldPath) (brokerapi.TryResponse, error) {
	sreq := scheduler.Request{System: req.System, RequiredFeatures: req.RequiredFeatures, AmWilling: req.AmWilling}
	// Before the lock: these read files and ask the local store.
	hint := inputHint(req.DrvPath)
	for _, h := range held {
		if !slices.Contains(hint, h.Path) {
			hint = append(hint, h.Path)
		}
	}
	sizes := b.inputSizes(hint, held)
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.stopping {
		return brokerapi.TryResponse{}, errStopping
	}
	t := b.newTicket(sreq, req.DrvPath, owner)
	t.priority, t.hint, t.sizes = priority, hint, sizes
	for _, h := range held {
		if m := b.byName[h.Machine]; m != nil {
			m.knowLocked(h.Path, h.NarSize)
			if t.held == nil {
				t.held = map[string]int{}
			}
			t.held[m.name]++
		}
	}
	d := b.decideLocked(t)
	var resp brokerapi.TryResponse
	switch d.Verdict {
	case scheduler.Accept:
		present := b.presentLocked(t)
		if m := b.grantFirstLocked(t, d.Candidates); m != nil {
			b.logPlacement(t, m, present)
			resp = brokerapi.TryResponse{Verdict: brokerapi.Accept, Machine: m.name}
			break
		}
		// Hooks working alone hold the free slots' files: wait for them.
		b.enqueueLocked(t)
		resp = brokerapi.TryResponse{Verdict: brokerapi.Accept, Queued: true, Reason: "the free slots are held by hooks working without the broker"}
	case scheduler.Postpone:
		if m := b.probeLocked(t); m != nil && b.grantLocked(t, m) {
			resp = brokerapi.TryResponse{Verdict: brokerapi.Accept, Machine: m.name}
			break
		}
		b.enqueueLocked(t)
		resp = brokerapi.TryResponse{Verdict: brokerapi.Accept, Queued: true, Reason: d.Reason}
	case scheduler.DeclinePermanently:
		return brokerapi.TryResponse{Verdict: brokerapi.DeclinePermanently, Reason: d.Reason}, nil
	default:
		return brokerapi.TryResponse{Verdict: brokerapi.Decline, Reason: d.Reason}, nil
	}
	b.tickets[t.id] = t
	resp.Reservation = t.id
	if owner != nil {
		owner.own(t.id)
	}
	return resp, nil
}

// expireReservations frees slots reserved by tries that no build quoted.
func (b *Broker) expireReservations() {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	for id, t := range b.tickets {
		if _, building := b.builds[id]; !building && now.Sub(t.created) > reservationTTL {
			b.log.Warn("reservation expired", zap.String("drv", t.drvPath))
			b.releaseLocked(t)
			delete(b.tickets, id)
		}
	}
}

// Status returns the state of the broker.
func (b *Broker) Status() brokerapi.Status {
	down := b.health.Down()
	b.mu.Lock()
	st := brokerapi.Status{Version: b.opt.Version, Started: b.started, Queued: len(b.queue), Running: len(b.builds)}
	used := make(map[string]int, len(b.machines))
	live := make(map[string]liveState, len(b.machines))
	held := make(map[string]string, len(b.machines))
	for _, m := range b.machines {
		used[m.name], live[m.name], held[m.name] = m.used, m.live, b.heldLocked(m)
	}
	b.mu.Unlock()
	for _, m := range b.machines {
		h := b.health.Get(m.name)
		ps := m.pool.Stats()
		_, isDown := down[m.name]
		st.Machines = append(st.Machines, brokerapi.MachineStatus{
			Name: m.name, Systems: m.cfg.Systems, Features: m.cfg.Features, Enabled: m.cfg.Enabled,
			SlotsUsed: used[m.name], Slots: m.cfg.ParallelBuilds,
			Up: !isDown, DownUntil: h.Until, Failures: h.Failures, LastError: h.LastError, LastErrAt: h.LastErrorAt,
			Conns: ps.Conns, Idle: ps.Idle, InUse: ps.InUse,
			Builds: m.builds.Load(), Failed: m.failed.Load(),
			BytesSent: m.bytesSent.Load(), BytesRecvd: m.bytesRcv.Load(),
			MinFreeSpace: m.cfg.MinFreeSpace, MaxLoad: m.cfg.MaxLoad, State: stateStatus(live[m.name]), Held: held[m.name],
		})
	}
	return st
}
