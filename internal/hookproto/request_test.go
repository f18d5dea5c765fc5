package hookproto

import (
	"bytes"
	"errors"
	"io"
	"slices"
	"strings"
	"testing"
	"testing/iotest"
)

func TestReadRequest(t *testing.T) {
	var b wireBuf
	b.try(0, "x86_64-linux", testDrv, "big-parallel", "kvm")
	b.try(1, "aarch64-linux", testDrv)
	r := iotest.OneByteReader(bytes.NewReader(b.clone()))

	req, err := ReadRequest(r)
	if err != nil {
		t.Fatal(err)
	}
	if req.AmWilling || req.System != "x86_64-linux" || req.DrvPath != testDrv || !slices.Equal(req.RequiredFeatures, []string{"big-parallel", "kvm"}) {
		t.Errorf("first request: %+v", req)
	}
	req, err = ReadRequest(r)
	if err != nil {
		t.Fatal(err)
	}
	if !req.AmWilling || req.System != "aarch64-linux" || req.RequiredFeatures != nil {
		t.Errorf("second request: %+v", req)
	}
	// Nix closed stdin: the normal end, io.EOF itself.
	if _, err := ReadRequest(r); err != io.EOF {
		t.Errorf("at the end: %v, want io.EOF", err)
	}
}

func TestReadRequestTruncated(t *testing.T) {
	full := new(wireBuf).try(1, "x86_64-linux", testDrv, "kvm").clone()
	for n := 1; n < len(full); n++ {
		_, err := ReadRequest(bytes.NewReader(full[:n]))
		var re *ReadError
		if err == io.EOF || !errors.Is(err, io.ErrUnexpectedEOF) || !errors.As(err, &re) {
			t.Errorf("cut at %d of %d: %v, want a *ReadError wrapping io.ErrUnexpectedEOF", n, len(full), err)
		}
	}
}

func TestReadRequestErrors(t *testing.T) {
	long := strings.Repeat("k", maxKeywordLen+1)
	for _, tc := range []struct {
		name string
		b    []byte
		want string
	}{
		{"other keyword", new(wireBuf).str("tri").clone(), `try: keyword: got "tri", want "try"`},
		{"long keyword", new(wireBuf).str(long).clone(), "try: keyword: length 65 exceeds 64"},
		{"absurd keyword", new(wireBuf).u64(1 << 60).clone(), "try: keyword: length 1152921504606846976 exceeds 64"},
		{"keyword padding", append(new(wireBuf).u64(3).clone(), 't', 'r', 'y', 0, 0, 0, 0, 9), "try: keyword: non-zero padding 00 00 00 00 09"},
		{"amWilling 2", new(wireBuf).str("try").u64(2).clone(), "try: amWilling: value 2 is neither 0 nor 1"},
		{"long system", new(wireBuf).str("try").u64(0).str(strings.Repeat("s", MaxSystemLen+1)).clone(), "try: system: length 1025 exceeds 1024"},
		{"not a drv", new(wireBuf).try(0, "x86_64-linux", "/nix/store/x").clone(), `try: drvPath: "/nix/store/x" is not an absolute path ending in .drv`},
		{"relative drv", new(wireBuf).try(0, "x86_64-linux", "x.drv").clone(), `drvPath: "x.drv" is not`},
		{"absurd features", new(wireBuf).str("try").u64(0).str("x86_64-linux").str(testDrv).u64(1 << 60).clone(), "try: requiredFeatures: count: 1152921504606846976 exceeds 4096"},
		{"long feature", new(wireBuf).try(0, "x86_64-linux", testDrv, strings.Repeat("f", MaxFeatureLen+1)).clone(), "try: requiredFeatures: feature 0: length 1025 exceeds 1024"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ReadRequest(bytes.NewReader(tc.b))
			var re *ReadError
			if !errors.As(err, &re) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want a *ReadError containing %q", err, tc.want)
			}
		})
	}
}

func TestReadAccepted(t *testing.T) {
	inputs := []string{"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a", "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-bash-5.2"}
	outputs := []string{"dev", "out"}
	full := new(wireBuf).strs(inputs...).strs(outputs...).clone()
	r := iotest.OneByteReader(bytes.NewReader(full))
	gotIn, gotOut, err := ReadAccepted(r)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(gotIn, inputs) || !slices.Equal(gotOut, outputs) {
		t.Errorf("got %q, %q", gotIn, gotOut)
	}
	if n, err := r.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Errorf("ReadAccepted left bytes: %d, %v", n, err)
	}

	gotIn, gotOut, err = ReadAccepted(bytes.NewReader(new(wireBuf).strs().strs("out").clone()))
	if err != nil || gotIn != nil || !slices.Equal(gotOut, []string{"out"}) {
		t.Errorf("no inputs: %q, %q, %v", gotIn, gotOut, err)
	}

	for n := range len(full) {
		_, _, err := ReadAccepted(bytes.NewReader(full[:n]))
		if !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Errorf("cut at %d of %d: %v, want io.ErrUnexpectedEOF", n, len(full), err)
		}
	}

	for _, tc := range []struct {
		name string
		b    []byte
		want string
	}{
		{"absurd inputs", new(wireBuf).u64(1 << 60).clone(), "hookproto: accepted: inputPaths: count: 1152921504606846976 exceeds 1048576"},
		{"relative input", new(wireBuf).strs("/nix/store/a", "-rf").strs("out").clone(), `hookproto: accepted: inputPaths: path 1: "-rf" is not an absolute path`},
		{"absurd outputs", new(wireBuf).strs().u64(1 << 60).clone(), "hookproto: accepted: wantedOutputs: count: 1152921504606846976 exceeds 4096"},
		{"long path", new(wireBuf).strs("/" + strings.Repeat("p", MaxPathLen)).clone(), "hookproto: accepted: inputPaths: path 0: length 4097 exceeds 4096"},
	} {
		_, _, err := ReadAccepted(bytes.NewReader(tc.b))
		var re *ReadError
		if !errors.As(err, &re) || err.Error() != tc.want {
			t.Errorf("%s: got %v, want %q", tc.name, err, tc.want)
		}
	}
}
