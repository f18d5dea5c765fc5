package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nix-community/go-nix/pkg/derivation"
	"go.uber.org/zap"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/offload"
	"github.com/nix-offload/nix-offload/internal/scheduler"
	"github.com/nix-offload/nix-offload/internal/serveproto"
)

// maxDrvSize bounds how much of a .drv file the broker reads.
const maxDrvSize = 64 << 20

type derivationT = derivation.Derivation

// client is one connection to the broker; it owns the tickets and builds
// started through it.
type client struct {
	b   *Broker
	uid uint32

	mu      sync.Mutex
	tickets map[string]bool
	closed  bool
}

func (c *client) own(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.tickets[id] = true
}

func (c *client) disown(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.tickets, id)
}

func (c *client) owns(id string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.tickets[id]
}

// close cancels everything the client owned.
func (c *client) close() {
	c.mu.Lock()
	ids := make([]string, 0, len(c.tickets))
	for id := range c.tickets {
		ids = append(ids, id)
	}
	c.closed = true
	c.mu.Unlock()
	for _, id := range ids {
		c.b.cancelTicket(id, errClientGone)
	}
}

// cancelTicket stops a build, or frees a reservation nobody built on.
func (b *Broker) cancelTicket(id string, why error) {
	b.mu.Lock()
	bd := b.builds[id]
	t := b.tickets[id]
	if bd == nil && t != nil {
		b.releaseLocked(t)
		delete(b.tickets, id)
	}
	b.mu.Unlock()
	if bd != nil {
		bd.cancel(why)
	}
}

type ctxKey struct{}

// Server serves the broker's API on listeners.
type Server struct {
	b        *Broker
	srv      *http.Server
	conns    sync.Map      // net.Conn → *client
	accepted atomic.Uint64 // connections ever accepted
	limit    *connLimit
	peerUID  func(net.Conn) (uint32, error)
}

// NewServer returns the API server of b. peerUID, if not nil, names the
// user at the other end of a connection; only root is served.
func NewServer(b *Broker, peerUID func(net.Conn) (uint32, error)) *Server {
	s := &Server{b: b, peerUID: peerUID, limit: newConnLimit(maxSocketConns)}
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+brokerapi.Prefix+"/try", s.try)
	mux.HandleFunc("POST "+brokerapi.Prefix+"/builds", s.build)
	mux.HandleFunc("GET "+brokerapi.Prefix+"/builds/{id}/nar/{base}", s.nar)
	mux.HandleFunc("POST "+brokerapi.Prefix+"/builds/{id}/imported", s.imported)
	mux.HandleFunc("DELETE "+brokerapi.Prefix+"/builds/{id}", s.cancel)
	mux.HandleFunc("GET "+brokerapi.Prefix+"/status", s.status)
	mux.HandleFunc("POST "+brokerapi.Prefix+"/graphs", s.submitGraph)
	mux.HandleFunc("GET "+brokerapi.Prefix+"/graphs", s.listGraphs)
	mux.HandleFunc("GET "+brokerapi.Prefix+"/graphs/{id}", s.graphSummary)
	mux.HandleFunc("GET "+brokerapi.Prefix+"/graphs/{id}/events", s.graphEvents)
	mux.HandleFunc("GET "+brokerapi.Prefix+"/graphs/{id}/nar/{base}", s.graphNAR)
	mux.HandleFunc("DELETE "+brokerapi.Prefix+"/graphs/{id}", s.cancelGraph)
	mux.HandleFunc("/", noEndpoint)
	s.srv = &http.Server{
		Handler:           s.authorize(mux),
		ReadHeaderTimeout: headerTimeout,
		IdleTimeout:       socketIdleTimeout,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          zap.NewStdLog(b.log.Named("http")),
		ConnContext: func(ctx context.Context, conn net.Conn) context.Context {
			c := &client{b: b, tickets: map[string]bool{}, uid: ^uint32(0)}
			if s.peerUID == nil {
				c.uid = 0
			} else if uid, err := s.peerUID(conn); err == nil {
				c.uid = uid
			}
			s.accepted.Add(1)
			s.conns.Store(conn, c)
			return context.WithValue(ctx, ctxKey{}, c)
		},
		ConnState: func(conn net.Conn, st http.ConnState) {
			s.limit.track(conn, st)
			if st == http.StateClosed || st == http.StateHijacked {
				if c, ok := s.conns.LoadAndDelete(conn); ok {
					c.(*client).close()
				}
			}
		},
	}
	return s
}

// Serve serves connections on ln until Shutdown.
func (s *Server) Serve(ln net.Listener) error {
	err := s.srv.Serve(ln)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// Shutdown stops taking connections and hands the broker's work back or
// lets it finish (Broker.Drain) until ctx ends.
func (s *Server) Shutdown(ctx context.Context) {
	s.b.Drain(ctx)
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if s.srv.Shutdown(sctx) != nil {
		s.srv.Close()
	}
}

func clientOf(r *http.Request) *client { return r.Context().Value(ctxKey{}).(*client) }

// authorize serves root only: the socket is root's already (mode 0600),
// this is the second lock.
func (s *Server) authorize(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if c := clientOf(r); c.uid != 0 {
			writeError(w, http.StatusForbidden, fmt.Errorf("only root may use the broker (peer uid %d)", c.uid))
			return
		}
		next.ServeHTTP(w, r)
	})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, code int, err error) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(brokerapi.ErrorResponse{Error: err.Error()})
}

// noEndpoint answers a path or method the API does not have, in the API's JSON like every
// other error; a client of another protocol version learns which one this broker speaks.
func noEndpoint(w http.ResponseWriter, r *http.Request) {
	writeError(w, http.StatusNotFound, fmt.Errorf("no endpoint %s %s: this broker speaks protocol v%d (docs/broker-api.md)",
		r.Method, r.URL.Path, brokerapi.Version))
}

func (s *Server) try(w http.ResponseWriter, r *http.Request) {
	var req brokerapi.TryRequest
	if !readRequest(w, r, &req, checkTry) {
		return
	}
	resp, err := s.b.Try(req, clientOf(r))
	if err != nil {
		writeError(w, http.StatusServiceUnavailable, err)
		return
	}
	writeJSON(w, resp)
}

func (s *Server) status(w http.ResponseWriter, r *http.Request) {
	st := s.b.Status()
	// Accepted before the count: a connection open now that the count
	// missed was accepted after this read.
	st.Accepted = s.accepted.Load()
	s.conns.Range(func(_, _ any) bool { st.Clients++; return true })
	st.Goroutines = runtime.NumGoroutine()
	st.Graphs = s.b.runningGraphs()
	writeJSON(w, st)
}

func (s *Server) build(w http.ResponseWriter, r *http.Request) {
	var req brokerapi.BuildRequest
	if !readRequest(w, r, &req, checkBuild) {
		return
	}
	send, begin := ndjson[brokerapi.Event](w)
	code, err := s.b.submit(r.Context(), req, clientOf(r), send, begin)
	if err != nil {
		writeError(w, code, err)
	}
}

// ndjson writes events to w as JSON lines, flushing each (send returns false once w fails);
// begin, or the first event, starts the 200 response.
func ndjson[T any](w http.ResponseWriter) (send func(T) bool, begin func()) {
	rc := http.NewResponseController(w)
	started := false
	begin = func() {
		if !started {
			w.Header().Set("Content-Type", "application/x-ndjson")
			w.WriteHeader(http.StatusOK)
			rc.Flush()
			started = true
		}
	}
	send = func(ev T) bool {
		begin()
		b, _ := json.Marshal(ev)
		if _, err := w.Write(append(b, '\n')); err != nil {
			return false
		}
		return rc.Flush() == nil
	}
	return send, begin
}

// submit runs req to its last event, giving every event to sink. A submission of a derivation
// that another of the broker's builds builds now waits for that one (sameBuild): a
// KeepOutputs one (a graph's) here, a hook's in its own build, which then offers the outputs
// from the other's machine (build.follow). Any other starts its own build (startBuild), owned
// by c. When ctx ends first, the build is cancelled. The code and error are those of a build
// that could not start before any event was sent; after one, that is a failed event. begin,
// if not nil, is called once the build has started.
func (b *Broker) submit(ctx context.Context, req brokerapi.BuildRequest, c *client, sink func(brokerapi.Event) bool, begin func()) (int, error) {
	sent := false
	emit := func(ev brokerapi.Event) {
		sent = true
		sink(ev)
	}
	var leader *build
	var started func()
	for {
		if leader, started = b.sameBuild(req); leader == nil || !req.KeepOutputs {
			break
		}
		// Another client's graph or hook builds it now: wait for that build.
		emit(brokerapi.Event{Type: brokerapi.EventQueued, Reason: sameBuildReason(req.DrvPath, leader)})
		ev, ok := leader.await(ctx)
		if ok {
			emit(ev)
		}
		if ok || ctx.Err() != nil {
			return 0, nil
		}
		// It failed there: build it here, unless another began.
	}
	bd, code, err := b.startBuild(req, c, leader)
	started()
	if err != nil && sent {
		sink(brokerapi.Event{Type: brokerapi.EventFailed, Kind: brokerapi.FailMisc, Error: err.Error()})
		return 0, nil
	}
	if err != nil {
		return code, err
	}
	if begin != nil {
		begin()
	}
	bd.events.attach(sink)
	select {
	case <-bd.terminal:
	case <-ctx.Done():
		bd.cancel(context.Cause(ctx))
	}
	bd.events.close()
	return 0, nil
}

func (s *Server) owned(w http.ResponseWriter, r *http.Request) *build {
	id := r.PathValue("id")
	s.b.mu.Lock()
	bd := s.b.builds[id]
	s.b.mu.Unlock()
	if bd == nil || !clientOf(r).owns(id) {
		writeError(w, http.StatusNotFound, fmt.Errorf("no build %q on this connection", id))
		return nil
	}
	return bd
}

func (s *Server) nar(w http.ResponseWriter, r *http.Request) {
	if err := serveproto.CheckStorePathBase(r.PathValue("base")); err != nil {
		writeError(w, http.StatusBadRequest, fmt.Errorf("nar: %w", err))
		return
	}
	bd := s.owned(w, r)
	if bd == nil {
		return
	}
	w.Header().Set("Content-Type", "application/x-nix-nar")
	if err := bd.fetchNAR(r.PathValue("base"), w); err != nil {
		// Part of the NAR may be out: the only way to say so is to break
		// the response, which the client sees as a truncated body.
		s.b.log.Warn("fetching an output failed", zap.String("drv", bd.req.DrvPath), zap.Error(err))
		panic(http.ErrAbortHandler)
	}
}

func (s *Server) imported(w http.ResponseWriter, r *http.Request) {
	bd := s.owned(w, r)
	if bd == nil {
		return
	}
	var req brokerapi.ImportedRequest
	if !readRequest(w, r, &req, nil) {
		return
	}
	bd.mu.Lock()
	ho := bd.ho
	bd.mu.Unlock()
	if ho == nil {
		writeError(w, http.StatusConflict, fmt.Errorf("build %s has offered no outputs", bd.t.id))
		return
	}
	var ierr error
	if req.Error != "" {
		ierr = errors.New(req.Error)
	}
	select {
	case ho.imported <- ierr:
	default:
		writeError(w, http.StatusConflict, fmt.Errorf("build %s: imported twice", bd.t.id))
		return
	}
	<-bd.done
	var resp brokerapi.ImportedResponse
	if bd.err != nil {
		resp.Error = bd.err.Error()
	}
	writeJSON(w, resp)
}

func (s *Server) cancel(w http.ResponseWriter, r *http.Request) {
	bd := s.owned(w, r)
	if bd == nil {
		return
	}
	bd.cancel(errCancelled)
	writeJSON(w, struct{}{})
}

// startBuild resolves req's ticket and starts the build, which waits for leader first if
// that is set (build.follow). The code is the HTTP status for an error.
func (b *Broker) startBuild(req brokerapi.BuildRequest, c *client, leader *build) (*build, int, error) {
	drv, err := readDerivation(req.DrvPath)
	if err != nil {
		return nil, http.StatusUnprocessableEntity, err
	}
	var t *ticket
	if req.Reservation != "" {
		b.mu.Lock()
		t = b.tickets[req.Reservation]
		_, taken := b.builds[req.Reservation]
		b.mu.Unlock()
		if t == nil || taken || t.owner != c || t.drvPath != req.DrvPath {
			return nil, http.StatusNotFound, fmt.Errorf("no reservation %q for '%s' on this connection", req.Reservation, req.DrvPath)
		}
	} else {
		// A submission: decide as for a hook whose local side cannot build.
		sreq := scheduler.Request{System: drv.Platform, RequiredFeatures: offload.RequiredFeatures(drv)}
		priority := min(max(req.Priority, 0), brokerapi.MaxPriority)
		resp, err := b.try(brokerapi.TryRequest{DrvPath: req.DrvPath, System: sreq.System, RequiredFeatures: sreq.RequiredFeatures}, c, priority, req.Held)
		if err != nil {
			return nil, http.StatusServiceUnavailable, err
		}
		if resp.Verdict != brokerapi.Accept {
			return nil, http.StatusUnprocessableEntity, fmt.Errorf("no machine will build '%s': %s", req.DrvPath, resp.Reason)
		}
		b.mu.Lock()
		t = b.tickets[resp.Reservation]
		b.mu.Unlock()
	}
	inputs := req.Inputs
	if len(inputs) == 0 {
		if inputs, err = b.inputClosure(drv); err != nil {
			b.forget(t)
			return nil, http.StatusUnprocessableEntity, fmt.Errorf("'%s': %w", req.DrvPath, err)
		}
	}
	ctx, cancel := context.WithCancelCause(b.ctx)
	bd := &build{
		b: b, t: t, req: req, drv: drv, inputs: inputs,
		ctx: ctx, cancel: cancel, leader: leader,
		events:   newEventWriter(),
		terminal: make(chan struct{}),
		done:     make(chan struct{}),
	}
	b.mu.Lock()
	if b.stopping && t.machine == nil {
		b.releaseLocked(t)
		delete(b.tickets, t.id)
		b.mu.Unlock()
		cancel(nil)
		return nil, http.StatusServiceUnavailable, errStopping
	}
	b.builds[t.id] = bd
	b.wg.Add(1)
	b.mu.Unlock()
	c.own(t.id)
	go bd.run()
	return bd, 0, nil
}

// readDerivation parses a .drv from the local store.
func readDerivation(p string) (*derivationT, error) {
	if err := checkDrvPath(p); err != nil {
		return nil, err
	}
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	d, err := offload.ReadDerivation(io.LimitReader(f, maxDrvSize))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", p, err)
	}
	return d, nil
}

// inputClosure is what nix-daemon hands a hook as the input closure: the
// closure of the input sources and of the wanted outputs of the input
// derivations.
func (b *Broker) inputClosure(drv *derivationT) ([]string, error) {
	roots := slices.Clone(drv.InputSources)
	for p, outs := range drv.InputDerivations {
		in, err := readDerivation(p)
		if err != nil {
			return nil, err
		}
		for _, o := range outs {
			out, ok := in.Outputs[o]
			if !ok || out.Path == "" {
				return nil, fmt.Errorf("input %s has no output %q", p, o)
			}
			roots = append(roots, out.Path)
		}
	}
	if len(roots) == 0 {
		return nil, nil
	}
	return b.local.closure(roots)
}

// eventWriter hands a build's events to a sink (a response's JSON lines, a graph); after
// close it drops them. Events before attach are kept and handed over then.
type eventWriter struct {
	mu      sync.Mutex
	sink    func(brokerapi.Event) bool
	pending []brokerapi.Event
	closed  bool
	failed  bool // the sink failed: the client is gone
}

func newEventWriter() *eventWriter { return &eventWriter{} }

func (e *eventWriter) attach(sink func(brokerapi.Event) bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.sink = sink
	for _, ev := range e.pending {
		e.writeLocked(ev)
	}
	e.pending = nil
}

func (e *eventWriter) emit(ev brokerapi.Event) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed || e.failed {
		return
	}
	if e.sink == nil {
		e.pending = append(e.pending, ev)
		return
	}
	e.writeLocked(ev)
}

func (e *eventWriter) writeLocked(ev brokerapi.Event) {
	if !e.failed && !e.sink(ev) {
		e.failed = true
	}
}

func (e *eventWriter) close() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.closed = true
}
