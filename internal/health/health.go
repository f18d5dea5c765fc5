package health

import (
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"
)

// Hydra's backoff (see the package documentation).
const (
	retryInterval = 60 * time.Second // the backoff after the first failure
	retryBackoff  = 3                // each further failure multiplies it by this
	maxCounted    = 4                // failures beyond this do not lengthen the backoff
	maxJitter     = 30 * time.Second // added at random, [0, maxJitter)
)

// maxErrorLen bounds [State.LastError] in bytes: the file stays small and a log line short
// however long the error a dial returned.
const maxErrorLen = 500

// State is what is known about one machine. The zero State is a healthy machine.
type State struct {
	// Failures is the number of consecutive failures that counted (those that found the
	// machine up); 0 after a success.
	Failures int `json:"failures"`
	// Until is when the machine may be tried again; a machine is down while the clock is
	// before it. Zero for a machine that never failed.
	Until time.Time `json:"until,omitzero"`
	// LastError is the last failure, on one line and at most 500 bytes.
	LastError string `json:"lastError,omitempty"`
	// LastErrorAt is when LastError happened.
	LastErrorAt time.Time `json:"lastErrorAt,omitzero"`
	// LastProbe is when [Tracker.Probe] last let someone try the machine while it was down.
	LastProbe time.Time `json:"lastProbe,omitzero"`
}

// Tracker is the health of the machines, kept in one file shared with other processes, or
// only in memory. Its methods may be called from several goroutines at once.
type Tracker struct {
	path string // the JSON file; "" keeps the state in memory only

	// Test hooks, fixed after Open.
	now    func() time.Time
	jitter func() time.Duration

	mu       sync.Mutex       // serialises this process's updates; held during file I/O
	machines map[string]State // guarded by mu: what the file said last, with our changes
	// unsaved are the machines whose last change could not be written (guarded by mu):
	// Reload keeps them, and the next write that works saves them.
	unsaved map[string]bool
}

// Open returns the Tracker of the state file at path, creating its directory (mode 0700) if
// needed, and reads the file. A directory that is not this user's alone (see the package
// documentation) gives a Tracker in memory only, and an error that says so. An empty path gives a Tracker that remembers only in memory, for
// tests and for processes that have no state directory.
//
// Open always returns a usable Tracker. When the error is not nil as well, the file could not
// be read or is corrupt, and the Tracker starts with every machine healthy: log the error and
// go on.
func Open(path string) (*Tracker, error) {
	t := &Tracker{
		path:     path,
		now:      time.Now,
		jitter:   func() time.Duration { return rand.N(maxJitter) },
		machines: map[string]State{},
		unsaved:  map[string]bool{},
	}
	if path == "" {
		return t, nil
	}
	if err := ensureDir(path); err != nil {
		t.path = "" // a directory others can write is not ours to share through
		return t, err
	}
	return t, t.Reload()
}

// Path returns the state file's path, "" for a Tracker that lives in memory only.
func (t *Tracker) Path() string { return t.path }

// Failed records that machine failed with err (err may be nil: "unknown error"), saves that for
// the other processes, and returns the machine's new state. If the machine was up, the failure
// counts and puts it down for the backoff its count calls for. If it was down already, the
// failure is part of the same outage (a probe, or an attempt that started before the outage
// was recorded): only LastError and LastErrorAt change.
//
// The State is right even when the error is not nil: the error means that the failure may not
// be seen by other processes (see [Open]). Log it and go on.
func (t *Tracker) Failed(machine string, err error) (State, error) {
	msg := oneLine(err)
	var s State
	uerr := t.update(func(ms map[string]State, now time.Time) bool {
		s = ms[machine]
		if !now.Before(s.Until) { // up: a new failure
			s.Failures++
			s.Until = now.Add(backoff(s.Failures) + t.jitter())
		}
		s.LastError = msg
		s.LastErrorAt = now
		ms[machine] = s
		return true
	})
	return s, uerr
}

// Succeeded records that machine worked: it is up, and its next failure is the first again.
// The file is written only if the machine was not already healthy there. An error means only
// that the other processes may not know yet; log it and go on.
func (t *Tracker) Succeeded(machine string) error {
	if t.path != "" && t.healthyInFile(machine) {
		return nil
	}
	return t.update(func(ms map[string]State, _ time.Time) bool {
		if _, ok := ms[machine]; !ok {
			return false
		}
		delete(ms, machine)
		return true
	})
}

// Get returns what the Tracker last read or recorded about machine.
func (t *Tracker) Get(machine string) State {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.machines[machine]
}

// Down returns the machines on backoff now, each with the reason in words, such as
//
//	connect: connection refused (failed 2 times, next try in 2m41s)
//
// which is the form the scheduler's Decide takes. It answers from what the Tracker last read
// or recorded; call [Tracker.Reload] first to see what other processes recorded since.
func (t *Tracker) Down() map[string]string {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := t.now()
	down := map[string]string{}
	for name, s := range t.machines {
		if now.Before(s.Until) {
			down[name] = s.reason(now)
		}
	}
	return down
}

// Probe says whether machine may be tried now, for a caller that would rather try a machine
// on backoff than give up, such as when it is the only one that can build a request. The
// answer is true when
//
//   - the machine is up, or
//   - it is down, but nobody tried it in the last every: no failure was recorded and no probe
//     was granted by any process in that time. The grant is recorded, so that the other
//     callers wait another every.
//
// Report the outcome with [Tracker.Failed] or [Tracker.Succeeded] as for any other attempt.
// The answer is usable even when the error is not nil; the error means that other processes
// may not know of the grant (see [Open]).
func (t *Tracker) Probe(machine string, every time.Duration) (bool, error) {
	var ok bool
	err := t.update(func(ms map[string]State, now time.Time) bool {
		s := ms[machine]
		if !now.Before(s.Until) {
			ok = true // up
			return false
		}
		last := s.LastErrorAt
		if s.LastProbe.After(last) {
			last = s.LastProbe
		}
		if since := now.Sub(last); since >= 0 && since < every {
			return false
		}
		s.LastProbe = now
		ms[machine] = s
		ok = true
		return true
	})
	return ok, err
}

// Reload reads the file again, to see what other processes recorded. If the file is corrupt,
// the Tracker forgets every failure, as [Open] does. If it cannot be read, the Tracker keeps
// what it knew. Either way the error says what happened: log it and go on.
func (t *Tracker) Reload() error {
	if t.path == "" {
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	ms, err := readState(t.path)
	if ms != nil {
		t.keepUnsavedLocked(ms)
		t.machines = ms
	}
	return (err)
}

// keepUnsavedLocked puts into ms, read from the file, what this process recorded but could
// not save: a failure must not be forgotten because the file is full or read-only.
func (t *Tracker) keepUnsavedLocked(ms map[string]State) {
	for name := range t.unsaved {
		if s, ok := t.machines[name]; ok {
			ms[name] = s
		} else {
			delete(ms, name)
		}
	}
}

// update applies change to the state under both locks, with the file's newest content, and
// saves the result if change reports that it changed something. When the file cannot be
// used, change is applied to the Tracker's memory, kept there until a write works, and the
// error says what was not shared.
func (t *Tracker) update(change func(ms map[string]State, now time.Time) (changed bool)) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.path == "" {
		change(t.machines, t.clock())
		return nil
	}
	// keep makes ms the memory, marking what differs from before as unsaved.
	keep := func(ms map[string]State, err error) error {
		for name, s := range ms {
			if old, ok := t.machines[name]; !ok || old != s {
				t.unsaved[name] = true
			}
		}
		for name := range t.machines {
			if _, ok := ms[name]; !ok {
				t.unsaved[name] = true
			}
		}
		t.machines = ms
		return (err)
	}
	inMemory := func(err error) error {
		ms := maps.Clone(t.machines)
		change(ms, t.clock())
		return keep(ms, err)
	}
	unlock, err := lockFile(t.path + ".lock")
	if err != nil {
		return inMemory(err)
	}
	defer unlock()
	ms, rerr := readState(t.path)
	if ms == nil {
		// Unreadable: writing would throw away what other processes recorded.
		return inMemory(rerr)
	}
	t.keepUnsavedLocked(ms)
	// The clock is read with the lock held, so that updates from all processes are recorded
	// in the order of their times.
	changed := change(ms, t.clock())
	if changed || rerr != nil || len(t.unsaved) > 0 { // a corrupt file is replaced even when nothing changed
		if werr := writeState(t.path, ms); werr != nil {
			return keep(ms, errors.Join(rerr, werr))
		}
		clear(t.unsaved)
	}
	t.machines = ms
	return (rerr)
}

// healthyInFile reads the file without the lock and, if it reads well, takes its content; it
// reports whether machine is healthy there. Most successes are of healthy machines, and every
// hook on the host reports one per build: they need not queue for the lock to change nothing.
func (t *Tracker) healthyInFile(machine string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	ms, err := readState(t.path)
	if err != nil {
		return false // update says what is wrong
	}
	t.keepUnsavedLocked(ms) // as Reload does: the file lacks what could not be saved
	t.machines = ms
	_, listed := ms[machine]
	return !listed
}

// clock is t.now in UTC, without a monotonic reading: times read back from the file compare
// the same way as those in memory.
func (t *Tracker) clock() time.Time { return t.now().UTC() }

// backoff is how long the n-th consecutive failure (n ≥ 1) puts a machine down, before jitter.
func backoff(n int) time.Duration {
	d := retryInterval
	for range min(n, maxCounted) - 1 {
		d *= retryBackoff
	}
	return d
}

// reason describes a down machine for [Tracker.Down].
func (s State) reason(now time.Time) string {
	times := "once"
	if s.Failures != 1 {
		times = fmt.Sprintf("%d times", s.Failures)
	}
	wait := s.Until.Sub(now)
	if r := wait % time.Second; r != 0 {
		wait += time.Second - r // round up: "next try in 0s" would be wrong
	}
	msg := s.LastError
	if msg == "" {
		msg = "unknown error"
	}
	return fmt.Sprintf("%s (failed %s, next try in %s)", msg, times, wait)
}

// oneLine renders err for [State.LastError]: valid UTF-8, control characters and runs of
// white space made one space, and at most maxErrorLen bytes, cut at a character and ending
// in "…" if it was cut.
func oneLine(err error) string {
	if err == nil {
		return "unknown error"
	}
	s := strings.ToValidUTF8(err.Error(), "\uFFFD")
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, s)
	s = strings.Join(strings.Fields(s), " ")
	if s == "" {
		return "unknown error"
	}
	if len(s) <= maxErrorLen {
		return s
	}
	const ellipsis = "…"
	cut := maxErrorLen - len(ellipsis)
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + ellipsis
}
