package wire

import (
	"bufio"
	"encoding/binary"
	"slices"
)

// Writer writes wire primitives to a buffered writer, as Nix's Sink
// operator<< does (nix 2.8.0 src/libutil/serialise.cc writeString,
// writeStrings). The first error is kept: later writes are skipped, and
// [Writer.Flush] and [Writer.Err] report it, so a request can be written
// without checking every field.
type Writer struct {
	w   *bufio.Writer
	err error
	buf [8]byte
}

// NewWriter returns a Writer that writes to w.
func NewWriter(w *bufio.Writer) *Writer { return &Writer{w: w} }

// Write writes raw bytes (a NAR, a frame's contents) unless an earlier
// write failed.
func (e *Writer) Write(p []byte) (int, error) {
	if e.err != nil {
		return 0, e.err
	}
	n, err := e.w.Write(p)
	if err != nil {
		e.err = err
	}
	return n, err
}

// Uint64 writes a u64.
func (e *Writer) Uint64(v uint64) {
	binary.LittleEndian.PutUint64(e.buf[:], v)
	e.Write(e.buf[:])
}

// Bool writes 1 or 0.
func (e *Writer) Bool(b bool) {
	if b {
		e.Uint64(1)
	} else {
		e.Uint64(0)
	}
}

// String writes a string: its length, its bytes, zero padding.
func (e *Writer) String(s string) {
	e.Uint64(uint64(len(s)))
	if e.err != nil {
		return
	}
	if _, err := e.w.WriteString(s); err != nil {
		e.err = err
		return
	}
	if p := PadLen(uint64(len(s))); p > 0 {
		e.Write(zeros[:p])
	}
}

// Strings writes a list in the given order.
func (e *Writer) Strings(ss []string) {
	e.Uint64(uint64(len(ss)))
	for _, s := range ss {
		e.String(s)
	}
}

// Set writes a set as Nix does: sorted byte-wise, without duplicates.
func (e *Writer) Set(ss []string) {
	s := slices.Clone(ss)
	slices.Sort(s)
	e.Strings(slices.Compact(s))
}

// Flush flushes the buffered writer and returns the first error.
func (e *Writer) Flush() error {
	if e.err == nil {
		e.err = e.w.Flush()
	}
	return e.err
}

// Err returns the first error of any write.
func (e *Writer) Err() error { return e.err }
