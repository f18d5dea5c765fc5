package offload

import (
	"reflect"
	"testing"

	"github.com/nix-community/go-nix/pkg/derivation"

	"github.com/nix-offload/nix-offload/internal/serveproto"
)

// As Nix's hook does: with input derivations the machine gets the whole
// input closure as inputSrcs; without, the derivation's own sources are
// left alone (changing them would change content-addressed output ids).
func TestBasicDerivationInputs(t *testing.T) {
	drv := &derivation.Derivation{
		Outputs: map[string]*derivation.Output{
			"out": {Path: "/nix/store/00000000000000000000000000000000-x"},
			"fod": {Path: "/nix/store/11111111111111111111111111111111-y", HashAlgorithm: "r:sha256", Hash: "abcd"},
		},
		InputSources: []string{"/nix/store/22222222222222222222222222222222-src"},
		Platform:     "x86_64-linux",
		Builder:      "/bin/sh",
		Arguments:    []string{"-c", "true"},
		Env:          map[string]string{"out": "/nix/store/00000000000000000000000000000000-x"},
	}
	closure := []string{"/nix/store/44444444444444444444444444444444-dep-out", "/nix/store/22222222222222222222222222222222-src"}
	job := Job{DrvPath: "/nix/store/33333333333333333333333333333333-x.drv", Drv: drv, Inputs: closure}

	b, err := basicDerivation(job)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(b.InputSrcs, drv.InputSources) {
		t.Errorf("no input drvs: inputSrcs %v, want the drv's own %v", b.InputSrcs, drv.InputSources)
	}
	want := serveproto.DerivationOutput{Path: drv.Outputs["fod"].Path, HashAlgo: "r:sha256", Hash: "abcd"}
	if b.Outputs["fod"] != want || b.Platform != "x86_64-linux" || b.Builder != "/bin/sh" {
		t.Errorf("basic derivation %+v", b)
	}

	drv.InputDerivations = map[string][]string{"/nix/store/55555555555555555555555555555555-dep.drv": {"out"}}
	b, _ = basicDerivation(job)
	wantSrcs := []string{closure[1], closure[0]} // sorted
	if !reflect.DeepEqual(b.InputSrcs, wantSrcs) {
		t.Errorf("with input drvs: inputSrcs %v, want the closure %v", b.InputSrcs, wantSrcs)
	}
}

func TestBuildErrorMessage(t *testing.T) {
	e := &BuildError{DrvPath: "/nix/store/x.drv", Machine: "b1", Status: serveproto.PermanentFailure,
		Msg: "builder for '/nix/store/x.drv' failed with exit code 3\n"}
	if got := e.Error(); got != "build of '/nix/store/x.drv' on 'b1' failed: builder for '/nix/store/x.drv' failed with exit code 3" {
		t.Errorf("message %q", got)
	}
	if e.TimedOut() || !(&BuildError{Status: serveproto.TimedOut}).TimedOut() {
		t.Error("TimedOut wrong")
	}
}
