package testbed

// A wide-area link for builders on loopback: a userspace TCP proxy that delays every byte
// by a fixed one-way delay in each direction, and optionally caps the rate. The kernel of
// the project's machines has no netem, so a round-trip time cannot be put on a veth; this
// puts it between the client and sshd instead.

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// LinkShape is what a [DelayProxy] does to the bytes it forwards.
type LinkShape struct {
	// Delay is the one-way delay, added in each direction: a round trip through the
	// proxy takes 2×Delay more than without it. [WithRTT] sets it to half the RTT.
	Delay time.Duration
	// Rate, if not 0, caps each direction of each connection at this many bytes per
	// second, on top of the delay (serialisation delay, as on a slow link).
	Rate int64
	// Buffer bounds the bytes read from one side and not yet written to the other, per
	// direction and connection (default 8 MiB); when it is full the proxy stops
	// reading, and TCP's flow control pushes back on the sender. Throughput is then at
	// most Buffer per Delay, like a TCP window over a real link.
	Buffer int
}

const (
	// delayChunk is the most the proxy reads at once: the unit of delay and rate.
	delayChunk = 32 << 10
	// defaultDelayBuffer is LinkShape.Buffer's default: more than the 2 MiB channel
	// window of OpenSSH and x/crypto/ssh, so at the test bed's delays the proxy is not
	// what bounds a single stream.
	defaultDelayBuffer = 8 << 20
)

// LinkStats counts what went through a [DelayProxy] so far.
type LinkStats struct {
	Conns int64 // connections accepted
	Up    int64 // bytes read from the clients, for the target
	Down  int64 // bytes read from the target, for the clients
	// Turns counts, summed over the connections, the times the client sent bytes after
	// the target had sent some since the client last did: each is a point where the
	// client may have waited for an answer, one protocol round trip. For one conversation
	// at a time per connection it is an upper bound on the round trips it waited for
	// (bytes a client sends while receiving, an SSH window adjustment say, count too);
	// conversations that overlap on one connection (several SSH sessions) can share a
	// turn, so then it counts fewer.
	Turns int64
}

// DelayProxy forwards TCP connections from its own address to a target, through a
// [LinkShape]. Bytes keep their order in each direction; an end of stream (a half close)
// is forwarded after the bytes before it. When either side's connection fails, the other
// is closed. Close stops it.
type DelayProxy struct {
	shape  LinkShape
	target string
	ln     net.Listener
	clock  func() time.Time
	sleep  func(time.Duration)

	conns, up, down, turns atomic.Int64

	mu     sync.Mutex
	open   map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup
}

// StartDelayProxy listens on listen (a loopback "host:port"; port 0 picks one) and
// forwards every connection to target through shape.
func StartDelayProxy(listen, target string, shape LinkShape) (*DelayProxy, error) {
	if shape.Delay < 0 || shape.Rate < 0 || shape.Buffer < 0 {
		return nil, errors.New("testbed: delay proxy: negative delay, rate or buffer")
	}
	if host, _, err := net.SplitHostPort(listen); err != nil || !net.ParseIP(host).IsLoopback() {
		return nil, errors.New("testbed: delay proxy: listen address " + listen + " is not a loopback host:port")
	}
	if shape.Buffer == 0 {
		shape.Buffer = defaultDelayBuffer
	}
	ln, err := net.Listen("tcp4", listen)
	if err != nil {
		return nil, err
	}
	p := &DelayProxy{shape: shape, target: target, ln: ln, clock: time.Now, sleep: time.Sleep,
		open: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr returns the address the proxy listens on.
func (p *DelayProxy) Addr() *net.TCPAddr { return p.ln.Addr().(*net.TCPAddr) }

// Stats returns the counts so far.
func (p *DelayProxy) Stats() LinkStats {
	return LinkStats{Conns: p.conns.Load(), Up: p.up.Load(), Down: p.down.Load(), Turns: p.turns.Load()}
}

// Close stops listening, closes every connection (bytes still in the proxy are lost, as
// when a link goes away) and waits for the proxy's goroutines to end.
func (p *DelayProxy) Close() error {
	p.mu.Lock()
	p.closed = true
	for c := range p.open {
		c.Close()
	}
	p.mu.Unlock()
	err := p.ln.Close()
	p.wg.Wait()
	return err
}

// track registers c for Close; false if the proxy is closing.
func (p *DelayProxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.open[c] = struct{}{}
	return true
}

func (p *DelayProxy) untrack(c net.Conn) {
	p.mu.Lock()
	delete(p.open, c)
	p.mu.Unlock()
	c.Close()
}

func (p *DelayProxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return // closed; a loopback listener fails for nothing else
		}
		if !p.track(c) {
			c.Close()
			return
		}
		p.conns.Add(1)
		p.wg.Add(1)
		go p.serve(c)
	}
}

// serve forwards one connection. The target is dialled one Delay after the accept, as a
// SYN would arrive; the client's connect has returned at once, so connection set-up
// costs about half a round trip less than on a real link.
func (p *DelayProxy) serve(client net.Conn) {
	defer p.wg.Done()
	defer p.untrack(client)
	p.sleep(p.shape.Delay)
	server, err := net.DialTimeout("tcp4", p.target, 10*time.Second)
	if err != nil {
		return // the client sees its connection closed, as after a refused one
	}
	if !p.track(server) {
		server.Close()
		return
	}
	defer p.untrack(server)

	// lastUp tells the two readers which side spoke last, for Turns.
	var mu sync.Mutex
	lastUp := false
	turn := func(up bool) {
		mu.Lock()
		if up && !lastUp {
			p.turns.Add(1)
		}
		lastUp = up
		mu.Unlock()
	}
	var wg sync.WaitGroup
	wg.Add(2)
	fail := func() { client.Close(); server.Close() }
	go func() { defer wg.Done(); p.pipe(client, server, &p.up, func() { turn(true) }, fail) }()
	go func() { defer wg.Done(); p.pipe(server, client, &p.down, func() { turn(false) }, fail) }()
	wg.Wait()
}

// chunk is bytes read at one time, due on the other side at due.
type chunk struct {
	data []byte
	due  time.Time
}

// pipe forwards src to dst, each chunk Delay after it was read, in order, at most
// shape.Rate bytes per second, holding at most shape.Buffer bytes. It ends at src's end
// of stream (then half-closes dst) or at the first error (then calls fail).
func (p *DelayProxy) pipe(src, dst net.Conn, count *atomic.Int64, onRead, fail func()) {
	queue := make(chan chunk, max(p.shape.Buffer/delayChunk, 1))
	done := make(chan struct{})
	go func() {
		defer close(done)
		var next time.Time // when the link is free again, with a rate
		for c := range queue {
			start := c.due
			if p.shape.Rate > 0 {
				start, next = rateSlot(c.due, next, len(c.data), p.shape.Rate)
			}
			if d := start.Sub(p.clock()); d > 0 {
				p.sleep(d)
			}
			if _, err := dst.Write(c.data); err != nil {
				fail()
				for range queue { // let the reader finish
				}
				return
			}
		}
	}()
	for {
		buf := make([]byte, delayChunk)
		n, err := src.Read(buf)
		if n > 0 {
			onRead()
			count.Add(int64(n))
			queue <- chunk{data: buf[:n], due: p.clock().Add(p.shape.Delay)}
		}
		if err != nil {
			close(queue)
			<-done
			if errors.Is(err, io.EOF) {
				if tc, ok := dst.(*net.TCPConn); ok {
					_ = tc.CloseWrite()
				}
			} else {
				fail()
			}
			return
		}
	}
}

// rateSlot returns when a chunk of n bytes that may leave at due starts on a link that is
// busy until next and sends rate bytes per second, and when the link is free again.
func rateSlot(due, next time.Time, n int, rate int64) (start, free time.Time) {
	start = due
	if next.After(start) {
		start = next
	}
	return start, start.Add(time.Duration(int64(n) * int64(time.Second) / rate))
}
