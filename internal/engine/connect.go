package engine

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	sshconfig "github.com/kevinburke/ssh_config"

	"github.com/nix-offload/nix-offload/internal/daemonproto"
	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/sshconn"
	"github.com/nix-offload/nix-offload/internal/transport"
)

// OpenServe starts the serve command on client and shakes hands with it,
// within timeout. A machine that lets us log in but never greets (a forced
// command, a wedged nix-store) gets its whole connection closed when the
// timeout passes, not just the session: sshd refuses to signal a
// forced-command session, and only the connection's end frees every wait on
// it. This is the one path from a connection to a protocol client; the
// pool, the hook alone and `check` all take it.
func OpenServe(ctx context.Context, client *sshconn.Client, command string, timeout time.Duration, opt transport.Options) (*transport.Session, *serveproto.Conn, error) {
	if timeout <= 0 {
		timeout = sshconn.DefaultConnectTimeout
	}
	sess, err := transport.SSH(client.Client, command, opt)
	if err != nil {
		return nil, nil, err
	}
	conn, err := serveproto.HandshakeWithin(ctx, timeout, sess.Stdout(), sess.Stdin(),
		serveproto.Options{Explain: sess.Explain}, func() { client.Close() })
	if late := (*serveproto.NoGreetingError)(nil); errors.As(err, &late) {
		err = fmt.Errorf("%s: %w", opt.Name, err)
	}
	if err != nil {
		sess.Close()
		return nil, nil, err
	}
	return sess, conn, nil
}

// Connect dials m and opens a serve session on a connection of its own
// (a daemon protocol session for an ssh-ng machine, a [DaemonSession]),
// the hook alone's one-use session; closeConn ends the connection. stderr,
// if not nil, receives the session's stderr before a Gate is set.
func Connect(ctx context.Context, m machines.Machine, stderr io.Writer) (s Session, closeConn func(), err error) {
	target := sshconn.Resolve(m, sshconfig.DefaultUserSettings)
	client, err := sshconn.Dial(ctx, target)
	if err != nil {
		return nil, nil, err
	}
	if m.ProtocolOrDefault() == machines.ProtocolSSHNG {
		ls := &LogSwitch{}
		ls.Set(stderr)
		ts, conn, err := OpenDaemon(ctx, client, transport.DaemonCommand(m.RemoteProgram, m.RemoteStore), target.ConnectTimeout, m.Name(), LogMessages(ls))
		if err != nil {
			client.Close()
			return nil, nil, err
		}
		return &daemonSession{ts: ts, conn: conn, client: client, log: ls}, func() { client.Close() }, nil
	}
	ls := &LogSwitch{}
	ls.Set(stderr)
	sess, conn, err := OpenServe(ctx, client, transport.ServeCommand(m.RemoteProgram, m.RemoteStore), target.ConnectTimeout,
		transport.Options{Name: m.Name(), Stderr: ls})
	if err != nil {
		client.Close()
		return nil, nil, err
	}
	return &sshSession{ts: sess, conn: conn, client: client, log: ls}, func() { client.Close() }, nil
}

// sshSession is a serve session on a connection of its own.
type sshSession struct {
	ts     *transport.Session
	conn   *serveproto.Conn
	client *sshconn.Client
	log    *LogSwitch
}

func (s *sshSession) Conn() *serveproto.Conn { return s.conn }
func (s *sshSession) SetLog(w io.Writer)     { s.log.Set(w) }
func (s *sshSession) StderrIsLog()           { s.ts.StderrIsLog() }
func (s *sshSession) Lost() error            { return s.client.Lost() }
func (s *sshSession) Close()                 { s.ts.Close() }

// LogSwitch is a session's stderr sink for its whole life; its target
// changes per build. It never fails, so the transport never drops it; a
// target that fails is dropped instead.
type LogSwitch struct {
	mu  sync.Mutex
	w   io.Writer                 // guarded by mu
	act func(daemonproto.Message) // guarded by mu
}

// SetActivities sends what follows of a daemon's activities (everything
// [LogMessages] does not write) to f; nil: nowhere. f must not block.
func (l *LogSwitch) SetActivities(f func(daemonproto.Message)) {
	l.mu.Lock()
	l.act = f
	l.mu.Unlock()
}

// activity passes m to the SetActivities target.
func (l *LogSwitch) activity(m daemonproto.Message) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.act != nil {
		l.act(m)
	}
}

func (l *LogSwitch) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.w != nil {
		if _, err := l.w.Write(p); err != nil {
			l.w = nil
		}
	}
	return len(p), nil
}

// Set sends what follows to w; nil: nowhere.
func (l *LogSwitch) Set(w io.Writer) {
	l.mu.Lock()
	l.w = w
	l.mu.Unlock()
}

// ActivitySession is a session whose machine reports activities (an
// ssh-ng one): the engine sends them to Build.Activities while it builds.
type ActivitySession interface {
	SetActivities(f func(daemonproto.Message))
}

// DaemonSession is a Session on an ssh-ng machine: the daemon protocol
// client instead of a serve one (its Conn is nil). The engine builds with
// offload.RunDaemon on a session whose DaemonConn is not nil.
type DaemonSession interface {
	Session
	DaemonConn() *daemonproto.Conn
}

// OpenDaemon starts `nix-daemon --stdio` (command) on client and shakes
// hands with it within timeout, as [OpenServe] does for the serve
// protocol: a machine that never greets, or an operation whose context
// ends, gets its connection closed (pipes have no deadlines, and sshd may
// not signal a forced command). log receives the daemon's log messages
// ([LogMessages] writes them to a build log).
func OpenDaemon(ctx context.Context, client *sshconn.Client, command string, timeout time.Duration, name string, log func(daemonproto.Message)) (*transport.Session, *daemonproto.Conn, error) {
	if timeout <= 0 {
		timeout = sshconn.DefaultConnectTimeout
	}
	sess, err := transport.SSH(client.Client, command, transport.Options{Name: name, Program: "nix-daemon --stdio"})
	if err != nil {
		return nil, nil, err
	}
	conn, err := daemonproto.HandshakeWithin(ctx, timeout, sess.Stdout(), sess.Stdin(), daemonproto.Options{
		Log: log, Abort: func() { client.Close() }, Explain: sess.Explain,
	})
	if late := (*daemonproto.NoGreetingError)(nil); errors.As(err, &late) {
		err = fmt.Errorf("%s: %w", name, err)
	}
	if err != nil {
		sess.Close()
		return nil, nil, err
	}
	return sess, conn, nil
}

// LogMessages returns a daemon log sink that writes to w what the
// daemon says: its text as it is, build output one line each. The other
// messages (activities and their other results) go to w's SetActivities
// target if w is a *LogSwitch.
func LogMessages(w io.Writer) func(daemonproto.Message) {
	ls, _ := w.(*LogSwitch)
	return func(m daemonproto.Message) {
		if line, ok := m.LogLine(); ok {
			io.WriteString(w, line+"\n")
		} else if m.Kind == daemonproto.Next {
			io.WriteString(w, m.Text)
		} else if ls != nil {
			ls.activity(m)
		}
	}
}

// daemonSession is a daemon protocol session on a connection of its own.
type daemonSession struct {
	ts     *transport.Session
	conn   *daemonproto.Conn
	client *sshconn.Client
	log    *LogSwitch // the build log: the daemon's text and build log lines
}

func (s *daemonSession) Conn() *serveproto.Conn        { return nil }
func (s *daemonSession) DaemonConn() *daemonproto.Conn { return s.conn }
func (s *daemonSession) SetLog(w io.Writer)            { s.log.Set(w) }
func (s *daemonSession) SetActivities(f func(daemonproto.Message)) {
	s.log.SetActivities(f)
}
func (s *daemonSession) StderrIsLog() { s.ts.StderrIsLog() }
func (s *daemonSession) Lost() error  { return s.client.Lost() }
func (s *daemonSession) Close()       { s.ts.Close() }

// ErrWriter passes writes to W and keeps the first error W returned: a
// copy from one machine into another that failed can then tell a failure
// to write (the receiving side) from a failure to read.
type ErrWriter struct {
	W   io.Writer
	Err error
}

func (e *ErrWriter) Write(p []byte) (int, error) {
	n, err := e.W.Write(p)
	if err != nil && e.Err == nil {
		e.Err = err
	}
	return n, err
}
