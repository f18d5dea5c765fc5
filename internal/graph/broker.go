package graph

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/offload"
	"github.com/nix-offload/nix-offload/internal/serveproto"
)

// Submit runs one broker build to its last event (EventOutputs, EventFailed or
// EventHandback), passing every event to events; the broker's graphs use its own
// per-derivation builds (internal/broker). An error means the events ended without a last
// one (ctx ended, or the build could not start).
type Submit func(ctx context.Context, req brokerapi.BuildRequest, events func(brokerapi.Event)) error

// buildThroughBroker submits n as a broker build, which queues it with the hooks' builds and
// runs it on the broker's warm sessions; the outputs stay on the machine (KeepOutputs), and
// the inputs that machines hold are named so that the broker streams them from there.
func (r *Remote) buildThroughBroker(ctx context.Context, n *Node, inputs []string, log io.Writer, started func(string)) (string, error) {
	req := brokerapi.BuildRequest{
		DrvPath: n.DrvPath,
		Inputs:  inputs,
		Options: brokerapi.BuildOptions{
			MaxSilentTime: uint64(r.Options.MaxSilentTime.Seconds()),
			Timeout:       uint64(r.Options.BuildTimeout.Seconds()),
			MaxLogSize:    r.Options.MaxLogSize,
			KeepFailed:    r.Options.KeepFailed,
			Substitute:    r.Substitute,
		},
		KeepOutputs: true,
		Priority:    min(n.Rank+r.Priority, brokerapi.MaxPriority),
	}
	for _, p := range inputs {
		if h, ok := r.lookup(p); ok {
			req.Held = append(req.Held, brokerapi.HeldPath{Machine: h.machine, PathInfo: APIInfo(h.info)})
		}
	}
	machine := ""
	var last *brokerapi.Event
	err := r.Submit(ctx, req, func(ev brokerapi.Event) {
		switch ev.Type {
		case brokerapi.EventStarted:
			machine = ev.Machine
			started(machine)
		case brokerapi.EventLog:
			io.WriteString(log, ev.Text)
		case brokerapi.EventOutputs, brokerapi.EventFailed, brokerapi.EventHandback:
			last = &ev
		}
	})
	switch {
	case ctx.Err() != nil && (last == nil || last.Type != brokerapi.EventOutputs):
		return machine, context.Cause(ctx)
	case err != nil:
		return machine, fmt.Errorf("broker: %w", err)
	case last == nil:
		return machine, fmt.Errorf("broker: the events of '%s' ended without a result", n.DrvPath)
	}
	switch last.Type {
	case brokerapi.EventOutputs:
		infos := make([]serveproto.PathInfo, len(last.Outputs))
		for i, o := range last.Outputs {
			infos[i] = o.ServeInfo()
		}
		r.record(n, last.Machine, infos)
		return last.Machine, nil
	case brokerapi.EventFailed:
		return machine, brokerFailure(r, n, machine, *last)
	}
	return machine, fmt.Errorf("broker: it is stopping and gave '%s' back: %s", n.DrvPath, last.Reason)
}

// brokerFailure is the error of a failed event, typed as the engine's are.
func brokerFailure(r *Remote, n *Node, machine string, ev brokerapi.Event) error {
	switch ev.Kind {
	case brokerapi.FailBuild:
		return &offload.BuildError{DrvPath: n.DrvPath, Machine: machine, Status: serveproto.PermanentFailure, Msg: ev.Error}
	case brokerapi.FailTimeout:
		return &offload.BuildError{DrvPath: n.DrvPath, Machine: machine, Status: serveproto.TimedOut, Msg: ev.Error}
	case brokerapi.FailLostInput:
		if _, ok := r.lookup(ev.Path); ok {
			return r.lost(ev.Path, errors.New(ev.Error))
		}
	}
	return errors.New(ev.Error)
}
