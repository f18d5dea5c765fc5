package scheduler

import (
	"slices"
	"testing"

	"github.com/nix-offload/nix-offload/internal/machines"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// mach is a machine named host with one slot, speed 1, enabled, building the given systems;
// opts adjust it.
func mach(host string, systems string, opts ...func(*machines.Machine)) machines.Machine {
	m := machines.Machine{Host: host, Systems: []string{systems}, ParallelBuilds: 1, Speed: 1, Enabled: true}
	for _, o := range opts {
		o(&m)
	}
	return m
}

func slots(n int) func(*machines.Machine)     { return func(m *machines.Machine) { m.ParallelBuilds = n } }
func speed(f float64) func(*machines.Machine) { return func(m *machines.Machine) { m.Speed = f } }
func disabled(m *machines.Machine)            { m.Enabled = false }
func features(fs ...string) func(*machines.Machine) {
	return func(m *machines.Machine) { m.Features = fs }
}
func mandatory(fs ...string) func(*machines.Machine) {
	return func(m *machines.Machine) { m.MandatoryFeatures = fs }
}
func systems(ss ...string) func(*machines.Machine) {
	return func(m *machines.Machine) { m.Systems = ss }
}

const x86 = "x86_64-linux"

func req(system string, features ...string) Request {
	return Request{System: system, RequiredFeatures: features, AmWilling: true}
}

func TestMatches(t *testing.T) {
	tests := []struct {
		name string
		m    machines.Machine
		req  Request
		want bool
	}{
		{"same system", mach("b", x86), req(x86), true},
		{"other system", mach("b", x86), req("aarch64-linux"), false},
		{"one of several systems", mach("b", x86, systems("i686-linux", x86)), req(x86), true},
		{"builtin runs anywhere", mach("b", "aarch64-linux"), req("builtin"), true},
		{"builtin still needs features", mach("b", x86), req("builtin", "kvm"), false},
		{"builtin still honours mandatory", mach("b", x86, mandatory("benchmark")), req("builtin"), false},
		{"disabled", mach("b", x86, disabled), req(x86), false},
		{"disabled builtin", mach("b", x86, disabled), req("builtin"), false},
		{"no features required, none offered", mach("b", x86), req(x86), true},
		{"supported feature", mach("b", x86, features("kvm", "big-parallel")), req(x86, "kvm"), true},
		{"all supported features", mach("b", x86, features("kvm", "big-parallel")), req(x86, "big-parallel", "kvm"), true},
		{"missing feature", mach("b", x86, features("kvm")), req(x86, "kvm", "big-parallel"), false},
		{"mandatory feature counts as supported", mach("b", x86, mandatory("kvm")), req(x86, "kvm"), true},
		{"mandatory feature not required", mach("b", x86, features("kvm"), mandatory("benchmark")), req(x86, "kvm"), false},
		{"mandatory and supported", mach("b", x86, features("kvm"), mandatory("benchmark")), req(x86, "benchmark", "kvm"), true},
		{"all mandatory required", mach("b", x86, mandatory("a", "b")), req(x86, "a", "b"), true},
		{"one mandatory of two", mach("b", x86, mandatory("a", "b")), req(x86, "a"), false},
		{"feature names are case-sensitive", mach("b", x86, features("KVM")), req(x86, "kvm"), false},
		{"repeated required feature", mach("b", x86, features("kvm")), req(x86, "kvm", "kvm"), true},
		{"ca-derivations matches like any feature", mach("b", x86, features("ca-derivations")), req(x86, "ca-derivations"), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Matches(tt.m, tt.req); got != tt.want {
				t.Errorf("Matches(%+v, %+v) = %v, want %v", tt.m, tt.req, got, tt.want)
			}
		})
	}
}

func TestDecide(t *testing.T) {
	b1 := mach("b1", x86, slots(4))
	b2 := mach("b2", x86, slots(4))
	arm := mach("a1", "aarch64-linux")
	tests := []struct {
		name   string
		ms     []machines.Machine
		req    Request
		load   map[string]int
		down   map[string]string
		want   Verdict
		cands  []string // Accept: candidate names in order
		reason string   // exact reason, for every other verdict
	}{
		// No machines.
		{
			name: "nothing configured", ms: nil, req: req(x86),
			want: DeclinePermanently, reason: "no remote machines configured",
		},
		{
			name: "nothing configured, not willing", ms: nil, req: Request{System: x86},
			want: DeclinePermanently, reason: "no remote machines configured",
		},
		{
			name: "nothing configured beats ca-derivations", ms: nil, req: req(x86, "ca-derivations"),
			want: DeclinePermanently, reason: "no remote machines configured",
		},

		// ca-derivations.
		{
			name: "ca-derivations declined", ms: []machines.Machine{b1}, req: req(x86, "ca-derivations"),
			want: Decline, reason: "ca-derivations builds are not offloaded: Nix needs a realisation for their outputs and no nix-store command can register one",
		},
		{
			name: "ca-derivations declined even when not willing", ms: []machines.Machine{mach("b1", x86, features("ca-derivations"))},
			req:  Request{System: x86, RequiredFeatures: []string{"ca-derivations"}},
			want: Decline, reason: "ca-derivations builds are not offloaded: Nix needs a realisation for their outputs and no nix-store command can register one",
		},

		// Nothing capable.
		{
			name: "wrong system", ms: []machines.Machine{b1, b2}, req: req("aarch64-linux"),
			want: Decline, reason: `no machine supports system "aarch64-linux" (configured: x86_64-linux on b1, b2)`,
		},
		{
			name: "wrong system, not willing: still decline", ms: []machines.Machine{b1}, req: Request{System: "aarch64-linux"},
			want: Decline, reason: `no machine supports system "aarch64-linux" (configured: x86_64-linux on b1)`,
		},
		{
			name: "wrong system, several configured",
			ms:   []machines.Machine{mach("b1", x86, systems(x86, "i686-linux")), arm, mach("b3", x86)},
			req:  req("riscv64-linux"),
			want: Decline, reason: `no machine supports system "riscv64-linux" (configured: x86_64-linux on b1, b3; i686-linux on b1; aarch64-linux on a1)`,
		},
		{
			name: "only the disabled machine has the system",
			ms:   []machines.Machine{b1, mach("a1", "aarch64-linux", disabled)},
			req:  req("aarch64-linux"),
			want: Decline, reason: `no machine supports system "aarch64-linux" (configured: x86_64-linux on b1); disabled but capable: a1`,
		},
		{
			name: "the only machine is disabled", ms: []machines.Machine{mach("b1", x86, disabled)}, req: req(x86),
			want: Decline, reason: "the only machine, b1, is disabled",
		},
		{
			name: "all disabled", ms: []machines.Machine{mach("b1", x86, disabled), mach("b2", x86, disabled)}, req: req(x86),
			want: Decline, reason: "all 2 machines are disabled (b1, b2)",
		},
		{
			name: "feature nobody has", ms: []machines.Machine{b1, b2}, req: req(x86, "kvm"),
			want: Decline, reason: "requires features {kvm} that no machine supports",
		},
		{
			name: "features nobody has, sorted and once", ms: []machines.Machine{b1}, req: req(x86, "nixos-test", "kvm", "kvm"),
			want: Decline, reason: "requires features {kvm, nixos-test} that no machine supports",
		},
		{
			name: "feature only another system has",
			ms:   []machines.Machine{b1, mach("a1", "aarch64-linux", features("kvm"))},
			req:  req(x86, "kvm"),
			want: Decline, reason: "requires features {kvm} that no x86_64-linux machine supports",
		},
		{
			name: "features split across machines",
			ms:   []machines.Machine{mach("b1", x86, features("kvm")), mach("b2", x86, features("big-parallel"))},
			req:  req(x86, "kvm", "big-parallel"),
			want: Decline, reason: "no x86_64-linux machine takes a build requiring {big-parallel, kvm}: b1 lacks {big-parallel}; b2 lacks {kvm}",
		},
		{
			name: "mandatory feature not required",
			ms:   []machines.Machine{mach("bench", x86, mandatory("benchmark"))},
			req:  req(x86),
			want: Decline, reason: "no x86_64-linux machine takes a build with no required features: bench only takes builds requiring {benchmark}",
		},
		{
			name: "mandatory unmet and feature lacking",
			ms:   []machines.Machine{mach("bench", x86, mandatory("benchmark")), mach("b2", x86, features("kvm"), mandatory("x"))},
			req:  req(x86, "kvm"),
			want: Decline, reason: "no x86_64-linux machine takes a build requiring {kvm}: bench lacks {kvm} and only takes builds requiring {benchmark}; b2 only takes builds requiring {x}",
		},
		{
			name: "disabled machine would have matched",
			ms:   []machines.Machine{b1, mach("k", x86, features("kvm"), disabled)},
			req:  req(x86, "kvm"),
			want: Decline, reason: "requires features {kvm} that no machine supports; disabled but capable: k",
		},
		{
			name: "builtin, mandatory everywhere",
			ms:   []machines.Machine{mach("bench", x86, mandatory("benchmark"))},
			req:  req("builtin"),
			want: Decline, reason: "no machine takes a build with no required features: bench only takes builds requiring {benchmark}",
		},

		// Accept and order.
		{
			name: "one free machine", ms: []machines.Machine{b1}, req: req(x86),
			want: Accept, cands: []string{"b1"},
		},
		{
			name: "accepted when not willing too", ms: []machines.Machine{b1}, req: Request{System: x86},
			want: Accept, cands: []string{"b1"},
		},
		{
			name: "builtin goes to any system", ms: []machines.Machine{arm}, req: req("builtin"),
			want: Accept, cands: []string{"a1"},
		},
		{
			name: "mandatory machine when required", ms: []machines.Machine{b1, mach("bench", x86, mandatory("benchmark"))},
			req:  req(x86, "benchmark"),
			want: Accept, cands: []string{"bench"},
		},
		{
			name: "mandatory machine skipped otherwise", ms: []machines.Machine{mach("bench", x86, mandatory("benchmark")), b1},
			req:  req(x86),
			want: Accept, cands: []string{"b1"},
		},
		{
			name: "disabled and other systems skipped",
			ms:   []machines.Machine{mach("off", x86, disabled), arm, b2},
			req:  req(x86),
			want: Accept, cands: []string{"b2"},
		},
		{
			name: "lower load first", ms: []machines.Machine{b1, b2}, req: req(x86),
			load: map[string]int{"b1": 2, "b2": 1},
			want: Accept, cands: []string{"b2", "b1"},
		},
		{
			name: "ties keep config order", ms: []machines.Machine{b2, b1}, req: req(x86),
			load: map[string]int{"b1": 1, "b2": 1},
			want: Accept, cands: []string{"b2", "b1"},
		},
		{
			name: "load divided by speed",
			// fast: 3/3 = 1; slow: 2/1 = 2.
			ms:   []machines.Machine{mach("slow", x86, slots(4)), mach("fast", x86, slots(8), speed(3))},
			req:  req(x86),
			load: map[string]int{"slow": 2, "fast": 3},
			want: Accept, cands: []string{"fast", "slow"},
		},
		{
			name: "equal ratio: faster first",
			// slow: 1/1 = 1; fast: 2/2 = 1.
			ms:   []machines.Machine{mach("slow", x86, slots(4)), mach("fast", x86, slots(4), speed(2))},
			req:  req(x86),
			load: map[string]int{"slow": 1, "fast": 2},
			want: Accept, cands: []string{"fast", "slow"},
		},
		{
			name: "idle machines: faster first",
			ms:   []machines.Machine{mach("slow", x86, slots(4)), mach("fast", x86, slots(4), speed(2.5))},
			req:  req(x86),
			want: Accept, cands: []string{"fast", "slow"},
		},
		{
			name: "fractional ratios compare exactly",
			// a: 1/3, b: 2/6: equal; b is faster.
			ms:   []machines.Machine{mach("a", x86, slots(8), speed(3)), mach("b", x86, slots(8), speed(6))},
			req:  req(x86),
			load: map[string]int{"a": 1, "b": 2},
			want: Accept, cands: []string{"b", "a"},
		},
		{
			name: "invalid speed counts as 1",
			ms:   []machines.Machine{mach("zero", x86, slots(4), speed(0)), mach("one", x86, slots(4))},
			req:  req(x86),
			load: map[string]int{"zero": 1, "one": 2},
			want: Accept, cands: []string{"zero", "one"},
		},
		{
			name: "full and down machines left out",
			ms:   []machines.Machine{b1, b2, mach("b3", x86, slots(2)), mach("b4", x86, slots(2))},
			req:  req(x86),
			load: map[string]int{"b1": 4, "b3": 1},
			down: map[string]string{"b2": "connection refused"},
			want: Accept, cands: []string{"b4", "b3"},
		},
		{
			name: "load names count, not other keys",
			ms:   []machines.Machine{mach("b1", x86, func(m *machines.Machine) { m.User = "root"; m.Port = 2222 })},
			req:  req(x86),
			load: map[string]int{"b1": 1},
			want: Accept, cands: []string{"root@b1:2222"},
		},

		// Busy or down.
		{
			name: "all busy, willing: build locally", ms: []machines.Machine{b1, b2}, req: req(x86),
			load: map[string]int{"b1": 4, "b2": 4},
			want: Decline, reason: "all 2 capable machines are busy (b1 4/4, b2 4/4); building locally",
		},
		{
			name: "all busy, not willing: postpone", ms: []machines.Machine{b1, b2}, req: Request{System: x86},
			load: map[string]int{"b1": 4, "b2": 4},
			want: Postpone, reason: "all 2 capable machines are busy (b1 4/4, b2 4/4); waiting for a free slot, as this host cannot build it",
		},
		{
			name: "the only one busy, load above slots", ms: []machines.Machine{b1, arm}, req: Request{System: x86},
			load: map[string]int{"b1": 5, "a1": 0},
			want: Postpone, reason: "the only capable machine is busy (b1 5/4); waiting for a free slot, as this host cannot build it",
		},
		{
			name: "all down, willing", ms: []machines.Machine{b1, b2}, req: req(x86),
			down: map[string]string{"b1": "connection refused", "b2": ""},
			want: Decline, reason: "all 2 capable machines are down (b1 down: connection refused, b2 down); building locally",
		},
		{
			name: "all down, not willing: postpone", ms: []machines.Machine{b1}, req: Request{System: x86},
			down: map[string]string{"b1": "host key mismatch"},
			want: Postpone, reason: "the only capable machine is down (b1 down: host key mismatch); waiting for one to come back, as this host cannot build it",
		},
		{
			name: "busy or down, not willing", ms: []machines.Machine{b1, b2}, req: Request{System: x86},
			load: map[string]int{"b1": 4},
			down: map[string]string{"b2": "timeout"},
			want: Postpone, reason: "all 2 capable machines are busy or down (b1 4/4, b2 down: timeout); waiting for a free slot, as this host cannot build it",
		},
		{
			name: "down beats free slots", ms: []machines.Machine{b1}, req: req(x86),
			down: map[string]string{"b1": "timeout"},
			want: Decline, reason: "the only capable machine is down (b1 down: timeout); building locally",
		},
		{
			name: "free slots of incapable machines do not count",
			ms:   []machines.Machine{b1, arm, mach("bench", x86, mandatory("benchmark"))},
			req:  req(x86),
			load: map[string]int{"b1": 4},
			want: Decline, reason: "the only capable machine is busy (b1 4/4); building locally",
		},
		{
			name: "many busy machines are summarised",
			ms: []machines.Machine{
				mach("m1", x86), mach("m2", x86), mach("m3", x86), mach("m4", x86), mach("m5", x86),
				mach("m6", x86), mach("m7", x86), mach("m8", x86), mach("m9", x86), mach("m10", x86),
			},
			req:  req(x86),
			load: map[string]int{"m1": 1, "m2": 1, "m3": 1, "m4": 1, "m5": 1, "m6": 1, "m7": 1, "m8": 1, "m9": 1, "m10": 1},
			want: Decline, reason: "all 10 capable machines are busy (m1 1/1, m2 1/1, m3 1/1, m4 1/1, m5 1/1, m6 1/1, m7 1/1, m8 1/1, and 2 more); building locally",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := Decide(tt.ms, tt.req, tt.load, tt.down)
			if d.Verdict != tt.want {
				t.Fatalf("Verdict = %v (reason %q), want %v", d.Verdict, d.Reason, tt.want)
			}
			var got []string
			for _, m := range d.Candidates {
				got = append(got, m.Name())
			}
			if !equal(got, tt.cands) {
				t.Errorf("Candidates = %q, want %q", got, tt.cands)
			}
			if tt.want == Accept {
				if d.Reason != "" {
					t.Errorf("Reason = %q on accept, want none", d.Reason)
				}
				return
			}
			if d.Reason != tt.reason {
				t.Errorf("Reason:\n got  %s\n want %s", d.Reason, tt.reason)
			}
		})
	}
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// Every candidate of an accept matches, is up and has a free slot; nothing that qualifies is
// left out.
func TestDecideCandidatesAreExactlyTheFreeCapable(t *testing.T) {
	ms := []machines.Machine{
		mach("b1", x86, slots(2)), mach("b2", x86, slots(2), speed(2)), mach("b3", x86, features("kvm")),
		mach("b4", x86, disabled), mach("b5", "aarch64-linux"), mach("b6", x86, mandatory("benchmark")),
		mach("b7", x86, slots(3)),
	}
	load := map[string]int{"b1": 2, "b2": 1, "b7": 1}
	down := map[string]string{"b3": "timeout"}
	d := Decide(ms, req(x86), load, down)
	var got []string
	for _, m := range d.Candidates {
		got = append(got, m.Name())
	}
	// b2: 1/2 = 0.5, speed 2; b7: 1/1 = 1.
	if want := []string{"b2", "b7"}; d.Verdict != Accept || !equal(got, want) {
		t.Errorf("Decide = %v %q, want accept %q", d.Verdict, got, want)
	}
}

func TestVerdictString(t *testing.T) {
	for v, want := range map[Verdict]string{
		Accept: "accept", Decline: "decline", DeclinePermanently: "decline-permanently", Postpone: "postpone",
		0: "Verdict(0)", 9: "Verdict(9)",
	} {
		if got := v.String(); got != want {
			t.Errorf("Verdict(%d).String() = %q, want %q", int(v), got, want)
		}
	}
}

func minFree(n uint64) func(*machines.Machine) {
	return func(m *machines.Machine) { m.MinFreeSpace = n }
}
func maxLoad(f float64) func(*machines.Machine) { return func(m *machines.Machine) { m.MaxLoad = f } }

func candidateNames(d Decision) []string {
	var out []string
	for _, m := range d.Candidates {
		out = append(out, m.Name())
	}
	return out
}

func TestPlaceLocality(t *testing.T) {
	ms := []machines.Machine{mach("a", x86, slots(4)), mach("b", x86, slots(4))}
	const input = 32 << 20
	tests := []struct {
		name string
		v    View
		want []string
	}{
		{"nothing present: load ÷ speed", View{Load: map[string]int{"a": 1}}, []string{"b", "a"}},
		{"input on b, b idle", View{Present: map[string]uint64{"b": input}}, []string{"b", "a"}},
		// The fan-out of issue 18: the input was built on a; a takes the consumers while it has
		// free slots, even though b is idle.
		{"input on a, a 3/4", View{Load: map[string]int{"a": 3}, Present: map[string]uint64{"a": input}}, []string{"a", "b"}},
		// Weighed against load: bytes count by the share of free slots, so 1 MiB on a machine
		// with one slot of four free counts as nothing, and load decides.
		{"little present on a busy machine", View{Load: map[string]int{"a": 3}, Present: map[string]uint64{"a": 1 << 20}}, []string{"b", "a"}},
		{"more present wins", View{Present: map[string]uint64{"a": 8 << 20, "b": 16 << 20}}, []string{"b", "a"}},
		{"under a MiB apart: config order", View{Present: map[string]uint64{"a": 100, "b": 900 << 10}}, []string{"a", "b"}},
		// A chain of small steps: the step before this one ran on b, which holds its output
		// and nothing else does; b still finishes it, a is idle. On a, the output would be
		// streamed from b first: b goes first.
		{"small held input on a busier machine", View{Load: map[string]int{"b": 1}, Present: map[string]uint64{"b": 128}, Held: map[string]int{"b": 1}},
			[]string{"b", "a"}},
		{"more held inputs win", View{Held: map[string]int{"a": 1, "b": 2}}, []string{"b", "a"}},
		// Bytes present still come first.
		{"bytes present before held inputs", View{Present: map[string]uint64{"a": input}, Held: map[string]int{"b": 3}}, []string{"a", "b"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := Place(ms, req(x86), tt.v)
			if d.Verdict != Accept || !slices.Equal(candidateNames(d), tt.want) {
				t.Errorf("got %v %v (%s), want accept %v", d.Verdict, candidateNames(d), d.Reason, tt.want)
			}
		})
	}
}

func TestPlaceLiveLimits(t *testing.T) {
	full := mach("a", x86, slots(4), minFree(10<<30))
	busy := mach("b", x86, slots(4), maxLoad(2))
	live := map[string]Live{
		"a": {HasFree: true, FreeBytes: 8697308774, HasLoad: true, LoadPerCore: 0.1}, // 8.1 GiB
		"b": {HasFree: true, FreeBytes: 1 << 40, HasLoad: true, LoadPerCore: 3.2},
	}
	d := Place([]machines.Machine{full, busy}, req(x86), View{Live: live})
	want := "all 2 capable machines are busy (a store has 8.1 GiB free, min-free-space is 10 GiB, " +
		"b load 3.20 per core, max-load is 2); building locally"
	if d.Verdict != Decline || d.Reason != want {
		t.Errorf("got %v %q\nwant decline %q", d.Verdict, d.Reason, want)
	}

	// Within the limits, or unknown, or no limit set: candidates.
	for name, l := range map[string]map[string]Live{
		"within":  {"a": {HasFree: true, FreeBytes: 10 << 30}, "b": {HasLoad: true, LoadPerCore: 2}},
		"unknown": nil,
		"partly":  {"a": {HasLoad: true, LoadPerCore: 50}, "b": {HasFree: true, FreeBytes: 0}},
	} {
		if d := Place([]machines.Machine{full, busy}, req(x86), View{Live: l}); len(d.Candidates) != 2 {
			t.Errorf("%s: got %v %v (%s), want both machines", name, d.Verdict, candidateNames(d), d.Reason)
		}
	}
	// A full machine is skipped for the other one, and a full machine with no other waits.
	if d := Place([]machines.Machine{full, mach("c", x86)}, req(x86), View{Live: live}); !slices.Equal(candidateNames(d), []string{"c"}) {
		t.Errorf("got %v, want [c]", candidateNames(d))
	}
	r := req(x86)
	r.AmWilling = false
	if d := Place([]machines.Machine{full}, r, View{Live: live}); d.Verdict != Postpone {
		t.Errorf("got %v (%s), want postpone", d.Verdict, d.Reason)
	}
}
