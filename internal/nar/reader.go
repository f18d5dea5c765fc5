package nar

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"hash"
	"io"
	"math"
	"strconv"

	"github.com/nix-community/go-nix/pkg/nixbase32"
)

// Type is the type of a node. The zero value is not a type.
type Type uint8

// The three kinds of node a NAR can hold.
const (
	TypeRegular Type = iota + 1
	TypeDirectory
	TypeSymlink
)

func (t Type) String() string {
	switch t {
	case TypeRegular:
		return "regular"
	case TypeDirectory:
		return "directory"
	case TypeSymlink:
		return "symlink"
	}
	return fmt.Sprintf("Type(%d)", uint8(t))
}

// Header describes one node of a NAR.
type Header struct {
	Path       string // "" for the root node, else slash-separated relative path "a/b"
	Type       Type
	Executable bool   // regular files
	Size       int64  // regular files
	LinkTarget string // symlinks
}

// Stats describes the bytes of a NAR, as Nix defines narSize and narHash.
type Stats struct {
	Size   int64    // narSize
	SHA256 [32]byte // narHash
}

// NixHash returns the hash as Nix prints a narHash: "sha256:" and 52
// characters of Nix's base-32.
func (s Stats) NixHash() string {
	return "sha256:" + nixbase32.EncodeToString(s.SHA256[:])
}

// Wire tokens (NixOS/nix src/libutil/archive.cc).
const (
	magic = "nix-archive-1"

	// maxToken is the longest keyword the reader needs to look at
	// ("nix-archive-1" is 13 bytes), rounded up to the padding.
	maxToken = 16

	// skipChunk is how much of a file's contents Next reads at a time
	// when it skips them.
	skipChunk = 64 << 10
)

type state uint8

const (
	stMagic   state = iota // nothing read yet
	stFile                 // in a regular file's contents
	stNodeEnd              // a node's body is done; its ")" is next
	stDir                  // in a directory: "entry" or ")" is next
	stEnd                  // the root's ")" was read
)

// frame is a directory being read.
type frame struct {
	pathLen int    // len(Reader.path) for this directory
	prev    string // the last entry name seen in it; "" before the first
}

// Reader reads one NAR. [Reader.Next] returns each node in order, and while
// the current node is a regular file, Reader is an [io.Reader] of its
// contents. A Reader does not start goroutines and never reads past the
// NAR's end.
type Reader struct {
	r   io.Reader
	lim Limits

	// tee receives every byte consumed, for Copy. A write error ends the
	// reading and is returned as it is.
	tee io.Writer
	// wantSize is Verify's narSize, or -1: reaching lim.MaxNARSize then
	// means a size mismatch rather than a limit.
	wantSize int64

	h   hash.Hash
	off int64 // bytes consumed
	tok int64 // offset of the token being parsed, for errors

	state   state
	err     error   // sticky
	path    []byte  // the current node's path, or the current directory's in stDir
	stack   []frame // directories being read, the root first
	entries int64   // nodes seen

	remaining int64 // in stFile: content bytes not read yet
	pad       int   // in stFile: padding after the contents

	buf     [maxToken]byte
	scratch []byte // names, targets, skipped contents
}

var _ io.Reader = (*Reader)(nil)

// NewReader returns a Reader of the NAR that starts at the current position
// of r. It reads from r only the exact lengths the grammar gives, so when
// [Reader.Next] has returned [io.EOF], r is positioned at the first byte after
// the NAR.
func NewReader(r io.Reader, lim Limits) *Reader {
	return &Reader{r: r, lim: lim.withDefaults(), wantSize: -1, h: sha256.New()}
}

// Next advances to the next node, the root first, and returns its header.
// Contents of the previous file that were not read are skipped (and still
// hashed). After the root's closing ")", Next returns [io.EOF]; every other
// error is an [*Error] and is returned again by later calls.
func (r *Reader) Next() (*Header, error) {
	if r.err != nil {
		return nil, r.err
	}
	hdr, err := r.next()
	if err != nil && err != io.EOF {
		r.err = err
	}
	return hdr, err
}

func (r *Reader) next() (*Header, error) {
	switch r.state {
	case stMagic:
		if err := r.readMagic(); err != nil {
			return nil, err
		}
		return r.node()
	case stEnd:
		return nil, io.EOF
	case stFile:
		if err := r.skipFile(); err != nil {
			return nil, err
		}
		r.state = stNodeEnd
		fallthrough
	case stNodeEnd:
		if err := r.expect(")"); err != nil {
			return nil, err
		}
		if err := r.closeNode(); err != nil {
			return nil, err
		}
	}
	for r.state == stDir {
		tok, err := r.keyword(`"entry" or ")"`, false)
		if err != nil {
			return nil, err
		}
		switch string(tok) {
		case "entry":
			return r.entry()
		case ")":
			r.stack = r.stack[:len(r.stack)-1]
			if err := r.closeNode(); err != nil {
				return nil, err
			}
		default:
			return nil, r.errorf(`expected "entry" or ")", got %q`, tok)
		}
	}
	return nil, io.EOF
}

// Read reads the contents of the current regular file. It returns [io.EOF]
// at their end, and at once if the current node is not a regular file.
func (r *Reader) Read(p []byte) (int, error) {
	if r.err != nil {
		return 0, r.err
	}
	if r.state != stFile || r.remaining == 0 {
		return 0, io.EOF
	}
	if len(p) == 0 {
		return 0, nil
	}
	if int64(len(p)) > r.remaining {
		p = p[:r.remaining]
	}
	n, err := r.r.Read(p)
	if n < 0 || n > len(p) {
		n, err = 0, fmt.Errorf("invalid count %d from Read", n)
	}
	r.remaining -= int64(n)
	if werr := r.consume(p[:n]); werr != nil {
		r.err = werr
		return n, werr
	}
	if err == io.EOF {
		if r.remaining == 0 {
			err = nil
		} else {
			err = io.ErrUnexpectedEOF
		}
	}
	if err != nil {
		r.err = r.readError("file contents", err)
		return n, r.err
	}
	return n, nil
}

// Stats returns the size and SHA-256 of the bytes consumed so far. After
// Next has returned io.EOF, they are the NAR's narSize and narHash.
func (r *Reader) Stats() Stats {
	s := Stats{Size: r.off}
	copy(s.SHA256[:], r.h.Sum(nil))
	return s
}

// readMagic reads the "nix-archive-1" header.
func (r *Reader) readMagic() error {
	r.tok = r.off
	n, err := r.u64("magic", false)
	if err != nil {
		return err
	}
	if n != uint64(len(magic)) {
		return r.errorf("not a NAR: expected magic %q, got a %d-byte string", magic, n)
	}
	tok, err := r.readPadded(n, "magic", false)
	if err != nil {
		return err
	}
	if string(tok) != magic {
		return r.errorf("not a NAR: expected magic %q, got %q", magic, tok)
	}
	return nil
}

// node reads a node up to its first byte of contents, entries or ")",
// with r.path already set to its path.
func (r *Reader) node() (*Header, error) {
	r.entries++
	if r.entries > r.lim.MaxEntries {
		return nil, r.errorf("more than %d entries", r.lim.MaxEntries)
	}
	if err := r.expect("("); err != nil {
		return nil, err
	}
	if err := r.expect("type"); err != nil {
		return nil, err
	}
	tok, err := r.keyword("node type", false)
	if err != nil {
		return nil, err
	}
	hdr := &Header{Path: string(r.path)}
	switch string(tok) {
	case "regular":
		if err := r.regular(hdr); err != nil {
			return nil, err
		}
		return hdr, nil
	case "directory":
		hdr.Type = TypeDirectory
		r.stack = append(r.stack, frame{pathLen: len(r.path)})
		r.state = stDir
		return hdr, nil
	case "symlink":
		hdr.Type = TypeSymlink
		if err := r.expect("target"); err != nil {
			return nil, err
		}
		target, err := r.str(r.lim.MaxTargetLen, "symlink target")
		if err != nil {
			return nil, err
		}
		switch {
		case len(target) == 0:
			return nil, r.errorf("symlink target is empty")
		case bytes.IndexByte(target, 0) >= 0:
			return nil, r.errorf("symlink target %q: contains NUL", target)
		}
		hdr.LinkTarget = string(target)
		r.state = stNodeEnd
		return hdr, nil
	}
	return nil, r.errorf(`expected node type "regular", "directory" or "symlink", got %q`, tok)
}

// regular reads a regular file's header, up to its contents.
func (r *Reader) regular(hdr *Header) error {
	hdr.Type = TypeRegular
	tok, err := r.keyword(`"executable" or "contents"`, false)
	if err != nil {
		return err
	}
	switch string(tok) {
	case "executable":
		hdr.Executable = true
		tok, err := r.keyword(`"" after "executable"`, false)
		if err != nil {
			return err
		}
		if len(tok) != 0 {
			return r.errorf(`expected "" after "executable", got %q`, tok)
		}
		if err := r.expect("contents"); err != nil {
			return err
		}
	case "contents":
	default:
		return r.errorf(`expected "executable" or "contents", got %q`, tok)
	}
	r.tok = r.off
	size, err := r.u64("file size", false)
	if err != nil {
		return err
	}
	if size > uint64(r.lim.MaxFileSize) {
		return r.errorf("file size %d exceeds limit %d", size, r.lim.MaxFileSize)
	}
	if err := r.checkNARSize(int64(size)); err != nil {
		return err
	}
	hdr.Size = int64(size)
	r.remaining = int64(size)
	r.pad = int(-size & 7)
	r.state = stFile
	return nil
}

// entry reads a directory entry after its "entry" token, up to the first
// byte after the "(" "type" <type> of its node.
func (r *Reader) entry() (*Header, error) {
	if len(r.stack) > r.lim.MaxDepth {
		return nil, r.errorf("nesting deeper than %d", r.lim.MaxDepth)
	}
	if err := r.expect("("); err != nil {
		return nil, err
	}
	if err := r.expect("name"); err != nil {
		return nil, err
	}
	name, err := r.str(r.lim.MaxNameLen, "entry name")
	if err != nil {
		return nil, err
	}
	top := &r.stack[len(r.stack)-1]
	switch {
	case len(name) == 0:
		return nil, r.errorf("entry name is empty")
	case string(name) == "." || string(name) == "..":
		return nil, r.errorf("entry name %q: not allowed", name)
	case bytes.IndexByte(name, '/') >= 0:
		return nil, r.errorf(`entry name %q: contains "/"`, name)
	case bytes.IndexByte(name, 0) >= 0:
		return nil, r.errorf("entry name %q: contains NUL", name)
	}
	// Names are non-empty, so the first one is always after "".
	switch c := bytes.Compare(name, []byte(top.prev)); {
	case c == 0:
		return nil, r.errorf("entry name %q: duplicate", name)
	case c < 0:
		return nil, r.errorf("entry name %q: not sorted after %q", name, top.prev)
	}
	if top.pathLen > 0 {
		r.path = append(r.path, '/')
	}
	r.path = append(r.path, name...)
	nameLen, i := len(name), len(r.stack)-1
	if err := r.expect("node"); err != nil {
		return nil, err
	}
	hdr, err := r.node()
	if err != nil {
		return nil, err
	}
	// The name is the end of the path: share its memory.
	r.stack[i].prev = hdr.Path[len(hdr.Path)-nameLen:]
	return hdr, nil
}

// closeNode is called after a node's ")". For an entry's node it reads the
// entry's ")" and goes back to the directory.
func (r *Reader) closeNode() error {
	if len(r.stack) == 0 {
		r.state = stEnd
		return nil
	}
	top := r.stack[len(r.stack)-1]
	r.path = r.path[:top.pathLen]
	r.state = stDir
	return r.expect(")")
}

// skipFile consumes the rest of the current file and its padding.
func (r *Reader) skipFile() error {
	for r.remaining > 0 {
		p := r.scratchBuf(int(min(r.remaining, skipChunk)))
		if err := r.fill(p, "file contents", false); err != nil {
			return err
		}
		r.remaining -= int64(len(p))
	}
	r.tok = r.off
	p := r.buf[:r.pad]
	if err := r.fill(p, "file padding", false); err != nil {
		return err
	}
	if !allZero(p) {
		return r.errorf("non-zero padding after file contents")
	}
	return nil
}

// expect reads a keyword that must be tok.
func (r *Reader) expect(tok string) error {
	got, err := r.keyword(tok, true)
	if err != nil {
		return err
	}
	if string(got) != tok {
		return r.errorf("expected %q, got %q", tok, got)
	}
	return nil
}

// keyword reads a string of at most maxToken bytes into r.buf. want says
// what was expected, for errors: a description, or the token itself if
// isToken (quoted only when an error needs it, to spare an allocation per
// token).
func (r *Reader) keyword(want string, isToken bool) ([]byte, error) {
	r.tok = r.off
	n, err := r.u64(want, isToken)
	if err != nil {
		return nil, err
	}
	if n > maxToken {
		return nil, r.errorf("expected %s, got a %d-byte string", quoteIf(want, isToken), n)
	}
	return r.readPadded(n, want, isToken)
}

// readPadded reads n ≤ maxToken bytes and their padding into r.buf.
func (r *Reader) readPadded(n uint64, what string, isToken bool) ([]byte, error) {
	p := r.buf[:(n+7)&^7]
	if err := r.fill(p, what, isToken); err != nil {
		return nil, err
	}
	if !allZero(p[n:]) {
		return nil, r.errorf("non-zero padding after %s", quoteIf(what, isToken))
	}
	return p[:n], nil
}

func quoteIf(s string, quote bool) string {
	if quote {
		return strconv.Quote(s)
	}
	return s
}

// str reads a string of at most max bytes into r.scratch. The length is
// checked before anything is allocated.
func (r *Reader) str(max int, what string) ([]byte, error) {
	r.tok = r.off
	n, err := r.u64(what, false)
	if err != nil {
		return nil, err
	}
	if n > uint64(max) || n > math.MaxInt-7 {
		return nil, r.errorf("%s length %d exceeds limit %d", what, n, max)
	}
	padded := int((n + 7) &^ 7)
	if err := r.checkNARSize(int64(padded)); err != nil {
		return nil, err
	}
	p := r.scratchBuf(padded)
	if err := r.fill(p, what, false); err != nil {
		return nil, err
	}
	if !allZero(p[n:]) {
		return nil, r.errorf("non-zero padding after %s", what)
	}
	return p[:n], nil
}

func (r *Reader) u64(what string, isToken bool) (uint64, error) {
	p := r.buf[:8]
	if err := r.fill(p, what, isToken); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(p), nil
}

// fill reads exactly len(p) bytes, after checking they stay within the
// NAR size limit.
func (r *Reader) fill(p []byte, what string, isToken bool) error {
	if err := r.checkNARSize(int64(len(p))); err != nil {
		return err
	}
	n, err := io.ReadFull(r.r, p)
	if werr := r.consume(p[:n]); werr != nil {
		return werr
	}
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	if err != nil {
		return r.readError(quoteIf(what, isToken), err)
	}
	return nil
}

// consume accounts for bytes read from r.r.
func (r *Reader) consume(p []byte) error {
	if len(p) == 0 {
		return nil
	}
	r.off += int64(len(p))
	r.h.Write(p)
	if r.tee != nil {
		n, err := r.tee.Write(p)
		if err == nil && n < len(p) {
			err = io.ErrShortWrite
		}
		return err
	}
	return nil
}

// checkNARSize fails if n more bytes would take the NAR past its limit.
func (r *Reader) checkNARSize(n int64) error {
	if n <= r.lim.MaxNARSize-r.off {
		return nil
	}
	if r.wantSize >= 0 {
		return &Error{Path: string(r.path), Offset: r.off,
			Err: fmt.Errorf("%w: NAR continues past the expected %d bytes", ErrSizeMismatch, r.wantSize)}
	}
	return &Error{Path: string(r.path), Offset: r.off,
		Err: fmt.Errorf("NAR exceeds size limit of %d bytes", r.lim.MaxNARSize)}
}

func (r *Reader) scratchBuf(n int) []byte {
	if cap(r.scratch) < n {
		r.scratch = make([]byte, n)
	}
	return r.scratch[:n]
}

func (r *Reader) errorf(format string, args ...any) error {
	return &Error{Path: string(r.path), Offset: r.tok, Err: fmt.Errorf(format, args...)}
}

func (r *Reader) readError(what string, err error) error {
	return &Error{Path: string(r.path), Offset: r.off, Err: fmt.Errorf("reading %s: %w", what, err)}
}

func allZero(p []byte) bool {
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}
