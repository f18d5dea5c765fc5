package main

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/graph"
	"github.com/nix-offload/nix-offload/internal/serveproto"
)

// The exit status follows nix-build: 100 for a failed build, 101 when one
// timed out, 1 when only machines or connections failed; derivations that
// never started or failed for a dependency do not count.
func TestBuildFailureExitCodes(t *testing.T) {
	ran := time.Unix(1, 0)
	res := func(st serveproto.BuildStatus, started bool) *graph.Result {
		r := &graph.Result{Status: st, Err: errors.New(st.String())}
		if started {
			r.Start = ran
		}
		return r
	}
	for _, c := range []struct {
		name    string
		results []*graph.Result
		want    int // 0: no error
	}{
		{"all built", []*graph.Result{{Status: serveproto.Built, Start: ran}}, 0},
		{"a build failed", []*graph.Result{res(serveproto.PermanentFailure, true), res(serveproto.DependencyFailed, false)}, 100},
		{"a build timed out", []*graph.Result{res(serveproto.PermanentFailure, true), res(serveproto.TimedOut, true)}, 101},
		{"only a machine failed", []*graph.Result{res(serveproto.MiscFailure, true), res(serveproto.MiscFailure, false)}, 1},
		{"only not started", []*graph.Result{res(serveproto.MiscFailure, false)}, 0},
	} {
		var report []brokerapi.GraphDerivation
		for i, r := range c.results {
			r.DrvPath = string(rune('a' + i))
			report = append(report, graph.Report(r, func(string) string { return "" }))
		}
		err := buildFailure(report)
		got := 0
		var xe *exitCodeError
		switch {
		case errors.As(err, &xe):
			got = xe.code
		case err != nil:
			got = 1
		}
		if got != c.want {
			t.Errorf("%s: exit %d (%v), want %d", c.name, got, err, c.want)
		}
	}
}

// A configuration without machines is a configuration error, before any
// store is opened: there is nowhere to build.
func TestBuildWithoutMachines(t *testing.T) {
	cfg := writeConfig(t, "[daemon]\n")
	code, _, errOut := runCLI(t, "build", "-config", cfg, "/nix/store/00000000000000000000000000000000-x.drv")
	if code != exitUsage || !strings.Contains(errOut, cfg+": no machines to build on") {
		t.Errorf("exit %d, stderr %q; want %d and the file named", code, errOut, exitUsage)
	}
}
