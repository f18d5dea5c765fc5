package broker

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/metrics"
)

// Careless and hostile clients of the broker's two HTTP servers (issue 19).

// asRoot is a peerUID that says root.
func asRoot(net.Conn) (uint32, error) { return 0, nil }

// wantJSONError checks that body is the API's {"error": …} with a message containing want.
func wantJSONError(t *testing.T, what string, code, wantCode int, body, want string) {
	t.Helper()
	var e brokerapi.ErrorResponse
	if code != wantCode || json.Unmarshal([]byte(body), &e) != nil || !strings.Contains(e.Error, want) {
		t.Errorf("%s: %d %q; want %d and {\"error\": \"…%s…\"}", what, code, body, wantCode, want)
	}
}

// TestOversizedBody: a body larger than maxRequestBody is answered 413 with the API's JSON
// error, whether Content-Length announces it or it comes chunked, and is read no further
// than the bound (before, an 80 MiB body was read to 64 MiB and answered "unexpected EOF").
func TestOversizedBody(t *testing.T) {
	b := newTestBroker(t, testMachine("b1", 1, "x86_64-linux"))
	socket := serveOn(t, b, t.TempDir(), asRoot)
	huge := `{"drvPath":"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x.drv","inputs":["` + strings.Repeat("a", 80<<20) + `"]}`

	code, body := request(t, socket, "POST", brokerapi.Prefix+"/builds", huge)
	wantJSONError(t, "80 MiB with Content-Length", code, http.StatusRequestEntityTooLarge, body, "larger than 8 MiB")

	// Chunked: the server finds out by reading, and stops at the bound.
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", socket)
	}}, Timeout: 30 * time.Second}
	defer hc.CloseIdleConnections()
	req, _ := http.NewRequest("POST", "http://broker"+brokerapi.Prefix+"/try", io.MultiReader(strings.NewReader(huge)))
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("chunked: %v", err)
	}
	defer resp.Body.Close()
	got, _ := io.ReadAll(resp.Body)
	wantJSONError(t, "80 MiB chunked", resp.StatusCode, http.StatusRequestEntityTooLarge, string(got), "larger than 8 MiB")
}

// TestUnknownEndpoint: a path, a method or a protocol version the API does not have is
// answered 404 in the API's JSON, saying which version this broker speaks.
func TestUnknownEndpoint(t *testing.T) {
	b := newTestBroker(t, testMachine("b1", 1, "x86_64-linux"))
	socket := serveOn(t, b, t.TempDir(), asRoot)
	for _, e := range []struct{ method, path string }{
		{"GET", "/v1/nope"}, {"POST", "/v2/try"}, {"DELETE", "/v1/try"}, {"GET", "/"},
	} {
		code, body := request(t, socket, e.method, e.path, "")
		wantJSONError(t, e.method+" "+e.path, code, http.StatusNotFound, body, "no endpoint "+e.method+" "+e.path+": this broker speaks protocol v1")
	}
}

// TestNonCanonicalStorePaths: every route that takes a store path refuses one that is not
// canonical, with 400 and the field, before touching it: /nix/store/../../etc/passwd is not
// a derivation in the store, whatever its suffix.
func TestNonCanonicalStorePaths(t *testing.T) {
	b := newTestBroker(t, testMachine("b1", 1, "x86_64-linux"))
	socket := serveOn(t, b, t.TempDir(), asRoot)
	good := "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x.drv"
	for _, p := range []string{
		"/nix/store/../../etc/passwd",
		"/nix/store/../../etc/x.drv",
		"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x.drv/../../../etc/x.drv",
		"/nix/store//aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x.drv",
		"/etc/passwd",
		"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x",
	} {
		j, _ := json.Marshal(p)
		code, body := request(t, socket, "POST", brokerapi.Prefix+"/try", `{"drvPath":`+string(j)+`,"system":"x86_64-linux"}`)
		wantJSONError(t, "try "+p, code, http.StatusBadRequest, body, "drvPath")
		code, body = request(t, socket, "POST", brokerapi.Prefix+"/builds", `{"drvPath":`+string(j)+`}`)
		wantJSONError(t, "build "+p, code, http.StatusBadRequest, body, "drvPath")
		if strings.HasSuffix(p, "-x") {
			continue // a store path, though not a derivation: a good input
		}
		code, body = request(t, socket, "POST", brokerapi.Prefix+"/builds", `{"drvPath":"`+good+`","inputs":["`+good+`",`+string(j)+`]}`)
		wantJSONError(t, "build input "+p, code, http.StatusBadRequest, body, "inputs[1]")
		code, body = request(t, socket, "POST", brokerapi.Prefix+"/builds", `{"drvPath":"`+good+`","inputs":["`+good+`"],"keepOutputs":true,"held":[{"machine":"b1","path":"`+good+`","narHash":"x","narSize":1,"references":[`+string(j)+`]}]}`)
		wantJSONError(t, "held reference "+p, code, http.StatusBadRequest, body, "held[0].references[0]")
	}
	// A held path must be one of the inputs: the broker sends only those.
	other := "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-y"
	code, body := request(t, socket, "POST", brokerapi.Prefix+"/builds", `{"drvPath":"`+good+`","inputs":["`+good+`"],"held":[{"machine":"b1","path":"`+other+`","narHash":"x","narSize":1}]}`)
	wantJSONError(t, "held outside inputs", code, http.StatusBadRequest, body, "held[0]: "+other+" is not one of inputs")
	code, body = request(t, socket, "GET", brokerapi.Prefix+"/builds/1/nar/..%2F..%2Fetc%2Fpasswd", "")
	wantJSONError(t, "nar ../../etc/passwd", code, http.StatusBadRequest, body, "nar:")
	// Control: a canonical path gets past the check (and is declined: no such machine).
	code, body = request(t, socket, "POST", brokerapi.Prefix+"/try", `{"drvPath":"`+good+`","system":"aarch64-linux"}`)
	if code != http.StatusOK || !strings.Contains(body, brokerapi.Decline) {
		t.Errorf("canonical path: %d %q, want 200 and a decline", code, body)
	}
}

// dialRequest opens a raw connection to socket, sends one keep-alive GET /v1/status on it
// and returns the connection and the status code of the answer.
func dialRequest(t *testing.T, network, addr, path string) (net.Conn, *bufio.Reader, int) {
	t.Helper()
	c, err := net.Dial(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "GET "+path+" HTTP/1.1\r\nHost: broker\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("reading the answer: %v", err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return c, br, resp.StatusCode
}

// refusedAnswer connects to addr and reads the answer the server sends before any request.
func refusedAnswer(t *testing.T, network, addr string) (int, string) {
	t.Helper()
	c, err := net.Dial(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("a connection over the limit got no answer: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// TestSocketConnectionLimit: connections beyond the limit are answered 503 in JSON and
// closed at once, not left to wait (a hook then builds without the broker).
func TestSocketConnectionLimit(t *testing.T) {
	b := newTestBroker(t, testMachine("b1", 1, "x86_64-linux"))
	socket := serveOn(t, b, t.TempDir(), asRoot, func(s *Server) { s.limit = newConnLimit(2) })
	for range 2 {
		if _, _, code := dialRequest(t, "unix", socket, brokerapi.Prefix+"/status"); code != http.StatusOK {
			t.Fatalf("a connection within the limit: %d", code)
		}
	}
	code, body := refusedAnswer(t, "unix", socket)
	wantJSONError(t, "third connection", code, http.StatusServiceUnavailable, body, "too many connections (at most 2)")
}

// TestSocketIdleTimeout: a connection that carries no request is closed by the broker
// (before, 150 idle keep-alive connections stayed open indefinitely).
func TestSocketIdleTimeout(t *testing.T) {
	b := newTestBroker(t, testMachine("b1", 1, "x86_64-linux"))
	socket := serveOn(t, b, t.TempDir(), asRoot, func(s *Server) { s.srv.IdleTimeout = 50 * time.Millisecond })
	c, br, code := dialRequest(t, "unix", socket, brokerapi.Prefix+"/status")
	if code != http.StatusOK {
		t.Fatalf("status: %d", code)
	}
	if _, err := br.ReadByte(); !errors.Is(err, io.EOF) {
		t.Errorf("an idle connection: read %v, want EOF (closed by the broker)", err)
	}
	c.Close()
}

// TestMetricsServerLimits: the metrics port holds at most maxMetricsConns connections;
// the next is answered 503 and closed.
func TestMetricsServerLimits(t *testing.T) {
	srv := NewMetricsServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "x 1\n") }))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	defer srv.Close()
	if srv.IdleTimeout == 0 || srv.ReadTimeout == 0 || srv.WriteTimeout == 0 || srv.ReadHeaderTimeout == 0 {
		t.Errorf("metrics server without timeouts: %+v", srv)
	}
	for range maxMetricsConns {
		if _, _, code := dialRequest(t, "tcp", ln.Addr().String(), "/metrics"); code != http.StatusOK {
			t.Fatalf("a connection within the limit: %d", code)
		}
	}
	code, body := refusedAnswer(t, "tcp", ln.Addr().String())
	wantJSONError(t, "one connection too many", code, http.StatusServiceUnavailable, body, "too many connections")
}

// TestMetricsLabelsHideUsers: the metrics port, which may be public, labels machines by host
// and port without the SSH user; two machines that differ only in their user keep their
// full names apart.
func TestMetricsLabelsHideUsers(t *testing.T) {
	reg := metrics.NewRegistry()
	ms := []machines.Machine{
		testMachine("b1", 1, "x86_64-linux"),
		{Host: "b2", Port: 2222, User: "nixbuild", Systems: []string{"x86_64-linux"}, ParallelBuilds: 1, Speed: 1, Enabled: true},
		testMachine("b3", 1, "x86_64-linux"),
		{Host: "b3", User: "nix", Systems: []string{"x86_64-linux"}, ParallelBuilds: 1, Speed: 1, Enabled: true},
	}
	b := newTestBroker(t, ms...)
	b.mx = newBrokerMetrics(b, reg)
	b.mx.built("root@b1", "success", time.Second)
	rec := httptest.NewRecorder()
	reg.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	text := rec.Body.String()
	for _, want := range []string{`machine="b1"`, `machine="b2:2222"`, `machine="root@b3"`, `machine="nix@b3"`, `nix_offload_builds_total{machine="b1",result="success"} 1`} {
		if !strings.Contains(text, want) {
			t.Errorf("metrics lack %s:\n%s", want, text)
		}
	}
	for _, leak := range []string{"root@b1", "nixbuild"} {
		if strings.Contains(text, leak) {
			t.Errorf("metrics name the user: %q in\n%s", leak, text)
		}
	}
}

// TestRequestBodyIsOneValue: a body is exactly one JSON value of the call's type: a second
// value, a stray brace, an unknown field or a wrong type is 400, naming the problem.
func TestRequestBodyIsOneValue(t *testing.T) {
	b := newTestBroker(t, testMachine("b1", 1, "x86_64-linux"))
	socket := serveOn(t, b, t.TempDir(), asRoot)
	good := `{"drvPath":"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x.drv","system":"aarch64-linux"}`
	for body, want := range map[string]string{
		good + `{}`: "more after the JSON value",
		good + `}`:  "more after the JSON value",
		`{"drvPath":"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x.drv","sytem":"x"}`: `unknown field "sytem"`,
		`{"drvPath":1}`: "cannot unmarshal number",
		``:              "EOF",
	} {
		code, got := request(t, socket, "POST", brokerapi.Prefix+"/try", body)
		wantJSONError(t, "body "+body, code, http.StatusBadRequest, got, want)
	}
	if code, got := request(t, socket, "POST", brokerapi.Prefix+"/try", good+"\n"); code != http.StatusOK {
		t.Errorf("one value and a newline: %d %q, want 200", code, got)
	}
}
