package daemonproto

import (
	"context"
	"fmt"
	"io"
	"maps"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nix-community/go-nix/pkg/nixhash"

	"github.com/nix-offload/nix-offload/internal/nar"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/wire"
)

// Opcodes (WorkerOp in nix 2.8.0 src/libstore/worker-protocol.hh).
const (
	opAddTempRoot           = 11
	opSetOptions            = 19
	opQueryPathInfo         = 26
	opQueryValidPaths       = 31
	opBuildDerivation       = 36
	opNarFromPath           = 38
	opAddMultipleToStore    = 44
	opBuildPathsWithResults = 46
)

// Settings are the options [Conn.SetOptions] sends. The daemon applies
// them to the connection's later builds. An untrusted user's
// max-build-log-size is ignored by the daemon (only timeout among the
// overrides is allowed, nix 2.8.0 src/libstore/daemon.cc
// ClientSettings::apply); the positional ones always apply.
type Settings struct {
	// MaxSilentTime and BuildTimeout are sent as whole seconds, rounded
	// up; 0 means no limit.
	MaxSilentTime, BuildTimeout time.Duration
	// MaxLogSize is the most bytes of build log a build may write; 0
	// means no limit. Sent as the override max-build-log-size.
	MaxLogSize uint64
	// KeepFailed keeps the build directory of a failed build.
	KeepFailed bool
	// UseSubstitutes lets the daemon substitute (builders-use-substitutes).
	UseSubstitutes bool
	// Verbosity filters the daemon's STDERR_NEXT text (0 error … 7
	// vomit); activities and build log lines come at every level.
	Verbosity uint64
}

// SetOptions sends settings for the builds of this connection. Nix's own
// ssh-ng client sends none (its SSHStore::setOptions is empty), so the
// remote nix.conf alone rules there; this client sends the daemon's
// limits so that the machine enforces them too.
func (c *Conn) SetOptions(ctx context.Context, s Settings) error {
	ms, err := seconds("SetOptions", "MaxSilentTime", s.MaxSilentTime)
	if err != nil {
		return err
	}
	bt, err := seconds("SetOptions", "BuildTimeout", s.BuildTimeout)
	if err != nil {
		return err
	}
	op := &setOptionsOp{Settings: s, maxSilent: ms, overrides: map[string]string{}}
	if bt > 0 {
		op.overrides["timeout"] = strconv.FormatUint(bt, 10)
	}
	if s.MaxLogSize > 0 {
		op.overrides["max-build-log-size"] = strconv.FormatUint(s.MaxLogSize, 10)
	}
	return c.do(ctx, op)
}

// setOptionsOp is opcode 19 (wopSetOptions; daemon: nix 2.8.0
// src/libstore/daemon.cc, client: src/libstore/remote-store.cc
// RemoteStore::setOptions).
//
//	request: keepFailed, keepGoing, tryFallback, verbosity, maxBuildJobs,
//	         maxSilentTime, useBuildHook (obsolete, 1), buildVerbosity
//	         (0 = lvlError means verbose build), logType (0),
//	         printBuildTrace (0), buildCores, useSubstitutes, then the
//	         overrides as a count and name/value string pairs
//	reply:   log messages only
type setOptionsOp struct {
	Settings
	maxSilent uint64
	overrides map[string]string
}

func (*setOptionsOp) name() string   { return "SetOptions" }
func (*setOptionsOp) opcode() uint64 { return opSetOptions }

func (op *setOptionsOp) writeRequest(c *Conn, e *wire.Writer) error {
	e.Bool(op.KeepFailed)
	e.Bool(false) // keepGoing
	e.Bool(false) // tryFallback
	e.Uint64(op.Verbosity)
	e.Uint64(1) // maxBuildJobs: this connection builds one derivation at a time
	e.Uint64(op.maxSilent)
	e.Bool(true) // useBuildHook, obsolete
	e.Uint64(0)  // buildVerbosity lvlError: verboseBuild, the build log is sent
	e.Uint64(0)  // logType, obsolete
	e.Uint64(0)  // printBuildTrace, obsolete
	e.Uint64(0)  // buildCores: the machine's own setting
	e.Bool(op.UseSubstitutes)
	keys := slices.Sorted(maps.Keys(op.overrides))
	e.Uint64(uint64(len(keys)))
	for _, k := range keys {
		e.String(k)
		e.String(op.overrides[k])
	}
	return nil
}

func (*setOptionsOp) readReply(c *Conn, d *decoder) error { return c.stderr(d) }

// QueryValidPaths returns the subset of paths that are valid on the
// machine. With substitute (builders-use-substitutes), the daemon first
// tries to substitute the missing ones from its own substituters.
func (c *Conn) QueryValidPaths(ctx context.Context, paths []string, substitute bool) ([]string, error) {
	if err := checkPaths("QueryValidPaths", "request", paths); err != nil {
		return nil, err
	}
	op := &queryValidPathsOp{Paths: paths, Substitute: substitute}
	if err := c.do(ctx, op); err != nil {
		return nil, err
	}
	return op.Valid, nil
}

// queryValidPathsOp is opcode 31 (wopQueryValidPaths; daemon: nix 2.34.8
// src/libstore/daemon.cc; client: worker-protocol-connection.cc
// queryValidPaths).
//
//	request: path-set, u64 substitute (1.27+)
//	reply:   log messages, path-set of the valid ones
type queryValidPathsOp struct {
	Paths      []string
	Substitute bool

	Valid []string // reply
}

func (*queryValidPathsOp) name() string   { return "QueryValidPaths" }
func (*queryValidPathsOp) opcode() uint64 { return opQueryValidPaths }

func (op *queryValidPathsOp) writeRequest(c *Conn, e *wire.Writer) error {
	e.Set(op.Paths)
	e.Bool(op.Substitute)
	return nil
}

func (op *queryValidPathsOp) readReply(c *Conn, d *decoder) (err error) {
	if err := c.stderr(d); err != nil {
		return err
	}
	valid, err := d.paths("")
	if err != nil {
		return err
	}
	asked := map[string]bool{}
	for _, p := range op.Paths {
		asked[p] = true
	}
	for i, p := range valid {
		if !asked[p] {
			return d.protoErr(fmt.Sprintf("path %d", i), "%s was not asked about", p)
		}
	}
	op.Valid = valid
	return nil
}

// AddTempRoots makes paths temporary GC roots on the machine for as long
// as this connection lasts: a garbage collection there leaves them alone.
// It is what the serve protocol's QueryValidPaths with lock does for each
// path. The daemon takes them from untrusted users too (it checks nothing
// but the path), and a path need not be valid: root first, then ask
// QueryValidPaths, and a path found valid stays so.
//
// The daemon protocol has one path per AddTempRoot, so the requests are
// pipelined, [MaxTempRootBatch] at a time: one round trip per batch, and
// the replies of a batch (16 bytes each) fit in a pipe the client does
// not read while it writes.
func (c *Conn) AddTempRoots(ctx context.Context, paths []string) error {
	if err := checkPaths("AddTempRoot", "request", paths); err != nil {
		return err
	}
	for batch := range slices.Chunk(paths, MaxTempRootBatch) {
		if err := c.do(ctx, &addTempRootsOp{Paths: batch}); err != nil {
			return err
		}
	}
	return nil
}

// MaxTempRootBatch is the most AddTempRoot requests [Conn.AddTempRoots]
// sends before it reads their replies.
const MaxTempRootBatch = 1024

// addTempRootsOp is opcode 11 (wopAddTempRoot; daemon: nix 2.8.0 and
// 2.26.3 src/libstore/daemon.cc; 2.34.8 reads the path as a StorePath,
// the same string on the wire), once per path.
//
//	request: string path
//	reply:   log messages, u64 1
type addTempRootsOp struct {
	Paths []string
}

func (*addTempRootsOp) name() string { return "AddTempRoot" }

// opcode is 0: writeRequest writes one per request.
func (*addTempRootsOp) opcode() uint64 { return 0 }

func (op *addTempRootsOp) writeRequest(c *Conn, e *wire.Writer) error {
	for _, p := range op.Paths {
		e.Uint64(opAddTempRoot)
		e.String(p)
	}
	return nil
}

func (op *addTempRootsOp) readReply(c *Conn, d *decoder) error {
	for i := range op.Paths {
		if err := c.stderr(d); err != nil {
			return err
		}
		field := fmt.Sprintf("result %d", i)
		v, err := d.u64(field)
		if err != nil {
			return err
		}
		if v != 1 {
			return d.protoErr(field, "got %d, want 1", v)
		}
	}
	return nil
}

// QueryPathInfo returns what the machine knows of path; ok is false if the
// path is not valid there. NarHash is "sha256:<nix32>", converted from the
// base-16 the daemon sends.
func (c *Conn) QueryPathInfo(ctx context.Context, path string) (info serveproto.PathInfo, ok bool, err error) {
	if err := checkPaths("QueryPathInfo", "request", []string{path}); err != nil {
		return info, false, err
	}
	op := &queryPathInfoOp{Path: path}
	if err := c.do(ctx, op); err != nil {
		return info, false, err
	}
	return op.Info, op.Valid, nil
}

// QueryPathInfos returns what the machine knows of those of paths that
// are valid there, in their order, as the serve protocol's QueryPathInfos
// does: one QueryPathInfo each, since the daemon protocol has no batch.
func (c *Conn) QueryPathInfos(ctx context.Context, paths []string) ([]serveproto.PathInfo, error) {
	var infos []serveproto.PathInfo
	for _, p := range paths {
		info, ok, err := c.QueryPathInfo(ctx, p)
		if err != nil {
			return nil, err
		}
		if ok {
			infos = append(infos, info)
		}
	}
	return infos, nil
}

// queryPathInfoOp is opcode 26 (wopQueryPathInfo; daemon: nix 2.34.8
// src/libstore/daemon.cc; record: worker-protocol.cc
// Serialise<UnkeyedValidPathInfo>).
//
//	request: string path
//	reply:   log messages, u64 valid (1.17+); if 1: string deriver,
//	         string narHash (base16, no prefix), path-set references,
//	         u64 registrationTime, u64 narSize, u64 ultimate (1.16+),
//	         string-set sigs, string ca
type queryPathInfoOp struct {
	Path string

	Valid bool // reply
	Info  serveproto.PathInfo
}

func (*queryPathInfoOp) name() string   { return "QueryPathInfo" }
func (*queryPathInfoOp) opcode() uint64 { return opQueryPathInfo }

func (op *queryPathInfoOp) writeRequest(c *Conn, e *wire.Writer) error {
	e.String(op.Path)
	return nil
}

func (op *queryPathInfoOp) readReply(c *Conn, d *decoder) (err error) {
	if err := c.stderr(d); err != nil {
		return err
	}
	if op.Valid, err = d.bool("valid"); err != nil || !op.Valid {
		return err
	}
	info := &op.Info
	info.Path = op.Path
	if info.Deriver, err = d.optPath("deriver"); err != nil {
		return err
	}
	h, err := d.str("narHash", MaxHashLen)
	if err != nil {
		return err
	}
	algo := nixhash.SHA256
	nh, err := nixhash.ParseAny(h, &algo)
	if err != nil {
		return &ProtocolError{Op: d.op, Field: "narHash", Err: fmt.Errorf("%q: %w", h, err)}
	}
	info.NarHash = nh.Format(nixhash.NixBase32, true)
	if info.References, err = d.paths("references"); err != nil {
		return err
	}
	if info.RegistrationTime, err = d.int64("registrationTime"); err != nil {
		return err
	}
	if info.NarSize, err = d.u64("narSize"); err != nil {
		return err
	}
	info.DownloadSize = info.NarSize
	if info.Ultimate, err = d.bool("ultimate"); err != nil {
		return err
	}
	if info.Sigs, err = d.strs("sigs", "sig", MaxSigs, MaxSigLen); err != nil {
		return err
	}
	info.CA, err = d.str("ca", MaxContentAddressLen)
	return err
}

// NarFromPath writes the NAR of a valid path to w and returns its size
// and hash. The reply has no length: the NAR is parsed with package nar
// to find its end, and nothing past it is read. With info.NarSize and
// info.NarHash set (from [Conn.QueryPathInfo]), the NAR is checked
// against them while it streams: it may not run on past NarSize, and a
// mismatch is a *ProtocolError. Any failure breaks the Conn, a failure of
// w included, because the rest of the NAR is still in the stream.
func (c *Conn) NarFromPath(ctx context.Context, info serveproto.PathInfo, w io.Writer) (nar.Stats, error) {
	if err := checkPaths("NarFromPath", "request", []string{info.Path}); err != nil {
		return nar.Stats{}, err
	}
	if (info.NarSize == 0) != (info.NarHash == "") {
		return nar.Stats{}, fmt.Errorf("daemonproto: NarFromPath %s: give both NarSize and NarHash, or neither", info.Path)
	}
	if info.NarSize > math.MaxInt64 {
		return nar.Stats{}, fmt.Errorf("daemonproto: NarFromPath %s: NarSize %d is out of range", info.Path, info.NarSize)
	}
	op := &narFromPathOp{Info: info, w: w}
	if err := c.do(ctx, op); err != nil {
		return nar.Stats{}, err
	}
	return op.Stats, nil
}

// narFromPathOp is opcode 38 (wopNarFromPath; daemon: nix 2.34.8
// src/libstore/daemon.cc, which ends the log before dumping; client:
// worker-protocol-connection.cc narFromPath, remote-store.cc 2.8.0
// copyNAR).
//
//	request: string path
//	reply:   log messages, then the NAR, raw and unframed
type narFromPathOp struct {
	Info serveproto.PathInfo
	w    io.Writer

	Stats nar.Stats // reply
}

func (*narFromPathOp) name() string   { return "NarFromPath" }
func (*narFromPathOp) opcode() uint64 { return opNarFromPath }

func (op *narFromPathOp) writeRequest(c *Conn, e *wire.Writer) error {
	e.String(op.Info.Path)
	return nil
}

func (op *narFromPathOp) readReply(c *Conn, d *decoder) error {
	if err := c.stderr(d); err != nil {
		return err
	}
	w := &recordingWriter{w: op.w}
	var st nar.Stats
	var err error
	if op.Info.NarSize != 0 {
		st, err = nar.Verify(w, d.r, int64(op.Info.NarSize), op.Info.NarHash, nar.DefaultLimits)
	} else {
		st, err = nar.Copy(w, d.r, nar.DefaultLimits)
	}
	switch {
	case err == nil:
		op.Stats = st
		return nil
	case w.err != nil:
		return fmt.Errorf("daemonproto: NarFromPath %s: writing the NAR: %w", op.Info.Path, err)
	case c.rr.err != nil:
		return d.streamErr("NAR", err)
	default:
		return &ProtocolError{Op: d.op, Field: "NAR of " + op.Info.Path, Err: err}
	}
}

// Item is one path for [Conn.AddMultipleToStore].
type Item struct {
	// Info needs Path, NarHash and NarSize; Deriver, References, Sigs, CA,
	// RegistrationTime and Ultimate are sent as given.
	Info serveproto.PathInfo
	// NAR is read up to the NAR's end and no further.
	NAR io.Reader
}

// AddMultipleToStore adds paths to the machine's store in one framed
// stream, references first: the daemon registers each path as it
// arrives. dontCheckSigs asks a trusted daemon not to require
// signatures; an untrusted one checks them anyway, so unsigned
// input-addressed paths are refused there (content-addressed ones, .drv
// files and sources, need none).
//
// Each NAR is validated with package nar while it is sent and checked
// against its NarSize and NarHash. An invalid NAR, a failing reader or a
// mismatch leaves the frames unfinished, which breaks the Conn: the
// caller must close the transport, and the daemon adds nothing more. A
// failure the daemon reports is a *RemoteError and leaves the Conn usable.
func (c *Conn) AddMultipleToStore(ctx context.Context, items []Item, dontCheckSigs bool) error {
	for i, it := range items {
		what := fmt.Sprintf("item %d", i)
		if err := checkInfo("AddMultipleToStore", what, it.Info); err != nil {
			return err
		}
		if it.NAR == nil {
			return fmt.Errorf("daemonproto: AddMultipleToStore: %s (%s): no NAR reader", what, it.Info.Path)
		}
		if it.Info.NarSize == 0 || it.Info.NarSize > math.MaxInt64 {
			return fmt.Errorf("daemonproto: AddMultipleToStore: %s (%s): NarSize %d is out of range", what, it.Info.Path, it.Info.NarSize)
		}
		if _, err := parseNarHash(it.Info.NarHash); err != nil {
			return fmt.Errorf("daemonproto: AddMultipleToStore: %s (%s): narHash: %w", what, it.Info.Path, err)
		}
	}
	return c.do(ctx, &addMultipleToStoreOp{Items: items, DontCheckSigs: dontCheckSigs})
}

// addMultipleToStoreOp is opcode 44 (wopAddMultipleToStore, 1.32+;
// daemon: nix 2.34.8 src/libstore/daemon.cc; stream: store-api.cc
// addMultipleToStore, which reads each ValidPathInfo in the 1.16 layout).
//
//	request: u64 repair (0), u64 dontCheckSigs, then frames (u64 length,
//	         that many bytes, no padding; a 0 length ends them) holding:
//	         u64 count, per path: string path, string deriver, string
//	         narHash (base16, no prefix), path-set references,
//	         u64 registrationTime, u64 narSize, u64 ultimate,
//	         string-set sigs, string ca, then the NAR raw
//	reply:   log messages only
type addMultipleToStoreOp struct {
	Items         []Item
	DontCheckSigs bool
}

func (*addMultipleToStoreOp) name() string   { return "AddMultipleToStore" }
func (*addMultipleToStoreOp) opcode() uint64 { return opAddMultipleToStore }

func (op *addMultipleToStoreOp) writeRequest(c *Conn, e *wire.Writer) error {
	e.Bool(false) // repair
	e.Bool(op.DontCheckSigs)
	fw := newFrameWriter(e)
	f := fw.wire()
	f.Uint64(uint64(len(op.Items)))
	for i, it := range op.Items {
		info := it.Info
		h, _ := parseNarHash(info.NarHash) // checked by AddMultipleToStore
		f.String(info.Path)
		f.String(info.Deriver)
		f.String(h.Format(nixhash.Base16, false))
		f.Set(info.References)
		f.Uint64(uint64(info.RegistrationTime))
		f.Uint64(info.NarSize)
		f.Bool(info.Ultimate)
		f.Set(info.Sigs)
		f.String(info.CA)
		if f.Err() != nil {
			return nil // do reports the transport's error
		}
		lr := &io.LimitedReader{R: it.NAR, N: int64(info.NarSize)}
		st, err := nar.Copy(f, lr, nar.DefaultLimits)
		if err != nil {
			if e.Err() != nil {
				return err
			}
			if lr.N == 0 {
				return fmt.Errorf("daemonproto: AddMultipleToStore: item %d (%s): NAR is longer than NarSize %d: %w", i, info.Path, info.NarSize, err)
			}
			return fmt.Errorf("daemonproto: AddMultipleToStore: item %d (%s): NAR: %w", i, info.Path, err)
		}
		if err := checkStats(info, st); err != nil {
			return fmt.Errorf("daemonproto: AddMultipleToStore: item %d (%s): %w", i, info.Path, err)
		}
	}
	f.Flush() // into the last frame; a failure is the transport's, in e
	fw.close()
	return nil
}

func (*addMultipleToStoreOp) readReply(c *Conn, d *decoder) error { return c.stderr(d) }

// BuildMode is how a build runs (nix 2.8.0 src/libstore/store-api.hh
// BuildMode).
type BuildMode uint64

const (
	BuildNormal BuildMode = 0
	BuildRepair BuildMode = 1
	BuildCheck  BuildMode = 2
)

// BuildResult is the daemon's reply about one build: the serve
// protocol's fields, which mean the same, and the CPU times of protocol
// 1.37+.
type BuildResult struct {
	serveproto.BuildResult
	// CPUUser and CPUSystem are the build's CPU times; nil when the daemon
	// does not send them (before 1.37) or does not know them.
	CPUUser, CPUSystem *time.Duration
}

// BuildDerivation builds drv on the machine and waits for the result. The
// .drv file need not exist there; InputSrcs must be valid there (send
// them with AddMultipleToStore first). A failed build is a BuildResult
// with a failure status, not an error.
//
// An untrusted user (trust flag NotTrusted) may build only
// content-addressed derivations this way: for an input-addressed one this
// returns an [*UntrustedError] before sending anything, and the Conn stays
// usable. Nix's build-remote then copies the .drv closure and calls
// [Conn.BuildPathsWithResults] instead.
func (c *Conn) BuildDerivation(ctx context.Context, drvPath string, drv serveproto.BasicDerivation, mode BuildMode) (*BuildResult, error) {
	const opName = "BuildDerivation"
	if err := checkDrvPath(opName, drvPath); err != nil {
		return nil, err
	}
	if err := checkPaths(opName, "inputSrcs", drv.InputSrcs); err != nil {
		return nil, err
	}
	for name, o := range drv.Outputs {
		if name == "" {
			return nil, fmt.Errorf("daemonproto: %s: output with an empty name", opName)
		}
		if o.Path != "" {
			if err := checkPaths(opName, "output "+name, []string{o.Path}); err != nil {
				return nil, err
			}
		}
	}
	if mode > BuildCheck {
		return nil, fmt.Errorf("daemonproto: %s: build mode %d", opName, mode)
	}
	if c.Err() == nil && c.trust == NotTrusted && InputAddressed(drv) {
		return nil, &UntrustedError{Op: opName, DrvPath: drvPath}
	}
	op := &buildDerivationOp{DrvPath: drvPath, Drv: drv, Mode: mode}
	if err := c.do(ctx, op); err != nil {
		return nil, err
	}
	return &op.Result, nil
}

// InputAddressed reports whether the daemon takes drv for an
// input-addressed derivation, which it builds with BuildDerivation only
// for a trusted user: one with an output whose path is set and that has
// no hash algorithm (DerivationOutput's comment in serveproto).
func InputAddressed(drv serveproto.BasicDerivation) bool {
	for _, o := range drv.Outputs {
		if o.Path != "" && o.HashAlgo == "" {
			return true
		}
	}
	return false
}

// buildDerivationOp is opcode 36 (wopBuildDerivation; daemon: nix 2.34.8
// src/libstore/daemon.cc; client: worker-protocol-connection.cc
// putBuildDerivationRequest).
//
//	request: string drvPath, BasicDerivation (as the serve protocol's),
//	         u64 buildMode
//	reply:   log messages, BuildResult
type buildDerivationOp struct {
	DrvPath string
	Drv     serveproto.BasicDerivation
	Mode    BuildMode

	Result BuildResult // reply
}

func (*buildDerivationOp) name() string   { return "BuildDerivation" }
func (*buildDerivationOp) opcode() uint64 { return opBuildDerivation }

func (op *buildDerivationOp) writeRequest(c *Conn, e *wire.Writer) error {
	e.String(op.DrvPath)
	serveproto.WriteBasicDerivation(e, op.Drv)
	e.Uint64(uint64(op.Mode))
	return nil
}

func (op *buildDerivationOp) readReply(c *Conn, d *decoder) (err error) {
	if err := c.stderr(d); err != nil {
		return err
	}
	op.Result, err = readBuildResult(d, "", c.version)
	return err
}

// readBuildResult reads a BuildResult (nix 2.34.8
// src/libstore/worker-protocol.cc Serialise<BuildResult>; 2.8.0
// remote-store.cc buildDerivation): status, errorMsg, timesBuilt,
// isNonDeterministic, startTime, stopTime (1.29+), cpuUser and cpuSystem
// as optional microseconds (1.37+), builtOutputs (1.28+).
func readBuildResult(d *decoder, field string, v Version) (BuildResult, error) {
	var res BuildResult
	st, err := d.max(subField(field, "status"), math.MaxUint8)
	if err != nil {
		return res, err
	}
	res.Status = serveproto.BuildStatus(st)
	msg, err := d.str(subField(field, "errorMsg"), MaxErrorMsgLen)
	if err != nil {
		return res, err
	}
	res.ErrorMsg = serveproto.StripANSI(msg)
	n, err := d.uint32(subField(field, "timesBuilt"))
	if err != nil {
		return res, err
	}
	res.TimesBuilt = int(n)
	if res.IsNonDeterministic, err = d.bool(subField(field, "isNonDeterministic")); err != nil {
		return res, err
	}
	if res.StartTime, err = readTime(d, subField(field, "startTime")); err != nil {
		return res, err
	}
	if res.StopTime, err = readTime(d, subField(field, "stopTime")); err != nil {
		return res, err
	}
	if v.Minor() >= 37 {
		if res.CPUUser, err = readMicros(d, subField(field, "cpuUser")); err != nil {
			return res, err
		}
		if res.CPUSystem, err = readMicros(d, subField(field, "cpuSystem")); err != nil {
			return res, err
		}
	}
	res.BuiltOutputs, err = readBuiltOutputs(d, subField(field, "builtOutputs"))
	return res, err
}

func readTime(d *decoder, field string) (time.Time, error) {
	s, err := d.int64(field)
	if err != nil || s == 0 {
		return time.Time{}, err
	}
	return time.Unix(s, 0), nil
}

// readMicros reads an optional duration: a tag 0 (none) or 1, then an
// int64 of microseconds.
func readMicros(d *decoder, field string) (*time.Duration, error) {
	tag, err := d.max(field+": tag", 1)
	if err != nil || tag == 0 {
		return nil, err
	}
	us, err := d.int64(field)
	if err != nil {
		return nil, err
	}
	if us > math.MaxInt64/int64(time.Microsecond) {
		return nil, d.protoErr(field, "%d µs is out of range", us)
	}
	t := time.Duration(us) * time.Microsecond
	return &t, nil
}

// readBuiltOutputs reads the builtOutputs map: DrvOutput ids to
// realisations in JSON, as in the serve protocol 2.6+.
func readBuiltOutputs(d *decoder, field string) (map[string]string, error) {
	n, err := d.count(field, MaxBuiltOutputs)
	if err != nil {
		return nil, err
	}
	outs := map[string]string{}
	for i := range n {
		f := fmt.Sprintf("%s: entry %d", field, i)
		id, err := d.str(f+": id", MaxDrvOutputLen)
		if err != nil {
			return nil, err
		}
		js, err := d.str(f+": realisation", MaxRealisationLen)
		if err != nil {
			return nil, err
		}
		name, path, err := serveproto.ParseBuiltOutput(id, js)
		if err != nil {
			return nil, &ProtocolError{Op: d.op, Field: f, Err: err}
		}
		if prev, dup := outs[name]; dup && prev != path {
			return nil, d.protoErr(f, "output %q is both %s and %s", name, prev, path)
		}
		outs[name] = path
	}
	return outs, nil
}

// BuildPathsWithResults builds derivations whose .drv files are valid on
// the machine (copy their closure with AddMultipleToStore first) and
// returns one result per path, in the daemon's order, keyed by the path
// as sent. Each path is "<drv>!<out1>,<out2>" or "<drv>!*" for all
// outputs, or a plain store path to substitute. This is what Nix's
// build-remote does for an untrusted user and an input-addressed
// derivation. A failed build is a result with a failure status.
func (c *Conn) BuildPathsWithResults(ctx context.Context, paths []string, mode BuildMode) (map[string]BuildResult, error) {
	const opName = "BuildPathsWithResults"
	for _, p := range paths {
		path, outs, built := strings.Cut(p, "!")
		if err := checkPaths(opName, "request", []string{path}); err != nil {
			return nil, err
		}
		if built && (!strings.HasSuffix(path, ".drv") || outs == "") {
			return nil, fmt.Errorf("daemonproto: %s: %q is not <drv path>!<outputs>", opName, p)
		}
	}
	if mode > BuildCheck {
		return nil, fmt.Errorf("daemonproto: %s: build mode %d", opName, mode)
	}
	op := &buildPathsWithResultsOp{Paths: paths, Mode: mode}
	if err := c.do(ctx, op); err != nil {
		return nil, err
	}
	return op.Results, nil
}

// buildPathsWithResultsOp is opcode 46 (wopBuildPathsWithResults, 1.34+;
// daemon: nix 2.34.8 src/libstore/daemon.cc; records:
// worker-protocol.cc Serialise<KeyedBuildResult>, 2.8.0 remote-store.cc
// Phantom<BuildResult>).
//
//	request: string-list DerivedPaths, u64 buildMode
//	reply:   log messages, u64 count, per result: string DerivedPath,
//	         BuildResult
type buildPathsWithResultsOp struct {
	Paths []string
	Mode  BuildMode

	Results map[string]BuildResult // reply
}

func (*buildPathsWithResultsOp) name() string   { return "BuildPathsWithResults" }
func (*buildPathsWithResultsOp) opcode() uint64 { return opBuildPathsWithResults }

func (op *buildPathsWithResultsOp) writeRequest(c *Conn, e *wire.Writer) error {
	e.Strings(op.Paths)
	e.Uint64(uint64(op.Mode))
	return nil
}

func (op *buildPathsWithResultsOp) readReply(c *Conn, d *decoder) error {
	if err := c.stderr(d); err != nil {
		return err
	}
	// One result per path asked for: that bounds the count.
	n, err := d.count("results", len(op.Paths))
	if err != nil {
		return err
	}
	asked := map[string]bool{}
	for _, p := range op.Paths {
		asked[p] = true
	}
	op.Results = map[string]BuildResult{}
	for i := range n {
		f := fmt.Sprintf("result %d", i)
		p, err := d.str(f+": path", MaxStorePathLen+MaxDrvOutputLen)
		if err != nil {
			return err
		}
		if !asked[p] {
			return d.protoErr(f+": path", "%q was not asked for", p)
		}
		if _, dup := op.Results[p]; dup {
			return d.protoErr(f+": path", "%q sent twice", p)
		}
		res, err := readBuildResult(d, f, c.version)
		if err != nil {
			return err
		}
		op.Results[p] = res
	}
	return nil
}

// checkPaths validates store paths given by the caller, before anything
// is sent: a bad path would make the daemon fail.
func checkPaths(op, what string, paths []string) error {
	for _, p := range paths {
		if err := serveproto.CheckStorePath(p); err != nil {
			return fmt.Errorf("daemonproto: %s: %s: %w", op, what, err)
		}
	}
	return nil
}

func checkDrvPath(op, p string) error {
	if err := serveproto.CheckStorePath(p); err != nil {
		return fmt.Errorf("daemonproto: %s: drvPath: %w", op, err)
	}
	if !strings.HasSuffix(p, ".drv") {
		return fmt.Errorf("daemonproto: %s: drvPath %s does not end in .drv", op, p)
	}
	return nil
}

// checkInfo validates the store paths of a PathInfo given by the caller.
func checkInfo(op, what string, info serveproto.PathInfo) error {
	if err := serveproto.CheckStorePath(info.Path); err != nil {
		return fmt.Errorf("daemonproto: %s: %s: path: %w", op, what, err)
	}
	if info.Deriver != "" {
		if err := serveproto.CheckStorePath(info.Deriver); err != nil {
			return fmt.Errorf("daemonproto: %s: %s: deriver: %w", op, what, err)
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

// checkStats compares what a NAR copy saw with the caller's NarSize and
// NarHash.
func checkStats(info serveproto.PathInfo, st nar.Stats) error {
	if uint64(st.Size) != info.NarSize {
		return fmt.Errorf("NAR is %d bytes, NarSize says %d", st.Size, info.NarSize)
	}
	h, err := parseNarHash(info.NarHash)
	if err != nil {
		return err
	}
	if string(h.Digest()) != string(st.SHA256[:]) {
		return fmt.Errorf("narHash mismatch: NAR has %s, info says %s", st.NixHash(), info.NarHash)
	}
	return nil
}

// seconds converts a duration to the whole seconds Nix takes, rounding up
// so that a positive duration never becomes 0 ("no limit").
func seconds(op, field string, d time.Duration) (uint64, error) {
	s := math.Ceil(d.Seconds())
	if s <= 0 {
		return 0, nil
	}
	if s > math.MaxUint32 {
		return 0, fmt.Errorf("daemonproto: %s: %s: %v s exceeds %d s", op, field, s, uint64(math.MaxUint32))
	}
	return uint64(s), nil
}

// recordingWriter remembers the first error of the writer it wraps, so a
// failed NAR copy can be blamed on the right side.
type recordingWriter struct {
	w   io.Writer
	err error
}

func (r *recordingWriter) Write(p []byte) (int, error) {
	n, err := r.w.Write(p)
	if err != nil && r.err == nil {
		r.err = err
	}
	return n, err
}
