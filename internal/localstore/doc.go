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
// What works on every Nix from 2.8 to 2.35 (the input format is the same in
// every tag; run here on 2.8, 2.26 and 2.34) takes no lock at all:
// [Store.AddOutputs] unpacks each NAR at the output's path itself and then
// runs one `nix-store --register-validity --hash-given`, which writes the
// paths' metadata (narHash, narSize, deriver, references) into the database
// in one transaction and canonicalises their files (mode, mtime 1, owner).
// It needs what the hook has: root, and a writable store (nix-daemon's
// mount namespace).
//
// Nearly all that registration costs is nix-store starting: loading Nix's
// libraries and configuration and opening the database take 12–20 ms on
// the test bed (an empty `--register-validity` on Nix 2.8, 2.26 and 2.34),
// the registration of a few outputs 1–2 ms. Nix's registerValidity reads
// its input before it asks the store anything, so [Store.StartRegistration]
// starts the process early (the hook does at `# accept`) and AddOutputs
// gives it its input when the outputs are in place: the start-up overlaps
// the remote build. Waiting for its input it holds only what any Nix
// process with the store open holds. An empty input registers nothing, and
// one cut inside a record fails before anything is registered (NixOS/nix
// 2.8.0 src/libstore/store-api.cc decodeValidPathInfo: "missing input");
// the input goes in one write, so the hook's death cannot cut it between
// two records.
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
//     invalid path), and are registered, together, in one command.
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
// AddOutputs writes the trees itself but runs nix-store for the database.
// In the hook both see the same /nix/store. In tests, nix-store runs in a
// mount namespace where a test directory D is /nix, so Options.RealStoreDir
// (D/store) says where this process finds what nix-store calls StoreDir.
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
