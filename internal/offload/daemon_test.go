package offload_test

import (
	"context"
	"slices"
	"testing"

	"github.com/nix-offload/nix-offload/internal/daemonproto"
	"github.com/nix-offload/nix-offload/internal/offload"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/servetest"
)

// A graph's build on an ssh-ng machine (Job.KeepOutputs): the inputs go
// up, the outputs stay there, and their metadata as the daemon reports it
// comes back through Events.Outputs; nothing is fetched or registered here.
func TestRunDaemonKeepsOutputs(t *testing.T) {
	e := newEnv(t)
	e.job.KeepOutputs = true
	ctx, cancel := context.WithTimeout(context.Background(), caseBound)
	defer cancel()
	ps := e.srv.PipeDaemon(t, machine)
	conn, err := daemonproto.Handshake(ctx, ps.R, ps.W, daemonproto.Options{Abort: func() { ps.Close() }, Explain: ps.Explain})
	if err != nil {
		t.Fatal(err)
	}
	var kept []serveproto.PathInfo
	fetched := false
	err = offload.RunDaemon(ctx, conn, e.store, e.job, offload.Events{
		Outputs:  func(infos []serveproto.PathInfo) { kept = infos },
		Fetching: func(int, uint64) { fetched = true },
	})
	if err != nil {
		t.Fatal(err)
	}
	out, ok := e.srv.Lookup(outPath)
	if !ok {
		t.Fatalf("%s was not built on the machine", outPath)
	}
	if len(kept) != 1 || kept[0].Path != outPath || kept[0].NarHash != out.Info.NarHash ||
		kept[0].NarSize != out.Info.NarSize || kept[0].Deriver != drvPath {
		t.Errorf("Events.Outputs got %+v, want the machine's %+v", kept, out.Info)
	}
	if _, ok := e.srv.Lookup(inputPath); !ok {
		t.Errorf("the input %s was not sent", inputPath)
	}
	if fetched || slices.Contains(e.srv.Ops(), servetest.WorkerNarFromPath) {
		t.Errorf("the output was fetched (ops %v)", e.srv.Ops())
	}
	e.checkNothingValid(t)
}
