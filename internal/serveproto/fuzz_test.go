package serveproto

import (
	"errors"
	"strings"
	"testing"
)

// checkReadErr fails unless err is one of the two kinds a reply reader may
// return.
func checkReadErr(t *testing.T, err error) {
	var pe *ProtocolError
	var se *StreamError
	if !errors.As(err, &pe) && !errors.As(err, &se) {
		t.Fatalf("error of type %T: %v", err, err)
	}
}

// FuzzReadBuildResult reads BuildResults back to back, as the golden files
// hold them, with the layout of the given server minor version. It must
// never panic, and whatever it accepts must hold only valid store paths and
// no escape sequences.
func FuzzReadBuildResult(f *testing.F) {
	for _, s := range []struct {
		file  string
		minor uint8
	}{
		{"build-result-2.2.bin", 2},
		{"build-result-2.3.bin", 3},
		{"build-result-2.6.bin", 6},
		{"build-result-2.7-compat.bin", 7},
	} {
		f.Add(golden(f, s.file), s.minor)
	}
	f.Fuzz(func(t *testing.T, b []byte, minor uint8) {
		d := testDecoder(b, "BuildDerivation")
		for {
			r, err := readBuildResult(d, int(minor))
			if err != nil {
				checkReadErr(t, err)
				return
			}
			if strings.Contains(r.ErrorMsg, "\x1b") {
				t.Fatalf("escape left in %q", r.ErrorMsg)
			}
			for name, p := range r.BuiltOutputs {
				if name == "" || checkStorePath(p) != nil {
					t.Fatalf("accepted output %q = %q", name, p)
				}
			}
		}
	})
}

// FuzzReadPathInfos reads a QueryPathInfos reply to a request for the
// paths of Nix's golden files, with the layout of the given server minor
// version. Seeds: the golden records, each keyed by a path and followed by
// the terminating "".
func FuzzReadPathInfos(f *testing.F) {
	requested := []string{pathFoo, pathBar, pathA, pathB}
	seed := func(file string, minor uint8) {
		// Cut the golden file into its two records by reading it.
		b := golden(f, file)
		d := testDecoder(b, "QueryPathInfos")
		if _, err := readPathInfo(d, "info", int(minor)); err != nil {
			f.Fatal(err)
		}
		first := len(b) - d.r.Buffered()
		seed := new(wb).s(pathFoo).raw(b[:first]).s(pathBar).raw(b[first:]).s("").b()
		op := &queryPathInfosOp{Paths: requested, minor: int(minor)}
		if err := op.readReply(testDecoder(seed, "QueryPathInfos")); err != nil || len(op.Infos) != 2 {
			f.Fatalf("seed from %s: %d records, %v", file, len(op.Infos), err)
		}
		f.Add(seed, minor)
	}
	seed("unkeyed-valid-path-info-2.3.bin", 3)
	seed("unkeyed-valid-path-info-2.4.bin", 4)
	f.Fuzz(func(t *testing.T, b []byte, minor uint8) {
		op := &queryPathInfosOp{Paths: requested, minor: int(minor)}
		err := op.readReply(testDecoder(b, "QueryPathInfos"))
		if err != nil {
			checkReadErr(t, err)
			return
		}
		if len(op.Infos) > len(requested) {
			t.Fatalf("%d records for %d paths", len(op.Infos), len(requested))
		}
		for _, info := range op.Infos {
			for _, p := range append([]string{info.Path}, info.References...) {
				if checkStorePath(p) != nil {
					t.Fatalf("accepted path %q", p)
				}
			}
		}
	})
}
