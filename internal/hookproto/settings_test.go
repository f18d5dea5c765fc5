package hookproto

import (
	"bytes"
	"errors"
	"io"
	"maps"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"testing/iotest"
	"time"
)

func settingsBytes() []byte {
	var b wireBuf
	b.setting("builders", "@/etc/nix/machines")
	b.setting("max-silent-time", "0")
	b.setting("system", "x86_64-linux")
	b.setting("empty", "")
	b.setting("eight888", "12345678") // no padding
	b.u64(0)
	return b.clone()
}

func TestReadSettings(t *testing.T) {
	want := Settings{
		"builders":        "@/etc/nix/machines",
		"max-silent-time": "0",
		"system":          "x86_64-linux",
		"empty":           "",
		"eight888":        "12345678",
	}
	for name, r := range map[string]io.Reader{
		"whole":    bytes.NewReader(settingsBytes()),
		"one byte": iotest.OneByteReader(bytes.NewReader(settingsBytes())),
	} {
		got, err := ReadSettings(r)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !maps.Equal(got, want) {
			t.Errorf("%s: got %v, want %v", name, got, want)
		}
	}

	got, err := ReadSettings(bytes.NewReader(new(wireBuf).u64(0).clone()))
	if err != nil || len(got) != 0 {
		t.Errorf("empty block: %v, %v", got, err)
	}
}

// TestReadSettingsExact checks that ReadSettings consumes exactly its
// block, so the first request can be read from the same reader.
func TestReadSettingsExact(t *testing.T) {
	var b wireBuf
	b.Write(settingsBytes())
	b.try(1, "x86_64-linux", testDrv)
	r := bytes.NewReader(b.clone())
	if _, err := ReadSettings(r); err != nil {
		t.Fatal(err)
	}
	req, err := ReadRequest(r)
	if err != nil || req.DrvPath != testDrv {
		t.Fatalf("request after settings: %+v, %v", req, err)
	}
}

func TestReadSettingsTruncated(t *testing.T) {
	full := settingsBytes()
	for n := range len(full) {
		_, err := ReadSettings(bytes.NewReader(full[:n]))
		var re *ReadError
		if !errors.Is(err, io.ErrUnexpectedEOF) || !errors.As(err, &re) {
			t.Errorf("cut at %d of %d: %v, want a *ReadError wrapping io.ErrUnexpectedEOF", n, len(full), err)
		}
	}
}

func TestReadSettingsErrors(t *testing.T) {
	tooMany := new(wireBuf)
	for i := range MaxSettings + 1 {
		tooMany.setting("s"+strconv.Itoa(i), "v")
	}
	tooMany.u64(0)

	for _, tc := range []struct {
		name string
		b    []byte
		want string
	}{
		{"bad marker", new(wireBuf).u64(2).clone(), "setting 0: marker: got 2"},
		{"empty name", new(wireBuf).setting("", "v").u64(0).clone(), "setting 0: name: empty"},
		{"duplicate", new(wireBuf).setting("a", "1").setting("a", "2").u64(0).clone(), `setting 1 ("a"): sent twice`},
		{"long name", new(wireBuf).setting(strings.Repeat("n", MaxSettingNameLen+1), "").clone(), "name: length 257 exceeds 256"},
		{"absurd name", new(wireBuf).u64(1).u64(1 << 60).clone(), "exceeds 256"},
		{"absurd value", new(wireBuf).u64(1).str("builders").u64(1 << 60).clone(), `setting 0 ("builders"): value: length 1152921504606846976 exceeds 1048576`},
		{"bad padding", append(new(wireBuf).u64(1).u64(1).clone(), 'a', 0, 0, 1, 0, 0, 0, 0), "setting 0: name: non-zero padding 00 00 01 00 00 00 00"},
		{"too many", tooMany.clone(), "setting 4096: more than 4096 settings"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ReadSettings(bytes.NewReader(tc.b))
			var re *ReadError
			if !errors.As(err, &re) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want a *ReadError containing %q", err, tc.want)
			}
			if !strings.HasPrefix(err.Error(), "hookproto: settings: ") {
				t.Errorf("error %q does not name the message", err)
			}
		})
	}
}

// An absurd length is refused before anything is allocated for it.
func TestReadSettingsNoHugeAllocation(t *testing.T) {
	b := new(wireBuf).u64(1).str("builders").u64(MaxSettingValueLen).clone() // allowed length, no bytes
	allocs := testing.AllocsPerRun(10, func() {
		if _, err := ReadSettings(bytes.NewReader(b)); err == nil {
			t.Fatal("no error")
		}
	})
	if allocs > 20 {
		t.Errorf("%v allocations", allocs)
	}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range 100 {
		ReadSettings(bytes.NewReader(b))
	}
	runtime.ReadMemStats(&after)
	if perRun := (after.TotalAlloc - before.TotalAlloc) / 100; perRun > 2*readChunk {
		t.Errorf("a truncated 1 MiB value costs %d bytes per read, want at most about one %d-byte chunk", perRun, readChunk)
	}
}

func TestSettingsAccessors(t *testing.T) {
	s := Settings{
		"builders":                 "@/etc/nix/machines",
		"builders-use-substitutes": "true",
		"require-sigs":             "false",
		"bad-bool":                 "yes",
		"max-jobs":                 "4",
		"bad-uint":                 "-1",
		"max-silent-time":          "0",
		"timeout":                  "3600",
		"huge":                     "18446744073709551615",
	}
	if got := s.String("builders", "x"); got != "@/etc/nix/machines" {
		t.Errorf("String(builders) = %q", got)
	}
	if got := s.String("absent", "def"); got != "def" {
		t.Errorf("String(absent) = %q", got)
	}
	for _, tc := range []struct {
		name      string
		def, want bool
	}{
		{"builders-use-substitutes", false, true},
		{"require-sigs", true, false},
		{"bad-bool", true, true},
		{"absent", true, true},
	} {
		if got := s.Bool(tc.name, tc.def); got != tc.want {
			t.Errorf("Bool(%s, %v) = %v", tc.name, tc.def, got)
		}
	}
	if _, ok, err := s.ParseBool("bad-bool"); !ok || err == nil || !strings.Contains(err.Error(), `bad-bool = "yes"`) {
		t.Errorf("ParseBool(bad-bool): ok %v, err %v", ok, err)
	}
	if got := s.Uint("max-jobs", 9); got != 4 {
		t.Errorf("Uint(max-jobs) = %d", got)
	}
	if got := s.Uint("bad-uint", 9); got != 9 {
		t.Errorf("Uint(bad-uint) = %d", got)
	}
	if _, ok, err := s.ParseUint("absent"); ok || err != nil {
		t.Errorf("ParseUint(absent): ok %v, err %v", ok, err)
	}
	if got := s.Seconds("max-silent-time", time.Minute); got != 0 {
		t.Errorf("Seconds(max-silent-time) = %v, want 0 (none)", got)
	}
	if got := s.Seconds("timeout", 0); got != time.Hour {
		t.Errorf("Seconds(timeout) = %v", got)
	}
	if got := s.Seconds("huge", time.Second); got != time.Second {
		t.Errorf("Seconds(huge) = %v, want the default", got)
	}
	if _, _, err := s.ParseSeconds("huge"); err == nil {
		t.Error("ParseSeconds(huge): no error")
	}
}
