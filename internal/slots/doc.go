// Package slots keeps count of the builds each remote machine runs from this host, shared by
// every hook process, so that a machine with parallel-builds = 4 gets at most four builds
// however many nix-daemon workers ask at once. It is what the hook uses when no broker owns
// the global view (embedded mode); Nix's build-remote does the same with
// <state>/current-load (NixOS/nix src/build-remote/build-remote.cc).
//
// # Files
//
// A [Dir] (the hook uses <state-dir>/slots) holds one lock file per slot and one main lock:
//
//	main.lock             serialises "count the load, pick a machine, take a slot"
//	root@b1:22-0 … -3     the slots of machine "root@b1:22", which has parallel-builds = 4
//
// A slot is in use while some process holds an exclusive flock(2) on its file; the file's
// existence and content mean nothing. The kernel drops the lock when the last descriptor of
// the holder goes away, which includes the holder being killed with SIGKILL, so a slot never
// outlives the build that took it and there is nothing to clean up after a crash. Files are
// opened close-on-exec, so the ssh and nix-store processes a hook starts never hold a slot.
// flock locks belong to the open file, not the process: two opens in one process exclude each
// other as two processes do, so goroutines of one process can use a Dir concurrently too.
//
// File names come from [machines.Machine.Name]: bytes other than ASCII letters, digits and
// ". _ - @ : + =" are written as %XX, and a name whose escaped form is longer than 200 bytes
// is cut and given a SHA-256 suffix, so any name gives a distinct, stable, safe file name.
//
// # Use
//
// Every hook process takes slots the same way, holding the main lock only for the decision:
//
//	unlock, err := d.Lock(ctx)
//	load, err := d.Load(ms)
//	dec := scheduler.Decide(ms, req, load, down)
//	for _, m := range dec.Candidates {
//		if slot, ok, err := d.Acquire(m); ok { … }
//	}
//	unlock()
//	… build …
//	slot.Release()
//
// Without the main lock, two hooks could both count three of four slots used and both go to
// the machine whose last slot only one of them gets. Slots are released without it: a release
// only makes the count drop, which never misleads a decision.
package slots
