package nar

import (
	"bytes"
	"encoding/binary"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	gonar "github.com/nix-community/go-nix/pkg/nar"
)

var update = flag.Bool("update", false, "rewrite testdata/ from the fixtures defined in fixtures_test.go")

// wireString encodes s as a NAR string: u64 length, bytes, zero padding.
func wireString(s string) []byte {
	b := binary.LittleEndian.AppendUint64(nil, uint64(len(s)))
	b = append(b, s...)
	return append(b, make([]byte, -len(s)&7)...)
}

// tokens concatenates wire strings. A NAR is nothing else: even a file's
// contents is one such string.
func tokens(toks ...string) []byte {
	var b []byte
	for _, t := range toks {
		b = append(b, wireString(t)...)
	}
	return b
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

func u64(n uint64) []byte { return binary.LittleEndian.AppendUint64(nil, n) }

// Node builders, in canonical form.
func regular(contents string) []string {
	return []string{"(", "type", "regular", "contents", contents, ")"}
}

func executable(contents string) []string {
	return []string{"(", "type", "regular", "executable", "", "contents", contents, ")"}
}

func symlink(target string) []string {
	return []string{"(", "type", "symlink", "target", target, ")"}
}

func dir(entries ...[]string) []string {
	t := []string{"(", "type", "directory"}
	for _, e := range entries {
		t = append(t, e...)
	}
	return append(t, ")")
}

func entry(name string, node []string) []string {
	return append(append([]string{"entry", "(", "name", name, "node"}, node...), ")")
}

func narOf(node []string) []byte {
	return tokens(append([]string{"nix-archive-1"}, node...)...)
}

// exampleNAR is serve-protocol.md §5.1's example, written by go-nix's Writer
// the way nix-store --dump writes it.
func exampleNAR(t testing.TB) []byte {
	t.Helper()
	var buf bytes.Buffer
	nw, err := gonar.NewWriter(&buf)
	if err != nil {
		t.Fatal(err)
	}
	write := func(h *gonar.Header, contents string) {
		t.Helper()
		if err := nw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := nw.Write([]byte(contents)); err != nil {
			t.Fatal(err)
		}
	}
	write(&gonar.Header{Path: "/", Type: gonar.TypeDirectory}, "")
	write(&gonar.Header{Path: "/f", Type: gonar.TypeRegular, Size: 3}, "hi\n")
	write(&gonar.Header{Path: "/link", Type: gonar.TypeSymlink, LinkTarget: "f"}, "")
	write(&gonar.Header{Path: "/x", Type: gonar.TypeRegular, Size: 2, Executable: true}, "x\n")
	if err := nw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// The same bytes from our own token helpers, so fixtures need no Writer.
var exampleTokens = narOf(dir(
	entry("f", regular("hi\n")),
	entry("link", symlink("f")),
	entry("x", executable("x\n")),
))

const (
	exampleSize    = 704
	exampleNixHash = "sha256:00gc8cspxby41myj4g82r7jzjk8008j3qdsy0dfvl220azf548v0"
)

func nestedNAR() []byte {
	return narOf(dir(
		entry("a", dir(
			entry("b", dir(
				entry("c", regular("deep\n")),
			)),
			entry("empty", dir()),
		)),
		entry("big", regular(strings.Repeat("0123456789abcdef", 625)+"tail")),
		entry("bin", dir(
			entry("tool", executable("#!/bin/sh\necho 32-byte-aligned!\n")),
		)),
		entry("empty-file", regular("")),
		entry("lib", symlink("a/b")),
		entry("z", symlink("/nix/store/00000000000000000000000000000000-dangling")),
	))
}

// deepNAR nests depth directories named "d", the innermost holding a file.
func deepNAR(depth int) []byte {
	node := regular("bottom")
	for range depth - 1 {
		node = dir(entry("d", node))
	}
	return narOf(dir(entry("d", node)))
}

// fixture is a NAR kept under testdata/ and described in its README.
type fixture struct {
	name    string // file name without .nar
	desc    string // for testdata/README.md
	nar     []byte
	wantErr string // "" for a valid NAR, else a substring of the error
}

// corrupt returns a copy of nar with the byte at off set to 1.
func corrupt(nar []byte, off int) []byte {
	b := bytes.Clone(nar)
	b[off] = 1
	return b
}

func fixtures() []fixture {
	nameTok := func(name string) []byte { return narOf(dir(entry(name, regular("")))) }
	// Offset of the first padding byte of the entry name "a" in nameTok("a"):
	// magic 24, "(" 16, "type" 16, "directory" 24, "entry" 16, "(" 16,
	// "name" 16, then the name's length (8) and its byte.
	namePadOff := 24 + 16 + 16 + 24 + 16 + 16 + 16 + 8 + 1
	// In regular("hi\n") at the root: magic 24, "(" 16, "type" 16,
	// "regular" 16, "contents" 16, length 8, "hi\n" 3 bytes.
	contentsPadOff := 24 + 16 + 16 + 16 + 16 + 8 + 3
	root := func(toks ...string) []byte { return narOf(toks) }

	return []fixture{
		{name: "valid-example", desc: "serve-protocol.md §5.1: directory with `f` (\"hi\\n\"), symlink `link` → `f`, executable `x` (\"x\\n\"); 704 bytes, narHash " + exampleNixHash,
			nar: exampleTokens},
		{name: "valid-file", desc: "a regular file as the root", nar: narOf(regular("hello\n"))},
		{name: "valid-empty-file", desc: "an empty regular file as the root (contents of length 0 are still present)", nar: narOf(regular(""))},
		{name: "valid-executable", desc: "an executable file as the root", nar: narOf(executable("#!/bin/sh\n"))},
		{name: "valid-symlink", desc: "a symlink as the root, with an absolute target", nar: narOf(symlink("/nix/store/00000000000000000000000000000000-x"))},
		{name: "valid-empty-dir", desc: "an empty directory as the root", nar: narOf(dir())},
		{name: "valid-nested", desc: "nested and empty directories, an executable, an empty file, a 10 KB file, relative and dangling absolute symlinks", nar: nestedNAR()},

		{name: "bad-magic", desc: "magic `nix-archive-2`", wantErr: `not a NAR: expected magic "nix-archive-1", got "nix-archive-2"`,
			nar: tokens(append([]string{"nix-archive-2"}, regular("")...)...)},
		{name: "not-a-nar", desc: "text instead of a NAR: the first u64 is an absurd length", wantErr: "not a NAR",
			nar: []byte("#!/bin/sh\necho hello\n")},
		{name: "name-dot", desc: "entry named `.`", wantErr: `entry name ".": not allowed`, nar: nameTok(".")},
		{name: "name-dotdot", desc: "entry named `..`", wantErr: `entry name "..": not allowed`, nar: nameTok("..")},
		{name: "name-slash", desc: "entry named `a/b`", wantErr: `entry name "a/b": contains "/"`, nar: nameTok("a/b")},
		{name: "name-nul", desc: "entry named `a\\0b`", wantErr: `entry name "a\x00b": contains NUL`, nar: nameTok("a\x00b")},
		{name: "name-empty", desc: "entry with an empty name", wantErr: "entry name is empty", nar: nameTok("")},
		{name: "name-too-long", desc: "entry name of 256 bytes, one over NAME_MAX", wantErr: "entry name length 256 exceeds limit 255", nar: nameTok(strings.Repeat("n", 256))},
		{name: "unsorted", desc: "entries `b` then `a`", wantErr: `entry name "a": not sorted after "b"`,
			nar: narOf(dir(entry("b", regular("")), entry("a", regular(""))))},
		{name: "duplicate", desc: "two entries named `a`: a symlink, then a directory (a hostile NAR would like the second to go through the first)", wantErr: `entry name "a": duplicate`,
			nar: narOf(dir(entry("a", symlink("/tmp")), entry("a", dir(entry("x", regular("pwned"))))))},
		{name: "padding-name", desc: "non-zero padding after an entry name", wantErr: "non-zero padding after entry name",
			nar: corrupt(nameTok("a"), namePadOff)},
		{name: "padding-contents", desc: "non-zero padding after a file's contents", wantErr: "non-zero padding after file contents",
			nar: corrupt(narOf(regular("hi\n")), contentsPadOff)},
		{name: "executable-after-contents", desc: "`executable` after `contents` (2.8 accepted it, 2.32+ does not)", wantErr: `expected ")", got "executable"`,
			nar: root("(", "type", "regular", "contents", "x\n", "executable", "", ")")},
		{name: "executable-not-empty", desc: "`executable` followed by a non-empty string", wantErr: `expected "" after "executable", got "1"`,
			nar: root("(", "type", "regular", "executable", "1", "contents", "", ")")},
		{name: "name-after-node", desc: "`node` before `name` in an entry (2.32+ rejects it)", wantErr: `expected "name", got "node"`,
			nar: root("(", "type", "directory", "entry", "(", "node", "(", "type", "regular", "contents", "", ")", "name", "a", ")", ")")},
		{name: "type-not-first", desc: "a node that starts with `contents` instead of `type`", wantErr: `expected "type", got "contents"`,
			nar: root("(", "contents", "", "type", "regular", ")")},
		{name: "unknown-type", desc: "node type `fifo`", wantErr: `expected node type "regular", "directory" or "symlink", got "fifo"`,
			nar: root("(", "type", "fifo", ")")},
		{name: "symlink-empty", desc: "symlink with an empty target", wantErr: "symlink target is empty", nar: narOf(symlink(""))},
		{name: "symlink-nul", desc: "symlink target containing NUL", wantErr: `symlink target "a\x00b": contains NUL`, nar: narOf(symlink("a\x00b"))},
		{name: "huge-name-length", desc: "entry name length 2^60, then nothing: must fail on the length, not allocate or wait for data", wantErr: "entry name length 1152921504606846976 exceeds limit 255",
			nar: cat(tokens("nix-archive-1", "(", "type", "directory", "entry", "(", "name"), u64(1<<60))},
		{name: "huge-token-length", desc: "a token of length 2^60 where `(` belongs", wantErr: `expected "(", got a 1152921504606846976-byte string`,
			nar: cat(tokens("nix-archive-1"), u64(1<<60))},
		{name: "huge-file-size", desc: "file size 2^63+1 (negative as int64), then nothing", wantErr: "file size 9223372036854775809 exceeds limit",
			nar: cat(tokens("nix-archive-1", "(", "type", "regular", "contents"), u64(1<<63+1))},
		{name: "huge-target-length", desc: "symlink target length 2^40", wantErr: "symlink target length 1099511627776 exceeds limit 4095",
			nar: cat(tokens("nix-archive-1", "(", "type", "symlink", "target"), u64(1<<40))},
		{name: "too-deep", desc: "257 nested directories, one over DefaultLimits.MaxDepth", wantErr: "nesting deeper than 256", nar: deepNAR(257)},
		{name: "truncated", desc: "valid-example cut inside the contents of `f`", wantErr: "reading file contents: unexpected EOF", nar: exampleTokens[:234]},
		{name: "missing-close", desc: "valid-example without the root's closing `)`", wantErr: `reading "entry" or ")": unexpected EOF`, nar: exampleTokens[:exampleSize-16]},
	}
}

// TestTestdata keeps testdata/ in step with fixtures(); -update rewrites it.
func TestTestdata(t *testing.T) {
	fx := fixtures()
	var readme strings.Builder
	readme.WriteString(readmeHead)
	for _, f := range fx {
		kind := "valid"
		if f.wantErr != "" {
			kind = "invalid: `" + f.wantErr + "`"
			if !strconv.CanBackquote(f.wantErr) {
				kind = "invalid: `" + strconv.Quote(f.wantErr) + "`"
			}
		}
		fmt.Fprintf(&readme, "| `%s.nar` | %d | %s | %s |\n", f.name, len(f.nar), f.desc, kind)
	}
	files := map[string][]byte{"README.md": []byte(readme.String())}
	for _, f := range fx {
		files[f.name+".nar"] = f.nar
	}
	if *update {
		old, _ := filepath.Glob("testdata/*.nar")
		for _, p := range old {
			os.Remove(p)
		}
		for name, b := range files {
			if err := os.WriteFile(filepath.Join("testdata", name), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	for name, want := range files {
		got, err := os.ReadFile(filepath.Join("testdata", name))
		if err != nil {
			t.Fatalf("%v (run go test -run TestTestdata -update)", err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("testdata/%s is stale (run go test -run TestTestdata -update)", name)
		}
	}
	onDisk, _ := filepath.Glob("testdata/*.nar")
	if len(onDisk) != len(fx) {
		t.Errorf("testdata has %d .nar files, fixtures() %d (run go test -run TestTestdata -update)", len(onDisk), len(fx))
	}
}

const readmeHead = `# NAR fixtures

Generated from ` + "`fixtures()`" + ` in ../fixtures_test.go by
` + "`go test ./internal/nar/ -run TestTestdata -update`" + `; TestTestdata fails when
they drift. They seed FuzzReader.

Every token of a NAR is a wire string (u64 little-endian length, bytes, zero
padding to 8), so most fixtures are written token by token. Valid ones must
copy byte for byte and round-trip through Restore and go-nix's DumpPath;
invalid ones must fail with the quoted text in the error, without panicking,
hanging or allocating what a length field claims.

| File | Bytes | What | Expected |
|---|---|---|---|
`
