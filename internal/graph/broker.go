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

// buildThroughBroker submits n to the broker, which queues it with the
// hooks' builds and runs it on its warm sessions; the outputs stay on the
// machine (KeepOutputs), and the inputs that machines hold are named so
// that the broker streams them from there.
func (r *Remote) buildThroughBroker(ctx context.Context, n *Node, inputs []string, log io.Writer, started func(string)) (string, error) {
	c, err := r.Broker(ctx)
	if err != nil {
		return "", fmt.Errorf("broker: %w", err)
	}
	// One connection per build: it owns the build, and closing it (Ctrl-C,
	// a failure elsewhere) makes the broker stop the build.
	defer c.Close()
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
		Priority:    min(n.Rank, brokerapi.MaxPriority),
	}
	for _, p := range inputs {
		if h, ok := r.lookup(p); ok {
			req.Held = append(req.Held, brokerapi.HeldPath{Machine: h.machine, PathInfo: brokerapi.PathInfo{
				Path: h.info.Path, Deriver: h.info.Deriver, NarHash: h.info.NarHash, NarSize: h.info.NarSize, References: h.info.References,
			}})
		}
	}
	st, err := c.Build(ctx, req)
	if err != nil {
		return "", fmt.Errorf("broker: %w", err)
	}
	defer st.Close()
	stop := context.AfterFunc(ctx, func() { st.Close() })
	defer stop()
	machine := ""
	for {
		ev, err := st.Next()
		if err != nil {
			if ctx.Err() != nil {
				return machine, context.Cause(ctx)
			}
			return machine, fmt.Errorf("broker: the event stream of '%s' ended: %w", n.DrvPath, err)
		}
		switch ev.Type {
		case brokerapi.EventStarted:
			machine = ev.Machine
			started(machine)
		case brokerapi.EventLog:
			io.WriteString(log, ev.Text)
		case brokerapi.EventOutputs:
			infos := make([]serveproto.PathInfo, len(ev.Outputs))
			for i, o := range ev.Outputs {
				infos[i] = serveproto.PathInfo{Path: o.Path, Deriver: o.Deriver, NarHash: o.NarHash, NarSize: o.NarSize, DownloadSize: o.NarSize, References: o.References}
			}
			r.record(n, ev.Machine, infos)
			return ev.Machine, nil
		case brokerapi.EventFailed:
			return machine, brokerFailure(r, n, machine, ev)
		case brokerapi.EventHandback:
			return machine, fmt.Errorf("broker: it is stopping and gave '%s' back: %s", n.DrvPath, ev.Reason)
		}
	}
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
