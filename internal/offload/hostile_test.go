package offload_test

import (
	"context"
	"crypto/sha256"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nix-community/go-nix/pkg/derivation"

	"github.com/nix-offload/nix-offload/internal/localstore"
	"github.com/nix-offload/nix-offload/internal/nar"
	"github.com/nix-offload/nix-offload/internal/offload"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/servetest"
)

// The tests in this file run the real offload.Run against a fake machine
// (servetest) that lies, sends malformed or endless data, or falls silent,
// and import outputs with the real localstore.Store into a temporary
// store whose nix-store is servetest's (TestNixStoreHelper). Each must
// end quickly with an error that names the machine, the path and what was
// wrong, and leave nothing valid and nothing on disk.

// TestNixStoreHelper is the fake nix-store that servetest.LocalStore runs;
// in a normal test run it has nothing to do and passes, as the other helper
// processes do, so that the run's skip count shows only real skips.
func TestNixStoreHelper(t *testing.T) {
	servetest.RunNixStoreHelper()
}

const (
	machine   = "hostile"
	drvPath   = "/nix/store/dddddddddddddddddddddddddddddddd-hostile.drv"
	outPath   = "/nix/store/kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk-hostile"
	inputPath = "/nix/store/iiiiiiiiiiiiiiiiiiiiiiiiiiiiiiii-input"

	// caseBound is how long one case may take, a stalled machine
	// included: the test closes the session 100 ms after the stall.
	caseBound = 10 * time.Second

	// memBound is how much a case with an absurd length or count may
	// allocate in this process: the buffers of a few pipes, readers and
	// processes, nothing near what the length claims.
	memBound = 4 << 20
)

var inputNAR = servetest.FileNAR("an input\n")

// env is one fake machine and one fake local store holding the input.
type env struct {
	srv    *servetest.Server
	local  *servetest.LocalStore
	store  *localstore.Store
	victim string // a directory outside the store that hostile symlinks point to
	job    offload.Job
}

func newEnv(t *testing.T) *env {
	t.Helper()
	local := servetest.NewLocalStore(t, "TestNixStoreHelper")
	local.Add(t, serveproto.PathInfo{Path: inputPath}, inputNAR)
	store, err := localstore.Open(localstore.Options{RealStoreDir: local.Dir, Command: local.Command})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	drv := &derivation.Derivation{
		Outputs:      map[string]*derivation.Output{"out": {Path: outPath}},
		InputSources: []string{inputPath},
		Platform:     "x86_64-linux",
		Builder:      "/bin/sh",
		Arguments:    []string{"-c", "echo hi > $out"},
		Env:          map[string]string{"out": outPath},
	}
	return &env{
		srv:    &servetest.Server{},
		local:  local,
		store:  store,
		victim: t.TempDir(),
		job:    offload.Job{Machine: machine, DrvPath: drvPath, Drv: drv},
	}
}

// run connects to the fake over a pipe pair and runs the build; when ctx
// ends, the session is closed, as the hook does.
func (e *env) run(t *testing.T, ctx context.Context) error {
	t.Helper()
	ps := e.srv.Pipe(t, machine)
	stop := context.AfterFunc(ctx, func() { ps.Close() })
	defer stop()
	conn, err := serveproto.Handshake(ps.R, ps.W, serveproto.Options{Explain: ps.Explain})
	if err != nil {
		return err
	}
	return offload.Run(ctx, conn, e.store, e.job, offload.Events{})
}

// checkNothingValid fails if the output was registered or anything is
// left in the store directory (the output, a staging directory) or in the
// victim directory.
func (e *env) checkNothingValid(t *testing.T) {
	t.Helper()
	if reg := e.local.Registered(t); len(reg) > 0 {
		t.Errorf("nix-store --register-validity ran for %q", reg)
	}
	if e.local.Valid(t, outPath) {
		t.Errorf("%s is valid", outPath)
	}
	for _, dir := range []string{e.local.Dir, e.victim} {
		ents, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		for _, ent := range ents {
			t.Errorf("%s left in %s", ent.Name(), dir)
		}
	}
}

// output is what the machine "builds": narBytes at outPath, with the
// narHash and narSize of narBytes unless lie changes them.
func output(narBytes []byte, lie func(*serveproto.PathInfo)) servetest.Path {
	info := serveproto.PathInfo{Path: outPath, Deriver: drvPath, NarSize: uint64(len(narBytes)),
		NarHash: nar.Stats{SHA256: sha256.Sum256(narBytes)}.NixHash()}
	if lie != nil {
		lie(&info)
	}
	return servetest.Path{Info: info, NAR: narBytes}
}

// Hand-made NAR nodes, as servetest.NAR tokens.
func dir(entries ...any) []any {
	return []any{"(", "type", "directory", entries, ")"}
}

func entry(name any, node []any) []any { return []any{"entry", "(", "name", name, "node", node, ")"} }

func file(contents string) []any { return []any{"(", "type", "regular", "contents", contents, ")"} }

func symlink(target string) []any { return []any{"(", "type", "symlink", "target", target, ")"} }

// dirNAR is the NAR of a directory with the given entries.
func dirNAR(entries ...any) []byte { return servetest.NAR("nix-archive-1", dir(entries...)) }

// replace returns a Tamper that replaces the reply to op.
func replace(op servetest.Op, b []byte) func(*servetest.Reply) {
	return func(r *servetest.Reply) {
		if r.Op == op {
			r.Bytes = b
		}
	}
}

type hostileCase struct {
	name string
	// output, if set, is what the build produces (given the victim
	// directory).
	output func(victim string) servetest.Path
	tamper func(*servetest.Reply)
	want   []string // in the error, besides the machine's name
	absurd bool     // a claimed length or count no one could send: memory stays bounded
	stall  bool     // the machine falls silent; the test closes the session
}

func hostileCases() []hostileCase {
	honest := servetest.FileNAR("built\n")
	fetch := "copying outputs of '" + drvPath + "' from '" + machine + "'"
	build := "build of '" + drvPath + "' on '" + machine + "'"
	inputs := "copying inputs to '" + machine + "'"
	cut := func(op servetest.Op, keep func(n int) int) func(*servetest.Reply) {
		return func(r *servetest.Reply) {
			if r.Op == op {
				r.Bytes = r.Bytes[:keep(len(r.Bytes))]
				r.After = servetest.Hangup
				r.Stderr = "error: writing to file: Connection reset by peer\n"
			}
		}
	}
	return []hostileCase{
		// Lies about the output.
		{name: "wrong narHash", output: func(string) servetest.Path {
			return output(honest, func(i *serveproto.PathInfo) { i.NarHash = "sha256:" + strings.Repeat("0", 52) })
		}, want: []string{fetch, outPath, "hash mismatch", "but the machine reported sha256:" + strings.Repeat("0", 52)}},
		{name: "narSize too small", output: func(string) servetest.Path {
			return output(honest, func(i *serveproto.PathInfo) { i.NarSize -= 8 })
		}, want: []string{fetch, outPath, "size mismatch", "longer than its narSize"}},
		{name: "narSize too large", output: func(string) servetest.Path {
			return output(honest, func(i *serveproto.PathInfo) { i.NarSize += 8 })
		}, want: []string{fetch, outPath, "size mismatch", "but the machine reported narSize"}},
		{name: "narSize absurd", output: func(string) servetest.Path {
			return output(honest, func(i *serveproto.PathInfo) { i.NarSize = 1 << 62 })
		}, want: []string{fetch, outPath, "narSize 4611686018427387904 is outside"}, absurd: true},

		// Hostile NARs, with the narHash and narSize that match them:
		// only the NAR's own rules stop them.
		{name: "entry ..", output: func(string) servetest.Path {
			return output(dirNAR(entry("..", file("x"))), nil)
		}, want: []string{fetch, outPath, "fetching the NAR: serveproto: DumpStorePath reply: NAR: nar: at offset", `entry name "..": not allowed`}},
		{name: "entry a/b", output: func(string) servetest.Path {
			return output(dirNAR(entry("a/b", file("x"))), nil)
		}, want: []string{fetch, outPath, "fetching the NAR: serveproto: DumpStorePath reply: NAR: nar: at offset", `entry name "a/b": contains "/"`}},
		{name: "entry with NUL", output: func(string) servetest.Path {
			return output(dirNAR(entry("a\x00b", file("x"))), nil)
		}, want: []string{fetch, outPath, "fetching the NAR: serveproto: DumpStorePath reply: NAR: nar: at offset", `entry name "a\x00b": contains NUL`}},
		{name: "entries unsorted", output: func(string) servetest.Path {
			return output(dirNAR(entry("b", file("x")), entry("a", file("y"))), nil)
		}, want: []string{fetch, outPath, "fetching the NAR: serveproto: DumpStorePath reply: NAR: nar: at offset", `entry name "a": not sorted after "b"`}},
		{name: "entry duplicate", output: func(string) servetest.Path {
			return output(dirNAR(entry("a", file("x")), entry("a", file("y"))), nil)
		}, want: []string{fetch, outPath, "fetching the NAR: serveproto: DumpStorePath reply: NAR: nar: at offset", `entry name "a": duplicate`}},
		{name: "write through a symlink to outside", output: func(victim string) servetest.Path {
			// x -> victim, then a directory x holding evil: written
			// through the link, evil would land in victim.
			return output(dirNAR(
				entry("x", symlink(victim)),
				entry("x", dir(entry("evil", file("pwned")))),
			), nil)
		}, want: []string{fetch, outPath, "fetching the NAR: serveproto: DumpStorePath reply: NAR: nar: at offset", `entry name "x": duplicate`}},
		{name: "write through a symlink to ../..", output: func(string) servetest.Path {
			return output(dirNAR(
				entry("x", symlink("../..")),
				entry("x/evil", file("pwned")),
			), nil)
		}, want: []string{fetch, outPath, "fetching the NAR: serveproto: DumpStorePath reply: NAR: nar: at offset", `entry name "x/evil": contains "/"`}},
		{name: "symlink target with NUL", output: func(string) servetest.Path {
			return output(dirNAR(entry("l", symlink("/etc\x00"))), nil)
		}, want: []string{fetch, outPath, "symlink target", "contains NUL"}},
		{name: "file size absurd", output: func(string) servetest.Path {
			return output(servetest.NAR("nix-archive-1", "(", "type", "regular", "contents", servetest.Len(1<<62)), nil)
		}, want: []string{fetch, outPath, "file size 4611686018427387904 exceeds"}, absurd: true},
		{name: "name length absurd", output: func(string) servetest.Path {
			return output(dirNAR("entry", "(", "name", servetest.Len(1<<62)), nil)
		}, want: []string{fetch, outPath, "entry name length 4611686018427387904 exceeds"}, absurd: true},
		{name: "not a NAR", output: func(string) servetest.Path {
			return output([]byte("<html>502 Bad Gateway</html>\n\x00\x00\x00"), nil)
		}, want: []string{fetch, outPath, "not a NAR"}},

		// Streams that end or stop.
		{name: "NAR truncated", tamper: cut(servetest.DumpStorePath, func(n int) int { return n / 2 }),
			want: []string{fetch, outPath, "fetching the NAR", "Connection reset by peer"}},
		{name: "NAR truncated in a file that claims 1 GiB", output: func(string) servetest.Path {
			return output(append(servetest.NAR("nix-archive-1", "(", "type", "regular", "contents", servetest.Len(1<<30)), make([]byte, 4096)...),
				func(i *serveproto.PathInfo) { i.NarSize = 1<<30 + 200 })
		}, tamper: func(r *servetest.Reply) {
			if r.Op == servetest.DumpStorePath {
				r.After = servetest.Hangup
			}
		}, want: []string{fetch, outPath, "fetching the NAR", "DumpStorePath reply: NAR", "reading file contents: unexpected EOF"}, absurd: true},
		{name: "silent while sending the NAR", tamper: func(r *servetest.Reply) {
			if r.Op == servetest.DumpStorePath {
				r.Bytes, r.After = r.Bytes[:64], servetest.Stall
			}
		}, want: []string{fetch + " stopped", "context canceled"}, stall: true},
		{name: "path infos truncated", tamper: cut(servetest.QueryPathInfos, func(n int) int { return n - 12 }),
			want: []string{fetch, "Connection reset by peer"}},

		// Malformed path infos.
		{name: "info for a path not asked for", tamper: replace(servetest.QueryPathInfos,
			new(servetest.Enc).Str(inputPath, "").U64(0, 1, 1).Str("sha256:"+strings.Repeat("0", 52), "").U64(0).Str("").Bytes()),
			want: []string{fetch, inputPath + " was not requested"}},
		{name: "references count absurd", tamper: replace(servetest.QueryPathInfos,
			new(servetest.Enc).Str(outPath, "").U64(1<<62).Bytes()),
			want: []string{fetch, "references: count: 4611686018427387904 exceeds"}, absurd: true},
		{name: "reference outside the store", tamper: replace(servetest.QueryPathInfos,
			new(servetest.Enc).Str(outPath, "").Strs([]string{"/nix/store/../../etc/passwd"}).U64(8, 8).Str("sha256:"+strings.Repeat("0", 52), "").U64(0).Str("").Bytes()),
			want: []string{fetch, "QueryPathInfos reply: info 0: references: path 0", "../../etc/passwd", "is not a store path"}},
		{name: "narHash not a hash", tamper: replace(servetest.QueryPathInfos,
			new(servetest.Enc).Str(outPath, "").U64(0, 8, 8).Str("md5:zzz", "").U64(0).Str("").Bytes()),
			want: []string{fetch, "narHash", "md5:zzz"}},
		{name: "output not valid after the build", tamper: replace(servetest.QueryPathInfos, new(servetest.Enc).Str("").Bytes()),
			want: []string{fetch, "reports 0 of 1 outputs valid"}},

		// Malformed build results.
		{name: "errorMsg length absurd", tamper: replace(servetest.BuildDerivation,
			new(servetest.Enc).U64(3, 1<<62).Bytes()),
			want: []string{build, "errorMsg: length 4611686018427387904 exceeds"}, absurd: true},
		{name: "builtOutputs count absurd", tamper: replace(servetest.BuildDerivation,
			new(servetest.Enc).U64(0).Str("").U64(1, 0, 1, 1, 1<<62).Bytes()),
			want: []string{build, "builtOutputs: count: 4611686018427387904 exceeds"}, absurd: true},
		{name: "build result truncated", tamper: cut(servetest.BuildDerivation, func(n int) int { return 20 }),
			want: []string{build, "Connection reset by peer"}},
		{name: "silent during the build", tamper: func(r *servetest.Reply) {
			if r.Op == servetest.BuildDerivation {
				r.Bytes, r.After = nil, servetest.Stall
			}
		}, want: []string{build + " stopped", "context canceled"}, stall: true},

		// Malformed answers while inputs are sent.
		{name: "valid paths count absurd", tamper: replace(servetest.QueryValidPaths, new(servetest.Enc).U64(1<<62).Bytes()),
			want: []string{inputs, "QueryValidPaths reply: count: 4611686018427387904 exceeds"}, absurd: true},
		{name: "valid path not asked for", tamper: replace(servetest.QueryValidPaths, new(servetest.Enc).Strs([]string{"/nix/store/../x"}).Bytes()),
			want: []string{inputs, "QueryValidPaths reply: path 0", "../x", "is not a store path"}},
		{name: "AddToStoreNar answers 2", tamper: replace(servetest.AddToStoreNar, new(servetest.Enc).U64(2).Bytes()),
			want: []string{inputs, inputPath, "AddToStoreNar reply: result: got 2, want 1"}},
		{name: "silent after an input", tamper: func(r *servetest.Reply) {
			if r.Op == servetest.AddToStoreNar {
				r.Bytes, r.After = nil, servetest.Stall
			}
		}, want: []string{inputs + " stopped", "context canceled"}, stall: true},
	}
}

func TestHostileMachine(t *testing.T) {
	for _, tc := range hostileCases() {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			if tc.output != nil {
				p := tc.output(e.victim)
				e.srv.Build = func(servetest.BuildRequest) servetest.BuildReply {
					return servetest.BuildReply{Status: serveproto.Built, Outputs: map[string]servetest.Path{"out": p}}
				}
			}
			e.srv.Tamper = tc.tamper
			stalled := make(chan servetest.Op, 1)
			e.srv.Stalled = stalled
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if tc.stall {
				go func() {
					select {
					case <-stalled:
						time.Sleep(100 * time.Millisecond)
						cancel()
					case <-ctx.Done():
					}
				}()
			}

			runtime.GC()
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			start := time.Now()
			done := make(chan error, 1)
			go func() { done <- e.run(t, ctx) }()
			var err error
			select {
			case err = <-done:
			case <-time.After(caseBound):
				cancel()
				t.Fatalf("offload.Run still running after %v", caseBound)
			}
			elapsed := time.Since(start)
			runtime.ReadMemStats(&after)
			alloc := after.TotalAlloc - before.TotalAlloc

			if err == nil {
				t.Fatal("offload.Run accepted the hostile machine's output")
			}
			t.Logf("%v, %d KiB allocated: %v", elapsed.Round(time.Millisecond), alloc>>10, err)
			for _, want := range append([]string{"'" + machine + "'"}, tc.want...) {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error does not contain %q", want)
				}
			}
			var be *offload.BuildError
			if errors.As(err, &be) {
				t.Errorf("reported as a failed build: %v", err)
			}
			if tc.absurd && alloc > memBound {
				t.Errorf("allocated %d bytes, more than %d", alloc, memBound)
			}
			e.checkNothingValid(t)
		})
	}
}

// The same harness with an honest machine: the output becomes valid, with
// what the machine built, and the input was sent. This is what makes the
// hostile cases mean something.
func TestHonestMachine(t *testing.T) {
	e := newEnv(t)
	if err := e.run(t, context.Background()); err != nil {
		t.Fatal(err)
	}
	if reg := e.local.Registered(t); len(reg) != 1 || !slices.Equal(reg[0], []string{outPath}) {
		t.Errorf("registered %q, want [[%s]]", reg, outPath)
	}
	b, err := os.ReadFile(filepath.Join(e.local.Dir, strings.TrimPrefix(outPath, "/nix/store/")))
	if want := "built " + drvPath + " out\n"; err != nil || string(b) != want {
		t.Errorf("output holds %q (%v), want %q", b, err, want)
	}
	if _, ok := e.srv.Lookup(inputPath); !ok {
		t.Error("the input was not sent")
	}
	ops := e.srv.Ops()
	want := []servetest.Op{servetest.QueryValidPaths, servetest.AddToStoreNar, servetest.BuildDerivation, servetest.QueryPathInfos, servetest.DumpStorePath}
	if !slices.Equal(ops, want) {
		t.Errorf("operations %v, want %v", ops, want)
	}
}

// Garbage or silence instead of the greeting: Handshake fails with what
// arrived, or returns once the caller closes the session.
func TestHostileHandshake(t *testing.T) {
	t.Run("garbage", func(t *testing.T) {
		srv := &servetest.Server{Tamper: func(r *servetest.Reply) {
			if r.Op == servetest.Handshake {
				r.Bytes, r.After = []byte("Welcome to hostile!\n\x1b[31mLast login: never\n"), servetest.Hangup
			}
		}}
		ps := srv.Pipe(t, machine)
		_, err := serveproto.Handshake(ps.R, ps.W, serveproto.Options{Explain: ps.Explain})
		want := `the server did not speak the serve protocol; got "Welcome to hostile!\n\x1b[31mLast login: never\n"`
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("got %v\nwant %q", err, want)
		}
	})
	t.Run("silent", func(t *testing.T) {
		stalled := make(chan servetest.Op, 1)
		srv := &servetest.Server{Stalled: stalled, Tamper: func(r *servetest.Reply) {
			if r.Op == servetest.Handshake {
				r.Bytes, r.After = nil, servetest.Stall
			}
		}}
		ps := srv.Pipe(t, machine)
		done := make(chan error, 1)
		go func() {
			_, err := serveproto.Handshake(ps.R, ps.W, serveproto.Options{Explain: ps.Explain})
			done <- err
		}()
		<-stalled
		ps.Close()
		select {
		case err := <-done:
			if err == nil || !strings.Contains(err.Error(), "Handshake") {
				t.Errorf("got %v", err)
			}
		case <-time.After(caseBound):
			t.Fatal("Handshake still blocked after the session was closed")
		}
	})
}

// Symlinks that point out of the output are legal in Nix and stay links:
// the output becomes valid, and nothing is written where they point.
func TestOutputSymlinksOutside(t *testing.T) {
	for _, tc := range []struct {
		name string
		nar  func(victim string) []byte
	}{
		{"root", func(victim string) []byte { return servetest.NAR("nix-archive-1", symlink(victim)) }},
		{"entries", func(victim string) []byte {
			return dirNAR(entry("a", symlink("../..")), entry("b", symlink(victim)), entry("c", file("after the links")))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			p := output(tc.nar(e.victim), nil)
			e.srv.Build = func(servetest.BuildRequest) servetest.BuildReply {
				return servetest.BuildReply{Status: serveproto.Built, Outputs: map[string]servetest.Path{"out": p}}
			}
			if err := e.run(t, context.Background()); err != nil {
				t.Fatal(err)
			}
			if !e.local.Valid(t, outPath) {
				t.Errorf("%s is not valid", outPath)
			}
			if ents, _ := os.ReadDir(e.victim); len(ents) > 0 {
				t.Errorf("%d entries written into the directory a symlink points to", len(ents))
			}
			real := filepath.Join(e.local.Dir, strings.TrimPrefix(outPath, "/nix/store/"))
			link := real
			if tc.name == "entries" {
				link = filepath.Join(real, "b")
			}
			if target, err := os.Readlink(link); err != nil || target != e.victim {
				t.Errorf("%s: link to %q (%v), want %q", link, target, err, e.victim)
			}
		})
	}
}
