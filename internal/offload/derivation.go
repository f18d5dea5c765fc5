package offload

import (
	"io"
	"strings"

	"github.com/nix-community/go-nix/pkg/derivation"
)

// ReadDerivation parses a .drv file (Nix's ATerm format) with go-nix and
// repairs what go-nix leaves escaped.
//
// go-nix (v0.0.0-20250101154619) unescapes environment values only: the
// builder's arguments, the builder, the system, environment keys and the
// output fields keep their ATerm escapes (`\"`, `\\`, `\n`, `\t`, `\r`). A
// build script with a quote or a newline in it would reach the machine
// altered. Nix writes those escapes in every string of a .drv (nix 2.8.0
// src/libstore/derivations.cc printString), so we undo them in every field.
// Environment values are left as go-nix returned them: they are correct.
func ReadDerivation(r io.Reader) (*derivation.Derivation, error) {
	d, err := derivation.ReadDerivation(r)
	if err != nil {
		return nil, err
	}
	for i, a := range d.Arguments {
		d.Arguments[i] = unescapeATerm(a)
	}
	d.Builder = unescapeATerm(d.Builder)
	d.Platform = unescapeATerm(d.Platform)
	for k, v := range d.Env {
		if u := unescapeATerm(k); u != k {
			delete(d.Env, k)
			d.Env[u] = v
		}
	}
	for _, o := range d.Outputs {
		if o != nil {
			o.Path, o.HashAlgorithm, o.Hash = unescapeATerm(o.Path), unescapeATerm(o.HashAlgorithm), unescapeATerm(o.Hash)
		}
	}
	return d, nil
}

// RequiredFeatures reads requiredSystemFeatures from a derivation's
// environment, as Nix does for a derivation without structured attributes.
func RequiredFeatures(d *derivation.Derivation) []string {
	return strings.Fields(d.Env["requiredSystemFeatures"])
}

// unescapeATerm undoes Nix's string escaping in .drv files: a backslash
// followed by n, r or t is that control character, followed by anything
// else is that character (nix 2.8.0 src/libstore/derivations.cc parseString).
func unescapeATerm(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	b.Grow(len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c != '\\' || i+1 == len(s) {
			b.WriteByte(c)
			continue
		}
		i++
		switch s[i] {
		case 'n':
			b.WriteByte('\n')
		case 'r':
			b.WriteByte('\r')
		case 't':
			b.WriteByte('\t')
		default:
			b.WriteByte(s[i])
		}
	}
	return b.String()
}
