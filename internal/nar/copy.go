package nar

import (
	"bufio"
	"bytes"
	"fmt"
	"io"

	"github.com/nix-community/go-nix/pkg/nixhash"
)

// Copy reads one whole NAR from r, validating it, and writes exactly the
// bytes it consumed to w. It reads nothing past the NAR's end. It returns the
// NAR's [Stats].
//
// Errors from r or in the NAR are [*Error]; an error from w is returned
// unchanged. On error, w may have received part of the NAR.
func Copy(w io.Writer, r io.Reader, lim Limits) (Stats, error) {
	nr := NewReader(r, lim)
	return nr.copyTo(w)
}

// Verify is [Copy] that also checks the NAR against the narSize and narHash
// its sender claimed. wantHash is a SHA-256 in any form Nix prints:
// "sha256:" followed by Nix base-32 or hex, bare base-32 or hex, or SRI
// "sha256-<base64>".
//
// Verify reads at most wantSize bytes: a NAR that would need more fails as
// soon as the grammar asks for them, with an [*Error] wrapping
// [ErrSizeMismatch]. A NAR that is shorter also wraps ErrSizeMismatch, and
// one with another hash wraps [ErrHashMismatch]. Bad arguments are reported
// before anything is read.
func Verify(w io.Writer, r io.Reader, wantSize int64, wantHash string, lim Limits) (Stats, error) {
	sha256Algo := nixhash.SHA256
	h, err := nixhash.ParseAny(wantHash, &sha256Algo)
	if err != nil {
		return Stats{}, fmt.Errorf("nar: expected hash %q: %w", wantHash, err)
	}
	nr := NewReader(r, lim)
	if wantSize < 0 || wantSize > nr.lim.MaxNARSize {
		return Stats{}, fmt.Errorf("nar: expected size %d is outside 0..%d", wantSize, nr.lim.MaxNARSize)
	}
	nr.lim.MaxNARSize = wantSize
	nr.wantSize = wantSize

	st, err := nr.copyTo(w)
	if err != nil {
		return Stats{}, err
	}
	if st.Size != wantSize {
		return Stats{}, &Error{Offset: st.Size,
			Err: fmt.Errorf("%w: NAR ended after %d bytes, expected %d", ErrSizeMismatch, st.Size, wantSize)}
	}
	if !bytes.Equal(st.SHA256[:], h.Digest()) {
		want := Stats{}
		copy(want.SHA256[:], h.Digest())
		return Stats{}, &Error{Offset: st.Size,
			Err: fmt.Errorf("%w: got %s, expected %s", ErrHashMismatch, st.NixHash(), want.NixHash())}
	}
	return st, nil
}

// copyTo reads the rest of the NAR, writing every byte consumed to w.
func (r *Reader) copyTo(w io.Writer) (Stats, error) {
	// Tokens are 8-byte writes; batch them.
	bw := bufio.NewWriterSize(w, skipChunk)
	r.tee = bw
	for {
		_, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return Stats{}, err
		}
	}
	if err := bw.Flush(); err != nil {
		return Stats{}, err
	}
	return r.Stats(), nil
}
