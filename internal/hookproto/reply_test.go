package hookproto

import (
	"errors"
	"strings"
	"syscall"
	"testing"
)

// writeRecorder records each Write call.
type writeRecorder struct {
	calls []string
	err   error
}

func (w *writeRecorder) Write(p []byte) (int, error) {
	if w.err != nil {
		return 0, w.err
	}
	w.calls = append(w.calls, string(p))
	return len(p), nil
}

func TestReplies(t *testing.T) {
	for _, tc := range []struct {
		f    func(*writeRecorder) error
		want string
	}{
		{func(w *writeRecorder) error { return Accept(w, "builder1") }, "# accept\nbuilder1\n"},
		{func(w *writeRecorder) error { return Accept(w, "ssh://a\nb\r") }, "# accept\nssh://a b \n"},
		{func(w *writeRecorder) error { return Accept(w, "") }, "# accept\n\n"},
		{func(w *writeRecorder) error { return Decline(w) }, "# decline\n"},
		{func(w *writeRecorder) error { return DeclinePermanently(w) }, "# decline-permanently\n"},
		{func(w *writeRecorder) error { return Postpone(w) }, "# postpone\n"},
	} {
		var w writeRecorder
		if err := tc.f(&w); err != nil {
			t.Fatal(err)
		}
		if len(w.calls) != 1 || w.calls[0] != tc.want {
			t.Errorf("writes %q, want one write %q", w.calls, tc.want)
		}
	}
}

func TestReplyError(t *testing.T) {
	w := writeRecorder{err: syscall.EPIPE}
	err := Postpone(&w)
	if !errors.Is(err, syscall.EPIPE) || !strings.Contains(err.Error(), `hookproto: writing reply "postpone"`) {
		t.Errorf("got %v", err)
	}
}
