package serveproto

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"math"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/nix-offload/nix-offload/internal/wire"
)

// The golden files are Nix's own (testdata/README.md): reading them must
// give the values Nix's test wrote, and writing those values must give the
// same bytes.

func encode(f func(e *encoder)) []byte {
	var buf bytes.Buffer
	w := bufio.NewWriter(&buf)
	e := wire.NewWriter(w)
	f(e)
	if err := e.Flush(); err != nil {
		panic(err)
	}
	return buf.Bytes()
}

func TestGoldenString(t *testing.T) {
	b := golden(t, "string.bin")
	// The C++ literal "oh no \0\0\0 what was that!" ends at the first NUL.
	want := []string{"", "hi", "white rabbit", "大白兔", "oh no "}
	d := testDecoder(b, "test")
	var got []string
	for range want {
		s, err := d.str("s", 1024)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, s)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("decoded (-want +got):\n%s", diff)
	}
	if !atEOF(d) {
		t.Error("bytes left over")
	}
	if enc := encode(func(e *encoder) {
		for _, s := range want {
			e.String(s)
		}
	}); !bytes.Equal(enc, b) {
		t.Errorf("encoding differs from golden file")
	}
}

func TestGoldenStorePath(t *testing.T) {
	b := golden(t, "store-path.bin")
	d := testDecoder(b, "test")
	for _, want := range []string{pathFoo, pathFooBar} {
		got, err := d.optPath("path")
		if err != nil || got != want {
			t.Errorf("got %q, %v; want %q", got, err, want)
		}
	}
	if !atEOF(d) {
		t.Error("bytes left over")
	}
	if enc := encode(func(e *encoder) { e.String(pathFoo); e.String(pathFooBar) }); !bytes.Equal(enc, b) {
		t.Errorf("encoding differs from golden file")
	}
}

// set.bin and vector.bin hold [], [""], ["", "foo", "bar"] and the nested
// [[], [""], ["", "1", "2"]]; the set is written sorted.
func TestGoldenSetAndVector(t *testing.T) {
	for _, tc := range []struct {
		file  string
		third []string
		write func(e *encoder, ss []string)
	}{
		{"set.bin", []string{"", "bar", "foo"}, (*encoder).Set},
		{"vector.bin", []string{"", "foo", "bar"}, (*encoder).Strings},
	} {
		t.Run(tc.file, func(t *testing.T) {
			b := golden(t, tc.file)
			d := testDecoder(b, "test")
			want := [][]string{nil, {""}, tc.third}
			for i, w := range want {
				got, err := d.strs("list", "s", 10, 10)
				if err != nil {
					t.Fatal(err)
				}
				if diff := cmp.Diff(w, got); diff != "" {
					t.Errorf("list %d (-want +got):\n%s", i, diff)
				}
			}
			n, err := d.count("nested", 10)
			if err != nil || n != 3 {
				t.Fatalf("nested count %d, %v", n, err)
			}
			for i, w := range [][]string{nil, {""}, {"", "1", "2"}} {
				got, err := d.strs("nested", "s", 10, 10)
				if err != nil {
					t.Fatal(err)
				}
				if diff := cmp.Diff(w, got); diff != "" {
					t.Errorf("nested %d (-want +got):\n%s", i, diff)
				}
			}
			if !atEOF(d) {
				t.Error("bytes left over")
			}
			enc := encode(func(e *encoder) {
				tc.write(e, nil)
				tc.write(e, []string{""})
				tc.write(e, []string{"", "foo", "bar"})
				e.Uint64(3)
				tc.write(e, nil)
				tc.write(e, []string{""})
				tc.write(e, []string{"", "1", "2"})
			})
			if !bytes.Equal(enc, b) {
				t.Errorf("encoding differs from golden file")
			}
		})
	}
}

// goldenBuildResults are the three results in build-result-2.*.bin, as the
// given minor version carries them.
func goldenBuildResults(minor int) []BuildResult {
	rs := []BuildResult{
		{Status: OutputRejected, ErrorMsg: "no idea why"},
		{Status: NotDeterministic, ErrorMsg: "no idea why"},
		{Status: Built},
	}
	if minor >= 3 {
		rs[1].TimesBuilt = 3
		rs[1].IsNonDeterministic = true
		rs[1].StartTime = time.Unix(30, 0)
		rs[1].StopTime = time.Unix(50, 0)
		rs[2].StartTime = time.Unix(30, 0)
		rs[2].StopTime = time.Unix(50, 0)
	}
	if minor >= 6 {
		rs[0].BuiltOutputs = map[string]string{}
		rs[1].BuiltOutputs = map[string]string{}
		rs[2].TimesBuilt = 1
		rs[2].BuiltOutputs = map[string]string{"bar": pathBar, "foo": pathFoo}
	}
	return rs
}

func TestGoldenBuildResult(t *testing.T) {
	for _, tc := range []struct {
		file  string
		minor int
	}{
		{"build-result-2.2.bin", 2},
		{"build-result-2.3.bin", 3},
		{"build-result-2.6.bin", 6}, // the layout a 2.8 server sends
		// What Nix 2.35 sends to a 2.7 client: dummy hashes, JSON
		// with id and outPath only.
		{"build-result-2.7-compat.bin", 7},
	} {
		t.Run(tc.file, func(t *testing.T) {
			d := testDecoder(golden(t, tc.file), "BuildDerivation")
			var got []BuildResult
			for range 3 {
				r, err := readBuildResult(d, tc.minor)
				if err != nil {
					t.Fatal(err)
				}
				got = append(got, r)
			}
			if diff := cmp.Diff(goldenBuildResults(tc.minor), got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
			if !atEOF(d) {
				t.Error("bytes left over")
			}
		})
	}
}

func TestGoldenUnkeyedValidPathInfo(t *testing.T) {
	const narHash = "sha256:09ymwqf5i9q7d4dm7x4pjjcqqj0qrcp5lnznbh42gfsci5hcbqqm"
	for _, tc := range []struct {
		file  string
		minor int
		want  []PathInfo
	}{
		{"unkeyed-valid-path-info-2.3.bin", 3, []PathInfo{
			{DownloadSize: 34878, NarSize: 34878},
			{Deriver: pathBarDrv, References: []string{pathFooDrv}, DownloadSize: 34878, NarSize: 34878},
		}},
		{"unkeyed-valid-path-info-2.4.bin", 4, []PathInfo{
			{Deriver: pathBarDrv, References: []string{pathFooDrv}, DownloadSize: 34878, NarSize: 34878,
				NarHash: narHash},
			{Deriver: pathBarDrv,
				References:   []string{pathBar, "/nix/store/n5wkd9frr45pa74if5gpz9j7mifg27fh-foo"},
				DownloadSize: 34878, NarSize: 34878, NarHash: narHash,
				CA:   "fixed:r:sha256:1lr187v6dck1rjh2j6svpikcfz53wyl3qrlcbb405zlh13x0khhh",
				Sigs: []string{"fake-sig-1", "fake-sig-2"}},
		}},
	} {
		t.Run(tc.file, func(t *testing.T) {
			d := testDecoder(golden(t, tc.file), "QueryPathInfos")
			var got []PathInfo
			for i := range tc.want {
				info, err := readPathInfo(d, "info", tc.minor)
				if err != nil {
					t.Fatalf("record %d: %v", i, err)
				}
				got = append(got, info)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
			if !atEOF(d) {
				t.Error("bytes left over")
			}
		})
	}
}

// Nix's golden build options send nrRepeats 8 and enforceDeterminism 1;
// this client always sends 0 for both (Nix 2.13+ rejects repeats), so
// those two u64s (bytes 24–39) are compared as zero.
func TestGoldenBuildOptions(t *testing.T) {
	o, err := BuildOptions{MaxSilentTime: 5 * time.Second, BuildTimeout: 6 * time.Second, MaxLogSize: 7, KeepFailed: true}.wire("test")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		file  string
		minor int
	}{
		{"build-options-2.1.bin", 1},
		{"build-options-2.2.bin", 2},
		{"build-options-2.3.bin", 3},
		{"build-options-2.7.bin", 7},
	} {
		t.Run(tc.file, func(t *testing.T) {
			want := golden(t, tc.file)
			if len(want) >= 40 {
				clear(want[24:40])
			}
			got := encode(func(e *encoder) { o.write(e, tc.minor) })
			if !bytes.Equal(got, want) {
				t.Errorf("got % x\nwant % x", got, want)
			}
		})
	}
}

// realisation.bin holds two realisations as JSON strings, with signatures
// and dependentRealisations; only outPath matters.
func TestGoldenRealisation(t *testing.T) {
	d := testDecoder(golden(t, "realisation.bin"), "test")
	for i := range 2 {
		js, err := d.str("realisation", MaxRealisationLen)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(js, `"signatures"`) {
			t.Errorf("realisation %d: %s has no signatures", i, js)
		}
		p, err := realisationPath(js)
		if err != nil || p != pathFoo {
			t.Errorf("realisation %d: got %q, %v; want %q", i, p, err, pathFoo)
		}
	}
	if !atEOF(d) {
		t.Error("bytes left over")
	}
}

func TestReadPrimitivesRejects(t *testing.T) {
	for _, tc := range []struct {
		name  string
		in    []byte
		read  func(d *decoder) error
		proto string // substring of the ProtocolError; "" means a StreamError
	}{
		{"non-zero padding", new(wb).u(2).raw([]byte("hi\x00\x00\x00\x00\x00\x01")).b(),
			func(d *decoder) error { _, err := d.str("s", 10); return err }, "s: non-zero padding"},
		{"length over limit", new(wb).u(11).b(),
			func(d *decoder) error { _, err := d.str("s", 10); return err }, "s: length 11 exceeds 10"},
		{"length 2^60", new(wb).u(1 << 60).b(),
			func(d *decoder) error { _, err := d.str("s", math.MaxInt); return err }, ""},
		{"count 2^60", new(wb).u(1 << 60).b(),
			func(d *decoder) error { _, err := d.paths("refs"); return err }, "refs: count: 1152921504606846976 exceeds 1048576"},
		{"bool 2", new(wb).u(2).b(),
			func(d *decoder) error { _, err := d.bool("b"); return err }, "b: bool value 2 is neither 0 nor 1"},
		{"uint32 overflow", new(wb).u(1 << 32).b(),
			func(d *decoder) error { _, err := d.uint32("n"); return err }, "n: value 4294967296 exceeds 4294967295"},
		{"time_t overflow", new(wb).u(1 << 63).b(),
			func(d *decoder) error { _, err := d.int64("t"); return err }, "t: value 9223372036854775808 exceeds"},
		{"bad store path", new(wb).s("/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x").b(),
			func(d *decoder) error { _, err := d.optPath("p"); return err }, "hash contains illegal character 'e'"},
		{"not in store", new(wb).s("/tmp/x").b(),
			func(d *decoder) error { _, err := d.optPath("p"); return err }, "is not in /nix/store"},
		{"truncated u64", []byte{1, 2, 3},
			func(d *decoder) error { _, err := d.u64("n"); return err }, ""},
		{"truncated padding", new(wb).u(1).raw([]byte("a\x00")).b(),
			func(d *decoder) error { _, err := d.str("s", 10); return err }, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.read(testDecoder(tc.in, "Test"))
			if tc.proto == "" {
				var se *StreamError
				if !errors.As(err, &se) || !errors.Is(err, io.ErrUnexpectedEOF) {
					t.Fatalf("got %v (%T), want a StreamError wrapping io.ErrUnexpectedEOF", err, err)
				}
				return
			}
			var pe *ProtocolError
			if !errors.As(err, &pe) || !strings.Contains(err.Error(), tc.proto) {
				t.Fatalf("got %v (%T), want a ProtocolError containing %q", err, err, tc.proto)
			}
			if !strings.HasPrefix(err.Error(), "serveproto: Test reply: ") {
				t.Errorf("error %q does not name the operation", err)
			}
		})
	}
}

// A claimed length of 2^40 (here with limit MaxInt, so nothing stops it
// before the read) costs at most one chunk before the stream ends.
func TestReadStringGrowsWithData(t *testing.T) {
	in := new(wb).u(1 << 40).raw(make([]byte, 100)).b()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err := testDecoder(in, "Test").str("s", math.MaxInt)
	runtime.ReadMemStats(&after)
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("got %v", err)
	}
	if n := after.TotalAlloc - before.TotalAlloc; n > 1<<20 {
		t.Errorf("allocated %d bytes", n)
	}
}

func TestStripANSI(t *testing.T) {
	for in, want := range map[string]string{
		"":      "",
		"plain": "plain",
		"\x1b[31;1merror:\x1b[0m builder for '\x1b[35;1m/nix/store/x.drv\x1b[0m' failed with exit code 3": "error: builder for '/nix/store/x.drv' failed with exit code 3",
		"a\x1b[Kb":                    "ab",
		"\x1b]0;title\x07text":        "text",
		"\x1b]8;;http://x\x1b\\link":  "link",
		"\x1b(Bx":                     "x",
		"trailing\x1b":                "trailing",
		"trailing\x1b[":               "trailing",
		"tab\tand\nnewline\xff":       "tab\tand\nnewline\xff",
		"\x1b[1;2;3;4;5;6;7;8;9mdone": "done",
	} {
		if got := StripANSI(in); got != want {
			t.Errorf("StripANSI(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestMakeSourcePath(t *testing.T) {
	// From the real nix-store 2.8: nix-store --print-fixed-path --recursive
	// sha256 1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s hello
	h, err := parseNarHash("sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s")
	if err != nil {
		t.Fatal(err)
	}
	var digest [32]byte
	copy(digest[:], h.Digest())
	const want = "/nix/store/vafy2jgi89h8mm4dh7zf8r1px2pridal-hello"
	if got := MakeSourcePath("hello", digest); got != want {
		t.Errorf("got %s, want %s", got, want)
	}
}

func TestCheckStorePath(t *testing.T) {
	for p, ok := range map[string]bool{
		pathFoo:    true,
		pathBarDrv: true,
		"/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-a+b_c?d=e.f":                 true,
		"/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-":                            false, // empty name
		"/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q":                             false,
		"/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3qxfoo":                         false,
		"/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-a/b":                         false,
		"/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-a b":                         false,
		"/nix/store/G1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-a":                           false,
		"/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-" + strings.Repeat("n", 211): true,
		"/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-" + strings.Repeat("n", 212): false,
		"nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-a":                            false,
	} {
		if err := checkStorePath(p); (err == nil) != ok {
			t.Errorf("checkStorePath(%q) = %v, want ok=%v", p, err, ok)
		}
	}
	if len("/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-"+strings.Repeat("n", 211)) != MaxStorePathLen {
		t.Error("MaxStorePathLen is not the longest valid path")
	}
}
