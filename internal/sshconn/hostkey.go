package sshconn

import (
	"bytes"
	"crypto/ed25519"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

// HostKeyProblem says why a host key was refused.
type HostKeyProblem int

const (
	// HostKeyUnknown: no pinned key and no known-hosts entry for the host.
	HostKeyUnknown HostKeyProblem = iota
	// HostKeyMismatch: the host offered a key other than the one(s) on record.
	HostKeyMismatch
)

// HostKeyError is returned by Dial when the machine's host key cannot be
// verified. It is never worth retrying: only the configuration can fix it.
type HostKeyError struct {
	Name    string // machine
	Addr    string // host:port dialled
	Problem HostKeyProblem
	Offered ssh.PublicKey // the key the host presented
	Pinned  bool          // the expectation came from the machine's host-key
	Want    []string      // what was on record: "file:line" or "host-key", with fingerprints
	Files   []string      // known-hosts files that were consulted
}

func (e *HostKeyError) Error() string {
	where := e.Name
	if !strings.Contains(e.Name, e.Addr) {
		where += " (" + e.Addr + ")"
	}
	offered := "no key"
	if e.Offered != nil {
		offered = e.Offered.Type() + " " + ssh.FingerprintSHA256(e.Offered)
	}
	switch {
	case e.Problem == HostKeyMismatch && e.Pinned:
		return fmt.Sprintf("ssh: host key mismatch for %s: host offers %s, host-key pins %s",
			where, offered, strings.Join(e.Want, ", "))
	case e.Problem == HostKeyMismatch:
		return fmt.Sprintf("ssh: host key mismatch for %s: host offers %s, known hosts have %s",
			where, offered, strings.Join(e.Want, ", "))
	default:
		files := "none of the known-hosts files exists"
		if len(e.Files) > 0 {
			files = "not found in " + strings.Join(e.Files, ", ")
		}
		return fmt.Sprintf("ssh: unknown host key for %s: host offers %s, %s; "+
			"verify it and set host-key or add it to a known-hosts file", where, offered, files)
	}
}

// hostKeyPolicy is what Dial needs to check a host: the callback and the
// algorithms to ask for (see the package doc for why the latter matters).
type hostKeyPolicy struct {
	callback   ssh.HostKeyCallback
	algorithms []string
}

// newHostKeyPolicy builds the policy for t: its pinned key, else its
// known-hosts files. lastErr receives the *HostKeyError the callback
// returned, so Dial can report it unwrapped.
func newHostKeyPolicy(t Target, lastErr **HostKeyError) (hostKeyPolicy, error) {
	if t.HostKey != "" {
		want, _, _, _, err := ssh.ParseAuthorizedKey([]byte(t.HostKey))
		if err != nil {
			return hostKeyPolicy{}, fmt.Errorf("ssh: %s: host-key does not parse: %v", t.Name, err)
		}
		cb := func(_ string, _ net.Addr, key ssh.PublicKey) error {
			if bytes.Equal(key.Marshal(), want.Marshal()) {
				return nil
			}
			*lastErr = &HostKeyError{Name: t.Name, Addr: t.Addr, Problem: HostKeyMismatch, Offered: key,
				Pinned: true, Want: []string{want.Type() + " " + ssh.FingerprintSHA256(want)}}
			return *lastErr
		}
		return hostKeyPolicy{callback: cb, algorithms: algorithmsFor(want.Type())}, nil
	}

	var files []string
	for _, f := range t.KnownHosts {
		if _, err := os.Stat(f); err == nil {
			files = append(files, f)
		}
	}
	refuse := func(_ string, _ net.Addr, key ssh.PublicKey) error {
		*lastErr = &HostKeyError{Name: t.Name, Addr: t.Addr, Problem: HostKeyUnknown, Offered: key}
		return *lastErr
	}
	if len(files) == 0 {
		return hostKeyPolicy{callback: refuse}, nil
	}
	db, err := knownhosts.New(files...)
	if err != nil {
		return hostKeyPolicy{}, fmt.Errorf("ssh: %s: reading known hosts: %w", t.Name, err)
	}
	cb := func(hostname string, remote net.Addr, key ssh.PublicKey) error {
		err := db(hostname, remote, key)
		var ke *knownhosts.KeyError
		if errors.As(err, &ke) {
			he := &HostKeyError{Name: t.Name, Addr: t.Addr, Problem: HostKeyUnknown, Offered: key, Files: files}
			for _, k := range ke.Want {
				he.Problem = HostKeyMismatch
				he.Want = append(he.Want, fmt.Sprintf("%s %s (%s:%d)", k.Key.Type(), ssh.FingerprintSHA256(k.Key), k.Filename, k.Line))
			}
			*lastErr = he
			return he
		}
		return err
	}
	return hostKeyPolicy{callback: cb, algorithms: knownAlgorithms(db, t.Addr)}, nil
}

// knownAlgorithms asks the known-hosts database which key types it holds for
// addr, by presenting a key it cannot hold and reading the KeyError.
func knownAlgorithms(db ssh.HostKeyCallback, addr string) []string {
	probe, _ := ssh.NewPublicKey(ed25519.NewKeyFromSeed(make([]byte, ed25519.SeedSize)).Public())
	err := db(addr, &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}, probe)
	var ke *knownhosts.KeyError
	if !errors.As(err, &ke) {
		return nil
	}
	var algs []string
	seen := map[string]bool{}
	for _, k := range ke.Want {
		for _, a := range algorithmsFor(k.Key.Type()) {
			if !seen[a] {
				seen[a] = true
				algs = append(algs, a)
			}
		}
	}
	return algs
}

// algorithmsFor maps a key type to the host key algorithms that verify with
// it: an RSA key signs with SHA-2 as well as SHA-1.
func algorithmsFor(keyType string) []string {
	if keyType == ssh.KeyAlgoRSA {
		return []string{ssh.KeyAlgoRSASHA512, ssh.KeyAlgoRSASHA256, ssh.KeyAlgoRSA}
	}
	return []string{keyType}
}
