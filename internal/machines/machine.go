package machines

import (
	"errors"
	"fmt"
	"math"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"

	"golang.org/x/crypto/ssh"
)

// Defaults a [Machine] gets for what its source leaves unset.
const (
	DefaultConnectTimeout = 10 * time.Second
	DefaultParallelBuilds = 1
	DefaultSpeed          = 1.0
)

// MinTimeout is the shortest connect-timeout and server-alive-interval accepted. The connect
// timeout bounds the TCP connect, the SSH handshake and the start of nix-store on the machine,
// which take hundreds of milliseconds on a busy machine; shorter values fail every connection
// with messages that do not say why (1ns gave "unexpected packet in response to channel open").
// Keepalives more often than once a second only load the link.
const MinTimeout = time.Second

// MaxParallelBuilds bounds parallel-builds (max jobs in a machines file). Every slot is a file and a
// scheduler entry; no real builder runs more builds at once than this.
const MaxParallelBuilds = 1024

// Protocol is the protocol a machine speaks.
type Protocol string

const (
	// ProtocolSSH is Nix's legacy serve protocol, `ssh://` machines: `nix-store --serve --write`.
	ProtocolSSH Protocol = "ssh"
	// ProtocolSSHNG is Nix's daemon protocol, `ssh-ng://` machines: `nix-daemon --stdio`.
	ProtocolSSHNG Protocol = "ssh-ng"
)

// ProtocolOrDefault returns m.Protocol, [ProtocolSSH] when it is unset.
func (m Machine) ProtocolOrDefault() Protocol {
	if m.Protocol == "" {
		return ProtocolSSH
	}
	return m.Protocol
}

// checkProtocol returns what is wrong with a protocol name, or "".
func checkProtocol(p Protocol) string {
	switch p {
	case "", ProtocolSSH, ProtocolSSHNG:
		return ""
	}
	return badProtocol(string(p))
}

func badProtocol(s string) string {
	return fmt.Sprintf("%q is not a protocol; use \"ssh\" (nix-store --serve) or \"ssh-ng\" (nix-daemon --stdio)", s)
}

// Machine is one remote builder, from the TOML file or from Nix's `builders` setting.
type Machine struct {
	Host           string        // hostname, address, or ~/.ssh/config alias (required)
	Port           int           // 0 = not set (ssh_config or 22 decides)
	User           string        // "" = not set
	SSHKey         string        // private key file, "" = agent / ssh_config
	HostKey        string        // pinned host key, authorized_keys form "ssh-ed25519 AAAA…", "" = use known-hosts
	KnownHosts     []string      // known_hosts files
	ConnectTimeout time.Duration // default 10s
	// ServerAliveInterval is the time between SSH keepalives; three unanswered in a row
	// close the connection. 0 = not set (ssh_config's ServerAliveInterval, else 15s).
	ServerAliveInterval time.Duration
	Systems             []string // required, non-empty
	ParallelBuilds      int      // default 1, >= 1
	Speed               float64  // default 1.0, > 0
	Features            []string // supported system features
	MandatoryFeatures   []string // only builds that require all of these go here
	RemoteStore         string   // optional `--store` for the remote nix-store or nix-daemon
	// Protocol is how the machine is spoken to: [ProtocolSSH] (`nix-store --serve --write`,
	// the default) or [ProtocolSSHNG] (`nix-daemon --stdio`, the daemon protocol).
	Protocol Protocol
	// RemoteProgram replaces `nix-store` (ssh) or `nix-daemon` (ssh-ng) on the machine, for one
	// that is not on the remote user's non-login PATH; "" = the default.
	RemoteProgram string
	Enabled       bool   // default true
	Source        string // where it was defined, e.g. "/etc/nix/offload.toml:14" or "builders:2"
	// MinFreeSpace is the free space, in bytes, the machine's store filesystem must have for
	// it to get a build (min-free-space, e.g. "10G"); 0 = no minimum. The broker reads the free
	// space live (internal/pool's Probe); a machine whose free space is unknown is not held back.
	MinFreeSpace uint64
	// MaxLoad is the load per core (1-minute load average ÷ cores) above which the machine gets
	// no new build (max-load); 0 = no limit. Read live like MinFreeSpace.
	MaxLoad float64
}

// Name is the machine's identity in logs, status and slot files: "user@host:port" with the parts
// that are set. An IPv6 address is bracketed when a port follows it ("[::1]:2222").
func (m Machine) Name() string {
	h := m.Host
	if m.Port != 0 {
		h = net.JoinHostPort(h, strconv.Itoa(m.Port))
	}
	if m.User != "" {
		h = m.User + "@" + h
	}
	return h
}

// Error is one problem found in a configuration, located as precisely as the source allows.
// Parse, ParseBuilders and Validate return a *Error for a single problem and an [errors.Join] of
// them, one per line, for several; [errors.As] finds the first either way.
type Error struct {
	File string // file name as given to Parse, "builders" for the setting itself; "" if unknown
	Line int    // 1-based; 0 if unknown
	Key  string // "machine[2].parallel-builds", "daemon", "field 5 (speed factor)"; "" if none
	Msg  string
}

// Error formats the error as "file:line: key: msg", leaving out the parts that are unknown.
func (e *Error) Error() string {
	var b strings.Builder
	switch {
	case e.File != "" && e.Line > 0:
		fmt.Fprintf(&b, "%s:%d: ", e.File, e.Line)
	case e.File != "":
		b.WriteString(e.File + ": ")
	case e.Line > 0:
		fmt.Fprintf(&b, "line %d: ", e.Line)
	}
	if e.Key != "" {
		b.WriteString(e.Key + ": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// joinErrors returns nil, the only error, or all of them joined (one per line).
func joinErrors(errs []*Error) error {
	switch len(errs) {
	case 0:
		return nil
	case 1:
		return errs[0]
	}
	out := make([]error, len(errs))
	for i, e := range errs {
		out[i] = e
	}
	return errors.Join(out...)
}

// sortErrors orders errors by line (unknown lines first) and drops exact repeats.
func sortErrors(errs []*Error) []*Error {
	slices.SortStableFunc(errs, func(a, b *Error) int { return a.Line - b.Line })
	return slices.CompactFunc(errs, func(a, b *Error) bool { return *a == *b })
}

// Validate checks a list of machines as a whole: no two share a [Machine.Name] (host names
// compared without case), and each one keeps the rules the parsers enforce (a valid host, a
// port of 0–65535 where 0 means unset, at least one system, 1 to [MaxParallelBuilds] parallel
// builds, a finite speed above 0, a connect timeout that is not negative (0 means
// [DefaultConnectTimeout]), a host key that parses, an ssh-key that names a file rather than
// holding the key). Errors are located by each machine's Source and keyed
// "machine[i].<toml key>", counting from 1 in list order.
func Validate(ms []Machine) error {
	var errs []*Error
	for i, m := range ms {
		file, line := splitSource(m.Source)
		bad := func(key, msg string) {
			errs = append(errs, &Error{File: file, Line: line, Key: fmt.Sprintf("machine[%d].%s", i+1, key), Msg: msg})
		}
		if msg := checkHost(m.Host); msg != "" {
			bad("host", msg)
		}
		if m.Port != 0 {
			if msg := checkPort(int64(m.Port)); msg != "" {
				bad("port", msg)
			}
		}
		if len(m.Systems) == 0 {
			bad("systems", msgNoSystems)
		}
		for j, s := range m.Systems {
			if msg := checkListItem(s); msg != "" {
				bad(fmt.Sprintf("systems[%d]", j+1), msg)
			}
		}
		for j, s := range m.Features {
			if msg := checkListItem(s); msg != "" {
				bad(fmt.Sprintf("features[%d]", j+1), msg)
			}
		}
		for j, s := range m.MandatoryFeatures {
			if msg := checkListItem(s); msg != "" {
				bad(fmt.Sprintf("mandatory-features[%d]", j+1), msg)
			}
		}
		if msg := checkParallelBuilds(int64(m.ParallelBuilds)); msg != "" {
			bad("parallel-builds", msg)
		}
		if msg := checkSpeed(m.Speed); msg != "" {
			bad("speed", msg)
		}
		if msg := checkProtocol(m.Protocol); msg != "" {
			bad("protocol", msg)
		}
		if msg := checkKeyPath(m.SSHKey); msg != "" {
			bad("ssh-key", msg)
		}
		if msg := checkUser(m.User); msg != "" {
			bad("user", msg)
		}
		if m.ConnectTimeout != 0 {
			if msg := checkTimeout(m.ConnectTimeout); msg != "" {
				bad("connect-timeout", msg)
			}
		}
		if m.ServerAliveInterval != 0 {
			if msg := checkTimeout(m.ServerAliveInterval); msg != "" {
				bad("server-alive-interval", msg)
			}
		}
		if m.HostKey != "" {
			if _, msg := parseHostKey(m.HostKey); msg != "" {
				bad("host-key", msg)
			}
		}
	}
	for _, d := range duplicates(ms) {
		file, line := splitSource(ms[d.second].Source)
		errs = append(errs, &Error{File: file, Line: line, Key: fmt.Sprintf("machine[%d].host", d.second+1),
			Msg: fmt.Sprintf("duplicate machine %q; machine[%d]%s has the same user, host and port",
				ms[d.second].Name(), d.first+1, at(ms[d.first].Source))})
	}
	return joinErrors(errs)
}

// dup names two machines with the same Name, by index; first < second.
type dup struct{ first, second int }

// duplicates finds every machine whose Name an earlier one already has, comparing host names
// without regard to case as DNS and OpenSSH do ("B1" and "b1" are one machine, whose slots
// would otherwise be counted twice), and an unset port as 22 ("h" and "h:22" are one machine
// too). Machines with an empty host are left to the host check.
func duplicates(ms []Machine) []dup {
	var out []dup
	seen := make(map[string]int, len(ms))
	for i, m := range ms {
		if m.Host == "" {
			continue
		}
		m.Host = strings.ToLower(m.Host)
		if m.Port == 0 {
			m.Port = 22
		}
		name := m.Name()
		if j, ok := seen[name]; ok {
			out = append(out, dup{j, i})
			continue
		}
		seen[name] = i
	}
	return out
}

// at renders a Source as " (at file:line)", or nothing when there is none.
func at(source string) string {
	if source == "" {
		return ""
	}
	return " (at " + source + ")"
}

// splitSource splits "file:line" as written by the parsers; anything else is all file.
func splitSource(s string) (string, int) {
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return s, 0
	}
	n, err := strconv.Atoi(s[i+1:])
	if err != nil || n <= 0 {
		return s, 0
	}
	return s[:i], n
}

const msgNoSystems = `must not be empty; list the systems this machine builds for, e.g. ["x86_64-linux"]`

// The check functions return "" for a good value and otherwise a message that completes
// "<key>: …". Both parsers and Validate use them, so the rules cannot drift apart.

func checkHost(h string) string {
	switch {
	case h == "":
		return "must not be empty"
	case strings.Contains(h, "://"):
		return fmt.Sprintf("%q is a URL; give the bare host name, and the port and user separately", h)
	case strings.HasPrefix(h, "-"):
		return fmt.Sprintf("%q must not start with '-'", h)
	case strings.ContainsFunc(h, func(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) }):
		return fmt.Sprintf("%q must not contain spaces or control characters", h)
	case strings.Contains(h, "@"):
		return fmt.Sprintf("%q contains '@'; give the user separately", h)
	case strings.ContainsAny(h, "/[]"):
		return fmt.Sprintf("%q is not a host name or address (IPv6 addresses go without brackets)", h)
	case strings.Contains(h, ":") && net.ParseIP(h) == nil:
		return fmt.Sprintf("%q contains ':'; give the port separately", h)
	}
	return ""
}

// checkUser checks an SSH user name ("" means unset). It becomes part of the machine's
// name and reaches ssh_config and the remote's login: a name that starts with '-' reads as an
// option, one with '@' as a second host, and anything outside the portable user-name
// characters is a mistake or an attack.
func checkUser(u string) string {
	switch {
	case u == "":
		return ""
	case strings.HasPrefix(u, "-"):
		return fmt.Sprintf("%q must not start with '-'", u)
	case strings.Contains(u, "@"):
		return fmt.Sprintf("%q contains '@'; give the user alone, and the host in host", u)
	case len(u) > 64:
		return fmt.Sprintf("is %d bytes long; a user name has at most 64", len(u))
	case strings.ContainsFunc(u, func(r rune) bool {
		return !('a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9' || r == '.' || r == '_' || r == '-')
	}):
		return fmt.Sprintf("%q may only hold letters, digits, '.', '_' and '-'", u)
	}
	return ""
}

// checkTimeout checks a connect-timeout or server-alive-interval that is set.
func checkTimeout(d time.Duration) string {
	switch {
	case d < 0:
		return fmt.Sprintf("must not be negative, got %s", d)
	case d < MinTimeout:
		return fmt.Sprintf("must be at least %s, got %s", MinTimeout, d)
	}
	return ""
}

func checkPort(p int64) string {
	if p < 1 || p > 65535 {
		return fmt.Sprintf("must be between 1 and 65535, got %d", p)
	}
	return ""
}

func checkParallelBuilds(n int64) string {
	switch {
	case n < 1:
		return fmt.Sprintf("must be at least 1, got %d", n)
	case n > MaxParallelBuilds:
		return fmt.Sprintf("must be at most %d, got %d", MaxParallelBuilds, n)
	}
	return ""
}

// checkMaxLoad checks a max-load value: a finite load per core, at least 0 (0: no limit).
func checkMaxLoad(f float64) string {
	switch {
	case math.IsNaN(f) || math.IsInf(f, 0):
		return fmt.Sprintf("must be a finite number, got %v", f)
	case f < 0:
		return fmt.Sprintf("must be 0 (no limit) or more, got %v", f)
	}
	return ""
}

// ParseSize reads a size such as "10G", "512M", "1.5T" or "4096": a number and an optional
// binary unit (K, M, G, T, each ×1024; "KiB", "GB" and lower case are accepted too). It
// returns a message for the user instead of an error.
func ParseSize(s string) (uint64, string) {
	t := strings.TrimSpace(s)
	i := strings.IndexFunc(t, func(r rune) bool { return !(r >= '0' && r <= '9' || r == '.') })
	num, unit := t, ""
	if i >= 0 {
		num, unit = t[:i], strings.ToUpper(strings.TrimSpace(t[i:]))
	}
	shift := map[string]uint{"": 0, "K": 10, "M": 20, "G": 30, "T": 40}
	unit = strings.TrimSuffix(strings.TrimSuffix(unit, "B"), "I")
	sh, okUnit := shift[unit]
	f, err := strconv.ParseFloat(num, 64)
	if num == "" || err != nil || !okUnit || math.IsInf(f, 0) || math.IsNaN(f) {
		return 0, fmt.Sprintf(`must be a size such as "10G", "512M" or a number of bytes, got %q`, s)
	}
	v := f * float64(uint64(1)<<sh)
	if v >= 1<<63 {
		return 0, fmt.Sprintf("is too large: %q", s)
	}
	return uint64(v), ""
}

// FormatSize formats bytes in binary units for people, as ParseSize reads them back: "512 B", "8.1 GiB", "10 GiB".
func FormatSize(n uint64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	f, i := float64(n), 0
	for f >= 1024 && i < len(units)-1 {
		f /= 1024
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%d B", n)
	}
	s := strconv.FormatFloat(f, 'f', 1, 64)
	return strings.TrimSuffix(s, ".0") + " " + units[i]
}

func checkSpeed(f float64) string {
	switch {
	case math.IsNaN(f) || math.IsInf(f, 0):
		return fmt.Sprintf("must be a finite number, got %v", f)
	case f <= 0:
		return fmt.Sprintf("must be greater than 0, got %v", f)
	}
	return ""
}

// checkKeyPath checks an ssh-key value, which names a private key file. A value that holds
// the key itself would be opened as a file name and echoed in the "no such file" error and in
// every log line that carries it; the message says so without repeating the value.
func checkKeyPath(s string) string {
	if strings.Contains(s, "PRIVATE KEY") || strings.ContainsFunc(s, unicode.IsControl) {
		return "must be the path of a private key file, not the key itself (the value is not shown)"
	}
	return ""
}

// checkListItem checks one system or feature name. A comma or space inside one name is almost
// always two names written as one string.
func checkListItem(s string) string {
	switch {
	case s == "":
		return "must not be empty"
	case strings.ContainsFunc(s, func(r rune) bool { return r == ',' || unicode.IsSpace(r) || unicode.IsControl(r) }):
		return fmt.Sprintf("%q must not contain commas, spaces or control characters; write one name per list item", s)
	}
	return ""
}

// parseHostKey accepts exactly one public key in authorized_keys form ("ssh-ed25519 AAAA…
// [comment]") and returns it as "type base64", without the comment.
func parseHostKey(s string) (canonical, msg string) {
	s = strings.TrimSpace(s)
	if strings.ContainsAny(s, "\r\n") {
		return "", "must be a single line holding one public key"
	}
	key, _, options, rest, err := ssh.ParseAuthorizedKey([]byte(s))
	switch {
	case err != nil:
		return "", fmt.Sprintf(`must be a public key line such as "ssh-ed25519 AAAA…" (the host's /etc/ssh/ssh_host_ed25519_key.pub): %v`, err)
	case len(options) > 0:
		return "", fmt.Sprintf(`must be a public key line such as "ssh-ed25519 AAAA…", without the %q in front (known_hosts host names or authorized_keys options)`, strings.Join(options, ","))
	case len(strings.TrimSpace(string(rest))) > 0:
		return "", "must hold one public key, found more"
	}
	return strings.TrimSuffix(string(ssh.MarshalAuthorizedKey(key)), "\n"), ""
}
