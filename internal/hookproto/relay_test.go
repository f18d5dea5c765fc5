package hookproto

import (
	"encoding/json"
	"os"
	"strings"
	"testing"
)

// relayLines parses what a Relay wrote through a Logger.
func relayLines(t *testing.T, calls []string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, c := range calls {
		s, ok := strings.CutPrefix(c, "@nix ")
		if !ok {
			t.Fatalf("not an @nix line: %q", c)
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(s), &m); err != nil {
			t.Fatalf("%q: %v", c, err)
		}
		out = append(out, m)
	}
	return out
}

// A machine's activities reach Nix under ids of the hook's own Logger,
// never the machine's, with log lines and types Nix would misread left
// out, and activities still open stopped at Close.
func TestRelayRemapsIDs(t *testing.T) {
	var w writeRecorder
	l := NewLogger(&w)
	own, err := l.Start(ActCopyPaths, LvlInfo, "copying")
	if err != nil {
		t.Fatal(err)
	}
	r := NewRelay(l)
	// The machine's ids: its pid in the top half, here the same as ours,
	// so that its first activity has the id of the hook's first.
	remote := uint64(own)
	r.Start(remote, uint64(LvlInfo), uint64(ActBuild), "building '/nix/store/x.drv'", []any{"/nix/store/x.drv", "", uint64(1), uint64(1)})
	r.Result(remote, uint64(ResSetPhase), []any{"buildPhase"})
	r.Result(remote, uint64(ResBuildLogLine), []any{"a line fd 4 has"})
	r.Result(remote, uint64(ResPostBuildLogLine), []any{"another"})
	r.Start(remote+1, uint64(LvlInfo), uint64(ActFileTransfer), "downloading", []any{"https://x"})
	r.Result(remote+1, uint64(ResProgress), []any{uint64(1), uint64(2), uint64(0), uint64(0)})
	r.Stop(remote + 1)
	r.Start(remote+2, uint64(LvlTalkative), uint64(ActUnknown), "still open", nil)
	r.Result(remote+9, uint64(ResSetPhase), []any{"of no activity"})
	r.Result(remote, uint64(ResSetPhase), []any{uint64(3)}) // not a string: Nix would throw
	r.Stop(remote)
	r.Close()

	got := relayLines(t, w.calls[1:]) // after the hook's own start
	want := []struct {
		action string
		typ    float64
	}{{"start", float64(ActBuild)}, {"result", float64(ResSetPhase)}, {"start", float64(ActUnknown)}, {"stop", 0}, {"stop", 0}}
	if len(got) != len(want) {
		t.Fatalf("%d lines, want %d: %q", len(got), len(want), w.calls[1:])
	}
	for i, m := range got {
		if m["action"] != want[i].action || (want[i].action != "stop" && m["type"] != want[i].typ) {
			t.Errorf("line %d: %v, want %s of type %v", i, m, want[i].action, want[i].typ)
		}
	}
	build, open := uint64(got[0]["id"].(float64)), uint64(got[2]["id"].(float64))
	base := uint64(os.Getpid()) << 32
	for _, id := range []uint64{build, open} {
		if id == uint64(own) || id>>32 != base>>32 {
			t.Errorf("id %#x: not a fresh id of the hook's Logger (own %#x)", id, own)
		}
	}
	if build == open {
		t.Errorf("two activities got id %#x", build)
	}
	if uint64(got[1]["id"].(float64)) != build || uint64(got[3]["id"].(float64)) != build || uint64(got[4]["id"].(float64)) != open {
		t.Errorf("results and stops do not address their activity: %v", got)
	}
	if got[0]["parent"] != float64(0) || got[0]["text"] != "building '/nix/store/x.drv'" {
		t.Errorf("start %v", got[0])
	}
}

// blockedWriter blocks every Write until release is closed, as a stderr
// pipe does while Nix reads another hook.
type blockedWriter struct {
	release chan struct{}
	w       writeRecorder
}

func (b *blockedWriter) Write(p []byte) (int, error) {
	<-b.release
	return b.w.Write(p)
}

// While Nix does not read, the Relay's callers go on, a Progress flood
// leaves its latest value, and what is queued stays bounded.
func TestRelayNeverBlocks(t *testing.T) {
	bw := &blockedWriter{release: make(chan struct{})}
	r := NewRelay(NewLogger(bw))
	r.Start(1, uint64(LvlInfo), uint64(ActBuild), "building", nil)
	const flood = 100000
	for i := range uint64(flood) {
		r.Result(1, uint64(ResProgress), []any{i, uint64(flood), uint64(1), uint64(0)})
	}
	for i := range uint64(2 * MaxRelayQueue) {
		r.Result(1, uint64(ResSetPhase), []any{"phase"})
		r.Start(100+i, uint64(LvlInfo), uint64(ActUnknown), "more", nil)
	}
	r.mu.Lock()
	queued := len(r.queue)
	r.mu.Unlock()
	// The writer may hold the first start; everything else waits here.
	if queued > MaxRelayQueue+1 {
		t.Errorf("%d messages queued, want at most %d", queued, MaxRelayQueue+1)
	}
	close(bw.release)
	r.Close()
	var progress []map[string]any
	for _, m := range relayLines(t, bw.w.calls) {
		if m["action"] == "result" && m["type"] == float64(ResProgress) {
			progress = append(progress, m)
		}
	}
	if len(progress) == 0 || len(progress) > 2 {
		t.Fatalf("%d progress results written for a flood of %d, want 1 or 2", len(progress), flood)
	}
	if last := progress[len(progress)-1]["fields"].([]any)[0]; last != float64(flood-1) {
		t.Errorf("last progress done = %v, want %d", last, flood-1)
	}
}
