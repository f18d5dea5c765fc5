package transport

import (
	"fmt"
	"os"
	"os/exec"
	"syscall"
)

// Local starts argv as a child process in its own process group and runs
// the serve protocol over its stdin and stdout. argv is usually
// ServeArgv(""), or a wrapper that gives the child a private store (tests).
func Local(argv []string, opt Options) (*Session, error) {
	if len(argv) == 0 {
		return nil, fmt.Errorf("transport: empty command")
	}
	return LocalCmd(exec.Command(argv[0], argv[1:]...), opt)
}

// LocalCmd is Local for a prepared command (environment, namespaces). Its
// Stdin, Stdout and Stderr must be unset. It is put in its own process group
// and killed if we die.
func LocalCmd(cmd *exec.Cmd, opt Options) (*Session, error) {
	name := opt.Name
	if name == "" {
		name = "local"
	}
	if cmd.Stdin != nil || cmd.Stdout != nil || cmd.Stderr != nil {
		return nil, fmt.Errorf("transport: %s: command already has stdio", name)
	}
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	dieWithParent(cmd.SysProcAttr)
	// Raw pipes, not cmd.StdoutPipe: exec closes those as soon as the child
	// exits, which would drop the last reply bytes and the `error:` line
	// that explains the exit.
	var parent, child []*os.File
	closeAll := func(fs []*os.File) {
		for _, f := range fs {
			f.Close()
		}
	}
	for range 3 {
		r, w, err := os.Pipe()
		if err != nil {
			closeAll(parent)
			closeAll(child)
			return nil, err
		}
		if len(parent) == 0 { // stdin: the child reads
			parent, child = append(parent, w), append(child, r)
		} else {
			parent, child = append(parent, r), append(child, w)
		}
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = child[0], child[1], child[2]
	err := cmd.Start()
	closeAll(child)
	if err != nil {
		closeAll(parent)
		return nil, fmt.Errorf("transport: %s: %w", name, err)
	}
	stdin, stdout, stderr := parent[0], parent[1], parent[2]
	return newSession(name, stdin, stdout, stderr, localProc{cmd}, opt), nil
}

// ServeArgv is the command line of a serve process, with `--store` when
// remoteStore is set.
func ServeArgv(remoteStore string) []string {
	argv := []string{"nix-store", "--serve", "--write"}
	if remoteStore != "" {
		argv = append(argv, "--store", remoteStore)
	}
	return argv
}

type localProc struct{ cmd *exec.Cmd }

// wait reaps the child. With *os.File stdio exec starts no copier
// goroutines, so this returns as soon as the process has exited.
func (p localProc) wait() error { return p.cmd.Wait() }

// kill ends the whole process group: a wrapper (unshare, sh) must not leave
// nix-store behind.
func (p localProc) kill() { syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL) }
