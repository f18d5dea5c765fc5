package localstore

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/nix-offload/nix-offload/internal/flock"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	_ "modernc.org/sqlite" // the "sqlite" database/sql driver: SQLite itself, in Go
)

// DefaultDBDir is where Nix keeps the database of the default store
// (NIX_STATE_DIR/db, NIX_STATE_DIR being /nix/var/nix unless set).
const DefaultDBDir = "/nix/var/nix/db"

// nixSchemaVersion is the version of Nix's database schema whose rows
// registerDirect writes: the "schema" file of every Nix from 2.0 to 2.35
// says 10 (src/libstore/local-store.hh nixSchemaVersion, 2.8.0 and 2.34.8).
const nixSchemaVersion = "10"

// directBusyTimeout bounds how long registerDirect waits for another
// process's write transaction (Nix itself waits up to an hour, then retries).
const directBusyTimeout = 60 * time.Second

// errNotDirect says why registerDirect did not try: the registration is
// left to nix-store, which knows what this code does not.
type errNotDirect struct{ why string }

func (e *errNotDirect) Error() string { return "not written directly: " + e.why }

// DirectDBDir returns the database directory a process with the
// environment getenv may write outputs' rows into itself
// ([Options.DBDir]), or "" if only nix-store may: when any variable that
// moves Nix's store, state or database elsewhere is set, or setting, which
// looks up nix-daemon's settings, says that the store is not the local one
// at its default place, that its database is not in WAL mode (with
// use-sqlite-wal = false Nix locks it with dot files, which another SQLite
// cannot see), or that the file systems are to be synced before paths are
// registered (sync-before-registering). On systems other than Linux it
// always returns "".
func DirectDBDir(setting func(name string) string, getenv func(name string) string) string {
	if runtime.GOOS != "linux" {
		return "" // see canonicalise
	}
	for _, v := range []string{"NIX_REMOTE", "NIX_STORE_DIR", "NIX_STORE", "NIX_STATE_DIR", "NIX_DB_DIR"} {
		if getenv(v) != "" {
			return ""
		}
	}
	switch setting("store") {
	case "", "auto", "local":
	default:
		return ""
	}
	if setting("use-sqlite-wal") == "false" {
		return ""
	}
	if setting("sync-before-registering") == "true" {
		return "" // nix-store syncs the file systems first, as asked
	}
	return DefaultDBDir
}

// directReady reports why the database in s.opt.DBDir is not one
// registerDirect may write into, or nil if it is: Nix's schema version 10,
// and a database file in WAL mode (bytes 18 and 19 of its header are 2).
// It reads two small files and opens nothing else.
func (s *Store) directReady() error {
	dir := s.opt.DBDir
	v, err := os.ReadFile(filepath.Join(dir, "schema"))
	if err != nil {
		return &errNotDirect{fmt.Sprintf("reading the schema version: %v", err)}
	}
	if got := strings.TrimSpace(string(v)); got != nixSchemaVersion {
		return &errNotDirect{fmt.Sprintf("the database's schema is version %q, not %s", got, nixSchemaVersion)}
	}
	f, err := os.Open(filepath.Join(dir, "db.sqlite"))
	if err != nil {
		return &errNotDirect{err.Error()}
	}
	defer f.Close()
	hdr := make([]byte, 20)
	if _, err := f.ReadAt(hdr, 0); err != nil {
		return &errNotDirect{fmt.Sprintf("reading the database header: %v", err)}
	}
	if !bytes.HasPrefix(hdr, []byte("SQLite format 3\x00")) {
		return &errNotDirect{"the database file is not SQLite 3"}
	}
	if hdr[18] != 2 || hdr[19] != 2 {
		return &errNotDirect{"the database is not in WAL mode"}
	}
	return nil
}

// registerDirect makes outs valid by writing their rows into Nix's
// database itself, as `nix-store --register-validity --hash-given` would
// (NixOS/nix 2.8.0 and 2.34.8, src/nix-store/nix-store.cc
// registerValidity and src/libstore/local-store.cc registerValidPaths):
//
//   - each path's files are canonicalised first (see canonicalise);
//   - with the big lock held shared, as every Nix process with the store
//     open holds it (exclusive only while Nix upgrades the schema);
//   - in one write transaction: for each path not valid yet, a ValidPaths
//     row (path, "sha256:" and the base-16 narHash, the registration time,
//     the deriver, narSize; no ultimate, sigs or ca); then a Refs row for
//     every reference, each of which must be valid or in the batch. A path
//     that is valid already is left as it is, as nix-store leaves it.
//
// Nothing is valid until the transaction commits, and then all of outs
// are: SQLite's own locking, the same code as the SQLite linked into Nix,
// keeps it atomic against nix-daemon and every other Nix process.
//
// It leaves alone what it does not know how to write, with an
// *errNotDirect: a database not in WAL mode or of another schema version,
// a big lock held exclusively, an output that is a derivation (Nix also
// records the outputs of a .drv it registers).
func (s *Store) registerDirect(outs []*output) error {
	if err := s.directReady(); err != nil {
		return err
	}
	infos := make([]serveproto.PathInfo, len(outs))
	for i, o := range outs {
		if strings.HasSuffix(o.path, ".drv") {
			return &errNotDirect{fmt.Sprintf("%s is a derivation", o.path)}
		}
		infos[i] = serveproto.PathInfo{Path: o.path, References: o.refs}
	}
	if _, err := TopoSort(infos); err != nil {
		return err
	}
	unlock, err := lockShared(filepath.Join(s.opt.DBDir, "big-lock"))
	if err != nil {
		return err
	}
	defer unlock()

	for _, o := range outs {
		if err := canonicalise(filepath.Join(s.opt.RealStoreDir, o.base)); err != nil {
			return fmt.Errorf("localstore: output %s: %w", o.path, err)
		}
	}
	s.opt.Mark("canonicalised")

	db, err := openNixDB(s.opt.DBDir)
	if err != nil {
		return err
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), directBusyTimeout)
	defer cancel()
	tx, err := db.BeginTx(ctx, nil) // BEGIN IMMEDIATE: the write lock first, see openNixDB
	if err != nil {
		return fmt.Errorf("localstore: Nix's database: %w", err)
	}
	defer tx.Rollback()
	if err := insertRows(ctx, tx, outs, time.Now().Unix()); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("localstore: Nix's database: committing: %w", err)
	}
	s.opt.Mark("registered")
	return nil
}

// openNixDB opens Nix's database in dir as Nix opens it (src/libstore/
// sqlite.cc and local-store.cc openDB): read-write, never created,
// foreign keys on, synchronous "normal" (the default fsync-metadata),
// its journal mode left as it is. Transactions begin IMMEDIATE, so a
// transaction that will write waits for the write lock (up to
// directBusyTimeout) before it reads, instead of failing when another
// process wrote between its read and its write.
func openNixDB(dir string) (*sql.DB, error) {
	q := url.Values{}
	q.Set("mode", "rw")
	q.Set("_txlock", "immediate")
	q.Add("_pragma", fmt.Sprintf("busy_timeout(%d)", directBusyTimeout.Milliseconds()))
	q.Add("_pragma", "foreign_keys(1)")
	q.Add("_pragma", "synchronous(normal)")
	dsn := (&url.URL{Scheme: "file", OmitHost: true, Path: filepath.Join(dir, "db.sqlite"), RawQuery: q.Encode()}).String()
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("localstore: Nix's database: %w", err)
	}
	db.SetMaxOpenConns(1)
	return db, nil
}

// insertRows writes outs' rows in tx: see registerDirect.
func insertRows(ctx context.Context, tx *sql.Tx, outs []*output, now int64) error {
	id := func(path string) (int64, bool, error) {
		var n int64
		err := tx.QueryRowContext(ctx, "select id from ValidPaths where path = ?", path).Scan(&n)
		if errors.Is(err, sql.ErrNoRows) {
			return 0, false, nil
		}
		if err != nil {
			return 0, false, fmt.Errorf("localstore: Nix's database: looking up %s: %w", path, err)
		}
		return n, true, nil
	}
	ids := make(map[string]int64, len(outs))
	var added []*output
	for _, o := range outs {
		if _, valid, err := id(o.path); err != nil {
			return err
		} else if valid {
			continue
		}
		var deriver any
		if o.deriver != "" {
			deriver = o.deriver
		}
		res, err := tx.ExecContext(ctx,
			"insert into ValidPaths (path, hash, registrationTime, deriver, narSize) values (?, ?, ?, ?, ?)",
			o.path, "sha256:"+hex.EncodeToString(o.sha256), now, deriver, o.size)
		if err != nil {
			return fmt.Errorf("localstore: Nix's database: adding %s: %w", o.path, err)
		}
		if ids[o.path], err = res.LastInsertId(); err != nil {
			return fmt.Errorf("localstore: Nix's database: adding %s: %w", o.path, err)
		}
		added = append(added, o)
	}
	var missing []string
	for _, o := range added {
		for _, ref := range o.refs {
			refID, ok := ids[ref]
			if !ok {
				n, valid, err := id(ref)
				if err != nil {
					return err
				}
				if !valid {
					missing = append(missing, ref)
					continue
				}
				refID = n
			}
			if _, err := tx.ExecContext(ctx, "insert or replace into Refs (referrer, reference) values (?, ?)", ids[o.path], refID); err != nil {
				return fmt.Errorf("localstore: Nix's database: recording that %s refers to %s: %w", o.path, ref, err)
			}
		}
	}
	if len(missing) > 0 {
		slices.Sort(missing)
		missing = slices.Compact(missing)
		return fmt.Errorf("localstore: outputs refer to paths that are neither valid here nor among the outputs: %w", &NotValidError{Paths: missing})
	}
	return nil
}

// lockShared takes flock(LOCK_SH) on name, creating it if need be, as Nix
// takes its big lock when it opens the store. It does not wait: the lock
// is held exclusively only while a Nix upgrades the schema, and then the
// registration is better left to a nix-store that waits for it.
func lockShared(name string) (unlock func(), err error) {
	f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, &errNotDirect{fmt.Sprintf("the big lock: %v", err)}
	}
	ok, err := flock.TryLockShared(f)
	if !ok {
		f.Close()
		if err == nil {
			err = errors.New("held exclusively (a Nix is upgrading the schema)")
		}
		return nil, &errNotDirect{fmt.Sprintf("the big lock %s: %v", name, err)}
	}
	return func() { f.Close() }, nil
}
