package metrics

import (
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"unicode/utf8"
)

// defBuckets are the histogram bounds used when none are given, in seconds: from 5 ms to 10 s,
// the range of most request latencies (the same as client_golang's defaults).
var defBuckets = []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}

// Registry holds metric families and writes them out. Its methods may be called from several
// goroutines at once.
type Registry struct {
	mu       sync.Mutex
	families map[string]family // by name
	taken    map[string]string // every name a family's lines use → that family's name
}

// family is one registered metric family.
type family interface {
	// appendText appends the family's exposition, or nothing if it has no series. The error
	// describes samples it left out.
	appendText(b []byte) ([]byte, error)
}

// desc is what every family has.
type desc struct {
	name, help, typ string
	labels          []string
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	return &Registry{families: map[string]family{}, taken: map[string]string{}}
}

// Counter registers a counter family: values that only go up, such as builds finished or bytes
// sent, and restart from zero with the process. Its name should end in _total. Each label
// name given makes a dimension; [CounterVec.With] picks a series by the labels' values. A
// family without labels has its one series from the start, at 0.
func (r *Registry) Counter(name, help string, labels ...string) *CounterVec {
	c := &CounterVec{v: newVec(desc{name, help, "counter", labels}, func() *Counter { return new(Counter) })}
	r.register(c.v.desc, c)
	return c
}

// Gauge registers a gauge family: values that go up and down, such as builds running.
func (r *Registry) Gauge(name, help string, labels ...string) *GaugeVec {
	g := &GaugeVec{v: newVec(desc{name, help, "gauge", labels}, func() *Gauge { return new(Gauge) })}
	r.register(g.v.desc, g)
	return g
}

// Histogram registers a histogram family: it counts observations, such as durations, in
// buckets with the given upper bounds, which must increase. A last bound of +Inf may be
// given or left out; the +Inf bucket is always there. nil buckets mean 0.005, 0.01, 0.025,
// 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5 and 10, for durations in seconds.
func (r *Registry) Histogram(name, help string, buckets []float64, labels ...string) *HistogramVec {
	if buckets == nil {
		buckets = defBuckets
	}
	upper := slices.Clone(buckets)
	if n := len(upper); n > 0 && math.IsInf(upper[n-1], +1) {
		upper = upper[:n-1]
	}
	for i, u := range upper {
		if math.IsNaN(u) || math.IsInf(u, 0) || (i > 0 && u <= upper[i-1]) {
			panic(fmt.Sprintf("metrics: histogram %s: bucket bounds %v do not increase, or are not finite numbers", name, buckets))
		}
	}
	if slices.Contains(labels, "le") {
		panic(fmt.Sprintf("metrics: histogram %s: label name \"le\" is the one of its buckets", name))
	}
	h := &HistogramVec{upper: upper}
	h.v = newVec(desc{name, help, "histogram", labels}, func() *Histogram {
		return &Histogram{upper: upper, counts: make([]uint64, len(upper)+1)}
	})
	r.register(h.v.desc, h, "_bucket", "_sum", "_count")
	return h
}

// Sample is one series of a GaugeFunc family: the values of its labels, in the order of the
// label names given to [Registry.GaugeFunc], and its value.
type Sample struct {
	Labels []string
	Value  float64
}

// GaugeFunc registers a gauge family whose series are computed at each scrape by f, which is
// called without any lock of the Registry held, from the scraping goroutine. f returns one
// Sample per series, in any order; an empty result leaves the family out of that scrape.
func (r *Registry) GaugeFunc(name, help string, f func() []Sample, labels ...string) {
	if f == nil {
		panic("metrics: GaugeFunc " + name + " without a function")
	}
	g := &gaugeFunc{desc: desc{name, help, "gauge", slices.Clone(labels)}, f: f}
	r.register(g.desc, g)
}

// register adds f under d.name, checking names; suffixes are the other names f's lines use.
func (r *Registry) register(d desc, f family, suffixes ...string) {
	checkNames(d)
	names := []string{d.name}
	for _, s := range suffixes {
		names = append(names, d.name+s)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, n := range names {
		if owner, ok := r.taken[n]; ok {
			panic(fmt.Sprintf("metrics: %s is registered twice (as %s and as a line of %s)", n, d.name, owner))
		}
	}
	for _, n := range names {
		r.taken[n] = d.name
	}
	r.families[d.name] = f
}

func checkNames(d desc) {
	if !validName(d.name, true) {
		panic(fmt.Sprintf("metrics: %q is not a valid metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)", d.name))
	}
	for i, l := range d.labels {
		if !validName(l, false) || strings.HasPrefix(l, "__") {
			panic(fmt.Sprintf("metrics: %s: %q is not a valid label name ([a-zA-Z_][a-zA-Z0-9_]*, not starting with __)", d.name, l))
		}
		if slices.Contains(d.labels[:i], l) {
			panic(fmt.Sprintf("metrics: %s: label %q given twice", d.name, l))
		}
	}
}

// validName reports whether s is a metric name (colons allowed) or a label name.
func validName(s string, colon bool) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', c == '_', colon && c == ':':
		case '0' <= c && c <= '9' && i > 0:
		default:
			return false
		}
	}
	return true
}

// vec is the series of one family, by label values.
type vec[T any] struct {
	desc
	newT func() *T

	mu       sync.RWMutex
	children map[string]*series[T] // by seriesKey
}

type series[T any] struct {
	values []string
	m      *T
}

func newVec[T any](d desc, newT func() *T) *vec[T] {
	d.labels = slices.Clone(d.labels)
	v := &vec[T]{desc: d, newT: newT, children: map[string]*series[T]{}}
	if len(d.labels) == 0 {
		v.children[""] = &series[T]{m: newT()}
	}
	return v
}

// with returns the series with label values values, making it if needed.
func (v *vec[T]) with(values []string) *T {
	if len(values) != len(v.labels) {
		panic(fmt.Sprintf("metrics: %s has labels %q, but With got %d values %q", v.name, v.labels, len(values), values))
	}
	key := seriesKey(values)
	v.mu.RLock()
	s := v.children[key]
	v.mu.RUnlock()
	if s != nil {
		return s.m
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if s = v.children[key]; s == nil {
		s = &series[T]{values: validValues(values), m: v.newT()}
		v.children[key] = s
	}
	return s.m
}

// snapshot returns the series sorted by label values.
func (v *vec[T]) snapshot() []*series[T] {
	v.mu.RLock()
	out := make([]*series[T], 0, len(v.children))
	for _, s := range v.children {
		out = append(out, s)
	}
	v.mu.RUnlock()
	slices.SortFunc(out, func(a, b *series[T]) int { return slices.Compare(a.values, b.values) })
	return out
}

// seriesKey identifies a series by its label values. 0xFF never occurs in UTF-8, so values
// joined by it cannot be confused.
func seriesKey(values []string) string {
	return strings.Join(validValues(values), "\xff")
}

// validValues returns values with invalid UTF-8 replaced, as a new slice.
func validValues(values []string) []string {
	out := slices.Clone(values)
	for i, s := range out {
		if !utf8.ValidString(s) {
			out[i] = strings.ToValidUTF8(s, "\uFFFD")
		}
	}
	return out
}

// CounterVec is a counter family; see [Registry.Counter].
type CounterVec struct{ v *vec[Counter] }

// With returns the counter of the series with these label values, in the order of the label
// names given at registration. It panics if their number differs.
func (c *CounterVec) With(labelValues ...string) *Counter { return c.v.with(labelValues) }

func (c *CounterVec) appendText(b []byte) ([]byte, error) {
	ss := c.v.snapshot()
	if len(ss) == 0 {
		return b, nil
	}
	b = appendHeader(b, c.v.desc)
	for _, s := range ss {
		b = appendSample(b, c.v.name, "", c.v.labels, s.values, "", s.m.Value())
	}
	return b, nil
}

// Counter is one series of a counter family. The zero value is not registered anywhere; get
// counters from [CounterVec.With].
type Counter struct{ bits atomic.Uint64 }

// Add adds v, which must not be negative or NaN.
func (c *Counter) Add(v float64) {
	if !(v >= 0) {
		panic(fmt.Sprintf("metrics: counter added %v; counters only go up", v))
	}
	addFloat(&c.bits, v)
}

// Inc adds 1.
func (c *Counter) Inc() { addFloat(&c.bits, 1) }

// Value returns the counter's value.
func (c *Counter) Value() float64 { return math.Float64frombits(c.bits.Load()) }

// GaugeVec is a gauge family; see [Registry.Gauge].
type GaugeVec struct{ v *vec[Gauge] }

// With returns the gauge of the series with these label values, in the order of the label
// names given at registration. It panics if their number differs.
func (g *GaugeVec) With(labelValues ...string) *Gauge { return g.v.with(labelValues) }

func (g *GaugeVec) appendText(b []byte) ([]byte, error) {
	ss := g.v.snapshot()
	if len(ss) == 0 {
		return b, nil
	}
	b = appendHeader(b, g.v.desc)
	for _, s := range ss {
		b = appendSample(b, g.v.name, "", g.v.labels, s.values, "", s.m.Value())
	}
	return b, nil
}

// Gauge is one series of a gauge family; get gauges from [GaugeVec.With].
type Gauge struct{ bits atomic.Uint64 }

// Set sets the gauge to v.
func (g *Gauge) Set(v float64) { g.bits.Store(math.Float64bits(v)) }

// Add adds v, which may be negative.
func (g *Gauge) Add(v float64) { addFloat(&g.bits, v) }

// Inc adds 1.
func (g *Gauge) Inc() { addFloat(&g.bits, 1) }

// Dec subtracts 1.
func (g *Gauge) Dec() { addFloat(&g.bits, -1) }

// Value returns the gauge's value.
func (g *Gauge) Value() float64 { return math.Float64frombits(g.bits.Load()) }

// addFloat adds v to the float64 whose bits are in bits.
func addFloat(bits *atomic.Uint64, v float64) {
	for {
		old := bits.Load()
		if bits.CompareAndSwap(old, math.Float64bits(math.Float64frombits(old)+v)) {
			return
		}
	}
}

// HistogramVec is a histogram family; see [Registry.Histogram].
type HistogramVec struct {
	v     *vec[Histogram]
	upper []float64 // bucket bounds without +Inf, shared by all series
}

// With returns the histogram of the series with these label values, in the order of the label
// names given at registration. It panics if their number differs.
func (h *HistogramVec) With(labelValues ...string) *Histogram { return h.v.with(labelValues) }

func (h *HistogramVec) appendText(b []byte) ([]byte, error) {
	ss := h.v.snapshot()
	if len(ss) == 0 {
		return b, nil
	}
	b = appendHeader(b, h.v.desc)
	for _, s := range ss {
		counts, sum := s.m.read()
		var cum uint64
		for i, n := range counts {
			cum += n
			le := "+Inf"
			if i < len(h.upper) {
				le = string(appendFloat(nil, h.upper[i]))
			}
			b = appendSample(b, h.v.name, "_bucket", h.v.labels, s.values, le, float64(cum))
		}
		b = appendSample(b, h.v.name, "_sum", h.v.labels, s.values, "", sum)
		b = appendSample(b, h.v.name, "_count", h.v.labels, s.values, "", float64(cum))
	}
	return b, nil
}

// Histogram is one series of a histogram family; get histograms from [HistogramVec.With].
type Histogram struct {
	upper []float64 // bucket bounds, without +Inf

	mu     sync.Mutex
	counts []uint64 // observations per bucket, not cumulative; the last is above every bound
	sum    float64
}

// Observe counts v in the first bucket whose bound is at least v, and adds it to the sum.
func (h *Histogram) Observe(v float64) {
	i := sort.SearchFloat64s(h.upper, v) // NaN is above every bound: it lands in +Inf
	h.mu.Lock()
	h.counts[i]++
	h.sum += v
	h.mu.Unlock()
}

// read returns a consistent copy of the counts and the sum.
func (h *Histogram) read() (counts []uint64, sum float64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.counts), h.sum
}

// gaugeFunc is a family registered with GaugeFunc.
type gaugeFunc struct {
	desc
	f func() []Sample
}

func (g *gaugeFunc) appendText(b []byte) ([]byte, error) {
	samples := g.f()
	type row struct {
		values []string
		v      float64
	}
	rows := make([]row, 0, len(samples))
	var errs []string
	for i, s := range samples {
		if len(s.Labels) != len(g.labels) {
			errs = append(errs, fmt.Sprintf("sample %d has %d label values %q, want %d (%s)", i, len(s.Labels), s.Labels, len(g.labels), strings.Join(g.labels, ", ")))
			continue
		}
		rows = append(rows, row{validValues(s.Labels), s.Value})
	}
	slices.SortStableFunc(rows, func(a, b row) int { return slices.Compare(a.values, b.values) })
	// Two samples of one series would make the whole scrape invalid: keep the first.
	rows = slices.CompactFunc(rows, func(a, b row) bool {
		if slices.Equal(a.values, b.values) {
			errs = append(errs, fmt.Sprintf("two samples with labels %q", a.values))
			return true
		}
		return false
	})
	if len(rows) > 0 {
		b = appendHeader(b, g.desc)
		for _, r := range rows {
			b = appendSample(b, g.name, "", g.labels, r.values, "", r.v)
		}
	}
	if len(errs) > 0 {
		return b, fmt.Errorf("metrics: %s: left out: %s", g.name, strings.Join(errs, "; "))
	}
	return b, nil
}
