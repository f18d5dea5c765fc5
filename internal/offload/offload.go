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
	// AddOutputs makes the outputs valid; fetch writes one output's NAR.
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
func Run(ctx context.Context, conn *serveproto.Conn, local Local, job Job, ev Events) error {
	if err := sendInputs(ctx, conn, local, job, ev); err != nil {
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
	res, err := conn.BuildDerivation(job.DrvPath, drv, job.Options)
	if err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil {
			return fmt.Errorf("build of '%s' on '%s' stopped: %w", job.DrvPath, job.Machine, context.Cause(ctx))
		}
		return fmt.Errorf("build of '%s' on '%s': %w", job.DrvPath, job.Machine, err)
	}
	if !res.Status.Success() {
		return &BuildError{DrvPath: job.DrvPath, Machine: job.Machine, Status: res.Status, Msg: res.ErrorMsg}
	}
	if job.KeepOutputs {
		infos, err := outputInfos(job, res, conn.QueryPathInfos)
		if err != nil {
			return fmt.Errorf("outputs of '%s' on '%s': %w", job.DrvPath, job.Machine, err)
		}
		if ev.Outputs != nil {
			ev.Outputs(infos)
		}
		return nil
	}
	if err := fetchOutputs(conn, local, job, res, ev); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("copying outputs of '%s' from '%s' stopped: %w", job.DrvPath, job.Machine, context.Cause(ctx))
		}
		return fmt.Errorf("copying outputs of '%s' from '%s': %w", job.DrvPath, job.Machine, err)
	}
	return nil
}

// sendInputs asks the machine which inputs it lacks and sends those,
// references first, each streamed from the local store.
func sendInputs(ctx context.Context, conn *serveproto.Conn, local Local, job Job, ev Events) error {
	inputs := inputSrcs(job)
	if len(inputs) == 0 {
		return nil
	}
	tr := job.Transfers
	if tr != nil {
		_, inputs = tr.Locked(inputs)
		if len(inputs) == 0 {
			return nil
		}
	}
	// lock: the machine keeps them as temporary GC roots while we build.
	have, err := conn.QueryValidPaths(inputs, true, job.Substitute)
	if err != nil {
		return err
	}
	if tr != nil {
		tr.MarkLocked(have)
	}
	missing := without(inputs, have)
	if len(missing) == 0 {
		return nil
	}
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
	var sentElsewhere []string
	for _, info := range infos {
		if tr == nil {
			if err := sendOne(conn, local, info); err != nil {
				return err
			}
			continue
		}
		upload, done, err := tr.Claim(ctx, info.Path)
		if err != nil {
			return err
		}
		if !upload {
			sentElsewhere = append(sentElsewhere, info.Path)
			continue
		}
		err = sendOne(conn, local, info)
		done(err)
		if err != nil {
			return err
		}
		tr.MarkLocked([]string{info.Path})
	}
	if len(sentElsewhere) == 0 {
		return nil
	}
	// Another session sent these: lock them for this one too, and make
	// sure they arrived.
	have, err = conn.QueryValidPaths(sentElsewhere, true, false)
	if err != nil {
		return err
	}
	tr.MarkLocked(have)
	if lost := without(sentElsewhere, have); len(lost) > 0 {
		return fmt.Errorf("%s: sent by another build but not valid on the machine", strings.Join(lost, ", "))
	}
	return nil
}

// sendOne streams one path from the local store into AddToStoreNar.
func sendOne(conn *serveproto.Conn, local Local, info serveproto.PathInfo) error {
	pr, pw := io.Pipe()
	dumpErr := make(chan error, 1)
	go func() {
		_, err := local.Dump(info.Path, pw)
		pw.CloseWithError(err)
		dumpErr <- err
	}()
	err := conn.AddToStoreNar(info, pr)
	pr.CloseWithError(errors.New("upload ended"))
	if derr := <-dumpErr; derr != nil && err == nil {
		err = derr
	}
	if err != nil {
		return fmt.Errorf("%s: %w", info.Path, err)
	}
	return nil
}

// fetchOutputs asks the machine for the wanted outputs' metadata and has
// the local store fetch and register them.
func fetchOutputs(conn *serveproto.Conn, local Local, job Job, res *serveproto.BuildResult, ev Events) error {
	infos, err := outputInfos(job, res, conn.QueryPathInfos)
	if err != nil {
		return err
	}
	paths := make([]string, len(infos))
	for i, info := range infos {
		paths[i] = info.Path
	}
	return bringHome(local, infos, paths, ev, func(path string, w io.Writer) error {
		_, err := conn.DumpStorePath(path, w)
		return err
	})
}

// bringHome has the local store fetch and register the outputs whose
// metadata the machine gave (whichever protocol it speaks), then checks that
// every one of paths is valid here.
func bringHome(local Local, infos []serveproto.PathInfo, paths []string, ev Events, fetch func(path string, w io.Writer) error) error {
	if ev.Fetching != nil {
		var total uint64
		for _, i := range infos {
			total += i.NarSize
		}
		ev.Fetching(len(infos), total)
	}
	if err := local.AddOutputs(infos, fetch); err != nil {
		return err
	}
	valid, err := local.Valid(paths)
	if err != nil {
		return err
	}
	if lost := without(paths, valid); len(lost) > 0 {
		return fmt.Errorf("outputs not valid after import: %s", strings.Join(lost, ", "))
	}
	return nil
}

// outputInfos asks the machine for the wanted outputs' metadata with
// query (its protocol's QueryPathInfos: the valid ones of the paths).
func outputInfos(job Job, res *serveproto.BuildResult, query func(paths []string) ([]serveproto.PathInfo, error)) ([]serveproto.PathInfo, error) {
	paths, err := outputPaths(job, res)
	if err != nil {
		return nil, err
	}
	// Nix hands the hook only outputs that are not valid here, and
	// AddOutputs skips any that are: no local query first.
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
// from the build result.
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
		if p == "" {
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
