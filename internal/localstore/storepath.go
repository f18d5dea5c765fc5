package localstore

import (
	"fmt"
	"strings"

	"github.com/nix-community/go-nix/pkg/nixbase32"
)

// storePathHashLen is the length of the hash part of a store path's base
// name: 20 bytes in Nix's base-32.
const storePathHashLen = 32

// maxStorePathNameLen is the longest name after the hash Nix accepts (nix
// 2.8.0 src/libstore/path.cc checkName).
const maxStorePathNameLen = 211

// checkStorePath checks that p is a store path directly under storeDir, with
// the syntax Nix's StorePath constructor demands (nix 2.8.0
// src/libstore/path.cc), and returns its base name. Paths come from a build
// machine, which may be hostile: whatever passes can be joined to a store
// directory without escaping it (no "/", no "..", one component), and can be
// written on a line of `nix-store --register-validity` input (no newline).
func checkStorePath(storeDir, p string) (string, error) {
	base, ok := strings.CutPrefix(p, storeDir+"/")
	if !ok {
		return "", fmt.Errorf("%q is not in %s", p, storeDir)
	}
	if len(base) < storePathHashLen+2 || base[storePathHashLen] != '-' {
		return "", fmt.Errorf("%q is not a store path (%s/<32-character hash>-<name>)", p, storeDir)
	}
	for i := range storePathHashLen {
		if c := base[i]; !nixbase32.Is(c) {
			return "", fmt.Errorf("store path %q: hash contains illegal character %q", p, c)
		}
	}
	name := base[storePathHashLen+1:]
	if len(name) > maxStorePathNameLen {
		return "", fmt.Errorf("store path %q: name is longer than %d characters", p, maxStorePathNameLen)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || strings.IndexByte("+-._?=", c) >= 0) {
			return "", fmt.Errorf("store path %q: name contains illegal character %q", p, c)
		}
	}
	return base, nil
}
