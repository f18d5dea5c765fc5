package brokerapi

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"path"
	"strings"
	"sync"
	"time"
)

// maxEventLine bounds one line of a build's event stream.
const maxEventLine = 16 << 20

// maxErrorBody bounds the error body read from an answer.
const maxErrorBody = 64 << 10

// Error is an answer other than 2xx.
type Error struct {
	Status int
	Msg    string
}

func (e *Error) Error() string { return fmt.Sprintf("broker: %s (HTTP %d)", e.Msg, e.Status) }

// Client talks to a broker over one unix-socket connection, which owns
// everything the client reserves or starts (see the package documentation).
// Its methods may be called one at a time.
type Client struct {
	socket string
	hc     *http.Client
}

// Dial connects to the broker listening on socket. An error means there is
// no broker to talk to (the socket is missing, or nothing listens).
func Dial(ctx context.Context, socket string) (*Client, error) {
	return DialChecked(ctx, socket, nil)
}

// DialChecked is Dial with check run on every connection to the socket
// before anything is sent on it; a check that fails closes the connection
// and fails the dial or the request with its error. The hook uses it to
// refuse a socket that root does not serve: whoever answers there decides
// which bytes become store paths.
func DialChecked(ctx context.Context, socket string, check func(net.Conn) error) (*Client, error) {
	var d net.Dialer
	dial := func(ctx context.Context) (net.Conn, error) {
		c, err := d.DialContext(ctx, "unix", socket)
		if err != nil || check == nil {
			return c, err
		}
		if err := check(c); err != nil {
			c.Close()
			return nil, err
		}
		return c, nil
	}
	conn, err := dial(ctx)
	if err != nil {
		return nil, err
	}
	var mu sync.Mutex
	first := conn
	tr := &http.Transport{
		// The first request uses the connection dialled above; should the
		// transport need another (the broker closed ours), it dials again,
		// and the broker sees a new client.
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			mu.Lock()
			c := first
			first = nil
			mu.Unlock()
			if c != nil {
				return c, nil
			}
			return dial(ctx)
		},
		MaxConnsPerHost:    1,
		MaxIdleConns:       1,
		DisableCompression: true,
	}
	return &Client{socket: socket, hc: &http.Client{Transport: tr}}, nil
}

// Close closes the connection: the broker cancels whatever the client had
// reserved or running.
func (c *Client) Close() {
	c.hc.CloseIdleConnections()
	if tr, ok := c.hc.Transport.(*http.Transport); ok {
		tr.CloseIdleConnections()
	}
}

func (c *Client) url(elem ...string) string {
	return "http://broker" + path.Join(append([]string{Prefix}, elem...)...)
}

func (c *Client) do(ctx context.Context, method, u string, body any) (*http.Response, error) {
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, r)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("broker on %s: %w", c.socket, unwrapURL(err))
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		return nil, errorFrom(resp)
	}
	return resp, nil
}

func errorFrom(resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
	var e ErrorResponse
	msg := strings.TrimSpace(string(b))
	if json.Unmarshal(b, &e) == nil && e.Error != "" {
		msg = e.Error
	}
	if resp.StatusCode == http.StatusNotFound && msg == "" {
		msg = fmt.Sprintf("the broker does not speak protocol v%d", Version)
	}
	return &Error{Status: resp.StatusCode, Msg: msg}
}

func unwrapURL(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

func (c *Client) call(ctx context.Context, method, u string, in, out any) error {
	resp, err := c.do(ctx, method, u, in)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		_, err = io.Copy(io.Discard, resp.Body)
		return err
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxEventLine)).Decode(out); err != nil {
		return fmt.Errorf("broker: reading the answer: %w", err)
	}
	return nil
}

// Try forwards a hook's "try".
func (c *Client) Try(ctx context.Context, req TryRequest) (TryResponse, error) {
	var resp TryResponse
	err := c.call(ctx, http.MethodPost, c.url("try"), req, &resp)
	return resp, err
}

// Build starts a build; read its events from the stream until it ends.
func (c *Client) Build(ctx context.Context, req BuildRequest) (*Stream, error) {
	resp, err := c.do(ctx, http.MethodPost, c.url("builds"), req)
	if err != nil {
		return nil, err
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), maxEventLine)
	return &Stream{body: resp.Body, sc: sc}, nil
}

// FetchNAR writes the NAR of output path of build to w.
func (c *Client) FetchNAR(ctx context.Context, build, storePath string, w io.Writer) error {
	resp, err := c.do(ctx, http.MethodGet, c.url("builds", build, "nar", path.Base(storePath)), nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, err = io.Copy(w, resp.Body)
	return err
}

// Imported reports how importing the outputs of build went and returns the
// build's final word.
func (c *Client) Imported(ctx context.Context, build string, importErr error) (ImportedResponse, error) {
	var req ImportedRequest
	if importErr != nil {
		req.Error = importErr.Error()
	}
	var resp ImportedResponse
	err := c.call(ctx, http.MethodPost, c.url("builds", build, "imported"), req, &resp)
	return resp, err
}

// Cancel stops a build whose event stream has ended: one whose outputs
// are offered and not imported yet. While the stream is open it holds the
// connection (HTTP/1.1 runs one exchange at a time on it), so Cancel would
// wait until the stream ends or ctx does; to stop a build then, close its
// stream, which closes the connection and cancels everything on it.
func (c *Client) Cancel(ctx context.Context, build string) error {
	return c.call(ctx, http.MethodDelete, c.url("builds", build), nil, nil)
}

// Status returns the broker's state.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var st Status
	err := c.call(ctx, http.MethodGet, c.url("status"), nil, &st)
	return st, err
}

// Stream is the event stream of one build.
type Stream struct {
	body io.ReadCloser
	sc   *bufio.Scanner
}

// Next returns the next event. The stream ends after an EventOutputs or
// EventFailed; anything else before EOF (io.ErrUnexpectedEOF) means the
// broker went away.
func (s *Stream) Next() (Event, error) {
	var ev Event
	if !s.sc.Scan() {
		if err := s.sc.Err(); err != nil {
			return ev, fmt.Errorf("broker: reading build events: %w", err)
		}
		return ev, io.ErrUnexpectedEOF
	}
	if err := json.Unmarshal(s.sc.Bytes(), &ev); err != nil {
		return ev, fmt.Errorf("broker: bad build event: %w", err)
	}
	switch ev.Type {
	case EventOutputs, EventFailed, EventHandback:
		// The last event: read the response to its end, so that the
		// connection is free for the calls that follow (fetching the
		// outputs); HTTP/1.1 runs one exchange at a time on it.
		io.Copy(io.Discard, io.LimitReader(s.body, maxEventLine))
		s.body.Close()
	}
	return ev, nil
}

// Close ends the stream. Closed before its last event, it also closes the
// client's connection, and the broker cancels the build.
func (s *Stream) Close() error { return s.body.Close() }

// WaitTimeout is how long a hook waits for the broker to answer a "try".
const WaitTimeout = 30 * time.Second

// SubmitGraph starts a graph; read its events from the stream until the done event. Unless
// req.Detach, closing the stream cancels the graph.
func (c *Client) SubmitGraph(ctx context.Context, req GraphRequest) (*GraphStream, error) {
	return c.graphStream(ctx, http.MethodPost, c.url("graphs"), req)
}

// FollowGraph reads a graph's events again: those so far, then live, until the done event.
// Closing the stream does not cancel the graph.
func (c *Client) FollowGraph(ctx context.Context, id string) (*GraphStream, error) {
	return c.graphStream(ctx, http.MethodGet, c.url("graphs", id, "events"), nil)
}

func (c *Client) graphStream(ctx context.Context, method, u string, body any) (*GraphStream, error) {
	resp, err := c.do(ctx, method, u, body)
	if err != nil {
		return nil, err
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), maxEventLine)
	return &GraphStream{body: resp.Body, sc: sc}, nil
}

// CancelGraph cancels a graph: nothing more starts, running builds are stopped, and its
// stream ends with the results. It uses its own request, so call it on a client other than
// the one whose stream is open.
func (c *Client) CancelGraph(ctx context.Context, id string) error {
	return c.call(ctx, http.MethodDelete, c.url("graphs", id), nil, nil)
}

// Graph returns a graph's summary with every derivation.
func (c *Client) Graph(ctx context.Context, id string) (GraphSummary, error) {
	var s GraphSummary
	err := c.call(ctx, http.MethodGet, c.url("graphs", id), nil, &s)
	return s, err
}

// Graphs lists the graphs the broker runs or finished recently.
func (c *Client) Graphs(ctx context.Context) ([]GraphSummary, error) {
	var s []GraphSummary
	err := c.call(ctx, http.MethodGet, c.url("graphs"), nil, &s)
	return s, err
}

// GraphNAR writes the NAR of storePath, an output of graph id that a machine holds, to w.
func (c *Client) GraphNAR(ctx context.Context, id, storePath string, w io.Writer) error {
	resp, err := c.do(ctx, http.MethodGet, c.url("graphs", id, "nar", path.Base(storePath)), nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, err = io.Copy(w, resp.Body)
	return err
}

// GraphStream is the event stream of one graph.
type GraphStream struct {
	body io.ReadCloser
	sc   *bufio.Scanner
}

// Next returns the next event. The stream ends after GraphEventDone; io.ErrUnexpectedEOF
// before it means the broker went away (or dropped a reader that fell too far behind).
func (s *GraphStream) Next() (GraphEvent, error) {
	var ev GraphEvent
	if !s.sc.Scan() {
		if err := s.sc.Err(); err != nil {
			return ev, fmt.Errorf("broker: reading graph events: %w", err)
		}
		return ev, io.ErrUnexpectedEOF
	}
	if err := json.Unmarshal(s.sc.Bytes(), &ev); err != nil {
		return ev, fmt.Errorf("broker: bad graph event: %w", err)
	}
	if ev.Type == GraphEventDone {
		io.Copy(io.Discard, io.LimitReader(s.body, maxEventLine))
		s.body.Close()
	}
	return ev, nil
}

// Close ends the stream; for a stream of SubmitGraph without Detach, this cancels the graph.
func (s *GraphStream) Close() error { return s.body.Close() }
