package serveproto

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/nix-offload/nix-offload/internal/nar"
)

func TestHandshake(t *testing.T) {
	// [V] the bytes a real Debian nix-store 2.8 greets with.
	live := []byte{0xcb, 0xee, 0x52, 0x54, 0, 0, 0, 0, 0x07, 0x02, 0, 0, 0, 0, 0, 0}
	for _, tc := range []struct {
		name     string
		greeting []byte
		want     string
	}{
		{"live 2.8", live, "2.7"},
		{"golden 2.28", golden(t, "handshake-to-client.bin"), "2.0"},
		{"golden 2.35", golden(t, "handshake-to-client-2.35.bin"), "2.5"},
		{"2.8 protocol", new(wb).u(0x5452eecb, 0x208).b(), "2.8"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := dialRaw(t, Options{}, func(f *fake) {
				if f.expect("greeting", greetingRequest) {
					f.send(tc.greeting)
				}
			})
			if err != nil {
				t.Fatal(err)
			}
			if got := c.ServerVersion().String(); got != tc.want {
				t.Errorf("version %s, want %s", got, tc.want)
			}
		})
	}
}

func TestHandshakeFailures(t *testing.T) {
	for _, tc := range []struct {
		name     string
		greeting []byte
		stream   bool // a StreamError (through Explain) rather than a ProtocolError
		want     string
	}{
		{"login banner", []byte("Welcome to builder1!\nLast login: Mon\n"), false,
			`serveproto: Handshake reply: magic: the server did not speak the serve protocol; got "Welcome to builder1!\nLast login: Mon\n"`},
		{"long banner", bytes.Repeat([]byte("x"), 1000), false, `(truncated)`},
		{"binary garbage", []byte{0xff, 0, 1, 2, 3, 4, 5, 6, 7}, false, `got "\xff\x00\x01\x02\x03\x04\x05\x06\a"`},
		{"short text then EOF", []byte("sh: 1\n"), true,
			`serveproto: Handshake reply: magic: got "sh: 1\n", then: unexpected EOF`},
		{"EOF", nil, true, "serveproto: Handshake reply: magic: unexpected EOF"},
		{"wrong major", new(wb).u(0x5452eecb, 0x307).b(), false,
			"serveproto: Handshake reply: server version: version 3.7 (0x307): not supported by the server's protocol version; this client speaks 2.x"},
		{"major 1", new(wb).u(0x5452eecb, 0x107).b(), false, "version 1.7"},
		{"version over 32 bits", new(wb).u(0x5452eecb, 1<<32|0x207).b(), false, "server version: value 4294967815 exceeds 4294967295"},
		{"EOF after magic", new(wb).u(0x5452eecb).b(), true, "server version: unexpected EOF"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			explained := 0
			opt := Options{Explain: func(err error) error {
				explained++
				return fmt.Errorf("%w; remote stderr: bash: nix-store: command not found", err)
			}}
			c, err := dialRaw(t, opt, func(f *fake) {
				if f.expect("greeting", greetingRequest) {
					f.send(tc.greeting)
				}
			})
			if c != nil || err == nil {
				t.Fatalf("got %v, %v", c, err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q\ndoes not contain %q", err, tc.want)
			}
			var se *StreamError
			var pe *ProtocolError
			if tc.stream {
				if !errors.As(err, &se) || explained != 1 || !strings.HasSuffix(err.Error(), "command not found") {
					t.Errorf("want an explained StreamError, got %T %v (explained %d)", err, err, explained)
				}
			} else if !errors.As(err, &pe) || explained != 0 {
				t.Errorf("want a ProtocolError, got %T %v (explained %d)", err, err, explained)
			}
			if strings.Contains(tc.name, "major") && !errors.Is(err, ErrUnsupported) {
				t.Errorf("%v does not wrap ErrUnsupported", err)
			}
		})
	}
}

// opCase is one operation against a fake server: the exact request it must
// send and a valid reply.
type opCase struct {
	name    string
	minor   int
	call    func(c *Conn) (any, error)
	request []byte
	reply   []byte
	want    any
}

func opCases(t *testing.T) []opCase {
	narBytes := sampleNAR(t)
	small := fileNAR(t, "hello\n")
	smallInfo := PathInfo{Path: pathA, References: []string{pathB, pathA}, Deriver: drvPath,
		NarSize: uint64(len(small)), NarHash: "sha256:" + hexSHA256(small), RegistrationTime: 1700000000,
		Sigs: []string{"k:sig"}, CA: ""}
	drv := BasicDerivation{
		Outputs:   map[string]DerivationOutput{"out": {Path: outPath}, "dev": {Path: pathC}},
		InputSrcs: []string{pathB, pathA},
		Platform:  "x86_64-linux",
		Builder:   "/bin/sh",
		Args:      []string{"-c", "echo hi > $out"},
		Env:       map[string]string{"out": outPath, "builder": "/bin/sh", "name": "test"},
	}
	opts := BuildOptions{MaxSilentTime: 1500 * time.Millisecond, BuildTimeout: time.Hour, MaxLogSize: 1 << 20}
	drvRequest := func(minor int) []byte {
		b := new(wb).u(8).s(drvPath).
			u(2).s("dev", pathC, "", "").s("out", outPath, "", "").
			list(pathA, pathB).s("x86_64-linux", "/bin/sh").list("-c", "echo hi > $out").
			u(3).s("builder", "/bin/sh", "name", "test", "out", outPath).
			u(2, 3600)
		if minor >= 2 {
			b.u(1 << 20)
		}
		if minor >= 3 {
			b.u(0, 0)
		}
		if minor >= 7 {
			b.u(0)
		}
		return b.b()
	}
	// The [V] 2.8 success reply (§3.8.3); the spec elides the middle of
	// the key's hash, so it is filled with zeros here.
	key := "sha256:028a307c" + strings.Repeat("0", 52) + "b77b!out"
	realisation := `{"dependentRealisations":{},"id":"` + key + `","outPath":"ni4cnpzh6c59gnrpxfb3g2pkz3jfdp6k-sp-test","signatures":[]}`
	start := int64(1700000000)
	successReply := new(wb).u(0).s("").u(1, 0, uint64(start), uint64(start)).u(1).s(key, realisation).b()
	wantSuccess := &BuildResult{Status: Built, TimesBuilt: 1, StartTime: time.Unix(start, 0), StopTime: time.Unix(start, 0),
		BuiltOutputs: map[string]string{"out": "/nix/store/ni4cnpzh6c59gnrpxfb3g2pkz3jfdp6k-sp-test"}}

	return []opCase{
		{
			name: "QueryValidPaths", minor: 7,
			call: func(c *Conn) (any, error) {
				return c.QueryValidPaths([]string{pathC, pathA, pathB, pathA}, true, false)
			},
			request: new(wb).u(1, 1, 0).list(pathA, pathB, pathC).b(),
			reply:   new(wb).list(pathA, pathC).b(),
			want:    []string{pathA, pathC},
		},
		{
			name: "QueryValidPaths none", minor: 7,
			call:    func(c *Conn) (any, error) { return c.QueryValidPaths([]string{pathA}, false, true) },
			request: new(wb).u(1, 0, 1).list(pathA).b(),
			reply:   new(wb).u(0).b(),
			want:    []string(nil),
		},
		{
			name: "QueryPathInfos", minor: 7,
			call:    func(c *Conn) (any, error) { return c.QueryPathInfos([]string{pathB, pathA, pathC}) },
			request: new(wb).u(2).list(pathA, pathB, pathC).b(),
			reply: new(wb).s(pathA, drvPath).list(pathB).u(704, 704).s(sampleNARHash, "").list().
				s(pathC, "").list(pathC).u(8, 8).s(sampleNARHash, "fixed:r:sha256:1lr187v6dck1rjh2j6svpikcfz53wyl3qrlcbb405zlh13x0khhh").list("a:1", "b:2").
				s("").b(),
			want: []PathInfo{
				{Path: pathA, Deriver: drvPath, References: []string{pathB}, DownloadSize: 704, NarSize: 704, NarHash: sampleNARHash},
				{Path: pathC, References: []string{pathC}, DownloadSize: 8, NarSize: 8, NarHash: sampleNARHash,
					CA: "fixed:r:sha256:1lr187v6dck1rjh2j6svpikcfz53wyl3qrlcbb405zlh13x0khhh", Sigs: []string{"a:1", "b:2"}},
			},
		},
		{
			// A server older than 2.4 sends no narHash, ca, sigs.
			name: "QueryPathInfos 2.3", minor: 3,
			call:    func(c *Conn) (any, error) { return c.QueryPathInfos([]string{pathA}) },
			request: new(wb).u(2).list(pathA).b(),
			reply:   new(wb).s(pathA, "").list().u(704, 704).s("").b(),
			want:    []PathInfo{{Path: pathA, DownloadSize: 704, NarSize: 704}},
		},
		{
			name: "QueryClosure", minor: 7,
			call:    func(c *Conn) (any, error) { return c.QueryClosure([]string{pathA}, true) },
			request: new(wb).u(7, 1).list(pathA).b(),
			reply:   new(wb).list(pathA, pathB).b(),
			want:    []string{pathA, pathB},
		},
		{
			name: "DumpStorePath", minor: 7,
			call: func(c *Conn) (any, error) {
				var buf bytes.Buffer
				st, err := c.DumpStorePath(pathA, &buf)
				if err != nil {
					return nil, err
				}
				if !bytes.Equal(buf.Bytes(), narBytes) {
					return nil, errors.New("NAR bytes differ")
				}
				return []any{st.Size, st.NixHash()}, nil
			},
			request: new(wb).u(3).s(pathA).b(),
			reply:   narBytes,
			want:    []any{int64(704), sampleNARHash},
		},
		{
			name: "ImportPaths", minor: 7,
			call: func(c *Conn) (any, error) {
				return nil, c.ImportPaths([]ExportItem{
					{Info: PathInfo{Path: pathB}, NAR: bytes.NewReader(narBytes)},
					{Info: PathInfo{Path: pathA, References: []string{pathB, pathA}, Deriver: drvPath,
						NarSize: uint64(len(small)), NarHash: smallInfo.NarHash}, NAR: bytes.NewReader(small)},
				})
			},
			request: new(wb).u(4).
				u(1).raw(narBytes).u(0x4558494e).s(pathB).list().s("").u(0).
				u(1).raw(small).u(0x4558494e).s(pathA).list(pathA, pathB).s(drvPath).u(0).
				u(0).b(),
			reply: new(wb).u(1).b(),
		},
		{
			name: "AddToStoreNar", minor: 5,
			call: func(c *Conn) (any, error) { return nil, c.AddToStoreNar(smallInfo, bytes.NewReader(small)) },
			request: new(wb).u(9).s(pathA, drvPath, hexSHA256(small)).list(pathA, pathB).
				u(1700000000, uint64(len(small)), 0).list("k:sig").s("").raw(small).b(),
			reply: new(wb).u(1).b(),
		},
		{
			name: "BuildDerivation", minor: 7,
			call: func(c *Conn) (any, error) { return c.BuildDerivation(drvPath, drv, opts) },
			// MaxSilentTime 1.5 s is sent as 2 s: rounded up.
			request: drvRequest(7),
			reply:   successReply,
			want:    wantSuccess,
		},
		{
			// 2.5 servers (Nix 2.1–2.3) know no builtOutputs and no
			// keepFailed.
			name: "BuildDerivation 2.5", minor: 5,
			call:    func(c *Conn) (any, error) { return c.BuildDerivation(drvPath, drv, opts) },
			request: drvRequest(5),
			reply:   new(wb).u(0).s("").u(1, 0, uint64(start), uint64(start)).b(),
			want:    &BuildResult{Status: Built, TimesBuilt: 1, StartTime: time.Unix(start, 0), StopTime: time.Unix(start, 0)},
		},
		{
			name: "BuildDerivation 2.2", minor: 2,
			call:    func(c *Conn) (any, error) { return c.BuildDerivation(drvPath, drv, opts) },
			request: drvRequest(2),
			reply:   new(wb).u(0).s("").b(),
			want:    &BuildResult{Status: Built},
		},
		{
			// [V] a failing builder: ANSI codes in the message.
			name: "BuildDerivation failure", minor: 7,
			call:    func(c *Conn) (any, error) { return c.BuildDerivation(drvPath, drv, opts) },
			request: drvRequest(7),
			reply: new(wb).u(3).s("\x1b[0mbuilder for '\x1b[35;1m"+drvPath+"\x1b[0m' failed with exit code 3").
				u(1, 0, uint64(start), uint64(start+1)).u(0).b(),
			want: &BuildResult{Status: PermanentFailure, ErrorMsg: "builder for '" + drvPath + "' failed with exit code 3",
				TimesBuilt: 1, StartTime: time.Unix(start, 0), StopTime: time.Unix(start+1, 0), BuiltOutputs: map[string]string{}},
		},
		{
			name: "BuildDerivation 2.35 compat", minor: 7,
			call:    func(c *Conn) (any, error) { return c.BuildDerivation(drvPath, drv, opts) },
			request: drvRequest(7),
			reply: new(wb).u(2).s("").u(0, 0, 0, 0).u(2).
				s("sha256:"+strings.Repeat("0", 64)+"!out", `{"id":"sha256:`+strings.Repeat("0", 64)+`!out","outPath":"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk-test"}`).
				s("sha256:"+strings.Repeat("0", 64)+"!dev", `{"outPath":"`+pathC+`"}`).b(),
			want: &BuildResult{Status: AlreadyValid, BuiltOutputs: map[string]string{"out": outPath, "dev": pathC}},
		},
		{
			// A Nix 2.35 server (0x208) answers a 2.7 client in the 2.7
			// layout.
			name: "BuildDerivation 2.8 server", minor: 8,
			call:    func(c *Conn) (any, error) { return c.BuildDerivation(drvPath, drv, opts) },
			request: drvRequest(7),
			reply: new(wb).u(0).s("").u(1, 0, uint64(start), uint64(start)).u(1).
				s("sha256:"+strings.Repeat("0", 64)+"!out", `{"id":"sha256:`+strings.Repeat("0", 64)+`!out","outPath":"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk-test"}`).b(),
			want: &BuildResult{Status: Built, TimesBuilt: 1, StartTime: time.Unix(start, 0), StopTime: time.Unix(start, 0),
				BuiltOutputs: map[string]string{"out": outPath}},
		},
		{
			name: "BuildPaths", minor: 7,
			call: func(c *Conn) (any, error) {
				return nil, c.BuildPaths([]string{drvPath + "!out", pathA}, BuildOptions{KeepFailed: true})
			},
			request: new(wb).u(6).list(drvPath+"!out", pathA).u(0, 0, 0, 0, 0, 1).b(),
			reply:   new(wb).u(0).b(),
		},
		{
			name: "BuildPaths failure", minor: 7,
			call: func(c *Conn) (any, error) {
				err := c.BuildPaths([]string{drvPath}, BuildOptions{})
				var be *BuildPathsError
				if !errors.As(err, &be) {
					return nil, err
				}
				return *be, nil
			},
			request: new(wb).u(6).list(drvPath).u(0, 0, 0, 0, 0, 0).b(),
			reply:   new(wb).u(100).s("\x1b[31;1merror:\x1b[0m builder for 'x' failed with exit code 1").b(),
			want:    BuildPathsError{Status: 100, Msg: "error: builder for 'x' failed with exit code 1"},
		},
	}
}

func TestOps(t *testing.T) {
	for _, tc := range opCases(t) {
		t.Run(tc.name, func(t *testing.T) {
			// The same operation twice: the Conn stays in step.
			c := dial(t, uint64(0x200|tc.minor), Options{}, func(f *fake) {
				exchange(tc.request, tc.reply)(f)
				exchange(tc.request, tc.reply)(f)
			})
			for i := range 2 {
				got, err := tc.call(c)
				if err != nil {
					t.Fatalf("call %d: %v", i, err)
				}
				if diff := cmp.Diff(tc.want, got); diff != "" {
					t.Errorf("call %d (-want +got):\n%s", i, diff)
				}
			}
			if err := c.Err(); err != nil {
				t.Errorf("Err() = %v", err)
			}
		})
	}
}

// Every reply cut short at every byte is a StreamError that went through
// Explain, never a ProtocolError, a hang or a panic; and the Conn then
// returns the same error at once.
func TestOpsTruncated(t *testing.T) {
	for _, tc := range opCases(t) {
		t.Run(tc.name, func(t *testing.T) {
			for cut := range len(tc.reply) {
				explained := 0
				opt := Options{Explain: func(err error) error {
					explained++
					return fmt.Errorf("%w\nremote: error: path is not valid", err)
				}}
				c := dial(t, uint64(0x200|tc.minor), opt, exchange(tc.request, tc.reply[:cut]))
				_, err := tc.call(c)
				var se *StreamError
				if !errors.As(err, &se) || !errors.Is(err, io.ErrUnexpectedEOF) || explained != 1 {
					t.Fatalf("cut at %d: got %T %v (explained %d); want an explained StreamError wrapping io.ErrUnexpectedEOF", cut, err, err, explained)
				}
				if !strings.HasPrefix(err.Error(), "serveproto: "+strings.Fields(tc.name)[0]+" reply") {
					t.Fatalf("cut at %d: %q does not name the operation", cut, err)
				}
				_, err2 := tc.call(c)
				if err2 != err || c.Err() != err {
					t.Fatalf("cut at %d: second call returned %v, want the same error", cut, err2)
				}
			}
		})
	}
}

// A server that dies while the request is being sent: a StreamError for
// the request, explained.
func TestRequestWriteFails(t *testing.T) {
	for _, tc := range opCases(t) {
		t.Run(tc.name, func(t *testing.T) {
			cr, sw := io.Pipe()
			sr, cw := io.Pipe()
			done := make(chan struct{})
			go func() {
				defer close(done)
				f := &fake{t: t, in: sr, out: sw}
				if f.expect("greeting", greetingRequest) {
					f.send(new(wb).u(0x5452eecb, uint64(0x200|tc.minor)).b())
				}
				// Read 3 bytes of the request, then die.
				io.ReadFull(sr, make([]byte, 3))
				sr.CloseWithError(errors.New("broken pipe"))
				sw.Close()
			}()
			defer func() { cw.Close(); cr.Close(); <-done }()
			explained := 0
			c, err := Handshake(cr, cw, Options{Explain: func(err error) error { explained++; return err }})
			if err != nil {
				t.Fatal(err)
			}
			_, err = tc.call(c)
			var se *StreamError
			if !errors.As(err, &se) || explained != 1 {
				t.Fatalf("got %T %v (explained %d), want an explained StreamError", err, err, explained)
			}
			if !se.Writing && !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Errorf("got %v", err)
			}
		})
	}
}

// Malformed replies: a ProtocolError naming op and field, not explained,
// and the Conn is broken.
func TestOpsMalformed(t *testing.T) {
	bad := func(s string) []byte {
		return new(wb).u(uint64(len(s))).raw([]byte(s)).raw([]byte{1, 1, 1, 1, 1, 1, 1, 1}[:(8-len(s)%8)%8]).b()
	}
	ok := opCases(t)
	byName := map[string]opCase{}
	for _, tc := range ok {
		byName[tc.name] = tc
	}
	drvReply := func(b *wb) []byte { return b.b() }
	for _, tc := range []struct {
		op    string
		reply []byte
		want  string
	}{
		{"QueryValidPaths", new(wb).u(1 << 60).b(), "serveproto: QueryValidPaths reply: count: 1152921504606846976 exceeds 1048576"},
		{"QueryValidPaths", new(wb).u(4).s(pathA, pathB, pathC).u(9000).b(), "serveproto: QueryValidPaths reply: path 3: length 9000 exceeds 255"},
		{"QueryValidPaths", new(wb).u(1).u(1 << 60).b(), "path 0: length 1152921504606846976 exceeds 255"},
		{"QueryValidPaths", new(wb).u(1).raw(bad("/nix/store/x")).b(), "path 0: non-zero padding"},
		{"QueryValidPaths", new(wb).list("/nix/store/x").b(), `path 0: "x" is not a store path base name`},
		{"QueryPathInfos", new(wb).s(outPath).b(), "info 0: path: " + outPath + " was not requested"},
		{"QueryPathInfos", new(wb).s(pathA, "").list().u(1, 1).s("md5:xyz").b(), `info 0: narHash: "md5:xyz"`},
		{"QueryPathInfos", new(wb).s(pathA, "").list().u(1, 1).s(sampleNARHash, "").u(1 << 60).b(), "info 0: sigs: count: 1152921504606846976 exceeds 1024"},
		{"QueryPathInfos", new(wb).s(pathA, "").u(1 << 60).b(), "info 0: references: count"},
		{"QueryPathInfos", new(wb).s(pathA, "").list().u(1, 1).s(sampleNARHash, "").list().s(pathA).b(), "info 1: path: /nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a sent twice"},
		{"QueryPathInfos", new(wb).s(pathA, "").list().u(1, 1).u(1 << 40).b(), "info 0: narHash: length 1099511627776 exceeds 256"},
		{"QueryClosure", new(wb).u(1 << 62).b(), "QueryClosure reply: count"},
		{"DumpStorePath", []byte("garbage!garbage!"), "serveproto: DumpStorePath reply: NAR: nar:"},
		{"ImportPaths", new(wb).u(2).b(), "serveproto: ImportPaths reply: result: got 2, want 1"},
		{"AddToStoreNar", new(wb).u(0).b(), "AddToStoreNar reply: result: got 0, want 1"},
		{"BuildDerivation", new(wb).u(1 << 40).b(), "BuildDerivation reply: status: value 1099511627776 exceeds 4294967295"},
		{"BuildDerivation", new(wb).u(0).u(1 << 60).b(), "BuildDerivation reply: errorMsg: length 1152921504606846976 exceeds 1048576"},
		{"BuildDerivation", drvReply(new(wb).u(0).s("").u(1, 2)), "BuildDerivation reply: isNonDeterministic: bool value 2 is neither 0 nor 1"},
		{"BuildDerivation", drvReply(new(wb).u(0).s("").u(1<<32, 0)), "timesBuilt: value 4294967296 exceeds"},
		{"BuildDerivation", drvReply(new(wb).u(0).s("").u(1, 0, 1<<63, 0)), "startTime: value 9223372036854775808 exceeds 9223372036854775807"},
		{"BuildDerivation", drvReply(new(wb).u(0).s("").u(1, 0, 0, 0).u(1 << 60)), "builtOutputs: count: 1152921504606846976 exceeds 4096"},
		{"BuildDerivation", drvReply(new(wb).u(0).s("").u(1, 0, 0, 0).u(1).u(1 << 60)), "builtOutputs: entry 0: id: length 1152921504606846976 exceeds 1024"},
		{"BuildDerivation", drvReply(new(wb).u(0).s("").u(1, 0, 0, 0).u(1).s("sha256:00", "{}")), `builtOutputs: entry 0: id: "sha256:00" is not <hash>!<output name>`},
		{"BuildDerivation", drvReply(new(wb).u(0).s("").u(1, 0, 0, 0).u(1).s("sha256:00!out", "{}")), `builtOutputs: entry 0: realisation: "{}": no outPath`},
		{"BuildDerivation", drvReply(new(wb).u(0).s("").u(1, 0, 0, 0).u(1).s("sha256:00!out", "{not json")), `builtOutputs: entry 0: realisation: "{not json": invalid character`},
		{"BuildDerivation", drvReply(new(wb).u(0).s("").u(1, 0, 0, 0).u(1).s("sha256:00!out", `{"outPath":"../etc"}`)), `realisation: outPath: "../etc" is not a store path base name`},
		{"BuildDerivation", drvReply(new(wb).u(0).s("").u(1, 0, 0, 0).u(1).s("sha256:00!out").u(1 << 60)), "realisation: length 1152921504606846976 exceeds 1048576"},
		{"BuildDerivation", drvReply(new(wb).u(0).s("").u(1, 0, 0, 0).u(2).s("a!out", `{"outPath":"`+pathA+`"}`, "b!out", `{"outPath":"`+pathB+`"}`)), `builtOutputs: entry 1: output "out" is both`},
		{"BuildPaths", new(wb).u(1).u(1 << 60).b(), "BuildPaths reply: msg: length 1152921504606846976 exceeds 1048576"},
	} {
		t.Run(tc.want, func(t *testing.T) {
			oc := byName[tc.op]
			explained := 0
			c := dial(t, uint64(0x200|oc.minor), Options{Explain: func(err error) error { explained++; return err }},
				exchange(oc.request, tc.reply))
			_, err := oc.call(c)
			var pe *ProtocolError
			if !errors.As(err, &pe) || explained != 0 {
				t.Fatalf("got %T %v (explained %d), want a ProtocolError", err, err, explained)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q\ndoes not contain %q", err, tc.want)
			}
			if c.Err() != err {
				t.Errorf("Conn not broken: Err() = %v", c.Err())
			}
		})
	}
}

// Arguments that would make the server fail are refused before anything
// is sent, and the Conn stays usable.
func TestArgumentErrors(t *testing.T) {
	qvp := new(wb).u(1, 0, 0).list(pathA).b()
	c := dial(t, 0x204, Options{}, exchange(qvp, new(wb).list(pathA).b()))
	narBytes := fileNAR(t, "x")
	info := PathInfo{Path: pathA, NarSize: uint64(len(narBytes)), NarHash: "sha256:" + hexSHA256(narBytes)}
	for _, tc := range []struct {
		name string
		call func() error
		want string
	}{
		{"AddToStoreNar on 2.4", func() error { return c.AddToStoreNar(info, bytes.NewReader(narBytes)) },
			"serveproto: AddToStoreNar: server protocol 2.4, need 2.5: not supported by the server's protocol version"},
		{"bad path", func() error { _, err := c.QueryValidPaths([]string{"/nix/store/foo"}, false, false); return err },
			`serveproto: QueryValidPaths: request: "foo" is not a store path base name`},
		{"not a drv", func() error { _, err := c.BuildDerivation(pathA, BasicDerivation{}, BuildOptions{}); return err },
			"serveproto: BuildDerivation: drvPath /nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a: derivation path does not end in .drv"},
		{"bad input src", func() error {
			_, err := c.BuildDerivation(drvPath, BasicDerivation{InputSrcs: []string{"/tmp"}}, BuildOptions{})
			return err
		}, "serveproto: BuildDerivation: inputSrcs:"},
		{"timeout too long", func() error {
			return c.BuildPaths([]string{drvPath}, BuildOptions{BuildTimeout: 200 * 365 * 24 * time.Hour})
		}, "serveproto: BuildPaths: BuildTimeout:"},
		{"bad BuildPaths path", func() error { return c.BuildPaths([]string{"foo!out"}, BuildOptions{}) }, "BuildPaths: request:"},
		{"ImportPaths without NAR", func() error { return c.ImportPaths([]ExportItem{{Info: info}}) }, "no NAR reader"},
		{"ImportPaths bad hash", func() error {
			return c.ImportPaths([]ExportItem{{Info: PathInfo{Path: pathA, NarHash: "sha256:xyz"}, NAR: bytes.NewReader(narBytes)}})
		}, `narHash: "sha256:xyz"`},
		{"DumpStorePath bad path", func() error { _, err := c.DumpStorePath("/etc/passwd", io.Discard); return err }, "is not in /nix/store"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want %q", err, tc.want)
			}
			if c.Err() != nil {
				t.Fatalf("Conn broken: %v", c.Err())
			}
		})
	}
	if !errors.Is(c.AddToStoreNar(info, bytes.NewReader(narBytes)), ErrUnsupported) {
		t.Error("AddToStoreNar error does not wrap ErrUnsupported")
	}
	if got, err := c.QueryValidPaths([]string{pathA}, false, false); err != nil || len(got) != 1 {
		t.Fatalf("Conn unusable after argument errors: %v, %v", got, err)
	}
}

func TestAddToStoreNarSizeAndHash(t *testing.T) {
	good := fileNAR(t, "hello\n")
	other := fileNAR(t, "world\n") // same length, other hash
	header := func(size uint64, hash string) []byte {
		return new(wb).u(9).s(pathA, "", hash).list().u(0, size, 0).list().s("").b()
	}
	info := PathInfo{Path: pathA, NarSize: uint64(len(good)), NarHash: "sha256:" + hexSHA256(good)}

	t.Run("longer reader", func(t *testing.T) {
		// The NAR itself is sent whole and accepted; the extra bytes
		// are reported and the Conn stays usable.
		req := append(header(info.NarSize, hexSHA256(good)), good...)
		c := dial(t, 0x207, Options{}, exchange(req, new(wb).u(1).b()))
		err := c.AddToStoreNar(info, io.MultiReader(bytes.NewReader(good), strings.NewReader("extra")))
		if err == nil || !strings.Contains(err.Error(), "more bytes after the NAR") {
			t.Fatalf("got %v", err)
		}
		if c.Err() != nil {
			t.Errorf("Conn broken: %v", c.Err())
		}
	})

	for _, tc := range []struct {
		name string
		info PathInfo
		nar  io.Reader
		want string
	}{
		{"shorter reader", PathInfo{Path: pathA, NarSize: info.NarSize + 8, NarHash: info.NarHash}, bytes.NewReader(good),
			fmt.Sprintf("serveproto: AddToStoreNar: %s: NAR is %d bytes, shorter than NarSize %d", pathA, len(good), len(good)+8)},
		{"NarSize too small", PathInfo{Path: pathA, NarSize: info.NarSize - 8, NarHash: info.NarHash}, bytes.NewReader(good),
			fmt.Sprintf("NAR is longer than NarSize %d", len(good)-8)},
		{"hash mismatch", info, bytes.NewReader(other), "narHash mismatch: NAR has sha256:"},
		{"invalid NAR", PathInfo{Path: pathA, NarSize: 16, NarHash: info.NarHash}, strings.NewReader("not a NAR, no no"), "AddToStoreNar: /nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a: NAR: nar:"},
		{"reader fails", info, io.MultiReader(bytes.NewReader(good[:40]), iotestErrReader{}), "reader exploded"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			explained := 0
			c := dial(t, 0x207, Options{Explain: func(err error) error { explained++; return err }}, func(f *fake) {
				// Read whatever arrives; the client must not finish
				// the request.
				io.Copy(io.Discard, f.in)
			})
			err := c.AddToStoreNar(tc.info, tc.nar)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want %q", err, tc.want)
			}
			var se *StreamError
			if errors.As(err, &se) || explained != 0 {
				t.Errorf("a local failure was reported as a stream error: %v", err)
			}
			if c.Err() != err {
				t.Errorf("Conn not broken: %v", c.Err())
			}
		})
	}
}

type iotestErrReader struct{}

func (iotestErrReader) Read([]byte) (int, error) { return 0, errors.New("reader exploded") }

func TestImportPathsChecks(t *testing.T) {
	good := fileNAR(t, "hello\n")
	for _, tc := range []struct {
		name string
		item ExportItem
		want string
	}{
		{"size mismatch", ExportItem{Info: PathInfo{Path: pathA, NarSize: 8}, NAR: bytes.NewReader(good)},
			fmt.Sprintf("serveproto: ImportPaths: item 0 (%s): NAR is %d bytes, NarSize says 8", pathA, len(good))},
		{"hash mismatch", ExportItem{Info: PathInfo{Path: pathA, NarHash: sampleNARHash}, NAR: bytes.NewReader(good)},
			"narHash mismatch"},
		{"invalid NAR", ExportItem{Info: PathInfo{Path: pathA}, NAR: strings.NewReader("nope")}, "item 0 (/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a): NAR: nar:"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cr, sw := io.Pipe()
			sr, cw := io.Pipe()
			received := make(chan []byte)
			go func() {
				io.ReadFull(sr, make([]byte, len(greetingRequest)))
				sw.Write(new(wb).u(0x5452eecb, 0x207).b())
				b, _ := io.ReadAll(sr)
				received <- b
			}()
			c, err := Handshake(cr, cw, Options{})
			if err != nil {
				t.Fatal(err)
			}
			err = c.ImportPaths([]ExportItem{tc.item})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want %q", err, tc.want)
			}
			if c.Err() != err {
				t.Errorf("Conn not broken")
			}
			// Closing the transport is what the caller does next; the
			// path's metadata must not have been sent.
			cw.Close()
			cr.Close()
			if bytes.Contains(<-received, new(wb).u(0x4558494e).b()) {
				t.Errorf("metadata of a mismatching path was sent")
			}
		})
	}
}

func TestDumpStorePathWriterFails(t *testing.T) {
	narBytes := sampleNAR(t)
	c := dial(t, 0x207, Options{}, exchange(new(wb).u(3).s(pathA).b(), narBytes))
	_, err := c.DumpStorePath(pathA, failWriter{})
	if err == nil || !strings.Contains(err.Error(), "writing the NAR: disk full") {
		t.Fatalf("got %v", err)
	}
	var se *StreamError
	var pe *ProtocolError
	if errors.As(err, &se) || errors.As(err, &pe) {
		t.Errorf("local failure reported as %T", err)
	}
	if c.Err() != err {
		t.Error("Conn not broken")
	}
}

type failWriter struct{}

func (failWriter) Write([]byte) (int, error) { return 0, errors.New("disk full") }

// NAR limits apply to DumpStorePath: a file claiming 2^60 bytes is an error.
func TestDumpStorePathHugeFile(t *testing.T) {
	reply := new(wb).s("nix-archive-1", "(", "type", "regular", "contents").u(1 << 60).b()
	c := dial(t, 0x207, Options{}, exchange(new(wb).u(3).s(pathA).b(), reply))
	_, err := c.DumpStorePath(pathA, io.Discard)
	var pe *ProtocolError
	var ne *nar.Error
	if !errors.As(err, &pe) || !errors.As(err, &ne) {
		t.Fatalf("got %T %v", err, err)
	}
}

func TestClose(t *testing.T) {
	c := dial(t, 0x207, Options{}, func(f *fake) {})
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.QueryValidPaths([]string{pathA}, false, false); err != ErrClosed {
		t.Errorf("got %v, want ErrClosed", err)
	}
	if c.Err() != ErrClosed {
		t.Errorf("Err() = %v", c.Err())
	}
}

func TestBuildStatus(t *testing.T) {
	for s := BuildStatus(0); s <= 15; s++ {
		want := s == 0 || s == 1 || s == 2 || s == 13
		if s.Success() != want {
			t.Errorf("%v.Success() = %v", s, !want)
		}
	}
	if Built.String() != "Built" || NoSubstituters.String() != "NoSubstituters" || BuildStatus(15).String() != "BuildStatus(15)" {
		t.Error("String")
	}
}

func TestExplainNilKeepsError(t *testing.T) {
	c := dial(t, 0x207, Options{Explain: func(error) error { return nil }}, exchange(new(wb).u(7, 0).list(pathA).b(), nil))
	_, err := c.QueryClosure([]string{pathA}, false)
	var se *StreamError
	if !errors.As(err, &se) {
		t.Fatalf("got %v", err)
	}
}

// A NAR source that fails mid-request (an input streamed from another
// machine, whose own session broke) breaks the Conn with the source's
// error, and is not explained as this machine's: the machine is alive and
// waiting for the rest, so Explain would wait for nothing.
func TestRequestSourceFails(t *testing.T) {
	cr, sw := io.Pipe()
	sr, cw := io.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f := &fake{t: t, in: sr, out: sw}
		if f.expect("greeting", greetingRequest) {
			f.send(new(wb).u(0x5452eecb, 0x207).b())
		}
		io.Copy(io.Discard, sr) // waits for the rest of the NAR, as nix-store does
	}()
	defer func() { cw.Close(); cr.Close(); <-done }()
	explained := 0
	c, err := Handshake(cr, cw, Options{Explain: func(err error) error { explained++; return err }})
	if err != nil {
		t.Fatal(err)
	}
	narBytes := fileNAR(t, "x")
	info := PathInfo{Path: pathA, NarSize: uint64(len(narBytes)), NarHash: "sha256:" + hexSHA256(narBytes)}
	other := &StreamError{Op: "DumpStorePath", Err: io.ErrUnexpectedEOF} // the holder's
	err = c.AddToStoreNar(info, io.MultiReader(bytes.NewReader(narBytes[:len(narBytes)/2]), iotest.ErrReader(other)))
	if !errors.Is(err, other) || explained != 0 {
		t.Fatalf("got %v (explained %d), want the source's error, unexplained", err, explained)
	}
	if _, err2 := c.QueryValidPaths([]string{pathA}, false, false); err2 != err || c.Err() != err {
		t.Errorf("after a failed request: %v, Err() %v; want the Conn broken with %v", err2, c.Err(), err)
	}
}
