package servetest

import (
	"context"
	"crypto/sha256"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/nar"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/sshconn"
	"github.com/nix-offload/nix-offload/internal/transport"
)

func dialPipe(t *testing.T, srv *Server) (*serveproto.Conn, *PipeSession) {
	t.Helper()
	ps := srv.Pipe(t, "fake")
	c, err := serveproto.Handshake(ps.R, ps.W, serveproto.Options{Explain: ps.Explain})
	if err != nil {
		t.Fatal(err)
	}
	return c, ps
}

// The fake answers our client's every operation the way a Nix 2.8 server
// does, for the versions that change the layout.
func TestServerHonest(t *testing.T) {
	for _, version := range []uint64{0x207, 0x206, 0x205, 0x204, 0x202} {
		t.Run(serveproto.Version(version).String(), func(t *testing.T) {
			srv := &Server{Version: version}
			c, ps := dialPipe(t, srv)
			if got := c.ServerVersion(); uint64(got) != version {
				t.Errorf("server version %s", got)
			}
			narA := FileNAR("a\n")
			if version >= 0x205 {
				if err := c.AddToStoreNar(serveproto.PathInfo{Path: pathA, NarHash: hashOf(narA), NarSize: uint64(len(narA))}, strings.NewReader(string(narA))); err != nil {
					t.Fatal(err)
				}
			} else {
				srv.Add(serveproto.PathInfo{Path: pathA}, narA)
			}
			if err := c.ImportPaths([]serveproto.ExportItem{{Info: serveproto.PathInfo{Path: pathB, References: []string{pathA}, Deriver: pathDrv},
				NAR: strings.NewReader(string(dirNAR))}}); err != nil {
				t.Fatal(err)
			}
			valid, err := c.QueryValidPaths([]string{pathC, pathB, pathA}, true, false)
			if err != nil || !slices.Equal(valid, []string{pathA, pathB}) {
				t.Errorf("QueryValidPaths: %q, %v", valid, err)
			}
			infos, err := c.QueryPathInfos([]string{pathB, pathC})
			if err != nil || len(infos) != 1 {
				t.Fatalf("QueryPathInfos: %+v, %v", infos, err)
			}
			if i := infos[0]; i.Path != pathB || i.Deriver != pathDrv || !slices.Equal(i.References, []string{pathA}) ||
				i.NarSize != uint64(len(dirNAR)) || (version >= 0x204) != (i.NarHash == hashOf(dirNAR)) {
				t.Errorf("QueryPathInfos: %+v", i)
			}
			var buf strings.Builder
			if _, err := c.DumpStorePath(pathB, &buf); err != nil || buf.String() != string(dirNAR) {
				t.Errorf("DumpStorePath: %v", err)
			}
			closure, err := c.QueryClosure([]string{pathB}, false)
			if err != nil || !slices.Equal(closure, []string{pathA, pathB}) {
				t.Errorf("QueryClosure: %q, %v", closure, err)
			}
			out := "/nix/store/kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk-out"
			drv := serveproto.BasicDerivation{Outputs: map[string]serveproto.DerivationOutput{"out": {Path: out}},
				InputSrcs: []string{pathB}, Platform: "x86_64-linux", Builder: "/bin/sh", Env: map[string]string{"out": out}}
			res, err := c.BuildDerivation(pathDrv, drv, serveproto.BuildOptions{MaxLogSize: 5, KeepFailed: true})
			if err != nil || res.Status != serveproto.Built {
				t.Fatalf("BuildDerivation: %+v, %v", res, err)
			}
			if version >= 0x206 && res.BuiltOutputs["out"] != out {
				t.Errorf("builtOutputs %v", res.BuiltOutputs)
			}
			if _, ok := srv.Lookup(out); !ok {
				t.Error("the output is not valid after the build")
			}
			drv.InputSrcs = []string{pathC}
			res, err = c.BuildDerivation(pathDrv, drv, serveproto.BuildOptions{})
			if err != nil || res.Status != serveproto.MiscFailure || !strings.Contains(res.ErrorMsg, "dependency '"+pathC+"'") {
				t.Errorf("build with a missing input: %+v, %v", res, err)
			}
			ps.Close()
			if status, stderr := ps.Exit(); status != 0 || stderr != "" {
				t.Errorf("exit %d, stderr %q", status, stderr)
			}
		})
	}
}

func hashOf(b []byte) string {
	return nar.Stats{Size: int64(len(b)), SHA256: sha256.Sum256(b)}.NixHash()
}

// Like Nix, the fake reports an invalid request on stderr and exits 1;
// the client's error carries that text.
func TestServerRejects(t *testing.T) {
	c, ps := dialPipe(t, &Server{})
	_, err := c.DumpStorePath(pathA, io.Discard)
	want := "fake: nix-store --serve: error: path '" + pathA + "' is not valid (exit status 1)"
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("got %v\nwant %q", err, want)
	}
	if status, _ := ps.Exit(); status != 1 {
		t.Errorf("exit %d", status)
	}
}

// A stalled server answers nothing until the client closes its end; then
// the client's blocked read returns.
func TestServerStall(t *testing.T) {
	stalled := make(chan Op, 1)
	srv := &Server{Stalled: stalled, Tamper: func(r *Reply) {
		if r.Op == QueryValidPaths {
			r.Bytes, r.After = nil, Stall
		}
	}}
	c, ps := dialPipe(t, srv)
	done := make(chan error, 1)
	go func() {
		_, err := c.QueryValidPaths([]string{pathA}, false, false)
		done <- err
	}()
	if op := <-stalled; op != QueryValidPaths {
		t.Fatalf("stalled on %v", op)
	}
	select {
	case err := <-done:
		t.Fatalf("returned while the server stalls: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	ps.Close()
	select {
	case err := <-done:
		// The server sees its stdin end and exits, or the read end
		// closes under the read: either way the read fails.
		if err == nil {
			t.Error("no error after close")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("still blocked after the session was closed")
	}
}

// The SSH server runs the fake for `nix-store --serve --write` and refuses
// other commands, through the client's real SSH stack.
func TestSSHServer(t *testing.T) {
	srv := &Server{}
	srv.Add(serveproto.PathInfo{Path: pathA}, FileNAR("a"))
	s := StartSSH(t, srv)
	client, err := sshconn.Dial(context.Background(), s.Target("fakebuilder"))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	sess, err := transport.SSH(client.Client, ServeCommand, transport.Options{Name: "fakebuilder"})
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	c, err := serveproto.Handshake(sess.Stdout(), sess.Stdin(), serveproto.Options{Explain: sess.Explain})
	if err != nil {
		t.Fatal(err)
	}
	if valid, err := c.QueryValidPaths([]string{pathA, pathB}, false, false); err != nil || !slices.Equal(valid, []string{pathA}) {
		t.Errorf("QueryValidPaths: %q, %v", valid, err)
	}
	_, err = c.DumpStorePath(pathB, io.Discard)
	want := "fakebuilder: nix-store --serve: error: path '" + pathB + "' is not valid (exit status 1)"
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("got %v\nwant %q", err, want)
	}
	if _, err := client.Output(context.Background(), "nix-store --version"); err == nil || !strings.Contains(err.Error(), "not found") {
		t.Errorf("another command: %v", err)
	}
	if got := s.Commands(); !slices.Equal(got, []string{ServeCommand, "nix-store --version"}) {
		t.Errorf("commands %q", got)
	}
}
