package wire

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"slices"
)

// ReadChunk is how many bytes [Reader.String] allocates ahead of the bytes
// that have actually arrived.
const ReadChunk = 64 << 10

// FormatError reports bytes that break the wire format. After one, the
// stream is out of step.
type FormatError struct {
	// Msg says what was wrong and names no field, which only the caller
	// knows: "length 9000 exceeds 4096", "non-zero padding 00 01",
	// "value 2 is neither 0 nor 1", and for a count "9000 exceeds 4096".
	Msg string
}

// Error returns Msg alone: the caller wraps it with what it was reading.
func (e *FormatError) Error() string { return e.Msg }

func formatErrorf(format string, args ...any) error {
	return &FormatError{Msg: fmt.Sprintf(format, args...)}
}

// Reader reads wire primitives from an io.Reader. It reads exactly the
// bytes of each value, never more, and keeps nothing between calls, so the
// underlying reader can be shared with other readers (a bufio.Reader whose
// Buffered count stays meaningful, a NAR parser that reads on from the same
// stream).
//
// Errors are as the package documentation describes: a [*FormatError] for
// bad bytes; io.EOF when the stream ends before a value starts;
// io.ErrUnexpectedEOF when it ends inside one; other errors of the
// underlying reader as they are.
type Reader struct {
	r   io.Reader
	buf [8]byte
}

// NewReader returns a Reader that reads from r.
func NewReader(r io.Reader) *Reader { return &Reader{r: r} }

// Uint64 reads a u64.
func (r *Reader) Uint64() (uint64, error) {
	if _, err := io.ReadFull(r.r, r.buf[:]); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(r.buf[:]), nil
}

// Bool reads a u64 that must be 0 or 1.
func (r *Reader) Bool() (bool, error) {
	v, err := r.Uint64()
	if err != nil {
		return false, err
	}
	switch v {
	case 0:
		return false, nil
	case 1:
		return true, nil
	}
	return false, formatErrorf("value %d is neither 0 nor 1", v)
}

// Count reads the size of a list, set or map, which must be at most limit.
// The caller reads the elements; it should not allocate for all of them at
// once, since limit is a bound, not a size anyone has sent yet.
func (r *Reader) Count(limit int) (int, error) {
	n, err := r.Uint64()
	if err != nil {
		return 0, err
	}
	if limit < 0 || n > uint64(limit) {
		return 0, formatErrorf("%d exceeds %d", n, limit)
	}
	return int(n), nil
}

// String reads a string of at most limit bytes and its padding, which must
// be zero. The length is checked before anything is allocated, and the
// buffer grows by at most [ReadChunk] bytes ahead of the data.
func (r *Reader) String(limit int) (string, error) {
	n, err := r.Uint64()
	if err != nil {
		return "", err
	}
	if limit < 0 || n > uint64(limit) {
		return "", formatErrorf("length %d exceeds %d", n, limit)
	}
	size := int(n) // fits: n ≤ limit
	buf := make([]byte, 0, min(size, ReadChunk))
	for len(buf) < size {
		k := min(size-len(buf), ReadChunk)
		buf = slices.Grow(buf, k)
		if _, err := io.ReadFull(r.r, buf[len(buf):len(buf)+k]); err != nil {
			return "", inside(err)
		}
		buf = buf[:len(buf)+k]
	}
	if p := PadLen(n); p > 0 {
		pad := r.buf[:p]
		if _, err := io.ReadFull(r.r, pad); err != nil {
			return "", inside(err)
		}
		if !bytes.Equal(pad, zeros[:p]) {
			return "", formatErrorf("non-zero padding % x", pad)
		}
	}
	return string(buf), nil
}

var zeros [8]byte

// PadLen returns how many zero bytes follow a string of n bytes: 0 to 7,
// up to the next multiple of 8.
func PadLen(n uint64) int { return int((8 - n%8) % 8) }

// inside turns io.EOF into io.ErrUnexpectedEOF for a read in the middle of
// a value.
func inside(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}
