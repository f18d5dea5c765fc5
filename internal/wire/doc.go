// Package wire reads and writes the primitives of Nix's wire format, the serialisation
// that nix-daemon, `nix-store --serve` and the build hook all speak, as in
// NixOS/nix 2.8.0 src/libutil/serialise.cc (writeString, readString,
// readPadding, readStrings) and src/libutil/serialise.hh (readNum). It knows
// no protocol: packages serveproto and hookproto read their messages with
// it, name the fields and choose the limits; [Writer] writes their
// requests (serveproto and daemonproto).
//
// # The format
//
// Everything is a whole number of 8-byte words:
//
//   - An integer is a u64, little-endian: 5 is 05 00 00 00 00 00 00 00.
//     Nix reads narrower types (unsigned int, time_t) from the same eight
//     bytes and rejects values that do not fit (readNum).
//   - A bool is a u64 that is 0 or 1.
//   - A string is its length as a u64, its bytes, then zero bytes up to the
//     next multiple of 8 ([PadLen]): "try" is
//     03 00 00 00 00 00 00 00  74 72 79 00 00 00 00 00.
//     The padding must be zero. The bytes are not necessarily UTF-8.
//   - A list or set of strings is a count as a u64, then that many strings.
//     Nix writes sets sorted byte-wise, without duplicates.
//
// Nothing marks a type or a message boundary: the reader must know what
// comes next, and after any error the stream is out of step.
//
// # Limits
//
// Every length and count comes from the peer, so each read of one takes a
// limit from the caller ([Reader.String], [Reader.Count]) and checks it
// before anything is allocated. A string is read in chunks of at most
// [ReadChunk] bytes and its buffer grows only as they arrive, so a stream
// that claims a 1 GiB string and then ends costs one chunk, not 1 GiB.
// Nix itself allocates the whole claimed length at once.
//
// # Errors
//
// A [*FormatError] means the bytes break the format: a length or count
// over its limit, non-zero padding, a bool that is neither 0 nor 1. Any
// other error comes from the underlying reader: io.EOF, unwrapped, when
// the stream ends before the first byte of a value, io.ErrUnexpectedEOF
// when it ends inside one, and any other error as it is. So a caller can
// tell a peer that sent bad bytes from a stream that died, and a clean end
// between messages from a cut one.
package wire
