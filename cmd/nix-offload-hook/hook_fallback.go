package main

import (
	"context"
	"fmt"
	"time"

	"github.com/nix-offload/nix-offload/internal/hookproto"
	"github.com/nix-offload/nix-offload/internal/scheduler"
)

// postponeWait is how long a hook that has accepted a build waits before it
// asks again for a slot, when it builds without the broker.
const postponeWait = 2 * time.Second

// buildAcceptedAlone builds a request that was accepted through the broker
// but that the broker can no longer run (it stopped, or went away): the hook
// does what it does without a broker, except that it cannot decline any
// more, so it waits for a slot where it would have postponed (open with
// wait), and it retries on another machine when one is lost (buildOn).
func (h *hook) buildAcceptedAlone(ctx context.Context, req *hookproto.Request, acc *accepted) error {
	drv, err := readDerivation(req.DrvPath)
	if err != nil {
		return err
	}
	sreq := scheduler.Request{System: req.System, RequiredFeatures: req.RequiredFeatures}
	run, d, err := h.open(ctx, req, sreq, true)
	if err != nil {
		return err
	}
	if run == nil {
		return fmt.Errorf("no machine can build '%s': %s", req.DrvPath, h.noMachine(sreq, d))
	}
	h.log.Msg(hookproto.LvlInfo, fmt.Sprintf("nix-offload: building '%s' on '%s' without the broker", req.DrvPath, run.m.Name()))
	return h.buildOn(ctx, req, drv, acc, run)
}
