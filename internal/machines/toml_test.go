package machines

import (
	"errors"
	"io/fs"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

const (
	testKey    = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF2oDs0cMAkhQ6UN3RHSra2R/eBhqizi+HLF1IEq+9Rg"
	testKeyB64 = "c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSUYyb0RzMGNNQWtoUTZVTjNSSFNyYTJSL2VCaHFpemkrSExGMUlFcSs5Umcgcm9vdEBiMQo=" // testKey + " root@b1\n"
)

func TestLoadFull(t *testing.T) {
	cfg, err := Load("testdata/full.toml")
	if err != nil {
		t.Fatal(err)
	}
	known := []string{"/etc/ssh/ssh_known_hosts", "/etc/nix/known_hosts"}
	want := &Config{
		Path:   "testdata/full.toml",
		Daemon: Daemon{Socket: "/run/nix-offload/test.sock", StateDir: "/var/lib/nix-offload-test", Metrics: "127.0.0.1:9464"},
		SSH:    SSH{User: "root", SSHKey: "/etc/nix/offload_ed25519", KnownHosts: known, ConnectTimeout: 5 * time.Second},
		Machines: []Machine{{
			Host:              "builder1.example.org",
			Port:              2222,
			User:              "nix",
			SSHKey:            "/root/.ssh/id_ed25519",
			HostKey:           testKey, // comment dropped
			KnownHosts:        nil,     // known-hosts = [] overrides [ssh]
			ConnectTimeout:    90 * time.Second,
			Systems:           []string{"x86_64-linux", "i686-linux"},
			ParallelBuilds:    8,
			Speed:             2.5,
			Features:          []string{"kvm", "big-parallel"},
			MandatoryFeatures: []string{"benchmark"},
			RemoteStore:       "/mnt/nix",
			Protocol:          ProtocolSSHNG,
			RemoteProgram:     "/nix/var/nix/profiles/default/bin/nix-daemon",
			Enabled:           false,
			Source:            "testdata/full.toml:15",
		}, {
			Host:           "fd00::2",
			User:           "root",
			SSHKey:         "/etc/nix/offload_ed25519",
			KnownHosts:     known,
			ConnectTimeout: 5 * time.Second,
			Systems:        []string{"aarch64-linux"},
			ParallelBuilds: 1,
			Speed:          3,
			Enabled:        true,
			Source:         "testdata/full.toml:34",
		}},
	}
	if d := cmp.Diff(want, cfg); d != "" {
		t.Errorf("Load (-want +got):\n%s", d)
	}
	if err := Validate(cfg.Machines); err != nil {
		t.Errorf("Validate: %v", err)
	}
	if got := cfg.Machines[0].Name(); got != "nix@builder1.example.org:2222" {
		t.Errorf("Name = %q", got)
	}
}

func TestLoadMissing(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "offload.toml"))
	if !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Load of a missing file: %v, want fs.ErrNotExist", err)
	}
}

func TestParseDefaultsAndInheritance(t *testing.T) {
	base := Machine{ConnectTimeout: 10 * time.Second, ParallelBuilds: 1, Speed: 1, Enabled: true,
		Host: "b1", Systems: []string{"x86_64-linux"}, Source: "t.toml:1"}
	with := func(f func(*Machine)) Machine {
		m := base
		f(&m)
		return m
	}
	for _, tc := range []struct {
		name string
		toml string
		want Machine
	}{
		{"defaults", `[[machine]]
host = "b1"
systems = ["x86_64-linux"]`, base},
		{"inherits [ssh]", `[[machine]]
host = "b1"
systems = ["x86_64-linux"]
[ssh]
user = "u"
ssh-key = "/k"
known-hosts = ["/kh"]
connect-timeout = "2s"
server-alive-interval = "4s"`, with(func(m *Machine) {
			m.User, m.SSHKey, m.KnownHosts, m.ConnectTimeout = "u", "/k", []string{"/kh"}, 2*time.Second
			m.ServerAliveInterval = 4 * time.Second
		})},
		{"own values win over [ssh]", `[ssh]
user = "u"
ssh-key = "/k"
connect-timeout = "2s"
[[machine]]
host = "b1"
systems = ["x86_64-linux"]
user = "v"
ssh-key = "/l"
connect-timeout = "3s"
server-alive-interval = "1s"`, with(func(m *Machine) {
			m.User, m.SSHKey, m.ConnectTimeout, m.Source = "v", "/l", 3*time.Second, "t.toml:5"
			m.ServerAliveInterval = time.Second
		})},
		{"empty string still overrides [ssh]", `[ssh]
user = "u"
[[machine]]
host = "b1"
systems = ["x86_64-linux"]
user = ""`, with(func(m *Machine) { m.Source = "t.toml:3" })},
		{"dotted keys and inline tables", `ssh.user = "u"
machine = [ { host = "b1", systems = ["x86_64-linux"], speed = 0.5 } ]`, with(func(m *Machine) {
			m.User, m.Speed, m.Source = "u", 0.5, "t.toml:2"
		})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := Parse("t.toml", []byte(tc.toml))
			if err != nil {
				t.Fatal(err)
			}
			if len(cfg.Machines) != 1 {
				t.Fatalf("got %d machines", len(cfg.Machines))
			}
			if d := cmp.Diff(tc.want, cfg.Machines[0]); d != "" {
				t.Errorf("(-want +got):\n%s", d)
			}
		})
	}
}

func TestParseEmpty(t *testing.T) {
	for _, in := range []string{"", "# nothing\n", "[daemon]\n[ssh]\n", "machine = []\n"} {
		cfg, err := Parse("t.toml", []byte(in))
		if err != nil {
			t.Errorf("Parse(%q): %v", in, err)
			continue
		}
		want := &Config{Path: "t.toml", Daemon: Daemon{Socket: DefaultSocket, StateDir: DefaultStateDir},
			SSH: SSH{ConnectTimeout: DefaultConnectTimeout}}
		if d := cmp.Diff(want, cfg); d != "" {
			t.Errorf("Parse(%q) (-want +got):\n%s", in, d)
		}
	}
}

func TestParseInlineFile(t *testing.T) {
	cfg, err := Load("testdata/inline.toml")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Daemon.Metrics != ":9464" || cfg.SSH.User != "root" || cfg.SSH.ConnectTimeout != 3*time.Second {
		t.Errorf("daemon/ssh = %+v %+v", cfg.Daemon, cfg.SSH)
	}
	var got []string
	for _, m := range cfg.Machines {
		got = append(got, m.Name()+" "+m.Source+" "+strings.Join(m.Systems, ","))
	}
	want := []string{"root@b1 testdata/inline.toml:6 x86_64-linux", "root@b2 testdata/inline.toml:7 aarch64-linux"}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("(-want +got):\n%s", d)
	}
}

// machine is a valid [[machine]] table for building error cases.
const machine = "[[machine]]\nhost = \"b1\"\nsystems = [\"x86_64-linux\"]\n"

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct {
		name, toml string
		want       string // the whole error text
	}{
		// Unknown keys, with and without suggestions.
		{"unknown key in second machine", machine + `
[[machine]]
host = "b2"
systems = ["x86_64-linux"]
paralel-builds = 2
`, `offload.toml:8: machine[2]: unknown key "paralel-builds" (did you mean "parallel-builds"?)`},
		{"unknown key, swapped letters", machine + "sytsems = []\n",
			`offload.toml:4: machine[1]: unknown key "sytsems" (did you mean "systems"?)`},
		{"unknown key, Nix name", machine + "maxJobs = 4\nspeedFactor = 2\n",
			"offload.toml:4: machine[1]: unknown key \"maxJobs\" (did you mean \"parallel-builds\"?)\n" +
				`offload.toml:5: machine[1]: unknown key "speedFactor" (did you mean "speed"?)`},
		{"unknown key, other case", machine + "SSH_Key = \"/k\"\n",
			`offload.toml:4: machine[1]: unknown key "SSH_Key" (did you mean "ssh-key"?)`},
		{"unknown key, nothing close", machine + "colour = \"blue\"\n",
			`offload.toml:4: machine[1]: unknown key "colour"`},
		{"key in the wrong table", "[ssh]\nsocket = \"/s\"\nparallel-builds = 2\n",
			"offload.toml:2: ssh: unknown key \"socket\" (it belongs in [daemon])\n" +
				`offload.toml:3: ssh: unknown key "parallel-builds" (it belongs in [[machine]])`},
		{"unknown top-level table", "[machines]\nhost = \"b1\"\n",
			`offload.toml:1: unknown key "machines" (did you mean "machine"?)`},
		{"unknown top-level key", "host = \"b1\"\n",
			`offload.toml:1: unknown key "host" (it belongs in [[machine]])`},
		{"unknown key in daemon", "[daemon]\nsockt = \"/s\"\n",
			`offload.toml:2: daemon: unknown key "sockt" (did you mean "socket"?)`},
		{"unknown key in inline table", "machine = [\n  { host = \"b1\", systems = [\"x86_64-linux\"] },\n  { host = \"b2\", systems = [\"x86_64-linux\"],\n    sped = 2 },\n]\n",
			`offload.toml:4: machine[2]: unknown key "sped" (did you mean "speed"?)`},
		{"unknown sub-table of the second machine", machine + "[[machine]]\nhost = \"b2\"\nsystems = [\"x\"]\n[machine.extra]\nx = 1\n[[machine.more]]\n",
			"offload.toml:7: machine[2]: unknown key \"extra\"\n" +
				`offload.toml:9: machine[2]: unknown key "more"`},
		{"unknown key in a multi-line inline table", "machine = [{\n  host = \"b1\",\n  systems = [\"x\"],\n  colour = 1,\n}]\n",
			`offload.toml:4: machine[1]: unknown key "colour"`},
		{"unknown dotted key", machine + "ssh.user = \"u\"\n",
			`offload.toml:4: machine[1]: unknown key "ssh" ([ssh] is a table of its own)`},

		// Types.
		{"port as string", machine + "port = \"22\"\n",
			`offload.toml:4: machine[1].port: must be an integer, got string "22"`},
		{"parallel-builds as float", machine + "parallel-builds = 4.0\n",
			`offload.toml:4: machine[1].parallel-builds: must be an integer, got float 4 (write 4)`},
		{"speed as string", machine + "speed = \"fast\"\n",
			`offload.toml:4: machine[1].speed: must be a number, got string "fast"`},
		{"enabled as string", machine + "enabled = \"yes\"\n",
			`offload.toml:4: machine[1].enabled: must be true or false, got string "yes"`},
		{"systems as string", "[[machine]]\nhost = \"b1\"\nsystems = \"x86_64-linux\"\n",
			`offload.toml:3: machine[1].systems: must be an array of strings, got string "x86_64-linux" (write ["x86_64-linux"])`},
		{"systems item not a string", "[[machine]]\nhost = \"b1\"\nsystems = [\"x86_64-linux\", 1]\n",
			`offload.toml:3: machine[1].systems[2]: must be a string, got integer 1`},
		{"host as dotted table", "[[machine]]\nhost.name = \"b1\"\nsystems = [\"x86_64-linux\"]\n",
			`offload.toml:2: machine[1].host: must be a string, got a table`},
		{"connect-timeout as integer", "[ssh]\nconnect-timeout = 10\n",
			`offload.toml:2: ssh.connect-timeout: must be a duration string such as "10s" or "1m30s", got integer 10 (write "10s")`},
		{"known-hosts as string", "[ssh]\nknown-hosts = \"/etc/ssh/ssh_known_hosts\"\n",
			`offload.toml:2: ssh.known-hosts: must be an array of strings, got string "/etc/ssh/ssh_known_hosts" (write ["/etc/ssh/ssh_known_hosts"])`},
		{"single [machine] table", "[machine]\nhost = \"b1\"\nsystems = [\"x86_64-linux\"]\n",
			`offload.toml:1: machine: must be an array of tables: write [[machine]] (two brackets) for each machine`},
		{"machine array of numbers", "machine = [1]\n",
			`offload.toml:1: machine[1]: must be a table ([[machine]]), got integer 1`},
		{"ssh not a table", "ssh = \"root\"\n",
			`offload.toml:1: ssh: must be a table ([ssh]), got string "root"`},

		// Values.
		{"parallel-builds 0", machine + "\n[[machine]]\nhost = \"b2\"\nsystems = [\"x86_64-linux\"]\nparallel-builds = 0\n",
			`offload.toml:8: machine[2].parallel-builds: must be at least 1, got 0`},
		{"parallel-builds huge", machine + "parallel-builds = 100000\n",
			`offload.toml:4: machine[1].parallel-builds: must be at most 1024, got 100000`},
		{"port 0", machine + "port = 0\n", `offload.toml:4: machine[1].port: must be between 1 and 65535, got 0`},
		{"port too big", machine + "port = 65536\n", `offload.toml:4: machine[1].port: must be between 1 and 65535, got 65536`},
		{"speed 0", machine + "speed = 0\n", `offload.toml:4: machine[1].speed: must be greater than 0, got 0`},
		{"speed negative", machine + "speed = -1.5\n", `offload.toml:4: machine[1].speed: must be greater than 0, got -1.5`},
		{"speed nan", machine + "speed = nan\n", `offload.toml:4: machine[1].speed: must be a finite number, got NaN`},
		{"speed inf", machine + "speed = inf\n", `offload.toml:4: machine[1].speed: must be a finite number, got +Inf`},
		{"empty systems", "[[machine]]\nhost = \"b1\"\nsystems = []\n",
			`offload.toml:3: machine[1].systems: must not be empty; list the systems this machine builds for, e.g. ["x86_64-linux"]`},
		{"systems item with comma", "[[machine]]\nhost = \"b1\"\nsystems = [\"x86_64-linux,i686-linux\"]\n",
			`offload.toml:3: machine[1].systems[1]: "x86_64-linux,i686-linux" must not contain commas, spaces or control characters; write one name per list item`},
		{"empty feature", machine + "features = [\"kvm\", \"\"]\n",
			`offload.toml:4: machine[1].features[2]: must not be empty`},
		{"missing host and systems", "[[machine]]\nport = 22\n",
			"offload.toml:1: machine[1]: missing required key \"host\"\n" +
				`offload.toml:1: machine[1]: missing required key "systems"`},
		{"empty host", "[[machine]]\nhost = \"\"\nsystems = [\"x86_64-linux\"]\n",
			`offload.toml:2: machine[1].host: must not be empty`},
		{"host with user", "[[machine]]\nhost = \"root@b1\"\nsystems = [\"x86_64-linux\"]\n",
			`offload.toml:2: machine[1].host: "root@b1" contains '@'; give the user separately`},
		{"host with port", "[[machine]]\nhost = \"b1:22\"\nsystems = [\"x86_64-linux\"]\n",
			`offload.toml:2: machine[1].host: "b1:22" contains ':'; give the port separately`},
		{"host as URL", "[[machine]]\nhost = \"ssh://b1\"\nsystems = [\"x86_64-linux\"]\n",
			`offload.toml:2: machine[1].host: "ssh://b1" is a URL; give the bare host name, and the port and user separately`},
		{"host-key garbage", machine + "host-key = \"ssh-ed25519 nope\"\n",
			`offload.toml:4: machine[1].host-key: must be a public key line such as "ssh-ed25519 AAAA…" (the host's /etc/ssh/ssh_host_ed25519_key.pub): ssh: no key found; last parsing error for ignored line: ssh: short read`},
		{"host-key in known_hosts form", machine + "host-key = \"b1.example.org " + testKey + "\"\n",
			`offload.toml:4: machine[1].host-key: must be a public key line such as "ssh-ed25519 AAAA…", without the "b1.example.org" in front (known_hosts host names or authorized_keys options)`},
		{"connect-timeout unparsable", machine + "connect-timeout = \"ten\"\n",
			`offload.toml:4: machine[1].connect-timeout: "ten" is not a duration; write e.g. "10s" or "1m30s"`},
		{"connect-timeout negative", machine + "connect-timeout = \"-1s\"\n",
			`offload.toml:4: machine[1].connect-timeout: must not be negative, got "-1s"`},
		{"connect-timeout zero", "[ssh]\nconnect-timeout = \"0s\"\n",
			`offload.toml:2: ssh.connect-timeout: must be greater than 0, got "0s"`},
		{"server-alive-interval zero", machine + "server-alive-interval = \"0s\"\n",
			`offload.toml:4: machine[1].server-alive-interval: must be greater than 0, got "0s"`},
		{"server-alive-interval as integer", "[ssh]\nserver-alive-interval = 5\n",
			`offload.toml:2: ssh.server-alive-interval: must be a duration string such as "10s" or "1m30s", got integer 5 (write "5s")`},
		{"socket relative", "[daemon]\nsocket = \"hook.sock\"\n",
			`offload.toml:2: daemon.socket: must be an absolute path, got "hook.sock"`},
		{"metrics without port", "[daemon]\nmetrics = \"127.0.0.1\"\n",
			`offload.toml:2: daemon.metrics: must be host:port such as "127.0.0.1:9464", or "" for off, got "127.0.0.1"`},
		{"duplicate machines", machine + "\n[[machine]]\nhost = \"b2\"\nsystems = [\"x86_64-linux\"]\n\n" + machine,
			`offload.toml:10: machine[3].host: duplicate machine "b1"; machine[1] at line 2 has the same user, host and port`},

		// Syntax errors stop at the first one and carry the decoder's position.
		{"syntax: unterminated string", "[[machine]]\nhost = \"b1\nsystems = []\n",
			`offload.toml:2: strings cannot contain newlines`},
		{"syntax: duplicate key", "[[machine]]\nhost = \"b1\"\nhost = \"b2\"\n",
			`offload.toml:3: key 'machine.host' has already been defined`},

		// Everything at once, sorted by line.
		{"several errors", `[daemon]
sockt = "/s"

[[machine]]
host = "b1"
systems = []
speed = 0

[[machine]]
host = "b2"
systems = ["x86_64-linux"]
port = 0
parallel-builds = 0
`, "offload.toml:2: daemon: unknown key \"sockt\" (did you mean \"socket\"?)\n" +
			"offload.toml:6: machine[1].systems: must not be empty; list the systems this machine builds for, e.g. [\"x86_64-linux\"]\n" +
			"offload.toml:7: machine[1].speed: must be greater than 0, got 0\n" +
			"offload.toml:12: machine[2].port: must be between 1 and 65535, got 0\n" +
			"offload.toml:13: machine[2].parallel-builds: must be at least 1, got 0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := Parse("offload.toml", []byte(tc.toml))
			if err == nil {
				t.Fatalf("no error; config %+v", cfg)
			}
			if cfg != nil {
				t.Errorf("config %+v returned with an error", cfg)
			}
			if got := err.Error(); got != tc.want {
				t.Errorf("error:\n%s\nwant:\n%s", got, tc.want)
			}
			var e *Error
			if !errors.As(err, &e) || e.File != "offload.toml" {
				t.Errorf("errors.As(*Error) = %v, %+v", errors.As(err, &e), e)
			}
		})
	}
}

// The key index must not be fooled by strings and comments that look like TOML.
func TestParseLinesPastTrickyText(t *testing.T) {
	in := `# [[machine]] in a comment
[daemon]
socket = """
[[machine]]
parallel-builds = 0
"""
state-dir = '''/var/lib/x''' # ] "

[[machine]]
host = "b1" # host = "b2"
systems = [
  "x86_64-linux", # ]
  'i686-linux',
  "",
]
"quoted key" = 1
'speed' = 0
`
	_, err := Parse("t.toml", []byte(in))
	want := "t.toml:3: daemon.socket: must be an absolute path, got \"[[machine]]\\nparallel-builds = 0\\n\"\n" +
		"t.toml:14: machine[1].systems[3]: must not be empty\n" +
		"t.toml:16: machine[1]: unknown key \"quoted key\"\n" +
		"t.toml:17: machine[1].speed: must be greater than 0, got 0"
	if err == nil || err.Error() != want {
		t.Errorf("error:\n%v\nwant:\n%s", err, want)
	}
}

func TestIndexKeys(t *testing.T) {
	in := `a = 1
[t]
b.c = { d = 2, e = [ { f = 3 },
  { f = 4 } ] }
[[arr]]
x = 1
[[arr]]
x = 2
[arr.sub]
y = 3
[[arr.list]]
z = 4
"q.k" = 5
`
	got := indexKeys(in)
	for path, line := range map[string]int{
		"a":              1,
		"t":              2,
		"t.b":            3,
		"t.b.c":          3,
		"t.b.c.d":        3,
		"t.b.c.e":        3,
		"t.b.c.e#1":      3,
		"t.b.c.e#1.f":    3,
		"t.b.c.e#2":      4,
		"t.b.c.e#2.f":    4,
		"arr":            5,
		"arr#1":          5,
		"arr#1.x":        6,
		"arr#2":          7,
		"arr#2.x":        8,
		"arr#2.sub":      9,
		"arr#2.sub.y":    10,
		"arr#2.list":     11,
		"arr#2.list#1":   11,
		"arr#2.list#1.z": 12,
	} {
		segs := strings.Split(path, ".")
		var key []string
		for _, s := range segs {
			name, n, isElem := strings.Cut(s, "#")
			key = append(key, name)
			if isElem {
				key = append(key, elemMark+n)
			}
		}
		if g, ok := got[pathKey(key)]; !ok || g != line {
			t.Errorf("%s: line %d, %v; want %d", path, g, ok, line)
		}
	}
	if g := got[pathKey([]string{"arr", elemSeg(2), "list", elemSeg(1), "q.k"})]; g != 13 {
		t.Errorf(`quoted "q.k": line %d, want 13`, g)
	}
}

func TestSuggest(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"paralel-builds", "parallel-builds"},
		{"parallel_builds", "parallel-builds"},
		{"ParallelBuilds", "parallel-builds"},
		{"hots", "host"},
		{"hostName", "host"},
		{"sshUser", "user"},
		{"publicHostKey", "host-key"},
		{"supportedFeatures", "features"},
		{"mandatoryFeatures", "mandatory-features"},
		{"system", "systems"},
		{"knownhosts", "known-hosts"},
		{"xyz", ""},
		{"colour", ""},
		{strings.Repeat("a", 1000), ""},
	} {
		if got := suggest(tc.in, machineKeys); got != tc.want {
			t.Errorf("suggest(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestEditDistance(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want int
	}{
		{"", "", 0}, {"a", "", 1}, {"", "ab", 2}, {"host", "host", 0}, {"host", "hots", 1},
		{"kitten", "sitting", 3}, {"ca", "abc", 3}, {"paralel", "parallel", 1},
	} {
		if got := editDistance(tc.a, tc.b); got != tc.want {
			t.Errorf("editDistance(%q, %q) = %d, want %d", tc.a, tc.b, got, tc.want)
		}
	}
}

// Escapes, quote runs, numbers and date-times that a naive line scanner would get wrong.
func TestParseLinesPastTrickyValues(t *testing.T) {
	in := "[[machine]]\n" +
		"remote-store = \"\"\"a \\\"\"\" [x]\nb = 1\\\n\"\"\"\n" + // lines 2–4
		"ssh-key = 'C:\\x'\n" + // 5
		"\"a\\\"b\" = 1979-05-27 07:32:00\n" + // 6
		"port = 0xff_ff_ff\n" + // 7
		"features = [[1,2],[\"x\"]]\n" + // 8
		"speed = -inf\n" + // 9
		"host = \"b1\"\nsystems = [\"x\"]\n" + // 10, 11
		"user = \"\"\"\"\"\"\"\"\n" + // 12: a multi-line string holding two quotes
		"enabled = 1\n" // 13
	want := `t:6: machine[1]: unknown key "a\"b"
t:7: machine[1].port: must be between 1 and 65535, got 16777215
t:8: machine[1].features[1]: must be a string, got an array
t:8: machine[1].features[2]: must be a string, got an array
t:9: machine[1].speed: must be a finite number, got -Inf
t:12: machine[1].user: "\"\"" may only hold letters, digits, '.', '_' and '-'
t:13: machine[1].enabled: must be true or false, got integer 1`
	_, err := Parse("t", []byte(in))
	if err == nil || err.Error() != want {
		t.Errorf("error:\n%v\nwant:\n%s", err, want)
	}
}

func TestParseMinFreeSpaceAndMaxLoad(t *testing.T) {
	cfg, err := Parse("offload.toml", []byte(`
[[machine]]
host = "b1"
systems = ["x86_64-linux"]
min-free-space = "10G"
max-load = 1.5

[[machine]]
host = "b2"
systems = ["x86_64-linux"]
min-free-space = 4096
`))
	if err != nil {
		t.Fatal(err)
	}
	if m := cfg.Machines[0]; m.MinFreeSpace != 10<<30 || m.MaxLoad != 1.5 {
		t.Errorf("b1: min-free-space %d, max-load %v; want %d, 1.5", m.MinFreeSpace, m.MaxLoad, uint64(10<<30))
	}
	if m := cfg.Machines[1]; m.MinFreeSpace != 4096 || m.MaxLoad != 0 {
		t.Errorf("b2: min-free-space %d, max-load %v; want 4096, 0", m.MinFreeSpace, m.MaxLoad)
	}

	_, err = Parse("offload.toml", []byte(`
[[machine]]
host = "b1"
systems = ["x86_64-linux"]
min-free-space = "ten gigs"
max-load = -1
`))
	for _, want := range []string{
		`offload.toml:5: machine[1].min-free-space: must be a size such as "10G"`,
		`offload.toml:6: machine[1].max-load: must be 0 (no limit) or more, got -1`,
	} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v\nlacks %q", err, want)
		}
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]uint64{"10G": 10 << 30, "512M": 512 << 20, "1.5K": 1536, "4096": 4096, "2GiB": 2 << 30, "1t": 1 << 40, "7 MB": 7 << 20} {
		if got, msg := ParseSize(in); msg != "" || got != want {
			t.Errorf("ParseSize(%q) = %d, %q; want %d", in, got, msg, want)
		}
	}
	for _, in := range []string{"", "G", "10X", "-1G", "1e400", "NaN"} {
		if _, msg := ParseSize(in); msg == "" {
			t.Errorf("ParseSize(%q) accepted", in)
		}
	}
}

func TestFormatSize(t *testing.T) {
	for n, want := range map[uint64]string{0: "0 B", 1023: "1023 B", 1024: "1 KiB", 10 << 30: "10 GiB", 8697308774: "8.1 GiB", 1536 << 20: "1.5 GiB"} {
		if got := FormatSize(n); got != want {
			t.Errorf("FormatSize(%d) = %q, want %q", n, got, want)
		}
	}
}
