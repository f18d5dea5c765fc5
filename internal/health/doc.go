// Package health remembers which remote machines failed recently, so that a machine that
// cannot be reached is skipped for a while instead of being dialled by every build. The
// memory is one file shared by every process on the host: the broker, hook processes that run
// without a broker, and a broker started after a crash all see the same machines down.
//
// # Backoff
//
// The rule is the one of Hydra's queue runner (NixOS/hydra src/hydra-queue-runner/build-remote.cc,
// retryInterval = 60, retryBackoff = 3, consecutive failures capped at 4). The n-th
// consecutive failure puts a machine down for
//
//	60 s × 3^(min(n, 4) − 1) + a random 0–30 s
//
// that is 1, 3, 9, then 27 minutes, plus jitter so that machines that failed together do not
// come back together. A success resets the count. [State.Failures] keeps counting past 4, so
// the log can say how long a machine has been failing; only the backoff stops growing.
//
// A failure counts only if it finds the machine up. Several builds that dialled a machine at
// once all fail when it goes away, and a machine on backoff may still be probed (see
// [Tracker.Probe]); those failures are one outage, not four, and must not put the machine
// down for 27 minutes at one stroke. Hydra gets the first half by not counting a failure less
// than 30 s after the last; as the shortest backoff is 60 s, this rule covers that one.
//
// # The file
//
// The state is JSON, in <state-dir>/health.json for the broker and the hook:
//
//	{
//		"version": 1,
//		"machines": {
//			"root@b1:22": {"failures": 2, "until": "…", "lastError": "…", "lastErrorAt": "…"}
//		}
//	}
//
// A machine that is not listed is healthy, so a missing file means every machine is. Every
// change is a read-modify-write under an exclusive flock(2) on "<file>.lock", which goroutines
// and processes alike wait for; the data file itself cannot carry the lock because it is
// replaced on every write. The new content goes to a temporary file in the same directory,
// which is synced and renamed over the old one, so a reader, which takes no lock, sees either
// the old state or the new one, never half of it.
//
// The directory is made with mode 0700 and the files with 0600, and a directory that is not
// this user's alone (a link, another owner, writable by others) or a lock file that others
// can open is not used: another local user could otherwise hold the lock and stall every
// process that records a failure, or forge the file. [Open] then says so, and the Tracker
// works in memory without further errors.
//
// # Problems never stop builds
//
// A file that cannot be parsed is treated as empty (every machine healthy) and replaced by
// the next change; one that cannot be read or written leaves the [Tracker] working from its
// memory, where changes it could not save survive [Tracker.Reload] and go out with the next
// write that works. Either way the methods still give a usable answer, and their error, if any, says
// what went wrong so that the caller can log it and carry on. [Open] returns a usable Tracker
// even when it also returns an error.
//
// # Use
//
//	t, err := health.Open(filepath.Join(stateDir, "health.json"))
//	if err != nil {
//		log(err) // t works anyway
//	}
//	dec := scheduler.Decide(ms, req, load, t.Down())
//	…
//	if err := dial(m); err != nil {
//		t.Failed(m.Name(), err)
//	} else {
//		t.Succeeded(m.Name())
//	}
//
// A [Tracker] reads the file in Open and in [Tracker.Reload], and again each time it records
// something; [Tracker.Get] and [Tracker.Down] answer from what it read last. A long-lived
// process calls Reload before it decides, to see what other processes recorded.
package health
