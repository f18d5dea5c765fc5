package servetest

import (
	"bytes"
	"errors"
	"fmt"
	"io"

	"github.com/nix-offload/nix-offload/internal/nar"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/wire"
)

// exportMagic follows each NAR in an export stream ("NIXE" read
// little-endian; nix 2.8.0 src/libstore/store-api.hh).
const exportMagic = 0x4558494e

// ExportLimits bound what an export stream may hold. A zero field takes the
// value of [DefaultExportLimits].
type ExportLimits struct {
	NAR      nar.Limits // each NAR
	MaxPaths int        // paths in one stream
	MaxRefs  int        // references of one path
}

// DefaultExportLimits are generous for tests and small enough that a
// hostile stream costs little: every NAR is bounded by nar.DefaultLimits
// except its size, 256 MiB.
var DefaultExportLimits = ExportLimits{
	NAR:      nar.Limits{MaxNARSize: 256 << 20, MaxFileSize: 256 << 20},
	MaxPaths: 1 << 16,
	MaxRefs:  1 << 16,
}

// maxStorePathLen is the longest store path: "/nix/store/", a 32-character
// hash, "-" and a name of at most 211 characters.
const maxStorePathLen = len(StoreDir) + 1 + 32 + 1 + 211

// ExportError is what [ExportReader] reports for a stream it rejects or
// that ends early.
type ExportError struct {
	Item  int    // 0-based index of the path being read
	Path  string // the path, once read; "" before
	Field string // "marker", "NAR", "magic", "path", "references", "deriver", "signature marker"
	Err   error
}

func (e *ExportError) Error() string {
	what := fmt.Sprintf("path %d", e.Item)
	if e.Path != "" {
		what += " (" + e.Path + ")"
	}
	return fmt.Sprintf("export stream: %s: %s: %v", what, e.Field, e.Err)
}

func (e *ExportError) Unwrap() error { return e.Err }

// ExportReader reads an export stream, the format of `nix-store --export`
// and of the serve protocol's ImportPaths (nix 2.8.0
// src/libstore/export-import.cc):
//
//	per path: u64 1, NAR, u64 0x4558494e, string path,
//	          path-set references, string deriver, u64 0
//	then:     u64 0
//
// It is strict: it accepts only what `nix-store --export` and
// serveproto.Conn.ImportPaths write. Each NAR must be canonical (package
// nar), every path, reference and deriver a well-formed store path, the
// references sorted and without duplicates, and the signature marker 0
// (Nix's importer would also skip a legacy signature after a 1, which no
// Nix since 2.0 writes). Every count and length is checked against
// [ExportLimits] before it is used, so a claimed length of 2^62 is an
// error, not an allocation.
//
// It reads exactly the bytes of the stream and nothing after its end.
type ExportReader struct {
	r    io.Reader
	w    *wire.Reader
	lim  ExportLimits
	item int
	err  error // sticky, io.EOF after the end marker
}

// NewExportReader returns a reader of the export stream that starts at r's
// current position.
func NewExportReader(r io.Reader, lim ExportLimits) *ExportReader {
	d := DefaultExportLimits
	if lim.MaxPaths <= 0 {
		lim.MaxPaths = d.MaxPaths
	}
	if lim.MaxRefs <= 0 {
		lim.MaxRefs = d.MaxRefs
	}
	if lim.NAR == (nar.Limits{}) {
		lim.NAR = d.NAR
	}
	return &ExportReader{r: r, w: wire.NewReader(r), lim: lim}
}

// Next reads the next path of the stream, writes its NAR to w as it
// arrives, and returns the path's metadata with the NAR's size and hash.
// After the end marker it returns io.EOF. Any other error is an
// [*ExportError], or an error of w as it is; the reader then stays failed.
func (x *ExportReader) Next(w io.Writer) (serveproto.PathInfo, error) {
	if x.err != nil {
		return serveproto.PathInfo{}, x.err
	}
	info, err := x.next(w)
	if err != nil {
		x.err = err
	}
	return info, err
}

func (x *ExportReader) next(w io.Writer) (serveproto.PathInfo, error) {
	var info serveproto.PathInfo
	fail := func(field string, err error) error {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return &ExportError{Item: x.item, Path: info.Path, Field: field, Err: err}
	}
	marker, err := x.w.Uint64()
	switch {
	case err != nil:
		return info, fail("marker", err)
	case marker == 0:
		return info, io.EOF
	case marker != 1:
		return info, fail("marker", fmt.Errorf("%d is neither 1 (a path follows) nor 0 (end of stream)", marker))
	case x.item >= x.lim.MaxPaths:
		return info, fail("marker", fmt.Errorf("more than %d paths", x.lim.MaxPaths))
	}

	rw := &recordingWriter{w: w}
	st, err := nar.Copy(rw, x.r, x.lim.NAR)
	if err != nil {
		if rw.err != nil {
			return info, err // the caller's writer failed
		}
		return info, fail("NAR", err)
	}
	info.NarSize = uint64(st.Size)
	info.NarHash = st.NixHash()

	magic, err := x.w.Uint64()
	if err != nil {
		return info, fail("magic", err)
	}
	if magic != exportMagic {
		return info, fail("magic", fmt.Errorf("%#x, want %#x (\"NIXE\")", magic, exportMagic))
	}
	if info.Path, err = x.path("path", false); err != nil {
		return info, fail("path", err)
	}
	if info.References, err = x.refs(); err != nil {
		return info, fail("references", err)
	}
	if info.Deriver, err = x.path("deriver", true); err != nil {
		return info, fail("deriver", err)
	}
	sig, err := x.w.Uint64()
	switch {
	case err != nil:
		return info, fail("signature marker", err)
	case sig == 1:
		return info, fail("signature marker", errors.New("1 (a legacy signature follows), which nix-store --export never writes"))
	case sig != 0:
		return info, fail("signature marker", fmt.Errorf("%d, want 0", sig))
	}
	x.item++
	return info, nil
}

// path reads a store path, or "" if optional allows it.
func (x *ExportReader) path(what string, optional bool) (string, error) {
	p, err := x.w.String(maxStorePathLen)
	if err != nil {
		return "", err
	}
	if p == "" && optional {
		return "", nil
	}
	if err := checkStorePath(p); err != nil {
		return "", err
	}
	return p, nil
}

// refs reads a path-set, which must be sorted and without duplicates.
func (x *ExportReader) refs() ([]string, error) {
	n, err := x.w.Count(x.lim.MaxRefs)
	if err != nil {
		return nil, fmt.Errorf("count: %w", err)
	}
	var refs []string // not preallocated: n came from the stream
	for i := range n {
		p, err := x.path("reference", false)
		if err != nil {
			return nil, fmt.Errorf("path %d: %w", i, err)
		}
		if i > 0 && p <= refs[i-1] {
			return nil, fmt.Errorf("path %d: %s is not sorted after %s", i, p, refs[i-1])
		}
		refs = append(refs, p)
	}
	return refs, nil
}

// ExportItem is one path of an export stream held in memory.
type ExportItem struct {
	Info serveproto.PathInfo
	NAR  []byte
}

// ReadExportStream reads a whole export stream into memory. It is meant for
// tests; the NARs are bounded by lim.
func ReadExportStream(r io.Reader, lim ExportLimits) ([]ExportItem, error) {
	x := NewExportReader(r, lim)
	var items []ExportItem
	for {
		var buf bytes.Buffer
		info, err := x.Next(&buf)
		if err == io.EOF {
			return items, nil
		}
		if err != nil {
			return items, err
		}
		items = append(items, ExportItem{Info: info, NAR: buf.Bytes()})
	}
}

// recordingWriter remembers the first error of the writer it wraps.
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
