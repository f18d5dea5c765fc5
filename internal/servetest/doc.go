// Package servetest is a scriptable serve-protocol peer for tests: the
// server side of `nix-store --serve --write` (the legacy SSH protocol that
// package serveproto speaks as a client), with an in-memory store and hooks
// that make it misbehave.
//
// A [Server] answers the handshake and the commands the build hook uses:
// QueryValidPaths, QueryPathInfos, QueryClosure, DumpStorePath, ImportPaths,
// BuildDerivation and AddToStoreNar, in the layout of the protocol version it
// announces (internal/serveproto's doc.go and ops.go, each op with its Nix
// source). It reads every request
// strictly (sets sorted and without duplicates, bools 0 or 1, store paths
// well formed, NARs canonical, the export stream of ImportPaths as
// `nix-store --export` writes it, see [ExportReader]) and, like Nix, reports
// a bad request or an invalid path as "error: …" on its stderr and ends the
// session with exit status 1.
//
// To misbehave, [Server.Tamper] sees every reply before it is sent and may
// replace its bytes, cut it short, hang up after it, or stall instead of
// answering, as a silent machine does. [Enc] writes wire values by hand, and
// [NAR] writes hand-made NARs, so a test can send a wrong narHash, an entry
// named "..", a string length of 2^62 or a stream that ends half way.
//
// The server runs in process, over a real pipe pair ([Server.Pipe]) or
// behind a real SSH server built with golang.org/x/crypto/ssh on 127.0.0.1
// ([StartSSH]), so the client's real stack (sshconn, transport, serveproto,
// offload) talks to it. [LocalStore] makes a fake `nix-store` for package
// localstore out of the same server, so that the real output import runs
// against a temporary directory without root.
package servetest
