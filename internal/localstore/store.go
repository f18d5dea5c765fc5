package localstore

import (
	"errors"
	"fmt"
	"io"
	"os/exec"
	"slices"
	"strings"

	"github.com/nix-offload/nix-offload/internal/nar"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/transport"
)

// DefaultStoreDir is the store directory Nix uses unless built otherwise,
// and the only one the serve protocol client speaks about.
const DefaultStoreDir = serveproto.StoreDir

// ErrClosed is returned by every method after [Store.Close].
var ErrClosed = errors.New("localstore: store is closed")

// Options configure a [Store].
type Options struct {
	// NixStore is the nix-store binary: "nix-store", looked up on PATH,
	// if empty.
	NixStore string

	// StoreDir is the store directory as Nix names it, the prefix of every
	// store path: DefaultStoreDir if empty. Only "/nix/store" is supported,
	// because the serve protocol client speaks only about that one.
	StoreDir string

	// RealStoreDir is where StoreDir is found on this process's file
	// system, for the files AddOutputs writes itself (restore, rename,
	// removal); StoreDir if empty. The hook runs in nix-daemon's mount
	// namespace, where both are the same. They differ when the nix-store
	// commands run in another mount namespace than this process: the test
	// bed binds a directory D over /nix for each Nix, so a path
	// /nix/store/<base> that nix-store sees is D/store/<base> here, and
	// RealStoreDir is D/store.
	RealStoreDir string

	// Command makes the command that runs nix-store with argv (argv[0] is
	// NixStore). It must leave Stdin, Stdout and Stderr unset. Tests use it
	// to run nix-store in a test bed namespace. exec.Command if nil.
	Command func(argv ...string) *exec.Cmd

	// LockOutputs makes AddOutputs take Nix's own lock on each output it
	// is going to write (flock on "<output>.lock", as Nix's PathLocks
	// does), and ask again, once it holds them, which are still not
	// valid: another Nix process (nix-daemon adding the same output for a
	// hook, a local build of it) may have made them valid meanwhile. A
	// process that adds paths by itself, the build command, sets it. The
	// hook must not: the nix-daemon worker that runs it holds those locks
	// for it, and would wait for the hook forever.
	LockOutputs bool
	// LockWait, with LockOutputs, is called with an output's path each
	// time AddOutputs finds its lock held by another process, before it
	// waits LockPoll and tries again; an error it returns stops
	// AddOutputs with that error, having written nothing. Nil waits as
	// long as the lock is held.
	LockWait func(path string) error

	// DBDir, if set, is Nix's database directory as this process finds
	// it (see [DirectDBDir]; in the test bed, D/var/nix/db): outputs are
	// then registered by writing their rows into the database in one
	// SQLite transaction, as nix-store would, instead of by starting
	// `nix-store --register-validity` (a process that takes 12–48 ms to
	// start, against 1–3 ms for the transaction). Whatever this cannot
	// write, or a write that fails, is left to nix-store after all (see
	// registerDirect), and Fallback is told why. Empty: nix-store only.
	DBDir string
	// Fallback, with DBDir, is told why a registration went to nix-store
	// after all. Nil tells nobody.
	Fallback func(err error)

	// Mark, if set, is told when each step of writing outputs ends:
	// "staged", "restored" (once per output), "placed", "canonicalised" and
	// "registered" (written directly, with DBDir), or "register-started"
	// (a nix-store process runs; see StartRegistration), "register-fed"
	// (it has its input) and "registered" (it has exited). The hook
	// passes its stopwatch (internal/stopwatch); nil records nothing.
	Mark func(step string)
}

// Store is the local Nix store, as the build hook sees it.
//
// It reads through a `nix-store --serve` session (without --write: every
// read is allowed to any user, and nothing can be changed through it),
// started on first use and again after a failure broke it. It writes only
// through [Store.AddOutputs]. The session sees the store as it was when it
// first looked at a path: see [Store.Refresh].
//
// A Store is not safe for concurrent use: call one method at a time. Close
// may not be called while another method runs either.
type Store struct {
	opt      Options
	closed   bool
	sess     *transport.Session // nil until first use, and after a reset
	conn     *serveproto.Conn   // on sess
	sessName string
	// missing holds the paths sess reported invalid to QueryPathInfos:
	// its Nix now caches them as invalid (see reset), so a write of one of
	// them needs a fresh session. QueryValidPaths caches nothing.
	missing map[string]bool
	// pending brings the registration process StartRegistration started
	// (nil if it could not start); nil if there is none.
	pending chan *registration
	// registered holds the paths this Store made valid itself, which
	// Valid reports without asking (a fresh session would cost a
	// nix-store start), until Refresh.
	registered map[string]bool
}

// Open returns a Store for the local store that opt describes. It starts no
// process: the read session starts with the first method that needs it.
func Open(opt Options) (*Store, error) {
	if opt.NixStore == "" {
		opt.NixStore = "nix-store"
	}
	if opt.StoreDir == "" {
		opt.StoreDir = DefaultStoreDir
	}
	if opt.StoreDir != DefaultStoreDir {
		return nil, fmt.Errorf("localstore: store directory %q is not supported: the serve protocol client speaks only about %s", opt.StoreDir, DefaultStoreDir)
	}
	if opt.RealStoreDir == "" {
		opt.RealStoreDir = opt.StoreDir
	}
	if opt.Command == nil {
		opt.Command = func(argv ...string) *exec.Cmd { return exec.Command(argv[0], argv[1:]...) }
	}
	if opt.Mark == nil {
		opt.Mark = func(string) {}
	}
	if opt.Fallback == nil {
		opt.Fallback = func(error) {}
	}
	return &Store{opt: opt, sessName: "local store"}, nil
}

// Close ends the read session, if one is running, and a registration
// process that [Store.StartRegistration] started and nothing used: it
// registers nothing. It is idempotent.
func (s *Store) Close() error {
	s.closed = true
	s.reset()
	if r := s.takePending(); r != nil {
		r.abandon()
	}
	return nil
}

// Refresh ends the read session, so that the next read sees what other
// processes have changed in the store since. A `nix-store --serve` process
// remembers that a path was invalid once PathInfos found it so (see reset):
// without Refresh, a path that another process made valid may still be
// reported invalid. AddOutputs takes care of the paths it writes itself.
func (s *Store) Refresh() {
	s.reset()
	clear(s.registered)
}

// reset ends the read session; the next read starts a new one. A serve
// session does not see every change made by another process: after
// QueryPathInfos found a path invalid, its Nix caches that
// (Store::pathInfoCache, negative entries live for an hour), and the same
// session keeps calling the path invalid once another process registered
// it. QueryValidPaths alone leaves no such entry (checked on Nix 2.8, 2.26
// and 2.34), so AddOutputs resets only when the session's PathInfos saw
// one of the paths it writes as missing: one warm session serves a build.
func (s *Store) reset() {
	clear(s.missing)
	if s.conn != nil {
		s.conn.Close()
		s.conn = nil
	}
	if s.sess != nil {
		s.sess.Close()
		s.sess = nil
	}
}

// Warm starts the read session now, so that the first read does not wait
// for nix-store to start. Like every method it must not run concurrently
// with another method of s.
func (s *Store) Warm() error {
	_, err := s.session()
	return err
}

// session returns a usable serve connection, starting a new session if
// there is none or the last one broke.
func (s *Store) session() (*serveproto.Conn, error) {
	if s.closed {
		return nil, ErrClosed
	}
	if s.conn != nil && s.conn.Err() == nil {
		return s.conn, nil
	}
	s.reset()
	cmd := s.opt.Command(s.opt.NixStore, "--serve")
	sess, err := transport.LocalCmd(cmd, transport.Options{Name: s.sessName})
	if err != nil {
		return nil, fmt.Errorf("localstore: starting %s --serve: %w", s.opt.NixStore, err)
	}
	conn, err := serveproto.Handshake(sess.Stdout(), sess.Stdin(), serveproto.Options{Explain: sess.Explain})
	if err != nil {
		sess.Close()
		return nil, fmt.Errorf("localstore: %w", err)
	}
	s.sess, s.conn = sess, conn
	return conn, nil
}

// NotValidError reports store paths that are not valid in the local store.
type NotValidError struct {
	Paths []string // sorted
}

func (e *NotValidError) Error() string {
	if len(e.Paths) == 1 {
		return fmt.Sprintf("localstore: %s is not valid in the local store", e.Paths[0])
	}
	return fmt.Sprintf("localstore: %d paths are not valid in the local store: %s", len(e.Paths), strings.Join(e.Paths, ", "))
}

// Valid returns those of paths that are valid in the local store, sorted.
// Malformed paths are an error, and nothing is sent. Paths this Store
// registered itself are valid without a question, until [Store.Refresh].
func (s *Store) Valid(paths []string) ([]string, error) {
	if err := s.checkPaths(paths); err != nil {
		return nil, err
	}
	var known, ask []string
	for _, p := range paths {
		if s.registered[p] {
			known = append(known, p)
		} else {
			ask = append(ask, p)
		}
	}
	if len(ask) > 0 {
		c, err := s.session()
		if err != nil {
			return nil, err
		}
		valid, err := c.QueryValidPaths(ask, false, false)
		if err != nil {
			return nil, fmt.Errorf("localstore: %w", err)
		}
		known = append(known, valid...)
	}
	slices.Sort(known)
	return slices.Compact(known), nil
}

// requireValid returns a *NotValidError if some of paths are not valid.
func (s *Store) requireValid(paths []string) error {
	valid, err := s.Valid(paths)
	if err != nil {
		return err
	}
	var missing []string
	for _, p := range paths {
		if !slices.Contains(valid, p) && !slices.Contains(missing, p) {
			missing = append(missing, p)
		}
	}
	if len(missing) > 0 {
		slices.Sort(missing)
		return &NotValidError{Paths: missing}
	}
	return nil
}

// Closure returns the closure of paths in the local store: the paths and
// everything they refer to, recursively, sorted (QueryClosure without the
// outputs of derivations). It returns a *NotValidError if one of paths is
// not valid.
func (s *Store) Closure(paths []string) ([]string, error) {
	// The server exits on an invalid path, so ask first: the error is
	// typed and the session survives.
	if err := s.requireValid(paths); err != nil {
		return nil, err
	}
	closure, err := s.conn.QueryClosure(paths, false)
	if err != nil {
		return nil, fmt.Errorf("localstore: %w", err)
	}
	return closure, nil
}

// PathInfos returns what the local store records of paths, in the order of
// paths. It returns a *NotValidError if one of them is not valid.
func (s *Store) PathInfos(paths []string) ([]serveproto.PathInfo, error) {
	if err := s.checkPaths(paths); err != nil {
		return nil, err
	}
	c, err := s.session()
	if err != nil {
		return nil, err
	}
	infos, err := c.QueryPathInfos(paths)
	if err != nil {
		return nil, fmt.Errorf("localstore: %w", err)
	}
	byPath := make(map[string]serveproto.PathInfo, len(infos))
	for _, info := range infos {
		byPath[info.Path] = info
	}
	out := make([]serveproto.PathInfo, 0, len(paths))
	var missing []string
	for _, p := range paths {
		info, ok := byPath[p]
		if !ok {
			if s.missing == nil {
				s.missing = map[string]bool{}
			}
			s.missing[p] = true
			if !slices.Contains(missing, p) {
				missing = append(missing, p)
			}
			continue
		}
		out = append(out, info)
	}
	if len(missing) > 0 {
		slices.Sort(missing)
		return nil, &NotValidError{Paths: missing}
	}
	return out, nil
}

// Dump writes the NAR of a valid path to w and returns its narSize and
// narHash, computed from the bytes written. It returns a *NotValidError if
// path is not valid. An error from w ends the read session (the rest of
// the NAR is still in its stream); the next call starts a new one.
func (s *Store) Dump(path string, w io.Writer) (nar.Stats, error) {
	if err := s.requireValid([]string{path}); err != nil {
		return nar.Stats{}, err
	}
	st, err := s.conn.DumpStorePath(path, w)
	if err != nil {
		return nar.Stats{}, fmt.Errorf("localstore: %w", err)
	}
	return st, nil
}

// checkPaths rejects malformed store paths before anything is sent.
func (s *Store) checkPaths(paths []string) error {
	for _, p := range paths {
		if _, err := checkStorePath(s.opt.StoreDir, p); err != nil {
			return fmt.Errorf("localstore: %w", err)
		}
	}
	return nil
}
