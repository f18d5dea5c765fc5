package machines

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// allErrors flattens err into its *Error values.
func allErrors(t *testing.T, err error) []*Error {
	t.Helper()
	var out []*Error
	var walk func(error)
	walk = func(err error) {
		if j, ok := err.(interface{ Unwrap() []error }); ok {
			for _, e := range j.Unwrap() {
				walk(e)
			}
			return
		}
		var e *Error
		if !errors.As(err, &e) {
			t.Fatalf("error %q (%T) is not an *Error", err, err)
		}
		out = append(out, e)
	}
	walk(err)
	return out
}

func seedFiles(f *testing.F, pattern string) [][]byte {
	names, err := filepath.Glob(filepath.Join("testdata", pattern))
	if err != nil || len(names) == 0 {
		f.Fatalf("no seeds for %s: %v", pattern, err)
	}
	var out [][]byte
	for _, n := range names {
		b, err := os.ReadFile(n)
		if err != nil {
			f.Fatal(err)
		}
		out = append(out, b)
	}
	return out
}

// FuzzParse checks that Parse never panics, that every error it returns is an *Error in the
// file with a line (1 or more) inside it, and that whatever it accepts passes Validate.
func FuzzParse(f *testing.F) {
	for _, b := range seedFiles(f, "*.toml") {
		f.Add(b)
	}
	f.Add([]byte(machine + "paralel-builds = 0\nspeed = nan\n"))
	f.Add([]byte(machine + "protocol = \"ssh-ng\"\nremote-program = \"/nix/var/nix/profiles/default/bin/nix-daemon\"\n"))
	f.Add([]byte("a = \"\"\"\n[[machine]]\n\"\"\"\nmachine = [{host=\"b\",systems=[\"x\"]},{}]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		indexKeys(string(data)) // also on text the decoder rejects
		cfg, err := Parse("t.toml", data)
		if err != nil {
			if cfg != nil {
				t.Fatal("config returned with an error")
			}
			lines := bytes.Count(data, []byte("\n")) + 1
			for _, e := range allErrors(t, err) {
				if e.File != "t.toml" || e.Line < 1 || e.Line > lines || e.Msg == "" {
					t.Fatalf("bad error %+v for a %d-line file", e, lines)
				}
			}
			return
		}
		if err := Validate(cfg.Machines); err != nil {
			t.Fatalf("Parse accepted what Validate rejects: %v", err)
		}
		for _, m := range cfg.Machines {
			if !strings.HasPrefix(m.Source, "t.toml") {
				t.Fatalf("Source %q", m.Source)
			}
		}
	})
}

// FuzzParseBuilders checks that ParseBuilders never panics, always ends (includes may refer to
// each other and to themselves), and that whatever it accepts passes Validate.
func FuzzParseBuilders(f *testing.F) {
	for _, b := range seedFiles(f, "machines*") {
		f.Add(string(b), "b1 ; @/self")
	}
	f.Add("ssh://root@b1 x86_64-linux,i686-linux /k 8 2 kvm,big-parallel benchmark "+testKeyB64, "")
	f.Add("@/inc # ; @/self\nb2 - - - 0", "@/inc\n@/self\nb3")
	f.Add("ssh://[fd00::1]:22?remote-store=/x - - 0 -0", "@")
	f.Add("ssh-ng://mac?remote-program=/nix/var/nix/profiles/default/bin/nix-daemon aarch64-darwin ; ssh://m?remote-program=", "")
	f.Fuzz(func(t *testing.T, spec, inc string) {
		read := func(name string) ([]byte, error) {
			switch name {
			case "/inc":
				return []byte(inc), nil
			case "/self":
				return []byte(spec), nil
			}
			return os.ReadFile(filepath.Join(t.TempDir(), "missing"))
		}
		ms, err := ParseBuilders(spec, "x86_64-linux", read)
		if err != nil {
			if ms != nil {
				t.Fatal("machines returned with an error")
			}
			for _, e := range allErrors(t, err) {
				if e.File == "" || e.Line < 1 || e.Msg == "" {
					t.Fatalf("bad error %+v", e)
				}
			}
			return
		}
		if err := Validate(ms); err != nil {
			t.Fatalf("ParseBuilders accepted what Validate rejects: %v", err)
		}
	})
}
