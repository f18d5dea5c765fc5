package transport

import (
	"errors"
	"fmt"
	"os/exec"
	"strings"

	"golang.org/x/crypto/ssh"
)

// SSH starts command in a new session on client and runs the serve protocol
// over the session's stdin and stdout. command is interpreted by the remote
// user's shell, as with `ssh host command`; build it with ServeCommand.
func SSH(client *ssh.Client, command string, opt Options) (*Session, error) {
	name := opt.Name
	if name == "" {
		name = client.RemoteAddr().String()
	}
	s, err := client.NewSession()
	if err != nil {
		return nil, fmt.Errorf("transport: %s: new session: %w", name, err)
	}
	stdin, err := s.StdinPipe()
	if err != nil {
		s.Close()
		return nil, err
	}
	stdout, err := s.StdoutPipe()
	if err != nil {
		s.Close()
		return nil, err
	}
	stderr, err := s.StderrPipe()
	if err != nil {
		s.Close()
		return nil, err
	}
	if err := s.Start(command); err != nil {
		s.Close()
		return nil, fmt.Errorf("transport: %s: start %q: %w", name, command, err)
	}
	return newSession(name, stdin, stdout, stderr, sshProc{s}, opt), nil
}

// ServeCommand is the remote shell command of a serve session on a
// machine: ServeArgv quoted, with remoteProgram, when set, in place of
// `nix-store` (a machine's remote-program: a path such as
// /nix/var/nix/profiles/default/bin/nix-store, or a program and its own
// arguments separated by spaces, as Nix splits it).
func ServeCommand(remoteProgram, remoteStore string) string {
	return remoteCommand(remoteProgram, ServeArgv(remoteStore))
}

// DaemonCommand is the remote shell command of an ssh-ng session:
// `nix-daemon --stdio`, with `--store` when remoteStore is set and
// remoteProgram, when set, in place of `nix-daemon`, as Nix's SSHStore
// runs it (nix 2.34.8 src/libstore/ssh-store.cc openConnection).
func DaemonCommand(remoteProgram, remoteStore string) string {
	argv := []string{"nix-daemon", "--stdio"}
	if remoteStore != "" {
		argv = append(argv, "--store", remoteStore)
	}
	return remoteCommand(remoteProgram, argv)
}

// remoteCommand quotes argv for the remote shell, replacing argv[0] with
// the words of program when it is set.
func remoteCommand(program string, argv []string) string {
	if words := strings.Fields(program); len(words) > 0 {
		argv = append(words, argv[1:]...)
	}
	for i, a := range argv {
		argv[i] = shellQuote(a)
	}
	return strings.Join(argv, " ")
}

// shellQuote quotes s for a POSIX shell unless it is plainly safe.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./:=@+,") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

type sshProc struct{ s *ssh.Session }

func (p sshProc) wait() error { return p.s.Wait() }

// kill asks sshd to signal the command, then closes the channel; sshd closes
// the command's pipes, so nix-store sees its stdin hang up even if the
// signal request is not supported.
func (p sshProc) kill() {
	p.s.Signal(ssh.SIGKILL)
	p.s.Close()
}

// exitText describes how a process ended, for error messages.
func exitText(err error) string {
	var ee *ssh.ExitError
	var xe *exec.ExitError
	var missing *ssh.ExitMissingError
	switch {
	case err == nil:
		return "exit status 0"
	case errors.As(err, &ee):
		if ee.Signal() != "" {
			return "signal " + ee.Signal()
		}
		return fmt.Sprintf("exit status %d", ee.ExitStatus())
	case errors.As(err, &xe):
		return xe.String()
	case errors.As(err, &missing):
		return "connection lost, no exit status"
	default:
		return err.Error()
	}
}
