// Package offload builds one derivation on a remote machine over an
// established serve connection: it sends the inputs the machine lacks,
// runs BuildDerivation, and makes the outputs valid in the local store.
//
// It is the engine shared by the hook's embedded mode, the broker and the
// queue-runner commands. It does no scheduling and opens no connection: the
// caller picks the machine and hands over a *serveproto.Conn. The local store
// is reached through the small [Local] interface (internal/localstore
// implements it).
//
// The steps follow what Nix's own hook does (nix 2.8.0
// src/build-remote/build-remote.cc) with two differences: there is no
// per-machine upload lock, and outputs are made valid by restore plus
// `nix-store --register-validity` because nix-daemon holds their locks.
package offload

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"

	"github.com/nix-community/go-nix/pkg/derivation"

	"github.com/nix-offload/nix-offload/internal/localstore"
	"github.com/nix-offload/nix-offload/internal/nar"
	"github.com/nix-offload/nix-offload/internal/serveproto"
)

// Local is what a remote build needs from the local store.
type Local interface {
	// PathInfos returns the metadata of valid local paths.
	PathInfos(paths []string) ([]serveproto.PathInfo, error)
	// Dump writes the NAR of a local path to w.
	Dump(path string, w io.Writer) (nar.Stats, error)
	// AddOutputs makes the outputs valid, all of them when it returns nil;
	// fetch writes one output's NAR.
	AddOutputs(infos []serveproto.PathInfo, fetch func(path string, w io.Writer) error) error
	// Valid returns the subset of paths that are valid.
	Valid(paths []string) ([]string, error)
}

// Job is one derivation to build remotely.
type Job struct {
	Machine       string // name, for messages
	DrvPath       string
	Drv           *derivation.Derivation
	Inputs        []string // input closure as Nix hands it to the hook (no .drv files)
	WantedOutputs []string // output names; all outputs if empty
	Options       serveproto.BuildOptions
	Substitute    bool // builders-use-substitutes: the machine may substitute inputs itself
	// Transfers shares uploads with other builds on the same machine; nil
	// for none.
	Transfers Transfers
	// KeepOutputs leaves the outputs on the machine: Run fetches nothing
	// and reports their metadata through Events.Outputs instead (a graph
	// build whose intermediates stay on the builders).
	KeepOutputs bool
}

// Events receives progress; any field may be nil.
type Events struct {
	Copying  func(paths int, bytes uint64) // before inputs are sent
	Building func()                        // right before BuildDerivation is sent
	Fetching func(paths int, bytes uint64) // before outputs are fetched
	// Outputs receives the metadata of the wanted outputs as the machine
	// reports them, when Job.KeepOutputs left them there.
	Outputs func(infos []serveproto.PathInfo)
}

// BuildError is a build that ran on the machine and failed there.
type BuildError struct {
	DrvPath, Machine string
	Status           serveproto.BuildStatus
	Msg              string
}

func (e *BuildError) Error() string {
	msg := strings.TrimSpace(e.Msg)
	if msg == "" {
		msg = e.Status.String()
	}
	return fmt.Sprintf("build of '%s' on '%s' failed: %s", e.DrvPath, e.Machine, msg)
}

// TimedOut reports whether the machine stopped the build for max-silent-time
// or timeout.
func (e *BuildError) TimedOut() bool { return e.Status == serveproto.TimedOut }

// Run builds job over conn. ctx cancellation is the caller's business: close
// the session behind conn to stop a running build (see transport). Run
// returns a *BuildError when the build itself failed on the machine.
//
// Requests whose answers the next one does not need go out together (see
// [serveproto.Conn]): inputs that Job.Transfers knows to be on the
// machine are checked (and locked) in the build's flight, ahead of the
// build; if one turns out to be gone, the build fails for want of it and
// Run sends it and builds again. Once the result is in, the query for the
// outputs and, unless they stay on the machine, their NARs go out
// together: a build whose inputs are there costs two round trips. The
// second is also what lets the build's last log lines, which sshd may
// forward after the result, reach the log before it is closed; a failed
// build's result is followed by one exchange for the same reason.
func Run(ctx context.Context, conn *serveproto.Conn, local Local, job Job, ev Events) error {
	return run(ctx, conn, local, job, ev, true)
}

// run is Run; with trustKnown false every input is asked for before the
// build (after a stale hint).
func run(ctx context.Context, conn *serveproto.Conn, local Local, job Job, ev Events, trustKnown bool) error {
	unchecked, err := sendInputs(ctx, conn, local, job, ev, trustKnown)
	if err != nil {
		if ctx.Err() != nil {
			// The caller closed the session: the read or write that
			// failed says only "file already closed".
			return fmt.Errorf("copying inputs to '%s' stopped: %w", job.Machine, context.Cause(ctx))
		}
		return fmt.Errorf("copying inputs to '%s': %w", job.Machine, err)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	drv, err := basicDerivation(job)
	if err != nil {
		return err
	}
	if ev.Building != nil {
		ev.Building()
	}
	fl, err := sendBuild(conn, job, drv, unchecked)
	if err == nil {
		err = fl.readBuild()
	}
	if err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil {
			return fmt.Errorf("build of '%s' on '%s' stopped: %w", job.DrvPath, job.Machine, context.Cause(ctx))
		}
		return fmt.Errorf("build of '%s' on '%s': %w", job.DrvPath, job.Machine, err)
	}
	res := fl.res
	if !res.Status.Success() {
		if len(fl.gone) > 0 {
			// The build failed for want of inputs this side believed
			// were there: the stream is in step (nothing was asked
			// after the build), so send them and build again.
			again := ev
			again.Building = nil // said once: the log is open already
			return run(ctx, conn, local, job, again, false)
		}
		logBarrier(conn)
		return &BuildError{DrvPath: job.DrvPath, Machine: job.Machine, Status: res.Status, Msg: res.ErrorMsg}
	}
	known := fl.infos != nil // the output paths were known before the build
	infos, err := fl.outputInfos(conn, job)
	if tr := job.Transfers; err == nil && tr != nil {
		if known {
			// The machine's build took temporary GC roots on them, for
			// the session's life (nix 2.8.0 src/libstore/build/
			// derivation-goal.cc haveDerivation; the same in 2.26 and
			// 2.34): the next build on this session that needs them
			// need not even check.
			tr.MarkLocked(fl.paths)
		} else {
			tr.Present(fl.paths)
		}
	}
	if job.KeepOutputs {
		if err != nil {
			return fmt.Errorf("outputs of '%s' on '%s': %w", job.DrvPath, job.Machine, err)
		}
		if ev.Outputs != nil {
			ev.Outputs(infos)
		}
		return nil
	}
	if err == nil {
		err = fl.fetchOutputs(conn, local, infos, ev)
	}
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("copying outputs of '%s' from '%s' stopped: %w", job.DrvPath, job.Machine, context.Cause(ctx))
		}
		return fmt.Errorf("copying outputs of '%s' from '%s': %w", job.DrvPath, job.Machine, err)
	}
	return nil
}

// logBarrier is one exchange after a failed build's result, so that the
// build's last log lines reach the log before it is closed: sshd forwards
// the command's stdout and stderr apart, so the result can overtake them,
// and a failure's last lines are what tells the user why (after a good
// result the output query is this exchange). It asks about no path, so
// the answer means nothing; if it fails, the Conn is broken and says so,
// and the session is not reused.
func logBarrier(conn *serveproto.Conn) {
	conn.QueryValidPaths(nil, false, false)
}

// buildFlight is a build's requests, sent together, and their replies.
type buildFlight struct {
	conn    *serveproto.Conn
	job     Job
	check   *serveproto.Reply[[]string] // the unchecked inputs, locked; nil if none
	toCheck []string
	gone    []string // unchecked inputs the machine did not have
	build   *serveproto.Reply[*serveproto.BuildResult]
	res     *serveproto.BuildResult
	paths   []string                                 // the wanted outputs, if known before the build
	infos   *serveproto.Reply[[]serveproto.PathInfo] // sent after a good result when paths are known
	dumps   []*serveproto.DumpReply                  // NARs asked for, in the order of paths
}

// sendBuild sends the build and what can go with it: first a locking
// query for the inputs not asked for yet (unchecked), then the build. It
// notes the outputs' paths when they are known before the build.
func sendBuild(conn *serveproto.Conn, job Job, drv serveproto.BasicDerivation, unchecked []string) (*buildFlight, error) {
	fl := &buildFlight{conn: conn, job: job, toCheck: unchecked}
	var err error
	if len(unchecked) > 0 {
		if fl.check, err = conn.SendQueryValidPaths(unchecked, true, job.Substitute); err != nil {
			return nil, err
		}
	}
	if fl.build, err = conn.SendBuildDerivation(job.DrvPath, drv, job.Options); err != nil {
		return nil, err
	}
	paths, err := outputPaths(job, nil)
	if err != nil {
		// A floating content-addressed output: the build result says
		// where it is.
		return fl, nil
	}
	fl.paths = paths
	return fl, nil
}

// sendDumps asks for the outputs' NARs, unless they stay on the machine.
func (fl *buildFlight) sendDumps() error {
	conn := fl.conn
	if fl.job.KeepOutputs || fl.paths == nil {
		return nil
	}
	for _, p := range fl.paths {
		d, err := conn.SendDumpStorePath(p)
		if err != nil {
			return err
		}
		fl.dumps = append(fl.dumps, d)
	}
	return conn.Flush()
}

// readBuild reads the input check, if any, and the build's result; after
// a good one it asks for the outputs' metadata and NARs in one flight.
func (fl *buildFlight) readBuild() error {
	if fl.check != nil {
		have, err := fl.check.Read()
		if err != nil {
			return err
		}
		if tr := fl.job.Transfers; tr != nil {
			tr.MarkLocked(have)
			if fl.gone = without(fl.toCheck, have); len(fl.gone) > 0 {
				tr.Forget(fl.gone)
			}
		}
	}
	res, err := fl.build.Read()
	fl.res = res
	if err != nil || !res.Status.Success() || fl.paths == nil {
		return err
	}
	// The output query goes out only now, after the result: its answer
	// comes after what the build printed on stderr has reached the log.
	// sshd forwards the command's stdout and stderr apart, so a result
	// can overtake the build's last log lines; one more exchange is what
	// lets them arrive before the log is closed.
	if fl.infos, err = fl.conn.SendQueryPathInfos(fl.paths); err != nil {
		return err
	}
	return fl.sendDumps()
}

// outputInfos reads the wanted outputs' metadata, or asks for it now when
// the output paths came with the result.
func (fl *buildFlight) outputInfos(conn *serveproto.Conn, job Job) ([]serveproto.PathInfo, error) {
	if fl.infos == nil {
		var err error
		if fl.paths, err = outputPaths(job, fl.res); err != nil {
			return nil, err
		}
		return queryOutputs(fl.paths, conn.QueryPathInfos)
	}
	// Asked for in the flight after the result: read its answer.
	return queryOutputs(fl.paths, func([]string) ([]serveproto.PathInfo, error) { return fl.infos.Read() })
}

// fetchOutputs has the local store fetch and register the outputs, from
// the NARs already asked for where it takes them in that order. A NAR it
// does not take is read past, so that the session stays in step.
func (fl *buildFlight) fetchOutputs(conn *serveproto.Conn, local Local, infos []serveproto.PathInfo, ev Events) error {
	skip := func(ds []*serveproto.DumpReply) error {
		for _, d := range ds {
			if _, err := d.ReadTo(io.Discard); err != nil {
				return err
			}
		}
		return nil
	}
	err := bringHome(local, infos, ev, func(path string, w io.Writer) error {
		i := slices.IndexFunc(fl.dumps, func(d *serveproto.DumpReply) bool { return d.Path() == path })
		if i < 0 {
			// Not asked for, or asked for and read past: ask now.
			if err := skip(fl.dumps); err != nil {
				return err
			}
			fl.dumps = nil
			_, err := conn.DumpStorePath(path, w)
			return err
		}
		if err := skip(fl.dumps[:i]); err != nil {
			return err
		}
		d := fl.dumps[i]
		fl.dumps = fl.dumps[i+1:]
		_, err := d.ReadTo(w)
		return err
	})
	if err != nil {
		return err
	}
	// Outputs valid here already were not fetched.
	err = skip(fl.dumps)
	fl.dumps = nil
	return err
}

// sendInputs asks the machine which inputs it lacks and sends those,
// references first, each streamed from the local store. Inputs that
// job.Transfers knows are there (with trustKnown) are not asked for: it
// returns them, to be checked in the build's flight.
func sendInputs(ctx context.Context, conn *serveproto.Conn, local Local, job Job, ev Events, trustKnown bool) (unchecked []string, err error) {
	inputs := inputSrcs(job)
	if len(inputs) == 0 {
		return nil, nil
	}
	tr := job.Transfers
	if tr != nil {
		_, inputs = tr.Locked(inputs)
		if len(inputs) == 0 {
			return nil, nil
		}
		if trustKnown && tr.Known(inputs) {
			return inputs, nil
		}
	}
	// lock: the machine keeps them as temporary GC roots while we build.
	have, err := conn.QueryValidPaths(inputs, true, job.Substitute)
	if err != nil {
		return nil, err
	}
	missing := without(inputs, have)
	if tr != nil {
		tr.MarkLocked(have)
		tr.Forget(missing)
	}
	if len(missing) == 0 {
		return nil, nil
	}
	return nil, upload(ctx, conn, local, job, ev, missing)
}

// upload sends the missing inputs.
func upload(ctx context.Context, conn *serveproto.Conn, local Local, job Job, ev Events, missing []string) error {
	tr := job.Transfers
	infos, err := local.PathInfos(missing)
	if err != nil {
		return err
	}
	infos, err = localstore.TopoSort(infos)
	if err != nil {
		return err
	}
	if ev.Copying != nil {
		var total uint64
		for _, i := range infos {
			total += i.NarSize
		}
		ev.Copying(len(infos), total)
	}
	// One flight when no other build is sending any of them: each path's
	// request and NAR go out without waiting for the reply before, which
	// at a round-trip time of 20 ms took 0.5 s for a root with 21 inputs.
	if tr == nil {
		return sendAll(conn, local, infos, func(string, error) {})
	}
	all, done, err := tr.ClaimAll(ctx, missing)
	if err != nil {
		return err
	}
	if all {
		return sendAll(conn, local, infos, func(p string, err error) {
			done(p, err)
			if err == nil {
				tr.MarkLocked([]string{p})
			}
		})
	}
	var sentElsewhere []string
	for _, info := range infos {
		upload, done, err := tr.Claim(ctx, info.Path)
		if err != nil {
			return err
		}
		if !upload {
			sentElsewhere = append(sentElsewhere, info.Path)
			continue
		}
		if err := sendAll(conn, local, []serveproto.PathInfo{info}, func(_ string, err error) { done(err) }); err != nil {
			return err
		}
		tr.MarkLocked([]string{info.Path})
	}
	if len(sentElsewhere) == 0 {
		return nil
	}
	// Another session sent these: lock them for this one too, and make
	// sure they arrived.
	have, err := conn.QueryValidPaths(sentElsewhere, true, false)
	if err != nil {
		return err
	}
	tr.MarkLocked(have)
	if lost := without(sentElsewhere, have); len(lost) > 0 {
		return fmt.Errorf("%s: sent by another build but not valid on the machine", strings.Join(lost, ", "))
	}
	return nil
}

// sendAll sends infos, in their order, in one flight of AddToStoreNar
// requests, then reads the replies; done is told each path's outcome,
// once, whether it was sent or not.
func sendAll(conn *serveproto.Conn, local Local, infos []serveproto.PathInfo, done func(path string, err error)) error {
	replies := make([]*serveproto.Reply[struct{}], 0, len(infos))
	var err error
	for _, info := range infos {
		r, serr := sendAhead(conn, local, info)
		if serr != nil {
			err = serr
			break
		}
		replies = append(replies, r)
	}
	for i, info := range infos {
		var perr error
		switch {
		case i < len(replies):
			if _, rerr := replies[i].Read(); rerr != nil {
				perr = fmt.Errorf("%s: %w", info.Path, rerr)
			}
		default:
			perr = err // never sent, or its send failed
		}
		if perr != nil && err == nil {
			err = perr
		}
		done(info.Path, perr)
	}
	return err
}

// sendAhead streams one path from the local store into an AddToStoreNar
// request whose reply is read later.
func sendAhead(conn *serveproto.Conn, local Local, info serveproto.PathInfo) (*serveproto.Reply[struct{}], error) {
	pr, pw := io.Pipe()
	dumpErr := make(chan error, 1)
	go func() {
		_, err := local.Dump(info.Path, pw)
		pw.CloseWithError(err)
		dumpErr <- err
	}()
	r, err := conn.SendAddToStoreNar(info, pr)
	pr.CloseWithError(errors.New("upload ended"))
	if derr := <-dumpErr; derr != nil && err == nil {
		err = derr
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", info.Path, err)
	}
	return r, nil
}

// bringHome has the local store fetch and register the outputs whose
// metadata the machine gave (whichever protocol it speaks). AddOutputs
// returns only once every one of them is valid here, so nothing is asked
// again: a question would only delay the hook's exit, and nix-daemon
// checks the outputs itself once the hook has exited.
func bringHome(local Local, infos []serveproto.PathInfo, ev Events, fetch func(path string, w io.Writer) error) error {
	if ev.Fetching != nil {
		var total uint64
		for _, i := range infos {
			total += i.NarSize
		}
		ev.Fetching(len(infos), total)
	}
	return local.AddOutputs(infos, fetch)
}

// outputInfos asks the machine for the wanted outputs' metadata with
// query (its protocol's QueryPathInfos: the valid ones of the paths).
func outputInfos(job Job, res *serveproto.BuildResult, query func(paths []string) ([]serveproto.PathInfo, error)) ([]serveproto.PathInfo, error) {
	paths, err := outputPaths(job, res)
	if err != nil {
		return nil, err
	}
	return queryOutputs(paths, query)
}

// queryOutputs asks for the built outputs' metadata. Nix hands the hook
// only outputs that are not valid here, and AddOutputs skips any that
// are: no local query first.
func queryOutputs(paths []string, query func(paths []string) ([]serveproto.PathInfo, error)) ([]serveproto.PathInfo, error) {
	infos, err := query(paths)
	if err != nil {
		return nil, err
	}
	if got := len(infos); got != len(paths) {
		return nil, fmt.Errorf("the machine reports %d of %d outputs valid after building", got, len(paths))
	}
	return infos, nil
}

// outputPaths returns the store paths of the wanted outputs (all if none
// is named): from the derivation, or for floating content-addressed ones
// from the build result (res nil: not known yet, an error).
func outputPaths(job Job, res *serveproto.BuildResult) ([]string, error) {
	names := job.WantedOutputs
	if len(names) == 0 {
		for n := range job.Drv.Outputs {
			names = append(names, n)
		}
		sort.Strings(names)
	}
	var paths []string
	for _, n := range names {
		p := ""
		if o, ok := job.Drv.Outputs[n]; ok {
			p = o.Path
		}
		if p == "" && res != nil {
			p = res.BuiltOutputs[n]
		}
		if p == "" {
			return nil, fmt.Errorf("the machine did not say where output '%s' is", n)
		}
		paths = append(paths, p)
	}
	return paths, nil
}

// inputSrcs is what the machine must have before building: as Nix's hook
// does, the whole input closure when the derivation has input derivations,
// else its input sources as they are (changing them would change the
// output ids of content-addressed derivations).
func inputSrcs(job Job) []string {
	if len(job.Drv.InputDerivations) > 0 {
		return job.Inputs
	}
	return job.Drv.InputSources
}

func basicDerivation(job Job) (serveproto.BasicDerivation, error) {
	d := job.Drv
	b := serveproto.BasicDerivation{
		Outputs:   make(map[string]serveproto.DerivationOutput, len(d.Outputs)),
		InputSrcs: slices.Clone(inputSrcs(job)),
		Platform:  d.Platform,
		Builder:   d.Builder,
		Args:      d.Arguments,
		Env:       d.Env,
	}
	for name, o := range d.Outputs {
		if o == nil {
			return b, fmt.Errorf("%s: output %q is empty", job.DrvPath, name)
		}
		b.Outputs[name] = serveproto.DerivationOutput{Path: o.Path, HashAlgo: o.HashAlgorithm, Hash: o.Hash}
	}
	sort.Strings(b.InputSrcs)
	return b, nil
}

// without returns the elements of all that are not in some.
func without(all, some []string) []string {
	have := make(map[string]bool, len(some))
	for _, p := range some {
		have[p] = true
	}
	var out []string
	for _, p := range all {
		if !have[p] {
			out = append(out, p)
		}
	}
	return out
}
