package wire_test

import (
	"bytes"
	"fmt"

	"github.com/nix-offload/nix-offload/internal/wire"
)

// Reading a list of strings: a count, then each string, every length
// checked against a limit the caller names.
func ExampleReader() {
	const (
		maxFeatures   = 16
		maxFeatureLen = 64
	)
	stream := []byte{
		2, 0, 0, 0, 0, 0, 0, 0, // count
		3, 0, 0, 0, 0, 0, 0, 0, 'k', 'v', 'm', 0, 0, 0, 0, 0,
		12, 0, 0, 0, 0, 0, 0, 0, 'b', 'i', 'g', '-', 'p', 'a', 'r', 'a', 'l', 'l', 'e', 'l', 0, 0, 0, 0,
		9, 0, 0, 0, 0, 0, 0, 0, // a 9-byte string, over the next limit
	}
	r := wire.NewReader(bytes.NewReader(stream))
	n, err := r.Count(maxFeatures)
	if err != nil {
		fmt.Println("count:", err)
		return
	}
	for i := range n {
		s, err := r.String(maxFeatureLen)
		if err != nil {
			fmt.Printf("feature %d: %v\n", i, err)
			return
		}
		fmt.Printf("feature %d: %q\n", i, s)
	}
	_, err = r.String(8)
	fmt.Println("next:", err)
	// Output:
	// feature 0: "kvm"
	// feature 1: "big-parallel"
	// next: length 9 exceeds 8
}
