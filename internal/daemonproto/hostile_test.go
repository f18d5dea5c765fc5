package daemonproto

import (
	"bytes"
	"context"
	"errors"
	"io"
	"slices"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/servetest"
	"github.com/nix-offload/nix-offload/internal/transport"
)

// The hostile cases of the serve protocol, against the worker protocol:
// a scriptable daemon (servetest.Server.ServeDaemon) over real pipes,
// honest first, then lying, flooding, cutting off and going silent.

func dialFake(t *testing.T, srv *servetest.Server) (*Conn, *servetest.PipeSession, *logRecorder, error) {
	t.Helper()
	ps := srv.PipeDaemon(t, "fake")
	log := &logRecorder{}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Handshake(ctx, ps.R, ps.W, Options{Log: log.log, Abort: func() { ps.Close() }, Explain: ps.Explain})
	return c, ps, log, err
}

func mustDial(t *testing.T, srv *servetest.Server) (*Conn, *servetest.PipeSession, *logRecorder) {
	t.Helper()
	c, ps, log, err := dialFake(t, srv)
	if err != nil {
		t.Fatal(err)
	}
	return c, ps, log
}

func bg(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// The fake answers every operation as a daemon of each version does.
func TestFakeHonest(t *testing.T) {
	for _, v := range []Version{1<<8 | 34, 1<<8 | 35, 1<<8 | 37, 1<<8 | 38} {
		t.Run(v.String(), func(t *testing.T) {
			srv := &servetest.Server{DaemonVersion: uint64(v), Trust: 1, NixVersion: "2.99.1"}
			c, _, log := mustDial(t, srv)
			ctx := bg(t)
			if c.Version() != v || c.NixVersion() != "2.99.1" {
				t.Errorf("version %s, Nix %q", c.Version(), c.NixVersion())
			}
			if want := map[bool]Trust{true: Trusted, false: TrustUnknown}[v.Minor() >= 35]; c.Trust() != want {
				t.Errorf("trust %v, want %v", c.Trust(), want)
			}
			err := c.SetOptions(ctx, Settings{MaxSilentTime: 1500 * time.Millisecond, BuildTimeout: time.Hour, MaxLogSize: 4096, KeepFailed: true, UseSubstitutes: true})
			if err != nil {
				t.Fatal(err)
			}
			got := srv.SettingsSent()
			want := servetest.DaemonSettings{KeepFailed: true, MaxSilentTime: 2, UseSubstitutes: true,
				Overrides: map[string]string{"timeout": "3600", "max-build-log-size": "4096"}}
			if len(got) != 1 || got[0].KeepFailed != want.KeepFailed || got[0].MaxSilentTime != 2 || !got[0].UseSubstitutes ||
				got[0].Overrides["timeout"] != "3600" || got[0].Overrides["max-build-log-size"] != "4096" || len(got[0].Overrides) != 2 {
				t.Errorf("settings %+v, want %+v", got, want)
			}

			infoA, narA := sourcePath(t, "fake-a", "a\n")
			if err := c.AddMultipleToStore(ctx, []Item{{Info: infoA, NAR: bytes.NewReader(narA)}}, true); err != nil {
				t.Fatal(err)
			}
			valid, err := c.QueryValidPaths(ctx, []string{infoA.Path, fakePath("nope")}, true)
			if err != nil || !slices.Equal(valid, []string{infoA.Path}) {
				t.Fatalf("valid %q, %v", valid, err)
			}
			drvPath, drv := shDerivation("x86_64-linux", "fake-hi", "echo hi > $out", infoA.Path)
			srv.Build = func(req servetest.BuildRequest) servetest.BuildReply {
				r := servetest.DefaultBuild(req)
				r.Log = "line one\nline two\n"
				return r
			}
			res, err := c.BuildDerivation(ctx, drvPath, drv, BuildNormal)
			if err != nil || res.Status != serveproto.Built {
				t.Fatalf("%+v, %v", res, err)
			}
			if (res.CPUUser != nil) != (v.Minor() >= 37) || res.CPUSystem != nil {
				t.Errorf("cpu times %v %v", res.CPUUser, res.CPUSystem)
			}
			if lines := log.lines(); !slices.Equal(lines, []string{"line one", "line two"}) {
				t.Errorf("log lines %q", lines)
			}
			out := res.BuiltOutputs["out"]
			info, ok, err := c.QueryPathInfo(ctx, out)
			if err != nil || !ok || info.Deriver != drvPath {
				t.Fatalf("%+v, %v, %v", info, ok, err)
			}
			infos, err := c.QueryPathInfos(ctx, []string{fakePath("nope"), out, infoA.Path})
			if err != nil || len(infos) != 2 || infos[0].Path != out || infos[0].NarHash != info.NarHash || infos[1].Path != infoA.Path {
				t.Fatalf("QueryPathInfos: %+v, %v (want %s and %s, the invalid one left out)", infos, err, out, infoA.Path)
			}
			var buf bytes.Buffer
			if _, err := c.NarFromPath(ctx, info, &buf); err != nil {
				t.Fatal(err)
			}
			if p, ok := srv.Lookup(out); !ok || !bytes.Equal(buf.Bytes(), p.NAR) {
				t.Errorf("NAR differs")
			}
		})
	}
}

// checkBroken fails unless err is a ProtocolError or StreamError (want
// says which) and the Conn now returns it for everything.
func checkBroken(t *testing.T, c *Conn, err error, wantProto bool, contains string) {
	t.Helper()
	var pe *ProtocolError
	var se *StreamError
	switch {
	case wantProto && !errors.As(err, &pe):
		t.Fatalf("got %v (%T), want a ProtocolError", err, err)
	case !wantProto && !errors.As(err, &se):
		t.Fatalf("got %v (%T), want a StreamError", err, err)
	}
	if !strings.Contains(err.Error(), contains) {
		t.Errorf("error %q does not say %q", err, contains)
	}
	if _, err2 := c.QueryValidPaths(context.Background(), nil, false); err2 != err {
		t.Errorf("the broken Conn returned %v", err2)
	}
}

func TestHostileGreeting(t *testing.T) {
	for _, tc := range []struct {
		name   string
		tamper func(*servetest.Reply)
		want   string
	}{
		{"login banner", func(r *servetest.Reply) {
			if r.Op == servetest.Handshake {
				r.Bytes, r.After = []byte("Welcome to builder1!\nThis account is currently not available.\n"), servetest.Hangup
			}
		}, `did not speak the daemon protocol; got "Welcome to builder1!\nThis account is currently not available.\n"`},
		{"serve protocol instead", func(r *servetest.Reply) {
			if r.Op == servetest.Handshake {
				r.Bytes = new(servetest.Enc).U64(0x5452eecb, 0x207).Bytes()
			}
		}, "did not speak the daemon protocol"},
		{"too old", func(r *servetest.Reply) {
			if r.Op == servetest.Handshake {
				r.Bytes = new(servetest.Enc).U64(workerMagic2, 1<<8|33).Bytes()
			}
		}, "version 1.33 (0x121): not supported by the daemon's protocol version"},
		{"major 2", func(r *servetest.Reply) {
			if r.Op == servetest.Handshake {
				r.Bytes = new(servetest.Enc).U64(workerMagic2, 2<<8|1).Bytes()
			}
		}, "version 2.1"},
		{"absurd feature count", func(r *servetest.Reply) {
			if r.Op == servetest.Handshake && len(r.Bytes) == 8 {
				r.Bytes = new(servetest.Enc).U64(1 << 62).Bytes()
			}
		}, "features: count: 4611686018427387904 exceeds 1024"},
		{"absurd version string", func(r *servetest.Reply) {
			if r.Op == servetest.DaemonHello {
				r.Bytes = new(servetest.Enc).U64(1 << 60).Bytes()
			}
		}, "nix version: length 1152921504606846976 exceeds 1024"},
		{"trust 3", func(r *servetest.Reply) {
			if r.Op == servetest.DaemonHello {
				r.Bytes = slices.Concat(new(servetest.Enc).Str("2.34.8").U64(3).Bytes(), servetest.LogLast())
			}
		}, "trust: value 3 exceeds 2"},
		{"cut in the hello", func(r *servetest.Reply) {
			if r.Op == servetest.DaemonHello {
				r.Bytes, r.After = r.Bytes[:5], servetest.Hangup
			}
		}, "unexpected EOF"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := &servetest.Server{Tamper: tc.tamper}
			_, _, _, err := dialFake(t, srv)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want it to say %q", err, tc.want)
			}
			t.Logf("%v", err)
		})
	}
}

// Silence instead of the greeting ends at the deadline, by closing the
// transport, and says so.
func TestHostileSilentGreeting(t *testing.T) {
	for _, op := range []servetest.Op{servetest.Handshake, servetest.DaemonHello} {
		t.Run(op.String(), func(t *testing.T) {
			srv := &servetest.Server{Tamper: func(r *servetest.Reply) {
				if r.Op == op {
					r.Bytes, r.After = nil, servetest.Stall
				}
			}}
			ps := srv.PipeDaemon(t, "silent")
			start := time.Now()
			_, err := HandshakeWithin(context.Background(), 200*time.Millisecond, ps.R, ps.W, Options{Abort: func() { ps.Close() }})
			var ng *NoGreetingError
			if !errors.As(err, &ng) {
				t.Fatalf("got %v (%T), want a NoGreetingError", err, err)
			}
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("took %v", d)
			}
			t.Logf("%v", err)
		})
	}
}

// tamperOp replaces the reply to op.
func tamperOp(op servetest.Op, f func(r *servetest.Reply)) func(*servetest.Reply) {
	return func(r *servetest.Reply) {
		if r.Op == op {
			f(r)
		}
	}
}

// afterLog is a reply: an empty log, then payload.
func afterLog(payload []byte) []byte { return slices.Concat(servetest.LogLast(), payload) }

func TestHostileReplies(t *testing.T) {
	infoA, narA := sourcePath(t, "hostile-a", "a\n")
	enc := func() *servetest.Enc { return new(servetest.Enc) }
	for _, tc := range []struct {
		name   string
		op     servetest.Op
		bytes  []byte
		after  servetest.After
		proto  bool
		want   string
		remote bool // a RemoteError; the Conn stays usable
	}{
		{name: "absurd path count", op: servetest.WorkerQueryValidPaths, bytes: afterLog(enc().U64(1 << 62).Bytes()),
			proto: true, want: "QueryValidPaths reply: count: 4611686018427387904 exceeds 1048576"},
		{name: "path not asked about", op: servetest.WorkerQueryValidPaths, bytes: afterLog(enc().Strs([]string{fakePath("other")}).Bytes()),
			proto: true, want: "was not asked about"},
		{name: "path too long", op: servetest.WorkerQueryValidPaths, bytes: afterLog(enc().U64(1).U64(9000).Bytes()),
			proto: true, want: "path 0: length 9000 exceeds 255"},
		{name: "absurd log line", op: servetest.WorkerQueryValidPaths, bytes: enc().U64(servetest.StderrNext, 1<<60).Bytes(),
			proto: true, want: "stderr 0: NEXT: length 1152921504606846976 exceeds 1048576"},
		{name: "absurd field count", op: servetest.WorkerQueryValidPaths, bytes: enc().U64(servetest.StderrResult, 1, 101, 1<<62).Bytes(),
			proto: true, want: "RESULT: fields: count: 4611686018427387904 exceeds 64"},
		{name: "bad field type", op: servetest.WorkerQueryValidPaths, bytes: enc().U64(servetest.StderrResult, 1, 101, 1, 7).Bytes(),
			proto: true, want: "unknown field type 7"},
		{name: "absurd trace count", op: servetest.WorkerQueryValidPaths,
			bytes: enc().U64(servetest.StderrError).Str("Error").U64(0).Str("Error", "boom").U64(0, 1<<62).Bytes(),
			proto: true, want: "traces: count: 4611686018427387904 exceeds 1024"},
		{name: "STDERR_READ", op: servetest.WorkerQueryValidPaths, bytes: enc().U64(servetest.StderrRead, 4096).Bytes(),
			proto: true, want: "asked for data (STDERR_READ)"},
		{name: "STDERR_WRITE", op: servetest.WorkerQueryValidPaths, bytes: enc().U64(servetest.StderrWrite).Str("x").Bytes(),
			proto: true, want: "sent data for a sink (STDERR_WRITE)"},
		{name: "unknown log message", op: servetest.WorkerQueryValidPaths, bytes: enc().U64(0xdeadbeef).Bytes(),
			proto: true, want: "unknown log message type 0xdeadbeef"},
		{name: "cut in the log", op: servetest.WorkerQueryValidPaths, bytes: enc().U64(servetest.StderrNext, 20).Raw([]byte("only")).Bytes(),
			after: servetest.Hangup, want: "unexpected EOF"},
		{name: "cut after the log", op: servetest.WorkerQueryValidPaths, bytes: servetest.LogLast(),
			after: servetest.Hangup, want: "unexpected EOF"},
		{name: "in-band error", op: servetest.WorkerQueryValidPaths, bytes: servetest.LogError("\x1b[31;1merror:\x1b[0m disk on fire"),
			remote: true, want: "QueryValidPaths: the daemon reported: disk on fire"},
		{name: "narHash not a hash", op: servetest.WorkerQueryPathInfo,
			bytes: afterLog(enc().U64(1).Str("", "zzz").U64(0, 1, 8, 0, 0).Str("").Bytes()),
			proto: true, want: `narHash: "zzz"`},
		{name: "valid not a bool", op: servetest.WorkerQueryPathInfo, bytes: afterLog(enc().U64(2).Bytes()),
			proto: true, want: "valid: bool value 2 is neither 0 nor 1"},
		{name: "absurd references", op: servetest.WorkerQueryPathInfo,
			bytes: afterLog(enc().U64(1).Str("", strings.Repeat("0", 64)).U64(1 << 62).Bytes()),
			proto: true, want: "references: count: 4611686018427387904 exceeds 1048576"},
		{name: "status 300", op: servetest.WorkerBuildDerivation, bytes: afterLog(enc().U64(300).Bytes()),
			proto: true, want: "status: value 300 exceeds 255"},
		{name: "absurd errorMsg", op: servetest.WorkerBuildDerivation, bytes: afterLog(enc().U64(3, 1<<61).Bytes()),
			proto: true, want: "errorMsg: length 2305843009213693952 exceeds 1048576"},
		{name: "absurd builtOutputs", op: servetest.WorkerBuildDerivation,
			bytes: afterLog(enc().U64(0).Str("").U64(1, 0, 1, 1, 0, 0, 1<<62).Bytes()),
			proto: true, want: "builtOutputs: count: 4611686018427387904 exceeds 4096"},
		{name: "realisation not JSON", op: servetest.WorkerBuildDerivation,
			bytes: afterLog(enc().U64(0).Str("").U64(1, 0, 1, 1, 0, 0, 1).Str("sha256:00!out", "{").Bytes()),
			proto: true, want: "builtOutputs: entry 0"},
		{name: "silence mid-build", op: servetest.WorkerBuildDerivation, bytes: servetest.BuildLog("x", "started\n"),
			after: servetest.Stall, want: "context deadline exceeded"},
		{name: "more results than asked", op: servetest.WorkerBuildPathsWithResults, bytes: afterLog(enc().U64(5).Bytes()),
			proto: true, want: "results: count: 5 exceeds 1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := &servetest.Server{Tamper: tamperOp(tc.op, func(r *servetest.Reply) { r.Bytes, r.After = tc.bytes, tc.after })}
			srv.Add(infoA, narA)
			c, _, _ := mustDial(t, srv)
			ctx := bg(t)
			if tc.after == servetest.Stall {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, 300*time.Millisecond)
				defer cancel()
			}
			var err error
			start := time.Now()
			switch tc.op {
			case servetest.WorkerQueryValidPaths:
				_, err = c.QueryValidPaths(ctx, []string{infoA.Path}, false)
			case servetest.WorkerQueryPathInfo:
				_, _, err = c.QueryPathInfo(ctx, infoA.Path)
			case servetest.WorkerBuildDerivation:
				drvPath, drv := shDerivation("x86_64-linux", "hostile", "true")
				_, err = c.BuildDerivation(ctx, drvPath, drv, BuildNormal)
			case servetest.WorkerBuildPathsWithResults:
				_, err = c.BuildPathsWithResults(ctx, []string{fakePath("x.drv") + "!out"}, BuildNormal)
			}
			if d := time.Since(start); d > 10*time.Second {
				t.Errorf("took %v", d)
			}
			if tc.remote {
				var re *RemoteError
				if !errors.As(err, &re) || err.Error() != "daemonproto: "+tc.want {
					t.Fatalf("got %v (%T), want RemoteError %q", err, err, tc.want)
				}
				if _, ok, err := c.QueryPathInfo(ctx, infoA.Path); err != nil || !ok {
					t.Errorf("after a RemoteError: %v, %v", ok, err)
				}
				return
			}
			checkBroken(t, c, err, tc.proto, tc.want)
			t.Logf("%v", err)
		})
	}
}

// A NAR whose size or hash differs from what QueryPathInfo said is
// caught while it streams; one that runs on past narSize is stopped at
// narSize, not read to its end.
func TestHostileNAR(t *testing.T) {
	infoA, narA := sourcePath(t, "hostile-nar", "contents\n")
	for _, tc := range []struct {
		name string
		nar  []byte
		info func(serveproto.PathInfo) serveproto.PathInfo
		want string
	}{
		{"narHash lie", narA, func(i serveproto.PathInfo) serveproto.PathInfo {
			i.NarHash = "sha256:" + strings.Repeat("0", 52)
			return i
		}, "hash mismatch"},
		{"narSize lie, smaller", narA, func(i serveproto.PathInfo) serveproto.PathInfo { i.NarSize -= 8; return i }, "size"},
		{"narSize lie, larger", narA, func(i serveproto.PathInfo) serveproto.PathInfo { i.NarSize += 8; return i }, "size"},
		{"runs on", servetest.NAR("nix-archive-1", "(", "type", "regular", "contents", servetest.Len(1<<40), []byte("endless…")),
			func(i serveproto.PathInfo) serveproto.PathInfo { return i }, "size"},
		{"entry ..", servetest.NAR("nix-archive-1", "(", "type", "directory", "entry", "(", "name", "..", "node",
			"(", "type", "regular", "contents", "x", ")", ")", ")"), func(i serveproto.PathInfo) serveproto.PathInfo { i.NarSize, i.NarHash = 0, ""; return i }, `".."`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := &servetest.Server{}
			srv.Add(infoA, narA)
			srv.Tamper = tamperOp(servetest.WorkerNarFromPath, func(r *servetest.Reply) { r.Bytes = afterLog(tc.nar) })
			c, _, _ := mustDial(t, srv)
			_, err := c.NarFromPath(bg(t), tc.info(infoA), io.Discard)
			checkBroken(t, c, err, true, tc.want)
			t.Logf("%v", err)
		})
	}
}

// A path the daemon does not have ends its session (as Nix's does); the
// error carries its stderr through Explain.
func TestHostileNarFromPathInvalid(t *testing.T) {
	c, _, _ := mustDial(t, &servetest.Server{})
	info := serveproto.PathInfo{Path: fakePath("gone")}
	_, err := c.NarFromPath(bg(t), info, io.Discard)
	var re *transport.RemoteError
	if !errors.As(err, &re) || !strings.Contains(err.Error(), "is not valid") {
		t.Fatalf("got %v, want the daemon's 'is not valid'", err)
	}
}

// An untrusted user's input-addressed build is declined before anything
// is sent.
func TestUntrustedDecline(t *testing.T) {
	srv := &servetest.Server{Trust: 2}
	c, _, _ := mustDial(t, srv)
	if c.Trust() != NotTrusted {
		t.Fatalf("trust %v", c.Trust())
	}
	drvPath, drv := shDerivation("x86_64-linux", "untrusted", "true")
	_, err := c.BuildDerivation(bg(t), drvPath, drv, BuildNormal)
	var ue *UntrustedError
	if !errors.As(err, &ue) || !errors.Is(err, ErrNotTrusted) {
		t.Fatalf("got %v", err)
	}
	if slices.Contains(srv.Ops(), servetest.WorkerBuildDerivation) {
		t.Errorf("the request was sent: %v", srv.Ops())
	}
	if c.Err() != nil {
		t.Errorf("Conn broken: %v", c.Err())
	}
	// Content-addressed (floating) derivations go through.
	drv.Outputs = map[string]serveproto.DerivationOutput{"out": {HashAlgo: "r:sha256"}}
	res, err := c.BuildDerivation(bg(t), drvPath, drv, BuildNormal)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("CA build on the fake: %+v", res.Status)
}

// A NAR source that fails mid-request (an input read from another
// machine, whose session broke) breaks the Conn with the source's error,
// and is not explained as this daemon's: it is alive, waiting for the
// rest of the stream, and Explain would wait for it to end.
func TestRequestSourceFails(t *testing.T) {
	srv := &servetest.Server{DaemonVersion: 1<<8 | 38, Trust: 1}
	ps := srv.PipeDaemon(t, "fake")
	explained := 0
	c, err := Handshake(bg(t), ps.R, ps.W, Options{Abort: func() { ps.Close() }, Explain: func(err error) error { explained++; return err }})
	if err != nil {
		t.Fatal(err)
	}
	infoA, narA := sourcePath(t, "fake-a", "a\n")
	other := &StreamError{Op: "NarFromPath", Err: io.ErrUnexpectedEOF} // an ssh-ng holder's
	err = c.AddMultipleToStore(bg(t), []Item{{Info: infoA, NAR: io.MultiReader(bytes.NewReader(narA[:len(narA)/2]), iotest.ErrReader(other))}}, true)
	if !errors.Is(err, other) || explained != 0 {
		t.Fatalf("got %v (explained %d), want the source's error, unexplained", err, explained)
	}
	if _, err2 := c.QueryValidPaths(bg(t), []string{infoA.Path}, false); err2 != err || c.Err() != err {
		t.Errorf("after a failed request: %v, Err() %v; want the Conn broken with %v", err2, c.Err(), err)
	}
}
