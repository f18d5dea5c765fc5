package serveproto

import (
	"errors"
	"fmt"
	"io"

	"github.com/nix-community/go-nix/pkg/nixhash"

	"github.com/nix-offload/nix-offload/internal/nar"
)

// exportMagic follows each NAR in an export stream ("NIXE" read
// little-endian; nix 2.8.0 src/libstore/store-api.hh exportMagic).
const exportMagic = 0x4558494e

// PathInfo is what the server knows of a valid store path.
type PathInfo struct {
	Path    string
	Deriver string // "" if none
	// References are full store paths, the path itself included if it
	// refers to itself.
	References []string
	// DownloadSize equals NarSize in every server ("lie a little").
	DownloadSize uint64
	NarSize      uint64
	// NarHash is "sha256:<52 nix-base32 characters>" as the server sends
	// it. [Conn.AddToStoreNar] and [Conn.ImportPaths] also accept base16
	// and base64, with or without the "sha256:" prefix.
	NarHash string
	// CA is the content address ("fixed:r:sha256:…", "text:sha256:…"),
	// "" if none.
	CA   string
	Sigs []string
	// RegistrationTime (Unix seconds) and Ultimate are sent by
	// AddToStoreNar; QueryPathInfos leaves them zero, the server does not
	// send them.
	RegistrationTime int64
	Ultimate         bool
}

// QueryValidPaths returns the subset of paths that are valid on the server.
// With lock, the server also registers each path as a temporary GC root
// that lives as long as the session, so paths found valid cannot be
// collected before a build that needs them. With substitute, the server
// first tries to substitute missing paths from its own substituters.
// Both flags need --write on the server and are ignored without it.
func (c *Conn) QueryValidPaths(paths []string, lock, substitute bool) ([]string, error) {
	return call(c, "QueryValidPaths", func() (*Reply[[]string], error) { return c.SendQueryValidPaths(paths, lock, substitute) })
}

// SendQueryValidPaths is [Conn.QueryValidPaths] sent ahead: its reply is
// read later, after those of the requests sent before it. The server
// handles the request (and takes the locks) before any sent after it.
func (c *Conn) SendQueryValidPaths(paths []string, lock, substitute bool) (*Reply[[]string], error) {
	if err := checkPaths("QueryValidPaths", "request", paths); err != nil {
		return nil, err
	}
	op := &queryValidPathsOp{Lock: lock, Substitute: substitute, Paths: paths}
	return sendFor(c, op, func() []string { return op.Valid })
}

// queryValidPathsOp is command 1 (cmdQueryValidPaths; server: nix 2.8.0
// src/nix-store/nix-store.cc opServe).
//
//	request: u64 lock, u64 substitute, path-set
//	reply:   path-set of the valid ones
type queryValidPathsOp struct {
	Lock, Substitute bool
	Paths            []string

	Valid []string // reply
}

func (*queryValidPathsOp) name() string     { return "QueryValidPaths" }
func (*queryValidPathsOp) command() command { return cmdQueryValidPaths }

func (op *queryValidPathsOp) writeRequest(e *encoder) error {
	e.Bool(op.Lock)
	e.Bool(op.Substitute)
	e.Set(op.Paths)
	return nil
}

func (op *queryValidPathsOp) readReply(d *decoder) (err error) {
	op.Valid, err = d.paths("")
	return err
}

// QueryPathInfos returns what the server knows of those of paths that are
// valid there, in sorted order; invalid paths are left out. Against a server
// older than 2.4, NarHash, CA and Sigs are empty.
func (c *Conn) QueryPathInfos(paths []string) ([]PathInfo, error) {
	return call(c, "QueryPathInfos", func() (*Reply[[]PathInfo], error) { return c.SendQueryPathInfos(paths) })
}

// SendQueryPathInfos is [Conn.QueryPathInfos] sent ahead. Paths that are
// not valid when the server gets to it are left out of the reply, so it
// is safe to send after a build whose outcome is not known yet.
func (c *Conn) SendQueryPathInfos(paths []string) (*Reply[[]PathInfo], error) {
	if err := checkPaths("QueryPathInfos", "request", paths); err != nil {
		return nil, err
	}
	op := &queryPathInfosOp{Paths: paths, minor: c.minor()}
	return sendFor(c, op, func() []PathInfo { return op.Infos })
}

// queryPathInfosOp is command 2 (cmdQueryPathInfos; server: nix 2.8.0
// src/nix-store/nix-store.cc opServe; record layout also in nix 2.28.0
// src/libstore/serve-protocol.cc, UnkeyedValidPathInfo).
//
//	request: path-set
//	reply:   per valid path: string path, then the record readPathInfo
//	         reads; then "" (an empty string) ends the reply
type queryPathInfosOp struct {
	Paths []string
	minor int // the server's: narHash, ca, sigs from 4 on

	Infos []PathInfo // reply
}

func (*queryPathInfosOp) name() string     { return "QueryPathInfos" }
func (*queryPathInfosOp) command() command { return cmdQueryPathInfos }

func (op *queryPathInfosOp) writeRequest(e *encoder) error {
	e.Set(op.Paths)
	return nil
}

func (op *queryPathInfosOp) readReply(d *decoder) error {
	wanted := make(map[string]bool, len(op.Paths))
	for _, p := range op.Paths {
		wanted[p] = false
	}
	for i := 0; ; i++ {
		field := fmt.Sprintf("info %d", i)
		p, err := d.optPath(field + ": path")
		if err != nil {
			return err
		}
		if p == "" {
			return nil
		}
		// The server answers only for requested paths, each once; this
		// also bounds the number of records.
		seen, ok := wanted[p]
		if !ok {
			return d.protoErr(field+": path", "%s was not requested", p)
		}
		if seen {
			return d.protoErr(field+": path", "%s sent twice", p)
		}
		wanted[p] = true
		info, err := readPathInfo(d, field, op.minor)
		if err != nil {
			return err
		}
		info.Path = p
		op.Infos = append(op.Infos, info)
	}
}

// readPathInfo reads one QueryPathInfos record after its path (Nix 2.20+
// calls it UnkeyedValidPathInfo): deriver, references, downloadSize,
// narSize, and from minor 4 narHash, ca, sigs.
func readPathInfo(d *decoder, field string, minor int) (PathInfo, error) {
	var info PathInfo
	var err error
	if info.Deriver, err = d.optPath(field + ": deriver"); err != nil {
		return info, err
	}
	if info.References, err = d.paths(field + ": references"); err != nil {
		return info, err
	}
	if info.DownloadSize, err = d.u64(field + ": downloadSize"); err != nil {
		return info, err
	}
	if info.NarSize, err = d.u64(field + ": narSize"); err != nil {
		return info, err
	}
	if minor < 4 {
		return info, nil
	}
	if info.NarHash, err = d.str(field+": narHash", MaxHashLen); err != nil {
		return info, err
	}
	if _, err := nixhash.ParseAny(info.NarHash, nil); err != nil {
		return info, &ProtocolError{Op: d.op, Field: field + ": narHash", Err: fmt.Errorf("%q: %w", info.NarHash, err)}
	}
	if info.CA, err = d.str(field+": ca", MaxContentAddressLen); err != nil {
		return info, err
	}
	if info.Sigs, err = d.strs(field+": sigs", "sig", MaxSigs, MaxSigLen); err != nil {
		return info, err
	}
	return info, nil
}

// QueryClosure returns the closure of paths on the server: the paths, all
// they refer to, recursively, and with includeOutputs the outputs of every
// derivation in it that are valid. An invalid path makes the server fail.
func (c *Conn) QueryClosure(paths []string, includeOutputs bool) ([]string, error) {
	if err := checkPaths("QueryClosure", "request", paths); err != nil {
		return nil, err
	}
	op := &queryClosureOp{IncludeOutputs: includeOutputs, Paths: paths}
	if err := c.do(op); err != nil {
		return nil, err
	}
	return op.Closure, nil
}

// queryClosureOp is command 7 (cmdQueryClosure; server: nix 2.8.0
// src/nix-store/nix-store.cc opServe).
//
//	request: u64 includeOutputs, path-set
//	reply:   path-set
type queryClosureOp struct {
	IncludeOutputs bool
	Paths          []string

	Closure []string // reply
}

func (*queryClosureOp) name() string     { return "QueryClosure" }
func (*queryClosureOp) command() command { return cmdQueryClosure }

func (op *queryClosureOp) writeRequest(e *encoder) error {
	e.Bool(op.IncludeOutputs)
	e.Set(op.Paths)
	return nil
}

func (op *queryClosureOp) readReply(d *decoder) (err error) {
	op.Closure, err = d.paths("")
	return err
}

// DumpStorePath writes the NAR of a valid path to w and returns its size
// and hash, for the caller to check against [PathInfo]. The NAR is
// validated as it passes (with [nar.Copy]); that is also how its end is
// found, since the reply has no length. An invalid path makes the server
// fail: the error then carries the server's "is not valid" if
// [Options.Explain] attaches stderr. Any failure breaks the Conn, a
// failure of w included, because the rest of the NAR is still in the
// stream.
func (c *Conn) DumpStorePath(path string, w io.Writer) (nar.Stats, error) {
	if err := checkPaths("DumpStorePath", "request", []string{path}); err != nil {
		return nar.Stats{}, err
	}
	op := &dumpStorePathOp{Path: path, w: w, rr: c.rr}
	if err := c.do(op); err != nil {
		return nar.Stats{}, err
	}
	return op.Stats, nil
}

// DumpReply is the NAR a [Conn.SendDumpStorePath] asked for.
type DumpReply struct {
	c  *Conn
	op *dumpStorePathOp
}

// Path is the store path asked for.
func (r *DumpReply) Path() string { return r.op.Path }

// ReadTo reads the NAR into w, as [Conn.DumpStorePath] does, in its turn
// among the pending replies. io.Discard skips a NAR no longer wanted and
// keeps the stream in step.
func (r *DumpReply) ReadTo(w io.Writer) (nar.Stats, error) {
	r.op.w = w
	if err := r.c.receive(r.op); err != nil {
		return nar.Stats{}, err
	}
	return r.op.Stats, nil
}

// SendDumpStorePath is [Conn.DumpStorePath] sent ahead. The server exits
// when the path is not valid by the time it gets to the request, which
// ends the session: send it after a build only when losing the session on
// a failed build is acceptable.
func (c *Conn) SendDumpStorePath(path string) (*DumpReply, error) {
	if err := checkPaths("DumpStorePath", "request", []string{path}); err != nil {
		return nil, err
	}
	op := &dumpStorePathOp{Path: path, rr: c.rr}
	if err := c.send(op); err != nil {
		return nil, err
	}
	return &DumpReply{c: c, op: op}, nil
}

// dumpStorePathOp is command 3 (cmdDumpStorePath; server: nix 2.8.0
// src/nix-store/nix-store.cc opServe, narFromPath).
//
//	request: string path
//	reply:   the NAR, raw
type dumpStorePathOp struct {
	Path string
	w    io.Writer
	rr   *recordingReader // the transport, to tell a dead stream from a bad NAR

	Stats nar.Stats // reply
}

func (*dumpStorePathOp) name() string     { return "DumpStorePath" }
func (*dumpStorePathOp) command() command { return cmdDumpStorePath }

func (op *dumpStorePathOp) writeRequest(e *encoder) error {
	e.String(op.Path)
	return nil
}

func (op *dumpStorePathOp) readReply(d *decoder) error {
	w := &recordingWriter{w: op.w}
	st, err := nar.Copy(w, d.r, nar.DefaultLimits)
	switch {
	case err == nil:
		op.Stats = st
		return nil
	case w.err != nil:
		return fmt.Errorf("serveproto: DumpStorePath %s: writing the NAR: %w", op.Path, err)
	case op.rr.err != nil:
		return d.streamErr("NAR", err)
	default:
		return &ProtocolError{Op: d.op, Field: "NAR", Err: err}
	}
}

// ExportItem is one path for [Conn.ImportPaths].
type ExportItem struct {
	// Info supplies Path, References and Deriver. If NarSize or NarHash
	// is set, the NAR is checked against it before the path's metadata
	// is sent, so a mismatch aborts the import.
	Info PathInfo
	// NAR is read up to the NAR's end and no further.
	NAR io.Reader
}

// ImportPaths adds paths to the server's store in one export stream (the
// `nix-store --export` format), references first: the server registers
// each path as it arrives, and a path whose references are not valid yet
// fails. The server computes narHash and narSize from the bytes it gets
// and ignores signatures. Prefer [Conn.AddToStoreNar]: the 2.8 server
// holds each NAR of an import in memory.
//
// Each NAR is validated with [nar.Copy] while it is sent. An invalid NAR,
// a failing reader or a size or hash mismatch leaves the request
// unfinished, which breaks the Conn; the caller must then close the
// transport, and the server imports nothing more.
func (c *Conn) ImportPaths(items []ExportItem) error {
	for i, it := range items {
		if err := checkInfo("ImportPaths", fmt.Sprintf("item %d", i), it.Info); err != nil {
			return err
		}
		if it.NAR == nil {
			return fmt.Errorf("serveproto: ImportPaths: item %d (%s): no NAR reader", i, it.Info.Path)
		}
		if it.Info.NarHash != "" {
			if _, err := parseNarHash(it.Info.NarHash); err != nil {
				return fmt.Errorf("serveproto: ImportPaths: item %d (%s): narHash: %w", i, it.Info.Path, err)
			}
		}
	}
	return c.do(&importPathsOp{Items: items})
}

// importPathsOp is command 4 (cmdImportPaths; server: nix 2.8.0
// src/nix-store/nix-store.cc opServe; stream format: nix 2.8.0
// src/libstore/export-import.cc importPaths).
//
//	request: per path: u64 1, NAR, u64 0x4558494e, string path,
//	         path-set references, string deriver, u64 0 (no signature);
//	         then u64 0
//	reply:   u64 1
type importPathsOp struct {
	Items []ExportItem
}

func (*importPathsOp) name() string     { return "ImportPaths" }
func (*importPathsOp) command() command { return cmdImportPaths }

func (op *importPathsOp) writeRequest(e *encoder) error {
	for i, it := range op.Items {
		what := fmt.Sprintf("item %d (%s)", i, it.Info.Path)
		e.Uint64(1)
		if e.Err() != nil {
			return nil
		}
		r := &recordingReader{r: it.NAR}
		st, err := nar.Copy(e, r, nar.DefaultLimits)
		if err != nil {
			if e.Err() != nil {
				return err // do reports the transport's error
			}
			return fmt.Errorf("serveproto: ImportPaths: %s: NAR: %w", what, err)
		}
		if err := checkStats(it.Info, st, false); err != nil {
			return fmt.Errorf("serveproto: ImportPaths: %s: %w", what, err)
		}
		e.Uint64(exportMagic)
		e.String(it.Info.Path)
		e.Set(it.Info.References)
		e.String(it.Info.Deriver)
		e.Uint64(0)
	}
	e.Uint64(0)
	return nil
}

func (op *importPathsOp) readReply(d *decoder) error {
	return d.expect("result", 1)
}

// AddToStoreNar adds one path to the server's store, streaming its NAR of
// exactly info.NarSize bytes. It needs a server of protocol 2.5 or newer
// (Nix 2.1+); older ones get an error wrapping [ErrUnsupported] and the
// Conn stays usable. The server checks narHash and narSize against the
// bytes and the content address if CA is set; the references must be
// valid on the server already. A path that is already valid is accepted
// without change.
//
// info needs Path, NarHash and NarSize; Deriver, References, Sigs, CA,
// RegistrationTime and Ultimate are sent as given. The NAR is validated
// while it is sent, and is checked to be exactly NarSize bytes with hash
// NarHash; a NAR that is invalid, shorter or of another hash breaks the
// Conn (the server is left waiting for bytes or will reject them). A
// reader with more bytes after NarSize is reported after the server
// accepted the path, and the Conn stays usable.
func (c *Conn) AddToStoreNar(info PathInfo, r io.Reader) error {
	_, err := call(c, "AddToStoreNar", func() (*Reply[struct{}], error) { return c.SendAddToStoreNar(info, r) })
	return err
}

// SendAddToStoreNar is [Conn.AddToStoreNar] sent ahead: the request and
// the whole NAR are written now, and the reply is read later, after those
// of the requests sent before it. The server adds paths in the order they
// are sent, so a path may refer to one sent before it in the same flight.
// Its Read returns AddToStoreNar's errors, the reader's trailing bytes
// among them.
func (c *Conn) SendAddToStoreNar(info PathInfo, r io.Reader) (*Reply[struct{}], error) {
	const opName = "AddToStoreNar"
	if c.Err() == nil && c.minor() < 5 {
		return nil, fmt.Errorf("serveproto: %s: server protocol %s, need 2.5: %w", opName, c.server, ErrUnsupported)
	}
	if err := checkInfo(opName, "info", info); err != nil {
		return nil, err
	}
	if r == nil {
		return nil, fmt.Errorf("serveproto: %s: %s: no NAR reader", opName, info.Path)
	}
	if info.NarSize == 0 {
		return nil, fmt.Errorf("serveproto: %s: %s: NarSize is 0", opName, info.Path)
	}
	h, err := parseNarHash(info.NarHash)
	if err != nil {
		return nil, fmt.Errorf("serveproto: %s: %s: narHash: %w", opName, info.Path, err)
	}
	op := &addToStoreNarOp{Info: info, hexHash: h.Format(nixhash.Base16, false), r: r}
	reply, err := sendFor(c, op, func() struct{} { return struct{}{} })
	if err != nil {
		return nil, err
	}
	// Said once the reply is read: the server has added the path then,
	// and the Conn is in step.
	reply.check = func() error {
		if op.trailing {
			return fmt.Errorf("serveproto: %s: %s: the reader has more bytes after the NAR of NarSize %d; the path was added", opName, info.Path, info.NarSize)
		}
		return nil
	}
	return reply, nil
}

// addToStoreNarOp is command 9 (cmdAddToStoreNar, protocol 2.5+; server:
// nix 2.8.0 src/nix-store/nix-store.cc opServe; client: nix 2.8.0
// src/libstore/legacy-ssh-store.cc addToStore).
//
//	request: string path, string deriver, string narHash (base16, no
//	         prefix), path-set references, u64 registrationTime,
//	         u64 narSize, u64 ultimate, string-set sigs, string ca,
//	         then exactly narSize bytes of NAR
//	reply:   u64 1
type addToStoreNarOp struct {
	Info    PathInfo
	hexHash string
	r       io.Reader

	trailing bool // the reader had bytes after the NAR
}

func (*addToStoreNarOp) name() string     { return "AddToStoreNar" }
func (*addToStoreNarOp) command() command { return cmdAddToStoreNar }

func (op *addToStoreNarOp) writeRequest(e *encoder) error {
	info := op.Info
	e.String(info.Path)
	e.String(info.Deriver)
	e.String(op.hexHash)
	e.Set(info.References)
	e.Uint64(uint64(info.RegistrationTime))
	e.Uint64(info.NarSize)
	e.Bool(info.Ultimate)
	e.Set(info.Sigs)
	e.String(info.CA)
	if e.Err() != nil {
		return nil
	}
	rr := &recordingReader{r: op.r}
	lr := &io.LimitedReader{R: rr, N: int64(min(info.NarSize, 1<<62))}
	st, err := nar.Copy(e, lr, nar.DefaultLimits)
	if err != nil {
		switch {
		case e.Err() != nil:
			return err // do reports the transport's error
		case lr.N == 0 && rr.err == nil:
			return fmt.Errorf("serveproto: AddToStoreNar: %s: NAR is longer than NarSize %d: %w", info.Path, info.NarSize, err)
		default:
			return fmt.Errorf("serveproto: AddToStoreNar: %s: NAR: %w", info.Path, err)
		}
	}
	if err := checkStats(info, st, true); err != nil {
		return fmt.Errorf("serveproto: AddToStoreNar: %s: %w", info.Path, err)
	}
	var probe [1]byte
	if n, _ := io.ReadFull(op.r, probe[:]); n > 0 {
		op.trailing = true
	}
	return nil
}

func (op *addToStoreNarOp) readReply(d *decoder) error {
	return d.expect("result", 1)
}

// checkInfo validates the store paths of a PathInfo given by the caller.
func checkInfo(op, what string, info PathInfo) error {
	if err := checkStorePath(info.Path); err != nil {
		return fmt.Errorf("serveproto: %s: %s: path: %w", op, what, err)
	}
	if info.Deriver != "" {
		if err := checkStorePath(info.Deriver); err != nil {
			return fmt.Errorf("serveproto: %s: %s: deriver: %w", op, what, err)
		}
	}
	return checkPaths(op, what+": references", info.References)
}

// parseNarHash parses a SHA-256 narHash in any encoding Nix accepts.
func parseNarHash(s string) (*nixhash.HashWithEncoding, error) {
	algo := nixhash.SHA256
	h, err := nixhash.ParseAny(s, &algo)
	if err != nil {
		return nil, fmt.Errorf("%q: %w", s, err)
	}
	return h, nil
}

var errHashMismatch = errors.New("narHash mismatch")

// checkStats compares what a NAR copy saw with the sizes and hash the
// caller claimed. With required, NarSize and NarHash must be set.
func checkStats(info PathInfo, st nar.Stats, required bool) error {
	if (required || info.NarSize != 0) && uint64(st.Size) != info.NarSize {
		if uint64(st.Size) < info.NarSize {
			return fmt.Errorf("NAR is %d bytes, shorter than NarSize %d", st.Size, info.NarSize)
		}
		return fmt.Errorf("NAR is %d bytes, NarSize says %d", st.Size, info.NarSize)
	}
	if required || info.NarHash != "" {
		h, err := parseNarHash(info.NarHash)
		if err != nil {
			return err
		}
		if string(h.Digest()) != string(st.SHA256[:]) {
			return fmt.Errorf("%w: NAR has %s, info says %s", errHashMismatch, st.NixHash(), info.NarHash)
		}
	}
	return nil
}
