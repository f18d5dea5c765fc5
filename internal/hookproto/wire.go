package hookproto

import (
	"fmt"
	"io"

	"github.com/nix-offload/nix-offload/internal/wire"
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
	readChunk = wire.ReadChunk
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

// decoder reads one message from stdin with a [wire.Reader], which reads
// exactly the bytes of the message and never more, so consecutive calls
// may share an unbuffered reader.
type decoder struct {
	r   *wire.Reader
	msg string
}

func newDecoder(r io.Reader, msg string) *decoder {
	return &decoder{r: wire.NewReader(r), msg: msg}
}

// fail wraps an error of the wire reader, a [*wire.FormatError] or an I/O
// error, for field. io.EOF becomes io.ErrUnexpectedEOF: only ReadRequest
// may meet the end of stdin between messages, and it checks for that
// itself.
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
	v, err := d.r.Uint64()
	if err != nil {
		return 0, d.fail(field, err)
	}
	return v, nil
}

// bool reads a u64 that must be 0 or 1.
func (d *decoder) bool(field string) (bool, error) {
	v, err := d.r.Bool()
	if err != nil {
		return false, d.fail(field, err)
	}
	return v, nil
}

// str reads a string of at most max bytes and checks its padding.
func (d *decoder) str(field string, max int) (string, error) {
	s, err := d.r.String(max)
	if err != nil {
		return "", d.fail(field, err)
	}
	return s, nil
}

// strs reads a list of at most maxCount strings of at most maxLen bytes
// each; elem names one element in errors ("feature 2"). An empty list is
// nil.
func (d *decoder) strs(field, elem string, maxCount, maxLen int) ([]string, error) {
	n, err := d.r.Count(maxCount)
	if err != nil {
		return nil, d.fail(field+": count", err)
	}
	var out []string // not preallocated: n came from the wire
	for i := range n {
		s, err := d.str(fmt.Sprintf("%s: %s %d", field, elem, i), maxLen)
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}
