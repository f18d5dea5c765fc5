package offload

import "context"

// Transfers lets the builds that run at once on one machine share their
// uploads. A nil Transfers in a [Job] means each build queries and sends
// its inputs by itself, as the embedded hook does.
type Transfers interface {
	// Locked splits paths into those the build's session already holds
	// valid and GC-locked on the machine (they need no query) and the rest.
	Locked(paths []string) (locked, rest []string)
	// MarkLocked records paths the session found valid with a locking
	// query, or added itself.
	MarkLocked(paths []string)
	// Claim is called before a path is sent. upload: the caller sends it and
	// then calls done with the outcome. Otherwise another build on the same
	// machine sent it while Claim waited, and done is nil. If that other
	// upload failed, Claim hands the path to this caller instead.
	Claim(ctx context.Context, path string) (upload bool, done func(error), err error)
}
