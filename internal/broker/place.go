package broker

import (
	"context"
	"errors"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/pool"
	"github.com/nix-offload/nix-offload/internal/probe"
	"github.com/nix-offload/nix-offload/internal/scheduler"
)

const (
	// stateEvery is how often each machine is asked about itself, unless
	// Options.StateEvery says otherwise.
	stateEvery = 5 * time.Second
	// stateTimeout bounds one answer.
	stateTimeout = 3 * time.Second
	// maxKnownPaths bounds the locality memory of one machine: past it, the memory starts over
	// (it is a hint; the build asks the machine anyway).
	maxKnownPaths = 100_000
)

// Prober is a [Pool] that can ask its machine about itself over a warm connection
// (internal/pool's Probe). A Pool that is not one leaves the machine's state unknown.
type Prober interface {
	Probe(ctx context.Context, timeout time.Duration) (probe.State, error)
}

// liveState is a machine's last answer about itself, under Broker.mu.
type liveState struct {
	at  time.Time
	st  probe.State
	err string // why nothing usable came; "" when it answered
}

// watchState asks m about itself every Options.StateEvery while the broker runs, and wakes the
// dispatcher when that changes whether m takes builds.
func (b *Broker) watchState(m *machine, pr Prober) {
	tick := time.NewTicker(b.opt.StateEvery)
	defer tick.Stop()
	for {
		select {
		case <-b.ctx.Done():
			return
		case <-tick.C:
		}
		if !m.cfg.Enabled {
			continue
		}
		st, err := pr.Probe(b.ctx, stateTimeout)
		ls := liveState{at: time.Now(), st: st}
		if err != nil {
			ls = liveState{at: ls.at, err: err.Error()}
			if errors.Is(err, pool.ErrNoConn) {
				ls.err = "not connected"
			}
		}
		b.mu.Lock()
		before, old := b.heldLocked(m), m.live
		m.live = ls
		after := b.heldLocked(m)
		b.mu.Unlock()
		if (old.err == "") != (ls.err == "") && ls.err != "" && ls.err != "not connected" {
			b.log.Info("machine state unknown", zap.String("machine", m.name), zap.String("why", ls.err))
		}
		if before != after {
			if after != "" {
				b.log.Info("machine gets no new build", zap.String("machine", m.name), zap.String("why", after))
			} else {
				b.log.Info("machine takes builds again", zap.String("machine", m.name))
			}
			b.kick()
		}
	}
}

// liveOf is m's state as the scheduler takes it.
func liveOf(ls liveState) scheduler.Live {
	if ls.err != "" {
		return scheduler.Live{}
	}
	l := scheduler.Live{HasFree: ls.st.HasFree, FreeBytes: ls.st.FreeBytes, HasLoad: ls.st.HasLoad}
	if ls.st.HasLoad {
		l.LoadPerCore = ls.st.LoadPerCore()
	}
	return l
}

// heldLocked says why m takes no new build by its live state, or "".
func (b *Broker) heldLocked(m *machine) string {
	return scheduler.Held(m.cfg, liveOf(m.live))
}

// stateStatus is m's live state for the status page.
func stateStatus(ls liveState) *brokerapi.LiveState {
	if ls.at.IsZero() {
		return nil
	}
	out := &brokerapi.LiveState{At: ls.at, Error: ls.err}
	if ls.err != "" {
		return out
	}
	if ls.st.HasLoad {
		v := ls.st.LoadPerCore()
		out.LoadPerCore, out.Cores = &v, ls.st.Cores
	}
	if ls.st.HasPressure {
		v := ls.st.Pressure
		out.Pressure = &v
	}
	if ls.st.HasFree {
		v := ls.st.FreeBytes
		out.FreeBytes = &v
	}
	return out
}

// knowLocked records that m holds the store paths of infos (NAR bytes by path): this broker
// sent them there or built them there.
func (m *machine) knowLocked(path string, narSize uint64) {
	if m.has == nil || len(m.has) >= maxKnownPaths {
		m.has = map[string]uint64{}
	}
	m.has[path] = narSize
}

// know records, under b.mu, that m holds path.
func (b *Broker) know(m *machine, path string, narSize uint64) {
	b.mu.Lock()
	m.knowLocked(path, narSize)
	b.mu.Unlock()
}

// inputHint is what the broker can tell, from the derivation alone, of the paths a build
// needs on its machine: its input sources and the outputs of its input derivations (not
// their closures). nil when the derivation cannot be read: placement then ignores locality.
func inputHint(drvPath string) []string {
	drv, err := readDerivation(drvPath)
	if err != nil {
		return nil
	}
	hint := slices.Clone(drv.InputSources)
	for p, outs := range drv.InputDerivations {
		in, err := readDerivation(p)
		if err != nil {
			continue
		}
		for _, o := range outs {
			if out, ok := in.Outputs[o]; ok && out.Path != "" {
				hint = append(hint, out.Path)
			}
		}
	}
	return hint
}

// inputSizes is the NAR size of each hinted path: from held for the paths a machine holds
// (a graph's kept outputs, not valid locally), from the local store for the others. A path
// whose size is unknown (no local store, not valid there) counts for nothing.
func (b *Broker) inputSizes(hint []string, held []brokerapi.HeldPath) map[string]uint64 {
	if len(hint) == 0 {
		return nil
	}
	sizes := make(map[string]uint64, len(hint))
	for _, h := range held {
		if slices.Contains(hint, h.Path) {
			sizes[h.Path] = h.NarSize
		}
	}
	var local []string
	for _, p := range hint {
		if _, ok := sizes[p]; !ok {
			local = append(local, p)
		}
	}
	if len(local) > 0 {
		if infos, err := b.local.pathInfos(local); err == nil {
			for _, in := range infos {
				sizes[in.Path] = in.NarSize
			}
		}
	}
	return sizes
}

// presentLocked is, for each machine, the bytes of t's hinted inputs this broker knows are there.
func (b *Broker) presentLocked(t *ticket) map[string]uint64 {
	if len(t.hint) == 0 {
		return nil
	}
	out := map[string]uint64{}
	for _, m := range b.machines {
		var n uint64
		for _, p := range t.hint {
			n += m.has[p]
		}
		if n > 0 {
			out[m.name] = n
		}
	}
	return out
}

// viewLocked is what the scheduler gets to know for t.
func (b *Broker) viewLocked(t *ticket) scheduler.View {
	down := b.health.Down()
	for name, why := range t.exclude {
		down[name] = why
	}
	live := make(map[string]scheduler.Live, len(b.machines))
	for _, m := range b.machines {
		live[m.name] = liveOf(m.live)
	}
	return scheduler.View{Load: b.loadLocked(), Down: down, Live: live, Present: b.presentLocked(t), Held: t.held}
}

// logPlacement says, at debug level, where t goes and what of its inputs is where.
func (b *Broker) logPlacement(t *ticket, m *machine, present map[string]uint64) {
	if ce := b.log.Check(zap.DebugLevel, "placed build"); ce != nil {
		var total uint64
		for _, n := range t.sizes {
			total += n
		}
		fields := []zap.Field{zap.String("drv", t.drvPath), zap.String("machine", m.name), zap.Int("priority", t.priority),
			zap.Uint64("input_bytes_there", present[m.name]), zap.Any("input_bytes_by_machine", present),
			zap.String("why", placementWhy(m, present))}
		if total > 0 {
			fields = append(fields, zap.Uint64("input_bytes", total),
				zap.Uint64("input_bytes_to_send_at_most", total-min(total, present[m.name])))
		}
		ce.Write(fields...)
	}
}

func placementWhy(m *machine, present map[string]uint64) string {
	if present[m.name] > 0 {
		return "holds " + machines.FormatSize(present[m.name]) + " of its inputs; the rest is asked for and sent"
	}
	if len(present) > 0 {
		return "the machines holding its inputs are busy, or hold too little to count; load ÷ speed decides"
	}
	return "no machine is known to hold its inputs; load ÷ speed decides, and every input the machine lacks is sent"
}

// enqueueLocked puts t in the queue behind every ticket of its priority or higher.
func (b *Broker) enqueueLocked(t *ticket) {
	t.queued = true
	i := slices.IndexFunc(b.queue, func(o *ticket) bool { return o.priority < t.priority })
	if i < 0 {
		b.queue = append(b.queue, t)
		return
	}
	b.queue = slices.Insert(b.queue, i, t)
}

// requeueLocked puts t, which lost its machine, ahead of every ticket of its priority or lower:
// it has waited longest.
func (b *Broker) requeueLocked(t *ticket) {
	t.queued = true
	i := slices.IndexFunc(b.queue, func(o *ticket) bool { return o.priority <= t.priority })
	if i < 0 {
		b.queue = append(b.queue, t)
		return
	}
	b.queue = slices.Insert(b.queue, i, t)
}
