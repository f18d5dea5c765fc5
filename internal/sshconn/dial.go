package sshconn

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"strings"
	"sync"
	"time"
	"unicode"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/agent"

	"github.com/nix-offload/nix-offload/internal/smallfile"
)

// DefaultKeepAlive is the interval between keepalive requests. A connection
// whose peer misses keepAliveMissed answers in a row is closed.
const (
	DefaultKeepAlive = 15 * time.Second
	keepAliveMissed  = 3
)

// Client is a verified, authenticated SSH connection to one machine.
type Client struct {
	*ssh.Client
	Target  Target
	HostKey ssh.PublicKey // the host key that was verified

	closeOnce sync.Once
	done      chan struct{}
	lost      error // why keepAlive closed the connection; set before done is closed
}

// ConnectError means the machine could not be reached or refused us before
// any session ran: the TCP connection, the SSH handshake or authentication
// failed. The scheduler treats it as "try another machine".
type ConnectError struct {
	Name, Addr string
	Err        error
}

func (e *ConnectError) Error() string {
	if strings.Contains(e.Name, e.Addr) {
		return fmt.Sprintf("ssh: cannot connect to %s: %v", e.Name, e.Err)
	}
	return fmt.Sprintf("ssh: cannot connect to %s (%s): %v", e.Name, e.Addr, e.Err)
}
func (e *ConnectError) Unwrap() error { return e.Err }

// AuthError is a machine that refused every key we offered: it will not
// let us in until its authorized_keys or our ssh-key changes. It comes
// wrapped in a [*ConnectError].
type AuthError struct {
	User string
	Err  error
}

func (e *AuthError) Error() string { return e.Err.Error() }
func (e *AuthError) Unwrap() error { return e.Err }

// Dial connects to t, verifies its host key and authenticates. ctx bounds the
// whole attempt in addition to t.ConnectTimeout; once Dial returns, ctx no
// longer matters: Close the client to end it.
func Dial(ctx context.Context, t Target) (*Client, error) {
	var hkErr *HostKeyError
	policy, err := newHostKeyPolicy(t, &hkErr)
	if err != nil {
		return nil, err
	}
	auth, closeAgent, err := authMethods(t)
	if err != nil {
		return nil, err
	}
	defer closeAgent()

	timeout := t.ConnectTimeout
	if timeout <= 0 {
		timeout = DefaultConnectTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	d := net.Dialer{KeepAlive: DefaultKeepAlive}
	conn, err := d.DialContext(ctx, "tcp", t.Addr)
	if err != nil {
		return nil, &ConnectError{Name: t.Name, Addr: t.Addr, Err: unwrapOp(err)}
	}
	// The handshake has no context of its own: closing the socket when ctx
	// ends is what bounds it.
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	cfg := &ssh.ClientConfig{
		User:              t.User,
		Auth:              auth,
		HostKeyCallback:   policy.callback,
		HostKeyAlgorithms: policy.algorithms,
		Timeout:           timeout,
	}
	var verified ssh.PublicKey
	inner := cfg.HostKeyCallback
	cfg.HostKeyCallback = func(h string, a net.Addr, k ssh.PublicKey) error {
		if err := inner(h, a, k); err != nil {
			return err
		}
		verified = k
		return nil
	}
	c, chans, reqs, err := ssh.NewClientConn(conn, t.Addr, cfg)
	if !stop() {
		if c != nil {
			c.Close()
		}
		conn.Close()
		if hkErr != nil {
			return nil, hkErr
		}
		cause := ctx.Err()
		if errors.Is(cause, context.DeadlineExceeded) {
			cause = fmt.Errorf("no SSH handshake within %v", timeout)
		}
		return nil, &ConnectError{Name: t.Name, Addr: t.Addr, Err: cause}
	}
	if err != nil {
		conn.Close()
		if hkErr != nil {
			return nil, hkErr
		}
		// x/crypto/ssh has no type for a refused login, only these words
		// (client_auth.go); this is the one place that reads them.
		if strings.Contains(err.Error(), "unable to authenticate") {
			err = &AuthError{User: t.User, Err: err}
		}
		return nil, &ConnectError{Name: t.Name, Addr: t.Addr, Err: err}
	}
	cl := &Client{Client: ssh.NewClient(c, chans, reqs), Target: t, HostKey: verified, done: make(chan struct{})}
	go cl.keepAlive()
	return cl, nil
}

// Lost says why the connection was closed for a peer that stopped answering
// keepalives, or returns nil (the connection is open, was closed by Close, or
// was broken by the peer). Sessions on a lost connection only see it end:
// this is the reason to put in their error, for the user.
func (c *Client) Lost() error {
	select {
	case <-c.done:
		return c.lost
	default:
		return nil
	}
}

// Close closes the connection and every session on it.
func (c *Client) Close() error {
	var err error
	c.closeOnce.Do(func() {
		close(c.done)
		err = c.Client.Close()
	})
	return err
}

// Output runs a short command on the machine and returns its stdout. A
// non-zero exit includes the command's stderr in the error. When ctx ends
// first, the whole connection is closed: sshd would keep a forced command's
// channel open until the command exits.
func (c *Client) Output(ctx context.Context, cmd string) ([]byte, error) {
	s, err := c.NewSession()
	if err != nil {
		return nil, fmt.Errorf("ssh: %s: new session: %w", c.Target.Name, err)
	}
	defer s.Close()
	var stdout, stderr bytes.Buffer
	s.Stdout, s.Stderr = &stdout, &stderr
	// Closing the session is not enough: sshd keeps a forced command's
	// channel open until the command exits. ctx ending ends the connection.
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	if err := s.Run(cmd); err != nil {
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		if msg := bytes.TrimSpace(stderr.Bytes()); len(msg) > 0 {
			return stdout.Bytes(), fmt.Errorf("%s: %q: %w: %s", c.Target.Name, cmd, err, firstLines(msg, 3))
		}
		return stdout.Bytes(), fmt.Errorf("%s: %q: %w", c.Target.Name, cmd, err)
	}
	return stdout.Bytes(), nil
}

// keepAlive closes the client when the peer stops answering keepalives, so
// sessions blocked on a dead link fail instead of hanging.
func (c *Client) keepAlive() {
	interval := c.Target.KeepAlive
	if interval <= 0 {
		interval = DefaultKeepAlive
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	missed := 0
	for {
		select {
		case <-c.done:
			return
		case <-tick.C:
		}
		answered := make(chan error, 1)
		go func() {
			_, _, err := c.SendRequest("keepalive@openssh.com", true, nil)
			answered <- err
		}()
		select {
		case <-c.done:
			return
		case err := <-answered:
			if err != nil {
				c.Close()
				return
			}
			missed = 0
		case <-time.After(interval):
			missed++
			if missed >= keepAliveMissed {
				c.closeOnce.Do(func() {
					c.lost = fmt.Errorf("ssh: %s stopped answering: no reply to %d keepalives in %v", c.Target.Name, keepAliveMissed, keepAliveMissed*interval)
					close(c.done)
					c.Client.Close()
				})
				return
			}
		}
	}
}

// authMethods loads the target's private keys and, when SSH_AUTH_SOCK is
// set, asks ssh-agent for its keys. The returned func closes the agent
// connection.
func authMethods(t Target) ([]ssh.AuthMethod, func(), error) {
	var signers []ssh.Signer
	var encrypted []string
	for _, f := range t.KeyFiles {
		if !plausibleKeyPath(f) {
			// Opening it would echo it, key and all, in the "no such file" error.
			return nil, func() {}, fmt.Errorf("ssh: %s: ssh-key holds a private key or control characters, not a file name (not shown)", t.Name)
		}
		data, err := readKeyFile(f)
		if err != nil {
			if !t.KeyFilesStrict && errors.Is(err, fs.ErrNotExist) {
				continue
			}
			return nil, func() {}, fmt.Errorf("ssh: %s: ssh-key: %w", t.Name, err)
		}
		s, err := ssh.ParsePrivateKey(data)
		var pm *ssh.PassphraseMissingError
		switch {
		case errors.As(err, &pm):
			encrypted = append(encrypted, f)
			continue
		case err != nil:
			// The parser's message never includes key bytes.
			return nil, func() {}, fmt.Errorf("ssh: %s: ssh-key %s: %v", t.Name, f, err)
		}
		signers = append(signers, s)
	}
	methods := []ssh.AuthMethod{}
	if len(signers) > 0 {
		methods = append(methods, ssh.PublicKeys(signers...))
	}
	closeAgent := func() {}
	if sock := os.Getenv("SSH_AUTH_SOCK"); sock != "" {
		if conn, err := net.Dial("unix", sock); err == nil {
			methods = append(methods, ssh.PublicKeysCallback(agent.NewClient(conn).Signers))
			closeAgent = func() { conn.Close() }
		}
	}
	if len(methods) == 0 {
		if len(encrypted) > 0 {
			return nil, closeAgent, fmt.Errorf("ssh: %s: key %s is encrypted; load it into ssh-agent (SSH_AUTH_SOCK)", t.Name, encrypted[0])
		}
		return nil, closeAgent, fmt.Errorf("ssh: %s: no private key: set ssh-key, IdentityFile in ssh_config, or run ssh-agent", t.Name)
	}
	return methods, closeAgent, nil
}

// maxKeyFileSize bounds a private key file; OpenSSH's largest keys (RSA 16384) take under
// 13 KiB.
const maxKeyFileSize = 1 << 20

// readKeyFile reads a private key file. It must be a regular file of at most maxKeyFileSize
// bytes, so that a path such as /dev/stdin (in hook mode, Nix's protocol stream), a FIFO or
// /dev/zero is an error rather than a hang or a read of someone else's data.
func readKeyFile(name string) ([]byte, error) { return smallfile.Read(name, maxKeyFileSize) }

// plausibleKeyPath reports whether a key file setting can be shown in messages: a private key
// pasted in its place (which package machines refuses in configurations) cannot.
func plausibleKeyPath(s string) bool {
	return !strings.Contains(s, "PRIVATE KEY") && !strings.ContainsFunc(s, unicode.IsControl)
}

// unwrapOp shortens "dial tcp 127.0.0.1:22: connect: connection refused" to
// "connection refused": ConnectError already names the address.
func unwrapOp(err error) error {
	var op *net.OpError
	if errors.As(err, &op) && op.Err != nil {
		var sys *os.SyscallError
		if errors.As(op.Err, &sys) {
			return sys.Err
		}
		return op.Err
	}
	return err
}

func firstLines(b []byte, n int) string {
	lines := bytes.SplitN(b, []byte("\n"), n+1)
	if len(lines) > n {
		lines = lines[:n]
	}
	return string(bytes.Join(lines, []byte("; ")))
}
