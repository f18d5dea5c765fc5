// Package daemonproto is the client side of Nix's daemon (worker)
// protocol as a remote build needs it: what `ssh-ng://` machines speak
// through `nix-daemon --stdio`, as in NixOS/nix 2.34.8
// src/libstore/worker-protocol-connection.cc (the client),
// src/libstore/daemon.cc (the server) and src/libstore/worker-protocol.cc
// (the records), checked against NixOS/nix 2.8.0
// src/libstore/remote-store.cc. docs/reference/front-doors.md section 1
// has the account of the op sequence that build-remote follows.
//
// It is the twin of package serveproto: one struct per operation in
// ops.go, with its opcode and the Nix source it was read from; the same
// errors; the same limits; NARs parsed by package nar.
//
// # The protocol
//
// The client starts the daemon (usually `ssh host nix-daemon --stdio`)
// and talks to it over its stdin and stdout. Integers, strings and lists
// are as in the serve protocol (package wire). After the greeting
// ([Handshake]) the client sends one request at a time: a u64 opcode and
// its arguments. The daemon answers with a stream of log messages, ended
// by STDERR_LAST, and then the reply:
//
//	19 SetOptions             [Conn.SetOptions]
//	26 QueryPathInfo          [Conn.QueryPathInfo]
//	31 QueryValidPaths        [Conn.QueryValidPaths]
//	36 BuildDerivation        [Conn.BuildDerivation]
//	38 NarFromPath            [Conn.NarFromPath]
//	44 AddMultipleToStore     [Conn.AddMultipleToStore]
//	46 BuildPathsWithResults  [Conn.BuildPathsWithResults]
//
// Log messages ([Message]) go to [Options.Log] as they arrive: lines of
// text (STDERR_NEXT), activities (START_ACTIVITY, STOP_ACTIVITY) and
// their results (RESULT); a build's output is results of type
// [ResultBuildLogLine] on its [ActivityBuild] activity, one line each. A
// failure is STDERR_ERROR instead of STDERR_LAST: a [*RemoteError], after
// which the daemon serves the next request as before.
//
// # Versions
//
// The client announces [ClientVersion] 1.38 and both sides use the
// smaller version. Daemons older than [MinVersion] 1.34 are refused:
//
//	1.34  Nix 2.8–2.14: BuildPathsWithResults
//	1.35  Nix 2.15–2.19: the trust flag in the handshake
//	1.37  Nix 2.20–2.23: BuildResult: cpuUser, cpuSystem
//	1.38  Nix 2.24–2.35: feature negotiation in the handshake
//
// From 1.38 the client offers an empty feature set, so a Nix 2.35 daemon,
// which offers realisation-with-path-not-hash, answers in the 1.38 form.
//
// # Quirks handled
//
//   - NarFromPath sends the NAR raw, without frames or a length: it is
//     parsed to find its end and, given the path's narSize and narHash,
//     may not run on past narSize.
//   - AddMultipleToStore's stream is framed: u64 length and bytes with no
//     padding, ended by an empty frame. The path records inside use the
//     protocol 1.16 layout whatever the connection's version.
//   - Nix's client reads the log on a second thread while it sends
//     frames; this client sends all frames first and then reads. The
//     daemon logs only a few messages while it adds paths, far less than
//     a pipe holds, and drains the frames after a failure before it sends
//     STDERR_ERROR (FramedSource), so neither side waits for the other.
//   - narHash is sent and received as base 16 without a prefix; PathInfo
//     carries "sha256:<nix32>" as serveproto's does.
//   - STDERR_READ and STDERR_WRITE are refused ([Conn] never sends a
//     request that streams through them); Nix's own client fails the
//     same way ("no source", "no sink").
//   - An untrusted user may BuildDerivation only content-addressed
//     derivations ("you are not privileged to build input-addressed
//     derivations"); [Conn.BuildDerivation] says so before sending
//     ([*UntrustedError]).
//   - Text instead of the greeting (a login shell's banner, `nologin`)
//     is quoted in the error.
//   - The daemon stops a build when its stdin hangs up: closing the
//     transport is how a build is cancelled.
//
// # Contexts
//
// Every operation takes a context. The reads and writes under it are on
// the transport's pipes, which have no deadlines, so a context that ends
// mid-operation calls [Options.Abort], which must close the transport;
// the blocked read or write then fails, the operation returns a
// [*StreamError] that wraps the context's cause, and the Conn is broken.
// A daemon that goes silent mid-operation is bounded this way, as is a
// greeting that never comes ([HandshakeWithin]).
//
// # Errors
//
// Errors name the operation and the field, for example
//
//	daemonproto: QueryValidPaths reply: path 3: length 9000 exceeds 255
//
// [*ProtocolError] means the daemon sent bytes that break the protocol,
// [*StreamError] that the transport failed or ended; both break the
// [Conn]: every later call returns the same error. [*RemoteError] is a
// failure the daemon reported and leaves the Conn usable. Arguments that
// would make the daemon fail (a bad store path, a NAR without size) are
// reported before anything is sent and leave the Conn usable.
//
// # Limits
//
// Every count and length read from the wire is checked against a named
// limit before it is used ([MaxStorePathLen], [MaxPathSetLen],
// [MaxHashLen], [MaxContentAddressLen], [MaxSigs], [MaxSigLen],
// [MaxErrorMsgLen], [MaxBuiltOutputs], [MaxDrvOutputLen],
// [MaxRealisationLen], [MaxFeatures], [MaxFeatureLen], [MaxVersionLen],
// [MaxLogLen], [MaxLogFields], [MaxTraces]), and is never used to
// preallocate. Integers Nix reads into narrower types (status, trust,
// levels, optional tags) are range-checked, and a bool must be 0 or 1.
// NARs are bounded by [nar.DefaultLimits].
//
// # Why not go-nix's pkg/daemon
//
// nix-community/go-nix gained a daemon client in 2026 (continued in
// numtide/go-nix). It was not taken, for these reasons (numtide/go-nix
// 880e9475):
//
//   - The module proxy serves neither it (numtide/go-nix: 403; the fork
//     keeps the module path github.com/nix-community/go-nix) nor a
//     nix-community version newer than the one go.mod pins.
//   - Counts from the wire preallocate: wire.ReadStrings, the traces of
//     an error and the fields of a log message do make([]T, count), so a
//     hostile count panics (makeslice) or exhausts memory; list counts are
//     deliberately not capped. Every string may claim 64 MiB, allocated
//     before the bytes arrive.
//   - STDERR_WRITE is read as a u64 and STDERR_READ answered with
//     nothing: WRITE carries a string, so the stream goes out of step;
//     READ leaves the daemon waiting.
//   - NarFromPath starts a goroutine that parses the NAR through an
//     io.Pipe with go-nix's NAR reader, which bounds only names and link
//     targets; a caller that stops reading leaves it blocked.
//   - Connect dials only a unix socket, and cancellation sets deadlines
//     on a net.Conn, which SSH session pipes do not have.
//   - Errors carry an operation string but no field; the protocol floor
//     is 1.23.
package daemonproto
