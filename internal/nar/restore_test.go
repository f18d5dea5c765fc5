package nar

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	gonar "github.com/nix-community/go-nix/pkg/nar"
)

// makeTree writes a tree with every kind of node NARs can hold.
func makeTree(t *testing.T, root string) {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	big := make([]byte, 200_003)
	for i := range big {
		big[i] = byte(i * 7)
	}
	must(os.MkdirAll(filepath.Join(root, "sub", "deeper"), 0o755))
	must(os.MkdirAll(filepath.Join(root, "sub", "empty-dir"), 0o755))
	must(os.WriteFile(filepath.Join(root, "file"), []byte("hello\n"), 0o644))
	must(os.WriteFile(filepath.Join(root, "empty"), nil, 0o644))
	must(os.WriteFile(filepath.Join(root, "exec"), []byte("#!/bin/sh\necho hi\n"), 0o755))
	must(os.WriteFile(filepath.Join(root, "big"), big, 0o644))
	must(os.WriteFile(filepath.Join(root, "odd name \xff\n"), []byte("odd"), 0o600))
	must(os.WriteFile(filepath.Join(root, "sub", "deeper", "leaf"), []byte("leaf\n"), 0o444))
	must(os.Symlink("file", filepath.Join(root, "link")))
	must(os.Symlink("/nonexistent/dangling", filepath.Join(root, "abs")))
	must(os.Symlink("../file", filepath.Join(root, "sub", "up")))
}

func dumpPath(t *testing.T, path string) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := gonar.DumpPath(&buf, path); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestRoundTripDumpPath(t *testing.T) {
	tmp := t.TempDir()
	src := filepath.Join(tmp, "src")
	makeTree(t, src)
	nar := dumpPath(t, src)

	var out bytes.Buffer
	st, err := Copy(&out, bytes.NewReader(nar), DefaultLimits)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), nar) || st.Size != int64(len(nar)) || st.SHA256 != sha256.Sum256(nar) {
		t.Fatalf("Copy of go-nix's DumpPath output differs")
	}

	dst := filepath.Join(tmp, "dst")
	st2, err := Restore(dst, bytes.NewReader(nar), DefaultLimits)
	if err != nil {
		t.Fatal(err)
	}
	if st2 != st {
		t.Errorf("Restore stats %v, Copy stats %v", st2, st)
	}
	if again := dumpPath(t, dst); !bytes.Equal(again, nar) {
		t.Errorf("DumpPath of the restored tree differs from the original NAR (%d vs %d bytes)", len(again), len(nar))
	}

	for name, want := range map[string]fs.FileMode{
		"file":            0o444,
		"exec":            0o555,
		"sub":             fs.ModeDir | 0o755,
		"sub/deeper/leaf": 0o444,
		"link":            fs.ModeSymlink,
		"sub/empty-dir":   fs.ModeDir | 0o755,
		"odd name \xff\n": 0o444,
		"empty":           0o444,
		"big":             0o444,
		"abs":             fs.ModeSymlink,
		"sub/up":          fs.ModeSymlink,
		"sub/deeper":      fs.ModeDir | 0o755,
	} {
		fi, err := os.Lstat(filepath.Join(dst, name))
		if err != nil {
			t.Error(err)
			continue
		}
		got := fi.Mode()
		if got.Type() == fs.ModeSymlink {
			got = fs.ModeSymlink
		}
		if got != want {
			t.Errorf("%q: mode %v, want %v", name, got, want)
		}
	}
}

// Every valid fixture restores to a tree that dumps back to the same bytes,
// including a root that is a file, an executable, a symlink or empty.
func TestRestoreFixtures(t *testing.T) {
	for _, f := range validFixtures() {
		t.Run(f.name, func(t *testing.T) {
			dst := filepath.Join(t.TempDir(), "out")
			if _, err := Restore(dst, bytes.NewReader(f.nar), DefaultLimits); err != nil {
				t.Fatal(err)
			}
			if got := dumpPath(t, dst); !bytes.Equal(got, f.nar) {
				t.Errorf("restored tree dumps to other bytes")
			}
		})
	}
}

func TestRestoreRefusesExisting(t *testing.T) {
	tmp := t.TempDir()
	file := filepath.Join(tmp, "file")
	dirp := filepath.Join(tmp, "dir")
	dangling := filepath.Join(tmp, "dangling")
	if err := os.WriteFile(file, []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(dirp, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(tmp, "nowhere"), dangling); err != nil {
		t.Fatal(err)
	}
	for _, dst := range []string{file, dirp, dangling, dirp + "/"} {
		src := &countingReader{r: bytes.NewReader(exampleTokens)}
		_, err := Restore(dst, src, DefaultLimits)
		if !errors.Is(err, fs.ErrExist) {
			t.Errorf("Restore(%q): %v, want fs.ErrExist", dst, err)
		}
		if src.n != 0 {
			t.Errorf("Restore(%q) read %d bytes before refusing", dst, src.n)
		}
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "keep" {
		t.Errorf("existing file changed: %q, %v", b, err)
	}
	if ents, _ := os.ReadDir(dirp); len(ents) != 0 {
		t.Errorf("existing directory changed")
	}
	if _, err := os.Lstat(filepath.Join(tmp, "nowhere")); err == nil {
		t.Errorf("Restore followed a dangling symlink")
	}

	for _, dst := range []string{filepath.Join(tmp, "missing", "dst"), "/", "."} {
		src := &countingReader{r: bytes.NewReader(exampleTokens)}
		_, err := Restore(dst, src, DefaultLimits)
		var pe *fs.PathError
		if !errors.As(err, &pe) || src.n != 0 {
			t.Errorf("Restore(%q): %v after %d bytes; want a *fs.PathError before reading", dst, err, src.n)
		}
	}
}

// A NAR that is bad anywhere leaves nothing behind, and in particular
// writes nothing through a symlink it made.
func TestRestoreHostile(t *testing.T) {
	tmp := t.TempDir()
	outside := filepath.Join(tmp, "outside")
	if err := os.Mkdir(outside, 0o755); err != nil {
		t.Fatal(err)
	}
	// The clean-up must not follow the symlink either.
	canary := filepath.Join(outside, "canary")
	if err := os.WriteFile(canary, []byte("alive"), 0o644); err != nil {
		t.Fatal(err)
	}
	for name, nar := range map[string][]byte{
		"symlink then bad name": narOf(dir(
			entry("a", symlink(outside)),
			entry("b", symlink("../../../etc")),
			entry("c", dir(entry("..", regular("x")))),
		)),
		"symlink then same name as directory": narOf(dir(
			entry("a", symlink(outside)),
			entry("a", dir(entry("x", regular("pwned")))),
		)),
		"symlink then truncated": narOf(dir(
			entry("a", symlink(outside)),
			entry("b", regular("cut here")),
		))[:400],
	} {
		t.Run(name, func(t *testing.T) {
			dst := filepath.Join(tmp, "dst")
			_, err := Restore(dst, bytes.NewReader(nar), DefaultLimits)
			var nerr *Error
			if !errors.As(err, &nerr) {
				t.Fatalf("got %v, want a *Error", err)
			}
			if _, err := os.Lstat(dst); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("dst left behind: %v", err)
			}
			if ents, _ := os.ReadDir(outside); len(ents) != 1 || ents[0].Name() != "canary" {
				t.Errorf("Restore changed a directory outside dst: %v", ents)
			}
		})
	}
}

// Whatever is wrong with a NAR and wherever it is cut, Restore leaves dst
// absent.
func TestRestoreCleansUp(t *testing.T) {
	parent := t.TempDir()
	dst := filepath.Join(parent, "dst")
	check := func(what string, nar []byte) {
		t.Helper()
		_, err := Restore(dst, bytes.NewReader(nar), DefaultLimits)
		if err == nil {
			t.Fatalf("%s: Restore succeeded", what)
		}
		if ents, _ := os.ReadDir(parent); len(ents) != 0 {
			t.Fatalf("%s: %v: left %q behind", what, err, ents[0].Name())
		}
	}
	for _, f := range fixtures() {
		if f.wantErr != "" {
			check(f.name, f.nar)
			continue
		}
		// Every offset of the example; in the others, every token
		// boundary and some cuts inside long contents (the reader tests
		// try every offset; each Restore here costs file system work).
		for i := range len(f.nar) {
			if f.name == "valid-example" || (interestingCut(f.nar, i) && (i%8 == 0 || i%509 == 0)) {
				check(f.name+" cut at "+itoa(i), f.nar[:i])
			}
		}
	}
}

// File system failures are *fs.PathError with the full path, and clean up
// like the others.
func TestRestoreFileSystemError(t *testing.T) {
	long := strings.Repeat("n", 300) // over NAME_MAX; allowed by the limits below
	nar := narOf(dir(entry("a", dir(entry(long, regular("x"))))))
	parent := t.TempDir()
	dst := filepath.Join(parent, "dst")
	_, err := Restore(dst, bytes.NewReader(nar), Limits{MaxNameLen: 1000})
	var pe *fs.PathError
	if !errors.As(err, &pe) || !errors.Is(err, syscall.ENAMETOOLONG) {
		t.Fatalf("got %v (%T), want *fs.PathError with ENAMETOOLONG", err, err)
	}
	if want := filepath.Join(dst, "a", long); pe.Path != want {
		t.Errorf("Path = %q, want %q", pe.Path, want)
	}
	if ents, _ := os.ReadDir(parent); len(ents) != 0 {
		t.Errorf("left %q behind", ents[0].Name())
	}
}

// Restore reads the NAR and nothing after it.
func TestRestoreNoReadPastEnd(t *testing.T) {
	src := bytes.NewReader(cat(nestedNAR(), []byte("next message")))
	if _, err := Restore(filepath.Join(t.TempDir(), "out"), src, DefaultLimits); err != nil {
		t.Fatal(err)
	}
	if rest, _ := io.ReadAll(src); string(rest) != "next message" {
		t.Errorf("left %q, want %q", rest, "next message")
	}
}
