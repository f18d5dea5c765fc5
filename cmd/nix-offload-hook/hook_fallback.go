package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/nix-offload/nix-offload/internal/engine"
	"github.com/nix-offload/nix-offload/internal/hookproto"
)

// buildAcceptedAlone builds a request that was accepted through the broker
// but that the broker can no longer run (it stopped, or went away): the hook
// does what it does without a broker, except that it cannot decline any
// more, so it waits for a slot where it would have postponed, and it
// retries on another machine when one is lost (engine.Run).
func (h *hook) buildAcceptedAlone(ctx context.Context, req *hookproto.Request, acc *accepted) error {
	drv, err := readDerivation(req.DrvPath)
	if err != nil {
		return err
	}
	if err := h.openAlone(); err != nil {
		return err
	}
	h.log.Msg(hookproto.LvlInfo, fmt.Sprintf("nix-offload: building '%s' without the broker", req.DrvPath))
	err = h.runEngine(ctx, req, drv, acc, h.alone)
	var none *engine.NoMachineError
	if errors.As(err, &none) {
		return fmt.Errorf("no machine can build '%s': %s", req.DrvPath, none.Decision.Reason)
	}
	return err
}
