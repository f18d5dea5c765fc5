package hookproto

import (
	"bytes"
	"errors"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// captures returns the real stdin bytes in testdata/nix-*.bin.
func captures(f *testing.F) [][]byte {
	files, err := filepath.Glob("testdata/nix-*.bin")
	if err != nil || len(files) == 0 {
		f.Fatalf("no testdata/nix-*.bin (%v)", err)
	}
	var bs [][]byte
	for _, name := range files {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		bs = append(bs, b)
	}
	return bs
}

func checkReadErr(t *testing.T, err error) {
	var re *ReadError
	if !errors.As(err, &re) {
		t.Fatalf("error of type %T: %v", err, err)
	}
}

// FuzzReadSettings: ReadSettings never panics, fails only with a
// *ReadError, and what it accepts respects the limits and encodes back to
// a block that reads the same.
func FuzzReadSettings(f *testing.F) {
	for _, b := range captures(f) {
		f.Add(b)
	}
	f.Add(settingsBytes())
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := ReadSettings(bytes.NewReader(b))
		if err != nil {
			checkReadErr(t, err)
			return
		}
		if len(s) > MaxSettings {
			t.Fatalf("%d settings", len(s))
		}
		var w wireBuf
		for _, name := range slices.Sorted(maps.Keys(s)) {
			if name == "" || len(name) > MaxSettingNameLen || len(s[name]) > MaxSettingValueLen {
				t.Fatalf("accepted setting %q", name)
			}
			w.setting(name, s[name])
		}
		w.u64(0)
		s2, err := ReadSettings(bytes.NewReader(w.Bytes()))
		if err != nil || !maps.Equal(s, s2) {
			t.Fatalf("re-encoded block reads as %v, %v", s2, err)
		}
	})
}

// countingReader counts the bytes read through it.
type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

// FuzzReadRequest reads what follows the settings block: requests until
// one fails, then the accepted lists. It never panics, fails only with a
// *ReadError or io.EOF (at a request boundary), and every request it
// accepts encodes back to exactly the bytes it consumed. Seeds: the real
// captures without their settings block, and a made-up accepted exchange.
func FuzzReadRequest(f *testing.F) {
	for _, b := range captures(f) {
		r := bytes.NewReader(b)
		if _, err := ReadSettings(r); err != nil {
			f.Fatal(err)
		}
		rest := b[len(b)-r.Len():]
		f.Add(rest)
		f.Add(append(slices.Clone(rest), new(wireBuf).strs("/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a").strs("out").Bytes()...))
	}
	f.Add(new(wireBuf).try(1, "x86_64-linux", testDrv, "kvm").try(0, "aarch64-linux", testDrv).clone())
	f.Fuzz(func(t *testing.T, b []byte) {
		c := &countingReader{r: bytes.NewReader(b)}
		for {
			start := c.n
			req, err := ReadRequest(c)
			if err == io.EOF {
				if c.n != len(b) || start != c.n {
					t.Fatalf("io.EOF with %d of %d bytes read", c.n, len(b))
				}
				return
			}
			if err != nil {
				checkReadErr(t, err)
				break
			}
			re := new(wireBuf).try(map[bool]uint64{false: 0, true: 1}[req.AmWilling], req.System, req.DrvPath, req.RequiredFeatures...)
			if !bytes.Equal(re.Bytes(), b[start:c.n]) {
				t.Fatalf("request %+v encodes to % x, read from % x", req, re.Bytes(), b[start:c.n])
			}
		}
		// Whatever is left, read as the accepted lists.
		inputs, outputs, err := ReadAccepted(bytes.NewReader(b))
		if err != nil {
			checkReadErr(t, err)
			return
		}
		if len(inputs) > MaxInputPaths || len(outputs) > MaxOutputs {
			t.Fatalf("%d inputs, %d outputs", len(inputs), len(outputs))
		}
	})
}
