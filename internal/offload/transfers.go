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
	// query, added itself, or built (outputs of known path).
	MarkLocked(paths []string)
	// Known reports whether every one of paths is valid on the machine as
	// far as this process knows: it sent them, built them or found them
	// there, though this session has not locked them. A belief can be
	// stale (a garbage collection on the machine): Run then checks and
	// locks them in the same flight as the build, and recovers if one is
	// gone.
	Known(paths []string) bool
	// Present records paths found valid on the machine without being
	// locked by the session: floating content-addressed outputs it built.
	Present(paths []string)
	// Forget records paths found not valid on the machine.
	Forget(paths []string)
	// Claim is called before a path is sent. upload: the caller sends it and
	// then calls done with the outcome. Otherwise another build on the same
	// machine sent it while Claim waited, and done is nil. If that other
	// upload failed, Claim hands the path to this caller instead.
	Claim(ctx context.Context, path string) (upload bool, done func(error), err error)
	// ClaimAll claims every one of paths for one flight of uploads, if no
	// other build is sending any of them: the caller sends them all and
	// then calls done for each with its outcome. ok false claims nothing;
	// the caller then claims them one at a time.
	ClaimAll(ctx context.Context, paths []string) (ok bool, done func(path string, err error), err error)
}
