package daemonproto

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/nix-offload/nix-offload/internal/serveproto"
)

// checkErr fails unless err is one of the kinds a reply may produce.
func checkErr(t *testing.T, err error) {
	var pe *ProtocolError
	var se *StreamError
	var re *RemoteError
	if !errors.As(err, &pe) && !errors.As(err, &se) && !errors.As(err, &re) {
		t.Fatalf("error of type %T: %v", err, err)
	}
	if errors.As(err, &re) && strings.Contains(re.Msg, "\x1b") {
		t.Fatalf("escape left in %q", re.Msg)
	}
}

// FuzzHandshake reads a daemon's greeting, hello and log from data. It
// must never panic, and what it accepts must be a version it speaks and
// a trust flag that exists. Seeds: what the daemons of the test bed sent
// (testdata/session-*.bin).
func FuzzHandshake(f *testing.F) {
	for _, file := range recordings(f) {
		var daemon []byte
		for _, c := range loadRecording(f, file) {
			if c.fromDaemon {
				daemon = append(daemon, c.b...)
			}
		}
		f.Add(daemon)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Handshake(context.Background(), bytes.NewReader(data), io.Discard, Options{Log: func(Message) {}})
		if err != nil {
			checkErr(t, err)
			return
		}
		if c.Version() < MinVersion || c.Version() > ClientVersion || c.Trust() > NotTrusted || len(c.NixVersion()) > MaxVersionLen {
			t.Fatalf("accepted version %s, trust %v", c.Version(), c.Trust())
		}
	})
}

// fuzzRequests are the requests FuzzReply reads replies to: those of
// the integration script, so that the recorded replies parse whole.
func fuzzRequests(t testing.TB) map[uint64]func() operation {
	infoA, _ := sourcePath(t, "daemonproto-a", "hello from a\n")
	infoB, _ := sourcePath(t, "daemonproto-b", "b refers to "+infoA.Path+"\n")
	missing := fakePath("daemonproto-missing")
	return map[uint64]func() operation{
		opSetOptions:         func() operation { return &setOptionsOp{} },
		opQueryValidPaths:    func() operation { return &queryValidPathsOp{Paths: []string{missing, infoA.Path, infoB.Path}} },
		opQueryPathInfo:      func() operation { return &queryPathInfoOp{Path: infoB.Path} },
		opNarFromPath:        func() operation { return &narFromPathOp{Info: serveproto.PathInfo{Path: infoB.Path}, w: io.Discard} },
		opBuildDerivation:    func() operation { return &buildDerivationOp{} },
		opAddMultipleToStore: func() operation { return &addMultipleToStoreOp{} },
		opBuildPathsWithResults: func() operation {
			return &buildPathsWithResultsOp{Paths: []string{fakePath("daemonproto-nothere.drv") + "!out"}}
		},
	}
}

// FuzzReply reads data as the reply (log messages, then the reply
// proper) to the operation with the given opcode, at protocol 1.minor.
// It must never panic; log messages must be bounded, and builds accepted
// must name only valid store paths and carry no escapes. Seeds: every
// reply of the recorded conversations, with its opcode and version.
func FuzzReply(f *testing.F) {
	for _, file := range recordings(f) {
		chunks := loadRecording(f, file)
		minor := uint8(0)
		for i, c := range chunks {
			if !c.fromDaemon || i == 0 {
				continue
			}
			if minor == 0 && len(chunks[1].b) >= 16 {
				// The greeting: magic, then the daemon's version.
				minor = uint8(min(binary.LittleEndian.Uint64(chunks[1].b[8:16])&0xff, uint64(ClientVersion.Minor())))
			}
			req := chunks[i-1].b
			if len(req) < 8 {
				continue
			}
			f.Add(uint8(binary.LittleEndian.Uint64(req)), minor, c.b)
		}
	}
	f.Fuzz(func(t *testing.T, opcode, minor uint8, data []byte) {
		mk, ok := fuzzRequests(t)[uint64(opcode)]
		if !ok || minor < 34 || minor > 38 {
			return
		}
		op := mk()
		rr := &recordingReader{r: bytes.NewReader(data)}
		c := &Conn{rr: rr, r: bufio.NewReader(rr), w: bufio.NewWriter(io.Discard), version: Version(1<<8 | int(minor))}
		c.opt.Log = func(m Message) {
			if len(m.Text) > MaxLogLen || len(m.Fields) > MaxLogFields {
				t.Fatalf("unbounded message %+v", m)
			}
		}
		err := op.readReply(c, newDecoder(c.r, op.name(), nil))
		if err != nil {
			checkErr(t, err)
			return
		}
		var results []BuildResult
		switch op := op.(type) {
		case *buildDerivationOp:
			results = append(results, op.Result)
		case *buildPathsWithResultsOp:
			for _, r := range op.Results {
				results = append(results, r)
			}
		}
		for _, r := range results {
			if strings.Contains(r.ErrorMsg, "\x1b") {
				t.Fatalf("escape left in %q", r.ErrorMsg)
			}
			for name, p := range r.BuiltOutputs {
				if name == "" || serveproto.CheckStorePath(p) != nil {
					t.Fatalf("accepted output %q = %q", name, p)
				}
			}
		}
	})
}
