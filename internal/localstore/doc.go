// Package localstore is the build hook's access to the local Nix store: it
// reads the store through a local `nix-store --serve` session and makes the
// outputs of a remote build valid while nix-daemon holds their locks.
//
// # Reading
//
// [Store.Valid], [Store.PathInfos], [Store.Closure] and [Store.Dump] are
// QueryValidPaths, QueryPathInfos, QueryClosure and DumpStorePath of package
// serveproto, sent to `nix-store --serve` without --write: read-only
// commands, so the session cannot change the store. The session starts on
// first use and again after a failure ended it (the server exits on any
// error). Paths are checked before they are sent, and a path that is not
// valid is reported as a [*NotValidError] without ending the session.
// [TopoSort] orders path infos references-first, the order in which to send
// inputs to a machine.
//
// # Writing outputs while Nix holds their locks
//
// While the hook runs, the nix-daemon worker that started it holds
// flock(LOCK_EX) on "<output>.lock" for every output of the derivation, from
// before it asks the hook until after it has checked that the outputs are
// valid (NixOS/nix PathLocks::lockPaths in DerivationGoal). That rules out
// the usual ways of adding a path:
//
//   - `nix-store --import`, `nix copy` and imports through the daemon socket
//     all end in LocalStore::addToStore, which takes the same lock first,
//     so they wait forever for a worker that is waiting for them;
//   - NIX_HELD_LOCKS, which told an outside importer which locks to skip,
//     was removed in Nix 2.29 (and Nix never set it for a hook anyway).
//     Nix's own build-remote is linked into the worker and skips the lock
//     in process, which an external program cannot do.
//
// What works on every Nix from 2.8 to 2.35 takes no lock at all:
// [Store.AddOutputs] unpacks each NAR at the output's path itself and then
// registers the paths' metadata (narHash, narSize, deriver, references) in
// Nix's database, in one transaction, after giving their files the store's
// metadata (mode 0444/0555, mtime 1, owner). It needs what the hook has:
// root, and a writable store (nix-daemon's mount namespace).
//
// # Registering
//
// With [Options.DBDir] (the hook sets it through [DirectDBDir] whenever
// nix-daemon's store is the local one at its default place), AddOutputs
// writes the rows itself, with SQLite (modernc.org/sqlite: the same C
// code as the SQLite linked into Nix, translated to Go, so the same file
// locks and WAL index), as `nix-store --register-validity --hash-given`
// writes them: see registerDirect for what, and the integration test for
// the proof, which compares both stores' rows on 2.8, 2.26 and 2.34. It
// writes only a database it knows: schema version 10 (that of every Nix
// since 2.0), in WAL mode (with use-sqlite-wal = false, Nix locks the
// database with dot files another SQLite cannot see), with the big lock
// held shared as every Nix process holds it, and no output that is a
// derivation; and only on Linux, where canonicalise follows Nix's rules. Anything else, and any failure short of the commit, goes to
// nix-store after all, and [Options.Fallback] is told why.
//
// The reason is time. A `nix-store` process takes 12–48 ms to start on
// the test bed (loading Nix's libraries and configuration, opening the
// database), the transaction 1–3 ms, and the hook pays it once per
// derivation, with nix-daemon waiting. Without DBDir (or when falling
// back), one `nix-store --register-validity --hash-given` registers the
// batch; [Store.StartRegistration] starts it early (the hook does at
// `# accept`; with a database registerDirect can write, it starts
// nothing) so that its start-up overlaps the remote build. Nix's
// registerValidity reads its input before it asks the store anything, so
// waiting for its input it holds only what any Nix process with the store
// open holds. An empty input registers nothing, and one cut inside a
// record fails before anything is registered (NixOS/nix 2.8.0
// src/libstore/store-api.cc decodeValidPathInfo: "missing input"); the
// input goes in one write, so the hook's death cannot cut it between two
// records. The input format is the same in every tag from 2.8 to 2.35.
//
// A process that is not run by a worker (the build command) has no lock
// of its own on the outputs it fetches, and a hook may be writing the same
// output at that moment. With [Options.LockOutputs] it takes Nix's lock on
// each output first, as Nix's addToStore would (flock(LOCK_EX) on
// "<output>.lock", in path order; a lock file its holder removed while
// this process waited is stale, and the new one is taken), asks a fresh
// session which outputs are still not valid if any is on disk by then (a
// path is in place before it is registered, so one that is not cannot have
// become valid), writes only those, and releases the locks as Nix does.
//
// # What AddOutputs guarantees
//
//   - Nothing is touched before everything is checked: every path, deriver
//     and reference must be a well-formed store path directly in the store
//     directory (the names come from the build machine, which may be
//     hostile), every narHash a SHA-256 and every narSize possible.
//   - Outputs that are valid already are left alone and not fetched.
//     References outside the batch must be valid already.
//   - Each NAR is unpacked with nar.Restore, which never follows links and
//     never writes outside its target, into a staging directory inside the
//     store directory (the same file system, so moving it is a rename). Its
//     name starts with a dot, so it is never a store path. No more than
//     narSize bytes of a NAR are read, and its size and SHA-256 must equal
//     what the machine reported: the registered narHash is the one computed
//     from the bytes that were unpacked.
//   - Only when every NAR is verified do the trees move to their names,
//     replacing what an earlier failed attempt may have left there (an
//     invalid path), and are registered, together, in one transaction.
//   - On any error, the staging directory is removed, and so is every path
//     that was moved into place but did not become valid: a partial or
//     unverified output never becomes valid, and nothing is left behind. A
//     path that did become valid is never removed.
//
// Nix itself trusts the hash and size given to --hash-given, and checks only
// validity after the hook exits; the checks above are what stands between a
// machine's bytes and the local store.
//
// # Store directories in two mount namespaces
//
// AddOutputs writes the trees itself, and the database itself or through
// nix-store. In the hook all see the same /nix. In tests, nix-store runs
// in a mount namespace where a test directory D is /nix, so
// Options.RealStoreDir (D/store) says where this process finds what
// nix-store calls StoreDir, and Options.DBDir is D/var/nix/db.
//
// # Freshness
//
// A `nix-store --serve` process caches that a path was invalid (for an
// hour), so a session that looked at an output before it was registered
// would keep calling it invalid (seen on Nix 2.8, 2.26 and 2.34: after
// QueryPathInfos of a path that another process then registered, both
// QueryPathInfos and QueryValidPaths still call it invalid). AddOutputs
// therefore ends the read session before it checks validity and after it
// changes the store, and [Store.Refresh] does the same for callers that
// know the store changed under them.
package localstore
