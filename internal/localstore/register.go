package localstore

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// maxRegisterStderr bounds the stderr of `nix-store --register-validity`
// kept for an error message.
const maxRegisterStderr = 16 << 10

// registerWaitDelay bounds how long a registration process that has its
// input, or was told there is none, may take to exit before it is killed;
// also how long its stderr is read after it exited.
const registerWaitDelay = 5 * time.Second

// registration is one `nix-store --register-validity --hash-given`,
// started, and not given its input yet.
type registration struct {
	cmd    *exec.Cmd
	in     *os.File // the write end of its stdin; nil once closed
	stderr *tailBuffer
	done   chan struct{} // closed when cmd.Wait has returned
	err    error         // cmd.Wait's, once done is closed
}

// StartRegistration starts, in the background, the `nix-store
// --register-validity` process that the next [Store.AddOutputs] or
// [Store.AddMissing] with outputs to register hands them to. Nearly all
// that registering costs is nix-store starting (loading Nix's libraries,
// reading its configuration, opening the database: 12–20 ms on the test
// bed, against 1–2 ms for the registration itself), so the hook calls it
// when it accepts a build, and the start-up overlaps the remote build
// instead of following it.
//
// Until it has its input the process holds only what every Nix process
// with the store open holds: the big lock shared and an SQLite connection
// without a transaction. Nix's registerValidity reads its input before it
// asks the store anything, and opening a local store takes no lock a
// nix-daemon worker or another hook waits for (NixOS/nix 2.8.0 and 2.34.0
// src/nix-store/nix-store.cc registerValidity, src/libstore/local-store.cc
// LocalStore::LocalStore). [Store.Close] ends it by closing its input, and
// so does this process's death: an empty input registers nothing. A process
// that could not start, or has exited by the time it is needed, is replaced
// by a new one then.
//
// It does nothing if a registration process is started already, or the
// store is closed.
//
// With [Options.DBDir] and a database registerDirect can write, it starts
// nothing: no process is needed then.
func (s *Store) StartRegistration() {
	if s.closed || s.pending != nil {
		return
	}
	if s.opt.DBDir != "" && s.directReady() == nil {
		return
	}
	ch := make(chan *registration, 1)
	s.pending = ch
	go func() {
		r, _ := s.startRegistration() // an error comes again when it is needed
		ch <- r
	}()
}

// takePending returns the process StartRegistration started, once its
// start is over, or nil if there is none or it could not start.
func (s *Store) takePending() *registration {
	if s.pending == nil {
		return nil
	}
	r := <-s.pending
	s.pending = nil
	return r
}

// startRegistration starts a registration process. Only s.opt is used, so
// it may run on a goroutine of its own.
func (s *Store) startRegistration() (*registration, error) {
	pr, pw, err := os.Pipe() // close-on-exec: no other child holds the write end
	if err != nil {
		return nil, fmt.Errorf("localstore: %w", err)
	}
	cmd := s.opt.Command(s.opt.NixStore, "--register-validity", "--hash-given")
	r := &registration{cmd: cmd, in: pw, stderr: &tailBuffer{max: maxRegisterStderr}, done: make(chan struct{})}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = pr, io.Discard, r.stderr
	cmd.WaitDelay = registerWaitDelay
	err = cmd.Start()
	pr.Close()
	if err != nil {
		pw.Close()
		return nil, fmt.Errorf("localstore: starting %s --register-validity: %w", s.opt.NixStore, err)
	}
	s.opt.Mark("register-started")
	go func() {
		r.err = cmd.Wait()
		close(r.done)
	}()
	return r, nil
}

// exited reports whether the process has ended.
func (r *registration) exited() bool {
	select {
	case <-r.done:
		return true
	default:
		return false
	}
}

// feed writes input, all of it, and closes the process's stdin. An input
// that fits in the pipe (64 KiB; a few hundred outputs) goes in one
// write(2), so this process dying cannot cut it between two outputs.
func (r *registration) feed(input []byte) error {
	_, err := r.in.Write(input)
	cerr := r.in.Close()
	r.in = nil
	return errors.Join(err, cerr)
}

// wait waits for the process to exit and returns its failure with what it
// said.
func (r *registration) wait(nixStore string) error {
	<-r.done
	if r.err != nil {
		msg := strings.TrimSpace(r.stderr.String())
		if msg == "" {
			msg = "(no output)"
		}
		return fmt.Errorf("localstore: %s --register-validity: %w: %s", nixStore, r.err, msg)
	}
	return nil
}

// abandon ends the process without input, so that it registers nothing,
// and waits for it; one that does not exit within registerWaitDelay is
// killed.
func (r *registration) abandon() {
	if r.in != nil {
		r.in.Close()
		r.in = nil
	}
	t := time.NewTimer(registerWaitDelay)
	defer t.Stop()
	select {
	case <-r.done:
	case <-t.C:
		r.cmd.Process.Kill()
		<-r.done
	}
}

// register makes outs valid with one `nix-store --register-validity
// --hash-given` (nix 2.8.0 src/libstore/store-api.cc decodeValidPathInfo):
// the one StartRegistration started if it is still there, else a new one.
// Nix reads every record before it registers any, adds them in one
// database transaction, checks that every reference is valid or in the
// batch and that they form no cycle (the transaction is rolled back
// otherwise), and canonicalises their metadata (mode 0444/0555, mtime 1,
// owner).
//
// With [Options.DBDir], registerDirect writes the rows itself first; if it
// cannot, or fails short of committing, nix-store does it after all (it
// skips what is valid by then), except when the outputs refer to a path
// that is not valid, which nix-store would refuse too.
func (s *Store) register(outs []*output) error {
	if s.opt.DBDir != "" {
		err := s.registerDirect(outs)
		if err == nil {
			return nil
		}
		if errors.As(err, new(*NotValidError)) {
			return &uncommitted{err}
		}
		s.opt.Fallback(err)
	}
	input := registrationInput(outs)
	if r := s.takePending(); r != nil {
		if r.exited() {
			// It ended before it had anything to do (it could not open
			// the store, say): a new one says why, or works.
			r.abandon()
		} else {
			err := r.feed(input)
			s.opt.Mark("register-fed")
			if !errors.Is(err, syscall.EPIPE) {
				err = errors.Join(err, r.wait(s.opt.NixStore))
				s.opt.Mark("registered")
				return err
			}
			// It exited before it read all of the input, so it never saw
			// its end and registered none of it: a new one does.
			r.abandon()
		}
	}
	r, err := s.startRegistration()
	if err != nil {
		return err
	}
	err = r.feed(input)
	s.opt.Mark("register-fed")
	err = errors.Join(err, r.wait(s.opt.NixStore))
	s.opt.Mark("registered")
	return err
}

// uncommitted is a registration error after which none of the outputs can
// be valid: the transaction that would have made them so was never
// committed.
type uncommitted struct{ error }

func (e *uncommitted) Unwrap() error { return e.error }

// registrationInput is what --register-validity --hash-given reads for
// outs: path, narHash, narSize, deriver, the number of references and
// each reference, one per line.
func registrationInput(outs []*output) []byte {
	var in strings.Builder
	for _, o := range outs {
		in.WriteString(o.path + "\n")
		in.WriteString(o.hash + "\n")
		in.WriteString(strconv.FormatInt(o.size, 10) + "\n")
		in.WriteString(o.deriver + "\n")
		in.WriteString(strconv.Itoa(len(o.refs)) + "\n")
		for _, ref := range o.refs {
			in.WriteString(ref + "\n")
		}
	}
	return []byte(in.String())
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	max int
	buf []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.buf = append(t.buf, p...)
	if len(t.buf) > t.max {
		t.buf = t.buf[len(t.buf)-t.max:]
	}
	return len(p), nil
}

func (t *tailBuffer) String() string { return string(t.buf) }
