package servetest

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/nix-offload/nix-offload/internal/nar"
	"github.com/nix-offload/nix-offload/internal/serveproto"
)

var update = flag.Bool("update", false, "rewrite testdata/fuzz/FuzzReadExportStream from exportSeeds")

// Store paths of the tests.
const (
	pathA   = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a"
	pathB   = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b"
	pathC   = "/nix/store/cccccccccccccccccccccccccccccccc-c"
	pathDrv = "/nix/store/dddddddddddddddddddddddddddddddd-b.drv"
)

// exportEntry writes one path of an export stream by hand.
func exportEntry(e *Enc, narBytes []byte, path string, refs []string, deriver string) *Enc {
	return e.U64(1).Raw(narBytes).U64(exportMagic).Str(path).Strs(refs).Str(deriver).U64(0)
}

var dirNAR = NAR("nix-archive-1", "(", "type", "directory",
	"entry", "(", "name", "bin", "node", "(", "type", "directory",
	"entry", "(", "name", "run", "node", "(", "type", "regular", "executable", "", "contents", "#!/bin/sh\n", ")", ")",
	")", ")",
	"entry", "(", "name", "link", "node", "(", "type", "symlink", "target", "bin/run", ")", ")",
	")")

// exportSeeds are the seed corpus of FuzzReadExportStream, by file name,
// and the text each invalid one's error must contain ("" for valid ones).
func exportSeeds() map[string]struct {
	data []byte
	want string
} {
	file := FileNAR("hello\n")
	one := exportEntry(new(Enc), file, pathA, nil, "").U64(0).Bytes()
	type seed = struct {
		data []byte
		want string
	}
	return map[string]seed{
		"empty":    {new(Enc).U64(0).Bytes(), ""},
		"one-path": {one, ""},
		"two-paths-with-references": {exportEntry(exportEntry(new(Enc), file, pathA, nil, ""),
			dirNAR, pathB, []string{pathA, pathB}, pathDrv).U64(0).Bytes(), ""},
		"trailing-bytes":   {append(slices.Clone(one), "after the end"...), ""},
		"bad-marker":       {new(Enc).U64(2).Bytes(), "marker: 2 is neither 1"},
		"bad-magic":        {new(Enc).U64(1).Raw(file).U64(0x4558494f).Bytes(), "magic: 0x4558494f"},
		"legacy-signature": {new(Enc).U64(1).Raw(file).U64(exportMagic).Str(pathA).U64(0).Str("").U64(1).Str("sig").Bytes(), "legacy signature"},
		"unsorted-references": {exportEntry(new(Enc), file, pathC, []string{pathB, pathA}, "").U64(0).Bytes(),
			"references: path 1: " + pathA + " is not sorted after " + pathB},
		"duplicate-references": {exportEntry(new(Enc), file, pathC, []string{pathA, pathA}, "").U64(0).Bytes(), "is not sorted after"},
		"path-escapes":         {exportEntry(new(Enc), file, "/nix/store/../../etc/passwd", nil, "").U64(0).Bytes(), "path: path \"/nix/store/../../etc/passwd\" is not a store path"},
		"bad-deriver":          {exportEntry(new(Enc), file, pathA, nil, "/etc/passwd").U64(0).Bytes(), "deriver: path \"/etc/passwd\" is not in /nix/store"},
		"nar-dotdot": {exportEntry(new(Enc), NAR("nix-archive-1", "(", "type", "directory",
			"entry", "(", "name", "..", "node", "(", "type", "regular", "contents", "x", ")", ")", ")"), pathA, nil, "").U64(0).Bytes(),
			`NAR: nar: at offset 128: entry name "..": not allowed`},
		"absurd-reference-count": {new(Enc).U64(1).Raw(file).U64(exportMagic).Str(pathA).U64(1 << 62).Bytes(), "references: count: 4611686018427387904 exceeds"},
		"absurd-path-length":     {new(Enc).U64(1).Raw(file).U64(exportMagic).U64(1 << 62).Bytes(), "path: length 4611686018427387904 exceeds 255"},
		"absurd-file-size":       {new(Enc).U64(1).Raw(NAR("nix-archive-1", "(", "type", "regular", "contents", Len(1<<62))).Bytes(), "NAR: nar: at offset 88: file size 4611686018427387904 exceeds"},
		"truncated":              {one[:len(one)/2], "unexpected EOF"},
		"no-end-marker":          {one[:len(one)-8], "path 1: marker: unexpected EOF"},
	}
}

// fuzzLimits keep each fuzz input cheap.
var fuzzLimits = ExportLimits{
	NAR:      nar.Limits{MaxDepth: 16, MaxEntries: 256, MaxFileSize: 1 << 16, MaxNARSize: 1 << 20},
	MaxPaths: 64,
	MaxRefs:  64,
}

// readAll reads a stream and returns the items and how many bytes it took.
func readAll(data []byte, lim ExportLimits) ([]ExportItem, int, error) {
	r := bytes.NewReader(data)
	items, err := ReadExportStream(r, lim)
	return items, len(data) - r.Len(), err
}

// importPathsBytes returns the export stream serveproto.Conn.ImportPaths
// writes for items, with the sizes and hashes they carry checked.
func importPathsBytes(items []ExportItem) ([]byte, error) {
	reply := new(Enc).U64(serverMagic, DefaultVersion, 1).Bytes()
	var req bytes.Buffer
	c, err := serveproto.Handshake(bytes.NewReader(reply), &req, serveproto.Options{})
	if err != nil {
		return nil, err
	}
	var in []serveproto.ExportItem
	for _, it := range items {
		in = append(in, serveproto.ExportItem{Info: it.Info, NAR: bytes.NewReader(it.NAR)})
	}
	if err := c.ImportPaths(in); err != nil {
		return nil, err
	}
	const head = 3 * 8 // magic, version, command 4
	if req.Len() < head || !bytes.Equal(req.Bytes()[16:head], new(Enc).U64(4).Bytes()) {
		return nil, fmt.Errorf("request does not start with the greeting and command 4: % x", req.Bytes()[:min(req.Len(), head)])
	}
	return req.Bytes()[head:], nil
}

// FuzzReadExportStream reads arbitrary bytes as an export stream. It must
// never panic or allocate what a length claims; it rejects with an
// *ExportError that says where; and whatever it accepts is exactly what
// serveproto.Conn.ImportPaths writes for the paths it read: the reader
// accepts only the canonical stream, and the writer reproduces it.
func FuzzReadExportStream(f *testing.F) {
	for _, s := range exportSeeds() {
		f.Add(s.data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		items, n, err := readAll(data, fuzzLimits)
		if err != nil {
			var xe *ExportError
			if !errors.As(err, &xe) || !strings.HasPrefix(err.Error(), "export stream: path ") {
				t.Fatalf("error %v (%T) is not an *ExportError", err, err)
			}
			return
		}
		for _, it := range items {
			for _, p := range append([]string{it.Info.Path}, it.Info.References...) {
				if checkStorePath(p) != nil {
					t.Fatalf("accepted path %q", p)
				}
			}
			if !slices.IsSorted(it.Info.References) {
				t.Fatalf("accepted unsorted references %q", it.Info.References)
			}
		}
		again, err := importPathsBytes(items)
		if err != nil {
			t.Fatalf("ImportPaths rejects what the reader accepted: %v", err)
		}
		if !bytes.Equal(again, data[:n]) {
			t.Fatalf("ImportPaths writes\n%q\nfor the stream\n%q", again, data[:n])
		}
	})
}

// TestExportSeeds checks what the reader says of each seed, and that the
// committed corpus is the one exportSeeds describes (-update rewrites it).
func TestExportSeeds(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzReadExportStream")
	seeds := exportSeeds()
	if *update {
		if err := os.RemoveAll(dir); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for name, s := range seeds {
		t.Run(name, func(t *testing.T) {
			_, _, err := readAll(s.data, DefaultExportLimits)
			switch {
			case s.want == "" && err != nil:
				t.Errorf("rejected: %v", err)
			case s.want != "" && (err == nil || !strings.Contains(err.Error(), s.want)):
				t.Errorf("error %v\nwant one containing %q", err, s.want)
			}
			file := filepath.Join(dir, name)
			corpus := "go test fuzz v1\n[]byte(" + strconv.Quote(string(s.data)) + ")\n"
			if *update {
				if err := os.WriteFile(file, []byte(corpus), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			b, err := os.ReadFile(file)
			if err != nil || string(b) != corpus {
				t.Errorf("%s is missing or out of date (%v): run go test -run TestExportSeeds -update", file, err)
			}
		})
	}
	if !*update {
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			if _, ok := seeds[e.Name()]; !ok {
				t.Errorf("%s/%s is not an export seed any more", dir, e.Name())
			}
		}
	}
}

// randomNAR returns a canonical NAR of a random small tree.
func randomNAR(r *rand.Rand, depth int) []byte {
	return NAR(append([]any{"nix-archive-1"}, randomNode(r, depth)...)...)
}

func randomNode(r *rand.Rand, depth int) []any {
	k := r.IntN(4)
	if depth == 0 && k == 3 {
		k = 0
	}
	switch k {
	case 0:
		return []any{"(", "type", "regular", "contents", strings.Repeat("x", r.IntN(20)), ")"}
	case 1:
		return []any{"(", "type", "regular", "executable", "", "contents", strconv.Itoa(r.Int()), ")"}
	case 2:
		return []any{"(", "type", "symlink", "target", "../" + strconv.Itoa(r.IntN(100)), ")"}
	}
	names := map[string]bool{}
	for range r.IntN(4) {
		names[string(rune('a'+r.IntN(26)))+strconv.Itoa(r.IntN(3))] = true
	}
	sorted := make([]string, 0, len(names))
	for n := range names {
		sorted = append(sorted, n)
	}
	sort.Strings(sorted)
	toks := []any{"(", "type", "directory"}
	for _, n := range sorted {
		toks = append(toks, "entry", "(", "name", n, "node")
		toks = append(toks, randomNode(r, depth-1)...)
		toks = append(toks, ")")
	}
	return append(toks, ")")
}

// TestImportPathsRoundTrip: for random sets of paths (references to
// earlier paths and to themselves, with and without deriver), what
// Conn.ImportPaths writes reads back as the same paths and NARs, and
// re-encodes to the same bytes.
func TestImportPathsRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for iter := range 200 {
		var items []ExportItem
		for i := range r.IntN(5) {
			narBytes := randomNAR(r, 3)
			st, err := nar.Copy(io.Discard, bytes.NewReader(narBytes), nar.DefaultLimits)
			if err != nil {
				t.Fatalf("random NAR: %v", err)
			}
			info := serveproto.PathInfo{
				Path:    fmt.Sprintf("/nix/store/%032d-p%d", iter, i),
				NarSize: uint64(st.Size),
				NarHash: st.NixHash(),
			}
			for _, prev := range items {
				if r.IntN(2) == 0 {
					info.References = append(info.References, prev.Info.Path)
				}
			}
			if r.IntN(2) == 0 {
				info.References = append(info.References, info.Path)
			}
			if r.IntN(2) == 0 {
				info.Deriver = fmt.Sprintf("/nix/store/%032d-p%d.drv", iter, i)
			}
			items = append(items, ExportItem{Info: info, NAR: narBytes})
		}
		stream, err := importPathsBytes(items)
		if err != nil {
			t.Fatal(err)
		}
		got, n, err := readAll(stream, DefaultExportLimits)
		if err != nil {
			t.Fatalf("iteration %d: reading what ImportPaths wrote: %v", iter, err)
		}
		if n != len(stream) {
			t.Errorf("iteration %d: read %d of %d bytes", iter, n, len(stream))
		}
		if len(got) != len(items) {
			t.Fatalf("iteration %d: %d paths, want %d", iter, len(got), len(items))
		}
		for i := range items {
			w, g := items[i], got[i]
			if g.Info.Path != w.Info.Path || g.Info.Deriver != w.Info.Deriver || g.Info.NarHash != w.Info.NarHash ||
				g.Info.NarSize != w.Info.NarSize || !slices.Equal(g.Info.References, slices.Sorted(slices.Values(w.Info.References))) ||
				!bytes.Equal(g.NAR, w.NAR) {
				t.Fatalf("iteration %d, path %d: read %+v\nwrote %+v", iter, i, g.Info, w.Info)
			}
		}
		again, err := importPathsBytes(got)
		if err != nil || !bytes.Equal(again, stream) {
			t.Fatalf("iteration %d: re-encoding differs (%v)", iter, err)
		}
	}
}

func totalAlloc() uint64 {
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.TotalAlloc
}

// An export stream that stops in the middle of a NAR's contents after
// claiming a large file costs no more than the bytes that came.
func TestExportReaderBoundedMemory(t *testing.T) {
	data := new(Enc).U64(1).Raw(NAR("nix-archive-1", "(", "type", "regular", "contents", Len(200<<20))).Raw(make([]byte, 1000)).Bytes()
	before := totalAlloc()
	_, _, err := readAll(data, DefaultExportLimits)
	d := totalAlloc() - before
	if err == nil || !strings.Contains(err.Error(), "unexpected EOF") {
		t.Fatalf("got %v, want an unexpected EOF", err)
	}
	t.Logf("allocated %d bytes", d)
	if d > 1<<20 {
		t.Errorf("reading a stream that claims a 200 MiB file allocated %d bytes", d)
	}
}
