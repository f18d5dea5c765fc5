package serveproto

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"github.com/nix-community/go-nix/pkg/nixbase32"
	"github.com/nix-community/go-nix/pkg/nixhash"
)

// storePathHashLen is the length of the hash part of a store path's base
// name: 20 bytes in Nix's base-32.
const storePathHashLen = 32

// maxStorePathNameLen is the longest name Nix accepts (nix 2.8.0
// src/libstore/path.cc checkName).
const maxStorePathNameLen = 211

// MakeSourcePath returns the store path Nix gives a content-addressed path
// that was added with recursive (NAR) SHA-256 hashing and has no
// references, as `nix-store --add` and `builtins.path` do: the hash part is
// the SHA-256 of "source:sha256:<hex of narSHA256>:/nix/store:<name>",
// XOR-folded to 20 bytes, in Nix's base-32 (nix 2.8.0
// src/libstore/store-api.cc makeStorePath, makeFixedOutputPath). Its
// content address is "fixed:r:sha256:<nix32 of narSHA256>".
func MakeSourcePath(name string, narSHA256 [32]byte) string {
	fp := "source:sha256:" + hex.EncodeToString(narSHA256[:]) + ":" + StoreDir + ":" + name
	h := sha256.Sum256([]byte(fp))
	return StoreDir + "/" + nixbase32.EncodeToString(nixhash.CompressHash(h[:], 20)) + "-" + name
}

// CheckStorePath reports whether p is a store path as Nix's StorePath
// constructor accepts it: /nix/store/<32-character hash>-<name>, one
// component, nothing to clean ("/nix/store/../../etc/passwd" is not one).
// Callers that take paths from a client (the broker's API) use it, so a
// path that passes can be opened or joined without escaping the store.
func CheckStorePath(p string) error { return checkStorePath(p) }

// CheckStorePathBase is [CheckStorePath] for a base name "<hash>-<name>".
func CheckStorePathBase(base string) error { return checkStorePathBase(base) }

// checkStorePath checks the syntax of a full store path as Nix's
// StorePath constructor does (nix 2.8.0 src/libstore/path.cc).
func checkStorePath(p string) error {
	base, ok := strings.CutPrefix(p, StoreDir+"/")
	if !ok {
		return fmt.Errorf("%q is not in %s", p, StoreDir)
	}
	return checkStorePathBase(base)
}

// checkStorePathBase checks a store path's base name "<hash>-<name>".
func checkStorePathBase(base string) error {
	if len(base) < storePathHashLen+2 || base[storePathHashLen] != '-' {
		return fmt.Errorf("%q is not a store path base name (<32-char hash>-<name>)", base)
	}
	for i := range storePathHashLen {
		if c := base[i]; !nixbase32.Is(c) {
			return fmt.Errorf("store path %q: hash contains illegal character %q", base, c)
		}
	}
	name := base[storePathHashLen+1:]
	if len(name) > maxStorePathNameLen {
		return fmt.Errorf("store path %q: name is longer than %d characters", base, maxStorePathNameLen)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || strings.IndexByte("+-._?=", c) >= 0) {
			return fmt.Errorf("store path %q: name contains illegal character %q", base, c)
		}
	}
	return nil
}

var errNotDrv = errors.New("derivation path does not end in .drv")
