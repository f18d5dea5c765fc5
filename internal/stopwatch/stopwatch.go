package stopwatch

import (
	"encoding/json"
	"errors"
	"os"
	"sync"
	"time"
)

// Env names the file a [Watch] from [FromEnv] appends to.
const Env = "NIX_OFFLOAD_HOOK_TIMES"

// Watch collects the steps of one process. Its methods may be called from
// several goroutines at once. The zero value is not usable: see [Start].
type Watch struct {
	file  string
	start time.Time

	mu    sync.Mutex
	steps []step
	attrs map[string]string
}

type step struct {
	name string
	at   time.Duration
}

// FromEnv returns a Watch started now that writes to the file named by
// $NIX_OFFLOAD_HOOK_TIMES, or nil when it is unset or empty.
func FromEnv() *Watch {
	f := os.Getenv(Env)
	if f == "" {
		return nil
	}
	return Start(f, time.Now())
}

// Start returns a Watch started at t that [Watch.Write] appends to file.
func Start(file string, t time.Time) *Watch {
	return &Watch{file: file, start: t, steps: make([]step, 0, 32)}
}

// Mark records that the step name ended now.
func (w *Watch) Mark(name string) {
	if w == nil {
		return
	}
	at := time.Since(w.start)
	w.mu.Lock()
	w.steps = append(w.steps, step{name, at})
	w.mu.Unlock()
}

// Set records an attribute of the process, such as the derivation it
// built; a later Set of the same key replaces it.
func (w *Watch) Set(key, value string) {
	if w == nil {
		return
	}
	w.mu.Lock()
	if w.attrs == nil {
		w.attrs = map[string]string{}
	}
	w.attrs[key] = value
	w.mu.Unlock()
}

// Line is one process's record as [Watch.Write] writes it.
type Line struct {
	PID   int               `json:"pid"`
	Start time.Time         `json:"start"`
	Attrs map[string]string `json:"attrs,omitempty"`
	// Steps are [name, microseconds since Start] pairs, in the order
	// they were marked.
	Steps [][2]any `json:"steps"`
}

// Write appends the record to the file, as one line in one write. Errors
// are returned, not reported: a timing record must never fail a build.
func (w *Watch) Write() error {
	if w == nil {
		return nil
	}
	w.mu.Lock()
	l := Line{PID: os.Getpid(), Start: w.start, Attrs: w.attrs, Steps: make([][2]any, len(w.steps))}
	for i, s := range w.steps {
		l.Steps[i] = [2]any{s.name, s.at.Microseconds()}
	}
	w.mu.Unlock()
	b, err := json.Marshal(l)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(w.file, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	_, err = f.Write(append(b, '\n'))
	return errors.Join(err, f.Close())
}
