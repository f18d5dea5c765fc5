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
	"strings"
	"sync"
	"time"

	"github.com/nix-offload/nix-offload/internal/nar"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/wire"
)

// Op is a serve protocol command, or Handshake for the greeting.
type Op uint64

// The operations a [Server] answers. The numbers are the opcodes on the
// wire (nix 2.8.0 src/libstore/serve-protocol.hh).
const (
	Handshake       Op = 0
	QueryValidPaths Op = 1
	QueryPathInfos  Op = 2
	DumpStorePath   Op = 3
	ImportPaths     Op = 4
	QueryClosure    Op = 7
	BuildDerivation Op = 8
	AddToStoreNar   Op = 9
)

func (op Op) String() string {
	switch op {
	case Handshake:
		return "Handshake"
	case QueryValidPaths:
		return "QueryValidPaths"
	case QueryPathInfos:
		return "QueryPathInfos"
	case DumpStorePath:
		return "DumpStorePath"
	case ImportPaths:
		return "ImportPaths"
	case QueryClosure:
		return "QueryClosure"
	case BuildDerivation:
		return "BuildDerivation"
	case AddToStoreNar:
		return "AddToStoreNar"
	}
	if name, ok := workerOpNames[op]; ok {
		return name
	}
	return fmt.Sprintf("command %d", uint64(op))
}

// Protocol constants (nix 2.8.0 src/libstore/serve-protocol.hh).
const (
	clientMagic = 0x390c9deb
	serverMagic = 0x5452eecb

	// DefaultVersion is the protocol version a Server announces unless
	// told otherwise: 2.7, as Nix 2.4 to 2.34 do.
	DefaultVersion = 0x207
)

// After says what a [Server] does once a reply is sent.
type After int

const (
	// Continue reads the next command.
	Continue After = iota
	// Hangup ends the session: the client sees the reply stream end, as
	// when nix-store exits.
	Hangup
	// Stall sends nothing more and reads (and drops) whatever the client
	// sends until the client closes its end: a machine that stopped
	// answering without closing the connection.
	Stall
)

// Reply is one answer of a [Server], as [Server.Tamper] sees it.
type Reply struct {
	Op Op
	// Path is the store path the request was about (DumpStorePath,
	// AddToStoreNar, BuildDerivation's drvPath), "" for the others.
	Path string
	// Bytes is what is sent. For DumpStorePath it is the NAR.
	Bytes []byte
	// Stderr is written to the server's stderr before Bytes, e.g. an
	// "error: …" line that explains a Hangup.
	Stderr string
	After  After
}

// Path is a valid path in a Server's store.
type Path struct {
	// Info is what QueryPathInfos reports. A lie (a narHash or narSize
	// that does not match NAR) is sent as it is.
	Info serveproto.PathInfo
	// NAR is what DumpStorePath sends.
	NAR []byte
}

// BuildRequest is a BuildDerivation request as the server read it.
type BuildRequest struct {
	DrvPath string
	Drv     serveproto.BasicDerivation
	// The build options, as sent: seconds, bytes.
	MaxSilentTime, BuildTimeout, MaxLogSize uint64
	KeepFailed                              bool
}

// BuildReply is the outcome of a build.
type BuildReply struct {
	Status   serveproto.BuildStatus
	ErrorMsg string
	// Outputs by output name. On success they become valid in the
	// server's store (a NarHash or NarSize left empty is computed from the
	// NAR) and are listed in builtOutputs.
	Outputs map[string]Path
	// Log is written to stderr while "building", as a build's log is.
	Log string
}

// Request records one command the server received.
type Request struct {
	Op    Op
	Paths []string // the store paths it was about
}

// Server is the server side of the serve protocol with an in-memory store.
// Set its fields before the first session; a Server may serve several
// sessions, one after another or at once (one machine, several
// connections).
type Server struct {
	// Version is the protocol version the greeting announces;
	// DefaultVersion if 0. Replies follow the smaller minor version of
	// both sides, as Nix 2.23+ does.
	Version uint64

	// Build runs a BuildDerivation whose inputs are all valid. If nil,
	// [DefaultBuild] is used.
	Build func(BuildRequest) BuildReply

	// Tamper, if set, sees every reply, the greeting included, and may
	// change it.
	Tamper func(*Reply)

	// Stalled, if set, receives the operation whose reply the server
	// stalled on, once it has sent what it was going to send. The send
	// does not block: give the channel room.
	Stalled chan<- Op

	// DaemonVersion is the worker protocol version a daemon session
	// ([Server.ServeDaemon]) announces; DefaultDaemonVersion if 0.
	DaemonVersion uint64
	// DaemonFeatures are the features a 1.38 daemon session offers.
	DaemonFeatures []string
	// NixVersion is the Nix version a daemon session reports; "2.34.8"
	// if empty.
	NixVersion string
	// Trust is the trust flag a daemon session of 1.35+ sends: 0 unknown,
	// 1 trusted, 2 not trusted (then BuildDerivation refuses
	// input-addressed derivations, as Nix does).
	Trust uint64

	mu             sync.Mutex
	daemonSettings []DaemonSettings
	paths          map[string]*Path
	requests       []Request
	reload         func(s *Server) // before each command; see LocalStore
}

// Add makes a path valid in the server's store. A NarHash or NarSize left
// empty in info is computed from narBytes; set them to lie.
func (s *Server) Add(info serveproto.PathInfo, narBytes []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.addLocked(info, narBytes)
}

func (s *Server) addLocked(info serveproto.PathInfo, narBytes []byte) {
	if info.NarHash == "" || info.NarSize == 0 {
		sum := sha256.Sum256(narBytes)
		st := nar.Stats{Size: int64(len(narBytes)), SHA256: sum}
		if info.NarHash == "" {
			info.NarHash = st.NixHash()
		}
		if info.NarSize == 0 {
			info.NarSize = uint64(len(narBytes))
		}
	}
	if info.DownloadSize == 0 {
		info.DownloadSize = info.NarSize
	}
	if s.paths == nil {
		s.paths = map[string]*Path{}
	}
	info.References = slices.Sorted(slices.Values(info.References))
	s.paths[info.Path] = &Path{Info: info, NAR: narBytes}
}

// Delete makes a path invalid in the server's store, as a garbage
// collection on the machine would.
func (s *Server) Delete(path string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.paths, path)
}

// Lookup returns a valid path of the server's store.
func (s *Server) Lookup(path string) (Path, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, ok := s.paths[path]
	if !ok {
		return Path{}, false
	}
	return *p, true
}

// Paths returns every valid path, sorted.
func (s *Server) Paths() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Sorted(maps.Keys(s.paths))
}

// Requests returns the commands received so far, in order.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.requests)
}

// Ops returns the operations received so far, in order.
func (s *Server) Ops() []Op {
	var ops []Op
	for _, r := range s.Requests() {
		ops = append(ops, r.Op)
	}
	return ops
}

// DefaultBuild "builds" every output that has a path: a regular file
// naming the derivation and the output, with the drvPath as deriver and
// no references.
func DefaultBuild(req BuildRequest) BuildReply {
	outs := map[string]Path{}
	for name, o := range req.Drv.Outputs {
		if o.Path == "" {
			return BuildReply{Status: serveproto.MiscFailure,
				ErrorMsg: fmt.Sprintf("error: output '%s' of '%s' has no path; servetest builds input-addressed derivations only", name, req.DrvPath)}
		}
		outs[name] = Path{
			Info: serveproto.PathInfo{Path: o.Path, Deriver: req.DrvPath},
			NAR:  FileNAR(fmt.Sprintf("built %s %s\n", req.DrvPath, name)),
		}
	}
	return BuildReply{Status: serveproto.Built, Outputs: outs}
}

// Limits on what the server reads from a client.
const (
	maxSet    = 1 << 16
	maxString = 1 << 20
	maxHash   = 256
)

// session is one run of the protocol.
type session struct {
	s      *Server
	in     *bufio.Reader
	w      *wire.Reader
	out    io.Writer
	stderr io.Writer
	minor  int // min(server, client)
}

// requestError is a request the server rejects, as Nix does: "error: …" on
// stderr and exit status 1.
type requestError struct{ msg string }

func (e *requestError) Error() string { return e.msg }

func reject(format string, args ...any) error {
	return &requestError{fmt.Sprintf(format, args...)}
}

// errHangup ends a session after a reply whose After is Hangup; errStall
// after Stall, once the client has gone.
var (
	errHangup = errors.New("hung up")
	errStall  = errors.New("stalled")
)

// Serve runs one session: in is the server's stdin (the client's
// requests), out its stdout, stderr its stderr. It returns the exit status
// nix-store would have: 0 when the client closed its end between commands,
// 1 after a rejected request (printed as "error: …" on stderr), a hangup, a
// stall or a failed read or write. It never closes in, out or stderr.
func (s *Server) Serve(in io.Reader, out, stderr io.Writer) int {
	ss := &session{s: s, in: bufio.NewReader(in), out: out, stderr: stderr}
	ss.w = wire.NewReader(ss.in)
	err := ss.run()
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

func (ss *session) run() error {
	magic, err := ss.w.Uint64()
	if err != nil {
		return fmt.Errorf("reading the greeting: %w", err)
	}
	if magic != clientMagic {
		return reject("protocol mismatch")
	}
	version := ss.s.Version
	if version == 0 {
		version = DefaultVersion
	}
	if err := ss.send(&Reply{Op: Handshake, Bytes: new(Enc).U64(serverMagic, version).Bytes()}); err != nil {
		return err
	}
	client, err := ss.w.Uint64()
	if err != nil {
		return fmt.Errorf("reading the client version: %w", err)
	}
	ss.minor = int(min(version&0xff, client&0xff))
	for {
		cmd, err := ss.w.Uint64()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if ss.s.reload != nil {
			ss.s.reload(ss.s)
		}
		if err := ss.command(Op(cmd)); err != nil {
			return err
		}
	}
}

func (ss *session) command(op Op) error {
	switch op {
	case QueryValidPaths:
		return ss.queryValidPaths()
	case QueryPathInfos:
		return ss.queryPathInfos()
	case DumpStorePath:
		return ss.dumpStorePath()
	case ImportPaths:
		return ss.importPaths()
	case QueryClosure:
		return ss.queryClosure()
	case BuildDerivation:
		return ss.buildDerivation()
	case AddToStoreNar:
		if ss.minor < 5 {
			break
		}
		return ss.addToStoreNar()
	}
	return reject("unknown serve command %d", uint64(op))
}

// send applies Tamper and writes the reply.
func (ss *session) send(r *Reply) error {
	if ss.s.Tamper != nil {
		ss.s.Tamper(r)
	}
	if r.Stderr != "" {
		io.WriteString(ss.stderr, r.Stderr)
	}
	if len(r.Bytes) > 0 {
		if _, err := ss.out.Write(r.Bytes); err != nil {
			return fmt.Errorf("writing the %s reply: %w", r.Op, err)
		}
	}
	switch r.After {
	case Hangup:
		return errHangup
	case Stall:
		if ss.s.Stalled != nil {
			select {
			case ss.s.Stalled <- r.Op:
			default:
			}
		}
		io.Copy(io.Discard, ss.in)
		return errStall
	}
	return nil
}

func (ss *session) record(op Op, paths ...string) {
	ss.s.mu.Lock()
	defer ss.s.mu.Unlock()
	ss.s.requests = append(ss.s.requests, Request{Op: op, Paths: paths})
}

// Request readers. Each rejects what a Nix server would, and what our
// client must never send: unsorted sets, non-canonical bools.

func (ss *session) bool(what string) (bool, error) {
	b, err := ss.w.Bool()
	if err != nil {
		return false, fmt.Errorf("%s: %w", what, err)
	}
	return b, nil
}

func (ss *session) u64(what string) (uint64, error) {
	v, err := ss.w.Uint64()
	if err != nil {
		return 0, fmt.Errorf("%s: %w", what, err)
	}
	return v, nil
}

func (ss *session) str(what string, max int) (string, error) {
	s, err := ss.w.String(max)
	if err != nil {
		return "", fmt.Errorf("%s: %w", what, err)
	}
	return s, nil
}

func (ss *session) path(what string) (string, error) {
	p, err := ss.str(what, maxStorePathLen)
	if err != nil {
		return "", err
	}
	if err := checkStorePath(p); err != nil {
		return "", reject("%s: %v", what, err)
	}
	return p, nil
}

func (ss *session) optPath(what string) (string, error) {
	p, err := ss.str(what, maxStorePathLen)
	if err != nil || p == "" {
		return p, err
	}
	if err := checkStorePath(p); err != nil {
		return "", reject("%s: %v", what, err)
	}
	return p, nil
}

// strs reads a list; with set, it must be sorted and without duplicates.
func (ss *session) strs(what string, set bool, max int) ([]string, error) {
	n, err := ss.w.Count(maxSet)
	if err != nil {
		return nil, fmt.Errorf("%s: count: %w", what, err)
	}
	var out []string
	for i := range n {
		s, err := ss.str(fmt.Sprintf("%s: element %d", what, i), max)
		if err != nil {
			return nil, err
		}
		if set && i > 0 && s <= out[i-1] {
			return nil, reject("%s: %q is not sorted after %q", what, s, out[i-1])
		}
		out = append(out, s)
	}
	return out, nil
}

func (ss *session) paths(what string) ([]string, error) {
	ps, err := ss.strs(what, true, maxStorePathLen)
	if err != nil {
		return nil, err
	}
	for _, p := range ps {
		if err := checkStorePath(p); err != nil {
			return nil, reject("%s: %v", what, err)
		}
	}
	return ps, nil
}

func (ss *session) lookup(p string) (*Path, bool) {
	ss.s.mu.Lock()
	defer ss.s.mu.Unlock()
	path, ok := ss.s.paths[p]
	return path, ok
}

// Commands.

func (ss *session) queryValidPaths() error {
	if _, err := ss.bool("lock"); err != nil {
		return err
	}
	if _, err := ss.bool("substitute"); err != nil {
		return err
	}
	ps, err := ss.paths("paths")
	if err != nil {
		return err
	}
	ss.record(QueryValidPaths, ps...)
	var valid []string
	for _, p := range ps {
		if _, ok := ss.lookup(p); ok {
			valid = append(valid, p)
		}
	}
	return ss.send(&Reply{Op: QueryValidPaths, Bytes: new(Enc).Set(valid).Bytes()})
}

func (ss *session) queryPathInfos() error {
	ps, err := ss.paths("paths")
	if err != nil {
		return err
	}
	ss.record(QueryPathInfos, ps...)
	var e Enc
	for _, p := range ps {
		path, ok := ss.lookup(p)
		if !ok {
			continue
		}
		info := path.Info
		e.Str(p, info.Deriver).Set(info.References).U64(info.DownloadSize, info.NarSize)
		if ss.minor >= 4 {
			e.Str(info.NarHash, info.CA).Set(info.Sigs)
		}
	}
	e.Str("")
	return ss.send(&Reply{Op: QueryPathInfos, Bytes: e.Bytes()})
}

func (ss *session) dumpStorePath() error {
	p, err := ss.path("path")
	if err != nil {
		return err
	}
	ss.record(DumpStorePath, p)
	path, ok := ss.lookup(p)
	if !ok {
		return reject("path '%s' is not valid", p)
	}
	return ss.send(&Reply{Op: DumpStorePath, Path: p, Bytes: path.NAR})
}

func (ss *session) queryClosure() error {
	if _, err := ss.bool("includeOutputs"); err != nil {
		return err
	}
	ps, err := ss.paths("paths")
	if err != nil {
		return err
	}
	ss.record(QueryClosure, ps...)
	seen := map[string]bool{}
	todo := slices.Clone(ps)
	for len(todo) > 0 {
		p := todo[len(todo)-1]
		todo = todo[:len(todo)-1]
		if seen[p] {
			continue
		}
		path, ok := ss.lookup(p)
		if !ok {
			return reject("path '%s' is not valid", p)
		}
		seen[p] = true
		todo = append(todo, path.Info.References...)
	}
	return ss.send(&Reply{Op: QueryClosure, Bytes: new(Enc).Set(slices.Collect(maps.Keys(seen))).Bytes()})
}

// importPaths reads an export stream strictly and adds each path as it
// arrives, as Nix does: its references must be valid already, or be the
// path itself.
func (ss *session) importPaths() error {
	x := NewExportReader(ss.in, DefaultExportLimits)
	var imported []string
	for {
		var buf bytes.Buffer
		info, err := x.Next(&buf)
		if err == io.EOF {
			break
		}
		if err != nil {
			return reject("%v", err)
		}
		if err := ss.checkRefs(info); err != nil {
			return err
		}
		ss.s.Add(info, buf.Bytes())
		imported = append(imported, info.Path)
	}
	ss.record(ImportPaths, imported...)
	return ss.send(&Reply{Op: ImportPaths, Bytes: new(Enc).U64(1).Bytes()})
}

func (ss *session) checkRefs(info serveproto.PathInfo) error {
	for _, ref := range info.References {
		if _, ok := ss.lookup(ref); !ok && ref != info.Path {
			return reject("cannot add path '%s' because its reference '%s' is not valid", info.Path, ref)
		}
	}
	return nil
}

func (ss *session) addToStoreNar() error {
	var info serveproto.PathInfo
	var err error
	if info.Path, err = ss.path("path"); err != nil {
		return err
	}
	if info.Deriver, err = ss.optPath("deriver"); err != nil {
		return err
	}
	if info.NarHash, err = ss.str("narHash", maxHash); err != nil {
		return err
	}
	if info.References, err = ss.paths("references"); err != nil {
		return err
	}
	regTime, err := ss.u64("registrationTime")
	if err != nil {
		return err
	}
	info.RegistrationTime = int64(regTime)
	if info.NarSize, err = ss.u64("narSize"); err != nil {
		return err
	}
	if info.Ultimate, err = ss.bool("ultimate"); err != nil {
		return err
	}
	if info.Sigs, err = ss.strs("sigs", true, maxString); err != nil {
		return err
	}
	if info.CA, err = ss.str("ca", maxString); err != nil {
		return err
	}
	ss.record(AddToStoreNar, info.Path)
	if info.NarSize == 0 {
		return reject("narInfo is too old and missing the narSize field")
	}
	var buf bytes.Buffer
	lim := DefaultExportLimits.NAR
	lim.MaxNARSize = int64(min(info.NarSize, uint64(lim.MaxNARSize)))
	st, err := nar.Copy(&buf, io.LimitReader(ss.in, int64(min(info.NarSize, 1<<62))), lim)
	if err != nil {
		return reject("importing path '%s': %v", info.Path, err)
	}
	if uint64(st.Size) != info.NarSize {
		return reject("size mismatch importing path '%s': NAR is %d bytes, narSize says %d", info.Path, st.Size, info.NarSize)
	}
	if !sameHash(info.NarHash, st) {
		return reject("hash mismatch importing path '%s';\n  specified: %s\n  got:       %s", info.Path, info.NarHash, st.NixHash())
	}
	if err := ss.checkRefs(info); err != nil {
		return err
	}
	if _, ok := ss.lookup(info.Path); !ok {
		info.NarHash = st.NixHash()
		ss.s.Add(info, buf.Bytes())
	}
	return ss.send(&Reply{Op: AddToStoreNar, Path: info.Path, Bytes: new(Enc).U64(1).Bytes()})
}

// sameHash compares a narHash as a client sent it (base16 without prefix,
// or any form Nix prints) with a NAR's.
func sameHash(claimed string, st nar.Stats) bool {
	claimed = strings.TrimPrefix(claimed, "sha256:")
	return claimed == hex.EncodeToString(st.SHA256[:]) || "sha256:"+claimed == st.NixHash()
}

func (ss *session) buildDerivation() error {
	var req BuildRequest
	var err error
	if req.DrvPath, err = ss.path("drvPath"); err != nil {
		return err
	}
	if !strings.HasSuffix(req.DrvPath, ".drv") {
		return reject("drvPath %s does not end in .drv", req.DrvPath)
	}
	if req.Drv, err = ss.basicDerivation(); err != nil {
		return err
	}
	if req.MaxSilentTime, err = ss.u64("maxSilentTime"); err != nil {
		return err
	}
	if req.BuildTimeout, err = ss.u64("buildTimeout"); err != nil {
		return err
	}
	if ss.minor >= 2 {
		if req.MaxLogSize, err = ss.u64("maxLogSize"); err != nil {
			return err
		}
	}
	if ss.minor >= 3 {
		repeats, err := ss.u64("nrRepeats")
		if err != nil {
			return err
		}
		if repeats != 0 {
			return reject("client requested repeating builds, but this is not currently implemented")
		}
		if _, err := ss.bool("enforceDeterminism"); err != nil {
			return err
		}
	}
	if ss.minor >= 7 {
		if req.KeepFailed, err = ss.bool("keepFailed"); err != nil {
			return err
		}
	}
	ss.record(BuildDerivation, req.DrvPath)

	start := time.Now().Unix()
	var res BuildReply
	var missing string
	for _, in := range req.Drv.InputSrcs {
		if _, ok := ss.lookup(in); !ok {
			missing = in
			break
		}
	}
	switch {
	case missing != "":
		res = BuildReply{Status: serveproto.MiscFailure,
			ErrorMsg: fmt.Sprintf("error: dependency '%s' of '%s' does not exist, and substitution is disabled", missing, req.DrvPath)}
	case ss.s.Build != nil:
		res = ss.s.Build(req)
	default:
		res = DefaultBuild(req)
	}
	if res.Log != "" {
		io.WriteString(ss.stderr, res.Log)
	}
	names := slices.Sorted(maps.Keys(res.Outputs))
	if res.Status.Success() {
		ss.s.mu.Lock()
		for _, n := range names {
			o := res.Outputs[n]
			ss.s.addLocked(o.Info, o.NAR)
		}
		ss.s.mu.Unlock()
	} else {
		names = nil
	}

	var e Enc
	e.U64(uint64(res.Status)).Str(res.ErrorMsg)
	if ss.minor >= 3 {
		times := uint64(0)
		if res.Status == serveproto.Built {
			times = 1
		}
		e.U64(times, 0, uint64(start), uint64(time.Now().Unix()))
	}
	if ss.minor >= 6 {
		// The id's hash is the server's own (here: of the drvPath); the
		// client uses only the output name and outPath.
		h := sha256.Sum256([]byte(req.DrvPath))
		e.U64(uint64(len(names)))
		for _, n := range names {
			id := "sha256:" + hex.EncodeToString(h[:]) + "!" + n
			real, _ := json.Marshal(map[string]any{
				"dependentRealisations": map[string]string{},
				"id":                    id,
				"outPath":               strings.TrimPrefix(res.Outputs[n].Info.Path, StoreDir+"/"),
				"signatures":            []string{},
			})
			e.Str(id, string(real))
		}
	}
	return ss.send(&Reply{Op: BuildDerivation, Path: req.DrvPath, Bytes: e.Bytes()})
}

// basicDerivation reads a BasicDerivation (nix 2.8.0
// src/libstore/derivations.cc readDerivation).
func (ss *session) basicDerivation() (serveproto.BasicDerivation, error) {
	var d serveproto.BasicDerivation
	n, err := ss.w.Count(maxSet)
	if err != nil {
		return d, fmt.Errorf("outputs: count: %w", err)
	}
	d.Outputs = map[string]serveproto.DerivationOutput{}
	prev := ""
	for i := range n {
		name, err := ss.str(fmt.Sprintf("output %d: name", i), maxString)
		if err != nil {
			return d, err
		}
		if i > 0 && name <= prev {
			return d, reject("outputs: %q is not sorted after %q", name, prev)
		}
		prev = name
		var o serveproto.DerivationOutput
		if o.Path, err = ss.optPath("output " + name + ": path"); err != nil {
			return d, err
		}
		if o.HashAlgo, err = ss.str("output "+name+": hashAlgo", maxString); err != nil {
			return d, err
		}
		if o.Hash, err = ss.str("output "+name+": hash", maxString); err != nil {
			return d, err
		}
		d.Outputs[name] = o
	}
	if d.InputSrcs, err = ss.paths("inputSrcs"); err != nil {
		return d, err
	}
	if d.Platform, err = ss.str("platform", maxString); err != nil {
		return d, err
	}
	if d.Builder, err = ss.str("builder", maxString); err != nil {
		return d, err
	}
	if d.Args, err = ss.strs("args", false, maxString); err != nil {
		return d, err
	}
	n, err = ss.w.Count(maxSet)
	if err != nil {
		return d, fmt.Errorf("env: count: %w", err)
	}
	d.Env = map[string]string{}
	prev = ""
	for i := range n {
		k, err := ss.str(fmt.Sprintf("env %d: key", i), maxString)
		if err != nil {
			return d, err
		}
		if i > 0 && k <= prev {
			return d, reject("env: %q is not sorted after %q", k, prev)
		}
		prev = k
		if d.Env[k], err = ss.str("env "+k, maxString); err != nil {
			return d, err
		}
	}
	return d, nil
}
