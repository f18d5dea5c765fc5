package localstore

import (
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/nix-offload/nix-offload/internal/serveproto"
)

func infoOf(path string, refs ...string) serveproto.PathInfo {
	return serveproto.PathInfo{Path: path, References: refs}
}

func pathsOf(infos []serveproto.PathInfo) []string {
	out := make([]string, len(infos))
	for i, info := range infos {
		out[i] = info.Path
	}
	return out
}

func TestTopoSort(t *testing.T) {
	tests := []struct {
		name  string
		infos []serveproto.PathInfo
		want  []string
	}{
		{"empty", nil, []string{}},
		{"chain given root-first", []serveproto.PathInfo{infoOf("c", "b"), infoOf("b", "a"), infoOf("a")},
			[]string{"a", "b", "c"}},
		{"chain given in order", []serveproto.PathInfo{infoOf("a"), infoOf("b", "a"), infoOf("c", "b")},
			[]string{"a", "b", "c"}},
		{"diamond", []serveproto.PathInfo{infoOf("top", "left", "right"), infoOf("left", "bottom"), infoOf("right", "bottom"), infoOf("bottom")},
			[]string{"bottom", "left", "right", "top"}},
		{"self-references", []serveproto.PathInfo{infoOf("b", "b", "a"), infoOf("a", "a")},
			[]string{"a", "b"}},
		{"references outside are ignored", []serveproto.PathInfo{infoOf("b", "glibc", "a"), infoOf("a", "glibc")},
			[]string{"a", "b"}},
		{"independent paths keep their order", []serveproto.PathInfo{infoOf("z"), infoOf("y"), infoOf("x")},
			[]string{"z", "y", "x"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := TopoSort(tt.infos)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(pathsOf(got), tt.want) {
				t.Errorf("got %q, want %q", pathsOf(got), tt.want)
			}
		})
	}
}

// Every path must come after everything it refers to, for a long chain
// too (no recursion depth limit).
func TestTopoSortLongChain(t *testing.T) {
	const n = 20_000
	infos := make([]serveproto.PathInfo, n)
	name := func(i int) string { return "p" + strconv.Itoa(i) }
	for i := range n {
		// Root first: path i refers to path i+1.
		infos[i] = infoOf(name(i))
		if i+1 < n {
			infos[i].References = []string{name(i + 1)}
		}
	}
	got, err := TopoSort(infos)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != n || got[0].Path != name(n-1) || got[n-1].Path != name(0) {
		t.Fatalf("got %d paths, first %s, last %s", len(got), got[0].Path, got[len(got)-1].Path)
	}
}

func TestTopoSortErrors(t *testing.T) {
	tests := []struct {
		name  string
		infos []serveproto.PathInfo
		want  string
	}{
		{"two-cycle", []serveproto.PathInfo{infoOf("out", "dev"), infoOf("dev", "out")}, "cycle"},
		{"three-cycle", []serveproto.PathInfo{infoOf("a", "b"), infoOf("b", "c"), infoOf("c", "a"), infoOf("d")}, "cycle"},
		{"duplicate", []serveproto.PathInfo{infoOf("a"), infoOf("a")}, "listed twice"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := TopoSort(tt.infos)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %q, %v; want an error containing %q", pathsOf(got), err, tt.want)
			}
			t.Log(err)
		})
	}
}
