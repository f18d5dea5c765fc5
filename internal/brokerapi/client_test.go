package brokerapi

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// serve runs handler on a unix socket and counts the connections made.
func serve(t *testing.T, handler http.Handler) (socket string, conns *atomic.Int32) {
	t.Helper()
	socket, conns, _ = serveCounting(t, handler)
	return socket, conns
}

// serveCounting is serve that also sends on closed each time the server has done with a
// connection.
func serveCounting(t *testing.T, handler http.Handler) (socket string, conns *atomic.Int32, closed <-chan struct{}) {
	t.Helper()
	socket = filepath.Join(t.TempDir(), "s.sock")
	ln, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	conns = &atomic.Int32{}
	done := make(chan struct{}, 100)
	srv := &http.Server{Handler: handler, ConnState: func(_ net.Conn, st http.ConnState) {
		switch st {
		case http.StateNew:
			conns.Add(1)
		case http.StateClosed, http.StateHijacked:
			select {
			case done <- struct{}{}:
			default:
			}
		}
	}}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return socket, conns, done
}

// waitClosed waits until the server has closed n connections.
func waitClosed(t *testing.T, closed <-chan struct{}, n int) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for range n {
		select {
		case <-closed:
		case <-timeout:
			t.Fatalf("the server did not close %d connections within 10 s", n)
		}
	}
}

// A hook reads the build's events, then fetches the outputs and reports,
// all on the one connection that owns the build. The last event must free
// the connection by itself: the hook fetches before it closes the stream
// (a hang here was a real bug).
func TestBuildThenFetchOnOneConnection(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/builds", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/x-ndjson")
		enc := json.NewEncoder(w)
		enc.Encode(Event{Type: EventLog, Text: "hello\n"})
		w.(http.Flusher).Flush()
		enc.Encode(Event{Type: EventOutputs, Build: "7", Outputs: []PathInfo{{Path: "/nix/store/x-out", NarSize: 3}}})
		// As the broker does: the last event goes out at once, the end of
		// the response a little later.
		w.(http.Flusher).Flush()
		time.Sleep(50 * time.Millisecond)
	})
	mux.HandleFunc("GET /v1/builds/{id}/nar/{base}", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte(r.PathValue("id") + ":" + r.PathValue("base")))
	})
	mux.HandleFunc("POST /v1/builds/{id}/imported", func(w http.ResponseWriter, r *http.Request) {
		var req ImportedRequest
		json.NewDecoder(r.Body).Decode(&req)
		json.NewEncoder(w).Encode(ImportedResponse(req))
	})
	socket, conns := serve(t, mux)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	stream, err := c.Build(ctx, BuildRequest{DrvPath: "/nix/store/x.drv"})
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	if ev, err := stream.Next(); err != nil || ev.Type != EventLog || ev.Text != "hello\n" {
		t.Fatalf("first event %+v, %v", ev, err)
	}
	ev, err := stream.Next()
	if err != nil || ev.Type != EventOutputs || len(ev.Outputs) != 1 {
		t.Fatalf("second event %+v, %v", ev, err)
	}
	var nar strings.Builder
	if err := c.FetchNAR(ctx, ev.Build, ev.Outputs[0].Path, &nar); err != nil {
		t.Fatal(err)
	}
	if nar.String() != "7:x-out" {
		t.Errorf("fetched %q", nar.String())
	}
	resp, err := c.Imported(ctx, ev.Build, nil)
	if err != nil || resp.Error != "" {
		t.Errorf("imported: %+v, %v", resp, err)
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("%d connections, want 1: the build's owner must keep one", n)
	}
}

func TestErrorsAndVersion(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/try", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
		json.NewEncoder(w).Encode(ErrorResponse{Error: "the broker is stopping"})
	})
	socket, _ := serve(t, mux)
	ctx := context.Background()
	c, err := Dial(ctx, socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, err = c.Try(ctx, TryRequest{DrvPath: "/nix/store/x.drv"})
	if e, ok := err.(*Error); !ok || e.Status != 503 || e.Msg != "the broker is stopping" {
		t.Errorf("try: %v", err)
	}
	// A broker that does not know v1 answers 404 to every path.
	_, err = c.Status(ctx)
	if e, ok := err.(*Error); !ok || e.Status != 404 {
		t.Errorf("status from a broker without v1: %v", err)
	}
	if _, err := Dial(ctx, filepath.Join(t.TempDir(), "none.sock")); err == nil {
		t.Error("Dial of a missing socket succeeded")
	}
}

// A check that refuses the peer fails the dial with its error, and not one
// request reaches whoever listens on the socket.
func TestDialCheckedRefusesThePeer(t *testing.T) {
	var requests atomic.Int32
	socket, conns, closed := serveCounting(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
	}))
	refused := errors.New("served by uid 1000")
	var checked atomic.Int32
	_, err := DialChecked(context.Background(), socket, func(c net.Conn) error {
		checked.Add(1)
		return refused
	})
	if !errors.Is(err, refused) {
		t.Fatalf("DialChecked: %v, want the check's error", err)
	}
	if checked.Load() != 1 {
		t.Errorf("check ran %d times, want 1", checked.Load())
	}
	// The server saw at most a connection that closed at once, never a request. A request
	// written on it would be in the socket before the close, so the server has read it by
	// the time it sees the connection closed.
	waitClosed(t, closed, 1)
	if n := requests.Load(); n != 0 {
		t.Errorf("%d requests reached the refused peer (%d connections)", n, conns.Load())
	}

	c, err := DialChecked(context.Background(), socket, func(net.Conn) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Status(context.Background())
	if requests.Load() != 1 {
		t.Errorf("an accepted peer got %d requests, want 1", requests.Load())
	}
}
