package wire

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

// fuzzLimits are the limits a fuzz program can pick, small enough for the
// fuzzer to reach and cross.
var fuzzLimits = [4]int{0, 3, 8, 64}

// FuzzReader runs a program of reads over data: each byte of prog picks a
// primitive (low two bits) and a limit (next two). No read may panic. A
// read that succeeds consumes a whole number of words, respects its limit,
// and encodes back to exactly the bytes it consumed, so no two encodings
// read the same. A read that fails returns a *FormatError, io.EOF with
// nothing consumed at the end of the data, or io.ErrUnexpectedEOF, and the
// program stops there.
func FuzzReader(f *testing.F) {
	f.Add([]byte{3, 3, 3}, appendString(appendString(appendU64(nil, 2), "try"), "x86_64-linux"))
	f.Add([]byte{0, 1, 2 | 3<<2, 3 | 3<<2}, appendString(appendU64(appendU64(appendU64(nil, 7), 1), 64), "nine byte"))
	for _, tc := range valid {
		f.Add([]byte{0, 1, 2 | 1<<2, 3 | 3<<2}, hexBytes(tc.in))
	}
	f.Add([]byte{3 | 3<<2}, hexBytes("02 00 00 00 00 00 00 00  68 69 00 00 00 00 00 01"))
	f.Add([]byte{1}, appendU64(nil, 2))
	f.Fuzz(func(t *testing.T, prog, data []byte) {
		src := bytes.NewReader(data)
		r := NewReader(src)
		for _, op := range prog {
			start := len(data) - src.Len()
			limit := fuzzLimits[op>>2&3]
			var enc []byte
			var err error
			switch op & 3 {
			case 0:
				var v uint64
				v, err = r.Uint64()
				enc = appendU64(nil, v)
			case 1:
				var v bool
				v, err = r.Bool()
				if v {
					enc = appendU64(nil, 1)
				} else {
					enc = appendU64(nil, 0)
				}
			case 2:
				var n int
				n, err = r.Count(limit)
				if err == nil && n > limit {
					t.Fatalf("count %d over limit %d", n, limit)
				}
				enc = appendU64(nil, uint64(n))
			case 3:
				var s string
				s, err = r.String(limit)
				if err == nil && len(s) > limit {
					t.Fatalf("string of %d bytes over limit %d", len(s), limit)
				}
				enc = appendString(nil, s)
			}
			end := len(data) - src.Len()
			if err != nil {
				switch {
				case errors.As(err, new(*FormatError)):
				case err == io.EOF:
					if start != len(data) || end != start {
						t.Fatalf("io.EOF at %d of %d, after consuming %d bytes", start, len(data), end-start)
					}
				case err == io.ErrUnexpectedEOF:
					if end != len(data) {
						t.Fatalf("io.ErrUnexpectedEOF at %d of %d", end, len(data))
					}
				default:
					t.Fatalf("error of type %T: %v", err, err)
				}
				return
			}
			if got := data[start:end]; !bytes.Equal(got, enc) {
				t.Fatalf("op %#x read % x, which encodes back as % x", op, got, enc)
			}
		}
	})
}
