package slots_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/scheduler"
	"github.com/nix-offload/nix-offload/internal/slots"
)

// How a hook without a broker picks a machine and takes its slot: count, decide and acquire
// under the main lock, then build with the lock released and the slot held.
func Example() {
	state, err := os.MkdirTemp("", "state")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(state)
	d, err := slots.Open(filepath.Join(state, "slots"))
	if err != nil {
		log.Fatal(err)
	}
	ms := []machines.Machine{
		{Host: "b1", Systems: []string{"x86_64-linux"}, ParallelBuilds: 1, Speed: 1, Enabled: true},
		{Host: "b2", Systems: []string{"x86_64-linux"}, ParallelBuilds: 1, Speed: 1, Enabled: true},
	}
	req := scheduler.Request{System: "x86_64-linux", AmWilling: true}

	take := func() *slots.Slot {
		unlock, err := d.Lock(context.Background())
		if err != nil {
			log.Fatal(err)
		}
		defer unlock()
		load, err := d.Load(ms)
		if err != nil {
			log.Fatal(err)
		}
		dec := scheduler.Decide(ms, req, load, nil)
		for _, m := range dec.Candidates {
			s, ok, err := d.Acquire(m)
			if err != nil {
				log.Fatal(err)
			}
			if ok {
				fmt.Printf("# accept: %s slot %d\n", s.Machine(), s.Index())
				return s
			}
		}
		fmt.Printf("# %s: %s\n", dec.Verdict, dec.Reason)
		return nil
	}

	first, second := take(), take()
	take()
	first.Release()
	take().Release()
	second.Release()
	// Output:
	// # accept: b1 slot 0
	// # accept: b2 slot 0
	// # decline: all 2 capable machines are busy (b1 1/1, b2 1/1); building locally
	// # accept: b1 slot 0
}
