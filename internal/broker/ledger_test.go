package broker

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/slots"
)

// The broker and hooks working alone keep one slot ledger, the host's slot
// files: a slot the broker grants is a held file that a hook alone counts,
// and a slot a hook alone holds is one the broker does not grant. Before,
// the broker counted in memory only, so after it handed queued builds back
// on stop, hooks alone took the files of slots its running builds held and
// a machine ran twice its parallel-builds.
func TestOneSlotLedger(t *testing.T) {
	dir := t.TempDir()
	sl, err := slots.Open(filepath.Join(dir, "slots"))
	if err != nil {
		t.Fatal(err)
	}
	m := testMachine("b1", 2, "x86_64-linux")
	b := New(testOptions(t, Options{Config: &machines.Config{Machines: []machines.Machine{m}}, Slots: sl}))
	defer b.Close()
	c := newClient(b)

	loadOf := func() int {
		t.Helper()
		unlock, err := sl.Lock(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		defer unlock()
		load, err := sl.Load([]machines.Machine{m})
		if err != nil {
			t.Fatal(err)
		}
		return load[m.Name()]
	}

	if r := try(t, b, c, "/nix/store/a.drv", false); r.Queued || r.Machine != m.Name() {
		t.Fatalf("first try: %+v, want b1", r)
	}
	if got := loadOf(); got != 1 {
		t.Errorf("a hook alone counts %d slots of b1 held, want the broker's 1", got)
	}
	// A hook working alone takes the other slot: the broker must not grant it.
	s, ok, err := sl.Acquire(m)
	if err != nil || !ok {
		t.Fatalf("a hook alone could not take b1's second slot: %v", err)
	}
	if r := try(t, b, c, "/nix/store/b.drv", false); !r.Queued {
		t.Errorf("second try with the last slot held by a hook alone: %+v, want queued", r)
	}
	if got := used(b); got != 1 {
		t.Errorf("broker holds %d slots, want 1", got)
	}
	s.Release()
	c.close()
	if got := loadOf(); got != 0 {
		t.Errorf("after the broker's client went away: %d slot files held, want 0", got)
	}
}

// Slot files that cannot be made (a full or read-only state directory)
// leave the broker's own count as the ledger: it grants up to
// parallel-builds and queues the rest. Before, every grant failed and
// every build waited in the queue for good.
func TestSlotFilesUnusable(t *testing.T) {
	dir := t.TempDir()
	sl, err := slots.Open(filepath.Join(dir, "slots"))
	if err != nil {
		t.Fatal(err)
	}
	// Its path taken by a file: no slot file can be made in it.
	if err := os.RemoveAll(sl.Path()); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(sl.Path(), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	b := New(testOptions(t, Options{Config: &machines.Config{Machines: []machines.Machine{testMachine("b1", 2, "x86_64-linux")}}, Slots: sl}))
	defer b.Close()
	c := newClient(b)
	defer c.close()
	for i, want := range []bool{false, false, true} {
		if r := try(t, b, c, fmt.Sprintf("/nix/store/%d.drv", i), false); r.Queued != want {
			t.Errorf("try %d: %+v, want queued %v", i, r, want)
		}
	}
	if got := used(b); got != 2 {
		t.Errorf("broker holds %d slots, want 2", got)
	}
}
