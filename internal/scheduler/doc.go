// Package scheduler decides what the hook answers nix-daemon for one build request: which
// machines may take it and in what order, or why it stays local, waits or fails. It follows
// Nix's own build-remote (NixOS/nix 2.8–2.35 src/build-remote/build-remote.cc and
// src/libstore/machines.cc) where users rely on it, and says why in words wherever it does not
// accept. It does no I/O and reads no clock: the caller brings the machines, the load of each
// one (package slots counts it across every hook process on the host) and the machines that
// failed recently, and gets back a [Decision].
//
// # Matching
//
// [Matches] is Nix's rule, load and health aside. A machine can build a request when
//
//   - it is enabled (a machines-file entry with max jobs 0 is listed but disabled),
//   - it lists the request's system, or the system is "builtin" (builtins such as
//     builtin:fetchurl run anywhere),
//   - every required feature is among its features or its mandatory features, and
//   - every one of its mandatory features is required: a machine with mandatory feature
//     "benchmark" takes only builds that ask for "benchmark".
//
// # Choice
//
// Among the machines that match, are not down and have a free slot (load below
// ParallelBuilds), [Place] orders the candidates by load ÷ speed, then the higher speed, then
// the lower load, then the order of the configuration, as build-remote does. The caller tries
// them in that order; the first whose slot it can take gets the build.
//
// Two things the caller may know come first (a [View]; [Decide] knows neither, as the hook
// working alone does not):
//
//   - A machine whose store's filesystem has less free space than its min-free-space, or whose
//     load per core is above its max-load, as it last said itself ([Live]), is not a candidate:
//     it counts as busy, and the reason says why ("b1 store has 8.1 GiB free, min-free-space
//     is 10 GiB"). What a machine did not say does not hold it back.
//   - Among the candidates, the one that already holds (or is being sent) most of the build's
//     input bytes goes first (View.Present). The bytes count weighted by the machine's share
//     of free slots, so that a machine with everything does not take every build while others
//     idle: with its slots half full, its bytes count half. Differences below 1 MiB do not
//     count; then the one that alone holds most of the build's inputs (View.Held: a graph's
//     outputs kept where they were built, which any other machine would have streamed to it
//     through this host, a few round trips each however small), so that a chain of small
//     steps stays on one machine; then load ÷ speed decides.
//
// # Replies
//
// Each [Verdict] is a reply line of the hook protocol (internal/hookproto: Accept, Decline,
// DeclinePermanently, Postpone):
//
//	no machine configured at all          → DeclinePermanently  nix-daemon stops asking this hook
//	requires "ca-derivations"             → Decline             see below
//	no machine could ever build it        → Decline             reason names what is missing
//	capable machines with a free slot     → Accept              Candidates, best first
//	all capable busy or down, amWilling   → Decline             "…; building locally"
//	all capable busy or down, !amWilling  → Postpone            nix-daemon asks again later
//
// Postpone is kept for the one case where declining would be wrong: nix-daemon cannot build
// locally (amWilling is false, e.g. max-jobs = 0) and up to Nix 2.29 a decline it cannot
// follow aborts the user's whole build; 2.35 fails the goal. When a capable machine exists,
// waiting for it is the right answer. When none exists, failing is the honest outcome, and
// the decline's reason tells the user why. Postpone costs the build up to build-poll-interval
// (5 s), so a broker that queues builds accepts and queues instead; Decide answers for a hook
// on its own.
//
// Floating content-addressed derivations (Nix adds "ca-derivations" to the required features
// when their outputs are unknown) are always declined: after such a build Nix checks for a
// realisation, which the hook would have to register, and no nix-store command registers
// one. Building it remotely would only end in "some outputs are unexpectedly invalid".
//
// Every Decision that does not accept carries a Reason for the log, such as
//
//	no machine supports system "aarch64-linux" (configured: x86_64-linux on b1, b2)
//	requires features {kvm} that no machine supports
//	all 2 capable machines are busy (b1 4/4, b2 4/4); building locally
//	all 2 capable machines are busy (b1 store has 8.1 GiB free, min-free-space is 10 GiB, b2 load 3.20 per core, max-load is 2); building locally
package scheduler
