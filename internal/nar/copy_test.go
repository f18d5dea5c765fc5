package nar

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/nix-community/go-nix/pkg/nixbase32"
)

func TestVerify(t *testing.T) {
	sum := sha256.Sum256(exampleTokens)
	nix32 := nixbase32.EncodeToString(sum[:])
	hexs := hex.EncodeToString(sum[:])
	for _, h := range []string{
		exampleNixHash,
		nix32,
		"sha256:" + hexs,
		hexs,
		"sha256-" + base64.StdEncoding.EncodeToString(sum[:]),
	} {
		var out bytes.Buffer
		st, err := Verify(&out, bytes.NewReader(exampleTokens), exampleSize, h, DefaultLimits)
		if err != nil {
			t.Errorf("Verify with %q: %v", h, err)
			continue
		}
		if st.Size != exampleSize || st.NixHash() != exampleNixHash || !bytes.Equal(out.Bytes(), exampleTokens) {
			t.Errorf("Verify with %q: %d bytes, %s, wrote %d bytes", h, st.Size, st.NixHash(), out.Len())
		}
	}
}

func TestVerifyMismatch(t *testing.T) {
	other := sha256.Sum256([]byte("something else"))
	otherHash := "sha256:" + nixbase32.EncodeToString(other[:])

	for _, tc := range []struct {
		name     string
		src      io.Reader
		size     int64
		hash     string
		want     error
		wantText string
		maxRead  int64
	}{
		{"wrong hash", bytes.NewReader(exampleTokens), exampleSize, otherHash, ErrHashMismatch,
			"hash mismatch: got " + exampleNixHash + ", expected " + otherHash, exampleSize},
		{"shorter than claimed", bytes.NewReader(exampleTokens), exampleSize + 8, exampleNixHash, ErrSizeMismatch,
			"NAR ended after 704 bytes, expected 712", exampleSize},
		{"longer than claimed", bytes.NewReader(exampleTokens), exampleSize - 8, exampleNixHash, ErrSizeMismatch,
			"NAR continues past the expected 696 bytes", exampleSize - 8},
		{"claimed empty", bytes.NewReader(exampleTokens), 0, exampleNixHash, ErrSizeMismatch,
			"NAR continues past the expected 0 bytes", 0},
		// A stream that would never end stops at the claimed size.
		{"endless", &endlessNAR{}, 4096, exampleNixHash, ErrSizeMismatch,
			"NAR continues past the expected 4096 bytes", 4096},
		// A file claiming more than the NAR may hold fails on its
		// length, before its contents are read.
		{"huge file", io.MultiReader(
			bytes.NewReader(cat(tokens("nix-archive-1", "(", "type", "regular", "contents"), u64(1<<40))),
			zeros{}), 1 << 20, exampleNixHash, ErrSizeMismatch, "NAR continues past the expected 1048576 bytes", 96},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := &countingReader{r: tc.src}
			var out bytes.Buffer
			st, err := Verify(&out, src, tc.size, tc.hash, DefaultLimits)
			var nerr *Error
			if !errors.Is(err, tc.want) || !errors.As(err, &nerr) || !strings.Contains(err.Error(), tc.wantText) {
				t.Fatalf("got %v; want a *Error wrapping %v with %q", err, tc.want, tc.wantText)
			}
			if st != (Stats{}) {
				t.Errorf("stats %+v returned with an error", st)
			}
			if src.n > tc.maxRead {
				t.Errorf("read %d bytes, want at most %d", src.n, tc.maxRead)
			}
		})
	}
}

// Bad arguments fail before anything is read.
func TestVerifyArguments(t *testing.T) {
	for _, tc := range []struct {
		size int64
		hash string
	}{
		{exampleSize, "sha256:tooshort"},
		{exampleSize, "md5:" + strings.Repeat("0", 32)},
		{exampleSize, ""},
		{-1, exampleNixHash},
		{DefaultLimits.MaxNARSize + 1, exampleNixHash},
	} {
		src := &countingReader{r: bytes.NewReader(exampleTokens)}
		_, err := Verify(io.Discard, src, tc.size, tc.hash, DefaultLimits)
		if err == nil || !strings.HasPrefix(err.Error(), "nar: expected ") {
			t.Errorf("Verify(%d, %q): %v; want an argument error", tc.size, tc.hash, err)
		}
		if src.n != 0 {
			t.Errorf("Verify(%d, %q) read %d bytes before rejecting its arguments", tc.size, tc.hash, src.n)
		}
	}
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}
