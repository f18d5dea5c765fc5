package hookproto

import (
	"encoding/binary"
	"fmt"
	"io"
	"slices"
)

// Limits on what Nix may send on stdin. Every count and length read is
// checked against one of these before anything is read or allocated, and
// strings grow with the bytes that really arrive, so a claimed length of
// 2^60 is a [*ReadError], not an allocation.
const (
	// MaxSettings bounds the settings block. Nix sends every setting it
	// knows: 91 on Nix 2.8, a few hundred at most on later versions.
	MaxSettings = 4096

	// MaxSettingNameLen bounds a setting's name ("builders-use-substitutes"
	// is among the longest).
	MaxSettingNameLen = 256

	// MaxSettingValueLen bounds a setting's value. `builders` holds a whole
	// machines list when given inline (--builders '…; …'), with host keys
	// in base64, so it can be long.
	MaxSettingValueLen = 1 << 20

	// MaxSystemLen bounds the system of a "try" ("x86_64-linux").
	MaxSystemLen = 1024

	// MaxPathLen bounds a store path (a drv path, an input path): Linux
	// PATH_MAX. Store paths under /nix/store are at most 256 bytes, but the
	// store directory is not fixed.
	MaxPathLen = 4096

	// MaxFeatures bounds the required system features of one derivation.
	MaxFeatures = 4096

	// MaxFeatureLen bounds one feature name ("big-parallel", "kvm").
	MaxFeatureLen = 1024

	// MaxInputPaths bounds the input closure sent after `# accept`. Real
	// closures have tens of thousands of paths.
	MaxInputPaths = 1 << 20

	// MaxOutputs bounds the wanted outputs sent after `# accept`: one per
	// output of the derivation, which has a handful.
	MaxOutputs = 4096

	// MaxOutputNameLen bounds an output name ("out", "dev").
	MaxOutputNameLen = 1024

	// maxKeywordLen bounds the request keyword, "try"; a longer one is
	// still read (up to this) so the error can quote it.
	maxKeywordLen = 64

	// readChunk is how much a string read allocates ahead of the bytes
	// that have actually arrived.
	readChunk = 64 << 10
)

// ReadError reports stdin bytes that do not follow the layout Nix writes
// (malformed: a limit exceeded, bad padding, an unexpected keyword) or a
// read that failed. A stream that ends early wraps [io.ErrUnexpectedEOF].
// After a ReadError the stream is out of step: the hook can only stop.
type ReadError struct {
	// Msg is the message being read: "settings", "try" or "accepted".
	Msg string
	// Field names the part of the message: "setting 3: value",
	// "requiredFeatures: feature 0", "inputPaths: count".
	Field string
	Err   error
}

func (e *ReadError) Error() string {
	return fmt.Sprintf("hookproto: %s: %s: %v", e.Msg, e.Field, e.Err)
}

func (e *ReadError) Unwrap() error { return e.Err }

// decoder reads one message from stdin. It reads exactly the bytes of the
// message and never more, so consecutive calls may share an unbuffered
// reader.
type decoder struct {
	r   io.Reader
	msg string
	buf [8]byte
}

func (d *decoder) fail(field string, err error) error {
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return &ReadError{Msg: d.msg, Field: field, Err: err}
}

func (d *decoder) failf(field, format string, args ...any) error {
	return &ReadError{Msg: d.msg, Field: field, Err: fmt.Errorf(format, args...)}
}

func (d *decoder) u64(field string) (uint64, error) {
	if _, err := io.ReadFull(d.r, d.buf[:]); err != nil {
		return 0, d.fail(field, err)
	}
	return binary.LittleEndian.Uint64(d.buf[:]), nil
}

// bool reads a u64 that must be 0 or 1.
func (d *decoder) bool(field string) (bool, error) {
	v, err := d.u64(field)
	if err != nil {
		return false, err
	}
	switch v {
	case 0:
		return false, nil
	case 1:
		return true, nil
	}
	return false, d.failf(field, "value %d is neither 0 nor 1", v)
}

// str reads a string of at most max bytes and checks its padding.
func (d *decoder) str(field string, max int) (string, error) {
	n, err := d.u64(field)
	if err != nil {
		return "", err
	}
	return d.strBody(field, n, max)
}

// strBody reads the bytes and padding of a string whose length n has been
// read.
func (d *decoder) strBody(field string, n uint64, max int) (string, error) {
	if n > uint64(max) {
		return "", d.failf(field, "length %d exceeds %d", n, max)
	}
	// Grow with the data: a truncated stream claiming max bytes costs at
	// most one chunk.
	buf := make([]byte, 0, min(int(n), readChunk))
	for len(buf) < int(n) {
		k := min(int(n)-len(buf), readChunk)
		buf = slices.Grow(buf, k)
		if _, err := io.ReadFull(d.r, buf[len(buf):len(buf)+k]); err != nil {
			return "", d.fail(field, err)
		}
		buf = buf[:len(buf)+k]
	}
	if p := padLen(n); p > 0 {
		if _, err := io.ReadFull(d.r, d.buf[:p]); err != nil {
			return "", d.fail(field, err)
		}
		for _, b := range d.buf[:p] {
			if b != 0 {
				return "", d.failf(field, "non-zero padding % x", d.buf[:p])
			}
		}
	}
	return string(buf), nil
}

// strs reads a list of at most maxCount strings of at most maxLen bytes
// each; elem names one element in errors ("feature 2"). An empty list is
// nil.
func (d *decoder) strs(field, elem string, maxCount, maxLen int) ([]string, error) {
	n, err := d.u64(field + ": count")
	if err != nil {
		return nil, err
	}
	if n > uint64(maxCount) {
		return nil, d.failf(field+": count", "%d exceeds %d", n, maxCount)
	}
	var out []string // not preallocated: n came from the wire
	for i := range int(n) {
		s, err := d.str(fmt.Sprintf("%s: %s %d", field, elem, i), maxLen)
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

func padLen(n uint64) int { return int((8 - n%8) % 8) }

func leU64(b [8]byte) uint64 { return binary.LittleEndian.Uint64(b[:]) }
