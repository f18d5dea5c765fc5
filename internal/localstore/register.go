package localstore

import (
	"bytes"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"
)

// maxRegisterStderr bounds the stderr of `nix-store --register-validity`
// kept for an error message.
const maxRegisterStderr = 16 << 10

// registerWaitDelay bounds how long the stderr of a registration process
// is read after it exited.
const registerWaitDelay = 5 * time.Second

// register runs one `nix-store --register-validity --hash-given` for outs
// (nix 2.8.0 src/libstore/store-api.cc decodeValidPathInfo). Nix adds them
// in one database transaction, checks that every reference is valid or in
// the batch and that they form no cycle, and canonicalises their metadata
// (mode 0444/0555, mtime 1, owner).
func (s *Store) register(outs []*output) error {
	cmd := s.opt.Command(s.opt.NixStore, "--register-validity", "--hash-given")
	cmd.Stdin = bytes.NewReader(registrationInput(outs))
	stderr := &tailBuffer{max: maxRegisterStderr}
	cmd.Stdout, cmd.Stderr = io.Discard, stderr
	cmd.WaitDelay = registerWaitDelay
	err := cmd.Start()
	if err == nil {
		s.opt.Mark("register-started")
		err = cmd.Wait()
		s.opt.Mark("registered")
	}
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = "(no output)"
		}
		return fmt.Errorf("localstore: %s --register-validity: %w: %s", s.opt.NixStore, err, msg)
	}
	return nil
}

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
