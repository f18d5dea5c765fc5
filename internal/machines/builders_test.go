package machines

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// files is a readFile over a map; a missing name is fs.ErrNotExist, as from os.ReadFile.
func files(m map[string]string) func(string) ([]byte, error) {
	return func(name string) ([]byte, error) {
		if s, ok := m[name]; ok {
			return []byte(s), nil
		}
		return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
	}
}

// bm is a machine as the builders format gives it by default.
func bm(host, source string, f func(*Machine)) Machine {
	m := Machine{Host: host, Systems: []string{"x86_64-linux"}, ConnectTimeout: 10 * time.Second,
		ParallelBuilds: 1, Speed: 1, Enabled: true, Source: source}
	if f != nil {
		f(&m)
	}
	return m
}

func TestParseBuilders(t *testing.T) {
	for _, tc := range []struct {
		name  string
		spec  string
		files map[string]string
		want  []Machine
	}{
		{"empty", "", nil, nil},
		{"only comments and separators", " # nothing\n ; ;\n\t\n", nil, nil},
		{"Nix manual example, every field",
			"ssh://root@b1 x86_64-linux,i686-linux /k 8 2 kvm,big-parallel benchmark " + testKeyB64, nil,
			[]Machine{bm("b1", "builders:1", func(m *Machine) {
				m.User, m.SSHKey, m.ParallelBuilds, m.Speed, m.HostKey = "root", "/k", 8, 2, testKey
				m.Systems = []string{"x86_64-linux", "i686-linux"}
				m.Features, m.MandatoryFeatures = []string{"kvm", "big-parallel"}, []string{"benchmark"}
			})}},
		{"placeholders", "b1 - - - - - - -\nb2 -   /k  -  3", nil, []Machine{
			bm("b1", "builders:1", nil),
			bm("b2", "builders:2", func(m *Machine) { m.SSHKey, m.Speed = "/k", 3 }),
		}},
		{"URI forms", "b1 ; root@b2 ; ssh://b3:2222 ; ssh-ng://nix@b4:22 ; ssh://[fd00::5]:2222 ; fd00::6 ; ssh://u@[fd00::7]", nil, []Machine{
			bm("b1", "builders:1", nil),
			bm("b2", "builders:1", func(m *Machine) { m.User = "root" }),
			bm("b3", "builders:1", func(m *Machine) { m.Port = 2222 }),
			bm("b4", "builders:1", func(m *Machine) { m.User, m.Port, m.Protocol = "nix", 22, ProtocolSSHNG }),
			bm("fd00::5", "builders:1", func(m *Machine) { m.Port = 2222 }),
			bm("fd00::6", "builders:1", nil),
			bm("fd00::7", "builders:1", func(m *Machine) { m.User = "u" }),
		}},
		{"store settings", "ssh://b1?remote-store=/mnt/nix&compress=true&ssh-key=/q&base64-ssh-public-host-key=" + testKeyB64 + " - /k", nil, []Machine{
			bm("b1", "builders:1", func(m *Machine) { m.RemoteStore, m.SSHKey, m.HostKey = "/mnt/nix", "/k", testKey }),
		}},
		{"ssh-key setting without field 3", "ssh-ng://b1?ssh-key=/q", nil, []Machine{
			bm("b1", "builders:1", func(m *Machine) { m.SSHKey, m.Protocol = "/q", ProtocolSSHNG }),
		}},
		// The usual line for a nix-darwin builder, and its ssh-ng twin.
		{"remote-program", "ssh://mac?remote-program=/nix/var/nix/profiles/default/bin/nix-store aarch64-darwin - 4\n" +
			"ssh-ng://mac2?remote-program=/nix/var/nix/profiles/default/bin/nix-daemon aarch64-darwin", nil, []Machine{
			bm("mac", "builders:1", func(m *Machine) {
				m.Systems, m.ParallelBuilds, m.RemoteProgram = []string{"aarch64-darwin"}, 4, "/nix/var/nix/profiles/default/bin/nix-store"
			}),
			bm("mac2", "builders:2", func(m *Machine) {
				m.Systems, m.Protocol, m.RemoteProgram = []string{"aarch64-darwin"}, ProtocolSSHNG, "/nix/var/nix/profiles/default/bin/nix-daemon"
			}),
		}},
		{"speed: float, 0 means 1", "b1 - - - 0.5\nb2 - - - 0\nb3 - - - 1e1", nil, []Machine{
			bm("b1", "builders:1", func(m *Machine) { m.Speed = 0.5 }),
			bm("b2", "builders:2", nil),
			bm("b3", "builders:3", func(m *Machine) { m.Speed = 10 }),
		}},
		{"max jobs 0 disables", "b1 - - 0", nil, []Machine{
			bm("b1", "builders:1", func(m *Machine) { m.Enabled = false }),
		}},
		{"comma lists drop empty items", "b1 ,x86_64-linux,,aarch64-linux, - - - kvm,,", nil, []Machine{
			bm("b1", "builders:1", func(m *Machine) {
				m.Systems, m.Features = []string{"x86_64-linux", "aarch64-linux"}, []string{"kvm"}
			}),
		}},
		{"';' inside a comment does not start an entry", "b1 # old b2 ; b3\nb4", nil, []Machine{
			bm("b1", "builders:1", nil),
			bm("b4", "builders:2", nil),
		}},
		{"tabs and CRLF", "b1\tx86_64-linux\t-\t2\r\nb2\r\n", nil, []Machine{
			bm("b1", "builders:1", func(m *Machine) { m.ParallelBuilds = 2 }),
			bm("b2", "builders:2", nil),
		}},
		{"include", "b0 ; @/etc/nix/machines ; b9", map[string]string{
			"/etc/nix/machines": "# header\nb1\n\n@ /etc/nix/more # nested, with a space after '@'\nb2 aarch64-linux",
			"/etc/nix/more":     "b3;b4",
		}, []Machine{
			bm("b0", "builders:1", nil),
			bm("b1", "/etc/nix/machines:2", nil),
			bm("b3", "/etc/nix/more:1", nil),
			bm("b4", "/etc/nix/more:1", nil),
			bm("b2", "/etc/nix/machines:5", func(m *Machine) { m.Systems = []string{"aarch64-linux"} }),
			bm("b9", "builders:1", nil),
		}},
		{"missing include is ignored", "@/etc/nix/machines\nb1", nil, []Machine{bm("b1", "builders:2", nil)}},
		{"same file included twice is not a cycle", "@/a\n@/a", map[string]string{"/a": "@/b", "/b": "# empty"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ms, err := ParseBuilders(tc.spec, "x86_64-linux", files(tc.files))
			if err != nil {
				t.Fatal(err)
			}
			if d := cmp.Diff(tc.want, ms); d != "" {
				t.Errorf("(-want +got):\n%s", d)
			}
			if err := Validate(ms); err != nil {
				t.Errorf("Validate: %v", err)
			}
		})
	}
}

func TestParseBuildersFile(t *testing.T) {
	ms, err := ParseBuilders("@testdata/machines", "x86_64-linux", nil) // os.ReadFile
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, m := range ms {
		got = append(got, fmt.Sprintf("%s %s %s jobs=%d speed=%g enabled=%v key=%v", m.Name(), m.Source,
			strings.Join(m.Systems, ","), m.ParallelBuilds, m.Speed, m.Enabled, m.HostKey != ""))
	}
	want := []string{
		"root@b1 testdata/machines:2 x86_64-linux,i686-linux jobs=8 speed=2 enabled=true key=true",
		"nix@b2:2222 testdata/machines:3 aarch64-linux jobs=4 speed=1 enabled=true key=false",
		"b3 testdata/machines:3 x86_64-linux jobs=1 speed=0.5 enabled=true key=false",
		"b4 testdata/machines:4 x86_64-linux jobs=1 speed=1 enabled=false key=false",
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("(-want +got):\n%s", d)
	}
}

func TestParseBuildersErrors(t *testing.T) {
	loop := map[string]string{"/a": "b1\n@/b", "/b": "b2\n@/c", "/c": "@/a"}
	deep := map[string]string{}
	for i := range MaxIncludeDepth + 1 {
		deep[fmt.Sprintf("/d%d", i)] = fmt.Sprintf("@/d%d", i+1)
	}
	for _, tc := range []struct {
		name   string
		spec   string
		system string
		files  map[string]string
		want   string
	}{
		{"negative speed", "b1 - - - -1", "x", nil,
			`builders:1: field 5 (speed factor): must not be negative, got "-1" (in entry "b1 - - - -1")`},
		{"speed not a number", "b1 - - - fast", "x", nil,
			`builders:1: field 5 (speed factor): must be a finite number, got "fast" (in entry "b1 - - - fast")`},
		{"speed NaN", "b1 - - - NaN", "x", nil,
			`builders:1: field 5 (speed factor): must be a finite number, got "NaN" (in entry "b1 - - - NaN")`},
		{"max jobs negative", "b1 - - -2", "x", nil,
			`builders:1: field 4 (max jobs): must be a whole number, got "-2" (in entry "b1 - - -2")`},
		{"max jobs huge", "b1 - - 5000", "x", nil,
			`builders:1: field 4 (max jobs): must be at most 1024, got 5000 (in entry "b1 - - 5000")`},
		{"bad base64", "b1 - - - - - - %%%", "x", nil,
			`builders:1: field 8 (public host key): is not valid base64: illegal base64 data at input byte 0 (in entry "b1 - - - - - - %%%")`},
		{"base64 of something else", "b1 - - - - - - aGVsbG8=", "x", nil,
			`builders:1: field 8 (public host key): decodes to something that is not a public key line; it must be the base64 of e.g. ssh_host_ed25519_key.pub: must be a public key line such as "ssh-ed25519 AAAA…" (the host's /etc/ssh/ssh_host_ed25519_key.pub): ssh: no key found (in entry "b1 - - - - - - aGVsbG8=")`},
		{"bad scheme", "s3://cache x86_64-linux", "x", nil,
			`builders:1: field 1 (store URI): "s3://cache" uses scheme "s3"; nix-offload reaches machines over SSH only (ssh:// or ssh-ng://) (in entry "s3://cache x86_64-linux")`},
		{"local store", "local", "x", nil,
			`builders:1: field 1 (store URI): "local" is a local store; nix-offload only builds on machines it reaches over SSH (in entry "local")`},
		{"auto store", "auto?root=/x", "x", nil,
			`builders:1: field 1 (store URI): "auto?root=/x" is a local store; nix-offload only builds on machines it reaches over SSH (in entry "auto?root=/x")`},
		{"path store", "/srv/store", "x", nil,
			`builders:1: field 1 (store URI): "/srv/store" is a local store; nix-offload only builds on machines it reaches over SSH (in entry "/srv/store")`},
		{"bad port", "ssh://b1:99999", "x", nil,
			`builders:1: field 1 (store URI): "ssh://b1:99999" has a bad port "99999"; it must be between 1 and 65535 (in entry "ssh://b1:99999")`},
		{"empty host", "ssh://root@", "x", nil,
			`builders:1: field 1 (store URI): host must not be empty (in entry "ssh://root@")`},
		{"path in URI", "ssh://b1/nix", "x", nil,
			`builders:1: field 1 (store URI): "ssh://b1/nix" has a path "/nix"; a remote store is set with ?remote-store=… (in entry "ssh://b1/nix")`},
		{"unsupported setting", "ssh://b1?ssh-args=-v", "x", nil,
			`builders:1: field 1 (store URI): store setting "ssh-args" is not supported by nix-offload (in entry "ssh://b1?ssh-args=-v")`},
		{"empty remote-program", "ssh-ng://b1?remote-program=", "x", nil,
			`builders:1: field 1 (store URI): setting remote-program is empty; give the path of nix-store (ssh://) or nix-daemon (ssh-ng://) (in entry "ssh-ng://b1?remote-program=")`},
		{"URI only a dash", "- x86_64-linux", "x", nil,
			`builders:1: field 1 (store URI): missing; every entry starts with the machine's address (in entry "- x86_64-linux")`},
		{"no system at all", "b1", "", nil,
			`builders:1: field 2 (systems): no systems given, and no default system to use (in entry "b1")`},
		{"too many fields", "b1 - - - - - - - extra", "x", nil,
			`builders:1: entry "b1 - - - - - - - extra" has 9 fields, at most 8 are allowed`},
		{"duplicate", "root@b1 x86_64-linux\n@/m", "x", map[string]string{"/m": "\n\nroot@b1 aarch64-linux"},
			`/m:3: field 1 (store URI): duplicate machine "root@b1", also at builders:1; merge the two entries (one entry per machine, all its systems in field 2)`},
		{"include cycle", "@/a", "x", loop,
			`/c:1: @/a: include cycle: /a includes /b includes /c includes /a`},
		{"self include", "@/s", "x", map[string]string{"/s": "b1\n@/s"},
			`/s:2: @/s: include cycle: /s includes /s`},
		{"includes too deep", "@/d0", "x", deep,
			fmt.Sprintf(`/d%d:1: @/d%d: includes nest more than %d deep`, MaxIncludeDepth-1, MaxIncludeDepth, MaxIncludeDepth)},
		{"'@' alone", "@", "x", nil,
			`builders:1: @: '@' must be followed by a file name`},
		{"several, in order", "b1 - - x\nb2 - - - -3 ; s3://c", "x", nil,
			"builders:1: field 4 (max jobs): must be a whole number, got \"x\" (in entry \"b1 - - x\")\n" +
				"builders:2: field 5 (speed factor): must not be negative, got \"-3\" (in entry \"b2 - - - -3\")\n" +
				`builders:2: field 1 (store URI): "s3://c" uses scheme "s3"; nix-offload reaches machines over SSH only (ssh:// or ssh-ng://) (in entry "s3://c")`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ms, err := ParseBuilders(tc.spec, tc.system, files(tc.files))
			if err == nil {
				t.Fatalf("no error; machines %+v", ms)
			}
			if ms != nil {
				t.Errorf("machines %+v returned with an error", ms)
			}
			if got := err.Error(); got != tc.want {
				t.Errorf("error:\n%s\nwant:\n%s", got, tc.want)
			}
			var e *Error
			if !errors.As(err, &e) {
				t.Errorf("not an *Error: %T", err)
			}
		})
	}
}

func TestParseBuildersReadError(t *testing.T) {
	denied := func(name string) ([]byte, error) {
		return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrPermission}
	}
	_, err := ParseBuilders("b1\n@/etc/nix/machines", "x86_64-linux", denied)
	want := "builders:2: @/etc/nix/machines: open /etc/nix/machines: permission denied"
	if err == nil || err.Error() != want {
		t.Errorf("error %v, want %s", err, want)
	}
}

func TestParseBuildersRealMissingFile(t *testing.T) {
	ms, err := ParseBuilders("@"+t.TempDir()+"/machines", "x86_64-linux", os.ReadFile)
	if err != nil || ms != nil {
		t.Errorf("ParseBuilders of a missing file = %v, %v; want nothing", ms, err)
	}
}

// TestIncludeNotARegularFile: "@path" naming a FIFO, a device or a directory is an error at
// the include, given at once; a plain read of a FIFO would block the hook forever and one of
// /dev/zero would grow it until it is killed. A missing file still lists no machines.
func TestIncludeNotARegularFile(t *testing.T) {
	dir := t.TempDir()
	fifo := dir + "/machines"
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ path, kind string }{
		{fifo, "a named pipe (FIFO)"},
		{"/dev/zero", "a character device"},
		{dir, "a directory"},
	} {
		done := make(chan error, 1)
		go func() { _, err := ParseBuilders("@"+tc.path, "x86_64-linux", nil); done <- err }()
		select {
		case err := <-done:
			want := "builders:1: @" + tc.path + ": " + tc.path + " is " + tc.kind + ", not a regular file"
			if err == nil || err.Error() != want {
				t.Errorf("@%s: %v, want %q", tc.path, err, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("@%s: ParseBuilders blocks", tc.path)
		}
	}
	if ms, err := ParseBuilders("@"+dir+"/missing", "x86_64-linux", nil); err != nil || len(ms) != 0 {
		t.Errorf("missing include: %v, %v; want no machines and no error, as Nix", ms, err)
	}
}

// TestLoadNotARegularFile: Load refuses a configuration that is not a regular file, or is
// larger than MaxFileSize, before reading it.
func TestLoadNotARegularFile(t *testing.T) {
	big := t.TempDir() + "/offload.toml"
	if err := os.WriteFile(big, make([]byte, MaxFileSize+1), 0o644); err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]string{
		"/dev/zero": "/dev/zero is a character device, not a regular file",
		big:         big + " is larger than 4 MiB",
	} {
		if _, err := Load(path); err == nil || err.Error() != want {
			t.Errorf("Load(%s) = %v, want %q", path, err, want)
		}
	}
}

// TestLoadResolvesRelativePaths: relative ssh-key and known-hosts paths in offload.toml name
// files beside it, whatever the working directory of the process that reads it; absolute
// and "~/" paths stay as written.
func TestLoadResolvesRelativePaths(t *testing.T) {
	dir := t.TempDir()
	path := dir + "/offload.toml"
	text := "[ssh]\nssh-key = \"keys/default\"\nknown-hosts = [\"known_hosts\", \"/etc/ssh/ssh_known_hosts\"]\n" +
		"[[machine]]\nhost = \"b1\"\nsystems = [\"x\"]\n" +
		"[[machine]]\nhost = \"b2\"\nsystems = [\"x\"]\nssh-key = \"~/.ssh/b2\"\nknown-hosts = [\"../kh\"]\n"
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Chdir("/")
	cfg, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	b1, b2 := cfg.Machines[0], cfg.Machines[1]
	if b1.SSHKey != dir+"/keys/default" || strings.Join(b1.KnownHosts, " ") != dir+"/known_hosts /etc/ssh/ssh_known_hosts" {
		t.Errorf("b1: ssh-key %q, known-hosts %q; want them under %s", b1.SSHKey, b1.KnownHosts, dir)
	}
	if b2.SSHKey != "~/.ssh/b2" || strings.Join(b2.KnownHosts, " ") != filepath.Dir(dir)+"/kh" {
		t.Errorf("b2: ssh-key %q, known-hosts %q", b2.SSHKey, b2.KnownHosts)
	}
}
