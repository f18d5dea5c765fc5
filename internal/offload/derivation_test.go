package offload

import (
	"encoding/json"
	"os"
	"reflect"
	"testing"
)

// testdata/escapes.drv was written by Nix 2.8 (nix-instantiate escapes.nix);
// escapes.json is `nix show-derivation` of it: Nix's own reading.
func TestReadDerivationMatchesNix(t *testing.T) {
	f, err := os.Open("testdata/escapes.drv")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, err := ReadDerivation(f)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile("testdata/escapes.json")
	if err != nil {
		t.Fatal(err)
	}
	var byPath map[string]struct {
		Args    []string          `json:"args"`
		Env     map[string]string `json:"env"`
		Builder string            `json:"builder"`
		System  string            `json:"system"`
	}
	if err := json.Unmarshal(raw, &byPath); err != nil {
		t.Fatal(err)
	}
	for _, want := range byPath {
		if !reflect.DeepEqual(got.Arguments, want.Args) {
			t.Errorf("args\n got %q\nwant %q", got.Arguments, want.Args)
		}
		if !reflect.DeepEqual(got.Env, want.Env) {
			t.Errorf("env\n got %q\nwant %q", got.Env, want.Env)
		}
		if got.Builder != want.Builder || got.Platform != want.System {
			t.Errorf("builder %q system %q", got.Builder, got.Platform)
		}
	}
}

func TestUnescapeATerm(t *testing.T) {
	for in, want := range map[string]string{
		`plain`:       "plain",
		`a\"b`:        `a"b`,
		`back\\slash`: `back\slash`,
		`\\n`:         `\n`,
		`tab\there\n`: "tab\there\n",
		`\r\x`:        "\rx",
		`trailing\`:   `trailing\`,
	} {
		if got := unescapeATerm(in); got != want {
			t.Errorf("unescapeATerm(%q) = %q, want %q", in, got, want)
		}
	}
}
