package machines

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"math"
	"net"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/BurntSushi/toml"

	"github.com/nix-offload/nix-offload/internal/smallfile"
)

// Defaults for the [daemon] table.
const (
	DefaultSocket   = "/run/nix-offload/hook.sock"
	DefaultStateDir = "/var/lib/nix-offload"
)

// Daemon is the [daemon] table: where the broker listens and keeps its state.
type Daemon struct {
	Socket   string // unix socket of the broker; default [DefaultSocket]
	StateDir string // health memory and embedded-mode slot files; default [DefaultStateDir]
	Metrics  string // host:port of the Prometheus listener; "" = off
	// MachineWait is how long a build waits for its capable machines to
	// come back from transient failures before it fails; 0 = the default
	// (5 minutes). Permanent failures fail it at once.
	MachineWait time.Duration
}

// SSH is the [ssh] table: values every machine inherits unless it sets the key itself.
type SSH struct {
	User           string
	SSHKey         string
	KnownHosts     []string
	ConnectTimeout time.Duration // default [DefaultConnectTimeout]
	// ServerAliveInterval is the time between SSH keepalives; 0 = not set.
	ServerAliveInterval time.Duration
}

// Config is a parsed, checked offload.toml. Machines carry the [ssh] defaults already.
type Config struct {
	Path     string // the name given to Parse (the path given to Load)
	Daemon   Daemon
	SSH      SSH
	Machines []Machine
}

// MaxFileSize bounds a configuration file: offload.toml, or a machines file that `builders`
// includes. The largest real one, [MaxParallelBuilds]-scale fleets of a few hundred machines
// with pinned host keys, is well under 1 MiB; a bound makes /dev/zero or a runaway file an
// error instead of a process that grows until it is killed.
const MaxFileSize = 4 << 20

// ReadFile reads a configuration file: it must be a regular file of at most [MaxFileSize]
// bytes, checked before reading, so a directory, a FIFO or a device is refused at once, with
// its path (see package smallfile). A missing file gives an error for which
// errors.Is(err, fs.ErrNotExist) holds.
func ReadFile(path string) ([]byte, error) { return smallfile.Read(path, MaxFileSize) }

// Load reads (with [ReadFile]) and parses a TOML file. A file that cannot be read gives that
// error (test it with [errors.Is] and [io/fs.ErrNotExist]); anything wrong inside the file
// gives [Error]s naming path, line and key.
//
// Relative ssh-key and known-hosts paths are made absolute against the file's directory, as
// the user who wrote `ssh-key = "keys/b1"` beside offload.toml means: taken as they are, they
// would be looked up from the working directory of whatever runs (nix-daemon's for the hook,
// the shell's for `check`) and name a different file in each. Paths starting with "~" are left
// to ssh_config's expansion.
func Load(path string) (*Config, error) {
	data, err := ReadFile(path)
	if err != nil {
		return nil, err
	}
	cfg, err := Parse(path, data)
	if err != nil {
		return nil, err
	}
	dir, err := filepath.Abs(filepath.Dir(path))
	if err != nil {
		return nil, err
	}
	cfg.SSH.SSHKey = underDir(dir, cfg.SSH.SSHKey)
	cfg.SSH.KnownHosts = underDirs(dir, cfg.SSH.KnownHosts)
	for i := range cfg.Machines {
		m := &cfg.Machines[i]
		m.SSHKey = underDir(dir, m.SSHKey)
		m.KnownHosts = underDirs(dir, m.KnownHosts)
	}
	return cfg, nil
}

// underDir makes a relative file path absolute against dir; "" and "~…" stay as they are.
func underDir(dir, p string) string {
	if p == "" || filepath.IsAbs(p) || strings.HasPrefix(p, "~") {
		return p
	}
	return filepath.Join(dir, p)
}

func underDirs(dir string, ps []string) []string {
	for i, p := range ps {
		ps[i] = underDir(dir, p)
	}
	return ps
}

// The TOML schema, key by key, in the order the documentation lists them.
var (
	rootKeys    = []string{"daemon", "ssh", "machine"}
	daemonKeys  = []string{"socket", "state-dir", "metrics", "machine-wait"}
	sshKeys     = []string{"user", "ssh-key", "known-hosts", "connect-timeout", "server-alive-interval"}
	machineKeys = []string{"host", "port", "user", "ssh-key", "host-key", "known-hosts", "connect-timeout", "server-alive-interval",
		"systems", "parallel-builds", "speed", "features", "mandatory-features", "remote-store", "protocol", "remote-program", "enabled",
		"min-free-space", "max-load"}
)

// Parse parses and checks offload.toml text; name stands for the file in error messages and
// in each machine's Source. It reports every problem it finds, sorted by line, not only the
// first; a syntax error stops it, as nothing after it can be trusted.
func Parse(name string, data []byte) (*Config, error) {
	var raw map[string]any
	if _, err := toml.Decode(string(data), &raw); err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			line := pe.Position.Line
			if line < 1 {
				// The decoder says line 0 for some errors in a file's last token (`"\`);
				// its byte offset is right.
				start := min(max(pe.Position.Start, 0), len(data))
				line = 1 + bytes.Count(data[:start], []byte("\n"))
			}
			return nil, &Error{File: name, Line: line, Msg: tidyMessage(pe.Message)}
		}
		return nil, &Error{File: name, Msg: err.Error()}
	}
	p := &tomlParser{name: name, lines: indexKeys(string(data))}
	cfg := p.config(raw)
	if len(p.errs) > 0 {
		return nil, joinErrors(sortErrors(p.errs))
	}
	return cfg, nil
}

// tidyMessage makes the decoder's messages look like ours: lower case, no final period, and
// control characters it quotes from the input (a NUL at the end of the file) escaped.
func tidyMessage(s string) string {
	s = strings.TrimSuffix(strings.TrimSpace(s), ".")
	if strings.ContainsFunc(s, unicode.IsControl) {
		var b strings.Builder
		for _, r := range s {
			if unicode.IsControl(r) {
				fmt.Fprintf(&b, "\\x%02x", r)
			} else {
				b.WriteRune(r)
			}
		}
		s = b.String()
	}
	r, n := utf8.DecodeRuneInString(s)
	if n > 0 && unicode.IsUpper(r) {
		if r2, _ := utf8.DecodeRuneInString(s[n:]); !unicode.IsUpper(r2) {
			s = string(unicode.ToLower(r)) + s[n:]
		}
	}
	return s
}

// loc is the place of a value in the document: its index key (see [pathKey]) and the name
// errors show, such as "machine[2].systems[1]".
type loc struct {
	key, name string
}

func (l loc) child(k string) loc {
	if l.key == "" {
		return loc{k, k}
	}
	return loc{l.key + pathSep + k, l.name + "." + k}
}

func (l loc) elem(i int) loc { // i counts from 1
	return loc{l.key + pathSep + elemSeg(i), fmt.Sprintf("%s[%d]", l.name, i)}
}

type tomlParser struct {
	name  string
	lines keyLines
	errs  []*Error
}

// line finds where l (or, failing that, the nearest enclosing key) was written. A key may be
// empty (`"" = 1` is valid TOML), so "" is looked up too.
func (p *tomlParser) line(l loc) int {
	for k := l.key; ; {
		if n, ok := p.lines[k]; ok {
			return n
		}
		i := strings.LastIndex(k, pathSep)
		if i < 0 {
			return 0
		}
		k = k[:i]
	}
}

func (p *tomlParser) errorf(l loc, format string, args ...any) {
	p.errs = append(p.errs, &Error{File: p.name, Line: p.line(l), Key: l.name, Msg: fmt.Sprintf(format, args...)})
}

func (p *tomlParser) source(l loc) string {
	if n := p.line(l); n > 0 {
		return p.name + ":" + strconv.Itoa(n)
	}
	return p.name
}

func (p *tomlParser) config(raw map[string]any) *Config {
	cfg := &Config{
		Path:   p.name,
		Daemon: Daemon{Socket: DefaultSocket, StateDir: DefaultStateDir},
		SSH:    SSH{ConnectTimeout: DefaultConnectTimeout},
	}
	root := loc{}
	p.unknownKeys(root, "", raw, rootKeys)
	if v, ok := raw["daemon"]; ok {
		if t, ok := p.table(root.child("daemon"), v, "[daemon]"); ok {
			p.daemon(root.child("daemon"), t, &cfg.Daemon)
		}
	}
	if v, ok := raw["ssh"]; ok {
		if t, ok := p.table(root.child("ssh"), v, "[ssh]"); ok {
			p.ssh(root.child("ssh"), t, &cfg.SSH)
		}
	}
	if v, ok := raw["machine"]; ok {
		cfg.Machines = p.machines(root.child("machine"), v, cfg.SSH)
	}
	return cfg
}

func (p *tomlParser) daemon(l loc, t map[string]any, d *Daemon) {
	p.unknownKeys(l, l.name, t, daemonKeys)
	for _, k := range []string{"socket", "state-dir"} {
		v, ok := t[k]
		if !ok {
			continue
		}
		if s, ok := p.str(l.child(k), v); ok {
			if !filepath.IsAbs(s) {
				p.errorf(l.child(k), "must be an absolute path, got %q", s)
				continue
			}
			if k == "socket" {
				d.Socket = s
			} else {
				d.StateDir = s
			}
		}
	}
	if v, ok := t["metrics"]; ok {
		if s, ok := p.str(l.child("metrics"), v); ok {
			if s != "" {
				if _, port, err := net.SplitHostPort(s); err != nil || !validPort(port) {
					p.errorf(l.child("metrics"), `must be host:port such as "127.0.0.1:9464", or "" for off, got %q`, s)
					s = ""
				}
			}
			d.Metrics = s
		}
	}
	if v, ok := t["machine-wait"]; ok {
		if w, ok := p.duration(l.child("machine-wait"), v); ok {
			d.MachineWait = w
		}
	}
}

func validPort(s string) bool {
	n, err := strconv.ParseUint(s, 10, 16)
	return err == nil && n <= 65535
}

func (p *tomlParser) ssh(l loc, t map[string]any, s *SSH) {
	p.unknownKeys(l, l.name, t, sshKeys)
	if v, ok := t["user"]; ok {
		s.User, _ = p.user(l.child("user"), v)
	}
	if v, ok := t["ssh-key"]; ok {
		s.SSHKey, _ = p.keyPath(l.child("ssh-key"), v)
	}
	if v, ok := t["known-hosts"]; ok {
		s.KnownHosts, _ = p.strList(l.child("known-hosts"), v, nil)
	}
	if v, ok := t["connect-timeout"]; ok {
		if d, ok := p.duration(l.child("connect-timeout"), v); ok {
			s.ConnectTimeout = d
		}
	}
	if v, ok := t["server-alive-interval"]; ok {
		if d, ok := p.duration(l.child("server-alive-interval"), v); ok {
			s.ServerAliveInterval = d
		}
	}
}

func (p *tomlParser) machines(l loc, v any, def SSH) []Machine {
	if _, ok := v.(map[string]any); ok {
		p.errorf(l, "must be an array of tables: write [[machine]] (two brackets) for each machine")
		return nil
	}
	list, ok := asList(v)
	if !ok {
		p.errorf(l, "must be an array of tables ([[machine]]), got %s", describe(v))
		return nil
	}
	var ms []Machine
	var hostLocs []loc
	for i, e := range list {
		el := l.elem(i + 1)
		t, ok := p.table(el, e, "[[machine]]")
		if !ok {
			continue
		}
		if m, ok := p.machine(el, t, def); ok {
			ms = append(ms, m)
			hostLocs = append(hostLocs, el.child("host"))
		}
	}
	for _, d := range duplicates(ms) {
		first := hostLocs[d.first]
		p.errorf(hostLocs[d.second], "duplicate machine %q; %s at line %d has the same user, host and port",
			ms[d.second].Name(), strings.TrimSuffix(first.name, ".host"), p.line(first))
	}
	return ms
}

// machine decodes one [[machine]] table. ok is false when the machine is unusable (no host),
// so that it does not take part in the duplicate check.
func (p *tomlParser) machine(l loc, t map[string]any, def SSH) (m Machine, ok bool) {
	p.unknownKeys(l, l.name, t, machineKeys)
	m = Machine{
		User:                def.User,
		SSHKey:              def.SSHKey,
		KnownHosts:          slices.Clone(def.KnownHosts),
		ConnectTimeout:      def.ConnectTimeout,
		ServerAliveInterval: def.ServerAliveInterval,
		ParallelBuilds:      DefaultParallelBuilds,
		Speed:               DefaultSpeed,
		Enabled:             true,
		Source:              p.source(l),
	}
	field := func(k string) (loc, any, bool) {
		v, ok := t[k]
		return l.child(k), v, ok
	}
	ok = true
	if kl, v, set := field("host"); !set {
		p.errorf(l, `missing required key "host"`)
		ok = false
	} else if s, good := p.str(kl, v); !good {
		ok = false
	} else if msg := checkHost(s); msg != "" {
		p.errorf(kl, "%s", msg)
		ok = false
	} else {
		m.Host = s
	}
	if kl, v, set := field("port"); set {
		if n, good := p.integer(kl, v); good {
			if msg := checkPort(n); msg != "" {
				p.errorf(kl, "%s", msg)
			} else {
				m.Port = int(n)
			}
		}
	}
	if kl, v, set := field("user"); set {
		m.User, _ = p.user(kl, v)
	}
	if kl, v, set := field("ssh-key"); set {
		m.SSHKey, _ = p.keyPath(kl, v)
	}
	if kl, v, set := field("host-key"); set {
		if s, good := p.str(kl, v); good {
			if key, msg := parseHostKey(s); msg != "" {
				p.errorf(kl, "%s", msg)
			} else {
				m.HostKey = key
			}
		}
	}
	if kl, v, set := field("known-hosts"); set {
		m.KnownHosts, _ = p.strList(kl, v, nil)
	}
	if kl, v, set := field("connect-timeout"); set {
		if d, good := p.duration(kl, v); good {
			m.ConnectTimeout = d
		}
	}
	if kl, v, set := field("server-alive-interval"); set {
		if d, good := p.duration(kl, v); good {
			m.ServerAliveInterval = d
		}
	}
	if kl, v, set := field("systems"); !set {
		p.errorf(l, `missing required key "systems"`)
	} else if list, good := p.strList(kl, v, checkListItem); good {
		if len(list) == 0 {
			p.errorf(kl, "%s", msgNoSystems)
		}
		m.Systems = list
	}
	if kl, v, set := field("parallel-builds"); set {
		if n, good := p.integer(kl, v); good {
			if msg := checkParallelBuilds(n); msg != "" {
				p.errorf(kl, "%s", msg)
			} else {
				m.ParallelBuilds = int(n)
			}
		}
	}
	if kl, v, set := field("speed"); set {
		if f, good := p.number(kl, v); good {
			if msg := checkSpeed(f); msg != "" {
				p.errorf(kl, "%s", msg)
			} else {
				m.Speed = f
			}
		}
	}
	if kl, v, set := field("features"); set {
		m.Features, _ = p.strList(kl, v, checkListItem)
	}
	if kl, v, set := field("mandatory-features"); set {
		m.MandatoryFeatures, _ = p.strList(kl, v, checkListItem)
	}
	if kl, v, set := field("remote-store"); set {
		m.RemoteStore, _ = p.str(kl, v)
	}
	if kl, v, set := field("protocol"); set {
		if s, good := p.str(kl, v); good {
			if Protocol(s) != ProtocolSSH && Protocol(s) != ProtocolSSHNG {
				p.errorf(kl, "%s", badProtocol(s))
			} else {
				m.Protocol = Protocol(s)
			}
		}
	}
	if kl, v, set := field("remote-program"); set {
		if s, good := p.str(kl, v); good {
			if strings.TrimSpace(s) == "" {
				p.errorf(kl, "is empty; leave it out for the default, or give the path of nix-store (ssh) or nix-daemon (ssh-ng)")
			} else {
				m.RemoteProgram = s
			}
		}
	}
	if kl, v, set := field("min-free-space"); set {
		switch x := v.(type) {
		case string:
			if n, msg := ParseSize(x); msg != "" {
				p.errorf(kl, "%s", msg)
			} else {
				m.MinFreeSpace = n
			}
		default:
			if n, good := p.integer(kl, v); good {
				if n < 0 {
					p.errorf(kl, "must be 0 or more bytes, got %d", n)
				} else {
					m.MinFreeSpace = uint64(n)
				}
			}
		}
	}
	if kl, v, set := field("max-load"); set {
		if f, good := p.number(kl, v); good {
			if msg := checkMaxLoad(f); msg != "" {
				p.errorf(kl, "%s", msg)
			} else {
				m.MaxLoad = f
			}
		}
	}
	if kl, v, set := field("enabled"); set {
		if b, good := v.(bool); good {
			m.Enabled = b
		} else {
			p.errorf(kl, "must be true or false, got %s", describe(v))
		}
	}
	return m, ok
}

// unknownKeys reports every key of t that is not in known, with a suggestion where one fits.
// Unknown-key errors are keyed by the table that holds the key ("" for the top level).
func (p *tomlParser) unknownKeys(l loc, tableName string, t map[string]any, known []string) {
	for _, k := range slices.Sorted(maps.Keys(t)) {
		if slices.Contains(known, k) {
			continue
		}
		kl := l.child(k)
		msg := fmt.Sprintf("unknown key %q", k)
		if s := suggest(k, known); s != "" {
			msg += fmt.Sprintf(" (did you mean %q?)", s)
		} else if hint := homeOf(k); hint != "" {
			msg += " (" + hint + ")"
		}
		p.errs = append(p.errs, &Error{File: p.name, Line: p.line(kl), Key: tableName, Msg: msg})
	}
}

// homeOf says where a key that is misplaced here belongs, or "" if it belongs nowhere.
func homeOf(k string) string {
	switch {
	case k == "machine":
		return "[[machine]] is a table of its own"
	case slices.Contains(rootKeys, k):
		return "[" + k + "] is a table of its own"
	case slices.Contains(machineKeys, k):
		return "it belongs in [[machine]]"
	case slices.Contains(daemonKeys, k):
		return "it belongs in [daemon]"
	}
	return ""
}

func (p *tomlParser) table(l loc, v any, form string) (map[string]any, bool) {
	t, ok := v.(map[string]any)
	if !ok {
		p.errorf(l, "must be a table (%s), got %s", form, describe(v))
	}
	return t, ok
}

func (p *tomlParser) str(l loc, v any) (string, bool) {
	s, ok := v.(string)
	if !ok {
		p.errorf(l, "must be a string, got %s", describe(v))
	}
	return s, ok
}

// user decodes a user value (see [checkUser]).
func (p *tomlParser) user(l loc, v any) (string, bool) { return p.checkedStr(l, v, checkUser) }

// keyPath decodes an ssh-key value: a string that names a file (see [checkKeyPath]).
func (p *tomlParser) keyPath(l loc, v any) (string, bool) { return p.checkedStr(l, v, checkKeyPath) }

// checkedStr decodes a string that check (a message, or "" for good) must accept.
func (p *tomlParser) checkedStr(l loc, v any, check func(string) string) (string, bool) {
	s, ok := p.str(l, v)
	if !ok {
		return "", false
	}
	if msg := check(s); msg != "" {
		p.errorf(l, "%s", msg)
		return "", false
	}
	return s, true
}

func (p *tomlParser) integer(l loc, v any) (int64, bool) {
	switch n := v.(type) {
	case int64:
		return n, true
	case float64:
		if n == math.Trunc(n) && math.Abs(n) < 1<<53 {
			p.errorf(l, "must be an integer, got float %v (write %d)", n, int64(n))
			return 0, false
		}
	}
	p.errorf(l, "must be an integer, got %s", describe(v))
	return 0, false
}

// number accepts a float or an integer: "speed = 2" means 2.0.
func (p *tomlParser) number(l loc, v any) (float64, bool) {
	switch n := v.(type) {
	case float64:
		return n, true
	case int64:
		return float64(n), true
	}
	p.errorf(l, "must be a number, got %s", describe(v))
	return 0, false
}

// strList decodes an array of strings, checking each item with check if it is not nil. It
// reports every bad item; ok is false if there was any.
func (p *tomlParser) strList(l loc, v any, check func(string) string) (_ []string, ok bool) {
	list, isList := asList(v)
	if !isList {
		hint := ""
		if s, isStr := v.(string); isStr {
			hint = fmt.Sprintf(" (write [%q])", s)
		}
		p.errorf(l, "must be an array of strings, got %s%s", describe(v), hint)
		return nil, false
	}
	var out []string // nil when empty: "no items" has one representation
	ok = true
	for i, e := range list {
		s, isStr := e.(string)
		switch {
		case !isStr:
			p.errorf(l.elem(i+1), "must be a string, got %s", describe(e))
			ok = false
		case check != nil && check(s) != "":
			p.errorf(l.elem(i+1), "%s", check(s))
			ok = false
		case check == nil && s == "":
			p.errorf(l.elem(i+1), "must not be empty")
			ok = false
		default:
			out = append(out, s)
		}
	}
	return out, ok
}

// duration decodes a Go duration string such as "10s"; it must be positive, because a
// connection attempt without a deadline is the hang this project exists to avoid, and at
// least [MinTimeout].
func (p *tomlParser) duration(l loc, v any) (time.Duration, bool) {
	s, ok := v.(string)
	if !ok {
		hint := ""
		if n, isInt := v.(int64); isInt {
			hint = fmt.Sprintf(` (write "%ds")`, n)
		}
		p.errorf(l, `must be a duration string such as "10s" or "1m30s", got %s%s`, describe(v), hint)
		return 0, false
	}
	d, err := time.ParseDuration(s)
	switch {
	case err != nil:
		p.errorf(l, `%q is not a duration; write e.g. "10s" or "1m30s"`, s)
		return 0, false
	case d < 0:
		p.errorf(l, "must not be negative, got %q", s)
		return 0, false
	case d == 0:
		p.errorf(l, "must be greater than 0, got %q", s)
		return 0, false
	case d < MinTimeout:
		p.errorf(l, "must be at least %s, got %q", MinTimeout, s)
		return 0, false
	}
	return d, true
}

// asList accepts both shapes the decoder gives arrays: []any, and []map[string]any for an
// array of tables.
func asList(v any) ([]any, bool) {
	switch l := v.(type) {
	case []any:
		return l, true
	case []map[string]any:
		out := make([]any, len(l))
		for i, t := range l {
			out[i] = t
		}
		return out, true
	}
	return nil, false
}

// describe names a decoded TOML value's type, with the value itself for short scalars.
func describe(v any) string {
	switch x := v.(type) {
	case string:
		if len(x) > 40 {
			return "a string"
		}
		return fmt.Sprintf("string %q", x)
	case int64:
		return fmt.Sprintf("integer %d", x)
	case float64:
		return fmt.Sprintf("float %v", x)
	case bool:
		return fmt.Sprintf("boolean %v", x)
	case time.Time:
		return "a date-time"
	case map[string]any:
		return "a table"
	case []any, []map[string]any:
		return "an array"
	}
	return fmt.Sprintf("a %T", v)
}
