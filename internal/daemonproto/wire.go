package daemonproto

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math"

	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/wire"
)

// Limits on what a reply may contain. Each count or length read from the
// wire is checked against one of these before anything is read or
// allocated, and collections grow with the data that really arrives, so a
// claimed length of 2^60 is a [*ProtocolError], not an allocation. Limits
// shared with the serve protocol are serveproto's, so both clients accept
// the same store objects.
const (
	// MaxStorePathLen is serveproto's: "/nix/store/", a 32-character hash,
	// "-" and a name of at most 211 characters.
	MaxStorePathLen = serveproto.MaxStorePathLen
	// MaxPathSetLen bounds the paths in one reply set and the references
	// of one path (serveproto's: a million).
	MaxPathSetLen = serveproto.MaxPathSetLen
	// MaxHashLen bounds a narHash string (serveproto's).
	MaxHashLen = serveproto.MaxHashLen
	// MaxContentAddressLen bounds a content address (serveproto's).
	MaxContentAddressLen = serveproto.MaxContentAddressLen
	// MaxSigs and MaxSigLen bound a path's signatures (serveproto's).
	MaxSigs   = serveproto.MaxSigs
	MaxSigLen = serveproto.MaxSigLen
	// MaxErrorMsgLen bounds a BuildResult's errorMsg and the message of a
	// STDERR_ERROR (serveproto's, 1 MiB: newer daemons append the last
	// lines of the build log).
	MaxErrorMsgLen = serveproto.MaxErrorMsgLen
	// MaxBuiltOutputs, MaxDrvOutputLen and MaxRealisationLen bound a
	// BuildResult's builtOutputs map (serveproto's).
	MaxBuiltOutputs   = serveproto.MaxBuiltOutputs
	MaxDrvOutputLen   = serveproto.MaxDrvOutputLen
	MaxRealisationLen = serveproto.MaxRealisationLen

	// MaxFeatures and MaxFeatureLen bound the daemon's feature list in the
	// 1.38 handshake: Nix 2.35 offers two short names.
	MaxFeatures   = 1024
	MaxFeatureLen = 1024

	// MaxVersionLen bounds the daemon's Nix version string ("2.34.8",
	// "nix (Nix) 2.26.3"; Lix and Determinate add a suffix).
	MaxVersionLen = 1024

	// MaxLogLen bounds the text of one stderr message (STDERR_NEXT, an
	// activity's text, a string field such as one build log line). Nix
	// splits build output at newlines; a line of a megabyte is already
	// pathological, and the build log as a whole is bounded by
	// max-log-size, not here.
	MaxLogLen = 1 << 20

	// MaxLogFields bounds the fields of one activity or result: Nix sends
	// at most a handful (actBuild: drv path, machine, round, rounds).
	MaxLogFields = 64

	// MaxTraces bounds the trace lines of one STDERR_ERROR; evaluation
	// errors carry tens.
	MaxTraces = 1024

	// maxGreetingQuote bounds how much of a non-protocol greeting (text a
	// login shell printed) is quoted in the error.
	maxGreetingQuote = 256
)

// decoder reads one reply from the buffered transport reader. Its errors
// name the operation and the field: a read that fails is a *StreamError
// (io.EOF becomes io.ErrUnexpectedEOF: a reply never ends early on
// purpose), malformed bytes are a *ProtocolError.
type decoder struct {
	r  *bufio.Reader
	op string
	w  *wire.Reader
	// abortErr, when set, returns the reason the transport was closed
	// under the read (the caller's context ended), or nil.
	abortErr func() error
}

func newDecoder(r *bufio.Reader, op string, abortErr func() error) *decoder {
	return &decoder{r: r, op: op, w: wire.NewReader(r), abortErr: abortErr}
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
	if d.abortErr != nil {
		if cause := d.abortErr(); cause != nil {
			err = fmt.Errorf("%w (the transport was closed: %w)", cause, err)
		}
	}
	return &StreamError{Op: d.op, Field: field, Err: err}
}

func (d *decoder) protoErr(field string, format string, args ...any) error {
	return &ProtocolError{Op: d.op, Field: field, Err: fmt.Errorf(format, args...)}
}

func (d *decoder) u64(field string) (uint64, error) {
	v, err := d.w.Uint64()
	if err != nil {
		return 0, d.fail(field, err)
	}
	return v, nil
}

// max reads a u64 that Nix reads into a narrower type (readInt into an
// unsigned int, readNum<uint8_t>): values above max are rejected (nix
// 2.8.0 src/libutil/serialise.hh readNum).
func (d *decoder) max(field string, max uint64) (uint64, error) {
	v, err := d.u64(field)
	if err != nil {
		return 0, err
	}
	if v > max {
		return 0, d.protoErr(field, "value %d exceeds %d", v, max)
	}
	return v, nil
}

func (d *decoder) uint32(field string) (uint32, error) {
	v, err := d.max(field, math.MaxUint32)
	return uint32(v), err
}

// int64 reads a u64 that Nix reads into a time_t or int64_t.
func (d *decoder) int64(field string) (int64, error) {
	v, err := d.max(field, math.MaxInt64)
	return int64(v), err
}

// bool reads a u64 that must be 0 or 1.
func (d *decoder) bool(field string) (bool, error) {
	b, err := d.w.Bool()
	if fe := (*wire.FormatError)(nil); errors.As(err, &fe) {
		return false, d.protoErr(field, "bool %w", fe)
	}
	if err != nil {
		return false, d.fail(field, err)
	}
	return b, nil
}

// str reads a string of at most max bytes and checks its padding.
func (d *decoder) str(field string, max int) (string, error) {
	s, err := d.w.String(max)
	if err != nil {
		return "", d.fail(field, err)
	}
	return s, nil
}

// count reads a collection size of at most max.
func (d *decoder) count(field string, max int) (int, error) {
	n, err := d.w.Count(max)
	if err != nil {
		return 0, d.fail(subField(field, "count"), err)
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
		s, err := d.str(subField(field, fmt.Sprintf("%s %d", elem, i)), maxLen)
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
		if err := serveproto.CheckStorePath(p); err != nil {
			return nil, &ProtocolError{Op: d.op, Field: subField(field, fmt.Sprintf("path %d", i)), Err: err}
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
	if err := serveproto.CheckStorePath(p); err != nil {
		return "", &ProtocolError{Op: d.op, Field: field, Err: err}
	}
	return p, nil
}

// subField names a part of field: "references: path 2".
func subField(field, sub string) string {
	if field == "" {
		return sub
	}
	return field + ": " + sub
}

// recordingReader remembers the first error of the reader it wraps,
// io.EOF included, to tell a dead stream from a bad NAR.
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
