package servetest

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"slices"
	"strings"

	"github.com/nix-community/go-nix/pkg/nixbase32"

	"github.com/nix-offload/nix-offload/internal/wire"
)

// Enc writes wire values by hand: every integer a little-endian u64, every
// string its length, its bytes and zero padding to a multiple of 8. Its
// methods return the Enc, so a message is one expression:
//
//	new(servetest.Enc).U64(1<<62).Bytes() // a count nobody could send
type Enc struct{ buf bytes.Buffer }

// U64 writes each value as a u64.
func (e *Enc) U64(vs ...uint64) *Enc {
	for _, v := range vs {
		e.buf.Write(binary.LittleEndian.AppendUint64(nil, v))
	}
	return e
}

// Bool writes 1 or 0.
func (e *Enc) Bool(b bool) *Enc {
	if b {
		return e.U64(1)
	}
	return e.U64(0)
}

// Str writes each string with its length and padding.
func (e *Enc) Str(ss ...string) *Enc {
	for _, s := range ss {
		e.U64(uint64(len(s)))
		e.buf.WriteString(s)
		e.buf.Write(make([]byte, wire.PadLen(uint64(len(s)))))
	}
	return e
}

// Strs writes a list: its count, then the strings in the given order.
func (e *Enc) Strs(ss []string) *Enc {
	e.U64(uint64(len(ss)))
	return e.Str(ss...)
}

// Set writes a set as Nix does: sorted byte-wise, without duplicates.
func (e *Enc) Set(ss []string) *Enc {
	s := slices.Clone(ss)
	slices.Sort(s)
	return e.Strs(slices.Compact(s))
}

// Raw writes bytes as they are.
func (e *Enc) Raw(b []byte) *Enc {
	e.buf.Write(b)
	return e
}

// Bytes returns a copy of what was written.
func (e *Enc) Bytes() []byte { return bytes.Clone(e.buf.Bytes()) }

// Len is a bare u64 in a [NAR]: a length written without the bytes it
// announces, such as the 2^62-byte file a hostile machine claims to send.
type Len uint64

// NAR writes a hand-made NAR, token by token: a string is a wire string, a
// [Len] a bare u64, a []byte raw bytes, and a []any more tokens, so nodes
// can be built by functions. No check is made, so it writes anything a
// hostile machine could send:
//
//	servetest.NAR("nix-archive-1", "(", "type", "directory",
//		"entry", "(", "name", "..", "node", "(", "type", "regular", "contents", "x", ")", ")",
//		")")
func NAR(tokens ...any) []byte {
	var e Enc
	writeTokens(&e, tokens)
	return e.Bytes()
}

func writeTokens(e *Enc, tokens []any) {
	for _, t := range tokens {
		switch t := t.(type) {
		case string:
			e.Str(t)
		case Len:
			e.U64(uint64(t))
		case []byte:
			e.Raw(t)
		case []any:
			writeTokens(e, t)
		default:
			panic(fmt.Sprintf("servetest.NAR: token of type %T", t))
		}
	}
}

// FileNAR returns the canonical NAR of a regular file.
func FileNAR(contents string) []byte {
	return NAR("nix-archive-1", "(", "type", "regular", "contents", contents, ")")
}

// StoreDir is the store directory the protocol speaks about.
const StoreDir = "/nix/store"

// checkStorePath checks the syntax of a full store path as Nix's StorePath
// constructor does (nix 2.8.0 src/libstore/path.cc), and as package
// serveproto checks what it sends: "/nix/store/", 32 characters of Nix
// base-32, "-", a name of 1 to 211 characters from [0-9a-zA-Z+-._?=].
func checkStorePath(p string) error {
	base, ok := strings.CutPrefix(p, StoreDir+"/")
	if !ok {
		return fmt.Errorf("path %q is not in %s", p, StoreDir)
	}
	const hashLen = 32
	if len(base) < hashLen+2 || base[hashLen] != '-' {
		return fmt.Errorf("path %q is not a store path", p)
	}
	for i := range hashLen {
		if !nixbase32.Is(base[i]) {
			return fmt.Errorf("store path %q: hash contains illegal character %q", p, base[i])
		}
	}
	name := base[hashLen+1:]
	if len(name) > 211 {
		return fmt.Errorf("store path %q: name is longer than 211 characters", p)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || strings.IndexByte("+-._?=", c) >= 0) {
			return fmt.Errorf("store path %q: name contains illegal character %q", p, c)
		}
	}
	return nil
}
