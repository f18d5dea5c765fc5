package serveproto

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nix-offload/nix-offload/internal/wire"
)

// BasicDerivation is a derivation as the serve protocol sends it: without
// input derivations and without a name (the server takes the name from the
// .drv path). Inputs that come from other derivations must be listed in
// InputSrcs as output paths; all of InputSrcs must be valid on the server,
// which never substitutes them (nix 2.8.0 src/libstore/derivations.cc
// writeDerivation / readDerivation).
type BasicDerivation struct {
	Outputs   map[string]DerivationOutput // by output name
	InputSrcs []string
	Platform  string // "x86_64-linux"
	Builder   string
	Args      []string
	Env       map[string]string
}

// DerivationOutput is one output of a BasicDerivation:
//
//	input-addressed:  Path set, HashAlgo and Hash ""
//	fixed-output:     Path set, HashAlgo "sha256" (flat) or "r:sha256"
//	                  (recursive), Hash in base16 without prefix
//	floating CA:      Path "", HashAlgo e.g. "r:sha256", Hash ""
//	deferred:         all ""
type DerivationOutput struct {
	Path, HashAlgo, Hash string
}

// BuildOptions are the build settings sent with BuildPaths and
// BuildDerivation (nix 2.8.0 src/nix-store/nix-store.cc getBuildSettings).
// Fields the server's protocol version does not know are not sent. The
// server always builds without substitution, with log level "error" and
// without keeping a build log; the number of repeats is always 0 (Nix 2.13+
// rejects others) and determinism is not enforced.
type BuildOptions struct {
	// MaxSilentTime and BuildTimeout are sent as whole seconds, rounded
	// up, at most 2^32-1; 0 means no limit.
	MaxSilentTime, BuildTimeout time.Duration
	// MaxLogSize is the most bytes of build log the server lets a build
	// write; 0 means no limit. Protocol 2.2+.
	MaxLogSize uint64
	// KeepFailed keeps the build directory of a failed build on the
	// server. Protocol 2.7+.
	KeepFailed bool
}

// buildOptions is BuildOptions on the wire, after conversion.
type buildOptions struct {
	maxSilentTime, buildTimeout uint64
	BuildOptions
}

func (o BuildOptions) wire(op string) (buildOptions, error) {
	ms, err := seconds("MaxSilentTime", o.MaxSilentTime)
	if err != nil {
		return buildOptions{}, fmt.Errorf("serveproto: %s: %w", op, err)
	}
	bt, err := seconds("BuildTimeout", o.BuildTimeout)
	if err != nil {
		return buildOptions{}, fmt.Errorf("serveproto: %s: %w", op, err)
	}
	return buildOptions{ms, bt, o}, nil
}

// write sends the options in the layout for a server of the given minor
// version (2.8 client: legacy-ssh-store.cc putBuildSettings; also nix
// 2.28.0 src/libstore/serve-protocol.cc BuildOptions).
func (o buildOptions) write(e *encoder, minor int) {
	e.Uint64(o.maxSilentTime)
	e.Uint64(o.buildTimeout)
	if minor >= 2 {
		e.Uint64(o.MaxLogSize)
	}
	if minor >= 3 {
		e.Uint64(0) // nrRepeats
		e.Uint64(0) // enforceDeterminism
	}
	if minor >= 7 {
		e.Bool(o.KeepFailed)
	}
}

// BuildStatus is the outcome of a build (BuildResult::Status in nix 2.8.0
// src/libstore/build-result.hh; the numbers are fixed on the wire).
type BuildStatus int

const (
	Built                  BuildStatus = 0
	Substituted            BuildStatus = 1
	AlreadyValid           BuildStatus = 2
	PermanentFailure       BuildStatus = 3
	InputRejected          BuildStatus = 4
	OutputRejected         BuildStatus = 5
	TransientFailure       BuildStatus = 6 // possibly transient
	CachedFailure          BuildStatus = 7 // no longer used
	TimedOut               BuildStatus = 8
	MiscFailure            BuildStatus = 9
	DependencyFailed       BuildStatus = 10
	LogLimitExceeded       BuildStatus = 11
	NotDeterministic       BuildStatus = 12
	ResolvesToAlreadyValid BuildStatus = 13
	NoSubstituters         BuildStatus = 14
)

var buildStatusNames = [...]string{
	"Built", "Substituted", "AlreadyValid", "PermanentFailure", "InputRejected",
	"OutputRejected", "TransientFailure", "CachedFailure", "TimedOut", "MiscFailure",
	"DependencyFailed", "LogLimitExceeded", "NotDeterministic", "ResolvesToAlreadyValid",
	"NoSubstituters",
}

func (s BuildStatus) String() string {
	if s >= 0 && int(s) < len(buildStatusNames) {
		return buildStatusNames[s]
	}
	return fmt.Sprintf("BuildStatus(%d)", int(s))
}

// Success reports whether the outputs are valid: Built, Substituted,
// AlreadyValid or ResolvesToAlreadyValid.
func (s BuildStatus) Success() bool {
	switch s {
	case Built, Substituted, AlreadyValid, ResolvesToAlreadyValid:
		return true
	}
	return false
}

// BuildResult is the reply to BuildDerivation.
type BuildResult struct {
	Status BuildStatus
	// ErrorMsg is "" on success; ANSI escapes are removed.
	ErrorMsg string
	// TimesBuilt, IsNonDeterministic, StartTime and StopTime come from
	// protocol 2.3 on. A time the server sent as 0 (not built) is the zero
	// time.Time; times have whole seconds.
	TimesBuilt         int
	IsNonDeterministic bool
	StartTime          time.Time
	StopTime           time.Time
	// BuiltOutputs maps output name to full store path, from protocol 2.6
	// on (nil before: derive the paths from the derivation). Failed builds
	// send none.
	BuiltOutputs map[string]string
}

// BuildDerivation builds drv on the server and waits for the result. The
// .drv file itself need not exist there, but drvPath must be a store path
// ending in ".drv" (the server derives the derivation's name from it). A
// failed build is a BuildResult with a failure status, not an error; errors
// mean the session failed.
//
// To cancel the build, close the transport's stdin (see [Conn.Close]).
func (c *Conn) BuildDerivation(drvPath string, drv BasicDerivation, opts BuildOptions) (*BuildResult, error) {
	return call(c, "BuildDerivation", func() (*Reply[*BuildResult], error) { return c.SendBuildDerivation(drvPath, drv, opts) })
}

// SendBuildDerivation is [Conn.BuildDerivation] sent ahead: requests sent
// after it are handled when the build is over, and its reply is read in
// its turn. A failed build is still a BuildResult, in step.
func (c *Conn) SendBuildDerivation(drvPath string, drv BasicDerivation, opts BuildOptions) (*Reply[*BuildResult], error) {
	op, err := newBuildDerivation(c, drvPath, drv, opts)
	if err != nil {
		return nil, err
	}
	return sendFor(c, op, func() *BuildResult { return &op.Result })
}

// newBuildDerivation checks a BuildDerivation's arguments and makes its
// operation.
func newBuildDerivation(c *Conn, drvPath string, drv BasicDerivation, opts BuildOptions) (*buildDerivationOp, error) {
	const opName = "BuildDerivation"
	if err := checkDrvPath(opName, drvPath); err != nil {
		return nil, err
	}
	if err := checkPaths(opName, "inputSrcs", drv.InputSrcs); err != nil {
		return nil, err
	}
	for name, o := range drv.Outputs {
		if name == "" {
			return nil, fmt.Errorf("serveproto: %s: output with an empty name", opName)
		}
		if o.Path != "" {
			if err := checkPaths(opName, "output "+name, []string{o.Path}); err != nil {
				return nil, err
			}
		}
	}
	wo, err := opts.wire(opName)
	if err != nil {
		return nil, err
	}
	return &buildDerivationOp{DrvPath: drvPath, Drv: drv, Opts: wo, minor: c.minor()}, nil
}

func checkDrvPath(op, p string) error {
	if err := checkStorePath(p); err != nil {
		return fmt.Errorf("serveproto: %s: drvPath: %w", op, err)
	}
	if !strings.HasSuffix(p, ".drv") {
		// The 2.8 server asserts this and aborts.
		return fmt.Errorf("serveproto: %s: drvPath %s: %w", op, p, errNotDrv)
	}
	return nil
}

// buildDerivationOp is command 8 (cmdBuildDerivation; server: nix 2.8.0
// src/nix-store/nix-store.cc opServe; client: nix 2.8.0
// src/libstore/legacy-ssh-store.cc buildDerivation).
//
//	request: string drvPath, BasicDerivation, build options
//	reply:   BuildResult (readBuildResult)
type buildDerivationOp struct {
	DrvPath string
	Drv     BasicDerivation
	Opts    buildOptions
	minor   int // the server's

	Result BuildResult // reply
}

func (*buildDerivationOp) name() string     { return "BuildDerivation" }
func (*buildDerivationOp) command() command { return cmdBuildDerivation }

func (op *buildDerivationOp) writeRequest(e *encoder) error {
	e.String(op.DrvPath)
	WriteBasicDerivation(e, op.Drv)
	op.Opts.write(e, op.minor)
	return nil
}

func (op *buildDerivationOp) readReply(d *decoder) (err error) {
	op.Result, err = readBuildResult(d, op.minor)
	return err
}

// WriteBasicDerivation writes a derivation as nix 2.8.0
// src/libstore/derivations.cc writeDerivation(Sink&, …) does: outputs by
// name (name, path, hashAlgo, hash), inputSrcs as a set, platform,
// builder, args, env by key. The serve and the daemon protocol
// (internal/daemonproto) send it alike.
func WriteBasicDerivation(e *wire.Writer, drv BasicDerivation) {
	names := sortedKeys(drv.Outputs)
	e.Uint64(uint64(len(names)))
	for _, n := range names {
		o := drv.Outputs[n]
		e.String(n)
		e.String(o.Path)
		e.String(o.HashAlgo)
		e.String(o.Hash)
	}
	e.Set(drv.InputSrcs)
	e.String(drv.Platform)
	e.String(drv.Builder)
	e.Strings(drv.Args)
	keys := sortedKeys(drv.Env)
	e.Uint64(uint64(len(keys)))
	for _, k := range keys {
		e.String(k)
		e.String(drv.Env[k])
	}
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// readBuildResult reads a BuildResult sent to a client of protocol 2.7 by
// a server of the given minor version: status, errorMsg, from 2.3 the
// times, from 2.6 builtOutputs (nix 2.8.0 src/nix-store/nix-store.cc
// opServe; nix 2.28.0 src/libstore/serve-protocol.cc BuildResult).
//
// A 2.4–2.10 server sends builtOutputs to every client (a misplaced
// parenthesis, fixed in 2.11 by NixOS/nix#6946); they all speak 2.7, so
// reading the map whenever the server's minor is at least 6 is right for
// them too.
func readBuildResult(d *decoder, minor int) (BuildResult, error) {
	var res BuildResult
	st, err := d.uint32("status")
	if err != nil {
		return res, err
	}
	res.Status = BuildStatus(st)
	msg, err := d.str("errorMsg", MaxErrorMsgLen)
	if err != nil {
		return res, err
	}
	res.ErrorMsg = StripANSI(msg)
	if minor >= 3 {
		n, err := d.uint32("timesBuilt")
		if err != nil {
			return res, err
		}
		res.TimesBuilt = int(n)
		if res.IsNonDeterministic, err = d.bool("isNonDeterministic"); err != nil {
			return res, err
		}
		if res.StartTime, err = d.time("startTime"); err != nil {
			return res, err
		}
		if res.StopTime, err = d.time("stopTime"); err != nil {
			return res, err
		}
	}
	if minor >= 6 {
		if res.BuiltOutputs, err = readBuiltOutputs(d); err != nil {
			return res, err
		}
	}
	return res, nil
}

func (d *decoder) time(field string) (time.Time, error) {
	s, err := d.int64(field)
	if err != nil || s == 0 {
		return time.Time{}, err
	}
	return time.Unix(s, 0), nil
}

// readBuiltOutputs reads the builtOutputs map of protocol 2.6 and 2.7 and
// keeps, for each output, its name and path. Keys are DrvOutput ids
// "sha256:<hash modulo of the derivation>!<output name>"; values are
// realisations in JSON (nix 2.8.0 src/libstore/realisation.cc) whose
// outPath is a store path's base name:
//
//	{"dependentRealisations":{},"id":"sha256:…!out","outPath":"<hash>-<name>","signatures":[]}
//
// A Nix 2.35+ server talking to a 2.7 client sends {"id":…,"outPath":…}
// only, with a dummy all-zero hash. The hash is computed by the server
// and need not equal the client's, so only the output name and outPath are
// used.
func readBuiltOutputs(d *decoder) (map[string]string, error) {
	n, err := d.count("builtOutputs", MaxBuiltOutputs)
	if err != nil {
		return nil, err
	}
	outs := map[string]string{}
	for i := range n {
		field := fmt.Sprintf("builtOutputs: entry %d", i)
		key, err := d.str(field+": id", MaxDrvOutputLen)
		if err != nil {
			return nil, err
		}
		bang := strings.LastIndexByte(key, '!')
		if bang < 0 || bang == len(key)-1 {
			return nil, d.protoErr(field+": id", "%q is not <hash>!<output name>", key)
		}
		name := key[bang+1:]
		val, err := d.str(field+": realisation", MaxRealisationLen)
		if err != nil {
			return nil, err
		}
		path, err := realisationPath(val)
		if err != nil {
			return nil, &ProtocolError{Op: d.op, Field: field + ": realisation", Err: err}
		}
		if prev, dup := outs[name]; dup && prev != path {
			return nil, d.protoErr(field, "output %q is both %s and %s", name, prev, path)
		}
		outs[name] = path
	}
	return outs, nil
}

// realisationPath returns the full store path in a realisation's JSON.
// Fields other than outPath (id, signatures, dependentRealisations) may
// be missing and are not used.
func realisationPath(js string) (string, error) {
	var r struct {
		OutPath *string `json:"outPath"`
	}
	if err := json.Unmarshal([]byte(js), &r); err != nil {
		return "", fmt.Errorf("%q: %w", truncate(js, 200), err)
	}
	if r.OutPath == nil {
		return "", fmt.Errorf("%q: no outPath", truncate(js, 200))
	}
	p := *r.OutPath
	if !strings.HasPrefix(p, "/") {
		p = StoreDir + "/" + p
	}
	if err := checkStorePath(p); err != nil {
		return "", fmt.Errorf("outPath: %w", err)
	}
	return p, nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// BuildPaths builds or substitutes paths on the server. Each is a store
// path, or "<drv path>!<out1>,<out2>" for chosen outputs of a derivation;
// the .drv files must be valid on the server. A failure reported by the
// server is a [*BuildPathsError] and leaves the Conn usable.
//
// To cancel the build, close the transport's stdin (see [Conn.Close]).
func (c *Conn) BuildPaths(paths []string, opts BuildOptions) error {
	const opName = "BuildPaths"
	for _, p := range paths {
		path, _, _ := strings.Cut(p, "!")
		if err := checkPaths(opName, "request", []string{path}); err != nil {
			return err
		}
	}
	wo, err := opts.wire(opName)
	if err != nil {
		return err
	}
	op := &buildPathsOp{Paths: paths, Opts: wo, minor: c.minor()}
	if err := c.do(op); err != nil {
		return err
	}
	if op.Status != 0 {
		return &BuildPathsError{Status: op.Status, Msg: op.Msg}
	}
	return nil
}

// buildPathsOp is command 6 (cmdBuildPaths; server: nix 2.8.0
// src/nix-store/nix-store.cc opServe).
//
//	request: string-list paths, build options
//	reply:   u64 0, or u64 status and string msg
//
// The 2.8 client takes the status for a BuildResult status and reads msg
// only for failure statuses, so status 1 would desynchronise it; here any
// non-zero status is a failure followed by msg.
type buildPathsOp struct {
	Paths []string
	Opts  buildOptions
	minor int // the server's

	Status uint64 // reply
	Msg    string
}

func (*buildPathsOp) name() string     { return "BuildPaths" }
func (*buildPathsOp) command() command { return cmdBuildPaths }

func (op *buildPathsOp) writeRequest(e *encoder) error {
	e.Strings(op.Paths)
	op.Opts.write(e, op.minor)
	return nil
}

func (op *buildPathsOp) readReply(d *decoder) (err error) {
	if op.Status, err = d.u64("status"); err != nil || op.Status == 0 {
		return err
	}
	msg, err := d.str("msg", MaxErrorMsgLen)
	op.Msg = StripANSI(msg)
	return err
}

// ParseBuiltOutput reads one builtOutputs entry as both the serve and the
// daemon protocol send it: a DrvOutput id "<hash>!<output name>" and a
// realisation in JSON. It returns the output name and the full store path
// of outPath; the id's hash is the server's own and is not checked.
func ParseBuiltOutput(id, realisation string) (name, path string, err error) {
	bang := strings.LastIndexByte(id, '!')
	if bang < 0 || bang == len(id)-1 {
		return "", "", fmt.Errorf("id %q is not <hash>!<output name>", id)
	}
	path, err = realisationPath(realisation)
	if err != nil {
		return "", "", fmt.Errorf("realisation: %w", err)
	}
	return id[bang+1:], path, nil
}
