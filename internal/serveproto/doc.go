// Package serveproto is the client side of `nix-store --serve --write`, the
// "legacy SSH" serve protocol that Nix's `ssh://` stores, its build-remote
// hook and Hydra speak to a remote builder, as in NixOS/nix 2.8.0
// src/libstore/serve-protocol.hh, src/nix-store/nix-store.cc (opServe,
// the server) and src/libstore/legacy-ssh-store.cc (the client), checked
// against NixOS/nix 2.28.0 src/libstore/serve-protocol*.cc and the golden
// files of its unit tests. The layouts below, ops.go (one struct per
// operation, with its Nix source) and the recorded bytes in testdata/ are
// the byte-by-byte account this package follows.
//
// # The protocol
//
// The client starts the server (usually `ssh host nix-store --serve
// --write`) and talks to it over its stdin and stdout; its stderr carries
// human-readable text only. Every integer is a little-endian u64; a string
// is its length, its bytes and zero padding to a multiple of 8; a list or
// set is a count followed by its elements. After a greeting ([Handshake])
// the client sends one command at a time, a u64 opcode and its arguments,
// and reads the reply before sending the next:
//
//	1 QueryValidPaths   [Conn.QueryValidPaths]
//	2 QueryPathInfos    [Conn.QueryPathInfos]
//	3 DumpStorePath     [Conn.DumpStorePath]
//	4 ImportPaths       [Conn.ImportPaths]
//	6 BuildPaths        [Conn.BuildPaths]
//	7 QueryClosure      [Conn.QueryClosure]
//	8 BuildDerivation   [Conn.BuildDerivation]
//	9 AddToStoreNar     [Conn.AddToStoreNar]
//
// (5, ExportPaths, is left out: servers dropped it in Nix 2.32.)
//
// There are no error frames. When a command fails on the server, it prints
// "error: …" on its stderr and exits, and the client sees its stdout end.
// Such failures are [*StreamError]s, passed through [Options.Explain] so
// the transport can add the server's stderr and exit status. Only builds
// report failure in band: a [BuildResult] with a failure [BuildStatus], or
// a [*BuildPathsError].
//
// # Versions
//
// The client announces [ClientVersion] 2.7 and accepts any server of major
// version 2. There is no negotiation before Nix 2.23: each side shapes its
// messages by the other's minor version; from 2.23 on, both use the smaller
// one. So this package reads and writes by the server's minor version,
// capped at 7:
//
//	2.2  build options: maxLogSize
//	2.3  build options: nrRepeats, enforceDeterminism (always 0 here);
//	     BuildResult: timesBuilt, isNonDeterministic, startTime, stopTime
//	2.4  QueryPathInfos: narHash, ca, sigs (Nix 2.0)
//	2.5  AddToStoreNar (Nix 2.1–2.3)
//	2.6  BuildResult: builtOutputs
//	2.7  build options: keepFailed (Nix 2.4–2.34, Lix)
//	2.8  new builtOutputs encoding (Nix 2.35); not announced, so such a
//	     server answers in the 2.7 form
//
// # Quirks handled
//
//   - Servers 2.4–2.10 send builtOutputs whatever the client's version (a
//     misplaced parenthesis, NixOS/nix#6946); a 2.7 client expects it
//     anyway.
//   - builtOutputs values are realisations in JSON whose outPath is a base
//     name; the id hash is the server's own and, from Nix 2.35, a dummy.
//     Only the output name (after the last "!") and outPath are used.
//   - BuildResult error messages carry ANSI colour codes; they are removed
//     ([StripANSI]).
//   - BuildPaths replies any non-zero worker exit status (1, 100–111) with
//     a message; the 2.8 client misreads status 1.
//   - A NAR in a reply has no length: [Conn.DumpStorePath] parses it (with
//     package nar) to find its end.
//   - A .drv path without the ".drv" suffix aborts a 2.8 server, and a
//     malformed store path makes it exit: both are rejected before
//     sending. AddToStoreNar sends narHash as base16 without prefix, as the
//     2.8 client does.
//   - Text instead of the greeting (a login shell's banner) is quoted in
//     the error.
//   - The server cancels a build when its stdin hangs up: closing the
//     transport's stdin is how a build is cancelled (see [Conn.Close]).
//
// # Errors
//
// Errors name the operation and the field, for example
//
//	serveproto: QueryValidPaths reply: path 3: length 9000 exceeds 255
//
// [*ProtocolError] means the server sent bytes that break the protocol,
// [*StreamError] that the transport failed or ended. Both break the
// [Conn]: every later call returns the same error. Arguments that would
// make the server fail (a bad store path, AddToStoreNar against a server
// older than 2.5, wrapping [ErrUnsupported]) are reported before anything
// is sent and leave the Conn usable.
//
// # Limits
//
// Every count and length read from the wire is checked against a named
// limit ([MaxStorePathLen], [MaxPathSetLen], [MaxHashLen],
// [MaxContentAddressLen], [MaxSigs], [MaxSigLen], [MaxErrorMsgLen],
// [MaxBuiltOutputs], [MaxDrvOutputLen], [MaxRealisationLen]) before it is
// used, and is never used to preallocate: collections and strings grow
// with the data that really arrives. A claimed length of 2^60 is a
// [*ProtocolError], not an allocation. Integers Nix reads as 32-bit
// (status, timesBuilt, the version) or as time_t are range-checked, and a
// bool must be 0 or 1. NARs are bounded by [nar.DefaultLimits].
package serveproto
