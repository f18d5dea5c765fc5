package health_test

import (
	"errors"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"time"

	"github.com/nix-offload/nix-offload/internal/health"
)

// Two processes on one host: the first fails to reach a machine, and the second, started
// later, skips it; when the machine is the only one that can build, the second may still
// probe it, at most once per interval.
func Example() {
	state, err := os.MkdirTemp("", "state")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(state)
	path := filepath.Join(state, "health.json")

	first, err := health.Open(path)
	if err != nil {
		log.Print(err) // first works anyway
	}
	s, _ := first.Failed("root@b1:22", errors.New("connect: connection refused"))
	fmt.Println("failures:", s.Failures, "down for at least a minute:", time.Until(s.Until) > 59*time.Second)

	second, err := health.Open(path)
	if err != nil {
		log.Print(err)
	}
	_, down := second.Down()["root@b1:22"]
	fmt.Println("down for the second process:", down)
	ok, _ := second.Probe("root@b1:22", 0)
	fmt.Println("probe now:", ok)
	ok, _ = second.Probe("root@b1:22", time.Minute)
	fmt.Println("probe again within a minute:", ok)

	second.Succeeded("root@b1:22")
	first.Reload()
	fmt.Println("down after a success:", len(first.Down()) > 0)
	// Output:
	// failures: 1 down for at least a minute: true
	// down for the second process: true
	// probe now: true
	// probe again within a minute: false
	// down after a success: false
}
