package nar

import (
	"errors"
	"fmt"
)

// Error is returned for everything the reader rejects and for read errors of
// the underlying stream. Err says what; it wraps [io.ErrUnexpectedEOF] when
// the NAR ends early, [ErrSizeMismatch] or [ErrHashMismatch] from [Verify],
// or the underlying reader's error.
type Error struct {
	// Path is the node where the problem was found: "" for the root, else
	// a slash-separated relative path. For a bad entry name it is the
	// directory holding the entry.
	Path string

	// Offset is the position in the NAR of the token that was rejected,
	// or, for a read error, the number of bytes consumed before it.
	Offset int64

	Err error
}

func (e *Error) Error() string {
	if e.Path == "" {
		return fmt.Sprintf("nar: at offset %d: %v", e.Offset, e.Err)
	}
	return fmt.Sprintf("nar: at offset %d, %q: %v", e.Offset, e.Path, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }

var (
	// ErrSizeMismatch is wrapped when a NAR's size differs from the
	// narSize given to Verify.
	ErrSizeMismatch = errors.New("size mismatch")

	// ErrHashMismatch is wrapped when a NAR's SHA-256 differs from the
	// narHash given to Verify.
	ErrHashMismatch = errors.New("hash mismatch")
)
