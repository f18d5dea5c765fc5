package daemonproto

import (
	"bufio"

	"github.com/nix-offload/nix-offload/internal/wire"
)

// frameSize is the most bytes one frame carries. Nix's FramedSink sends
// what its 32 KiB buffer holds (nix 2.8.0 src/libutil/serialise.hh
// FramedSink), and the daemon's FramedSource takes any size.
const frameSize = 32 << 10

// frameWriter turns a byte stream into frames on e: u64 length, the
// bytes, no padding; close writes the empty frame that ends the stream.
type frameWriter struct {
	e   *wire.Writer
	buf []byte
}

func newFrameWriter(e *wire.Writer) *frameWriter {
	return &frameWriter{e: e, buf: make([]byte, 0, frameSize)}
}

func (f *frameWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		if err := f.e.Err(); err != nil {
			return n, err
		}
		k := min(len(p), frameSize-len(f.buf))
		f.buf = append(f.buf, p[:k]...)
		p, n = p[k:], n+k
		if len(f.buf) == frameSize {
			f.flush()
		}
	}
	return n, f.e.Err()
}

func (f *frameWriter) flush() {
	if len(f.buf) == 0 {
		return
	}
	f.e.Uint64(uint64(len(f.buf)))
	f.e.Write(f.buf)
	f.buf = f.buf[:0]
}

// wire returns a Writer whose bytes go into frames. Its errors are the
// transport's.
func (f *frameWriter) wire() *wire.Writer {
	return wire.NewWriter(bufio.NewWriterSize(f, frameSize))
}

// close ends the stream: the framed writer's buffered bytes, then the
// empty frame.
func (f *frameWriter) close() {
	f.flush()
	f.e.Uint64(0)
}
