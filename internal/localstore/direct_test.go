package localstore

import (
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"golang.org/x/sys/unix"
)

// newNixDB makes a database directory with the tables and columns that
// registerDirect writes, as Nix's schema version 10 has them, in WAL mode,
// and one valid path, goodPath. Columns Nix has and registerDirect leaves
// NULL are there too, so a test sees that they stay NULL.
func newNixDB(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "db")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	db, err := sql.Open("sqlite", "file:"+filepath.Join(dir, "db.sqlite"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	for _, stmt := range []string{
		"pragma journal_mode = wal",
		`create table ValidPaths (id integer primary key autoincrement not null, path text unique not null,
			hash text not null, registrationTime integer not null, deriver text, narSize integer,
			ultimate integer, sigs text, ca text)`,
		`create table Refs (referrer integer not null, reference integer not null, primary key (referrer, reference),
			foreign key (referrer) references ValidPaths(id) on delete cascade,
			foreign key (reference) references ValidPaths(id) on delete restrict)`,
		"insert into ValidPaths (path, hash, registrationTime) values ('" + goodPath + "', 'sha256:00', 1)",
	} {
		if _, err := db.Exec(stmt); err != nil {
			t.Fatalf("%s: %v", stmt, err)
		}
	}
	writeFile(t, filepath.Join(dir, "schema"), "10")
	return dir
}

func writeFile(t *testing.T, name, contents string) {
	t.Helper()
	if err := os.WriteFile(name, []byte(contents), 0o644); err != nil {
		t.Fatal(err)
	}
}

// row is a ValidPaths row without its id and registration time, and the
// paths it refers to.
type row struct {
	Path, Hash                 string
	Deriver, Ultimate, Sig, CA any
	NarSize                    int64
	Refs                       string
}

func readRows(t *testing.T, dir string) map[string]row {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+filepath.Join(dir, "db.sqlite")+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	rows, err := db.Query(`select path, hash, deriver, coalesce(narSize, 0), ultimate, sigs, ca,
		coalesce((select group_concat(r.path, ' ') from (select v.path from Refs join ValidPaths v on reference = v.id
			where referrer = p.id order by v.path) r), '')
		from ValidPaths p`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	got := map[string]row{}
	for rows.Next() {
		var r row
		if err := rows.Scan(&r.Path, &r.Hash, &r.Deriver, &r.NarSize, &r.Ultimate, &r.Sig, &r.CA, &r.Refs); err != nil {
			t.Fatal(err)
		}
		got[r.Path] = r
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return got
}

// directStore is a Store on a store directory of its own and the database
// in dbDir, which must not run nix-store, and what it was told about
// falling back.
func directStore(t *testing.T, dbDir string) (s *Store, storeDir string, fallbacks *[]error) {
	t.Helper()
	storeDir = t.TempDir()
	fallbacks = new([]error)
	s, err := Open(Options{
		RealStoreDir: storeDir,
		DBDir:        dbDir,
		Command:      noNix(t),
		Fallback:     func(err error) { *fallbacks = append(*fallbacks, err) },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, storeDir, fallbacks
}

func serveNARs(nars map[string][]byte) func(string, io.Writer) error {
	return func(path string, w io.Writer) error {
		_, err := w.Write(nars[path])
		return err
	}
}

// Outputs become valid with the rows nix-store --register-validity writes:
// the narHash in base 16, narSize, the deriver, and references to each
// other, to themselves and to a path valid already. No process runs.
func TestRegisterDirect(t *testing.T) {
	dbDir := newNixDB(t)
	s, storeDir, fallbacks := directStore(t, dbDir)
	out := "/nix/store/11111111111111111111111111111111-multi"
	dev := "/nix/store/22222222222222222222222222222222-multi-dev"
	nars := map[string][]byte{out: makeNAR(t, "out"), dev: makeNAR(t, "dev")}
	infos := []serveproto.PathInfo{
		{Path: out, NarHash: narHash(nars[out]), NarSize: uint64(len(nars[out])), Deriver: goodDrv,
			References: []string{dev, goodPath, out}},
		{Path: dev, NarHash: narHash(nars[dev]), NarSize: uint64(len(nars[dev]))},
	}
	if err := s.AddMissing(infos, serveNARs(nars)); err != nil {
		t.Fatal(err)
	}
	if len(*fallbacks) > 0 {
		t.Errorf("fell back to nix-store: %v", *fallbacks)
	}
	// What it registered is valid without a question (noNix fails the
	// test if a read session starts).
	if valid, err := s.Valid([]string{out, dev}); err != nil || !slices.Equal(valid, []string{out, dev}) {
		t.Errorf("Valid: %q, %v; want both", valid, err)
	}
	base16 := func(b []byte) string {
		sum := sha256.Sum256(b)
		return "sha256:" + hex.EncodeToString(sum[:])
	}
	want := map[string]row{
		goodPath: {Path: goodPath, Hash: "sha256:00"},
		out: {Path: out, Hash: base16(nars[out]), Deriver: goodDrv, NarSize: int64(len(nars[out])),
			Refs: strings.Join([]string{goodPath, out, dev}, " ")},
		dev: {Path: dev, Hash: base16(nars[dev]), NarSize: int64(len(nars[dev]))},
	}
	if diff := cmp.Diff(want, readRows(t, dbDir)); diff != "" {
		t.Errorf("rows (-want +got):\n%s", diff)
	}
	// The files are canonical.
	for _, p := range []string{out, dev} {
		root := filepath.Join(storeDir, strings.TrimPrefix(p, "/nix/store/"))
		for _, name := range []string{root, filepath.Join(root, "file")} {
			st, err := os.Lstat(name)
			if err != nil {
				t.Fatal(err)
			}
			if wantMode := map[bool]os.FileMode{true: os.ModeDir | 0o555, false: 0o444}[st.IsDir()]; st.Mode() != wantMode || st.ModTime().Unix() != mtimeStore {
				t.Errorf("%s: mode %v, mtime %v; want %v, 1", name, st.Mode(), st.ModTime().Unix(), wantMode)
			}
		}
	}
}

// A reference that is neither valid nor in the batch fails the whole batch:
// no row is written and nothing is left in the store directory.
func TestRegisterDirectReferenceNotValid(t *testing.T) {
	dbDir := newNixDB(t)
	s, storeDir, fallbacks := directStore(t, dbDir)
	a := "/nix/store/11111111111111111111111111111111-a"
	b := "/nix/store/22222222222222222222222222222222-b"
	gone := "/nix/store/33333333333333333333333333333333-gone"
	nars := map[string][]byte{a: makeNAR(t, "a"), b: makeNAR(t, "b")}
	err := s.AddMissing([]serveproto.PathInfo{
		{Path: a, NarHash: narHash(nars[a]), NarSize: uint64(len(nars[a]))},
		{Path: b, NarHash: narHash(nars[b]), NarSize: uint64(len(nars[b])), References: []string{a, gone}},
	}, serveNARs(nars))
	var nv *NotValidError
	if !errors.As(err, &nv) || len(nv.Paths) != 1 || nv.Paths[0] != gone {
		t.Fatalf("got %v, want %s not valid", err, gone)
	}
	if len(*fallbacks) > 0 {
		t.Errorf("fell back to nix-store: %v", *fallbacks)
	}
	if rows := readRows(t, dbDir); len(rows) != 1 {
		t.Errorf("rows written: %v", rows)
	}
	ents, _ := os.ReadDir(storeDir)
	for _, e := range ents {
		t.Errorf("left in the store: %s", e.Name())
	}
}

// What registerDirect cannot write goes to nix-store, and the Fallback says
// why; it writes no row first.
func TestRegisterDirectFallsBack(t *testing.T) {
	tests := []struct {
		name  string
		edit  func(t *testing.T, dbDir string)
		path  string
		wants string
	}{
		{"another schema version", func(t *testing.T, dir string) { writeFile(t, filepath.Join(dir, "schema"), "11\n") }, "", `schema is version "11"`},
		{"no schema file", func(t *testing.T, dir string) { os.Remove(filepath.Join(dir, "schema")) }, "", "schema version"},
		{"not in WAL mode", func(t *testing.T, dir string) {
			db, err := sql.Open("sqlite", "file:"+filepath.Join(dir, "db.sqlite"))
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			if _, err := db.Exec("pragma journal_mode = truncate"); err != nil {
				t.Fatal(err)
			}
		}, "", "not in WAL mode"},
		{"big lock held exclusively", func(t *testing.T, dir string) {
			f, err := os.OpenFile(filepath.Join(dir, "big-lock"), os.O_RDWR|os.O_CREATE, 0o600)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { f.Close() })
			if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
				t.Fatal(err)
			}
		}, "", "big lock"},
		{"a derivation", func(*testing.T, string) {}, "/nix/store/11111111111111111111111111111111-x.drv", "is a derivation"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dbDir := newNixDB(t)
			tt.edit(t, dbDir)
			var ran []string
			var fallbacks []error
			s, err := Open(Options{
				RealStoreDir: t.TempDir(),
				DBDir:        dbDir,
				Command: func(argv ...string) *exec.Cmd {
					ran = append(ran, strings.Join(argv, " "))
					if !slices.Contains(argv, "--register-validity") {
						return exec.Command("false") // the read session, after the failure
					}
					return exec.Command("/bin/sh", "-c", "cat >/dev/null; echo injected nix-store failure >&2; exit 1")
				},
				Fallback: func(err error) { fallbacks = append(fallbacks, err) },
			})
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			p := tt.path
			if p == "" {
				p = "/nix/store/11111111111111111111111111111111-x"
			}
			nars := map[string][]byte{p: makeNAR(t, "x")}
			err = s.AddMissing([]serveproto.PathInfo{{Path: p, NarHash: narHash(nars[p]), NarSize: uint64(len(nars[p]))}}, serveNARs(nars))
			if err == nil || !strings.Contains(err.Error(), "injected nix-store failure") {
				t.Errorf("AddMissing: %v; want nix-store's failure", err)
			}
			if len(ran) == 0 || !strings.Contains(ran[0], "--register-validity") {
				t.Errorf("ran %q, want nix-store --register-validity", ran)
			}
			if len(fallbacks) != 1 || !strings.Contains(fallbacks[0].Error(), tt.wants) {
				t.Errorf("Fallback told %v, want one error saying %q", fallbacks, tt.wants)
			}
			if rows := readRows(t, dbDir); len(rows) != 1 {
				t.Errorf("rows written: %v", rows)
			}
		})
	}
}

// StartRegistration starts no process when the rows can be written
// directly, and starts nix-store when they cannot.
func TestStartRegistrationDirect(t *testing.T) {
	dbDir := newNixDB(t)
	s, _, _ := directStore(t, dbDir) // noNix fails the test if nix-store runs
	s.StartRegistration()
	if r := s.takePending(); r != nil {
		t.Errorf("a registration process was started")
	}
	writeFile(t, filepath.Join(dbDir, "schema"), "11")
	started := make(chan struct{}, 1)
	s2, err := Open(Options{RealStoreDir: t.TempDir(), DBDir: dbDir, Command: func(argv ...string) *exec.Cmd {
		started <- struct{}{}
		return exec.Command("/bin/sh", "-c", "cat >/dev/null")
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	s2.StartRegistration()
	r := s2.takePending()
	if r == nil {
		t.Fatal("no registration process with a database of another schema")
	}
	<-started
	r.abandon()
}

// canonicalise gives every node the mode and mtime of the store, keeps
// symlinks unfollowed, removes extended attributes and refuses what no
// store path may hold.
func TestCanonicalise(t *testing.T) {
	root := filepath.Join(t.TempDir(), "out")
	mustDo(t, os.MkdirAll(filepath.Join(root, "dir"), 0o755))
	mustDo(t, os.WriteFile(filepath.Join(root, "plain"), []byte("x"), 0o644))
	mustDo(t, os.WriteFile(filepath.Join(root, "dir", "tool"), []byte("#!/bin/sh"), 0o700))
	outside := filepath.Join(t.TempDir(), "outside")
	mustDo(t, os.WriteFile(outside, []byte("y"), 0o600))
	mustDo(t, os.Symlink(outside, filepath.Join(root, "link")))
	xattrs := unix.Lsetxattr(filepath.Join(root, "plain"), "user.nix-offload-test", []byte("1"), 0) == nil

	mustDo(t, canonicalise(root))
	for name, want := range map[string]os.FileMode{
		"":         os.ModeDir | 0o555,
		"dir":      os.ModeDir | 0o555,
		"plain":    0o444,
		"dir/tool": 0o555,
		"link":     os.ModeSymlink | 0o777,
	} {
		st, err := os.Lstat(filepath.Join(root, name))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode() != want || st.ModTime().Unix() != mtimeStore {
			t.Errorf("%q: mode %v, mtime %d; want %v, 1", name, st.Mode(), st.ModTime().Unix(), want)
		}
	}
	if st, err := os.Stat(outside); err != nil || st.Mode() != 0o600 || st.ModTime().Unix() == mtimeStore {
		t.Errorf("the symlink's target was changed: %v, %v", st.Mode(), err)
	}
	if xattrs {
		if n, err := unix.Lgetxattr(filepath.Join(root, "plain"), "user.nix-offload-test", nil); !errors.Is(err, unix.ENODATA) {
			t.Errorf("extended attribute still there: %d, %v", n, err)
		}
	} else {
		t.Log("this file system takes no user extended attributes; their removal is not checked")
	}

	fifo := filepath.Join(t.TempDir(), "out")
	mustDo(t, os.Mkdir(fifo, 0o755))
	mustDo(t, unix.Mkfifo(filepath.Join(fifo, "pipe"), 0o644))
	if err := canonicalise(fifo); err == nil || !strings.Contains(err.Error(), "unsupported file type") {
		t.Errorf("a FIFO: %v, want refused", err)
	}
}

func mustDo(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// Only nix-daemon's own local store at its default place is written
// directly: any setting or variable that moves it leaves it to nix-store.
func TestDirectDBDir(t *testing.T) {
	tests := []struct {
		name     string
		settings map[string]string
		env      map[string]string
		want     string
	}{
		{"defaults", nil, nil, DefaultDBDir},
		{"store = auto", map[string]string{"store": "auto"}, nil, DefaultDBDir},
		{"store = local", map[string]string{"store": "local"}, nil, DefaultDBDir},
		{"use-sqlite-wal = true", map[string]string{"use-sqlite-wal": "true"}, nil, DefaultDBDir},
		{"store = daemon", map[string]string{"store": "daemon"}, nil, ""},
		{"a chroot store", map[string]string{"store": "/srv/nix"}, nil, ""},
		{"local with a root", map[string]string{"store": "local?root=/srv/nix"}, nil, ""},
		{"use-sqlite-wal = false", map[string]string{"use-sqlite-wal": "false"}, nil, ""},
		{"sync-before-registering = true", map[string]string{"sync-before-registering": "true"}, nil, ""},
		{"sync-before-registering = false", map[string]string{"sync-before-registering": "false"}, nil, DefaultDBDir},
		{"NIX_REMOTE", nil, map[string]string{"NIX_REMOTE": "daemon"}, ""},
		{"NIX_STATE_DIR", nil, map[string]string{"NIX_STATE_DIR": "/srv/state"}, ""},
		{"NIX_STORE_DIR", nil, map[string]string{"NIX_STORE_DIR": "/srv/store"}, ""},
		{"NIX_DB_DIR", nil, map[string]string{"NIX_DB_DIR": "/srv/db"}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := DirectDBDir(func(n string) string { return tt.settings[n] }, func(n string) string { return tt.env[n] })
			if got != tt.want {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}
