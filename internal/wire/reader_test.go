package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math"
	"runtime"
	"strings"
	"testing"
)

// The encoding is written out here by hand, as Nix's writeString does
// (nix 2.8.0 src/libutil/serialise.cc), independently of the Reader.

func appendU64(b []byte, v uint64) []byte { return binary.LittleEndian.AppendUint64(b, v) }

func appendString(b []byte, s string) []byte {
	b = appendU64(b, uint64(len(s)))
	b = append(b, s...)
	return append(b, make([]byte, (8-len(s)%8)%8)...)
}

func hexBytes(s string) []byte {
	var b []byte
	for _, f := range strings.Fields(s) {
		var v byte
		for _, c := range f {
			v = v<<4 | byte(strings.IndexRune("0123456789abcdef", c))
		}
		b = append(b, v)
	}
	return b
}

// A primitive read, with what it returned as a comparable value.
type read struct {
	name string
	do   func(r *Reader) (any, error)
}

func readU64() read {
	return read{"Uint64", func(r *Reader) (any, error) { return r.Uint64() }}
}

func readBool() read {
	return read{"Bool", func(r *Reader) (any, error) { return r.Bool() }}
}

func readCount(limit int) read {
	return read{"Count", func(r *Reader) (any, error) { return r.Count(limit) }}
}

func readString(limit int) read {
	return read{"String", func(r *Reader) (any, error) { return r.String(limit) }}
}

var valid = []struct {
	read read
	in   string // hex
	want any
}{
	{readU64(), "00 00 00 00 00 00 00 00", uint64(0)},
	{readU64(), "05 00 00 00 00 00 00 00", uint64(5)},
	{readU64(), "01 02 03 04 05 06 07 08", uint64(0x0807060504030201)},
	{readU64(), "ff ff ff ff ff ff ff ff", uint64(math.MaxUint64)},
	{readBool(), "00 00 00 00 00 00 00 00", false},
	{readBool(), "01 00 00 00 00 00 00 00", true},
	{readCount(0), "00 00 00 00 00 00 00 00", 0},
	{readCount(3), "03 00 00 00 00 00 00 00", 3},
	{readString(0), "00 00 00 00 00 00 00 00", ""},
	{readString(3), "03 00 00 00 00 00 00 00  74 72 79 00 00 00 00 00", "try"},
	{readString(8), "08 00 00 00 00 00 00 00  65 69 67 68 74 38 38 38", "eight888"},
	{readString(64), "09 00 00 00 00 00 00 00  6e 69 6e 65 20 62 79 74  65 00 00 00 00 00 00 00", "nine byte"},
	{readString(64), "02 00 00 00 00 00 00 00  ff 00 00 00 00 00 00 00", "\xff\x00"}, // not UTF-8
}

// Each read returns the value and consumes exactly its bytes: what follows
// is left for the next reader of the stream.
func TestReadValid(t *testing.T) {
	tail := []byte("rest of the stream")
	for _, tc := range valid {
		in := hexBytes(tc.in)
		src := bytes.NewReader(append(in, tail...))
		got, err := tc.read.do(NewReader(src))
		if err != nil || got != tc.want {
			t.Errorf("%s of % x: got %#v, %v; want %#v", tc.read.name, in, got, err, tc.want)
		}
		if rest, _ := io.ReadAll(src); !bytes.Equal(rest, tail) {
			t.Errorf("%s of % x: left %q, want %q", tc.read.name, in, rest, tail)
		}
	}
}

// Strings longer than a chunk arrive whole; so does one of exactly the
// limit.
func TestReadLongString(t *testing.T) {
	for _, n := range []int{ReadChunk - 1, ReadChunk, ReadChunk + 1, 3*ReadChunk + 5} {
		want := strings.Repeat("x", n-1) + "y"
		got, err := NewReader(bytes.NewReader(appendString(nil, want))).String(n)
		if err != nil || got != want {
			t.Errorf("%d bytes: got %d bytes, %v", n, len(got), err)
		}
	}
}

func TestReadRejects(t *testing.T) {
	for _, tc := range []struct {
		read read
		in   []byte
		want string
	}{
		{readBool(), appendU64(nil, 2), "value 2 is neither 0 nor 1"},
		{readBool(), appendU64(nil, 1<<63), "value 9223372036854775808 is neither 0 nor 1"},
		{readCount(8), appendU64(nil, 9), "9 exceeds 8"},
		{readCount(4096), appendU64(nil, 1<<60), "1152921504606846976 exceeds 4096"},
		{readCount(-1), appendU64(nil, 0), "0 exceeds -1"},
		{readString(10), appendString(nil, "eleven byte"), "length 11 exceeds 10"},
		{readString(4096), appendU64(nil, 1<<60), "length 1152921504606846976 exceeds 4096"},
		{readString(math.MaxInt), appendU64(nil, math.MaxUint64), "length 18446744073709551615 exceeds 9223372036854775807"},
		{readString(-1), appendU64(nil, 0), "length 0 exceeds -1"},
		{readString(10), hexBytes("02 00 00 00 00 00 00 00  68 69 00 00 00 00 00 01"), "non-zero padding 00 00 00 00 00 01"},
		{readString(10), hexBytes("07 00 00 00 00 00 00 00  73 65 76 65 6e 21 21 80"), "non-zero padding 80"},
	} {
		_, err := tc.read.do(NewReader(bytes.NewReader(tc.in)))
		var fe *FormatError
		if !errors.As(err, &fe) || err.Error() != tc.want {
			t.Errorf("%s of % x: got %v (%T), want a *FormatError %q", tc.read.name, tc.in, err, err, tc.want)
		}
	}
}

// A stream that ends before a value is io.EOF itself; one that ends inside
// it, at any byte, io.ErrUnexpectedEOF, never a FormatError.
func TestReadTruncated(t *testing.T) {
	for _, tc := range valid {
		in := hexBytes(tc.in)
		for n := range len(in) {
			_, err := tc.read.do(NewReader(bytes.NewReader(in[:n])))
			switch {
			case n == 0 && err != io.EOF:
				t.Errorf("%s of nothing: got %v, want io.EOF", tc.read.name, err)
			case n > 0 && (!errors.Is(err, io.ErrUnexpectedEOF) || errors.As(err, new(*FormatError))):
				t.Errorf("%s cut at %d of % x: got %v (%T), want io.ErrUnexpectedEOF", tc.read.name, n, in, err, err)
			}
		}
	}
}

// failingReader returns its bytes, then err.
type failingReader struct {
	b   []byte
	err error
}

func (r *failingReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, r.err
	}
	n := copy(p, r.b)
	r.b = r.b[n:]
	return n, nil
}

// Other errors of the underlying reader come back as they are, wherever
// they happen.
func TestReadPassesErrorsThrough(t *testing.T) {
	boom := errors.New("boom")
	in := appendString(nil, "nine byte")
	for n := range len(in) {
		_, err := NewReader(&failingReader{b: in[:n], err: boom}).String(64)
		if err != boom {
			t.Errorf("failing after %d bytes: got %v, want boom itself", n, err)
		}
	}
}

func TestPadLen(t *testing.T) {
	for n, want := range []int{0, 7, 6, 5, 4, 3, 2, 1, 0, 7} {
		if got := PadLen(uint64(n)); got != want {
			t.Errorf("PadLen(%d) = %d, want %d", n, got, want)
		}
	}
	if got := PadLen(math.MaxUint64); got != 1 {
		t.Errorf("PadLen(2^64-1) = %d, want 1", got)
	}
}

// bytesPerRun returns how many bytes f allocates per call, on average.
func bytesPerRun(runs int, f func()) uint64 {
	f() // warm up
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range runs {
		f()
	}
	runtime.ReadMemStats(&after)
	return (after.TotalAlloc - before.TotalAlloc) / uint64(runs)
}

// A length over the limit is refused before anything is allocated for it,
// and a length within a huge limit costs one chunk when the bytes do not
// come.
func TestReadNoHugeAllocation(t *testing.T) {
	over := appendU64(nil, 1<<60)
	perRun := bytesPerRun(100, func() {
		_, err := NewReader(bytes.NewReader(over)).String(4096)
		if !errors.As(err, new(*FormatError)) {
			t.Fatalf("2^60 over a limit of 4096: %v", err)
		}
	})
	if perRun > 1024 {
		t.Errorf("refusing a 2^60 length costs %d bytes", perRun)
	}

	if math.MaxInt < 1<<40 {
		t.Skip("int is too small for a 2^40 limit")
	}
	claim := appendU64(nil, 1<<40)
	claim = append(claim, "only these bytes arrive"...)
	perRun = bytesPerRun(20, func() {
		_, err := NewReader(bytes.NewReader(claim)).String(math.MaxInt)
		if !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("truncated 2^40-byte string: %v", err)
		}
	})
	if perRun > 1<<20 {
		t.Errorf("a truncated 2^40-byte string costs %d bytes, want at most about one %d-byte chunk", perRun, ReadChunk)
	}
}
