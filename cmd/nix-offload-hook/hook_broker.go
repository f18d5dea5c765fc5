package main

// Hook mode with a broker: the hook forwards each "try" and the accepted
// build to `nix-offload-hook daemon` and relays the log and progress to
// Nix. The broker holds the warm connections and the host's slots; the hook
// keeps the one thing only it can do: make the outputs valid in the store
// that nix-daemon's mount namespace has writable, under the output locks
// its parent holds.
//
// Whenever the broker is not there (no socket, connection refused), stops
// answering, or hands a build back because it is stopping, the hook goes
// on without it, as in embedded mode.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/hookproto"
	"github.com/nix-offload/nix-offload/internal/localstore"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/service"
)

// errNoBroker sends a request to embedded mode.
var errNoBroker = errors.New("no broker")

// brokerDialTimeout bounds connecting to the broker's socket.
const brokerDialTimeout = 2 * time.Second

func (h *hook) socketPath() string { return brokerSocket("", h.cfg) }

// dialBroker connects to the broker, or returns nil if there is none.
func (h *hook) dialBroker(ctx context.Context) *brokerapi.Client {
	dctx, cancel := context.WithTimeout(ctx, brokerDialTimeout)
	defer cancel()
	c, err := brokerapi.DialChecked(dctx, h.socketPath(), brokerPeer)
	var untrusted *untrustedBrokerError
	if errors.As(err, &untrusted) {
		h.log.Msg(hookproto.LvlWarn, fmt.Sprintf("nix-offload: broker on %s: %v; going on without it", h.socketPath(), err))
	}
	if err != nil {
		return nil
	}
	return c
}

// untrustedBrokerError is a broker socket served by a user the hook must
// not take outputs from.
type untrustedBrokerError struct{ uid uint32 }

func (e *untrustedBrokerError) Error() string {
	return fmt.Sprintf("the socket is served by uid %d, not by root or this hook's user: refusing it", e.uid)
}

// brokerPeer accepts a broker run by root, or by the hook's own user (no
// more than the hook could do itself). Anyone else who managed to bind
// the socket path, e.g. one configured in a world-writable directory, would
// choose the bytes the hook makes valid in the store.
func brokerPeer(c net.Conn) error {
	uid, err := service.PeerUID(c)
	if err != nil {
		return err
	}
	return trustBrokerUID(uid, uint32(os.Getuid()))
}

func trustBrokerUID(uid, self uint32) error {
	if uid != 0 && uid != self {
		return &untrustedBrokerError{uid: uid}
	}
	return nil
}

// dropBroker says why the hook goes on without the broker.
func (h *hook) dropBroker(err error) {
	h.log.Msg(hookproto.LvlWarn, fmt.Sprintf("nix-offload: broker on %s: %v; going on without it", h.socketPath(), err))
	h.broker.Close()
	h.broker = nil
}

// tryBroker answers a request through the broker. errNoBroker means there
// is none (any more) and nothing was answered yet.
func (h *hook) tryBroker(ctx context.Context, req *hookproto.Request) (done bool, err error) {
	if h.broker == nil {
		return false, errNoBroker
	}
	tctx, cancel := context.WithTimeout(ctx, brokerapi.WaitTimeout)
	resp, err := h.broker.Try(tctx, brokerapi.TryRequest{
		DrvPath: req.DrvPath, System: req.System, RequiredFeatures: req.RequiredFeatures, AmWilling: req.AmWilling,
	})
	cancel()
	h.sw.Mark("try")
	if err != nil {
		h.dropBroker(err)
		return false, errNoBroker
	}
	why := fmt.Sprintf("nix-offload: not offloading '%s': %s", req.DrvPath, resp.Reason)
	switch resp.Verdict {
	case brokerapi.Accept:
	case brokerapi.DeclinePermanently:
		h.log.Msg(hookproto.LvlInfo, why)
		return false, hookproto.DeclinePermanently(h.out)
	case brokerapi.Postpone:
		h.log.Msg(hookproto.LvlTalkative, why)
		return false, hookproto.Postpone(h.out)
	default:
		h.log.Msg(hookproto.LvlInfo, why)
		return false, hookproto.Decline(h.out)
	}

	machine := resp.Machine
	if resp.Queued {
		machine = "nix-offload queue"
	}
	if err := hookproto.Accept(h.out, machine); err != nil {
		return true, err
	}
	h.sw.Mark("accept")
	acc, err := h.readAccepted()
	if err != nil {
		return true, err
	}
	defer acc.log.Close(2 * time.Second)
	// The store the outputs go to, with its registration process starting
	// now: that start-up is most of what making them valid costs, and the
	// remote build hides it. Opening the store starts nothing else.
	local, err := localstore.Open(h.storeOptions())
	if err != nil {
		return true, err
	}
	defer local.Close()
	local.StartRegistration()
	err = h.buildThroughBroker(ctx, req, acc, resp, local)
	if errors.Is(err, errNoBroker) {
		local.Close() // alone, the engine uses a store of its own
		return true, h.buildAcceptedAlone(ctx, req, acc)
	}
	return true, err
}

// buildThroughBroker runs an accepted build in the broker. errNoBroker
// means the broker went away or handed the build back before any output
// was offered: the hook must build it by itself.
func (h *hook) buildThroughBroker(ctx context.Context, req *hookproto.Request, acc *accepted, resp brokerapi.TryResponse, local *localstore.Store) error {
	opts := h.buildOptions()
	stream, err := h.broker.Build(ctx, brokerapi.BuildRequest{
		Reservation:   resp.Reservation,
		DrvPath:       req.DrvPath,
		Inputs:        acc.inputs,
		WantedOutputs: acc.wanted,
		Options: brokerapi.BuildOptions{
			MaxSilentTime: uint64(opts.MaxSilentTime / time.Second),
			Timeout:       uint64(opts.BuildTimeout / time.Second),
			MaxLogSize:    opts.MaxLogSize,
			KeepFailed:    opts.KeepFailed,
			Substitute:    h.settings.Bool("builders-use-substitutes", false),
		},
	})
	if err != nil {
		h.dropBroker(err)
		return errNoBroker
	}
	defer stream.Close()

	copying := &copyActivity{log: h.log}
	defer copying.stop()
	machine := resp.Machine
	for {
		ev, err := stream.Next()
		if err != nil {
			if ctx.Err() != nil {
				return context.Cause(ctx)
			}
			h.dropBroker(fmt.Errorf("lost during the build of '%s': %w", req.DrvPath, err))
			return errNoBroker
		}
		switch ev.Type {
		case brokerapi.EventQueued:
			if ev.Position == 0 {
				// Not in the queue: it waits for another client's build of it.
				h.log.Msg(hookproto.LvlInfo, fmt.Sprintf("nix-offload: '%s' waits: %s", req.DrvPath, ev.Reason))
				break
			}
			h.log.Msg(hookproto.LvlInfo, fmt.Sprintf("nix-offload: '%s' waits for a machine (%d in the queue): %s", req.DrvPath, ev.Position, ev.Reason))
		case brokerapi.EventStarted:
			if ev.Machine != machine {
				machine = ev.Machine
				h.log.Msg(hookproto.LvlInfo, fmt.Sprintf("nix-offload: building '%s' on '%s'", req.DrvPath, machine))
			}
		case brokerapi.EventCopying:
			copying.start(ev.Machine, ev.Paths, ev.Bytes)
		case brokerapi.EventBuilding:
			h.sw.Mark("building")
			copying.stop()
		case brokerapi.EventLog:
			acc.log.Write([]byte(ev.Text))
		case brokerapi.EventRetrying:
			h.log.Msg(hookproto.LvlWarn, fmt.Sprintf("nix-offload: lost '%s' while building '%s': %s; trying another machine", ev.Machine, req.DrvPath, ev.Reason))
		case brokerapi.EventFetching:
			h.sw.Mark("fetching")
		case brokerapi.EventHandback:
			h.log.Msg(hookproto.LvlInfo, fmt.Sprintf("nix-offload: the broker gave '%s' back: %s", req.DrvPath, ev.Reason))
			h.broker.Close()
			h.broker = nil
			return errNoBroker
		case brokerapi.EventFailed:
			err := errors.New(ev.Error)
			switch ev.Kind {
			case brokerapi.FailBuild:
				return &exitCodeError{exitBuildFailed, err}
			case brokerapi.FailTimeout:
				return &exitCodeError{exitTimedOut, err}
			}
			return err
		case brokerapi.EventOutputs:
			h.sw.Mark("outputs")
			return h.importOutputs(ctx, ev, local)
		}
	}
}

// importOutputs makes the offered outputs valid in local, fetching each
// NAR from the broker, and reports back.
func (h *hook) importOutputs(ctx context.Context, ev brokerapi.Event, local *localstore.Store) error {
	var err error
	if len(ev.Outputs) > 0 {
		infos := make([]serveproto.PathInfo, len(ev.Outputs))
		for i, o := range ev.Outputs {
			infos[i] = o.ServeInfo()
		}
		err = local.AddMissing(infos, func(path string, w io.Writer) error {
			return h.broker.FetchNAR(ctx, ev.Build, path, w)
		})
	}
	local.Close() // a registration process nothing used registers nothing
	resp, ierr := h.broker.Imported(ctx, ev.Build, err)
	h.sw.Mark("imported")
	switch {
	case ierr != nil && err != nil:
		return fmt.Errorf("making the outputs valid: %w", err)
	case ierr != nil:
		return fmt.Errorf("broker: %w", ierr)
	case resp.Error != "":
		return errors.New(resp.Error)
	}
	return nil
}
