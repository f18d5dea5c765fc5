// Package hookproto is the hook side of Nix's build-hook protocol: how
// nix-daemon (or any Nix process that builds) hands a derivation to an
// external program, as in NixOS/nix 2.8.0 src/libstore/build/hook-instance.cc
// and derivation-goal.cc (tryBuildHook, handleChildOutput) and
// src/libutil/logging.cc (handleJSONLogMessage), checked against 2.26.4 and
// 2.35. This is the part a hook must get right; the recorded stdin of Nix
// 2.8, 2.26 and 2.34 in testdata/ (with its README) shows it byte by byte,
// and the contract block at the top of cmd/nix-offload-hook/cmd_hook.go
// says what the hook does with it.
//
// # Descriptors
//
// Nix starts the hook (the `build-hook` setting, with the verbosity
// appended as last argument) as the daemon's user, in a new session, in
// the daemon's mount namespace, with:
//
//	fd 0     Nix → hook: settings, requests, the accepted build's lists
//	fd 1, 2  hook → Nix: one pipe; replies and `@nix` JSON log lines
//	fd 4     hook → Nix: the build log (write end of a pipe)
//	fd 5     the read end of that same pipe (see [BuildLogFD])
//
// # Messages, in order
//
// Integers on fd 0 are u64 little-endian; a string is its length, its
// bytes and zero padding to a multiple of 8; a list is a count and that
// many strings.
//
//  1. The settings block, every setting Nix knows as text ([ReadSettings]).
//     It arrives together with the first request.
//  2. A request, "try" ([ReadRequest]): may the hook build this derivation?
//     Nix blocks, reading fd 2 one byte at a time, until the hook replies
//     with one line ([Accept], [Decline], [DeclinePermanently], [Postpone]).
//     `@nix` lines before the reply are handled as log messages; other
//     lines go to the daemon's own stderr (its journal), not to the user.
//  3. After a decline or postpone the same process gets the next request,
//     possibly for the same derivation again; when Nix has nothing more to
//     ask it closes fd 0 and [ReadRequest] returns io.EOF. After
//     decline-permanently Nix kills the hook.
//  4. After `# accept` and the machine line, Nix writes the input paths and
//     the wanted output names ([ReadAccepted]) and closes fd 0. It then
//     polls fd 4 (log) and fd 2 (`@nix` lines only: plain lines are
//     dropped) and waits for the first EOF on fd 2, which ends the build:
//     Nix kills the hook's process group and checks that every wanted
//     output is valid in its store. Exit status 0 means built; Nix ≤ 2.28
//     reads 100 as a permanent failure and 101 as a timeout, later
//     versions any non-zero status as a failure. Nix enforces neither
//     max-silent-time nor timeout on hook builds: that is the hook's job.
//
// An unknown reply, EOF on fd 2 before a reply, or outputs missing after
// exit 0 abort every goal of the Nix invocation, not just this one.
//
// # Logging
//
// [Logger] writes `@nix` JSON messages to fd 2. Nix treats them as trusted
// messages of this hook: "msg" reaches the user at its level, "start",
// "result" and "stop" drive activities that the user's progress bar shows.
// Every message carries every field any version's parser reads, because
// Nix ≤ 2.24.10 throws an uncaught exception on a missing one.
//
// # Why fd 4 is buffered
//
// All pipes are 64 KiB and Nix drains them only from its event loop, which
// stops while Nix waits on another hook's reply. A hook that writes the
// remote log straight to fd 4 can block there, stall the copy from the
// machine, and with ssh and Nix both waiting, deadlock. [BuildLog] queues
// the log in memory up to a bound and drops (and says so) rather than
// block. Nix counts fd 4 against max-build-log-size and kills the hook
// past it.
//
// A hook written in Go must also survive writing to fd 2 after Nix went
// away: a write to fd 1 or 2 that meets a closed pipe kills a Go program
// with SIGPIPE unless SIGPIPE is handled (signal.Notify).
//
// # Limits
//
// Every count and length read from fd 0 is checked against a named limit
// ([MaxSettings], [MaxSettingValueLen], [MaxPathLen], [MaxInputPaths], …)
// before anything is allocated; violations, truncation and bad padding
// are a [*ReadError]. The readers read exactly the bytes of their message,
// never more, so they can share one reader (a single bufio.Reader around
// os.Stdin, for fewer system calls, or os.Stdin itself).
package hookproto
