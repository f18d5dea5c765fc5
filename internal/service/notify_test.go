package service

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// notifySocket plays systemd's side: a datagram socket set as NOTIFY_SOCKET.
type notifySocket struct {
	t *testing.T
	c *net.UnixConn
}

// listenNotify sets NOTIFY_SOCKET to a new socket at addr (a path, or "@name" for an abstract
// one) for the rest of the test.
func listenNotify(t *testing.T, addr string) *notifySocket {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	t.Setenv("NOTIFY_SOCKET", addr)
	return &notifySocket{t: t, c: c}
}

// next returns the next datagram, failing the test if none arrives within timeout.
func (s *notifySocket) next(timeout time.Duration) string {
	s.t.Helper()
	msg, err := s.read(timeout)
	if err != nil {
		s.t.Fatalf("no notification: %v", err)
	}
	return msg
}

func (s *notifySocket) read(timeout time.Duration) (string, error) {
	s.c.SetReadDeadline(time.Now().Add(timeout))
	b := make([]byte, 4096)
	n, err := s.c.Read(b)
	return string(b[:n]), err
}

// none fails the test if a datagram arrives within d.
func (s *notifySocket) none(d time.Duration) {
	s.t.Helper()
	if msg, err := s.read(d); err == nil {
		s.t.Errorf("unexpected notification %q", msg)
	}
}

func TestNotifierMessages(t *testing.T) {
	for _, tc := range []struct{ name, addr string }{
		{"path", filepath.Join(t.TempDir(), "notify")},
		{"abstract", fmt.Sprintf("@nix-offload-test-%d-%d", os.Getpid(), time.Now().UnixNano())},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := listenNotify(t, tc.addr)
			n := NewNotifier(nil)

			n.Ready("serving 3 machines")
			if got, want := s.next(time.Second), "READY=1\nSTATUS=serving 3 machines"; got != want {
				t.Errorf("Ready sent %q, want %q", got, want)
			}
			n.Ready("")
			if got, want := s.next(time.Second), "READY=1"; got != want {
				t.Errorf("Ready without a status sent %q, want %q", got, want)
			}
			// A newline must not smuggle in another assignment.
			n.Status("2 builds running\nREADY=1")
			if got, want := s.next(time.Second), "STATUS=2 builds running READY=1"; got != want {
				t.Errorf("Status sent %q, want %q", got, want)
			}
			n.Stopping()
			if got, want := s.next(time.Second), "STOPPING=1"; got != want {
				t.Errorf("Stopping sent %q, want %q", got, want)
			}
		})
	}
}

func TestNotifierOutsideSystemd(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	t.Setenv("WATCHDOG_USEC", "1000")
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	var logs bytes.Buffer
	n := NewNotifier(NewLogger(zapcore.AddSync(&logs), zapcore.DebugLevel, true))
	n.Ready("x")
	n.Status("x")
	n.Stopping()
	called := false
	if err := n.Watchdog(context.Background(), func() error { called = true; return nil }); err != nil {
		t.Errorf("Watchdog = %v, want nil", err)
	}
	if called {
		t.Error("Watchdog checked health outside systemd")
	}
	if logs.Len() != 0 {
		t.Errorf("logged outside systemd:\n%s", &logs)
	}
	var zero Notifier // usable without NewNotifier
	zero.Stopping()
}

func TestNotifierBrokenSocketIsLogged(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "gone")
	t.Setenv("NOTIFY_SOCKET", missing)
	var logs bytes.Buffer
	NewNotifier(NewLogger(zapcore.AddSync(&logs), zapcore.DebugLevel, true)).Ready("up")
	if got := logs.String(); !strings.HasPrefix(got, `<4>cannot notify systemd {"state": "READY=1\nSTATUS=up", "error": "dial unixgram `+missing) {
		t.Errorf("log:\n%s", got)
	}
}

func TestWatchdog(t *testing.T) {
	s := listenNotify(t, filepath.Join(t.TempDir(), "notify"))
	const interval = 100 * time.Millisecond
	t.Setenv("WATCHDOG_USEC", strconv.Itoa(int(interval/time.Microsecond)))
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	var logs syncBuffer
	n := NewNotifier(NewLogger(&logs, zapcore.DebugLevel, true))

	// Healthy for three checks, then broken.
	var mu sync.Mutex
	checks := 0
	broken := errors.New("scheduler stuck for 2m0s")
	healthy := func() error {
		mu.Lock()
		defer mu.Unlock()
		checks++
		if checks > 3 {
			return broken
		}
		return nil
	}
	done := make(chan error, 1)
	go func() { done <- n.Watchdog(context.Background(), healthy) }()

	var at []time.Time
	for range 3 {
		if got := s.next(2 * time.Second); got != "WATCHDOG=1" {
			t.Fatalf("got %q, want WATCHDOG=1", got)
		}
		at = append(at, time.Now())
	}
	// The first ping is immediate, the next come every interval/2.
	if gap := at[2].Sub(at[0]); gap < interval*3/4 {
		t.Errorf("three pings within %v; want them %v apart", gap, interval/2)
	}
	got := s.next(2 * time.Second)
	if want := "STATUS=unhealthy, waiting for the watchdog to restart it: " + broken.Error(); got != want {
		t.Errorf("after the failed check got %q, want %q", got, want)
	}
	select {
	case err := <-done:
		if !errors.Is(err, broken) {
			t.Errorf("Watchdog = %v, want it to wrap %v", err, broken)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Watchdog did not return after a failed health check")
	}
	s.none(interval) // and no ping after it
	if checks != 4 {
		t.Errorf("health checked %d times, want 4", checks)
	}
	want := `<3>health check failed; no longer pinging the systemd watchdog, which will restart the broker {"error": "scheduler stuck for 2m0s", "watchdog": "100ms"}` + "\n"
	if got := logs.String(); got != want {
		t.Errorf("log:\n%s\nwant:\n%s", got, want)
	}
}

func TestWatchdogStopsWithContext(t *testing.T) {
	s := listenNotify(t, filepath.Join(t.TempDir(), "notify"))
	t.Setenv("WATCHDOG_USEC", "100000")
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- NewNotifier(nil).Watchdog(ctx, func() error { return nil }) }()
	if got := s.next(2 * time.Second); got != "WATCHDOG=1" {
		t.Fatalf("got %q, want WATCHDOG=1", got)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Watchdog = %v after cancel, want nil", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Watchdog did not return after cancel")
	}
}

func TestWatchdogSettings(t *testing.T) {
	listenNotify(t, filepath.Join(t.TempDir(), "notify"))
	me := strconv.Itoa(os.Getpid())
	tests := []struct {
		usec, pid string
		want      time.Duration
		wantErr   string
	}{
		{"", "", 0, ""},
		{"30000000", me, 30 * time.Second, ""},
		{"30000000", "", 30 * time.Second, ""}, // no WATCHDOG_PID: it is ours
		{"30000000", "1", 0, ""},               // another process's watchdog
		{"0", me, 0, "positive"},
		{"-5", me, 0, "WATCHDOG_USEC"},
		{"thirty", me, 0, "WATCHDOG_USEC"},
		{"30000000", "me", 0, "WATCHDOG_PID"},
	}
	for _, tt := range tests {
		t.Setenv("WATCHDOG_USEC", tt.usec)
		t.Setenv("WATCHDOG_PID", tt.pid)
		got, err := watchdogInterval()
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("USEC=%q PID=%q: %v, %v; want an error about %s", tt.usec, tt.pid, got, err, tt.wantErr)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("USEC=%q PID=%q: %v, %v; want %v", tt.usec, tt.pid, got, err, tt.want)
		}
		if got == 0 { // Watchdog does nothing and returns at once
			called := false
			if err := NewNotifier(nil).Watchdog(context.Background(), func() error { called = true; return nil }); err != nil || called {
				t.Errorf("USEC=%q PID=%q: Watchdog = %v, health checked: %v; want nil, false", tt.usec, tt.pid, err, called)
			}
		}
	}
	t.Setenv("WATCHDOG_USEC", "garbage")
	t.Setenv("WATCHDOG_PID", me)
	if err := NewNotifier(zap.NewNop()).Watchdog(context.Background(), func() error { return nil }); err == nil {
		t.Error("Watchdog with WATCHDOG_USEC=garbage returned nil")
	}
}

// syncBuffer is a bytes.Buffer for a logger written from another goroutine.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) Sync() error { return nil }

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
