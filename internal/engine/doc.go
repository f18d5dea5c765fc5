// Package engine runs one accepted build to its end, whichever front door
// accepted it: the hook working alone, the broker, and the commands to come.
// It picks up a machine and a slot from a [Placer], runs the build there
// with internal/offload, watches Nix's limits, gates the machine's stderr
// into the build log, and moves the build to another machine when the one
// it ran on was lost.
//
// # Placers
//
// A [Placer] hands out [Lease]s: a slot on a machine and a serve [Session]
// there. There are two:
//
//   - [Alone], for a hook that works without a broker: slots are lock files
//     shared by every hook of the host (internal/slots), health is the
//     host's shared file (internal/health), and each session is opened for
//     this one build and closed after it.
//   - the broker's (internal/broker), over its in-memory queue and its
//     pools of warm sessions.
//
// # Protocols
//
// A machine of protocol ssh (`ssh://`) gets a serve session ([OpenServe]) and
// the build runs with offload.Run; one of protocol ssh-ng gets a daemon
// protocol session ([OpenDaemon], a [DaemonSession]) and the build runs with
// offload.RunDaemon. Both placers open either kind; the log, limits and
// retries are the same. What a graph build reads from a machine that holds
// a path (is it valid, its metadata, its NAR) goes through [StoreOf], one
// [MachineStore] over either kind of session.
//
// # Retries
//
// One rule, [RetryElsewhere], decides whether a failed attempt goes to
// another machine: it does when the machine, its link or its nix-store went
// away before any output was fetched. A build that ran and failed, a limit
// that passed, a failure of the local store and a cancelled build are
// final. A build is tried on at most [MaxMachines] machines.
//
// [Permanent] says which connection failures cannot get better until
// someone changes the configuration (host key mismatch, unknown host,
// authentication refused, no nix-store on the machine): a placer fails a
// build at once when they are all that is left, as Nix's own hook does,
// instead of waiting for the machine to come back.
//
// # Limits
//
// Nix enforces neither max-silent-time nor timeout on hook builds. The
// machine is told both, and [WatchLimits] enforces them LimitGrace later
// with an injected [Clock].
package engine
