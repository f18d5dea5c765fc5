package serveproto

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"io"
	"os"
	"path/filepath"
	"testing"

	gonar "github.com/nix-community/go-nix/pkg/nar"
	"go.uber.org/goleak"
)

// go-nix's nar.Writer, used for fixtures, stops its goroutine on Close; the
// package itself starts none.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// wb builds wire bytes for tests: the encoding is written out here by hand,
// independently of encoder.
type wb struct{ bytes.Buffer }

func (b *wb) u(vs ...uint64) *wb {
	for _, v := range vs {
		b.Write(binary.LittleEndian.AppendUint64(nil, v))
	}
	return b
}

// s writes each string with its length and padding.
func (b *wb) s(ss ...string) *wb {
	for _, s := range ss {
		b.u(uint64(len(s)))
		b.WriteString(s)
		b.Write(make([]byte, (8-len(s)%8)%8))
	}
	return b
}

// list writes a count and the strings.
func (b *wb) list(ss ...string) *wb {
	b.u(uint64(len(ss)))
	return b.s(ss...)
}

func (b *wb) raw(p []byte) *wb { b.Write(p); return b }

func (b *wb) b() []byte { return bytes.Clone(b.Bytes()) }

func golden(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// testDecoder reads from fixed bytes as a reply of op.
func testDecoder(b []byte, op string) *decoder {
	return &decoder{r: bufio.NewReader(bytes.NewReader(b)), op: op}
}

// atEOF reports whether d has nothing left.
func atEOF(d *decoder) bool {
	_, err := d.r.ReadByte()
	return err == io.EOF
}

// Store paths used by the tests. g1w7… are the ones of Nix's golden files.
const (
	pathFoo    = "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo"
	pathFooBar = "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo-bar"
	pathBar    = "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar"
	pathBarDrv = "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar.drv"
	pathFooDrv = "/nix/store/g1w7hyyyy1w7hy3qg1w7hy3qgqqqqy3q-foo.drv"
	pathA      = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a"
	pathB      = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b"
	pathC      = "/nix/store/cccccccccccccccccccccccccccccccc-c"
	drvPath    = "/nix/store/dddddddddddddddddddddddddddddddd-test.drv"
	outPath    = "/nix/store/kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk-test"
)

// sampleNAR is the NAR of the output the spec verified live (§5.1): a
// directory with f ("hi\n"), link -> f and executable x ("x\n"): 704 bytes,
// narHash sha256:00gc8cspxby41myj4g82r7jzjk8008j3qdsy0dfvl220azf548v0.
func sampleNAR(t testing.TB) []byte {
	t.Helper()
	return makeNAR(t, []gonar.Header{
		{Path: "/", Type: gonar.TypeDirectory},
		{Path: "/f", Type: gonar.TypeRegular, Size: 3},
		{Path: "/link", Type: gonar.TypeSymlink, LinkTarget: "f"},
		{Path: "/x", Type: gonar.TypeRegular, Size: 2, Executable: true},
	}, map[string]string{"/f": "hi\n", "/x": "x\n"})
}

const sampleNARHash = "sha256:00gc8cspxby41myj4g82r7jzjk8008j3qdsy0dfvl220azf548v0"

// fileNAR is the NAR of a single regular file.
func fileNAR(t testing.TB, contents string) []byte {
	t.Helper()
	return makeNAR(t, []gonar.Header{{Path: "/", Type: gonar.TypeRegular, Size: int64(len(contents))}},
		map[string]string{"/": contents})
}

func makeNAR(t testing.TB, hdrs []gonar.Header, contents map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	nw, err := gonar.NewWriter(&buf)
	if err != nil {
		t.Fatal(err)
	}
	for i := range hdrs {
		if err := nw.WriteHeader(&hdrs[i]); err != nil {
			t.Fatal(err)
		}
		if c, ok := contents[hdrs[i].Path]; ok {
			if _, err := io.WriteString(nw, c); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := nw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func hexSHA256(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

// fake is the server side of a pipe pair, run by a test's script on its
// own goroutine.
type fake struct {
	t   *testing.T
	in  io.Reader // requests from the client
	out io.Writer // replies to the client
}

// expect reads len(want) bytes and reports a difference.
func (f *fake) expect(what string, want []byte) bool {
	got := make([]byte, len(want))
	n, err := io.ReadFull(f.in, got)
	if err != nil {
		f.t.Errorf("fake server: reading %s: got %d of %d bytes: %v\ngot:\n%s", what, n, len(want), err, hex.Dump(got[:n]))
		return false
	}
	if !bytes.Equal(got, want) {
		f.t.Errorf("fake server: %s differs\ngot:\n%s\nwant:\n%s", what, hex.Dump(got), hex.Dump(want))
		return false
	}
	return true
}

// send writes a reply. Errors are ignored: the client may stop reading.
func (f *fake) send(p []byte) { f.out.Write(p) }

// greetingRequest is what every client sends first.
var greetingRequest = new(wb).u(0x390c9deb, 0x207).b()

// dialRaw connects a client to server, which runs on its own goroutine and
// sees the client's bytes from the first one on. The pipes are closed and
// the goroutine awaited when the test ends.
func dialRaw(t *testing.T, opt Options, server func(f *fake)) (*Conn, error) {
	cr, sw := io.Pipe() // server → client
	sr, cw := io.Pipe() // client → server
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer sw.Close()
		server(&fake{t: t, in: sr, out: sw})
	}()
	t.Cleanup(func() {
		cw.Close()
		cr.Close()
		<-done
	})
	return Handshake(cr, cw, opt)
}

// dial connects a client to a fake server of the given version that greets
// normally and then runs script.
func dial(t *testing.T, version uint64, opt Options, script func(f *fake)) *Conn {
	t.Helper()
	c, err := dialRaw(t, opt, func(f *fake) {
		if !f.expect("greeting", greetingRequest) {
			return
		}
		f.send(new(wb).u(0x5452eecb, version).b())
		script(f)
	})
	if err != nil {
		t.Fatalf("Handshake: %v", err)
	}
	return c
}

// exchange is a script: expect one request, send one reply.
func exchange(request, reply []byte) func(f *fake) {
	return func(f *fake) {
		if f.expect("request", request) {
			f.send(reply)
		}
	}
}
