package servetest

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/nix-offload/nix-offload/internal/serveproto"
)

// nixStoreEnv names the state file of the LocalStore whose nix-store a
// helper process plays.
const nixStoreEnv = "SERVETEST_NIX_STORE_STATE"

// LocalStore is a fake local store for package localstore, which needs
// nothing of Nix but two commands: `nix-store --serve` for reading and
// `nix-store --register-validity --hash-given` to make outputs valid.
// [LocalStore.Command] runs them as a helper process of the test binary (a
// [Server] over stdin and stdout, and a parser of the registration that
// records it), on a store kept in a state file, while localstore writes
// the outputs' files into Dir itself. Give localstore.Options
//
//	RealStoreDir: l.Dir, Command: l.Command
//
// and it imports outputs for real without root, into a temporary
// directory.
type LocalStore struct {
	// Dir is where the store's files are: localstore's RealStoreDir.
	Dir    string
	state  string
	helper string
}

// localState is the store as kept in the state file.
type localState struct {
	Dir        string           `json:"dir"`
	Paths      map[string]*Path `json:"paths"`
	Registered [][]string       `json:"registered"` // each --register-validity, its paths
}

// NewLocalStore makes an empty fake store in a temporary directory.
// helperTest is the name of a test function of the caller's package that
// calls [RunNixStoreHelper] first.
func NewLocalStore(t testing.TB, helperTest string) *LocalStore {
	t.Helper()
	root := t.TempDir()
	l := &LocalStore{Dir: filepath.Join(root, "store"), state: filepath.Join(root, "state.json"), helper: helperTest}
	if err := os.Mkdir(l.Dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := saveState(l.state, &localState{Dir: l.Dir, Paths: map[string]*Path{}}); err != nil {
		t.Fatal(err)
	}
	return l
}

// Command runs argv (argv[0] is "nix-store") as the fake nix-store of l:
// localstore.Options.Command.
func (l *LocalStore) Command(argv ...string) *exec.Cmd {
	args := append([]string{"-test.run=^" + l.helper + "$", "--"}, argv[1:]...)
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), nixStoreEnv+"="+l.state)
	return cmd
}

// Add makes a path valid in the store, with its files written under Dir
// by the caller if needed. A NarHash or NarSize left empty is computed
// from narBytes.
func (l *LocalStore) Add(t testing.TB, info serveproto.PathInfo, narBytes []byte) {
	t.Helper()
	st, err := loadState(l.state)
	if err != nil {
		t.Fatal(err)
	}
	var s Server
	s.Add(info, narBytes)
	for p, v := range s.paths {
		st.Paths[p] = v
	}
	if err := saveState(l.state, st); err != nil {
		t.Fatal(err)
	}
}

// Registered returns the paths of every `nix-store --register-validity`
// that ran, one slice per run.
func (l *LocalStore) Registered(t testing.TB) [][]string {
	t.Helper()
	st, err := loadState(l.state)
	if err != nil {
		t.Fatal(err)
	}
	return st.Registered
}

// Valid reports whether path is valid in the store.
func (l *LocalStore) Valid(t testing.TB, path string) bool {
	t.Helper()
	st, err := loadState(l.state)
	if err != nil {
		t.Fatal(err)
	}
	_, ok := st.Paths[path]
	return ok
}

// RunNixStoreHelper makes a helper process started by
// [LocalStore.Command] act as nix-store and exit. In any other process it
// returns at once. Call it first in the helper test:
//
//	func TestNixStoreHelper(t *testing.T) { servetest.RunNixStoreHelper() }
func RunNixStoreHelper() {
	state := os.Getenv(nixStoreEnv)
	if state == "" {
		return
	}
	os.Exit(nixStore(state, flag.Args(), os.Stdin, os.Stdout, os.Stderr))
}

// nixStore runs the nix-store commands localstore uses.
func nixStore(state string, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	switch {
	case len(args) >= 1 && args[0] == "--serve":
		srv := &Server{reload: func(s *Server) {
			st, err := loadState(state)
			if err != nil {
				fmt.Fprintf(stderr, "error: %v\n", err)
				return
			}
			s.mu.Lock()
			s.paths = st.Paths
			s.mu.Unlock()
		}}
		return srv.Serve(stdin, stdout, stderr)
	case len(args) == 2 && args[0] == "--register-validity" && args[1] == "--hash-given":
		if err := register(state, stdin); err != nil {
			fmt.Fprintf(stderr, "error: %v\n", err)
			return 1
		}
		return 0
	}
	fmt.Fprintf(stderr, "error: servetest's nix-store does not do %q\n", args)
	return 1
}

// register reads the input of `nix-store --register-validity --hash-given`
// (nix 2.8.0 src/libstore/store-api.cc decodeValidPathInfo: path, narHash,
// narSize, deriver, number of references, references) and makes the paths
// valid, all or none. Like Nix, it wants each path's files in place.
func register(state string, in io.Reader) error {
	st, err := loadState(state)
	if err != nil {
		return err
	}
	sc := bufio.NewScanner(in)
	line := func() (string, bool) {
		if !sc.Scan() {
			return "", false
		}
		return sc.Text(), true
	}
	var batch []string
	added := map[string]*Path{}
	for {
		p, ok := line()
		if !ok || p == "" {
			break
		}
		if err := checkStorePath(p); err != nil {
			return err
		}
		var info serveproto.PathInfo
		info.Path = p
		var size, nrefs string
		var ok2, ok3, ok4, ok5 bool
		info.NarHash, ok2 = line()
		size, ok3 = line()
		info.Deriver, ok4 = line()
		nrefs, ok5 = line()
		if !ok2 || !ok3 || !ok4 || !ok5 {
			return fmt.Errorf("register-validity: input for %s ends early", p)
		}
		if info.NarSize, err = strconv.ParseUint(size, 10, 64); err != nil {
			return fmt.Errorf("register-validity: %s: narSize: %v", p, err)
		}
		n, err := strconv.Atoi(nrefs)
		if err != nil || n < 0 {
			return fmt.Errorf("register-validity: %s: number of references %q", p, nrefs)
		}
		for range n {
			ref, ok := line()
			if !ok {
				return fmt.Errorf("register-validity: references of %s end early", p)
			}
			info.References = append(info.References, ref)
		}
		if _, err := os.Lstat(filepath.Join(st.Dir, strings.TrimPrefix(p, StoreDir+"/"))); err != nil {
			return fmt.Errorf("register-validity: %s: %v", p, err)
		}
		added[p] = &Path{Info: info}
		batch = append(batch, p)
	}
	if err := sc.Err(); err != nil {
		return err
	}
	for p, v := range added {
		for _, ref := range v.Info.References {
			if _, ok := st.Paths[ref]; !ok && added[ref] == nil {
				return fmt.Errorf("cannot register %s: reference %s is not valid", p, ref)
			}
		}
	}
	for p, v := range added {
		st.Paths[p] = v
	}
	st.Registered = append(st.Registered, batch)
	return saveState(state, st)
}

func loadState(file string) (*localState, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var st localState
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("%s: %v", file, err)
	}
	if st.Paths == nil {
		st.Paths = map[string]*Path{}
	}
	return &st, nil
}

// saveState replaces the state file at once, so that a reader never sees
// half of it.
func saveState(file string, st *localState) error {
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	tmp := file + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, file)
}
