package scheduler_test

import (
	"fmt"

	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/scheduler"
)

func Example() {
	ms := []machines.Machine{
		{Host: "b1", Systems: []string{"x86_64-linux"}, ParallelBuilds: 4, Speed: 1, Enabled: true},
		{Host: "b2", Systems: []string{"x86_64-linux"}, ParallelBuilds: 8, Speed: 2, Enabled: true, Features: []string{"kvm"}},
	}
	load := map[string]int{"b1": 1, "b2": 4} // from slots.Dir.Load
	show := func(req scheduler.Request, load map[string]int) {
		d := scheduler.Decide(ms, req, load, nil)
		fmt.Print("# ", d.Verdict)
		for _, m := range d.Candidates {
			fmt.Print(" ", m.Name())
		}
		if d.Reason != "" {
			fmt.Print(": ", d.Reason)
		}
		fmt.Println()
	}

	show(scheduler.Request{System: "x86_64-linux", AmWilling: true}, load)
	show(scheduler.Request{System: "x86_64-linux", RequiredFeatures: []string{"kvm"}, AmWilling: true}, load)
	show(scheduler.Request{System: "aarch64-linux", AmWilling: true}, load)
	show(scheduler.Request{System: "x86_64-linux", RequiredFeatures: []string{"nixos-test"}}, load)
	full := map[string]int{"b1": 4, "b2": 8}
	show(scheduler.Request{System: "x86_64-linux", AmWilling: true}, full)
	show(scheduler.Request{System: "x86_64-linux", AmWilling: false}, full)
	// Output:
	// # accept b1 b2
	// # accept b2
	// # decline: no machine supports system "aarch64-linux" (configured: x86_64-linux on b1, b2)
	// # decline: requires features {nixos-test} that no machine supports
	// # decline: all 2 capable machines are busy (b1 4/4, b2 8/8); building locally
	// # postpone: all 2 capable machines are busy (b1 4/4, b2 8/8); waiting for a free slot, as this host cannot build it
}
