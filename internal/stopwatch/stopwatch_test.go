package stopwatch

import (
	"bufio"
	"encoding/json"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

func TestNilWatchRecordsNothing(t *testing.T) {
	t.Setenv(Env, "")
	w := FromEnv()
	if w != nil {
		t.Fatalf("FromEnv() with %s unset = %v, want nil", Env, w)
	}
	w.Mark("x")
	w.Set("k", "v")
	if err := w.Write(); err != nil {
		t.Fatal(err)
	}
}

// Processes that end at once append whole lines: each is one write.
func TestWriteAppendsOneLinePerWatch(t *testing.T) {
	file := filepath.Join(t.TempDir(), "times.jsonl")
	t0 := time.Now().Add(-time.Second)
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w := Start(file, t0)
			w.Set("drv", "/nix/store/x.drv")
			w.Mark("settings")
			w.Mark("exit")
			if err := w.Write(); err != nil {
				t.Errorf("watch %d: %v", i, err)
			}
		}()
	}
	wg.Wait()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	n := 0
	for sc.Scan() {
		var l struct {
			Attrs map[string]string `json:"attrs"`
			Steps [][2]any          `json:"steps"`
			Start time.Time         `json:"start"`
		}
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			t.Fatalf("line %d: %v: %s", n+1, err, sc.Bytes())
		}
		if len(l.Steps) != 2 || l.Steps[0][0] != "settings" || l.Steps[1][0] != "exit" || l.Attrs["drv"] != "/nix/store/x.drv" {
			t.Fatalf("line %d = %s", n+1, sc.Bytes())
		}
		if us := l.Steps[0][1].(float64); us < 1e6 {
			t.Errorf("line %d: settings at %v µs, want at least 1 s after a start 1 s ago", n+1, us)
		}
		if !l.Start.Equal(t0) {
			t.Errorf("line %d: start %v, want %v", n+1, l.Start, t0)
		}
		n++
	}
	if n != 20 {
		t.Fatalf("%d lines, want 20", n)
	}
}
