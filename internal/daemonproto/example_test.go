package daemonproto_test

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/nix-offload/nix-offload/internal/daemonproto"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/servetest"
)

// A build on a machine: the greeting, the limits, the build with its log
// lines as they arrive. The machine here is servetest's fake over pipes;
// a real one is `nix-daemon --stdio` in an SSH session, whose Close is
// the Abort.
func Example() {
	srv := &servetest.Server{Trust: 1, Build: func(req servetest.BuildRequest) servetest.BuildReply {
		r := servetest.DefaultBuild(req)
		r.Log = "compiling\nlinking\n"
		return r
	}}
	// The machine's stdout (r) and stdin (w), as a session gives them.
	r, machineOut := io.Pipe()
	machineIn, w := io.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.ServeDaemon(machineIn, machineOut, io.Discard)
		machineOut.Close()
	}()
	closeSession := func() { w.Close(); r.Close() }
	defer func() { closeSession(); <-done }()

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := daemonproto.Handshake(ctx, r, w, daemonproto.Options{
		Log: func(m daemonproto.Message) {
			if line, ok := m.LogLine(); ok {
				fmt.Println("log:", line) // a hook writes these to fd 4
			}
		},
		Abort: closeSession,
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("protocol", c.Version(), "Nix", c.NixVersion(), "user", c.Trust())
	if err := c.SetOptions(ctx, daemonproto.Settings{MaxSilentTime: time.Hour, BuildTimeout: 4 * time.Hour}); err != nil {
		fmt.Println(err)
		return
	}
	out := "/nix/store/kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk-hello"
	drv := serveproto.BasicDerivation{
		Outputs:  map[string]serveproto.DerivationOutput{"out": {Path: out}},
		Platform: "x86_64-linux", Builder: "/bin/sh", Args: []string{"-c", "echo hi > $out"},
		Env: map[string]string{"out": out},
	}
	res, err := c.BuildDerivation(ctx, "/nix/store/dddddddddddddddddddddddddddddddd-hello.drv", drv, daemonproto.BuildNormal)
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(res.Status, res.BuiltOutputs["out"])
	// Output:
	// protocol 1.38 Nix 2.34.8 user trusted
	// log: compiling
	// log: linking
	// Built /nix/store/kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk-hello
}
