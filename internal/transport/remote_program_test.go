package transport_test

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/daemonproto"
	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/sshconn"
	"github.com/nix-offload/nix-offload/internal/testbed"
	"github.com/nix-offload/nix-offload/internal/transport"
)

// A machine's remote-program replaces nix-store on the remote: here a
// wrapper in the builder's directory (visible inside its namespace at
// the same path) that leaves a mark and runs the real nix-store, as a
// nix-darwin profile path would.
func TestRemoteProgramServe(t *testing.T) {
	for _, nix := range testbed.All(t) {
		t.Run(nix.Version, func(t *testing.T) {
			t.Parallel()
			b := testbed.StartBuilder(t, nix)
			wrapper := filepath.Join(b.Dir, "bin", "my-nix-store")
			mark := filepath.Join(b.Dir, "wrapper-ran")
			if err := os.MkdirAll(filepath.Dir(wrapper), 0o755); err != nil {
				t.Fatal(err)
			}
			script := "#!/bin/sh\necho \"$@\" > " + mark + "\nexec nix-store \"$@\"\n"
			if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
				t.Fatal(err)
			}
			// From a machines line, as a user writes it.
			ms, err := machines.ParseBuilders("ssh://"+b.User+"@"+b.Addr+":"+itoa(b.Port)+"?remote-program="+wrapper+" x86_64-linux", "", nil)
			if err != nil {
				t.Fatal(err)
			}
			m := ms[0]
			m.SSHKey, m.HostKey = b.ClientKey, b.HostKey
			client, err := sshconn.Dial(context.Background(), sshconn.Resolve(m, nil))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { client.Close() })
			s, err := transport.SSH(client.Client, transport.ServeCommand(m.RemoteProgram, m.RemoteStore), transport.Options{Name: b.Name})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close() })
			c, err := serveproto.HandshakeWithin(context.Background(), 30*time.Second, s.Stdout(), s.Stdin(), serveproto.Options{Explain: s.Explain}, func() { s.Close() })
			if err != nil {
				t.Fatal(err)
			}
			if _, err := c.QueryValidPaths(nil, false, false); err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(mark)
			if err != nil || strings.TrimSpace(string(got)) != "--serve --write" {
				t.Fatalf("the wrapper ran with %q (%v), want \"--serve --write\"", got, err)
			}
		})
	}
}

// The same for ssh-ng: remote-program replaces nix-daemon.
func TestRemoteProgramDaemon(t *testing.T) {
	for _, nix := range testbed.All(t) {
		t.Run(nix.Version, func(t *testing.T) {
			t.Parallel()
			b := testbed.StartBuilder(t, nix)
			wrapper := filepath.Join(b.Dir, "my-nix-daemon")
			mark := filepath.Join(b.Dir, "wrapper-ran")
			script := "#!/bin/sh\necho \"$@\" > " + mark + "\nexec nix-daemon \"$@\"\n"
			if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
				t.Fatal(err)
			}
			ms, err := machines.ParseBuilders("ssh-ng://"+b.User+"@"+b.Addr+":"+itoa(b.Port)+"?remote-program="+wrapper+" x86_64-linux", "", nil)
			if err != nil {
				t.Fatal(err)
			}
			m := ms[0]
			if m.ProtocolOrDefault() != machines.ProtocolSSHNG {
				t.Fatalf("protocol %q", m.Protocol)
			}
			m.SSHKey, m.HostKey = b.ClientKey, b.HostKey
			client, err := sshconn.Dial(context.Background(), sshconn.Resolve(m, nil))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { client.Close() })
			s, err := transport.SSH(client.Client, transport.DaemonCommand(m.RemoteProgram, m.RemoteStore), transport.Options{Name: b.Name, Program: "nix-daemon --stdio"})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close() })
			c, err := daemonproto.HandshakeWithin(context.Background(), 30*time.Second, s.Stdout(), s.Stdin(), daemonproto.Options{Abort: func() { s.Close() }, Explain: s.Explain})
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(c.NixVersion(), nix.Version) {
				t.Errorf("Nix %q", c.NixVersion())
			}
			got, err := os.ReadFile(mark)
			if err != nil || strings.TrimSpace(string(got)) != "--stdio" {
				t.Fatalf("the wrapper ran with %q (%v), want \"--stdio\"", got, err)
			}
		})
	}
}

func itoa(n int) string { return strconv.Itoa(n) }
