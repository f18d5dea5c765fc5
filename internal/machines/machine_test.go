package machines

import (
	"errors"
	"math"
	"testing"
	"time"
)

func TestName(t *testing.T) {
	for _, tc := range []struct {
		m    Machine
		want string
	}{
		{Machine{Host: "b1"}, "b1"},
		{Machine{Host: "b1", User: "root"}, "root@b1"},
		{Machine{Host: "b1", Port: 2222}, "b1:2222"},
		{Machine{Host: "b1", Port: 22, User: "nix"}, "nix@b1:22"},
		{Machine{Host: "fd00::1"}, "fd00::1"},
		{Machine{Host: "fd00::1", Port: 22, User: "nix"}, "nix@[fd00::1]:22"},
	} {
		if got := tc.m.Name(); got != tc.want {
			t.Errorf("%+v.Name() = %q, want %q", tc.m, got, tc.want)
		}
	}
}

func TestErrorString(t *testing.T) {
	for _, tc := range []struct {
		e    Error
		want string
	}{
		{Error{File: "offload.toml", Line: 12, Key: "machine[1]", Msg: "m"}, "offload.toml:12: machine[1]: m"},
		{Error{File: "offload.toml", Line: 12, Msg: "m"}, "offload.toml:12: m"},
		{Error{File: "offload.toml", Key: "k", Msg: "m"}, "offload.toml: k: m"},
		{Error{Line: 3, Msg: "m"}, "line 3: m"},
		{Error{Key: "k", Msg: "m"}, "k: m"},
		{Error{Msg: "m"}, "m"},
	} {
		if got := tc.e.Error(); got != tc.want {
			t.Errorf("%+v: %q, want %q", tc.e, got, tc.want)
		}
	}
}

func good(host string) Machine {
	return Machine{Host: host, Systems: []string{"x86_64-linux"}, ParallelBuilds: 1, Speed: 1,
		ConnectTimeout: time.Second, Enabled: true}
}

func TestValidate(t *testing.T) {
	with := func(f func(*Machine)) []Machine {
		m := good("b1")
		m.Source = "offload.toml:7"
		f(&m)
		return []Machine{m}
	}
	for _, tc := range []struct {
		name string
		ms   []Machine
		want string // "" = valid
	}{
		{"empty list", nil, ""},
		{"good", []Machine{good("b1"), good("b2"), good("fd00::1")}, ""},
		{"same host, other port", func() []Machine {
			a, b := good("b1"), good("b1")
			b.Port = 2222
			return []Machine{a, b}
		}(), ""},
		{"zero timeout means default", with(func(m *Machine) { m.ConnectTimeout = 0 }), ""},
		{"host key", with(func(m *Machine) { m.HostKey = testKey }), ""},
		{"no host", with(func(m *Machine) { m.Host = "" }), "offload.toml:7: machine[1].host: must not be empty"},
		{"bad port", with(func(m *Machine) { m.Port = 70000 }), "offload.toml:7: machine[1].port: must be between 1 and 65535, got 70000"},
		{"no systems", with(func(m *Machine) { m.Systems = nil }), "offload.toml:7: machine[1].systems: " + msgNoSystems},
		{"empty system", with(func(m *Machine) { m.Systems = []string{""} }), "offload.toml:7: machine[1].systems[1]: must not be empty"},
		{"bad feature", with(func(m *Machine) { m.MandatoryFeatures = []string{"a b"} }),
			`offload.toml:7: machine[1].mandatory-features[1]: "a b" must not contain commas, spaces or control characters; write one name per list item`},
		{"zero slots", with(func(m *Machine) { m.ParallelBuilds = 0 }), "offload.toml:7: machine[1].parallel-builds: must be at least 1, got 0"},
		{"zero speed", with(func(m *Machine) { m.Speed = 0 }), "offload.toml:7: machine[1].speed: must be greater than 0, got 0"},
		{"NaN speed", with(func(m *Machine) { m.Speed = math.NaN() }), "offload.toml:7: machine[1].speed: must be a finite number, got NaN"},
		{"negative timeout", with(func(m *Machine) { m.ConnectTimeout = -time.Second }), "offload.toml:7: machine[1].connect-timeout: must not be negative, got -1s"},
		{"negative keepalive", with(func(m *Machine) { m.ServerAliveInterval = -time.Second }), "offload.toml:7: machine[1].server-alive-interval: must not be negative, got -1s"},
		{"bad host key", with(func(m *Machine) { m.HostKey = "ssh-ed25519" }),
			`offload.toml:7: machine[1].host-key: must be a public key line such as "ssh-ed25519 AAAA…" (the host's /etc/ssh/ssh_host_ed25519_key.pub): ssh: no key found`},
		{"two host keys", with(func(m *Machine) { m.HostKey = testKey + "\n" + testKey }),
			"offload.toml:7: machine[1].host-key: must be a single line holding one public key"},
		{"duplicates", func() []Machine {
			a, b, c := good("b1"), good("b2"), good("b1")
			a.Source, c.Source = "builders:1", "/etc/nix/machines:4"
			return []Machine{a, b, c}
		}(), `/etc/nix/machines:4: machine[3].host: duplicate machine "b1"; machine[1] (at builders:1) has the same user, host and port`},
		{"no source", []Machine{good("b1"), good("")}, "machine[2].host: must not be empty"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := Validate(tc.ms)
			switch {
			case err == nil && tc.want != "":
				t.Errorf("no error, want %q", tc.want)
			case err != nil && err.Error() != tc.want:
				t.Errorf("error:\n%v\nwant:\n%s", err, tc.want)
			}
		})
	}
}

func TestValidateReportsAll(t *testing.T) {
	a, b := good("b1"), good("b2")
	a.Speed, b.ParallelBuilds = -1, 0
	err := Validate([]Machine{a, b})
	want := "machine[1].speed: must be greater than 0, got -1\nmachine[2].parallel-builds: must be at least 1, got 0"
	if err == nil || err.Error() != want {
		t.Fatalf("error:\n%v\nwant:\n%s", err, want)
	}
	var e *Error
	if !errors.As(err, &e) || e.Key != "machine[1].speed" {
		t.Errorf("errors.As: first error %+v", e)
	}
}

func TestSplitSource(t *testing.T) {
	for _, tc := range []struct {
		in   string
		file string
		line int
	}{
		{"builders:2", "builders", 2},
		{"/etc/nix/offload.toml:14", "/etc/nix/offload.toml", 14},
		{"c:/x", "c:/x", 0},
		{"plain", "plain", 0},
		{"", "", 0},
	} {
		if f, l := splitSource(tc.in); f != tc.file || l != tc.line {
			t.Errorf("splitSource(%q) = %q, %d", tc.in, f, l)
		}
	}
}
