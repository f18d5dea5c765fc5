package localstore

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/nix-community/go-nix/pkg/nixhash"
	"github.com/nix-offload/nix-offload/internal/nar"
	"github.com/nix-offload/nix-offload/internal/serveproto"
)

// tempPrefix starts the name of the staging directory AddOutputs makes in
// the store directory. It begins with a dot, so it is never a store path:
// Nix's garbage collector and `nix-store --verify` leave it alone, and no
// store path can collide with it.
const tempPrefix = ".nix-offload-"

// errNAREnded is what a fetch function gets if it writes past the end of
// the NAR it was asked for.
var errNAREnded = errors.New("localstore: the NAR has ended; no more bytes are read")

// output is a checked element of AddOutputs' infos.
type output struct {
	path    string // StoreDir/base
	base    string
	deriver string
	refs    []string
	size    int64
	sha256  []byte
	hash    string // narHash as "sha256:<nix32>", from the verified bytes
	staged  string // the restored tree in the staging directory
}

// AddOutputs makes the outputs of a remote build valid in the local store,
// while nix-daemon's worker holds the locks on them. See the package
// documentation for why it works this way and what it guarantees.
//
// infos are the outputs as the machine reported them: Path, NarHash (a
// SHA-256 in any form Nix prints), NarSize, References and Deriver are
// used; CA and Sigs are not recorded. Outputs that are valid already are
// skipped without a fetch. For each of the others fetch(path, w) must write
// the path's NAR to w and return when it has written it all or a write
// fails. It is called once per path, one at a time, in the order of infos,
// on a goroutine of its own while AddOutputs waits for it, so it may use
// what the caller's goroutine owns (a serveproto.Conn to the machine).
// AddOutputs waits for fetch to return, after an error too: to give up on a
// machine that stalls, close its transport, which makes fetch fail.
//
// Each reference must be valid already or be one of infos; references
// between infos may go either way but not form a cycle. Everything in infos
// is checked before anything is fetched or touched: malformed store paths
// (a hostile machine picks these names), duplicates and impossible sizes
// are errors.
//
// On any error, nothing this call put in the store stays: not the staging
// directory, and not a path at its final name that did not become valid.
// Later reads see the new paths: AddOutputs starts a fresh read session
// first if the current one may hold a stale "invalid" for one of them.
func (s *Store) AddOutputs(infos []serveproto.PathInfo, fetch func(path string, w io.Writer) error) error {
	if s.closed {
		return ErrClosed
	}
	outs, err := s.checkOutputs(infos)
	if err != nil {
		return err
	}
	if len(outs) == 0 {
		return nil
	}

	// A fresh session if this one may report one of these paths invalid
	// from its cache (see reset).
	for _, o := range outs {
		if s.missing[o.path] || slices.ContainsFunc(o.refs, func(r string) bool { return s.missing[r] }) {
			s.reset()
			break
		}
	}
	todo, err := s.missingOutputs(outs)
	if err != nil || len(todo) == 0 {
		return err
	}
	if s.opt.LockOutputs {
		unlock, err := s.lockOutputs(todo)
		if err != nil {
			return err
		}
		defer unlock()
		// Made valid meanwhile? Only one that is on disk can be (a path is put in place
		// before it is registered), and only a fresh session can say: this one has seen
		// them invalid.
		if slices.ContainsFunc(todo, s.onDisk) {
			s.reset()
			if todo, err = s.missingOutputs(todo); err != nil || len(todo) == 0 {
				return err
			}
		}
	}
	return s.addChecked(todo, fetch)
}

// MissingOutputs checks infos as AddOutputs does and returns those that are
// not valid here, after making sure that every reference outside infos is.
// A process that cannot write to the store (the broker) asks it; the one
// that can then calls [Store.AddMissing] with the answer.
func (s *Store) MissingOutputs(infos []serveproto.PathInfo) ([]serveproto.PathInfo, error) {
	if s.closed {
		return nil, ErrClosed
	}
	outs, err := s.checkOutputs(infos)
	if err != nil {
		return nil, err
	}
	todo, err := s.missingOutputs(outs)
	if err != nil {
		return nil, err
	}
	var missing []serveproto.PathInfo
	for _, info := range infos {
		if slices.ContainsFunc(todo, func(o *output) bool { return o.path == info.Path }) {
			missing = append(missing, info)
		}
	}
	return missing, nil
}

// AddMissing is AddOutputs for outputs the caller knows to be invalid here,
// with every reference outside infos valid: [Store.MissingOutputs], asked
// while nix-daemon held the output locks, said so. It skips the validity
// query, so the only process it starts is `nix-store --register-validity`.
// The guarantees on error are AddOutputs'.
func (s *Store) AddMissing(infos []serveproto.PathInfo, fetch func(path string, w io.Writer) error) error {
	if s.closed {
		return ErrClosed
	}
	outs, err := s.checkOutputs(infos)
	if err != nil || len(outs) == 0 {
		return err
	}
	return s.addChecked(outs, fetch)
}

// addChecked stages, places and registers todo, none of which is valid.
func (s *Store) addChecked(todo []*output, fetch func(path string, w io.Writer) error) error {
	tmp, err := os.MkdirTemp(s.opt.RealStoreDir, tempPrefix)
	if err != nil {
		return fmt.Errorf("localstore: staging directory: %w", err)
	}
	defer os.RemoveAll(tmp)
	s.opt.Mark("staged")
	for _, o := range todo {
		o.staged = filepath.Join(tmp, o.base)
		if err := restoreOutput(o, fetch); err != nil {
			return err
		}
		s.opt.Mark("restored")
	}

	// Every NAR is verified: put the trees at their names and register
	// them together.
	var placed []*output
	for _, o := range todo {
		if err := s.place(o); err != nil {
			return errors.Join(err, s.removeUnregistered(placed))
		}
		placed = append(placed, o)
	}
	s.opt.Mark("placed")
	if err := s.register(placed); err != nil {
		if errors.As(err, new(*uncommitted)) {
			return errors.Join(err, removePlaced(s.opt.RealStoreDir, placed))
		}
		return errors.Join(err, s.removeUnregistered(placed))
	}
	if s.registered == nil {
		s.registered = make(map[string]bool, len(placed))
	}
	for _, o := range placed {
		s.registered[o.path] = true
	}
	return nil
}

// removePlaced removes outs from the store directory dir, none of which is
// valid.
func removePlaced(dir string, outs []*output) error {
	var errs []error
	for _, o := range outs {
		if err := os.RemoveAll(filepath.Join(dir, o.base)); err != nil {
			errs = append(errs, fmt.Errorf("localstore: removing unregistered %s: %w", o.path, err))
		}
	}
	return errors.Join(errs...)
}

// checkOutputs validates infos without touching anything.
func (s *Store) checkOutputs(infos []serveproto.PathInfo) ([]*output, error) {
	dir := s.opt.StoreDir
	outs := make([]*output, 0, len(infos))
	seen := make(map[string]bool, len(infos))
	sha256Algo := nixhash.SHA256
	for i, info := range infos {
		fail := func(format string, args ...any) error {
			return fmt.Errorf("localstore: output %d (%q): %s", i, info.Path, fmt.Sprintf(format, args...))
		}
		base, err := checkStorePath(dir, info.Path)
		if err != nil {
			return nil, fail("%v", err)
		}
		if seen[info.Path] {
			return nil, fail("listed twice")
		}
		seen[info.Path] = true
		if info.Deriver != "" {
			if _, err := checkStorePath(dir, info.Deriver); err != nil {
				return nil, fail("deriver: %v", err)
			}
		}
		for _, ref := range info.References {
			if _, err := checkStorePath(dir, ref); err != nil {
				return nil, fail("reference: %v", err)
			}
		}
		if info.NarSize == 0 || info.NarSize > uint64(nar.DefaultLimits.MaxNARSize) {
			return nil, fail("narSize %d is outside 1..%d", info.NarSize, nar.DefaultLimits.MaxNARSize)
		}
		h, err := nixhash.ParseAny(info.NarHash, &sha256Algo)
		if err != nil {
			return nil, fail("narHash %q: %v", info.NarHash, err)
		}
		outs = append(outs, &output{
			path:    info.Path,
			base:    base,
			deriver: info.Deriver,
			refs:    info.References,
			size:    int64(info.NarSize),
			sha256:  h.Digest(),
		})
	}
	return outs, nil
}

// missingOutputs returns the outputs that are not valid yet, after checking
// that every reference outside the batch is valid.
func (s *Store) missingOutputs(outs []*output) ([]*output, error) {
	inBatch := make(map[string]bool, len(outs))
	query := make([]string, 0, len(outs))
	for _, o := range outs {
		inBatch[o.path] = true
		query = append(query, o.path)
	}
	var external []string
	for _, o := range outs {
		for _, ref := range o.refs {
			if !inBatch[ref] && !slices.Contains(external, ref) {
				external = append(external, ref)
			}
		}
	}
	valid, err := s.Valid(append(query, external...))
	if err != nil {
		return nil, err
	}
	isValid := make(map[string]bool, len(valid))
	for _, p := range valid {
		isValid[p] = true
	}
	var missingRefs []string
	for _, ref := range external {
		if !isValid[ref] {
			missingRefs = append(missingRefs, ref)
		}
	}
	if len(missingRefs) > 0 {
		slices.Sort(missingRefs)
		return nil, fmt.Errorf("localstore: outputs refer to paths that are neither valid here nor among the outputs: %w", &NotValidError{Paths: missingRefs})
	}
	var todo []*output
	for _, o := range outs {
		if !isValid[o.path] {
			todo = append(todo, o)
		}
	}
	return todo, nil
}

// restoreOutput unpacks o's NAR, as fetch writes it, at o.staged and checks
// it against narSize and narHash. It reads at most narSize bytes. On error
// nothing is left at o.staged, and fetch has returned.
func restoreOutput(o *output, fetch func(string, io.Writer) error) error {
	pr, pw := io.Pipe()
	fetched := make(chan error, 1)
	go func() {
		err := fetch(o.path, pw)
		pw.CloseWithError(err) // nil: the reader sees EOF
		fetched <- err
	}()
	// The reader reads exactly what the grammar asks for, so a NAR of
	// narSize bytes never asks for more, and a longer one fails at byte
	// narSize+1 (never read) with ErrSizeMismatch.
	st, rerr := nar.Restore(o.staged, &sizeLimit{r: pr, n: o.size}, nar.DefaultLimits)
	if rerr != nil {
		pr.CloseWithError(rerr) // a blocked write in fetch returns this
	} else {
		pr.CloseWithError(errNAREnded)
	}
	ferr := <-fetched

	var err error
	switch {
	case rerr != nil && ferr != nil && errors.Is(rerr, ferr):
		// fetch failed first (a malformed NAR from the machine, a lost
		// connection) and Restore only saw the pipe end with its error:
		// fetch's error says what was wrong and where, Restore's would
		// add a misleading "at offset 0: reading magic".
		err = fmt.Errorf("fetching the NAR: %w", ferr)
	case rerr != nil:
		err = fmt.Errorf("NAR: %w", rerr)
	case ferr != nil:
		err = fmt.Errorf("fetching the NAR: %w", ferr)
	case st.Size != o.size:
		err = fmt.Errorf("NAR: %w: %d bytes, but the machine reported narSize %d", nar.ErrSizeMismatch, st.Size, o.size)
	case !bytes.Equal(st.SHA256[:], o.sha256):
		var want nar.Stats
		copy(want.SHA256[:], o.sha256)
		err = fmt.Errorf("NAR: %w: got %s, but the machine reported %s", nar.ErrHashMismatch, st.NixHash(), want.NixHash())
	}
	if err != nil {
		if rerr == nil {
			os.RemoveAll(o.staged)
		}
		return fmt.Errorf("localstore: output %s: %w", o.path, err)
	}
	o.hash = st.NixHash()
	return nil
}

// sizeLimit reads at most n bytes from r; a read beyond them fails with
// ErrSizeMismatch without reading.
type sizeLimit struct {
	r io.Reader
	n int64
}

func (l *sizeLimit) Read(p []byte) (int, error) {
	if l.n <= 0 {
		return 0, fmt.Errorf("%w: the NAR is longer than its narSize", nar.ErrSizeMismatch)
	}
	if int64(len(p)) > l.n {
		p = p[:l.n]
	}
	n, err := l.r.Read(p)
	l.n -= int64(n)
	return n, err
}

// onDisk reports whether something is at o's name in the store.
func (s *Store) onDisk(o *output) bool {
	_, err := os.Lstat(filepath.Join(s.opt.RealStoreDir, o.base))
	return err == nil
}

// place moves a staged output to its name in the store, after removing
// what an earlier, failed attempt left there (it is invalid: checked by
// missingOutputs, and the worker's lock keeps others from registering it).
func (s *Store) place(o *output) error {
	dst := filepath.Join(s.opt.RealStoreDir, o.base)
	if _, err := os.Lstat(dst); err == nil {
		if err := os.RemoveAll(dst); err != nil {
			return fmt.Errorf("localstore: removing the invalid %s left by an earlier attempt: %w", o.path, err)
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("localstore: %w", err)
	}
	if err := os.Rename(o.staged, dst); err != nil {
		return fmt.Errorf("localstore: moving %s into place: %w", o.path, err)
	}
	return nil
}

// removeUnregistered removes those of outs that are not valid. It asks a
// new session, because a failed registration may still have committed: a
// valid path is never removed, and if validity cannot be checked, nothing
// is removed (Nix deletes invalid leftovers itself before it builds a path
// again) and the error says so.
func (s *Store) removeUnregistered(outs []*output) error {
	if len(outs) == 0 {
		return nil
	}
	s.reset()
	paths := make([]string, len(outs))
	for i, o := range outs {
		paths[i] = o.path
	}
	valid, err := s.Valid(paths)
	if err != nil {
		return fmt.Errorf("localstore: cannot tell which outputs became valid, so %s stay in place: %w", strings.Join(paths, ", "), err)
	}
	invalid := slices.DeleteFunc(slices.Clone(outs), func(o *output) bool { return slices.Contains(valid, o.path) })
	return removePlaced(s.opt.RealStoreDir, invalid)
}
