package service

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

func TestJournalLogger(t *testing.T) {
	var buf bytes.Buffer
	log := NewLogger(zapcore.AddSync(&buf), zapcore.DebugLevel, true)

	log.Warn("machine unreachable", zap.String("machine", "b1"), zap.Error(errors.New("dial tcp 10.0.0.1:22: connection refused")))
	log.Debug("probe", zap.Duration("took", 1500*time.Millisecond))
	log.Info("serving")
	log.Error("build failed", zap.String("drv", "/nix/store/abc-x.drv"))
	log.DPanic("invariant broken")
	log.Named("scheduler").With(zap.Int("queue", 2)).Info("decided", zap.String("machine", "b2"))
	log.Info("first line\nsecond line\r\nthird", zap.String("output", "a\nb"))
	log.Named("a\nb").Info("")

	want := strings.Join([]string{
		`<4>machine unreachable {"machine": "b1", "error": "dial tcp 10.0.0.1:22: connection refused"}`,
		`<7>probe {"took": "1.5s"}`,
		`<6>serving`,
		`<3>build failed {"drv": "/nix/store/abc-x.drv"}`,
		`<2>invariant broken`,
		`<6>scheduler: decided {"queue": 2, "machine": "b2"}`,
		`<6>first line\nsecond line\r\nthird {"output": "a\nb"}`,
		`<6>a\nb: `,
		``,
	}, "\n")
	if got := buf.String(); got != want {
		t.Errorf("got:\n%s\nwant:\n%s", got, want)
	}
}

func TestConsoleLogger(t *testing.T) {
	var buf bytes.Buffer
	log := NewLogger(zapcore.AddSync(&buf), zapcore.InfoLevel, false)

	log.Debug("not shown")
	log.Warn("machine unreachable", zap.String("machine", "b1"))
	log.Named("health").Error("two\nlines")

	lines := strings.Split(strings.TrimSuffix(buf.String(), "\n"), "\n")
	const ts = `\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(Z|[+-]\d{4})`
	want := []*regexp.Regexp{
		regexp.MustCompile(`^` + ts + ` WARN machine unreachable \{"machine": "b1"\}$`),
		regexp.MustCompile(`^` + ts + ` ERROR health: two\\nlines$`),
	}
	if len(lines) != len(want) {
		t.Fatalf("got %d lines, want %d:\n%s", len(lines), len(want), &buf)
	}
	for i, re := range want {
		if !re.MatchString(lines[i]) {
			t.Errorf("line %d = %q, want it to match %s", i+1, lines[i], re)
		}
	}
}

func TestUnderJournal(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "stream"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	match := fmt.Sprintf("%d:%d", st.Dev, st.Ino)
	for _, tt := range []struct {
		env  string
		want bool
	}{
		{match, true},
		{fmt.Sprintf("%d:%d", st.Dev, st.Ino+1), false},
		{fmt.Sprintf("%d:%d", st.Dev+1, st.Ino), false},
		{"", false},
		{"garbage", false},
		{fmt.Sprintf("%d", st.Ino), false},
		{match + ":1", false},
	} {
		if got := isJournalStream(tt.env, f); got != tt.want {
			t.Errorf("isJournalStream(%q) = %v, want %v", tt.env, got, tt.want)
		}
	}

	// UnderJournal looks at this process's stderr.
	fi, err := os.Stderr.Stat()
	if err != nil {
		t.Fatal(err)
	}
	stderr := fi.Sys().(*syscall.Stat_t)
	t.Setenv("JOURNAL_STREAM", fmt.Sprintf("%d:%d", stderr.Dev, stderr.Ino))
	if !UnderJournal() {
		t.Error("UnderJournal() = false with JOURNAL_STREAM naming stderr")
	}
	t.Setenv("JOURNAL_STREAM", match)
	if UnderJournal() {
		t.Error("UnderJournal() = true with JOURNAL_STREAM naming another file")
	}
	t.Setenv("JOURNAL_STREAM", "")
	if UnderJournal() {
		t.Error("UnderJournal() = true without JOURNAL_STREAM")
	}
}
