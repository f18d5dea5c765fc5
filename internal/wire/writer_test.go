package wire

import (
	"bufio"
	"bytes"
	"errors"
	"testing"
)

// The Writer writes what the Reader reads back, and what Nix's writeString
// writes (the hand-written encoding of reader_test.go).
func TestWriterEncodes(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(bufio.NewWriter(&buf))
	w.Uint64(7)
	w.Bool(true)
	w.String("try")
	w.Strings([]string{"b", "a"})
	w.Set([]string{"b", "a", "b"})
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	want := appendU64(nil, 7)
	want = appendU64(want, 1)
	want = appendString(want, "try")
	want = appendString(appendString(appendU64(want, 2), "b"), "a")
	want = appendString(appendString(appendU64(want, 2), "a"), "b")
	if !bytes.Equal(buf.Bytes(), want) {
		t.Errorf("got\n% x\nwant\n% x", buf.Bytes(), want)
	}
}

type failWriter struct{}

var errBroken = errors.New("broken pipe")

func (failWriter) Write(p []byte) (int, error) { return 0, errBroken }

// The first error sticks, so a request is written without checking each
// field: Err and Flush report it, and Write returns it.
func TestWriterKeepsFirstError(t *testing.T) {
	w := NewWriter(bufio.NewWriterSize(failWriter{}, 16))
	w.Uint64(1)
	if w.Err() != nil {
		t.Fatalf("error before anything reached the writer: %v", w.Err())
	}
	w.String("more than sixteen bytes")
	if w.Err() != errBroken {
		t.Fatalf("Err %v", w.Err())
	}
	w.Set([]string{"a"})
	if n, err := w.Write([]byte("x")); n != 0 || err != errBroken {
		t.Errorf("Write after the error: %d, %v", n, err)
	}
	if err := w.Flush(); err != errBroken {
		t.Errorf("Flush %v", err)
	}
}
