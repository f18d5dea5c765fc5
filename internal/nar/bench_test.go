package nar

import (
	"bytes"
	"io"
	"strings"
	"testing"
)

// benchNAR is a 64 MiB NAR: 64 files of 1 MiB, or 64 Ki files of 1 KiB.
func benchNAR(files, size int) []byte {
	contents := strings.Repeat("x", size)
	var b bytes.Buffer
	b.Write(tokens("nix-archive-1", "(", "type", "directory"))
	for i := range files {
		name := strings.Repeat("0", 8-len(itoa(i))) + itoa(i)
		b.Write(tokens(entry(name, regular(contents))...))
	}
	b.Write(tokens(")"))
	return b.Bytes()
}

func BenchmarkCopy(b *testing.B) {
	for _, bc := range []struct {
		name        string
		files, size int
	}{
		{"1MiB-files", 64, 1 << 20},
		{"1KiB-files", 64 << 10, 1 << 10},
	} {
		nar := benchNAR(bc.files, bc.size)
		b.Run(bc.name, func(b *testing.B) {
			b.SetBytes(int64(len(nar)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := Copy(io.Discard, bytes.NewReader(nar), DefaultLimits); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
