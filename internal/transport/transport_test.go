package transport

import (
	"bufio"
	"errors"
	"io"
	"strings"
	"testing"
	"time"
)

func TestServeCommandQuotesForTheRemoteShell(t *testing.T) {
	if got := ServeCommand("", ""); got != "nix-store --serve --write" {
		t.Errorf("ServeCommand(\"\") = %q", got)
	}
	got := ServeCommand("", "local?root=/tmp/my store&x='1'")
	want := `nix-store --serve --write --store 'local?root=/tmp/my store&x='\''1'\'''`
	if got != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}
}

// remote-program replaces the program, word by word as Nix splits it, for
// both protocols.
func TestRemoteProgram(t *testing.T) {
	for _, tc := range []struct{ got, want string }{
		{ServeCommand("/nix/var/nix/profiles/default/bin/nix-store", ""), "/nix/var/nix/profiles/default/bin/nix-store --serve --write"},
		{ServeCommand("sudo -n nix-store", "daemon"), "sudo -n nix-store --serve --write --store daemon"},
		{DaemonCommand("", ""), "nix-daemon --stdio"},
		{DaemonCommand("", "local?root=/x"), "nix-daemon --stdio --store 'local?root=/x'"},
		{DaemonCommand("/nix/var/nix/profiles/default/bin/nix-daemon", ""), "/nix/var/nix/profiles/default/bin/nix-daemon --stdio"},
		{DaemonCommand("it's", ""), `'it'\''s' --stdio`},
	} {
		if tc.got != tc.want {
			t.Errorf("got  %s\nwant %s", tc.got, tc.want)
		}
	}
}

func TestTailKeepsTheEnd(t *testing.T) {
	tb := &tailBuffer{max: 8}
	tb.Write([]byte("0123"))
	tb.Write([]byte("456789"))
	if tb.String() != "23456789" {
		t.Errorf("tail %q", tb.String())
	}
	tb.Write([]byte("abcdefghijkl"))
	if tb.String() != "efghijkl" {
		t.Errorf("tail %q", tb.String())
	}
}

func TestErrorTextPrefersNixErrors(t *testing.T) {
	tail := "copying path x\nerror: path '/nix/store/x' is not valid\n       more context\n"
	if got := errorText(tail, false); got != "error: path '/nix/store/x' is not valid; more context" {
		t.Errorf("errorText = %q", got)
	}
	if got := errorText(tail, true); got != "error: path '/nix/store/x' is not valid; more context" {
		t.Errorf("errorText of a build log = %q", got)
	}
	if got := errorText("a\nb\nc\nd\n", false); got != "b; c; d" {
		t.Errorf("errorText without error: = %q", got)
	}
	// A builder's last words are not the reason its connection died.
	if got := errorText("building\nsleeping\n", true); got != "" {
		t.Errorf("errorText of a build log without error: = %q", got)
	}
}

// A process that dies explains the broken stream with its stderr and exit
// status; errors that are not stream failures pass through unchanged.
func TestExplainLocal(t *testing.T) {
	s, err := Local([]string{"/bin/sh", "-c", "read x; echo 'error: boom' >&2; exit 3"}, Options{Name: "peer"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	io.WriteString(s.Stdin(), "go\n")
	_, err = io.ReadAll(s.Stdout())
	if err != nil {
		t.Fatal(err)
	}
	got := s.Explain(io.ErrUnexpectedEOF)
	var re *RemoteError
	if !errors.As(got, &re) || got.Error() != "peer: nix-store --serve: error: boom (exit status 3)" {
		t.Errorf("Explain = %v", got)
	}
	if !errors.Is(got, io.ErrUnexpectedEOF) {
		t.Error("explained error does not wrap the stream error")
	}
	other := errors.New("bad bytes")
	if s.Explain(other) != other {
		t.Error("a protocol error was rewritten")
	}
}

// Close ends a process that ignores its stdin.
func TestCloseKillsStubbornProcess(t *testing.T) {
	s, err := Local([]string{"/bin/sh", "-c", "trap '' HUP; exec sleep 300"}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	select {
	case <-s.Done():
	default:
		t.Fatal("process still running after Close")
	}
	if !strings.Contains(exitText(s.exitErr), "killed") {
		t.Errorf("exit %q, want killed", exitText(s.exitErr))
	}
}

// A session reused for a second build explains that build's failure by what
// it printed itself: neither the first build's error lines nor its "stderr
// is a log" mode survive ResetStderr.
func TestResetStderrForgetsTheEarlierBuild(t *testing.T) {
	script := `read x; echo "error: the first build failed" >&2; echo first; read y; echo "second words" >&2; exit 4`
	s, err := Local([]string{"/bin/sh", "-c", script}, Options{Name: "peer"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	out := bufio.NewReader(s.Stdout())
	io.WriteString(s.Stdin(), "1\n")
	if line, err := out.ReadString('\n'); err != nil || line != "first\n" {
		t.Fatalf("first reply %q, %v", line, err)
	}
	s.StderrIsLog()
	// stderr is drained by its own goroutine: wait until the first build's
	// error is kept, as it would be by the time a later build fails.
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(s.Stderr(), "the first build failed") {
		if time.Now().After(deadline) {
			t.Fatalf("stderr tail %q after 5 s", s.Stderr())
		}
		time.Sleep(5 * time.Millisecond)
	}

	s.ResetStderr()
	if got := s.Stderr(); got != "" {
		t.Errorf("Stderr after ResetStderr = %q", got)
	}
	io.WriteString(s.Stdin(), "2\n")
	if _, err := io.ReadAll(out); err != nil {
		t.Fatal(err)
	}
	// Kept tail: "error: the first build failed" would win as the last
	// error paragraph. Kept log mode: "second words" would not count.
	got := s.Explain(io.ErrUnexpectedEOF)
	if want := "peer: nix-store --serve: second words (exit status 4)"; got == nil || got.Error() != want {
		t.Errorf("Explain = %v\nwant       %s", got, want)
	}
}
