package machines

import (
	"net/url"
	"strings"
	"testing"
)

// The checklist of configuration mistakes, in both formats where the concept exists. Each
// case gives the whole error text, and every *Error it is made of must carry the file, a line
// inside the file, and the key: in Key, or (for an unknown key and for the decoder's own
// syntax errors) named in the message.

// pastedKey is what a private key looks like when pasted where its path belongs; its body must
// never be echoed.
const pastedKeyBody = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW"

const pastedKey = "-----BEGIN OPENSSH PRIVATE KEY-----\n" + pastedKeyBody + "\n-----END OPENSSH PRIVATE KEY-----\n"

// checkLocated fails unless every error in err has File, a Line within the text's lines, and
// names key (in Key or in the message).
func checkLocated(t *testing.T, err error, file, text, key string) {
	t.Helper()
	lines := strings.Count(text, "\n") + 1
	for _, e := range allErrors(t, err) {
		if e.File != file || e.Line < 1 || e.Line > lines {
			t.Errorf("error %q is located at %q line %d, want %s and a line in 1..%d", e, e.File, e.Line, file, lines)
		}
		if key != "" && !strings.Contains(e.Key, key) && !strings.Contains(e.Msg, key) {
			t.Errorf("error %q names neither in Key (%q) nor in its message the key %q", e, e.Key, key)
		}
	}
}

func TestConfigMistakesTOML(t *testing.T) {
	two := func(second string) string { return machine + "\n[[machine]]\n" + second }
	for _, tc := range []struct {
		name, toml, key, want string
	}{
		// Misspelt keys: an error with a suggestion, never a key silently ignored.
		{"misspelt key", machine + "sytems = [\"aarch64-linux\"]\n", "sytems",
			`offload.toml:4: machine[1]: unknown key "sytems" (did you mean "systems"?)`},
		{"misspelt table", "[deamon]\nsocket = \"/run/s\"\n", "deamon",
			`offload.toml:1: unknown key "deamon" (did you mean "daemon"?)`},
		{"misspelt key in [ssh]", "[ssh]\nknown_hosts = [\"/etc/kh\"]\n", "known_hosts",
			`offload.toml:2: ssh: unknown key "known_hosts" (did you mean "known-hosts"?)`},

		// Wrong types.
		{"string for an integer", machine + "parallel-builds = \"4\"\n", "parallel-builds",
			`offload.toml:4: machine[1].parallel-builds: must be an integer, got string "4"`},
		{"integer for a list", "[[machine]]\nhost = \"b1\"\nsystems = 1\n", "systems",
			`offload.toml:3: machine[1].systems: must be an array of strings, got integer 1`},
		{"list of lists", "[[machine]]\nhost = \"b1\"\nsystems = [[\"x86_64-linux\"]]\n", "systems",
			`offload.toml:3: machine[1].systems[1]: must be a string, got an array`},
		{"integer for a string", "[[machine]]\nhost = 1\nsystems = [\"x86_64-linux\"]\n", "host",
			`offload.toml:2: machine[1].host: must be a string, got integer 1`},
		{"float for a port", machine + "port = 22.5\n", "port",
			`offload.toml:4: machine[1].port: must be an integer, got float 22.5`},
		{"integer for a boolean", machine + "enabled = 1\n", "enabled",
			`offload.toml:4: machine[1].enabled: must be true or false, got integer 1`},
		{"unknown protocol", machine + "protocol = \"ssh-ng2\"\n", "protocol",
			`offload.toml:4: machine[1].protocol: "ssh-ng2" is not a protocol; use "ssh" (nix-store --serve) or "ssh-ng" (nix-daemon --stdio)`},
		{"empty protocol", machine + "protocol = \"\"\n", "protocol",
			`offload.toml:4: machine[1].protocol: "" is not a protocol; use "ssh" (nix-store --serve) or "ssh-ng" (nix-daemon --stdio)`},
		{"empty remote-program", machine + "remote-program = \" \"\n", "remote-program",
			`offload.toml:4: machine[1].remote-program: is empty; leave it out for the default, or give the path of nix-store (ssh) or nix-daemon (ssh-ng)`},
		{"list for a remote-program", machine + "remote-program = [\"nix-store\"]\n", "remote-program",
			`offload.toml:4: machine[1].remote-program: must be a string, got an array`},
		{"integer for a host key", machine + "host-key = 1\n", "host-key",
			`offload.toml:4: machine[1].host-key: must be a string, got integer 1`},
		{"string for a table", "daemon = \"/run/s\"\n", "daemon",
			`offload.toml:1: daemon: must be a table ([daemon]), got string "/run/s"`},

		// Slots and speed.
		{"negative parallel-builds", machine + "parallel-builds = -1\n", "parallel-builds",
			`offload.toml:4: machine[1].parallel-builds: must be at least 1, got -1`},
		{"zero parallel-builds", machine + "parallel-builds = 0\n", "parallel-builds",
			`offload.toml:4: machine[1].parallel-builds: must be at least 1, got 0`},
		{"negative speed", machine + "speed = -2\n", "speed",
			`offload.toml:4: machine[1].speed: must be greater than 0, got -2`},
		{"zero speed", machine + "speed = 0.0\n", "speed",
			`offload.toml:4: machine[1].speed: must be greater than 0, got 0`},
		{"negative zero speed", machine + "speed = -0.0\n", "speed",
			`offload.toml:4: machine[1].speed: must be greater than 0, got -0`},
		{"speed that rounds to zero", machine + "speed = 1e-400\n", "speed",
			`offload.toml:4: machine[1].speed: must be greater than 0, got 0`},
		{"NaN speed", machine + "speed = nan\n", "speed",
			`offload.toml:4: machine[1].speed: must be a finite number, got NaN`},

		// Duplicate machines: the error names both lines.
		{"duplicate host, port and user", two("host = \"b1\"\nsystems = [\"aarch64-linux\"]\n") +
			"\n[[machine]]\nhost = \"b2\"\nsystems = [\"x86_64-linux\"]\nport = 2222\nuser = \"nix\"\n" +
			"\n[[machine]]\nhost = \"b2\"\nport = 2222\nuser = \"nix\"\nsystems = [\"x86_64-linux\"]\n", "host",
			"offload.toml:6: machine[2].host: duplicate machine \"b1\"; machine[1] at line 2 has the same user, host and port\n" +
				`offload.toml:16: machine[4].host: duplicate machine "nix@b2:2222"; machine[3] at line 10 has the same user, host and port`},
		{"duplicate through [ssh] user", "[ssh]\nuser = \"root\"\n" + machine + "[[machine]]\nhost = \"b1\"\nuser = \"root\"\nsystems = [\"x\"]\n", "host",
			`offload.toml:7: machine[2].host: duplicate machine "root@b1"; machine[1] at line 4 has the same user, host and port`},
		{"duplicate in another case", two("host = \"B1\"\nsystems = [\"x86_64-linux\"]\n"), "host",
			`offload.toml:6: machine[2].host: duplicate machine "B1"; machine[1] at line 2 has the same user, host and port`},
		{"duplicate inline tables", "machine = [\n  { host = \"b1\", systems = [\"x\"] },\n  { host = \"b1\", systems = [\"y\"] },\n]\n", "host",
			`offload.toml:3: machine[2].host: duplicate machine "b1"; machine[1] at line 2 has the same user, host and port`},

		// Empty systems, unknown sections, duplicate keys.
		{"empty systems", "[[machine]]\nhost = \"b1\"\nsystems = []\n", "systems",
			`offload.toml:3: machine[1].systems: ` + msgNoSystems},
		{"unknown section", "[nix]\nbuilders = \"@/etc/nix/machines\"\n", "nix",
			`offload.toml:1: unknown key "nix"`},
		{"unknown sub-table", machine + "[machine.options]\nx = 1\n", "options",
			`offload.toml:4: machine[1]: unknown key "options"`},
		{"duplicate key", "[ssh]\nuser = \"a\"\nuser = \"b\"\n", "ssh.user",
			`offload.toml:3: key 'ssh.user' has already been defined`},
		{"duplicate table", "[daemon]\n[ssh]\n[daemon]\n", "daemon",
			`offload.toml:3: key 'daemon' has already been defined`},

		// Found by FuzzParse: the decoder's line 0, and a table with an empty name.
		{"backslash in the last quoted key", "\"\\", "",
			`offload.toml:1: invalid escape in string '\\x00'`},
		{"empty table name", "[daemon]\n[\"\"]\n", `""`,
			`offload.toml:2: unknown key ""`},

		// Durations.
		{"duration without unit", machine + "connect-timeout = \"10\"\n", "connect-timeout",
			`offload.toml:4: machine[1].connect-timeout: "10" is not a duration; write e.g. "10s" or "1m30s"`},
		{"empty duration", "[ssh]\nconnect-timeout = \"\"\n", "connect-timeout",
			`offload.toml:2: ssh.connect-timeout: "" is not a duration; write e.g. "10s" or "1m30s"`},
		{"duration as a float", machine + "connect-timeout = 1.5\n", "connect-timeout",
			`offload.toml:4: machine[1].connect-timeout: must be a duration string such as "10s" or "1m30s", got float 1.5`},
		{"negative duration", "[ssh]\nconnect-timeout = \"-5s\"\n", "connect-timeout",
			`offload.toml:2: ssh.connect-timeout: must not be negative, got "-5s"`},
		{"duration below the floor", machine + "connect-timeout = \"1ns\"\n", "connect-timeout",
			`offload.toml:4: machine[1].connect-timeout: must be at least 1s, got "1ns"`},
		{"keepalive below the floor", "[ssh]\nserver-alive-interval = \"100ms\"\n", "server-alive-interval",
			`offload.toml:2: ssh.server-alive-interval: must be at least 1s, got "100ms"`},

		// Users that would be read as a second host or as an ssh option.
		{"user with a host", machine + "user = \"root@evil\"\n", "user",
			`offload.toml:4: machine[1].user: "root@evil" contains '@'; give the user alone, and the host in host`},
		{"user as an option", "[ssh]\nuser = \"-oProxyCommand=x\"\n", "ssh.user",
			`offload.toml:2: ssh.user: "-oProxyCommand=x" must not start with '-'`},
		{"user with a space", machine + "user = \"nix build\"\n", "user",
			`offload.toml:4: machine[1].user: "nix build" may only hold letters, digits, '.', '_' and '-'`},

		// The same machine with its port left unset and given as 22.
		{"duplicate with the default port", two("host = \"b1\"\nport = 22\nsystems = [\"x\"]\n"), "host",
			`offload.toml:6: machine[2].host: duplicate machine "b1:22"; machine[1] at line 2 has the same user, host and port`},

		// Host keys that are not one valid public key.
		{"empty host-key", machine + "host-key = \"\"\n", "host-key",
			`offload.toml:4: machine[1].host-key: must be a public key line such as "ssh-ed25519 AAAA…" (the host's /etc/ssh/ssh_host_ed25519_key.pub): ssh: no key found`},
		{"blank host-key", machine + "host-key = \"  \"\n", "host-key",
			`offload.toml:4: machine[1].host-key: must be a public key line such as "ssh-ed25519 AAAA…" (the host's /etc/ssh/ssh_host_ed25519_key.pub): ssh: no key found`},
		{"host-key with a broken body", machine + "host-key = \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF2oDs0c\"\n", "host-key",
			`offload.toml:4: machine[1].host-key: must be a public key line such as "ssh-ed25519 AAAA…" (the host's /etc/ssh/ssh_host_ed25519_key.pub): ssh: no key found; last parsing error for ignored line: ssh: short read`},
		{"host-key of only a type", machine + "host-key = \"ssh-ed25519\"\n", "host-key",
			`offload.toml:4: machine[1].host-key: must be a public key line such as "ssh-ed25519 AAAA…" (the host's /etc/ssh/ssh_host_ed25519_key.pub): ssh: no key found`},
		{"two host keys", machine + "host-key = \"\"\"\n" + testKey + "\n" + testKey + "\n\"\"\"\n", "host-key",
			`offload.toml:4: machine[1].host-key: must be a single line holding one public key`},
		{"private key as host-key", machine + "host-key = \"\"\"\n" + pastedKey + "\"\"\"\n", "host-key",
			`offload.toml:4: machine[1].host-key: must be a single line holding one public key`},

		// A private key pasted where its file name belongs is refused without being repeated.
		{"private key as ssh-key", machine + "ssh-key = \"\"\"\n" + pastedKey + "\"\"\"\n", "ssh-key",
			`offload.toml:4: machine[1].ssh-key: must be the path of a private key file, not the key itself (the value is not shown)`},
		{"private key as [ssh] ssh-key", "[ssh]\nssh-key = '''" + pastedKey + "'''\n", "ssh-key",
			`offload.toml:2: ssh.ssh-key: must be the path of a private key file, not the key itself (the value is not shown)`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := Parse("offload.toml", []byte(tc.toml))
			if err == nil {
				t.Fatalf("no error; machines %+v", cfg.Machines)
			}
			if got := err.Error(); got != tc.want {
				t.Errorf("error:\n%s\nwant:\n%s", got, tc.want)
			}
			checkLocated(t, err, "offload.toml", tc.toml, tc.key)
			if strings.Contains(err.Error(), pastedKeyBody) {
				t.Errorf("the error repeats the pasted key")
			}
		})
	}
}

// TestHostKeyTyposAreErrors: a misspelt host-key must stop the configuration, not leave the
// machine without its pin (and so verified by whatever known-hosts files happen to exist).
func TestHostKeyTyposAreErrors(t *testing.T) {
	for _, key := range []string{"hostkey", "host_key", "host-keys", "HostKey", "hostKey", "public-host-key", "ssh-public-host-key"} {
		t.Run(key, func(t *testing.T) {
			text := machine + key + " = \"" + testKey + "\"\n"
			_, err := Parse("offload.toml", []byte(text))
			if err == nil {
				t.Fatalf("%s = … accepted", key)
			}
			want := `offload.toml:4: machine[1]: unknown key "` + key + `" (did you mean "host-key"?)`
			if err.Error() != want {
				t.Errorf("error:\n%s\nwant:\n%s", err, want)
			}
		})
	}
	// In [ssh] it is no shared default either: host keys are per machine.
	_, err := Parse("offload.toml", []byte("[ssh]\nhost-key = \""+testKey+"\"\n"+machine))
	if want := `offload.toml:2: ssh: unknown key "host-key" (it belongs in [[machine]])`; err == nil || err.Error() != want {
		t.Errorf("host-key in [ssh]: %v, want %s", err, want)
	}
	// Nor is there any key that turns verification off.
	for _, key := range []string{"strict-host-key-checking", "StrictHostKeyChecking", "insecure", "no-host-key-check", "host-key-pin"} {
		if _, err := Parse("offload.toml", []byte(machine+key+" = false\n")); err == nil || !strings.Contains(err.Error(), `unknown key "`+key+`"`) {
			t.Errorf("%s = false: %v, want an unknown key error", key, err)
		}
	}
}

func TestConfigMistakesMachinesFormat(t *testing.T) {
	for _, tc := range []struct {
		name, spec, key, want string
	}{
		{"negative max jobs", "b1 x86_64-linux - -1", "field 4",
			`builders:1: field 4 (max jobs): must be a whole number, got "-1" (in entry "b1 x86_64-linux - -1")`},
		{"max jobs not a number", "b1 x86_64-linux - four", "field 4",
			`builders:1: field 4 (max jobs): must be a whole number, got "four" (in entry "b1 x86_64-linux - four")`},
		{"negative speed", "b1 x86_64-linux - 1 -0.5", "field 5",
			`builders:1: field 5 (speed factor): must not be negative, got "-0.5" (in entry "b1 x86_64-linux - 1 -0.5")`},
		{"NaN speed", "b1 x86_64-linux - 1 nan", "field 5",
			`builders:1: field 5 (speed factor): must be a finite number, got "nan" (in entry "b1 x86_64-linux - 1 nan")`},
		{"infinite speed", "b1 x86_64-linux - 1 1e400", "field 5",
			`builders:1: field 5 (speed factor): must be a finite number, got "1e400" (in entry "b1 x86_64-linux - 1 1e400")`},
		{"empty systems", "b1 , - 1", "field 2",
			`builders:1: field 2 (systems): "," lists no system; give one or more, separated by commas (in entry "b1 , - 1")`},
		{"duplicate, names both lines", "ssh://root@b1:22 x86_64-linux\n# b2\nssh-ng://root@b1:22 aarch64-linux", "field 1",
			`builders:3: field 1 (store URI): duplicate machine "root@b1:22", also at builders:1; merge the two entries (one entry per machine, all its systems in field 2)`},
		{"duplicate in another case", "b1\nB1", "field 1",
			`builders:2: field 1 (store URI): duplicate machine "B1", also at builders:1; merge the two entries (one entry per machine, all its systems in field 2)`},
		{"host key of only a type", "b1 - - - - - - c3NoLWVkMjU1MTkK", "field 8",
			`builders:1: field 8 (public host key): decodes to something that is not a public key line; it must be the base64 of e.g. ssh_host_ed25519_key.pub: must be a public key line such as "ssh-ed25519 AAAA…" (the host's /etc/ssh/ssh_host_ed25519_key.pub): ssh: no key found (in entry "b1 - - - - - - c3NoLWVkMjU1MTkK")`},
		{"host key not base64", "b1 - - - - - - ssh-ed25519", "field 8",
			`builders:1: field 8 (public host key): is not valid base64: illegal base64 data at input byte 3 (in entry "b1 - - - - - - ssh-ed25519")`},
		{"empty host key setting", "ssh://b1?base64-ssh-public-host-key=", "field 1",
			`builders:1: field 1 (store URI): setting base64-ssh-public-host-key: decodes to something that is not a public key line; it must be the base64 of e.g. ssh_host_ed25519_key.pub: must be a public key line such as "ssh-ed25519 AAAA…" (the host's /etc/ssh/ssh_host_ed25519_key.pub): ssh: no key found (in entry "ssh://b1?base64-ssh-public-host-key=")`},
		{"host key one field too early", "b1 x86_64-linux /k 4 1 kvm " + testKeyB64, "field 7",
			`builders:1: field 7 (mandatory features): holds a public host key; it belongs in field 8 (write - for each empty field before it) (in entry "b1 x86_64-linux /k 4 1 kvm ` + testKeyB64 + `")`},
		{"no setting turns verification off", "ssh://b1?StrictHostKeyChecking=no", "field 1",
			`builders:1: field 1 (store URI): store setting "StrictHostKeyChecking" is not supported by nix-offload (in entry "ssh://b1?StrictHostKeyChecking=no")`},
		{"private key as ssh-key setting", "ssh://b1?ssh-key=" + url.QueryEscape(pastedKey) + " x86_64-linux", "field 3",
			`builders:1: field 3 (SSH key): the entry holds a private key (not shown); field 3 and ?ssh-key= take the path of a key file`},
		{"user that is an option", "ssh://-oProxyCommand=x@b1 x86_64-linux", "field 1",
			`builders:1: field 1 (store URI): "ssh://-oProxyCommand=x@b1": user "-oProxyCommand=x" must not start with '-' (in entry "ssh://-oProxyCommand=x@b1 x86_64-linux")`},
		{"relative key path", "b1 x86_64-linux keys/b1", "field 3",
			`builders:1: field 3 (SSH key): "keys/b1" is a relative path, which would be looked up from nix-daemon's working directory; give the absolute path (in entry "b1 x86_64-linux keys/b1")`},
		{"duplicate with the default port", "b1\nssh://b1:22", "field 1",
			`builders:2: field 1 (store URI): duplicate machine "b1:22", also at builders:1; merge the two entries (one entry per machine, all its systems in field 2)`},
		{"ssh-key setting with a newline", "ssh://b1?ssh-key=%2Fk%0A x86_64-linux", "field 1",
			`builders:1: field 1 (store URI): setting ssh-key: must be the path of a private key file, not the key itself (the value is not shown) (in entry "ssh://b1?ssh-key=%2Fk%0A x86_64-linux")`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ms, err := ParseBuilders(tc.spec, "x86_64-linux", files(nil))
			if err == nil {
				t.Fatalf("no error; machines %+v", ms)
			}
			if got := err.Error(); got != tc.want {
				t.Errorf("error:\n%s\nwant:\n%s", got, tc.want)
			}
			checkLocated(t, err, BuildersName, tc.spec, tc.key)
			if strings.Contains(err.Error(), pastedKeyBody) {
				t.Errorf("the error repeats the pasted key")
			}
		})
	}
}

// TestValidateKeyPath: machines built in code get the same ssh-key rule.
func TestValidateKeyPath(t *testing.T) {
	m := good("b1")
	m.SSHKey = pastedKey
	err := Validate([]Machine{m})
	want := "machine[1].ssh-key: must be the path of a private key file, not the key itself (the value is not shown)"
	if err == nil || err.Error() != want {
		t.Errorf("Validate: %v, want %s", err, want)
	}
	m.SSHKey = "/etc/nix/PRIVATE KEY"
	if err := Validate([]Machine{m}); err == nil {
		t.Errorf("a key file name with \"PRIVATE KEY\" in it passed; the rule is meant to be that blunt")
	}
	m.SSHKey = "~/.ssh/id_ed25519"
	if err := Validate([]Machine{m}); err != nil {
		t.Errorf("a plain key path: %v", err)
	}
}
