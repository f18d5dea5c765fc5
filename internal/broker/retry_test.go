package broker

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/sshconn"
	"github.com/nix-offload/nix-offload/internal/testbed"
)

// newRetryBroker is newTestBroker without the Close at cleanup: a broker
// that deadlocked holding its lock would hang it, and the test would end
// in go test's timeout instead of failing. Each machine's pool fails
// every Get for good, as a machine whose host key changed does, so every
// build started on it is retried elsewhere at once.
func newRetryBroker(t *testing.T, ms ...machines.Machine) *Broker {
	t.Helper()
	b, _ := newFailingBroker(t, machines.Daemon{}, nil, func(m machines.Machine) error {
		return &sshconn.HostKeyError{Name: m.Name(), Addr: m.Host + ":22", Problem: sshconn.HostKeyMismatch}
	}, ms...)
	return b
}

// testClock is a clock that moves only when told to.
type testClock struct {
	mu  sync.Mutex
	now time.Time
}

func newTestClock() *testClock { return &testClock{now: time.Now()} }

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *testClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// failingPool fails every Get with what fail says, and counts the Gets.
type failingPool struct {
	idlePool
	fail func() error
	gets *atomic.Int64
}

func (p failingPool) Get(context.Context) (Session, error) {
	p.gets.Add(1)
	return nil, p.fail()
}

// newFailingBroker is a broker whose pools fail every Get with fail(m), and
// the count of those Gets.
func newFailingBroker(t *testing.T, d machines.Daemon, now func() time.Time, fail func(machines.Machine) error, ms ...machines.Machine) (*Broker, *atomic.Int64) {
	t.Helper()
	gets := new(atomic.Int64)
	return New(testOptions(t, Options{
		Config: &machines.Config{Machines: ms, Daemon: d},
		Now:    now,
		NewPool: func(m machines.Machine, _ func(error)) Pool {
			return failingPool{fail: func() error { return fail(m) }, gets: gets}
		},
	})), gets
}

// runTicket starts the build of a ticket as startBuild does, without a
// derivation: the pool fails before one is needed.
func runTicket(b *Broker, id string) *build {
	b.mu.Lock()
	defer b.mu.Unlock()
	t := b.tickets[id]
	ctx, cancel := context.WithCancelCause(b.ctx)
	bd := &build{
		b: b, t: t, req: brokerapi.BuildRequest{Reservation: id, DrvPath: t.drvPath},
		ctx: ctx, cancel: cancel,
		events:   newEventWriter(),
		terminal: make(chan struct{}),
		done:     make(chan struct{}),
	}
	b.builds[id] = bd
	b.wg.Add(1)
	go bd.run()
	return bd
}

// events returns the event types a build emitted (none is attached to a
// response in these tests, so all are pending), and its last event.
func events(bd *build) ([]string, brokerapi.Event) {
	bd.events.mu.Lock()
	defer bd.events.mu.Unlock()
	var types []string
	for _, ev := range bd.events.pending {
		types = append(types, ev.Type)
	}
	var last brokerapi.Event
	if n := len(bd.events.pending); n > 0 {
		last = bd.events.pending[n-1]
	}
	return types, last
}

// waitDone fails t unless bd ends within 5 s.
func waitDone(t *testing.T, bd *build) {
	t.Helper()
	select {
	case <-bd.done:
	case <-time.After(5 * time.Second):
		types, _ := events(bd)
		lock := "free"
		if bd.b.mu.TryLock() {
			bd.b.mu.Unlock()
		} else {
			lock = "held: a deadlock"
		}
		t.Fatalf("the build has not ended 5 s after its last machine failed it; events %v; the broker's lock is %s", types, lock)
	}
}

func checkIdle(t *testing.T, b *Broker) {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, m := range b.machines {
		if m.used != 0 {
			t.Errorf("machine %s: %d slots used after the build", m.name, m.used)
		}
	}
	if len(b.queue) != 0 || len(b.tickets) != 0 || len(b.builds) != 0 {
		t.Errorf("after the build: %d queued, %d tickets, %d builds", len(b.queue), len(b.tickets), len(b.builds))
	}
}

// A queued ticket that gets its slot before its build starts waiting must
// not leave a stale wake-up behind: when that machine then fails the
// build, the grant on the next machine used to block on the full channel
// while holding the broker's lock (every hook then hung), and a build
// waiting in the queue would have woken on it with no machine.
func TestRetryAfterQueuedGrantDoesNotDeadlock(t *testing.T) {
	b := newRetryBroker(t, testMachine("b1", 1, "x86_64-linux"), testMachine("b2", 1, "x86_64-linux"))
	c := newClient(b)
	x := try(t, b, c, "/nix/store/x.drv", false)
	y := try(t, b, c, "/nix/store/y.drv", false)
	q := try(t, b, c, "/nix/store/q.drv", false)
	if !q.Queued || x.Machine == "" || y.Machine == "" {
		t.Fatalf("tries: %+v %+v %+v, want two slots taken and one queued", x, y, q)
	}
	// The queued ticket gets b1's slot before its build is submitted.
	b.cancelTicket(x.Reservation, errCancelled)
	testbed.WaitFor(t, 5*time.Second, "the queued ticket to get the free slot", func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		return b.tickets[q.Reservation].machine != nil
	})
	b.cancelTicket(y.Reservation, errCancelled) // b2 is free for the retry

	bd := runTicket(b, q.Reservation)
	waitDone(t, bd)
	types, last := events(bd)
	if want := "started retrying started failed"; strings.Join(types, " ") != want {
		t.Errorf("events %v, want %s", types, want)
	}
	if last.Kind != brokerapi.FailMisc || !strings.Contains(last.Error, "b2") {
		t.Errorf("last event %+v, want a failure naming the last machine tried", last)
	}
	checkIdle(t, b)
	b.Close()
}

// A build whose every capable machine has failed it ends with the last
// machine's error; it used to wait in the queue forever for a machine it
// had excluded, and its nix-build with it.
func TestRetryWithNoOtherMachineFails(t *testing.T) {
	b := newRetryBroker(t, testMachine("b1", 2, "x86_64-linux"), testMachine("arm", 2, "aarch64-linux"))
	c := newClient(b)
	r := try(t, b, c, "/nix/store/a.drv", false)
	if r.Verdict != brokerapi.Accept || r.Queued {
		t.Fatalf("try: %+v", r)
	}
	bd := runTicket(b, r.Reservation)
	waitDone(t, bd)
	types, last := events(bd)
	if want := "started failed"; strings.Join(types, " ") != want {
		t.Errorf("events %v, want %s", types, want)
	}
	if last.Kind != brokerapi.FailMisc || !strings.Contains(last.Error, "cannot use 'root@b1'") {
		t.Errorf("last event %+v, want a failure saying b1 could not be used", last)
	}
	checkIdle(t, b)
	b.Close()
}

// The rule of the hook alone, with the same setting: a build whose only
// capable machine fails transiently waits for it, probing it, for
// machine-wait, and then fails with the last error. Before, the broker
// failed it at the first refused connection.
func TestTransientFailureWaitsMachineWait(t *testing.T) {
	refused := errors.New("dial tcp 10.0.0.1:22: connect: connection refused")
	clock := newTestClock()
	b, gets := newFailingBroker(t, machines.Daemon{MachineWait: time.Hour}, clock.Now, func(m machines.Machine) error {
		return &sshconn.ConnectError{Name: m.Name(), Addr: m.Host + ":22", Err: refused}
	}, testMachine("b1", 1, "x86_64-linux"))
	defer b.Close()
	b.mu.Lock()
	b.probeEvery = time.Millisecond // probe at each of the dispatcher's rounds
	b.mu.Unlock()
	c := newClient(b)
	bd := runTicket(b, try(t, b, c, "/nix/store/a.drv", false).Reservation)
	testbed.WaitFor(t, 5*time.Second, "the machine to be probed again for the waiting build", func() bool { return gets.Load() >= 3 })
	select {
	case <-bd.done:
		types, last := events(bd)
		t.Fatalf("the build ended within machine-wait after a transient failure: %v %+v", types, last)
	default:
	}
	clock.Advance(time.Hour)
	waitDone(t, bd)
	_, last := events(bd)
	if last.Kind != brokerapi.FailMisc || !strings.Contains(last.Error, "connection refused") || !strings.Contains(last.Error, "machine-wait (1h0m0s)") {
		t.Errorf("last event %+v, want the refused connection and machine-wait", last)
	}
	checkIdle(t, b)
}
