package serveproto

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math"

	"github.com/nix-offload/nix-offload/internal/wire"
)

// Limits on what a reply may contain. Each count or length read from the
// wire is checked against one of these before anything is read or
// allocated, and buffers grow with the bytes that really arrive, so a
// claimed length of 2^60 is a [*ProtocolError], not an allocation.
const (
	// MaxStorePathLen is the longest store path: "/nix/store/" (11 bytes),
	// a 32-character hash, "-" and a name of at most 211 characters
	// (nix 2.8.0 src/libstore/path.cc checkName).
	MaxStorePathLen = len(StoreDir) + 1 + 32 + 1 + 211

	// MaxPathSetLen bounds the paths in one reply set (QueryValidPaths,
	// QueryClosure, a path's references). Real closures have tens of
	// thousands of paths; a million paths of at most 255 bytes still fit
	// comfortably in memory.
	MaxPathSetLen = 1 << 20

	// MaxHashLen bounds a narHash string: "sha512:" and 128 hex digits is
	// the longest form Nix prints.
	MaxHashLen = 256

	// MaxContentAddressLen bounds a content address ("fixed:r:sha512:" and
	// 128 hex digits is the longest).
	MaxContentAddressLen = 1024

	// MaxSigs bounds the signatures on one path; a store path carries one
	// per signing key, so a handful in practice.
	MaxSigs = 1024

	// MaxSigLen bounds one signature: a key name, ":" and 88 characters of
	// base64 for an Ed25519 signature.
	MaxSigLen = 1024

	// MaxErrorMsgLen bounds the error message of a BuildResult or a
	// BuildPaths failure. Nix 2.8 sends one line; newer versions may
	// append the last lines of the build log.
	MaxErrorMsgLen = 1 << 20

	// MaxBuiltOutputs bounds the builtOutputs map of a BuildResult: one
	// entry per output of the derivation, which has a handful.
	MaxBuiltOutputs = 4096

	// MaxDrvOutputLen bounds a builtOutputs key ("sha256:" + 64 hex digits
	// + "!" + output name).
	MaxDrvOutputLen = 1024

	// MaxRealisationLen bounds a builtOutputs value, a realisation as JSON;
	// its dependentRealisations can list one entry per input output.
	MaxRealisationLen = 1 << 20

	// maxGreetingQuote bounds how much of a non-protocol greeting (text a
	// login shell printed) is quoted in the error.
	maxGreetingQuote = 256
)

// StoreDir is the only store directory this package speaks about; the
// serve protocol sends full paths, so both sides must use the same one.
const StoreDir = "/nix/store"

// encoder writes one request to the buffered transport writer: a
// [wire.Writer], which keeps the first error and skips later writes.
type encoder = wire.Writer

// decoder reads one reply from the buffered transport reader. Its errors
// name the operation and the field: a read that fails is a *StreamError
// (io.EOF becomes io.ErrUnexpectedEOF: a reply never ends early on
// purpose), malformed bytes are a *ProtocolError.
type decoder struct {
	r  *bufio.Reader
	op string
	w  *wire.Reader // made by the wire method on first use
}

// wire returns the wire reader over r. It reads exactly what it is asked
// for, so r stays usable directly (the greeting, NARs).
func (d *decoder) wire() *wire.Reader {
	if d.w == nil {
		d.w = wire.NewReader(d.r)
	}
	return d.w
}

// fail wraps an error of the wire reader for field: a [*wire.FormatError]
// is a *ProtocolError, anything else a *StreamError.
func (d *decoder) fail(field string, err error) error {
	var fe *wire.FormatError
	if errors.As(err, &fe) {
		return &ProtocolError{Op: d.op, Field: field, Err: err}
	}
	return d.streamErr(field, err)
}

func (d *decoder) streamErr(field string, err error) error {
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return &StreamError{Op: d.op, Field: field, Err: err}
}

func (d *decoder) protoErr(field string, format string, args ...any) error {
	return &ProtocolError{Op: d.op, Field: field, Err: fmt.Errorf(format, args...)}
}

func (d *decoder) u64(field string) (uint64, error) {
	v, err := d.wire().Uint64()
	if err != nil {
		return 0, d.fail(field, err)
	}
	return v, nil
}

// uint32 reads a u64 that Nix reads with readInt or into an unsigned int:
// values above 2^32-1 are rejected (nix 2.8.0 src/libutil/serialise.hh
// readNum).
func (d *decoder) uint32(field string) (uint32, error) {
	v, err := d.u64(field)
	if err != nil {
		return 0, err
	}
	if v > math.MaxUint32 {
		return 0, d.protoErr(field, "value %d exceeds %d", v, uint64(math.MaxUint32))
	}
	return uint32(v), nil
}

// int64 reads a u64 that Nix reads into a time_t: values above 2^63-1 are
// rejected.
func (d *decoder) int64(field string) (int64, error) {
	v, err := d.u64(field)
	if err != nil {
		return 0, err
	}
	if v > math.MaxInt64 {
		return 0, d.protoErr(field, "value %d exceeds %d", v, uint64(math.MaxInt64))
	}
	return int64(v), nil
}

// bool reads a u64 that Nix reads into a bool: only 0 and 1 are accepted.
func (d *decoder) bool(field string) (bool, error) {
	b, err := d.wire().Bool()
	if fe := (*wire.FormatError)(nil); errors.As(err, &fe) {
		// Fields such as "isNonDeterministic" do not say they are bools.
		return false, d.protoErr(field, "bool %w", fe)
	}
	if err != nil {
		return false, d.fail(field, err)
	}
	return b, nil
}

// expect reads a u64 that must have the value want.
func (d *decoder) expect(field string, want uint64) error {
	v, err := d.u64(field)
	if err != nil {
		return err
	}
	if v != want {
		return d.protoErr(field, "got %d, want %d", v, want)
	}
	return nil
}

// str reads a string of at most max bytes and checks its padding.
func (d *decoder) str(field string, max int) (string, error) {
	s, err := d.wire().String(max)
	if err != nil {
		return "", d.fail(field, err)
	}
	return s, nil
}

// count reads a collection size of at most max.
func (d *decoder) count(field string, max int) (int, error) {
	field = subField(field, "count")
	n, err := d.wire().Count(max)
	if err != nil {
		return 0, d.fail(field, err)
	}
	return n, nil
}

// strs reads a list or set of at most maxCount strings of at most maxLen
// bytes each. elem names one element in errors ("path 3").
func (d *decoder) strs(field, elem string, maxCount, maxLen int) ([]string, error) {
	n, err := d.count(field, maxCount)
	if err != nil {
		return nil, err
	}
	var out []string // not preallocated: n came from the wire
	for i := range n {
		s, err := d.str(elemField(field, elem, i), maxLen)
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

// paths reads a set of store paths and checks each one's syntax.
func (d *decoder) paths(field string) ([]string, error) {
	ps, err := d.strs(field, "path", MaxPathSetLen, MaxStorePathLen)
	if err != nil {
		return nil, err
	}
	for i, p := range ps {
		if err := checkStorePath(p); err != nil {
			return nil, &ProtocolError{Op: d.op, Field: elemField(field, "path", i), Err: err}
		}
	}
	return ps, nil
}

// optPath reads a store path or "" (none).
func (d *decoder) optPath(field string) (string, error) {
	p, err := d.str(field, MaxStorePathLen)
	if err != nil || p == "" {
		return p, err
	}
	if err := checkStorePath(p); err != nil {
		return "", &ProtocolError{Op: d.op, Field: field, Err: err}
	}
	return p, nil
}

func elemField(field, elem string, i int) string {
	return subField(field, fmt.Sprintf("%s %d", elem, i))
}

// subField names a part of field: "references: path 2".
func subField(field, sub string) string {
	if field == "" {
		return sub
	}
	return field + ": " + sub
}

// recordingWriter remembers the first error of the writer it wraps, so a
// failed NAR copy can be blamed on the right side.
type recordingWriter struct {
	w   io.Writer
	err error
}

func (r *recordingWriter) Write(p []byte) (int, error) {
	n, err := r.w.Write(p)
	if err != nil && r.err == nil {
		r.err = err
	}
	return n, err
}

// recordingReader remembers the first error of the reader it wraps,
// io.EOF included.
type recordingReader struct {
	r   io.Reader
	err error
}

func (r *recordingReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if err != nil && r.err == nil {
		r.err = err
	}
	return n, err
}
