package offload

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"

	"github.com/nix-offload/nix-offload/internal/daemonproto"
	"github.com/nix-offload/nix-offload/internal/localstore"
	"github.com/nix-offload/nix-offload/internal/serveproto"
)

// RunDaemon builds job over a daemon protocol connection (an ssh-ng
// machine), as [Run] does over the serve protocol, and as Nix's
// build-remote does for ssh-ng (nix 2.34.8 src/build-remote/build-remote.cc):
//
//  1. SetOptions: max-silent-time, timeout, max-build-log-size and
//     keep-failed of job.Options, and the substitute flag;
//  2. AddTempRoot of every input, so that none the machine has is
//     collected before the build (Nix's own ssh-ng hook does not; the
//     serve protocol's QueryValidPaths with lock does), QueryValidPaths
//     of the inputs, with the substitute flag
//     (builders-use-substitutes), and AddMultipleToStore of the missing
//     ones, references first, each streamed from the local store;
//  3. BuildDerivation with the BasicDerivation, or, when the daemon does
//     not trust the user and the derivation is input-addressed, the .drv
//     closure uploaded and BuildPathsWithResults on it;
//  4. QueryPathInfo and NarFromPath of the wanted outputs into the local
//     store, each NAR checked against its narHash and narSize; with
//     job.KeepOutputs, only QueryPathInfo, whose answers go to
//     ev.Outputs, and the outputs stay on the machine.
//
// The daemon's log messages go where the Conn's Options.Log sends them.
// ctx bounds every wait through the Conn's Options.Abort. The temp roots
// live as long as conn: a pooled session that stays warm keeps them until
// it retires. job.Transfers is not used (see docs/design.md). Returns a *BuildError when the build failed on the machine.
func RunDaemon(ctx context.Context, conn *daemonproto.Conn, local Local, job Job, ev Events) error {
	stopped := func(what string, err error) error {
		if ctx.Err() != nil {
			return fmt.Errorf("%s stopped: %w", what, context.Cause(ctx))
		}
		return fmt.Errorf("%s: %w", what, err)
	}
	o := job.Options
	if err := conn.SetOptions(ctx, daemonproto.Settings{MaxSilentTime: o.MaxSilentTime, BuildTimeout: o.BuildTimeout,
		MaxLogSize: o.MaxLogSize, KeepFailed: o.KeepFailed, UseSubstitutes: job.Substitute}); err != nil {
		return stopped(fmt.Sprintf("setting options on '%s'", job.Machine), err)
	}
	drv, err := basicDerivation(job)
	if err != nil {
		return err
	}
	untrustedIA := conn.Trust() == daemonproto.NotTrusted && daemonproto.InputAddressed(drv)
	inputs := inputSrcs(job)
	if untrustedIA {
		// The daemon builds the .drv from its own store: it needs the
		// .drv closure and the input closure.
		drvs, err := drvClosure(local, job.DrvPath)
		if err != nil {
			return fmt.Errorf("copying inputs to '%s': %w", job.Machine, err)
		}
		inputs = append(slices.Clone(job.Inputs), drvs...)
	}
	if err := sendInputsDaemon(ctx, conn, local, job, inputs, ev); err != nil {
		return stopped(fmt.Sprintf("copying inputs to '%s'", job.Machine), err)
	}
	if ev.Building != nil {
		ev.Building()
	}
	var res *daemonproto.BuildResult
	if untrustedIA {
		outs := "*"
		if len(job.WantedOutputs) > 0 {
			outs = strings.Join(job.WantedOutputs, ",")
		}
		p := job.DrvPath + "!" + outs
		results, err := conn.BuildPathsWithResults(ctx, []string{p}, daemonproto.BuildNormal)
		if err != nil {
			return stopped(fmt.Sprintf("build of '%s' on '%s'", job.DrvPath, job.Machine), err)
		}
		r, ok := results[p]
		if !ok {
			return fmt.Errorf("build of '%s' on '%s': the machine sent no result", job.DrvPath, job.Machine)
		}
		res = &r
	} else {
		res, err = conn.BuildDerivation(ctx, job.DrvPath, drv, daemonproto.BuildNormal)
		if err != nil {
			return stopped(fmt.Sprintf("build of '%s' on '%s'", job.DrvPath, job.Machine), err)
		}
	}
	if !res.Status.Success() {
		return &BuildError{DrvPath: job.DrvPath, Machine: job.Machine, Status: res.Status, Msg: res.ErrorMsg}
	}
	if job.KeepOutputs {
		infos, err := outputInfosDaemon(ctx, conn, job, &res.BuildResult)
		if err != nil {
			return stopped(fmt.Sprintf("outputs of '%s' on '%s'", job.DrvPath, job.Machine), err)
		}
		if ev.Outputs != nil {
			ev.Outputs(infos)
		}
		return nil
	}
	if err := fetchOutputsDaemon(ctx, conn, local, job, &res.BuildResult, ev); err != nil {
		return stopped(fmt.Sprintf("copying outputs of '%s' from '%s'", job.DrvPath, job.Machine), err)
	}
	return nil
}

// drvClosure returns the .drv files drvPath refers to, itself included:
// its input derivations, theirs, and so on.
func drvClosure(local Local, drvPath string) ([]string, error) {
	seen := map[string]bool{drvPath: true}
	todo := []string{drvPath}
	for len(todo) > 0 {
		infos, err := local.PathInfos(todo)
		if err != nil {
			return nil, err
		}
		todo = nil
		for _, info := range infos {
			for _, ref := range info.References {
				if strings.HasSuffix(ref, ".drv") && !seen[ref] {
					seen[ref] = true
					todo = append(todo, ref)
				}
			}
		}
	}
	out := make([]string, 0, len(seen))
	for p := range seen {
		out = append(out, p)
	}
	sort.Strings(out)
	return out, nil
}

// sendInputsDaemon sends the inputs the machine lacks in one
// AddMultipleToStore, references first.
func sendInputsDaemon(ctx context.Context, conn *daemonproto.Conn, local Local, job Job, inputs []string, ev Events) error {
	if len(inputs) == 0 {
		return nil
	}
	// Root first, then ask: an input found valid stays valid until the
	// connection ends, whatever a GC on the machine does meanwhile (the
	// serve protocol's QueryValidPaths with lock). The daemon roots the
	// paths AddMultipleToStore adds by itself.
	if err := conn.AddTempRoots(ctx, inputs); err != nil {
		return err
	}
	have, err := conn.QueryValidPaths(ctx, inputs, job.Substitute)
	if err != nil {
		return err
	}
	missing := without(inputs, have)
	if len(missing) == 0 {
		return nil
	}
	infos, err := local.PathInfos(missing)
	if err != nil {
		return err
	}
	if infos, err = localstore.TopoSort(infos); err != nil {
		return err
	}
	if ev.Copying != nil {
		var total uint64
		for _, i := range infos {
			total += i.NarSize
		}
		ev.Copying(len(infos), total)
	}
	items := make([]daemonproto.Item, len(infos))
	dumps := make([]*lazyDump, len(infos))
	for i, info := range infos {
		dumps[i] = &lazyDump{local: local, path: info.Path}
		items[i] = daemonproto.Item{Info: info, NAR: dumps[i]}
	}
	// dontCheckSigs: a trusted daemon takes our unsigned paths as Nix's
	// hook has it do; an untrusted one checks anyway.
	err = conn.AddMultipleToStore(ctx, items, true)
	for _, d := range dumps {
		if derr := d.wait(); derr != nil && err == nil {
			err = fmt.Errorf("%s: %w", d.path, derr)
		}
	}
	return err
}

// lazyDump is a NAR from the local store that starts to stream when it is
// first read, so that one AddMultipleToStore runs one dump at a time.
type lazyDump struct {
	local Local
	path  string
	pr    *io.PipeReader
	done  chan error
}

func (d *lazyDump) Read(p []byte) (int, error) {
	if d.pr == nil {
		pr, pw := io.Pipe()
		d.pr, d.done = pr, make(chan error, 1)
		go func() {
			_, err := d.local.Dump(d.path, pw)
			pw.CloseWithError(err)
			d.done <- err
		}()
	}
	return d.pr.Read(p)
}

// wait ends the dump, if it started, and returns its error.
func (d *lazyDump) wait() error {
	if d.pr == nil {
		return nil
	}
	d.pr.CloseWithError(errUploadEnded)
	if err := <-d.done; err != nil && !errors.Is(err, errUploadEnded) {
		return err
	}
	return nil // done, or stopped by us after a failed upload
}

var errUploadEnded = errors.New("upload ended")

// fetchOutputsDaemon fetches the wanted outputs into the local store.
func fetchOutputsDaemon(ctx context.Context, conn *daemonproto.Conn, local Local, job Job, res *serveproto.BuildResult, ev Events) error {
	infos, err := outputInfosDaemon(ctx, conn, job, res)
	if err != nil {
		return err
	}
	byPath := map[string]serveproto.PathInfo{}
	for _, info := range infos {
		byPath[info.Path] = info
	}
	return bringHome(local, infos, ev, func(path string, w io.Writer) error {
		_, err := conn.NarFromPath(ctx, byPath[path], w)
		return err
	})
}

// outputInfosDaemon is outputInfos over the daemon protocol.
func outputInfosDaemon(ctx context.Context, conn *daemonproto.Conn, job Job, res *serveproto.BuildResult) ([]serveproto.PathInfo, error) {
	return outputInfos(job, res, func(paths []string) ([]serveproto.PathInfo, error) {
		return conn.QueryPathInfos(ctx, paths)
	})
}
