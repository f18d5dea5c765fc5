package offload_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/offload"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/servetest"
	"github.com/nix-offload/nix-offload/internal/sshconn"
	"github.com/nix-offload/nix-offload/internal/transport"
)

// The hostile machine behind a real SSH server (x/crypto/ssh on
// 127.0.0.1, host key pinned), reached through the stack the hook uses:
// sshconn.Dial, transport.SSH with the serve command, serveproto.Handshake
// with the session's Explain, offload.Run, localstore.

// runSSH connects to s as the hook does and runs the build; when ctx ends,
// the session is closed, as the hook does.
func (e *env) runSSH(t *testing.T, ctx context.Context, s *servetest.SSHServer) error {
	t.Helper()
	client, err := sshconn.Dial(ctx, s.Target(machine))
	if err != nil {
		return err
	}
	defer client.Close()
	sess, err := transport.SSH(client.Client, transport.ServeCommand("", ""), transport.Options{Name: machine})
	if err != nil {
		return err
	}
	defer sess.Close()
	stop := context.AfterFunc(ctx, func() { sess.Close() })
	defer stop()
	conn, err := serveproto.Handshake(sess.Stdout(), sess.Stdin(), serveproto.Options{Explain: sess.Explain})
	if err != nil {
		return err
	}
	return offload.Run(ctx, conn, e.store, e.job, offload.Events{Building: sess.StderrIsLog})
}

func TestHostileMachineOverSSH(t *testing.T) {
	fetch := "copying outputs of '" + drvPath + "' from '" + machine + "'"
	for _, tc := range []struct {
		name   string
		setup  func(e *env)
		want   []string
		stall  bool
		noConn bool // the failure comes before offload.Run
	}{
		{name: "garbage instead of the greeting", noConn: true, setup: func(e *env) {
			e.srv.Tamper = func(r *servetest.Reply) {
				if r.Op == servetest.Handshake {
					r.Bytes, r.After = []byte("This account is currently not available.\n"), servetest.Hangup
				}
			}
		}, want: []string{"Handshake reply: magic: the server did not speak the serve protocol", `got "This account is currently not available.\n"`}},
		{name: "wrong narHash", setup: func(e *env) {
			e.srv.Build = func(req servetest.BuildRequest) servetest.BuildReply {
				r := servetest.DefaultBuild(req)
				o := r.Outputs["out"]
				o.Info.NarHash = "sha256:1w03pr4qg0b90iyafwig798pf1qjm8bfj4vlb1n9jpbcc8vz7ihd"
				r.Outputs["out"] = o
				return r
			}
		}, want: []string{fetch, outPath, "hash mismatch", "but the machine reported sha256:1w03pr4qg0b90iyafwig798pf1qjm8bfj4vlb1n9jpbcc8vz7ihd"}},
		{name: "stream truncated in the NAR", setup: func(e *env) {
			e.srv.Tamper = func(r *servetest.Reply) {
				if r.Op == servetest.DumpStorePath {
					r.Bytes, r.After = r.Bytes[:50], servetest.Hangup
					r.Stderr = "error: writing to file: Broken pipe\n"
				}
			}
		}, want: []string{fetch, outPath, "fetching the NAR", machine + ": nix-store --serve: error: writing to file: Broken pipe (exit status 1)"}},
		{name: "silent during the build", stall: true, setup: func(e *env) {
			e.srv.Tamper = func(r *servetest.Reply) {
				if r.Op == servetest.BuildDerivation {
					r.Bytes, r.After = nil, servetest.Stall
				}
			}
		}, want: []string{"build of '" + drvPath + "' on '" + machine + "' stopped", "context canceled"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			tc.setup(e)
			stalled := make(chan servetest.Op, 1)
			e.srv.Stalled = stalled
			s := servetest.StartSSH(t, e.srv)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if tc.stall {
				go func() {
					select {
					case <-stalled:
						time.Sleep(100 * time.Millisecond)
						cancel()
					case <-ctx.Done():
					}
				}()
			}
			start := time.Now()
			done := make(chan error, 1)
			go func() { done <- e.runSSH(t, ctx, s) }()
			var err error
			select {
			case err = <-done:
			case <-time.After(caseBound):
				cancel()
				t.Fatalf("still running after %v", caseBound)
			}
			if err == nil {
				t.Fatal("accepted")
			}
			t.Logf("%v: %v", time.Since(start).Round(time.Millisecond), err)
			want := tc.want
			if !tc.noConn {
				want = append(want, "'"+machine+"'")
			}
			for _, w := range want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error does not contain %q", w)
				}
			}
			var se *serveproto.StreamError
			if tc.noConn && errors.As(err, &se) {
				t.Errorf("garbage reported as a stream failure: %v", err)
			}
			if got := s.Commands(); len(got) != 1 || got[0] != servetest.ServeCommand {
				t.Errorf("commands run on the machine: %q", got)
			}
			e.checkNothingValid(t)
		})
	}
}

// The same stack against an honest fake: the output becomes valid.
func TestHonestMachineOverSSH(t *testing.T) {
	e := newEnv(t)
	s := servetest.StartSSH(t, e.srv)
	if err := e.runSSH(t, context.Background(), s); err != nil {
		t.Fatal(err)
	}
	if !e.local.Valid(t, outPath) {
		t.Errorf("%s is not valid", outPath)
	}
}
