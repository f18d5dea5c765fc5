// Package nar reads Nix archives (NARs) strictly and within fixed bounds, on
// one goroutine, and copies, verifies or unpacks them.
//
// A NAR is Nix's serialisation of one file system object: a regular file
// (with its executable bit), a symbolic link, or a directory of named
// entries, each of which is again such an object. Nothing else is recorded:
// no owner, no timestamps, no other mode bits. Entries are stored sorted, so
// one tree has exactly one NAR, and the SHA-256 of that NAR (narHash) with
// its length (narSize) is how Nix identifies a store path's contents. The
// format is defined by NixOS/nix `src/libutil/archive.cc` (2.8.0, and the
// stricter 2.32.0 parser) and `doc/manual/source/protocols/nix-archive`.
//
// # Grammar
//
// Every token, every name and every file's contents is a wire string: a
// little-endian u64 length n, then n bytes, then zero bytes up to a multiple
// of 8. In the grammar, quoted words are such strings; braces mean zero or
// more.
//
//	nar       = "nix-archive-1" node
//	node      = "(" "type" ( regular | symlink | directory ) ")"
//	regular   = "regular" [ "executable" "" ] "contents" <string>
//	symlink   = "symlink" "target" <string>
//	directory = "directory" { "entry" "(" "name" <string> "node" node ")" }
//
// A NAR is not length-prefixed: in the serve protocol it is followed at once
// by the next message on the same stream, and only parsing it tells where it
// ends. [Reader] therefore reads exactly the lengths the grammar gives, with
// [io.ReadFull] and no read-ahead of its own, and stops right after the root
// node's closing ")". The stream it was given is left at the first byte
// after the NAR.
//
// # Validation
//
// The reader enforces the rules of Nix 2.32's parser, which are stricter than
// 2.8's, so it accepts only canonical NARs, the kind `nix-store --dump`
// writes (FuzzReader checks that whatever it accepts restores to a tree that
// dumps back to the same bytes):
//
//   - the magic is "nix-archive-1";
//   - tokens come in the canonical order: "type" first in a node,
//     "executable" (with an empty value) before "contents", "name" before
//     "node";
//   - entry names are non-empty, are not "." or "..", contain neither "/"
//     nor NUL, and are strictly increasing in byte order within a directory
//     (so there are no duplicates);
//   - symlink targets are non-empty and contain no NUL;
//   - all padding bytes are zero.
//
// # Limits
//
// Every length read from the stream is checked against a limit before
// anything is allocated or read, so a name length of 2^60 is an error, not an
// allocation. [Limits] holds the bounds; [DefaultLimits] explains each value.
// A zero field means the default. The limits bound the memory a hostile NAR
// can make the reader use (a few KiB plus one directory frame per level), the
// time it can make it spend (entries, bytes), and what [Restore] can make the
// file system do.
//
// # Errors
//
// Everything the reader rejects, and every read error of the underlying
// stream, is an [*Error] with the offset and path where it happened, for
// example
//
//	nar: at offset 1234, "a/b": entry name "..": not allowed
//
// A NAR that ends early gives an error wrapping [io.ErrUnexpectedEOF]. [Copy]
// and [Verify] return errors from their writer unchanged, and [Restore]
// returns file system failures as [*fs.PathError], so a caller can tell a bad
// or broken stream (an [*Error]) from a local failure.
//
// # Use
//
// [Copy] forwards a NAR while checking it, [Verify] also checks its size and
// hash against what the sender claimed, and [Restore] unpacks one onto disk.
// All three report [Stats]: the narSize and narHash of the bytes consumed.
package nar
