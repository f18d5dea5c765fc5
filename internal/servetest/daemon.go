package servetest

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nix-community/go-nix/pkg/nixhash"

	"github.com/nix-offload/nix-offload/internal/nar"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/wire"
)

// The daemon side: the same Server, store and hooks, speaking Nix's
// worker protocol as `nix-daemon --stdio` does (nix 2.34.8
// src/libstore/daemon.cc processConnection), for package daemonproto.

// Worker protocol operations, as [Reply.Op] names them: the opcode plus
// WorkerOps, so they differ from the serve commands.
const (
	WorkerOps                   Op = 0x1000
	DaemonHello                 Op = WorkerOps // Nix version, trust and the first STDERR_LAST
	WorkerAddTempRoot           Op = WorkerOps + 11
	WorkerSetOptions            Op = WorkerOps + 19
	WorkerQueryPathInfo         Op = WorkerOps + 26
	WorkerQueryValidPaths       Op = WorkerOps + 31
	WorkerBuildDerivation       Op = WorkerOps + 36
	WorkerNarFromPath           Op = WorkerOps + 38
	WorkerAddMultipleToStore    Op = WorkerOps + 44
	WorkerBuildPathsWithResults Op = WorkerOps + 46
)

var workerOpNames = map[Op]string{
	DaemonHello: "DaemonHello", WorkerAddTempRoot: "AddTempRoot", WorkerSetOptions: "SetOptions", WorkerQueryPathInfo: "QueryPathInfo",
	WorkerQueryValidPaths: "QueryValidPaths", WorkerBuildDerivation: "BuildDerivation (worker)",
	WorkerNarFromPath: "NarFromPath", WorkerAddMultipleToStore: "AddMultipleToStore",
	WorkerBuildPathsWithResults: "BuildPathsWithResults",
}

// Worker protocol constants (nix 2.8.0 src/libstore/worker-protocol.hh).
const (
	workerMagic1 = 0x6e697863
	workerMagic2 = 0x6478696f

	// DefaultDaemonVersion is the worker protocol version a Server
	// announces unless DaemonVersion says otherwise: 1.38.
	DefaultDaemonVersion = 1<<8 | 38

	// STDERR_* tags, for tests that write their own log streams.
	StderrNext          = 0x6f6c6d67
	StderrRead          = 0x64617461
	StderrWrite         = 0x64617416
	StderrLast          = 0x616c7473
	StderrError         = 0x63787470
	StderrStartActivity = 0x53545254
	StderrStopActivity  = 0x53544f50
	StderrResult        = 0x52534c54
)

// DaemonSettings is what the last SetOptions of a daemon session sent.
type DaemonSettings struct {
	KeepFailed               bool
	Verbosity, MaxSilentTime uint64
	UseSubstitutes           bool
	Overrides                map[string]string
}

// LogError is a structured STDERR_ERROR message (protocol 1.26+).
func LogError(msg string) []byte {
	return new(Enc).U64(StderrError).Str("Error").U64(0).Str("Error").Str(msg).U64(0, 0).Bytes()
}

// LogLast is STDERR_LAST.
func LogLast() []byte { return new(Enc).U64(StderrLast).Bytes() }

// BuildLog is the log of a build as a daemon sends it: the build's
// activity (actBuild, 105), one resBuildLogLine (101) result per line of
// log, the activity's end.
func BuildLog(drvPath, log string) []byte {
	var e Enc
	const act = 42
	e.U64(StderrStartActivity, act, 3, 105).Str("building '" + drvPath + "'")
	e.U64(4, 1).Str(drvPath).U64(1).Str("").U64(0, 1, 0, 1).U64(0)
	for _, line := range strings.SplitAfter(log, "\n") {
		if line = strings.TrimSuffix(line, "\n"); line != "" {
			e.U64(StderrResult, act, 101, 1, 1).Str(line)
		}
	}
	e.U64(StderrStopActivity, act)
	return e.Bytes()
}

// daemonSession is one run of the worker protocol; it reads requests
// with the serve session's strict readers.
type daemonSession struct {
	*session
	version  uint64 // negotiated
	settings DaemonSettings
}

// ServeDaemon runs one worker protocol session, as `nix-daemon --stdio`:
// in is its stdin, out its stdout, stderr its stderr. A request it cannot
// parse, or a failure Nix reports after its log (NarFromPath of an
// invalid path), is printed as "error: …" on stderr and ends the session
// with status 1; failures Nix reports in band (a bad upload, a missing
// reference) are sent as STDERR_ERROR and the session goes on. It returns
// 0 when the client closes its end between requests.
func (s *Server) ServeDaemon(in io.Reader, out, stderr io.Writer) int {
	ss := &session{s: s, in: bufio.NewReader(in), out: out, stderr: stderr}
	ss.w = wire.NewReader(ss.in)
	ds := &daemonSession{session: ss}
	err := ds.run()
	var re *requestError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &re):
		fmt.Fprintf(stderr, "error: %s\n", re.msg)
	case errors.Is(err, errHangup), errors.Is(err, errStall):
	default:
		fmt.Fprintf(stderr, "error: %v\n", err)
	}
	return 1
}

func (ds *daemonSession) run() error {
	magic, err := ds.w.Uint64()
	if err != nil {
		return fmt.Errorf("reading the greeting: %w", err)
	}
	if magic != workerMagic1 {
		return reject("protocol mismatch")
	}
	version := ds.s.DaemonVersion
	if version == 0 {
		version = DefaultDaemonVersion
	}
	if err := ds.send(&Reply{Op: Handshake, Bytes: new(Enc).U64(workerMagic2, version).Bytes()}); err != nil {
		return err
	}
	client, err := ds.w.Uint64()
	if err != nil {
		return fmt.Errorf("reading the client version: %w", err)
	}
	ds.version = min(version, client)
	var hello Enc
	if ds.version&0xff >= 38 {
		if _, err := ds.strs("features", true, maxString); err != nil {
			return err
		}
		if err := ds.send(&Reply{Op: Handshake, Bytes: new(Enc).Set(ds.s.DaemonFeatures).Bytes()}); err != nil {
			return err
		}
	}
	if aff, err := ds.u64("cpu affinity"); err != nil {
		return err
	} else if aff != 0 {
		if _, err := ds.u64("cpu"); err != nil {
			return err
		}
	}
	if _, err := ds.u64("reserveSpace"); err != nil {
		return err
	}
	nixVersion := ds.s.NixVersion
	if nixVersion == "" {
		nixVersion = "2.34.8"
	}
	hello.Str(nixVersion)
	if ds.version&0xff >= 35 {
		hello.U64(uint64(ds.s.Trust))
	}
	hello.Raw(LogLast())
	if err := ds.send(&Reply{Op: DaemonHello, Bytes: hello.Bytes()}); err != nil {
		return err
	}
	for {
		op, err := ds.w.Uint64()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if err := ds.command(WorkerOps + Op(op)); err != nil {
			return err
		}
	}
}

func (ds *daemonSession) command(op Op) error {
	switch op {
	case WorkerAddTempRoot:
		return ds.addTempRoot()
	case WorkerSetOptions:
		return ds.setOptions()
	case WorkerQueryValidPaths:
		return ds.queryValidPaths()
	case WorkerQueryPathInfo:
		return ds.queryPathInfo()
	case WorkerNarFromPath:
		return ds.narFromPath()
	case WorkerAddMultipleToStore:
		return ds.addMultipleToStore()
	case WorkerBuildDerivation:
		return ds.buildDerivation()
	case WorkerBuildPathsWithResults:
		return ds.buildPathsWithResults()
	}
	return reject("invalid operation %d", uint64(op-WorkerOps))
}

// reply sends the log (STDERR_LAST appended) and then bytes.
func (ds *daemonSession) reply(op Op, path string, log, bytes []byte) error {
	return ds.send(&Reply{Op: op, Path: path, Bytes: slices.Concat(log, LogLast(), bytes)})
}

func (ds *daemonSession) setOptions() error {
	var st DaemonSettings
	var err error
	fields := []string{"keepFailed", "keepGoing", "tryFallback", "verbosity", "maxBuildJobs", "maxSilentTime",
		"useBuildHook", "buildVerbosity", "logType", "printBuildTrace", "buildCores", "useSubstitutes"}
	vals := make([]uint64, len(fields))
	for i, f := range fields {
		if vals[i], err = ds.u64(f); err != nil {
			return err
		}
	}
	st.KeepFailed, st.Verbosity, st.MaxSilentTime, st.UseSubstitutes = vals[0] != 0, vals[3], vals[5], vals[11] != 0
	n, err := ds.w.Count(maxSet)
	if err != nil {
		return fmt.Errorf("overrides: count: %w", err)
	}
	st.Overrides = map[string]string{}
	for i := range n {
		k, err := ds.str(fmt.Sprintf("override %d: name", i), maxString)
		if err != nil {
			return err
		}
		if st.Overrides[k], err = ds.str("override "+k, maxString); err != nil {
			return err
		}
	}
	ds.settings = st
	ds.s.mu.Lock()
	ds.s.daemonSettings = append(ds.s.daemonSettings, st)
	ds.s.mu.Unlock()
	ds.record(WorkerSetOptions)
	return ds.reply(WorkerSetOptions, "", nil, nil)
}

// SettingsSent returns what every SetOptions of every daemon session
// sent, in order.
func (s *Server) SettingsSent() []DaemonSettings {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.daemonSettings)
}

// addTempRoot takes the path, as Nix does whether it is valid or not
// (nix 2.34.8 src/libstore/daemon.cc wopAddTempRoot), and answers 1.
func (ds *daemonSession) addTempRoot() error {
	p, err := ds.path("path")
	if err != nil {
		return err
	}
	ds.record(WorkerAddTempRoot, p)
	return ds.reply(WorkerAddTempRoot, p, nil, new(Enc).U64(1).Bytes())
}

func (ds *daemonSession) queryValidPaths() error {
	paths, err := ds.paths("paths")
	if err != nil {
		return err
	}
	if _, err := ds.bool("substitute"); err != nil {
		return err
	}
	ds.record(WorkerQueryValidPaths, paths...)
	var valid []string
	for _, p := range paths {
		if _, ok := ds.lookup(p); ok {
			valid = append(valid, p)
		}
	}
	return ds.reply(WorkerQueryValidPaths, "", nil, new(Enc).Set(valid).Bytes())
}

func (ds *daemonSession) queryPathInfo() error {
	p, err := ds.path("path")
	if err != nil {
		return err
	}
	ds.record(WorkerQueryPathInfo, p)
	path, ok := ds.lookup(p)
	if !ok {
		return ds.reply(WorkerQueryPathInfo, p, nil, new(Enc).U64(0).Bytes())
	}
	info := path.Info
	var e Enc
	e.U64(1).Str(info.Deriver, hexHash(info.NarHash)).Set(info.References)
	e.U64(uint64(max(info.RegistrationTime, 1)), info.NarSize).Bool(info.Ultimate).Set(info.Sigs).Str(info.CA)
	return ds.reply(WorkerQueryPathInfo, p, nil, e.Bytes())
}

// hexHash turns "sha256:<nix32>" into the base 16 the daemon sends; a
// hash it cannot parse is sent as it is (a lie for a test).
func hexHash(h string) string {
	algo := nixhash.SHA256
	parsed, err := nixhash.ParseAny(h, &algo)
	if err != nil {
		return h
	}
	return hex.EncodeToString(parsed.Digest())
}

func (ds *daemonSession) narFromPath() error {
	p, err := ds.path("path")
	if err != nil {
		return err
	}
	ds.record(WorkerNarFromPath, p)
	path, ok := ds.lookup(p)
	if !ok {
		// As Nix: the log has ended, the dump fails, the daemon exits.
		ds.send(&Reply{Op: WorkerNarFromPath, Path: p, Bytes: LogLast()})
		return reject("path '%s' is not valid", p)
	}
	return ds.send(&Reply{Op: WorkerNarFromPath, Path: p, Bytes: slices.Concat(LogLast(), path.NAR)})
}

// maxFramed bounds what one AddMultipleToStore may send.
const maxFramed = 1 << 30

func (ds *daemonSession) addMultipleToStore() error {
	if _, err := ds.bool("repair"); err != nil {
		return err
	}
	if _, err := ds.bool("dontCheckSigs"); err != nil {
		return err
	}
	var framed bytes.Buffer
	for {
		n, err := ds.u64("frame length")
		if err != nil {
			return err
		}
		if n == 0 {
			break
		}
		if uint64(framed.Len())+n > maxFramed {
			return reject("AddMultipleToStore: more than %d bytes", maxFramed)
		}
		if _, err := io.CopyN(&framed, ds.in, int64(n)); err != nil {
			return fmt.Errorf("frame: %w", err)
		}
	}
	ds.record(WorkerAddMultipleToStore)
	// Read the stream with the strict readers, from the frames' bytes.
	inner := &session{s: ds.s, in: bufio.NewReader(&framed)}
	inner.w = wire.NewReader(inner.in)
	count, err := inner.u64("count")
	if err != nil {
		return err
	}
	var added []string
	for i := range count {
		var info serveproto.PathInfo
		if info.Path, err = inner.path("path"); err != nil {
			return err
		}
		if info.Deriver, err = inner.optPath("deriver"); err != nil {
			return err
		}
		if info.NarHash, err = inner.str("narHash", maxHash); err != nil {
			return err
		}
		if info.References, err = inner.paths("references"); err != nil {
			return err
		}
		rt, err := inner.u64("registrationTime")
		if err != nil {
			return err
		}
		info.RegistrationTime = int64(rt)
		if info.NarSize, err = inner.u64("narSize"); err != nil {
			return err
		}
		if info.Ultimate, err = inner.bool("ultimate"); err != nil {
			return err
		}
		if info.Sigs, err = inner.strs("sigs", true, maxString); err != nil {
			return err
		}
		if info.CA, err = inner.str("ca", maxString); err != nil {
			return err
		}
		var buf bytes.Buffer
		st, err := nar.Copy(&buf, io.LimitReader(inner.in, int64(min(info.NarSize, 1<<62))), DefaultExportLimits.NAR)
		if err != nil {
			return reject("item %d: importing path '%s': %v", i, info.Path, err)
		}
		if uint64(st.Size) != info.NarSize || !sameHash(info.NarHash, st) {
			return ds.reply(WorkerAddMultipleToStore, info.Path,
				LogError(fmt.Sprintf("hash mismatch importing path '%s';\n  specified: %s\n  got:       %s", info.Path, info.NarHash, st.NixHash())), nil)
		}
		if err := ds.checkRefs(info); err != nil {
			return ds.reply(WorkerAddMultipleToStore, info.Path, LogError(err.Error()), nil)
		}
		if _, ok := ds.lookup(info.Path); !ok {
			info.NarHash = st.NixHash()
			ds.s.Add(info, buf.Bytes())
		}
		added = append(added, info.Path)
	}
	return ds.reply(WorkerAddMultipleToStore, strings.Join(added, " "), nil, nil)
}

func (ds *daemonSession) buildDerivation() error {
	var req BuildRequest
	var err error
	if req.DrvPath, err = ds.path("drvPath"); err != nil {
		return err
	}
	if req.Drv, err = ds.basicDerivation(); err != nil {
		return err
	}
	if _, err := ds.u64("buildMode"); err != nil {
		return err
	}
	req.MaxSilentTime = ds.settings.MaxSilentTime
	req.BuildTimeout, _ = strconv.ParseUint(ds.settings.Overrides["timeout"], 10, 64)
	req.MaxLogSize, _ = strconv.ParseUint(ds.settings.Overrides["max-build-log-size"], 10, 64)
	req.KeepFailed = ds.settings.KeepFailed
	ds.record(WorkerBuildDerivation, req.DrvPath)
	if ds.s.Trust == 2 {
		for _, o := range req.Drv.Outputs {
			if o.Path != "" && o.HashAlgo == "" {
				return ds.reply(WorkerBuildDerivation, req.DrvPath, LogError("you are not privileged to build input-addressed derivations"), nil)
			}
		}
	}
	res := ds.build(req)
	return ds.reply(WorkerBuildDerivation, req.DrvPath, BuildLog(req.DrvPath, res.Log), ds.buildResult(req.DrvPath, res))
}

// build runs the Server's Build, after checking the inputs as the serve
// side does.
func (ds *daemonSession) build(req BuildRequest) BuildReply {
	for _, in := range req.Drv.InputSrcs {
		if _, ok := ds.lookup(in); !ok {
			return BuildReply{Status: serveproto.MiscFailure,
				ErrorMsg: fmt.Sprintf("error: dependency '%s' of '%s' does not exist, and substitution is disabled", in, req.DrvPath)}
		}
	}
	build := ds.s.Build
	if build == nil {
		build = DefaultBuild
	}
	res := build(req)
	if res.Status.Success() {
		ds.s.mu.Lock()
		for _, n := range slices.Sorted(maps.Keys(res.Outputs)) {
			o := res.Outputs[n]
			ds.s.addLocked(o.Info, o.NAR)
		}
		ds.s.mu.Unlock()
	}
	return res
}

// buildResult encodes a BuildResult for the session's version.
func (ds *daemonSession) buildResult(drvPath string, res BuildReply) []byte {
	var e Enc
	e.U64(uint64(res.Status)).Str(res.ErrorMsg)
	now := uint64(time.Now().Unix())
	times := uint64(0)
	if res.Status == serveproto.Built {
		times = 1
	}
	e.U64(times, 0, now, now)
	if ds.version&0xff >= 37 {
		e.U64(1, 1000, 0) // cpuUser 1 ms, cpuSystem unknown
	}
	names := slices.Sorted(maps.Keys(res.Outputs))
	if !res.Status.Success() {
		names = nil
	}
	h := sha256.Sum256([]byte(drvPath))
	e.U64(uint64(len(names)))
	for _, n := range names {
		id := "sha256:" + hex.EncodeToString(h[:]) + "!" + n
		real, _ := json.Marshal(map[string]any{"dependentRealisations": map[string]string{}, "id": id,
			"outPath": strings.TrimPrefix(res.Outputs[n].Info.Path, StoreDir+"/"), "signatures": []string{}})
		e.Str(id, string(real))
	}
	return e.Bytes()
}

func (ds *daemonSession) buildPathsWithResults() error {
	paths, err := ds.strs("paths", false, maxString)
	if err != nil {
		return err
	}
	if _, err := ds.u64("buildMode"); err != nil {
		return err
	}
	ds.record(WorkerBuildPathsWithResults, paths...)
	var e Enc
	e.U64(uint64(len(paths)))
	var log []byte
	for _, p := range paths {
		drvPath, _, _ := strings.Cut(p, "!")
		var res BuildReply
		if _, ok := ds.lookup(drvPath); !ok {
			res = BuildReply{Status: serveproto.MiscFailure, ErrorMsg: fmt.Sprintf("cannot build missing derivation '%s'", drvPath)}
		} else {
			res = ds.build(BuildRequest{DrvPath: drvPath})
		}
		log = append(log, BuildLog(drvPath, res.Log)...)
		e.Str(p).Raw(ds.buildResult(drvPath, res))
	}
	return ds.reply(WorkerBuildPathsWithResults, "", log, e.Bytes())
}
