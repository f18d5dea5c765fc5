package nar

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
)

const maxFuzzInput = 16 << 10

// FuzzReader feeds arbitrary bytes to the reader. It must never panic or
// hang; what it accepts it must copy exactly, stopping at the NAR's end, and
// what it accepts must restore to a tree that go-nix dumps back to the same
// bytes (so the reader accepts only canonical NARs).
func FuzzReader(f *testing.F) {
	paths, err := filepath.Glob("testdata/*.nar")
	if err != nil || len(paths) == 0 {
		f.Fatalf("no seeds in testdata: %v", err)
	}
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		// Large seeds make the fuzzer's minimisation crawl (each
		// candidate costs a parse, a Restore and a dump); too-deep.nar
		// has a small stand-in below.
		if len(b) <= maxFuzzInput {
			f.Add(b)
		}
	}
	f.Add(cat(exampleTokens, []byte("trailing bytes")))
	f.Add(deepNAR(33))

	lim := Limits{MaxDepth: 32, MaxEntries: 1000, MaxFileSize: 1 << 20, MaxNARSize: 4 << 20}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > maxFuzzInput {
			return
		}
		src := bytes.NewReader(data)
		var out bytes.Buffer
		st, err := Copy(&out, src, lim)
		if err != nil {
			var nerr *Error
			if !errors.As(err, &nerr) {
				t.Fatalf("error %v (%T) is not a *Error", err, err)
			}
			if nerr.Offset < 0 || nerr.Offset > int64(len(data)) {
				t.Fatalf("error offset %d outside the %d-byte input", nerr.Offset, len(data))
			}
			return
		}
		consumed := data[:len(data)-src.Len()]
		if !bytes.Equal(out.Bytes(), consumed) {
			t.Fatalf("Copy wrote %d bytes, not the %d it consumed", out.Len(), len(consumed))
		}
		if st.Size != int64(len(consumed)) || st.SHA256 != sha256.Sum256(consumed) {
			t.Fatalf("Stats %d bytes, want %d and their hash", st.Size, len(consumed))
		}

		// Next and Read agree with Copy.
		nr := NewReader(bytes.NewReader(data), lim)
		for {
			if _, err := nr.Next(); err == io.EOF {
				break
			} else if err != nil {
				t.Fatalf("Copy accepted what Next rejects: %v", err)
			}
			if _, err := io.Copy(io.Discard, nr); err != nil {
				t.Fatal(err)
			}
		}
		if nr.Stats() != st {
			t.Fatalf("Next/Read stats %v, Copy stats %v", nr.Stats(), st)
		}

		dst := filepath.Join(t.TempDir(), "out")
		if _, err := Restore(dst, bytes.NewReader(consumed), lim); err != nil {
			t.Fatalf("Restore of an accepted NAR: %v", err)
		}
		if again := dumpPath(t, dst); !bytes.Equal(again, consumed) {
			t.Fatalf("accepted NAR is not canonical: restored tree dumps to other bytes")
		}
	})
}
