package testbed

import (
	"bytes"
	"crypto/rand"
	"io"
	"net"
	"slices"
	"testing"
	"time"
)

// These run on loopback with no root and no Nix: the proxy is plain TCP. The timing
// bounds are generous on the slow side (a loaded 2-core machine) and strict on the fast
// side, where a proxy that does not delay fails them.

// echoServer answers every connection by copying back what it reads, and closes its
// side after the client's end of stream.
func echoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String()
}

func startProxy(t *testing.T, target string, shape LinkShape) *DelayProxy {
	t.Helper()
	p, err := StartDelayProxy("127.0.0.1:0", target, shape)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func dial(t *testing.T, p *DelayProxy) *net.TCPConn {
	t.Helper()
	c, err := net.DialTCP("tcp4", nil, p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(30 * time.Second))
	return c
}

func TestDelayProxyRoundTrips(t *testing.T) {
	const delay = 40 * time.Millisecond
	p := startProxy(t, echoServer(t), LinkShape{Delay: delay})
	c := dial(t, p)
	const exchanges = 5
	var rtts []time.Duration
	msg := []byte("ping 0123456789")
	got := make([]byte, len(msg))
	for range exchanges {
		t0 := time.Now()
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, got); err != nil {
			t.Fatal(err)
		}
		rtts = append(rtts, time.Since(t0))
		if !bytes.Equal(got, msg) {
			t.Fatalf("echo %q, want %q", got, msg)
		}
	}
	for i, d := range rtts {
		if d < 2*delay {
			t.Errorf("round trip %d took %v, less than 2 × the %v delay", i, d, delay)
		}
	}
	if m := slices.Min(rtts); m > 2*delay+300*time.Millisecond {
		t.Errorf("fastest round trip took %v, want about %v", m, 2*delay)
	}
	st := p.Stats()
	if st.Turns != exchanges || st.Conns != 1 || st.Up != exchanges*int64(len(msg)) || st.Down != st.Up {
		t.Errorf("stats %+v, want %d turns, 1 connection, %d bytes each way", st, exchanges, exchanges*len(msg))
	}
}

func TestDelayProxyKeepsOrderAndHalfClose(t *testing.T) {
	p := startProxy(t, echoServer(t), LinkShape{Delay: 5 * time.Millisecond, Buffer: 256 << 10})
	c := dial(t, p)
	data := make([]byte, 4<<20)
	rand.Read(data)
	go func() {
		// Small, uneven writes: many chunks in flight at once.
		for rest := data; len(rest) > 0; {
			n := min(len(rest), 1000+len(rest)%7000)
			if _, err := c.Write(rest[:n]); err != nil {
				return
			}
			rest = rest[n:]
		}
		c.CloseWrite() // the echo server ends its side after this
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("reading the echo: %v", err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("echo of %d bytes differs (got %d bytes)", len(data), len(got))
	}
}

func TestDelayProxyRate(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	read := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			read <- -1
			return
		}
		n, _ := io.Copy(io.Discard, c)
		c.Close()
		read <- n
	}()
	const rate, size = 2 << 20, 1 << 20 // 1 MiB at 2 MiB/s: 0.5 s
	p := startProxy(t, ln.Addr().String(), LinkShape{Rate: rate})
	c := dial(t, p)
	t0 := time.Now()
	if _, err := c.Write(make([]byte, size)); err != nil {
		t.Fatal(err)
	}
	c.CloseWrite()
	if n := <-read; n != size {
		t.Fatalf("target read %d bytes, want %d", n, size)
	}
	// The last chunk starts after (size - chunk)/rate.
	if took, least := time.Since(t0), time.Duration(size-delayChunk)*time.Second/rate; took < least || took > 10*least {
		t.Errorf("1 MiB at 2 MiB/s took %v, want at least %v and not 10 times that", took, least)
	}
}

func TestDelayProxyClose(t *testing.T) {
	p, err := StartDelayProxy("127.0.0.1:0", echoServer(t), LinkShape{Delay: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	c := dial(t, p)
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Read(make([]byte, 1)); err == nil {
		t.Errorf("read %d bytes on a connection of a closed proxy", n)
	}
	if c2, err := net.DialTimeout("tcp4", p.Addr().String(), time.Second); err == nil {
		c2.Close()
		t.Errorf("a closed proxy still accepts")
	}
}

func TestDelayProxyRefusesOtherAddresses(t *testing.T) {
	for _, addr := range []string{"0.0.0.0:0", "10.1.2.3:0", "localhost"} {
		if p, err := StartDelayProxy(addr, "127.0.0.1:1", LinkShape{}); err == nil {
			p.Close()
			t.Errorf("StartDelayProxy(%q) listened; want only loopback addresses", addr)
		}
	}
}

func TestRateSlot(t *testing.T) {
	t0 := time.Unix(1000, 0)
	// A free link: starts when due, busy for n/rate.
	start, free := rateSlot(t0, time.Time{}, 1000, 10000)
	if !start.Equal(t0) || !free.Equal(t0.Add(100*time.Millisecond)) {
		t.Errorf("free link: start %v, free %v", start.Sub(t0), free.Sub(t0))
	}
	// A busy link: waits for it, even when the chunk was due earlier.
	start, free = rateSlot(t0, t0.Add(time.Second), 500, 1000)
	if !start.Equal(t0.Add(time.Second)) || !free.Equal(t0.Add(1500*time.Millisecond)) {
		t.Errorf("busy link: start %v, free %v", start.Sub(t0), free.Sub(t0))
	}
}
