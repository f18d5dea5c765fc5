package broker

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
)

// Limits of the broker's two HTTP servers. Each bounds what one careless or hostile client
// can hold: the socket is root's alone (mode 0600, and the server checks the peer), but the
// metrics port may be public (the NixOS module's openFirewall).
const (
	// maxRequestBody bounds a request body. A build's input list is the largest: a NixOS
	// system closure has about 10,000 paths of under 100 bytes each, 1 MiB as JSON; 8 MiB
	// leaves room for eight times that while keeping a flood of large bodies cheap.
	maxRequestBody = 8 << 20

	// maxSocketConns bounds the socket's open connections. Each hook holds one for its whole
	// life (500 builds at once is the load test), status and queue runners one each; one
	// more is answered 503, and a hook then builds without the broker.
	maxSocketConns = 4096

	// socketIdleTimeout closes a socket connection that carries no request. A hook is idle
	// between two of Nix's "try"s (while Nix builds locally, say), owns nothing then, and
	// dials again for the next one.
	socketIdleTimeout = 5 * time.Minute

	// headerTimeout bounds reading a request's header, on both servers.
	headerTimeout = 10 * time.Second

	// maxMetricsConns, metricsIdleTimeout, metricsReadTimeout and metricsWriteTimeout bound
	// the metrics port: a scraper needs one connection and a response of a few KiB.
	maxMetricsConns     = 32
	metricsIdleTimeout  = 30 * time.Second
	metricsReadTimeout  = 10 * time.Second
	metricsWriteTimeout = 30 * time.Second
)

// The socket has no ReadTimeout or WriteTimeout: a build's event stream is one response that
// lasts as long as the build, and net/http cancels a request's context when its ReadTimeout
// passes, even while the response is being written.

// connLimit caps the connections an http.Server holds at once: its track method is the
// server's ConnState. A connection over the cap is answered busy (a whole HTTP response) and
// closed before the server reads from it, so the client learns why instead of waiting.
type connLimit struct {
	max  int
	busy []byte

	mu   sync.Mutex
	open map[net.Conn]struct{} // guarded by mu
}

func newConnLimit(max int) *connLimit {
	body, _ := json.Marshal(brokerapi.ErrorResponse{Error: fmt.Sprintf("too many connections (at most %d); try again later", max)})
	busy := fmt.Appendf(nil, "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s\n", len(body)+1, body)
	return &connLimit{max: max, busy: busy, open: map[net.Conn]struct{}{}}
}

// track records c's state changes; chain it into http.Server.ConnState.
func (l *connLimit) track(c net.Conn, st http.ConnState) {
	switch st {
	case http.StateNew:
		l.mu.Lock()
		full := len(l.open) >= l.max
		if !full {
			l.open[c] = struct{}{}
		}
		l.mu.Unlock()
		if full {
			// Called from the server's accept loop: the write must not wait. A new
			// connection's send buffer takes a few hundred bytes at once.
			c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
			c.Write(l.busy)
			c.Close()
		}
	case http.StateClosed, http.StateHijacked:
		l.mu.Lock()
		delete(l.open, c)
		l.mu.Unlock()
	}
}

// NewMetricsServer returns the server for the Prometheus handler h, with the limits of a
// port that may be reachable from the network: a bounded number of connections, each with
// read, write and idle timeouts.
func NewMetricsServer(h http.Handler) *http.Server {
	limit := newConnLimit(maxMetricsConns)
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: headerTimeout,
		ReadTimeout:       metricsReadTimeout,
		WriteTimeout:      metricsWriteTimeout,
		IdleTimeout:       metricsIdleTimeout,
		MaxHeaderBytes:    16 << 10,
		ConnState:         limit.track,
	}
}
