// Package graph builds a whole derivation graph across the machines, for
// `nix-offload-hook build`: the front door that sees every derivation at
// once, where nix-daemon hands the hook one derivation at a time.
//
// [Load] reads the closure of the requested derivations and keeps the part
// whose outputs are not valid locally: a [Plan]. [Execute] runs it: every
// derivation whose inputs are built starts at once, through a [Builder];
// without KeepGoing the first failure stops what has not started and lets
// what runs finish, with it everything that does not depend on the failure
// is built and the rest is DependencyFailed.
//
// [Remote] is the Builder over the engine (internal/engine): each
// derivation is one engine.Run on a placer's machine, its outputs stay on
// that machine (offload.Job.KeepOutputs), and an input built on another
// machine is streamed from there through this host into the target,
// never made valid here. The build itself finds out whether its inputs
// are still there (the builder's locking query, or the read from the
// holder); one a builder lost (garbage-collected, machine gone) sends its
// producer back into the plan. Only what the
// caller fetches comes home ([Remote.Fetch]), checked against narHash and
// made valid by internal/localstore.
//
// Build logs of every derivation, intermediates included, are written
// where Nix keeps them (LOGDIR/drvs/XX/REST), so `nix-store -l` and
// `nix log` show them.
package graph
