package scheduler

import (
	"cmp"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/nix-offload/nix-offload/internal/machines"
)

// featureCA is the feature Nix adds to a request whose outputs are floating content-addressed
// (NixOS/nix derivation-goal.cc, tryBuildHook).
const featureCA = "ca-derivations"

// systemBuiltin is the system of derivations built into Nix (builtin:fetchurl, …); every machine
// supports it (machines.cc, Machine::systemSupported).
const systemBuiltin = "builtin"

// maxListed bounds how many machines one Reason names before it says "and N more".
const maxListed = 8

// Request is what nix-daemon's "try" tells the hook about one build.
type Request struct {
	System           string   // the derivation's system, e.g. "x86_64-linux", or "builtin"
	RequiredFeatures []string // requiredSystemFeatures, plus "ca-derivations" for floating CA outputs
	AmWilling        bool     // nix-daemon would build it locally now (a local build slot is free)
	// Present is a hint: the bytes of the build's inputs each machine holds already, by
	// [machines.Machine.Name] (a graph build knows where it left its intermediates). nil: none.
	Present map[string]uint64
}

// Verdict is the hook's reply to one request. The zero Verdict is none of them.
type Verdict int

// The replies of the hook protocol; String gives the word after "# ".
const (
	Accept             Verdict = iota + 1 // take the build; try Decision.Candidates in order
	Decline                               // nix-daemon builds it locally, or fails if it cannot
	DeclinePermanently                    // decline this and every later build of this nix-daemon worker
	Postpone                              // nix-daemon asks again after build-poll-interval
)

// String returns the reply word: "accept", "decline", "decline-permanently" or "postpone".
func (v Verdict) String() string {
	switch v {
	case Accept:
		return "accept"
	case Decline:
		return "decline"
	case DeclinePermanently:
		return "decline-permanently"
	case Postpone:
		return "postpone"
	}
	return fmt.Sprintf("Verdict(%d)", int(v))
}

// Decision is the answer to one [Request].
type Decision struct {
	Verdict Verdict
	// Candidates, for Accept only: the capable machines that are up and have a free slot, best
	// first. Try them in order; the first whose slot can be taken gets the build.
	Candidates []machines.Machine
	// Reason says why, in words a user understands; always set unless Verdict is Accept.
	Reason string
}

// Matches reports whether m can build req, load and health aside: m is enabled, lists req's
// system (any machine builds "builtin"), supports every required feature as a feature or a
// mandatory feature, and every mandatory feature of m is required.
func Matches(m machines.Machine, req Request) bool {
	return m.Enabled && supportsSystem(m, req.System) &&
		len(lacking(m, req.RequiredFeatures)) == 0 && len(unmetMandatory(m, req.RequiredFeatures)) == 0
}

func supportsSystem(m machines.Machine, system string) bool {
	return system == systemBuiltin || slices.Contains(m.Systems, system)
}

// lacking returns the required features m supports neither as a feature nor as a mandatory one.
func lacking(m machines.Machine, required []string) []string {
	var out []string
	for _, f := range required {
		if !slices.Contains(m.Features, f) && !slices.Contains(m.MandatoryFeatures, f) && !slices.Contains(out, f) {
			out = append(out, f)
		}
	}
	return out
}

// unmetMandatory returns the mandatory features of m that the request does not require.
func unmetMandatory(m machines.Machine, required []string) []string {
	var out []string
	for _, f := range m.MandatoryFeatures {
		if !slices.Contains(required, f) && !slices.Contains(out, f) {
			out = append(out, f)
		}
	}
	return out
}

// Live is what a machine said about itself when it was last asked (the broker reads it every
// few seconds over the machine's warm connection; internal/pool's Probe). Each part counts only
// when known: a machine that did not answer in the expected form is not held back by it.
type Live struct {
	HasLoad     bool
	LoadPerCore float64 // 1-minute load average ÷ cores
	HasFree     bool
	FreeBytes   uint64 // free space of the filesystem that holds the store
}

// View is what the caller knows about the machines beyond their configuration, all by
// [machines.Machine.Name]; every map may be nil, and a missing name means none or unknown.
type View struct {
	// Load counts the builds running on each machine from this host.
	Load map[string]int
	// Down holds the machines that failed recently and must be skipped, with the failure in words.
	Down map[string]string
	// Live is each machine's last answer about itself; see [Live].
	Live map[string]Live
	// Present is, for this request, the bytes of its inputs each machine holds already or is
	// being sent (a hint from what the caller built or sent there; the build still asks the
	// machine which paths it lacks).
	Present map[string]uint64
	// Held is, for this request, how many of its inputs each machine holds that are valid
	// nowhere else this host knows of (a graph's outputs kept on the machine that built them):
	// on another machine each of them is streamed from there through this host, a few round
	// trips whatever its size. Among machines whose bytes present count the same, more held
	// inputs go first.
	Held map[string]int
}

// Decide answers req given the configured machines ms, the builds running on each machine from
// this host (load, by [machines.Machine.Name]; a missing name means none) and the machines that
// failed recently and must be skipped (down, by Name, with the failure in words). See the
// package documentation for the rules. It is [Place] with nothing known live.
func Decide(ms []machines.Machine, req Request, load map[string]int, down map[string]string) Decision {
	return Place(ms, req, View{Load: load, Down: down})
}

// localityUnit is the step in which bytes present count for the order: machines whose
// weighted bytes present differ by less than this are equal, and load ÷ speed decides.
const localityUnit = 1 << 20

// Place answers req given the configured machines ms and what the caller knows about them (v).
// See the package documentation for the rules.
func Place(ms []machines.Machine, req Request, v View) Decision {
	if len(ms) == 0 {
		return Decision{Verdict: DeclinePermanently, Reason: "no remote machines configured"}
	}
	if slices.Contains(req.RequiredFeatures, featureCA) {
		// Declined whatever AmWilling says. When nix-daemon cannot build it locally, Nix up to
		// 2.29 then aborts the user's build (2.35 fails the goal). That is the honest outcome:
		// accepting would end the same way after the build, since the outputs' realisations
		// cannot be registered, and postponing would wait forever.
		return Decision{Verdict: Decline, Reason: featureCA + " builds are not offloaded: " +
			"Nix needs a realisation for their outputs and no nix-store command can register one"}
	}

	type candidate struct {
		m     machines.Machine
		load  int
		speed float64
		near  uint64 // bytes present, weighted by the share of free slots, in localityUnits
		held  int    // inputs only it holds (View.Held)
	}
	var (
		capable, free []candidate
		// unavailable describes each capable machine that cannot take it now, in config order:
		// "b1 4/4" if busy, "b2 down: connection refused" if down, "b3 store has …" if full.
		unavailable  []string
		nBusy, nDown int
	)
	for _, m := range ms {
		if !Matches(m, req) {
			continue
		}
		c := candidate{m: m, load: max(v.Load[m.Name()], 0), speed: speedOf(m)}
		capable = append(capable, c)
		live := v.Live[m.Name()]
		switch why, isDown := v.Down[m.Name()]; {
		case isDown:
			s := m.Name() + " down"
			if why != "" {
				s += ": " + why
			}
			nDown++
			unavailable = append(unavailable, s)
		case c.load >= m.ParallelBuilds:
			s := fmt.Sprintf("%s %d/%d", m.Name(), c.load, m.ParallelBuilds)
			nBusy++
			unavailable = append(unavailable, s)
		case Held(m, live) != "":
			nBusy++
			unavailable = append(unavailable, m.Name()+" "+Held(m, live))
		default:
			share := float64(m.ParallelBuilds-c.load) / float64(m.ParallelBuilds)
			c.near = uint64(float64(v.Present[m.Name()])*share) / localityUnit
			c.held = v.Held[m.Name()]
			free = append(free, c)
		}
	}
	if len(capable) == 0 {
		// Also when AmWilling is false: nothing will ever build it here, so waiting is pointless
		// and the reason is the most useful thing the user can get.
		return Decision{Verdict: Decline, Reason: whyNoMachine(ms, req)}
	}

	if len(free) > 0 {
		// Most input bytes already there (weighed by free slots), then most inputs held only
		// there, then build-remote's order: lowest load ÷ speed, then the faster, then the less
		// loaded; a stable sort keeps config order among equals, as build-remote's strict
		// comparisons do.
		slices.SortStableFunc(free, func(a, b candidate) int {
			if c := cmp.Compare(b.near, a.near); c != 0 {
				return c
			}
			if c := cmp.Compare(b.held, a.held); c != 0 {
				return c
			}
			if c := cmp.Compare(float64(a.load)/a.speed, float64(b.load)/b.speed); c != 0 {
				return c
			}
			if c := cmp.Compare(b.speed, a.speed); c != 0 {
				return c
			}
			return cmp.Compare(a.load, b.load)
		})
		d := Decision{Verdict: Accept, Candidates: make([]machines.Machine, len(free))}
		for i, c := range free {
			d.Candidates[i] = c.m
		}
		return d
	}

	state := "busy"
	switch {
	case nBusy == 0:
		state = "down"
	case nDown > 0:
		state = "busy or down"
	}
	var reason string
	if len(capable) == 1 {
		reason = fmt.Sprintf("the only capable machine is %s (%s)", state, unavailable[0])
	} else {
		reason = fmt.Sprintf("all %d capable machines are %s (%s)", len(capable), state, list(unavailable, ", "))
	}
	if req.AmWilling {
		return Decision{Verdict: Decline, Reason: reason + "; building locally"}
	}
	if nBusy == 0 {
		return Decision{Verdict: Postpone, Reason: reason + "; waiting for one to come back, as this host cannot build it"}
	}
	return Decision{Verdict: Postpone, Reason: reason + "; waiting for a free slot, as this host cannot build it"}
}

// Held says why m gets no new build by what it last said about itself (min-free-space,
// max-load), or "" when nothing holds it back; what it did not say holds nothing back.
func Held(m machines.Machine, l Live) string {
	switch {
	case m.MinFreeSpace > 0 && l.HasFree && l.FreeBytes < m.MinFreeSpace:
		return tooFull(l.FreeBytes, m.MinFreeSpace)
	case m.MaxLoad > 0 && l.HasLoad && l.LoadPerCore > m.MaxLoad:
		return tooBusy(l.LoadPerCore, m.MaxLoad)
	}
	return ""
}

// tooFull says why a machine with free bytes on its store's filesystem gets no build under
// min-free-space minFree: "store has 8.1 GiB free, min-free-space is 10 GiB".
func tooFull(free, minFree uint64) string {
	return fmt.Sprintf("store has %s free, min-free-space is %s", machines.FormatSize(free), machines.FormatSize(minFree))
}

// tooBusy says why a machine with load per core gets no build under maxLoad:
// "load 3.20 per core, max-load is 2".
func tooBusy(load, maxLoad float64) string {
	return fmt.Sprintf("load %.2f per core, max-load is %s", load, strconv.FormatFloat(maxLoad, 'f', -1, 64))
}

// speedOf returns m's speed factor, or 1 for a value Validate would reject, so that the load ÷
// speed order stays defined.
func speedOf(m machines.Machine) float64 {
	if m.Speed > 0 {
		return m.Speed
	}
	return machines.DefaultSpeed
}

// whyNoMachine explains why no machine of ms matches req, naming the first obstacle met in
// Nix's order (enabled, system, features) and the disabled machines that would match if enabled.
func whyNoMachine(ms []machines.Machine, req Request) string {
	r := whyNoEnabledMachine(ms, req)
	var could []string
	for _, m := range ms {
		on := m
		on.Enabled = true
		if !m.Enabled && Matches(on, req) {
			could = append(could, m.Name())
		}
	}
	if len(could) > 0 && slices.ContainsFunc(ms, func(m machines.Machine) bool { return m.Enabled }) {
		r += fmt.Sprintf("; disabled but capable: %s", list(could, ", "))
	}
	return r
}

func whyNoEnabledMachine(ms []machines.Machine, req Request) string {
	var enabled []machines.Machine
	for _, m := range ms {
		if m.Enabled {
			enabled = append(enabled, m)
		}
	}
	if len(enabled) == 0 {
		if len(ms) == 1 {
			return fmt.Sprintf("the only machine, %s, is disabled", ms[0].Name())
		}
		return fmt.Sprintf("all %d machines are disabled (%s)", len(ms), list(names(ms), ", "))
	}

	var sys []machines.Machine
	for _, m := range enabled {
		if supportsSystem(m, req.System) {
			sys = append(sys, m)
		}
	}
	if len(sys) == 0 {
		// Group machine names by system, systems in order of first appearance.
		var systems []string
		on := map[string][]string{}
		for _, m := range enabled {
			for _, s := range m.Systems {
				if _, seen := on[s]; !seen {
					systems = append(systems, s)
				}
				if !slices.Contains(on[s], m.Name()) {
					on[s] = append(on[s], m.Name())
				}
			}
		}
		configured := make([]string, len(systems))
		for i, s := range systems {
			configured[i] = s + " on " + list(on[s], ", ")
		}
		return fmt.Sprintf("no machine supports system %q (configured: %s)", req.System, list(configured, "; "))
	}

	// Features required that no machine of the right system offers at all.
	var missing []string
	for _, f := range req.RequiredFeatures {
		if slices.Contains(missing, f) {
			continue
		}
		if !slices.ContainsFunc(sys, func(m machines.Machine) bool { return len(lacking(m, []string{f})) == 0 }) {
			missing = append(missing, f)
		}
	}
	if len(missing) > 0 {
		elsewhere := slices.ContainsFunc(enabled, func(m machines.Machine) bool {
			return len(lacking(m, missing)) < len(missing)
		})
		if elsewhere && req.System != systemBuiltin {
			return fmt.Sprintf("requires features %s that no %s machine supports", set(missing), req.System)
		}
		return fmt.Sprintf("requires features %s that no machine supports", set(missing))
	}

	// Each feature is offered somewhere, yet no single machine fits: say what each one lacks or
	// insists on.
	why := make([]string, 0, len(sys))
	for _, m := range sys {
		var parts []string
		if l := lacking(m, req.RequiredFeatures); len(l) > 0 {
			parts = append(parts, "lacks "+set(l))
		}
		if u := unmetMandatory(m, req.RequiredFeatures); len(u) > 0 {
			parts = append(parts, "only takes builds requiring "+set(m.MandatoryFeatures))
		}
		why = append(why, m.Name()+" "+strings.Join(parts, " and "))
	}
	what := "a build with no required features"
	if len(req.RequiredFeatures) > 0 {
		what = "a build requiring " + set(req.RequiredFeatures)
	}
	label := req.System + " machine"
	if req.System == systemBuiltin {
		label = "machine"
	}
	return fmt.Sprintf("no %s takes %s: %s", label, what, list(why, "; "))
}

func names(ms []machines.Machine) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.Name()
	}
	return out
}

// set formats features as Nix does in its messages: "{a, b}", sorted, without repeats.
func set(features []string) string {
	s := slices.Clone(features)
	slices.Sort(s)
	return "{" + strings.Join(slices.Compact(s), ", ") + "}"
}

// list joins items with sep, naming at most maxListed of them.
func list(items []string, sep string) string {
	if len(items) <= maxListed {
		return strings.Join(items, sep)
	}
	return strings.Join(items[:maxListed], sep) + fmt.Sprintf("%sand %d more", sep, len(items)-maxListed)
}
