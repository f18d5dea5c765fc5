package localstore

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	gonar "github.com/nix-community/go-nix/pkg/nar"
	"github.com/nix-community/go-nix/pkg/nixbase32"
	"github.com/nix-offload/nix-offload/internal/nar"
	"github.com/nix-offload/nix-offload/internal/serveproto"
)

const (
	goodPath = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello-1.0"
	goodDrv  = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello-1.0.drv"
)

func TestCheckStorePath(t *testing.T) {
	good := []string{
		goodPath,
		goodDrv,
		"/nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-a+b-c._?=",
		"/nix/store/00000000000000000000000000000000-" + strings.Repeat("x", 211),
	}
	for _, p := range good {
		base, err := checkStorePath("/nix/store", p)
		if err != nil || base != strings.TrimPrefix(p, "/nix/store/") {
			t.Errorf("%q: %q, %v", p, base, err)
		}
	}
	hostile := []string{
		"",
		"/nix/store",
		"/nix/store/",
		"/nix/store/..",
		"/nix/store/../../etc/passwd",
		"/nix/store/0123456789abcdfghijklmnpqrsvwxyz-x/../../etc",
		"/nix/store/0123456789abcdfghijklmnpqrsvwxyz-x/sub",
		"/nix/store/0123456789abcdfghijklmnpqrsvwxyz-a\nb", // would inject a line into --register-validity
		"/nix/store/0123456789abcdfghijklmnpqrsvwxyz-a b",
		"/nix/store/0123456789abcdfghijklmnpqrsvwxyz-",
		"/nix/store/0123456789abcdefghijklmnpqrsvwxyz-e", // "e" is not a base-32 digit
		"/nix/store/0123456789ABCDFGHIJKLMNPQRSVWXYZ-x",
		"/nix/store/0123456789abcdfghijklmnpqrsvwxy-short",
		"/nix/store/.nix-offload-123",
		"/nix/storeX/0123456789abcdfghijklmnpqrsvwxyz-x",
		"nix/store/0123456789abcdfghijklmnpqrsvwxyz-x",
		"//nix/store/0123456789abcdfghijklmnpqrsvwxyz-x",
		"/nix/store//0123456789abcdfghijklmnpqrsvwxyz-x",
		"/nix/store/00000000000000000000000000000000-" + strings.Repeat("x", 212),
		"/nix/store/0123456789abcdfghijklmnpqrsvwxyz-x\x00",
	}
	for _, p := range hostile {
		if base, err := checkStorePath("/nix/store", p); err == nil {
			t.Errorf("%q accepted as %q", p, base)
		}
	}
	// Dots in the name are harmless: the base name is one component that
	// starts with the hash, never "." or "..".
	for _, p := range []string{"/nix/store/0123456789abcdfghijklmnpqrsvwxyz-..", "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-a..b"} {
		if _, err := checkStorePath("/nix/store", p); err != nil {
			t.Errorf("a name with dots: %v", err)
		}
	}
}

// makeNAR returns the NAR of a directory holding one file.
func makeNAR(t testing.TB, contents string) []byte {
	t.Helper()
	var buf bytes.Buffer
	nw, err := gonar.NewWriter(&buf)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range []gonar.Header{
		{Path: "/", Type: gonar.TypeDirectory},
		{Path: "/file", Type: gonar.TypeRegular, Size: int64(len(contents))},
	} {
		if err := nw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := io.WriteString(nw, contents); err != nil {
		t.Fatal(err)
	}
	if err := nw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func narHash(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + nixbase32.EncodeToString(sum[:])
}

// noNix is an Options.Command for tests that must not run nix-store.
func noNix(t *testing.T) func(argv ...string) *exec.Cmd {
	return func(argv ...string) *exec.Cmd {
		t.Errorf("nix-store was run: %q", argv)
		return exec.Command("false")
	}
}

// Whatever a hostile machine puts in the infos is rejected before
// anything runs, is fetched or touches the store directory.
func TestAddOutputsRejectsHostileInfos(t *testing.T) {
	good := serveproto.PathInfo{Path: goodPath, NarHash: narHash([]byte("x")), NarSize: 8, Deriver: goodDrv}
	tests := []struct {
		name  string
		edit  func(*serveproto.PathInfo)
		infos func(serveproto.PathInfo) []serveproto.PathInfo
	}{
		{name: "path escapes", edit: func(i *serveproto.PathInfo) { i.Path = "/nix/store/../../etc/cron.d" }},
		{name: "path in a subdirectory", edit: func(i *serveproto.PathInfo) { i.Path = goodPath + "/bin" }},
		{name: "path outside the store", edit: func(i *serveproto.PathInfo) { i.Path = "/etc/0123456789abcdfghijklmnpqrsvwxyz-x" }},
		{name: "path with newline", edit: func(i *serveproto.PathInfo) { i.Path = goodPath + "\n0" }},
		{name: "temp-like path", edit: func(i *serveproto.PathInfo) { i.Path = "/nix/store/.nix-offload-1" }},
		{name: "deriver with newline", edit: func(i *serveproto.PathInfo) { i.Deriver = goodDrv + "\n1\n/nix/store/x" }},
		{name: "hostile reference", edit: func(i *serveproto.PathInfo) { i.References = []string{"/nix/store/../etc"} }},
		{name: "reference with newline", edit: func(i *serveproto.PathInfo) { i.References = []string{goodDrv + "\n"} }},
		{name: "narHash garbage", edit: func(i *serveproto.PathInfo) { i.NarHash = "sha256:\nzzz" }},
		{name: "narHash md5", edit: func(i *serveproto.PathInfo) { i.NarHash = "md5:d41d8cd98f00b204e9800998ecf8427e" }},
		{name: "narSize 0", edit: func(i *serveproto.PathInfo) { i.NarSize = 0 }},
		{name: "narSize huge", edit: func(i *serveproto.PathInfo) { i.NarSize = 1 << 63 }},
		{name: "duplicate", infos: func(i serveproto.PathInfo) []serveproto.PathInfo { return []serveproto.PathInfo{i, i} }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			s, err := Open(Options{RealStoreDir: dir, Command: noNix(t)})
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			info := good
			var infos []serveproto.PathInfo
			if tt.edit != nil {
				tt.edit(&info)
				infos = []serveproto.PathInfo{info}
			} else {
				infos = tt.infos(info)
			}
			err = s.AddOutputs(infos, func(path string, w io.Writer) error {
				t.Errorf("fetched %q", path)
				return nil
			})
			if err == nil {
				t.Fatal("accepted")
			}
			t.Log(err)
			if ents, _ := os.ReadDir(dir); len(ents) != 0 {
				t.Errorf("the store directory has %d entries", len(ents))
			}
		})
	}
}

func TestOpenRejectsOtherStoreDir(t *testing.T) {
	if _, err := Open(Options{StoreDir: "/gnu/store"}); err == nil {
		t.Fatal("accepted /gnu/store")
	}
}

// restoreOutput without Nix: every bad NAR leaves nothing behind, and the
// fetch goroutine always ends (TestMain checks).
func TestRestoreOutput(t *testing.T) {
	good := makeNAR(t, "hello\n")
	other := makeNAR(t, "hellO\n")
	sum := sha256.Sum256(good)
	tests := []struct {
		name    string
		size    int64
		fetch   func(path string, w io.Writer) error
		wantErr error // nil: success
		errText string
	}{
		{name: "good", size: int64(len(good)), fetch: writeAll(good)},
		{name: "wrong hash", size: int64(len(other)), fetch: writeAll(other), wantErr: nar.ErrHashMismatch},
		{name: "longer than narSize", size: int64(len(good)) - 8, fetch: writeAll(good), wantErr: nar.ErrSizeMismatch},
		{name: "shorter than narSize", size: int64(len(good)) + 8, fetch: writeAll(good), wantErr: nar.ErrSizeMismatch},
		{name: "fetch fails halfway", size: int64(len(good)), errText: "connection lost",
			fetch: func(path string, w io.Writer) error {
				w.Write(good[:len(good)/2])
				return errors.New("connection lost")
			}},
		{name: "fetch ends early", size: int64(len(good)), wantErr: io.ErrUnexpectedEOF,
			fetch: writeAll(good[:len(good)-8])},
		{name: "bytes after the NAR", size: int64(len(good)), wantErr: errNAREnded,
			fetch: func(path string, w io.Writer) error {
				if _, err := w.Write(good); err != nil {
					return err
				}
				_, err := w.Write([]byte("trailing"))
				return err
			}},
		{name: "not a NAR", size: 64, fetch: writeAll(bytes.Repeat([]byte{1}, 64)), errText: "magic"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			o := &output{path: goodPath, size: tt.size, sha256: sum[:], staged: filepath.Join(dir, "x")}
			err := restoreOutput(o, tt.fetch)
			if tt.wantErr == nil && tt.errText == "" {
				if err != nil {
					t.Fatal(err)
				}
				if b, err := os.ReadFile(filepath.Join(o.staged, "file")); err != nil || string(b) != "hello\n" {
					t.Errorf("restored %q, %v", b, err)
				}
				if o.hash != narHash(good) {
					t.Errorf("hash %s, want %s", o.hash, narHash(good))
				}
				return
			}
			if err == nil {
				t.Fatal("accepted")
			}
			t.Log(err)
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Errorf("error does not wrap %v", tt.wantErr)
			}
			if tt.errText != "" && !strings.Contains(err.Error(), tt.errText) {
				t.Errorf("error does not say %q", tt.errText)
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 0 {
				t.Errorf("left %d entries behind", len(ents))
			}
		})
	}
}

func writeAll(b []byte) func(string, io.Writer) error {
	return func(_ string, w io.Writer) error {
		_, err := w.Write(b)
		return err
	}
}
