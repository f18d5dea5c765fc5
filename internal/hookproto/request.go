package hookproto

import (
	"fmt"
	"io"
	"strings"
)

// Request is one "try": Nix asks whether the hook will build a derivation
// (nix 2.8.0 src/libstore/build/derivation-goal.cc, tryBuildHook; the same
// layout through 2.35, derivation-building-goal.cc).
type Request struct {
	// AmWilling is true when Nix has a free local build slot (fewer
	// local builds than max-jobs): after `# decline` it builds locally at
	// once. With max-jobs 0 it is always false.
	AmWilling bool
	// System is the derivation's platform ("x86_64-linux", "builtin").
	System string
	// DrvPath is the derivation's full store path, ending in ".drv".
	DrvPath string
	// RequiredFeatures are the derivation's requiredSystemFeatures, plus
	// "ca-derivations" when its output paths are not known in advance,
	// sorted; nil if none.
	RequiredFeatures []string
}

// ReadRequest reads one request: `string "try", u64 amWilling, string
// system, string drvPath, string-list requiredFeatures`.
//
// It returns io.EOF itself, unwrapped, when stdin ends before the request
// starts: Nix closed it because it has nothing more to ask, the normal end
// of a hook that accepted nothing. Any other failure is a [*ReadError]; a
// keyword other than "try" is one too.
func ReadRequest(r io.Reader) (*Request, error) {
	d := newDecoder(r, "try")
	kw, err := d.r.String(maxKeywordLen)
	if err == io.EOF { // before the first byte
		return nil, io.EOF
	}
	if err != nil {
		return nil, d.fail("keyword", err)
	}
	if kw != "try" {
		return nil, d.failf("keyword", "got %q, want \"try\"", kw)
	}
	var req Request
	if req.AmWilling, err = d.bool("amWilling"); err != nil {
		return nil, err
	}
	if req.System, err = d.str("system", MaxSystemLen); err != nil {
		return nil, err
	}
	if req.DrvPath, err = d.str("drvPath", MaxPathLen); err != nil {
		return nil, err
	}
	if !strings.HasPrefix(req.DrvPath, "/") || !strings.HasSuffix(req.DrvPath, ".drv") {
		return nil, d.failf("drvPath", "%q is not an absolute path ending in .drv", req.DrvPath)
	}
	if req.RequiredFeatures, err = d.strs("requiredFeatures", "feature", MaxFeatures, MaxFeatureLen); err != nil {
		return nil, err
	}
	return &req, nil
}

// ReadAccepted reads the two lists Nix writes right after it read
// `# accept` and the machine line: the input paths to copy to the
// machine (the closure of the derivation's inputs, no .drv files), then
// the names of the outputs to bring back (those not yet valid). Nix then
// closes stdin. Call it at once after [Accept]: Nix reads the hook's
// stderr again only after writing them.
func ReadAccepted(r io.Reader) (inputs []string, wantedOutputs []string, err error) {
	d := newDecoder(r, "accepted")
	if inputs, err = d.strs("inputPaths", "path", MaxInputPaths, MaxPathLen); err != nil {
		return nil, nil, err
	}
	for i, p := range inputs {
		if !strings.HasPrefix(p, "/") {
			return nil, nil, d.failf(fmt.Sprintf("inputPaths: path %d", i), "%q is not an absolute path", p)
		}
	}
	if wantedOutputs, err = d.strs("wantedOutputs", "output", MaxOutputs, MaxOutputNameLen); err != nil {
		return nil, nil, err
	}
	return inputs, wantedOutputs, nil
}
