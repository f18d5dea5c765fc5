//go:build !linux

package localstore

import "runtime"

// canonicalise is written for Linux only (elsewhere Nix also clears file
// flags, for one): elsewhere outputs are left to nix-store, which
// DirectDBDir arranges by returning "".
func canonicalise(string) error {
	return &errNotDirect{"canonicalising files is written for Linux only, not " + runtime.GOOS}
}
