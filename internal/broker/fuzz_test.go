package broker

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"path"
	"strings"
	"testing"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
)

// FuzzDecodeRequest feeds any bytes as the body of each API request that has one (try,
// builds, imported, graphs) through the server's decoding and checks: it never panics; a refusal is
// 400 or 413 with the API's {"error": …} body; what is accepted re-encodes to JSON that
// decodes to the same value, and every store path in it is canonical, so that it cannot
// name a file outside the store. Seeds: testdata/fuzz/FuzzDecodeRequest (README.md there).
func FuzzDecodeRequest(f *testing.F) {
	f.Fuzz(func(t *testing.T, body []byte) {
		var paths []string
		fuzzRoute(t, body, checkTry, func(r *brokerapi.TryRequest) { paths = append(paths, r.DrvPath) })
		fuzzRoute(t, body, checkBuild, func(r *brokerapi.BuildRequest) {
			paths = append(append(paths, r.DrvPath), r.Inputs...)
		})
		fuzzRoute[brokerapi.ImportedRequest](t, body, nil, nil)
		fuzzRoute(t, body, checkGraph, func(r *brokerapi.GraphRequest) {
			for _, root := range r.Roots {
				paths = append(paths, root.DrvPath)
			}
		})
		for _, p := range paths {
			if !strings.HasPrefix(p, "/nix/store/") || path.Clean(p) != p || strings.Count(p, "/") != 3 {
				t.Fatalf("accepted the store path %q", p)
			}
		}
	})
}

// fuzzRoute decodes body as a T the way the server does and checks the outcome; accepted,
// if not nil, sees what was accepted.
func fuzzRoute[T any](t *testing.T, body []byte, check func(*T) error, accepted func(*T)) {
	rec := httptest.NewRecorder()
	req := httptest.NewRequest("POST", "/", bytes.NewReader(body))
	var v T
	if !readRequest(rec, req, &v, check) {
		var e brokerapi.ErrorResponse
		if (rec.Code != http.StatusBadRequest && rec.Code != http.StatusRequestEntityTooLarge) ||
			json.Unmarshal(rec.Body.Bytes(), &e) != nil || e.Error == "" {
			t.Fatalf("refused %q with %d %q; want 400 or 413 and {\"error\": …}", body, rec.Code, rec.Body.String())
		}
		return
	}
	again, err := json.Marshal(v)
	if err != nil {
		t.Fatalf("accepted %q, which does not encode again: %v", body, err)
	}
	var w T
	if _, err := decodeRequest(bytes.NewReader(again), &w, check); err != nil {
		t.Fatalf("accepted %q, but not its own encoding %q: %v", body, again, err)
	}
	if again2, _ := json.Marshal(w); !bytes.Equal(again, again2) {
		t.Fatalf("%q decodes to %q, then to %q", body, again, again2)
	}
	if accepted != nil {
		accepted(&v)
	}
}
