package broker

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/probe"
	"github.com/nix-offload/nix-offload/internal/scheduler"
	"github.com/nix-offload/nix-offload/internal/testbed"
)

// A hook's build overtakes the submissions waiting for a slot; submissions wait by priority,
// in arrival order among equals.
func TestQueueOrderByPriority(t *testing.T) {
	b := newTestBroker(t, testMachine("b1", 1, "x86_64-linux"))
	c := newClient(b)
	running := try(t, b, c, "/nix/store/running.drv", false)
	submit := func(drv string, priority int) {
		t.Helper()
		r, err := b.try(brokerapi.TryRequest{DrvPath: drv, System: "x86_64-linux"}, c, priority, nil)
		if err != nil || !r.Queued {
			t.Fatalf("%s: %+v, %v", drv, r, err)
		}
	}
	submit("/nix/store/graph-leaf.drv", 0)
	submit("/nix/store/graph-long-path.drv", 5)
	submit("/nix/store/graph-leaf2.drv", 0)
	hook := try(t, b, c, "/nix/store/hook.drv", false)
	if !hook.Queued {
		t.Fatalf("hook: %+v", hook)
	}
	b.mu.Lock()
	var order []string
	for _, tk := range b.queue {
		order = append(order, strings.TrimPrefix(tk.drvPath, "/nix/store/"))
	}
	b.mu.Unlock()
	want := []string{"hook.drv", "graph-long-path.drv", "graph-leaf.drv", "graph-leaf2.drv"}
	if !slices.Equal(order, want) {
		t.Fatalf("queue %v, want %v", order, want)
	}
	b.cancelTicket(running.Reservation, errCancelled)
	testbed.WaitFor(t, 5*time.Second, "the hook's build to get the slot", func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		tk := b.tickets[hook.Reservation]
		return tk != nil && tk.machine != nil
	})
}

// fakeProber is an idle pool whose machine answers the probe with st.
type fakeProber struct {
	idlePool
	st  chan probe.State
	err error
}

func (f fakeProber) Probe(ctx context.Context, _ time.Duration) (probe.State, error) {
	select {
	case st := <-f.st:
		return st, f.err
	case <-ctx.Done():
		return probe.State{}, ctx.Err()
	}
}

// A machine whose store is nearly full gets no build while it says so, and the status says why.
func TestFullMachineHeld(t *testing.T) {
	full := testMachine("full", 4, "x86_64-linux")
	full.MinFreeSpace = 10 << 30
	answers := make(chan probe.State)
	b := New(testOptions(t, Options{
		Config:     &machines.Config{Machines: []machines.Machine{full}},
		NewPool:    func(machines.Machine, func(error)) Pool { return fakeProber{st: answers} },
		StateEvery: 10 * time.Millisecond,
	}))
	t.Cleanup(b.Close)
	answers <- probe.State{HasFree: true, FreeBytes: 8697308774, HasLoad: true, Load1: 0.5, Cores: 2}
	testbed.WaitFor(t, 5*time.Second, "the first probe's answer", func() bool { return b.Status().Machines[0].State != nil })
	c := newClient(b)
	if r := try(t, b, c, "/nix/store/a.drv", true); r.Verdict != brokerapi.Decline ||
		!strings.Contains(r.Reason, "full store has 8.1 GiB free, min-free-space is 10 GiB") {
		t.Errorf("try on a full machine: %+v", r)
	}
	st := b.Status().Machines[0]
	if st.Held != "store has 8.1 GiB free, min-free-space is 10 GiB" || st.MinFreeSpace != 10<<30 ||
		st.State.FreeBytes == nil || *st.State.FreeBytes != 8697308774 || *st.State.LoadPerCore != 0.25 {
		t.Errorf("status: %+v, state %+v", st, st.State)
	}
	// Space freed: a queued build gets the machine.
	queued := try(t, b, c, "/nix/store/b.drv", false)
	if !queued.Queued {
		t.Fatalf("unwilling try on a full machine: %+v", queued)
	}
	answers <- probe.State{HasFree: true, FreeBytes: 20 << 30}
	testbed.WaitFor(t, 5*time.Second, "the queued build to get the machine once it has room", func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		tk := b.tickets[queued.Reservation]
		return tk != nil && tk.machine != nil
	})
}

// The locality memory: a build whose input this broker built or sent to a machine goes there,
// even when the other machine has fewer builds.
func TestInputsPullTheBuild(t *testing.T) {
	b := newTestBroker(t, testMachine("a", 4, "x86_64-linux"), testMachine("b", 4, "x86_64-linux"))
	input := "/nix/store/00000000000000000000000000000000-big"
	c := newClient(b)
	try(t, b, c, "/nix/store/other.drv", false) // on a: config order
	b.mu.Lock()
	defer b.mu.Unlock()
	b.byName["root@a"].knowLocked(input, 32<<20)
	tk := b.newTicket(scheduler.Request{System: "x86_64-linux"}, "/nix/store/c.drv", nil)
	tk.hint = []string{input, "/nix/store/11111111111111111111111111111111-small"}
	if d := b.decideLocked(tk); len(d.Candidates) != 2 || d.Candidates[0].Host != "a" {
		t.Errorf("candidates %v, want a first: it holds the input", d.Candidates)
	}
	tk.hint = nil
	if d := b.decideLocked(tk); len(d.Candidates) != 2 || d.Candidates[0].Host != "b" {
		t.Errorf("without the input: candidates %v, want b first (fewer builds)", d.Candidates)
	}

	// Being sent counts as there: a build granted b with an input of known size pulls the next
	// build that needs it to b too.
	other := "/nix/store/22222222222222222222222222222222-other"
	first := b.newTicket(scheduler.Request{System: "x86_64-linux"}, "/nix/store/d.drv", nil)
	first.hint, first.sizes = []string{other}, map[string]uint64{other: 16 << 20}
	if !b.grantLocked(first, b.byName["root@b"]) {
		t.Fatal("no slot on b")
	}
	next := b.newTicket(scheduler.Request{System: "x86_64-linux"}, "/nix/store/e.drv", nil)
	next.hint = []string{other}
	if d := b.decideLocked(next); len(d.Candidates) != 2 || d.Candidates[0].Host != "b" {
		t.Errorf("input on its way to b: candidates %v, want b first", d.Candidates)
	}
	b.releaseLocked(first)
}

// A graph's input that stays on the machine that built it (held) pulls the build there.
func TestHeldInputPullsTheBuild(t *testing.T) {
	b := newTestBroker(t, testMachine("a", 4, "x86_64-linux"), testMachine("b", 4, "x86_64-linux"))
	c := newClient(b)
	try(t, b, c, "/nix/store/other.drv", false) // on a: config order
	held := []brokerapi.HeldPath{{Machine: "root@a", PathInfo: brokerapi.PathInfo{
		Path: "/nix/store/00000000000000000000000000000000-kept", NarSize: 32 << 20}}}
	r, err := b.try(brokerapi.TryRequest{DrvPath: "/nix/store/c.drv", System: "x86_64-linux"}, c, 0, held)
	if err != nil || r.Machine != "root@a" {
		t.Errorf("got %+v, %v; want root@a, which holds the input", r, err)
	}
	r, err = b.try(brokerapi.TryRequest{DrvPath: "/nix/store/d.drv", System: "x86_64-linux"}, c, 0, nil)
	if err != nil || r.Machine != "root@b" {
		t.Errorf("without held inputs: got %+v, %v; want root@b, the less loaded", r, err)
	}
}
