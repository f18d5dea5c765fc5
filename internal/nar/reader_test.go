package nar

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"regexp"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/google/go-cmp/cmp"
)

func TestExample(t *testing.T) {
	nar := exampleNAR(t)
	if !bytes.Equal(nar, exampleTokens) {
		t.Fatalf("go-nix Writer and the token helpers disagree on the example:\n%x\n%x", nar, exampleTokens)
	}
	var out bytes.Buffer
	st, err := Copy(&out, bytes.NewReader(nar), DefaultLimits)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size != exampleSize || st.NixHash() != exampleNixHash {
		t.Errorf("Copy: size %d, hash %s; want %d, %s", st.Size, st.NixHash(), exampleSize, exampleNixHash)
	}
	if st.SHA256 != sha256.Sum256(nar) {
		t.Errorf("Stats.SHA256 is not the SHA-256 of the NAR")
	}
	if !bytes.Equal(out.Bytes(), nar) {
		t.Errorf("Copy wrote other bytes than it read")
	}
}

// TestFixtures runs every fixture through Copy: valid ones copy exactly,
// invalid ones fail with the documented error.
func TestFixtures(t *testing.T) {
	for _, f := range fixtures() {
		t.Run(f.name, func(t *testing.T) {
			var out bytes.Buffer
			src := bytes.NewReader(f.nar)
			st, err := Copy(&out, src, Limits{})
			if f.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(out.Bytes(), f.nar) || st.Size != int64(len(f.nar)) || st.SHA256 != sha256.Sum256(f.nar) {
					t.Errorf("Copy: %d bytes, size %d; want the %d input bytes", out.Len(), st.Size, len(f.nar))
				}
				return
			}
			if err == nil {
				t.Fatalf("Copy accepted an invalid NAR")
			}
			var nerr *Error
			if !errors.As(err, &nerr) {
				t.Errorf("error %v (%T) is not a *nar.Error", err, err)
			}
			if !strings.Contains(err.Error(), f.wantErr) {
				t.Errorf("error %q does not contain %q", err, f.wantErr)
			}
			if !strings.HasPrefix(err.Error(), "nar: at offset ") || strings.HasSuffix(err.Error(), ".") {
				t.Errorf("error %q: want \"nar: at offset N…\" without a final period", err)
			}
			if st != (Stats{}) {
				t.Errorf("Copy returned stats %+v with an error", st)
			}
		})
	}
}

func TestErrorPathAndOffset(t *testing.T) {
	nar := narOf(dir(entry("a", dir(entry("b", dir(
		entry("ok", regular("")),
		entry("zz", dir(entry("..", regular("")))),
	))))))
	_, err := Copy(io.Discard, bytes.NewReader(nar), DefaultLimits)
	var nerr *Error
	if !errors.As(err, &nerr) {
		t.Fatalf("got %v, want *Error", err)
	}
	if nerr.Path != "a/b/zz" {
		t.Errorf("Path = %q, want the directory holding the bad entry, %q", nerr.Path, "a/b/zz")
	}
	if want := cat(u64(2), []byte("..")); !bytes.HasPrefix(nar[nerr.Offset:], want) {
		t.Errorf("Offset %d does not point at the name token", nerr.Offset)
	}
	re := regexp.MustCompile(`^nar: at offset \d+, "a/b/zz": entry name "\.\.": not allowed$`)
	if !re.MatchString(err.Error()) {
		t.Errorf("message %q does not match %s", err, re)
	}
	if !errors.Is(nerr, nerr.Err) || errors.Unwrap(nerr) != nerr.Err {
		t.Errorf("Error does not unwrap to Err")
	}
}

type node struct {
	Header
	Contents string
}

// readAll walks a NAR with Next and Read.
func readAll(t *testing.T, nr *Reader) []node {
	t.Helper()
	var nodes []node
	for {
		hdr, err := nr.Next()
		if err == io.EOF {
			return nodes
		}
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(nr)
		if err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, node{*hdr, string(b)})
	}
}

func TestReaderHeaders(t *testing.T) {
	big := strings.Repeat("0123456789abcdef", 625) + "tail"
	want := []node{
		{Header{Path: "", Type: TypeDirectory}, ""},
		{Header{Path: "a", Type: TypeDirectory}, ""},
		{Header{Path: "a/b", Type: TypeDirectory}, ""},
		{Header{Path: "a/b/c", Type: TypeRegular, Size: 5}, "deep\n"},
		{Header{Path: "a/empty", Type: TypeDirectory}, ""},
		{Header{Path: "big", Type: TypeRegular, Size: int64(len(big))}, big},
		{Header{Path: "bin", Type: TypeDirectory}, ""},
		{Header{Path: "bin/tool", Type: TypeRegular, Executable: true, Size: 32}, "#!/bin/sh\necho 32-byte-aligned!\n"},
		{Header{Path: "empty-file", Type: TypeRegular}, ""},
		{Header{Path: "lib", Type: TypeSymlink, LinkTarget: "a/b"}, ""},
		{Header{Path: "z", Type: TypeSymlink, LinkTarget: "/nix/store/00000000000000000000000000000000-dangling"}, ""},
	}
	nar := nestedNAR()
	// One byte at a time from the source, to show that short reads from
	// the underlying reader are handled.
	nr := NewReader(iotest.OneByteReader(bytes.NewReader(nar)), DefaultLimits)
	if diff := cmp.Diff(want, readAll(t, nr)); diff != "" {
		t.Errorf("nodes (-want +got):\n%s", diff)
	}
	if st := nr.Stats(); st.Size != int64(len(nar)) || st.SHA256 != sha256.Sum256(nar) {
		t.Errorf("Stats = %d bytes; want %d and the NAR's hash", st.Size, len(nar))
	}
	if _, err := nr.Next(); err != io.EOF {
		t.Errorf("Next after the end: %v, want io.EOF", err)
	}
	if n, err := nr.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Errorf("Read after the end: %d, %v; want 0, io.EOF", n, err)
	}
	if Type(9).String() != "Type(9)" || TypeSymlink.String() != "symlink" {
		t.Errorf("Type.String: %q, %q", Type(9), TypeSymlink)
	}
}

// Reading part of a file and then calling Next skips the rest; the skipped
// bytes are hashed like the others.
func TestPartialReadThenNext(t *testing.T) {
	nar := nestedNAR()
	nr := NewReader(bytes.NewReader(nar), DefaultLimits)
	var paths []string
	for {
		hdr, err := nr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		paths = append(paths, hdr.Path)
		if hdr.Type == TypeDirectory {
			if n, err := nr.Read(make([]byte, 8)); n != 0 || err != io.EOF {
				t.Errorf("Read on directory %q: %d, %v; want 0, io.EOF", hdr.Path, n, err)
			}
		}
		if hdr.Path == "big" {
			p := make([]byte, 5)
			if _, err := io.ReadFull(nr, p); err != nil || string(p) != "01234" {
				t.Fatalf("ReadFull: %q, %v", p, err)
			}
		}
	}
	if len(paths) != 11 {
		t.Errorf("got %d nodes, want 11: %q", len(paths), paths)
	}
	if st := nr.Stats(); st.Size != int64(len(nar)) || st.SHA256 != sha256.Sum256(nar) {
		t.Errorf("Stats after skipping: %d bytes, want %d and the NAR's hash", st.Size, len(nar))
	}
}

func validFixtures() []fixture {
	var v []fixture
	for _, f := range fixtures() {
		if f.wantErr == "" {
			v = append(v, f)
		}
	}
	return v
}

// Every proper prefix of a valid NAR is an error wrapping
// io.ErrUnexpectedEOF, through Copy and through Next and Read.
func TestTruncatedEverywhere(t *testing.T) {
	for _, f := range validFixtures() {
		for i := range len(f.nar) {
			if !interestingCut(f.nar, i) {
				continue
			}
			_, err := Copy(io.Discard, bytes.NewReader(f.nar[:i]), DefaultLimits)
			var nerr *Error
			if !errors.As(err, &nerr) || !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("%s cut at %d: Copy: %v; want a *Error wrapping io.ErrUnexpectedEOF", f.name, i, err)
			}
			if nerr.Offset != int64(i) {
				t.Fatalf("%s cut at %d: Offset %d, want %d", f.name, i, nerr.Offset, i)
			}

			nr := NewReader(iotest.HalfReader(bytes.NewReader(f.nar[:i])), DefaultLimits)
			for {
				_, err = nr.Next()
				if err == nil {
					_, err = io.Copy(io.Discard, nr)
				}
				if err != nil {
					break
				}
			}
			if !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("%s cut at %d: Next/Read: %v; want io.ErrUnexpectedEOF", f.name, i, err)
			}
			if _, err2 := nr.Next(); err2 != err {
				t.Fatalf("%s cut at %d: error not sticky: %v then %v", f.name, i, err, err2)
			}
		}
	}
}

// interestingCut reports whether to cut nar at i: everywhere in small NARs,
// and in large ones everywhere but the middle of long file contents, where
// every cut is alike and trying them all would take quadratic time.
func interestingCut(nar []byte, i int) bool {
	return len(nar) <= 4096 || i < 2048 || i >= len(nar)-2048 || i%509 == 0
}

// The reader consumes the NAR and not one byte more, so a protocol stream
// can go on after it.
func TestNoReadPastEnd(t *testing.T) {
	trailer := []byte("\x05\x00\x00\x00\x00\x00\x00\x00after")
	for _, f := range validFixtures() {
		t.Run(f.name, func(t *testing.T) {
			src := bytes.NewReader(cat(f.nar, trailer))
			var out bytes.Buffer
			if _, err := Copy(&out, src, DefaultLimits); err != nil {
				t.Fatal(err)
			}
			rest, _ := io.ReadAll(src)
			if !bytes.Equal(out.Bytes(), f.nar) || !bytes.Equal(rest, trailer) {
				t.Errorf("Copy wrote %d bytes and left %q; want %d and %q", out.Len(), rest, len(f.nar), trailer)
			}

			// Same through Next and Read, with short reads.
			src = bytes.NewReader(cat(f.nar, trailer))
			nr := NewReader(iotest.HalfReader(src), DefaultLimits)
			readAll(t, nr)
			rest, _ = io.ReadAll(src)
			if !bytes.Equal(rest, trailer) {
				t.Errorf("Next/Read left %q, want %q", rest, trailer)
			}
		})
	}
}

func TestLimits(t *testing.T) {
	nar := nestedNAR() // 11 nodes, depth 3, largest file 10004 bytes
	for _, tc := range []struct {
		lim     Limits
		wantErr string
	}{
		{Limits{MaxDepth: 3}, ""},
		{Limits{MaxDepth: 2}, "nesting deeper than 2"},
		{Limits{MaxEntries: 11}, ""},
		{Limits{MaxEntries: 10}, "more than 10 entries"},
		{Limits{MaxFileSize: 10004}, ""},
		{Limits{MaxFileSize: 10003}, "file size 10004 exceeds limit 10003"},
		{Limits{MaxNameLen: 10}, ""},
		{Limits{MaxNameLen: 9}, `entry name length 10 exceeds limit 9`},
		{Limits{MaxTargetLen: 52}, ""},
		{Limits{MaxTargetLen: 51}, "symlink target length 52 exceeds limit 51"},
		{Limits{MaxNARSize: int64(len(nar))}, ""},
		{Limits{MaxNARSize: int64(len(nar)) - 1}, "NAR exceeds size limit"},
		{Limits{MaxNARSize: 1000}, "NAR exceeds size limit of 1000 bytes"},
	} {
		src := bytes.NewReader(nar)
		_, err := Copy(io.Discard, src, tc.lim)
		switch {
		case tc.wantErr == "" && err != nil:
			t.Errorf("%+v: %v", tc.lim, err)
		case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
			t.Errorf("%+v: got %v, want %q", tc.lim, err, tc.wantErr)
		}
		if consumed := src.Size() - int64(src.Len()); tc.lim.MaxNARSize > 0 && consumed > tc.lim.MaxNARSize {
			t.Errorf("%+v: read %d bytes, past the limit", tc.lim, consumed)
		}
	}
}

// A stream that never ends is stopped by the limits, having read no more
// than MaxNARSize bytes.
func TestEndlessStream(t *testing.T) {
	src := &endlessNAR{}
	_, err := Copy(io.Discard, src, Limits{MaxNARSize: 1 << 20})
	if err == nil || !strings.Contains(err.Error(), "NAR exceeds size limit") {
		t.Errorf("got %v, want the NAR size limit", err)
	}
	if src.served > 1<<20 {
		t.Errorf("read %d bytes, past the limit", src.served)
	}

	src = &endlessNAR{}
	_, err = Copy(io.Discard, src, Limits{MaxEntries: 1000})
	if err == nil || !strings.Contains(err.Error(), "more than 1000 entries") {
		t.Errorf("got %v, want the entry limit", err)
	}
}

// endlessNAR is a directory whose entries never end.
type endlessNAR struct {
	pending []byte
	i       int
	served  int64
}

func (e *endlessNAR) Read(p []byte) (int, error) {
	if len(e.pending) == 0 {
		if e.i == 0 {
			e.pending = tokens("nix-archive-1", "(", "type", "directory")
		} else {
			e.pending = tokens(entry(strings.Repeat("0", 12-len(itoa(e.i)))+itoa(e.i), regular("x"))...)
		}
		e.i++
	}
	n := copy(p, e.pending)
	e.pending = e.pending[n:]
	e.served += int64(n)
	return n, nil
}

func itoa(i int) string {
	var b []byte
	for ; i > 0 || len(b) == 0; i /= 10 {
		b = append([]byte{byte('0' + i%10)}, b...)
	}
	return string(b)
}

// A read error from the source is an *Error wrapping it.
func TestSourceError(t *testing.T) {
	boom := errors.New("connection reset")
	src := io.MultiReader(bytes.NewReader(exampleTokens[:100]), iotest.ErrReader(boom))
	_, err := Copy(io.Discard, src, DefaultLimits)
	var nerr *Error
	if !errors.As(err, &nerr) || !errors.Is(err, boom) || nerr.Offset != 100 {
		t.Errorf("got %v; want a *Error at offset 100 wrapping %v", err, boom)
	}
}

// An error from Copy's writer is returned as it is.
func TestCopyWriterError(t *testing.T) {
	boom := errors.New("disk full")
	_, err := Copy(failingWriter{boom}, bytes.NewReader(nestedNAR()), DefaultLimits)
	if err != boom {
		t.Errorf("got %v, want the writer's error unchanged", err)
	}
	_, err = Copy(shortWriter{}, bytes.NewReader(nestedNAR()), DefaultLimits)
	if err != io.ErrShortWrite {
		t.Errorf("short write: got %v, want io.ErrShortWrite", err)
	}
}

type failingWriter struct{ err error }

func (w failingWriter) Write(p []byte) (int, error) { return 0, w.err }

type shortWriter struct{}

func (shortWriter) Write(p []byte) (int, error) { return len(p) / 2, nil }
