package broker

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/serveproto"
)

// readRequest decodes r's JSON body into v and checks it with check (if not nil). On any
// problem it answers with the API's JSON error and returns false: 413 for a body larger than
// maxRequestBody (read no further than that, or refused at once when Content-Length says
// so), 400 for anything else, naming the field where it can.
func readRequest[T any](w http.ResponseWriter, r *http.Request, v *T, check func(*T) error) bool {
	if r.ContentLength > maxRequestBody {
		writeError(w, http.StatusRequestEntityTooLarge, tooLarge())
		return false
	}
	code, err := decodeRequest(http.MaxBytesReader(w, r.Body, maxRequestBody), v, check)
	if err != nil {
		writeError(w, code, err)
		return false
	}
	return true
}

// decodeRequest is readRequest's decoding and checking, apart from HTTP: the code is the
// status to answer an error with. One JSON value, no unknown fields, nothing after it.
func decodeRequest[T any](body io.Reader, v *T, check func(*T) error) (int, error) {
	dec := json.NewDecoder(body)
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil {
		if _, after := dec.Token(); !errors.Is(after, io.EOF) {
			err = errors.New("more after the JSON value")
		}
	}
	var tooBig *http.MaxBytesError
	switch {
	case errors.As(err, &tooBig):
		return http.StatusRequestEntityTooLarge, tooLarge()
	case err != nil:
		return http.StatusBadRequest, fmt.Errorf("bad request body: %w", err)
	}
	if check != nil {
		if err := check(v); err != nil {
			return http.StatusBadRequest, fmt.Errorf("bad request: %w", err)
		}
	}
	return 0, nil
}

func tooLarge() error {
	return fmt.Errorf("request body larger than %d MiB", maxRequestBody>>20)
}

// checkTry checks a TryRequest's paths: the broker reads the derivation later.
func checkTry(req *brokerapi.TryRequest) error {
	if err := checkDrvPath(req.DrvPath); err != nil {
		return fmt.Errorf("drvPath: %w", err)
	}
	return nil
}

// checkBuild checks a BuildRequest's paths: its derivation, which the broker opens, and
// every input, which it reads from the local store and sends to a machine.
func checkBuild(req *brokerapi.BuildRequest) error {
	if err := checkDrvPath(req.DrvPath); err != nil {
		return fmt.Errorf("drvPath: %w", err)
	}
	for i, p := range req.Inputs {
		if err := serveproto.CheckStorePath(p); err != nil {
			return fmt.Errorf("inputs[%d]: %w", i, err)
		}
	}
	for i, h := range req.Held {
		if err := serveproto.CheckStorePath(h.Path); err != nil {
			return fmt.Errorf("held[%d]: %w", i, err)
		}
		if !slices.Contains(req.Inputs, h.Path) {
			return fmt.Errorf("held[%d]: %s is not one of inputs", i, h.Path)
		}
		for j, r := range h.References {
			if err := serveproto.CheckStorePath(r); err != nil {
				return fmt.Errorf("held[%d].references[%d]: %w", i, j, err)
			}
		}
	}
	return nil
}

// checkDrvPath accepts a canonical store path that ends in .drv.
func checkDrvPath(p string) error {
	if err := serveproto.CheckStorePath(p); err != nil {
		return err
	}
	if !strings.HasSuffix(p, ".drv") {
		return fmt.Errorf("%q is not a derivation (.drv)", p)
	}
	return nil
}
