package broker

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/health"
	"github.com/nix-offload/nix-offload/internal/localstore"
	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/testbed"
)

// idlePool is a pool that never connects: these tests exercise slots,
// tickets and the queue, not builds.
type idlePool struct{}

func (idlePool) Get(ctx context.Context) (Session, error) {
	return nil, errors.New("no sessions in this test")
}
func (idlePool) Put(Session, bool)          {}
func (idlePool) Warm(context.Context) error { return nil }
func (idlePool) Stats() PoolStats           { return PoolStats{} }
func (idlePool) Close()                     {}

func testMachine(host string, slots int, systems ...string) machines.Machine {
	return machines.Machine{Host: host, User: "root", Systems: systems, ParallelBuilds: slots, Speed: 1, Enabled: true}
}

// testOptions fills in what a test leaves unset: a health file of its
// own, pools that never connect, and no local store.
func testOptions(t testing.TB, opt Options) Options {
	t.Helper()
	if opt.Health == nil {
		h, err := health.Open(filepath.Join(t.TempDir(), "health.json"))
		if err != nil {
			t.Fatal(err)
		}
		opt.Health = h
	}
	if opt.NewPool == nil {
		opt.NewPool = func(machines.Machine, func(error)) Pool { return idlePool{} }
	}
	if opt.OpenLocal == nil {
		opt.OpenLocal = func() (*localstore.Store, error) { return nil, errors.New("no local store in this test") }
	}
	return opt
}

func newTestBroker(t testing.TB, ms ...machines.Machine) *Broker {
	t.Helper()
	b := New(testOptions(t, Options{Config: &machines.Config{Machines: ms}}))
	t.Cleanup(b.Close)
	return b
}

func newClient(b *Broker) *client { return &client{b: b, tickets: map[string]bool{}} }

func try(t *testing.T, b *Broker, c *client, drv string, willing bool) brokerapi.TryResponse {
	t.Helper()
	resp, err := b.Try(brokerapi.TryRequest{DrvPath: drv, System: "x86_64-linux", AmWilling: willing}, c)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func used(b *Broker) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	for _, m := range b.machines {
		n += m.used
	}
	return n
}

func TestTryFillsSlotsThenQueuesOrDeclines(t *testing.T) {
	b := newTestBroker(t, testMachine("b1", 1, "x86_64-linux"), testMachine("b2", 1, "x86_64-linux"))
	c := newClient(b)
	first := try(t, b, c, "/nix/store/a.drv", false)
	second := try(t, b, c, "/nix/store/b.drv", false)
	if first.Verdict != brokerapi.Accept || second.Verdict != brokerapi.Accept || first.Machine == second.Machine {
		t.Fatalf("two tries on two free machines: %+v, %+v", first, second)
	}
	// Both busy: a willing local side builds it; an unwilling one waits in
	// the broker's queue instead of postponing.
	if r := try(t, b, c, "/nix/store/c.drv", true); r.Verdict != brokerapi.Decline || !strings.Contains(r.Reason, "busy") {
		t.Errorf("busy, local side willing: %+v", r)
	}
	queued := try(t, b, c, "/nix/store/d.drv", false)
	if queued.Verdict != brokerapi.Accept || !queued.Queued || queued.Machine != "" {
		t.Errorf("busy, local side unwilling: %+v, want accept and queue", queued)
	}
	if r := try(t, b, c, "/nix/store/e.drv", false); r.Verdict != brokerapi.Accept || !r.Queued {
		t.Errorf("second queued try: %+v", r)
	}
	if r, _ := b.Try(brokerapi.TryRequest{DrvPath: "/nix/store/f.drv", System: "aarch64-linux"}, c); r.Verdict != brokerapi.Decline {
		t.Errorf("no capable machine: %+v", r)
	}

	// Freeing the first slot hands it to the oldest queued ticket.
	b.cancelTicket(first.Reservation, errCancelled)
	testbed.WaitFor(t, 5*time.Second, "the first queued ticket to get the slot", func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		tq := b.tickets[queued.Reservation]
		return tq != nil && tq.machine != nil && len(b.queue) == 1
	})
	if got := used(b); got != 2 {
		t.Errorf("%d slots used, want 2", got)
	}
}

func TestClosedClientFreesEverything(t *testing.T) {
	b := newTestBroker(t, testMachine("b1", 2, "x86_64-linux"))
	c := newClient(b)
	for _, drv := range []string{"/nix/store/a.drv", "/nix/store/b.drv", "/nix/store/c.drv"} {
		try(t, b, c, drv, false)
	}
	if got := used(b); got != 2 {
		t.Fatalf("%d slots used, want 2", got)
	}
	c.close()
	if got := used(b); got != 0 {
		t.Errorf("after the client closed: %d slots used", got)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.queue) != 0 || len(b.tickets) != 0 {
		t.Errorf("after the client closed: %d queued, %d tickets", len(b.queue), len(b.tickets))
	}
}

func TestDownMachineIsSkippedAndProbed(t *testing.T) {
	b := newTestBroker(t, testMachine("b1", 1, "x86_64-linux"), testMachine("b2", 1, "x86_64-linux"))
	b.health.Failed("root@b1", errors.New("connection refused"))
	// No probe until the second build is queued: on a loaded machine the
	// tries below can take longer than a short probe interval.
	b.mu.Lock()
	b.probeEvery = time.Hour
	b.mu.Unlock()
	c := newClient(b)
	if r := try(t, b, c, "/nix/store/a.drv", false); r.Machine != "root@b2" {
		t.Errorf("with b1 down: %+v, want b2", r)
	}
	// b2 busy, b1 down and just failed: an unwilling local side waits in
	// the queue; once a probe is due, b1 is tried for it rather than after
	// its backoff (a minute at least).
	r := try(t, b, c, "/nix/store/b.drv", false)
	if !r.Queued {
		t.Fatalf("b2 busy, b1 down: %+v, want queued", r)
	}
	b.mu.Lock()
	b.probeEvery = 50 * time.Millisecond
	b.mu.Unlock()
	testbed.WaitFor(t, 5*time.Second, "the queued build to probe b1", func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		tq := b.tickets[r.Reservation]
		return tq.machine != nil && tq.machine.name == "root@b1"
	})
	// The probe is spent: the next build waits.
	if r := try(t, b, c, "/nix/store/c.drv", false); !r.Queued {
		t.Errorf("third try: %+v, want queued", r)
	}
}

func TestDrainHandsQueuedBuildsBack(t *testing.T) {
	b := newTestBroker(t, testMachine("b1", 1, "x86_64-linux"))
	c := newClient(b)
	try(t, b, c, "/nix/store/a.drv", false)
	q := try(t, b, c, "/nix/store/b.drv", false)
	b.mu.Lock()
	tq := b.tickets[q.Reservation]
	b.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	b.Drain(ctx)
	select {
	case <-tq.granted:
	default:
		t.Fatal("the queued ticket was not woken")
	}
	if !errors.Is(failureErr(tq.failure), errHandBack) {
		t.Errorf("queued ticket's failure %q, want a hand-back", tq.failure)
	}
	if _, err := b.Try(brokerapi.TryRequest{DrvPath: "/nix/store/c.drv", System: "x86_64-linux"}, c); err == nil {
		t.Error("a try while stopping was accepted")
	}
}
