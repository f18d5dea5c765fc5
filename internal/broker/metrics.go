package broker

import (
	"time"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/metrics"
)

// brokerMetrics are the broker's Prometheus series; every method is a
// no-op without a registry.
//
// The metrics port may be public (the NixOS module's openFirewall), so its
// series say no more than a dashboard needs: a machine is labelled by its
// host and port, without the SSH user, which would tell a stranger which
// account on which host has root's key ([metricsLabels]); no error texts,
// no store paths, no client counts.
type brokerMetrics struct {
	labels    map[string]string // machine name → label
	builds    *metrics.CounterVec
	buildTime *metrics.HistogramVec
	waitTime  *metrics.HistogramVec
	sentB     *metrics.CounterVec
	rcvdB     *metrics.CounterVec
}

var durationBuckets = []float64{0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600}

func newBrokerMetrics(b *Broker, r *metrics.Registry) *brokerMetrics {
	if r == nil {
		return nil
	}
	m := &brokerMetrics{
		labels:    metricsLabels(b.cfgMs),
		builds:    r.Counter("nix_offload_builds_total", "Builds run on each machine, by result.", "machine", "result"),
		buildTime: r.Histogram("nix_offload_build_seconds", "Time from the start of a build on a machine to its end, outputs included.", durationBuckets, "machine"),
		waitTime:  r.Histogram("nix_offload_queue_wait_seconds", "Time builds waited in the queue for a slot.", durationBuckets),
		sentB:     r.Counter("nix_offload_sent_bytes_total", "NAR bytes sent to each machine.", "machine"),
		rcvdB:     r.Counter("nix_offload_received_bytes_total", "NAR bytes received from each machine.", "machine"),
	}
	r.GaugeFunc("nix_offload_slots_used", "Build slots in use on each machine.", func() []metrics.Sample {
		st := b.Status()
		out := make([]metrics.Sample, len(st.Machines))
		for i, ms := range st.Machines {
			out[i] = metrics.Sample{Labels: []string{m.label(ms.Name)}, Value: float64(ms.SlotsUsed)}
		}
		return out
	}, "machine")
	r.GaugeFunc("nix_offload_slots", "Build slots configured on each machine.", func() []metrics.Sample {
		out := make([]metrics.Sample, len(b.machines))
		for i, bm := range b.machines {
			out[i] = metrics.Sample{Labels: []string{m.label(bm.name)}, Value: float64(bm.cfg.ParallelBuilds)}
		}
		return out
	}, "machine")
	r.GaugeFunc("nix_offload_machine_up", "1 if the machine is not on backoff.", func() []metrics.Sample {
		down := b.health.Down()
		out := make([]metrics.Sample, len(b.machines))
		for i, bm := range b.machines {
			v := 1.0
			if _, d := down[bm.name]; d {
				v = 0
			}
			out[i] = metrics.Sample{Labels: []string{m.label(bm.name)}, Value: v}
		}
		return out
	}, "machine")
	live := func(f func(brokerapi.MachineStatus) (float64, bool)) func() []metrics.Sample {
		return func() []metrics.Sample {
			var out []metrics.Sample
			for _, ms := range b.Status().Machines {
				if v, ok := f(ms); ok {
					out = append(out, metrics.Sample{Labels: []string{m.label(ms.Name)}, Value: v})
				}
			}
			return out
		}
	}
	r.GaugeFunc("nix_offload_machine_load_per_core", "The machine's 1-minute load average ÷ cores, as it last said; absent when unknown.",
		live(func(ms brokerapi.MachineStatus) (float64, bool) {
			if ms.State == nil || ms.State.LoadPerCore == nil {
				return 0, false
			}
			return *ms.State.LoadPerCore, true
		}), "machine")
	r.GaugeFunc("nix_offload_machine_store_free_bytes", "Free bytes on the filesystem of the machine's store, as it last said; absent when unknown.",
		live(func(ms brokerapi.MachineStatus) (float64, bool) {
			if ms.State == nil || ms.State.FreeBytes == nil {
				return 0, false
			}
			return float64(*ms.State.FreeBytes), true
		}), "machine")
	r.GaugeFunc("nix_offload_machine_max_load", "The machine's max-load (load per core); absent when not set.",
		live(func(ms brokerapi.MachineStatus) (float64, bool) { return ms.MaxLoad, ms.MaxLoad > 0 }), "machine")
	r.GaugeFunc("nix_offload_machine_min_free_bytes", "The machine's min-free-space in bytes; absent when not set.",
		live(func(ms brokerapi.MachineStatus) (float64, bool) { return float64(ms.MinFreeSpace), ms.MinFreeSpace > 0 }), "machine")
	r.GaugeFunc("nix_offload_machine_held", "1 if the machine takes no new build by its load or free space.",
		live(func(ms brokerapi.MachineStatus) (float64, bool) {
			if ms.Held != "" {
				return 1, true
			}
			return 0, true
		}), "machine")
	r.GaugeFunc("nix_offload_queued_builds", "Builds waiting for a slot.", func() []metrics.Sample {
		b.mu.Lock()
		n := len(b.queue)
		b.mu.Unlock()
		return []metrics.Sample{{Value: float64(n)}}
	})
	return m
}

func (m *brokerMetrics) built(machine, result string, d time.Duration) {
	if m == nil {
		return
	}
	m.builds.With(m.label(machine), result).Inc()
	m.buildTime.With(m.label(machine)).Observe(d.Seconds())
}

func (m *brokerMetrics) queueWait(d time.Duration) {
	if m == nil {
		return
	}
	m.waitTime.With().Observe(d.Seconds())
}

func (m *brokerMetrics) sent(machine string, n int64) {
	if m == nil || n <= 0 {
		return
	}
	m.sentB.With(m.label(machine)).Add(float64(n))
}

func (m *brokerMetrics) received(machine string, n int64) {
	if m == nil || n <= 0 {
		return
	}
	m.rcvdB.With(m.label(machine)).Add(float64(n))
}

// metricsLabels gives each machine its label on the metrics port: its host, with ":port"
// when one is set, and without the user. Two machines that differ only in their user keep
// their full names, so that no two share a label.
func metricsLabels(ms []machines.Machine) map[string]string {
	labels := make(map[string]string, len(ms))
	count := map[string]int{}
	for _, m := range ms {
		m.User = ""
		count[m.Name()]++
	}
	for _, m := range ms {
		bare := m
		bare.User = ""
		if count[bare.Name()] == 1 {
			labels[m.Name()] = bare.Name()
		} else {
			labels[m.Name()] = m.Name()
		}
	}
	return labels
}

// label is machine's label on the metrics port.
func (m *brokerMetrics) label(machine string) string {
	if l, ok := m.labels[machine]; ok {
		return l
	}
	return machine
}
