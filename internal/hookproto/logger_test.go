package hookproto

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
)

func TestLoggerGolden(t *testing.T) {
	var w writeRecorder
	l := NewLogger(&w)
	base := uint64(os.Getpid()) << 32

	if err := l.Msg(LvlError, "error: it \"broke\" <here> & \xff\n"); err != nil {
		t.Fatal(err)
	}
	id, err := l.Start(ActCopyPaths, LvlInfo, "copying 2 paths to 'b1'", "b1", uint64(2), 3)
	if err != nil {
		t.Fatal(err)
	}
	if uint64(id) != base+1 {
		t.Errorf("first id = %#x, want %#x", id, base+1)
	}
	id2, err := l.Start(ActBuild, LvlInfo, "building")
	if err != nil {
		t.Fatal(err)
	}
	must(t, l.Result(id, ResProgress, uint64(1), uint64(2), 0, 0))
	must(t, l.Result(id2, ResBuildLogLine, "line"))
	must(t, l.Result(id2, ResSetExpected))
	must(t, l.Stop(id2))
	must(t, l.Stop(id))

	want := []string{
		`@nix {"action":"msg","level":0,"msg":"error: it \"broke\" <here> & \ufffd\n"}`,
		fmt.Sprintf(`@nix {"action":"start","id":%d,"level":3,"type":103,"text":"copying 2 paths to 'b1'","fields":["b1",2,3],"parent":0}`, id),
		fmt.Sprintf(`@nix {"action":"start","id":%d,"level":3,"type":105,"text":"building","fields":[],"parent":0}`, id2),
		fmt.Sprintf(`@nix {"action":"result","id":%d,"type":105,"fields":[1,2,0,0]}`, id),
		fmt.Sprintf(`@nix {"action":"result","id":%d,"type":101,"fields":["line"]}`, id2),
		fmt.Sprintf(`@nix {"action":"result","id":%d,"type":106,"fields":[]}`, id2),
		fmt.Sprintf(`@nix {"action":"stop","id":%d}`, id2),
		fmt.Sprintf(`@nix {"action":"stop","id":%d}`, id),
	}
	if len(w.calls) != len(want) {
		t.Fatalf("%d writes, want %d: %q", len(w.calls), len(want), w.calls)
	}
	for i := range want {
		if w.calls[i] != want[i]+"\n" {
			t.Errorf("write %d:\n got %q\nwant %q", i, w.calls[i], want[i]+"\n")
		}
	}
}

// TestLoggerFields checks that every message has every field Nix's parser
// reads (2.8 logging.cc handleJSONLogMessage reads them with operator[],
// 2.26 with valueAt; ≤ 2.24.10 crash on a missing one).
func TestLoggerFields(t *testing.T) {
	var w writeRecorder
	l := NewLogger(&w)
	must(t, l.Msg(LvlInfo, "m"))
	id, err := l.Start(ActUnknown, LvlInfo, "")
	must(t, err)
	must(t, l.Result(id, ResFileLinked))
	must(t, l.Stop(id))
	need := map[string][]string{
		"msg":    {"level", "msg"},
		"start":  {"id", "level", "type", "text", "fields", "parent"},
		"result": {"id", "type", "fields"},
		"stop":   {"id"},
	}
	for _, line := range w.calls {
		var m map[string]any
		if err := json.Unmarshal([]byte(strings.TrimPrefix(line, "@nix ")), &m); err != nil {
			t.Fatalf("%q: %v", line, err)
		}
		for _, f := range need[m["action"].(string)] {
			if _, ok := m[f]; !ok {
				t.Errorf("%q has no %q", line, f)
			}
		}
		if f, ok := m["fields"]; ok && f == nil {
			t.Errorf("%q: fields is null", line)
		}
	}
}

func TestLoggerRefuses(t *testing.T) {
	var w writeRecorder
	l := NewLogger(&w)
	for _, tc := range []struct {
		err  error
		want string
	}{
		{l.Msg(LvlVomit+1, "x"), "msg: level 8 is above 7"},
		{second(l.Start(ActFileTransfer, LvlInfo, "x")), "activity type 101 would be taken"},
		{second(l.Start(ActBuilds, LvlInfo, "x")), "activity type 104 would be taken"},
		{second(l.Start(99, LvlInfo, "x")), "unknown activity type 99"},
		{second(l.Start(112, LvlInfo, "x")), "unknown activity type 112"},
		{second(l.Start(ActBuild, 9, "x")), "level 9"},
		{second(l.Start(ActBuild, LvlInfo, "x", -1)), "field 0 is negative (-1)"},
		{second(l.Start(ActBuild, LvlInfo, "x", "a", 1.5)), "field 1 is a float64"},
		{second(l.Start(ActBuild, LvlInfo, "x", true)), "field 0 is a bool"},
		{second(l.Start(ActBuild, LvlInfo, "x", nil)), "field 0 is a <nil>"},
		{l.Result(1, 99), "unknown result type 99"},
		{l.Result(1, 108), "unknown result type 108"},
		{l.Result(1, ResBuildLogLine), "type 101 needs a string field"},
		{l.Result(1, ResSetPhase, 3), "type 104: field 0 is a uint64, not a string"},
	} {
		if tc.err == nil || !strings.Contains(tc.err.Error(), tc.want) || !strings.HasPrefix(tc.err.Error(), "hookproto: ") {
			t.Errorf("got %v, want an error containing %q", tc.err, tc.want)
		}
	}
	if len(w.calls) != 0 {
		t.Errorf("refused messages were written: %q", w.calls)
	}
}

func TestLoggerWriteError(t *testing.T) {
	w := writeRecorder{err: syscall.EPIPE}
	l := NewLogger(&w)
	err := l.Msg(LvlInfo, "x")
	if !errors.Is(err, syscall.EPIPE) {
		t.Fatalf("got %v", err)
	}
	w.err = nil
	if err2 := l.Msg(LvlInfo, "y"); err2 != err || len(w.calls) != 0 {
		t.Errorf("after a failed write: %v, writes %q", err2, w.calls)
	}
}

// lineChecker fails the test unless every Write is exactly one @nix line.
type lineChecker struct {
	t  *testing.T
	mu sync.Mutex
	n  int
}

func (c *lineChecker) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := string(p)
	if !strings.HasPrefix(s, "@nix {") || strings.Index(s, "\n") != len(s)-1 || !json.Valid(p[5:]) {
		c.t.Errorf("write is not one @nix line: %q", s)
	}
	c.n++
	return len(p), nil
}

func TestLoggerConcurrent(t *testing.T) {
	c := &lineChecker{t: t}
	l := NewLogger(c)
	const goroutines, each = 16, 200
	ids := make(chan ActivityID, goroutines*each)
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			for i := range each {
				id, err := l.Start(ActBuild, LvlInfo, fmt.Sprintf("g%d i%d", g, i))
				if err != nil {
					t.Error(err)
					return
				}
				ids <- id
				l.Result(id, ResBuildLogLine, strings.Repeat("x", i))
				l.Msg(LvlDebug, "m")
				l.Stop(id)
			}
		})
	}
	wg.Wait()
	close(ids)
	seen := map[ActivityID]bool{}
	for id := range ids {
		if seen[id] {
			t.Fatalf("id %d used twice", id)
		}
		seen[id] = true
	}
	if c.n != 4*goroutines*each {
		t.Errorf("%d writes, want %d", c.n, 4*goroutines*each)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func second[T any](_ T, err error) error { return err }
