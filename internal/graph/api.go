package graph

import (
	"sort"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/serveproto"
)

// Wanted returns the output paths of root that were asked for ("out" first when all are),
// of its outputs (name → path).
func Wanted(root brokerapi.GraphRoot, outputs map[string]string) []string {
	if outputs == nil {
		return nil
	}
	names := root.Outputs
	if len(names) == 0 {
		for n := range outputs {
			names = append(names, n)
		}
		sort.Slice(names, func(i, j int) bool {
			return names[i] == "out" || names[j] != "out" && names[i] < names[j]
		})
	}
	var out []string
	for _, n := range names {
		if p, ok := outputs[n]; ok {
			out = append(out, p)
		}
	}
	return out
}

// FetchPaths is what a fetch policy (brokerapi.FetchRequested, FetchAll, FetchNone) brings
// home: the roots' wanted outputs that succeeded, or every output built.
func FetchPaths(policy string, roots []brokerapi.GraphRoot, results map[string]*Result) []string {
	var out []string
	switch policy {
	case brokerapi.FetchRequested, "":
		for _, root := range roots {
			if r := results[root.DrvPath]; r != nil && r.Status.Success() {
				out = append(out, Wanted(root, r.Outputs)...)
			}
		}
	case brokerapi.FetchAll:
		for _, r := range results {
			if r.Status == serveproto.Built {
				for _, p := range r.Outputs {
					out = append(out, p)
				}
			}
		}
	}
	sort.Strings(out)
	return out
}

// Report is a result as the broker API and -json show it; holder names the machine that
// keeps an output path ("" if none does).
func Report(r *Result, holder func(string) string) brokerapi.GraphDerivation {
	j := brokerapi.GraphDerivation{DrvPath: r.DrvPath, Status: r.Status.String(), Machine: r.Machine, Outputs: r.Outputs}
	if !r.Start.IsZero() {
		start, stop := r.Start.UTC(), r.Stop.UTC()
		j.Start, j.Stop = &start, &stop
	}
	if r.Err != nil {
		j.Error = r.Err.Error()
	}
	for _, p := range r.Outputs {
		if m := holder(p); m != "" {
			if j.Machine == "" {
				j.Machine = m // AlreadyValid on a machine
			}
			if j.Holders == nil {
				j.Holders = map[string]string{}
			}
			j.Holders[p] = m
		}
	}
	return j
}

// API is e as a graph stream's event.
func (e Event) API(holder func(string) string) brokerapi.GraphEvent {
	ev := brokerapi.GraphEvent{DrvPath: e.DrvPath, Machine: e.Machine}
	switch e.Kind {
	case Queued:
		ev.Type = brokerapi.EventQueued
	case Started:
		ev.Type = brokerapi.EventStarted
	case Finished:
		rep := Report(e.Result, holder)
		ev.Type, ev.Status, ev.Error, ev.Result = brokerapi.GraphEventBuilt, rep.Status, rep.Error, &rep
		ev.Machine = rep.Machine
		if e.Result.Err != nil {
			ev.Type = brokerapi.GraphEventFailed
		}
	}
	return ev
}

// APIInfo is a path info as the broker API carries it.
func APIInfo(in serveproto.PathInfo) brokerapi.PathInfo {
	return brokerapi.PathInfo{Path: in.Path, Deriver: in.Deriver, NarHash: in.NarHash, NarSize: in.NarSize, References: in.References}
}
