package metrics_test

import (
	"fmt"
	"os"

	"github.com/nix-offload/nix-offload/internal/metrics"
)

// A broker's metrics: a counter updated as builds finish, and the slots in use read from the
// scheduler's own state only when Prometheus asks.
func Example() {
	reg := metrics.NewRegistry()
	builds := reg.Counter("nix_offload_builds_total", "Builds finished, by machine and outcome.", "machine", "outcome")
	used := map[string]int{"root@b1:22": 3, "root@b2:22": 0}
	reg.GaugeFunc("nix_offload_slots_used", "Builds running on each machine.", func() []metrics.Sample {
		var s []metrics.Sample
		for m, n := range used {
			s = append(s, metrics.Sample{Labels: []string{m}, Value: float64(n)})
		}
		return s
	}, "machine")

	builds.With("root@b1:22", "success").Inc()
	builds.With("root@b1:22", "success").Inc()
	builds.With("root@b2:22", "failure").Inc()

	if err := reg.WriteText(os.Stdout); err != nil {
		fmt.Println(err)
	}
	// Output:
	// # HELP nix_offload_builds_total Builds finished, by machine and outcome.
	// # TYPE nix_offload_builds_total counter
	// nix_offload_builds_total{machine="root@b1:22",outcome="success"} 2
	// nix_offload_builds_total{machine="root@b2:22",outcome="failure"} 1
	// # HELP nix_offload_slots_used Builds running on each machine.
	// # TYPE nix_offload_slots_used gauge
	// nix_offload_slots_used{machine="root@b1:22"} 3
	// nix_offload_slots_used{machine="root@b2:22"} 0
}
