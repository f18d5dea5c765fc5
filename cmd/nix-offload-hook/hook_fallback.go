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
// more, so it waits for a slot where it would have postponed.
func (h *hook) buildAcceptedAlone(ctx context.Context, req *hookproto.Request, acc *accepted) error {
	drv, err := readDerivation(req.DrvPath)
	if err != nil {
		return err
	}
	sreq := scheduler.Request{System: req.System, RequiredFeatures: req.RequiredFeatures}
	for {
		d, slot, m, err := h.takeSlot(ctx, sreq)
		if err != nil {
			return err
		}
		switch {
		case d.Verdict == scheduler.Accept && slot == nil:
			continue // other hooks took the free slots: decide again
		case d.Verdict == scheduler.Postpone:
			select {
			case <-time.After(postponeWait):
				continue
			case <-ctx.Done():
				return context.Cause(ctx)
			}
		case d.Verdict != scheduler.Accept:
			return fmt.Errorf("no machine can build '%s': %s", req.DrvPath, d.Reason)
		}
		local, warmed, err := h.openLocal()
		if err != nil {
			slot.Release()
			return err
		}
		sess, conn, client, err := h.connect(ctx, m)
		if err != nil {
			warmed()
			local.Close()
			slot.Release()
			h.down[m.Name()] = err.Error()
			h.log.Msg(hookproto.LvlWarn, fmt.Sprintf("nix-offload: cannot use '%s' for '%s': %v", m.Name(), req.DrvPath, err))
			continue
		}
		h.log.Msg(hookproto.LvlInfo, fmt.Sprintf("nix-offload: building '%s' on '%s' without the broker", req.DrvPath, m.Name()))
		err = h.runAccepted(ctx, req, drv, acc, m, sess, conn, local, warmed)
		warmed()
		local.Close()
		sess.Close()
		client.Close()
		slot.Release()
		return err
	}
}
