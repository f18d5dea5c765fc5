package servetest

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/nix-offload/nix-offload/internal/sshconn"
	"github.com/nix-offload/nix-offload/internal/transport"
)

// SSHServer is an SSH server on 127.0.0.1 that runs a [Server] for every
// `nix-store --serve --write` it is asked to execute, as a build machine's
// sshd runs nix-store. It has one Ed25519 host key and accepts one client
// key, for the user "root".
type SSHServer struct {
	Addr string // 127.0.0.1:port
	Host string // 127.0.0.1
	Port int
	// HostKey is the host's public key in authorized_keys form, to pin.
	HostKey string
	// ClientKeyFile is the private key the server accepts (unencrypted,
	// OpenSSH PEM).
	ClientKeyFile string

	srv *Server
	ln  net.Listener
	wg  sync.WaitGroup

	mu       sync.Mutex
	commands []string
	conns    map[*ssh.ServerConn]bool
	closed   bool
}

// ServeCommand is the command the client runs on a machine without a
// remote store: transport.ServeCommand("", "").
var ServeCommand = transport.ServeCommand("", "")

// DaemonCommand is the command the client runs on an ssh-ng machine
// without a remote store or program: transport.DaemonCommand("", "").
// The SSH server answers it with [Server.ServeDaemon].
var DaemonCommand = transport.DaemonCommand("", "")

// StartSSH starts an SSH server for srv on 127.0.0.1 on a free port. It is
// closed when the test ends.
func StartSSH(t testing.TB, srv *Server) *SSHServer {
	t.Helper()
	_, hostPriv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	hostSigner, err := ssh.NewSignerFromKey(hostPriv)
	if err != nil {
		t.Fatal(err)
	}
	_, clientPriv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	clientSigner, err := ssh.NewSignerFromKey(clientPriv)
	if err != nil {
		t.Fatal(err)
	}
	block, err := ssh.MarshalPrivateKey(clientPriv, "")
	if err != nil {
		t.Fatal(err)
	}
	keyFile := filepath.Join(t.TempDir(), "id_ed25519")
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(block), 0o600); err != nil {
		t.Fatal(err)
	}
	clientKey := clientSigner.PublicKey().Marshal()
	cfg := &ssh.ServerConfig{
		PublicKeyCallback: func(md ssh.ConnMetadata, k ssh.PublicKey) (*ssh.Permissions, error) {
			if md.User() == "root" && string(k.Marshal()) == string(clientKey) {
				return nil, nil
			}
			return nil, errors.New("servetest: key not authorized")
		},
	}
	cfg.AddHostKey(hostSigner)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().(*net.TCPAddr)
	s := &SSHServer{
		Addr:          addr.String(),
		Host:          addr.IP.String(),
		Port:          addr.Port,
		HostKey:       strings.TrimSpace(string(ssh.MarshalAuthorizedKey(hostSigner.PublicKey()))),
		ClientKeyFile: keyFile,
		srv:           srv,
		ln:            ln,
		conns:         map[*ssh.ServerConn]bool{},
	}
	s.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.wg.Go(func() { s.serveConn(c, cfg) })
		}
	})
	t.Cleanup(s.Close)
	return s
}

// Close stops listening, closes every connection and waits for the
// sessions to end.
func (s *SSHServer) Close() {
	s.mu.Lock()
	s.closed = true
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.ln.Close()
	s.wg.Wait()
}

// Target is what sshconn.Dial needs to reach the server as machine name,
// with the host key pinned.
func (s *SSHServer) Target(name string) sshconn.Target {
	return sshconn.Target{
		Name:           name,
		Addr:           s.Addr,
		User:           "root",
		KeyFiles:       []string{s.ClientKeyFile},
		KeyFilesStrict: true,
		HostKey:        s.HostKey,
		ConnectTimeout: 5 * time.Second,
	}
}

// MachineName is the name the hook gives the machine: "root@host:port".
func (s *SSHServer) MachineName() string {
	return "root@" + net.JoinHostPort(s.Host, strconv.Itoa(s.Port))
}

// Commands returns the commands clients asked to execute, in order.
func (s *SSHServer) Commands() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.commands...)
}

func (s *SSHServer) serveConn(c net.Conn, cfg *ssh.ServerConfig) {
	defer c.Close()
	conn, chans, reqs, err := ssh.NewServerConn(c, cfg)
	if err != nil {
		return
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		conn.Close()
		return
	}
	s.conns[conn] = true
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.conns, conn)
		s.mu.Unlock()
		conn.Close()
	}()
	go ssh.DiscardRequests(reqs) // keepalives are answered false
	var wg sync.WaitGroup
	defer wg.Wait()
	for nc := range chans {
		if nc.ChannelType() != "session" {
			nc.Reject(ssh.UnknownChannelType, "only sessions")
			continue
		}
		ch, chReqs, err := nc.Accept()
		if err != nil {
			continue
		}
		wg.Go(func() { s.serveChannel(ch, chReqs) })
	}
}

// serveChannel runs the first exec request of a session channel.
func (s *SSHServer) serveChannel(ch ssh.Channel, reqs <-chan *ssh.Request) {
	defer ch.Close()
	for req := range reqs {
		if req.Type != "exec" {
			// Signals, env, pty: not needed; a signal is followed by
			// the channel's close anyway.
			req.Reply(false, nil)
			continue
		}
		var cmd struct{ Command string }
		if err := ssh.Unmarshal(req.Payload, &cmd); err != nil {
			req.Reply(false, nil)
			return
		}
		req.Reply(true, nil)
		s.mu.Lock()
		s.commands = append(s.commands, cmd.Command)
		s.mu.Unlock()
		go ssh.DiscardRequests(reqs)

		status := 127
		switch cmd.Command {
		case ServeCommand:
			status = s.srv.Serve(ch, ch, ch.Stderr())
		case DaemonCommand:
			status = s.srv.ServeDaemon(ch, ch, ch.Stderr())
		default:
			fmt.Fprintf(ch.Stderr(), "sh: 1: %s: not found\n", cmd.Command)
		}
		ch.CloseWrite()
		ch.SendRequest("exit-status", false, ssh.Marshal(struct{ Status uint32 }{uint32(status)}))
		return
	}
}
