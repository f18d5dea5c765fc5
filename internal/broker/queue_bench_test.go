package broker

import (
	"fmt"
	"runtime"
	"testing"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
)

// BenchmarkQueue1000 queues 1,000 builds behind one busy slot and reports
// the heap they hold and the cost of one dispatch pass while no slot is
// free (the event every finished build causes).
//
//	go test -run '^$' -bench Queue1000 -benchmem ./internal/broker/
func BenchmarkQueue1000(b *testing.B) {
	br := newTestBroker(b, testMachine("b1", 1, "x86_64-linux"))
	c := newClient(br)
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for i := range 1001 {
		resp, err := br.Try(brokerapi.TryRequest{DrvPath: fmt.Sprintf("/nix/store/%032d-x.drv", i), System: "x86_64-linux"}, c)
		if err != nil || resp.Verdict != brokerapi.Accept {
			b.Fatalf("try %d: %+v, %v", i, resp, err)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	heap := float64(after.HeapAlloc-before.HeapAlloc) / (1 << 20)
	b.ResetTimer()
	for range b.N {
		br.mu.Lock()
		br.dispatchLocked()
		br.mu.Unlock()
	}
	br.mu.Lock()
	if n := len(br.queue); n != 1000 {
		b.Errorf("%d queued, want 1000", n)
	}
	br.mu.Unlock()
	b.ReportMetric(heap, "MiB-heap/1000-queued")
}
