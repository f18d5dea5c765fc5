package machines

import (
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"math"
	"net/url"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// BuildersName is the file name errors and Sources use for the text of the `builders` setting
// itself (as opposed to a file it includes).
const BuildersName = "builders"

// MaxIncludeDepth bounds how deeply "@file" includes nest. Nix recurses without a limit, so a
// file that includes itself overflows its stack; here a cycle is an error, and so is a chain
// deeper than any real setup needs.
const MaxIncludeDepth = 16

// The columns of a machines-file entry, as Nix's manual names them; errors are keyed by these.
var builderFields = [...]string{
	"field 1 (store URI)",
	"field 2 (systems)",
	"field 3 (SSH key)",
	"field 4 (max jobs)",
	"field 5 (speed factor)",
	"field 6 (supported features)",
	"field 7 (mandatory features)",
	"field 8 (public host key)",
}

// Store URI settings (?name=value) that change nothing for us: compression and connection
// counts are ours to choose, and the log always comes back on fd 4.
var ignoredStoreSettings = map[string]bool{
	"compress":             true,
	"max-connections":      true,
	"log-fd":               true,
	"priority":             true,
	"trusted":              true,
	"want-mass-query":      true,
	"path-info-cache-size": true,
}

// ParseBuilders parses Nix's `builders` setting (the machines format, `man nix.conf`,
// NixOS/nix src/libstore/machines.cc) into machines, for setups that have no offload.toml.
//
// Entries are separated by newlines or ';'. A '#' starts a comment that runs to the end of the
// line, even across a ';' (Nix before 2.29, 2.24.15 and 2.28.2 split first and so treated
// "# a; b" as a comment and an entry "b"). An entry "@path" includes the file at path: files
// nest, a missing file is ignored as Nix ignores it, any other read error is reported, and a
// cycle or nesting deeper than [MaxIncludeDepth] is an error. readFile reads includes
// ([ReadFile], bounded and for regular files only, if nil).
//
// An entry is up to eight whitespace-separated fields; "-" or a missing field means its
// default:
//
//  1. store URI: "host", "user@host", "ssh://[user@]host[:port]" (Protocol ssh) or
//     "ssh-ng://…" (Protocol ssh-ng); "?remote-store=", "?remote-program=", "?ssh-key=" and
//     "?base64-ssh-public-host-key=" are honoured and harmless settings such as "?compress="
//     ignored. Other schemes, local stores ("local", "auto", "daemon", paths) and other settings
//     are errors.
//  2. systems, comma-separated (default: system).
//  3. SSH private key file.
//  4. max jobs (default 1). 0, which Nix accepts but never gives a build to, gives a machine
//     with Enabled false.
//  5. speed factor, a number (default 1; 0 means 1, negative is an error).
//  6. supported and 7. mandatory features, comma-separated. A host key found here (a field left
//     out before it) is an error, as the machine would otherwise go unpinned.
//  8. the host's public key line ("ssh-ed25519 AAAA…", as in ssh_host_ed25519_key.pub), base64
//     encoded; it becomes HostKey, without the comment.
//
// Sources are "builders:<line>" or "<included file>:<line>". All errors are reported, in the
// order met, and each names the entry.
func ParseBuilders(spec, system string, readFile func(string) ([]byte, error)) ([]Machine, error) {
	if readFile == nil {
		readFile = ReadFile
	}
	p := &buildersParser{system: system, readFile: readFile}
	p.text(BuildersName, spec)
	for _, d := range duplicates(p.ms) {
		m := p.ms[d.second]
		file, line := splitSource(m.Source)
		p.errs = append(p.errs, &Error{File: file, Line: line, Key: builderFields[0],
			Msg: fmt.Sprintf("duplicate machine %q, also at %s; merge the two entries (one entry per machine, all its systems in field 2)",
				m.Name(), p.ms[d.first].Source)})
	}
	if len(p.errs) > 0 {
		return nil, joinErrors(p.errs)
	}
	return p.ms, nil
}

type buildersParser struct {
	system   string
	readFile func(string) ([]byte, error)
	chain    []string // files being included, outermost first
	ms       []Machine
	errs     []*Error
}

func (p *buildersParser) text(file, text string) {
	for i, line := range strings.Split(text, "\n") {
		if j := strings.IndexByte(line, '#'); j >= 0 {
			line = line[:j]
		}
		for entry := range strings.SplitSeq(line, ";") {
			entry = strings.TrimSpace(entry)
			switch {
			case entry == "":
			case entry[0] == '@':
				p.include(file, i+1, strings.TrimSpace(entry[1:]))
			default:
				p.entry(file, i+1, entry)
			}
		}
	}
}

func (p *buildersParser) include(file string, line int, path string) {
	bad := func(format string, args ...any) {
		p.errs = append(p.errs, &Error{File: file, Line: line, Key: "@" + path, Msg: fmt.Sprintf(format, args...)})
	}
	if path == "" {
		bad("'@' must be followed by a file name")
		return
	}
	clean := filepath.Clean(path)
	for i, f := range p.chain {
		if f == clean {
			bad("include cycle: %s", strings.Join(append(p.chain[i:], clean), " includes "))
			return
		}
	}
	if len(p.chain) >= MaxIncludeDepth {
		bad("includes nest more than %d deep", MaxIncludeDepth)
		return
	}
	data, err := p.readFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return // as Nix: a machines file that is not there lists no machines
	}
	if err != nil {
		bad("%v", err)
		return
	}
	p.chain = append(p.chain, clean)
	p.text(path, string(data))
	p.chain = p.chain[:len(p.chain)-1]
}

func (p *buildersParser) entry(file string, line int, entry string) {
	fields := strings.Fields(entry)
	bad := func(field int, format string, args ...any) {
		p.errs = append(p.errs, &Error{File: file, Line: line, Key: builderFields[field],
			Msg: fmt.Sprintf(format, args...) + fmt.Sprintf(" (in entry %q)", entry)})
	}
	if u, err := url.QueryUnescape(entry); strings.Contains(entry, "PRIVATE KEY") || err == nil && strings.Contains(u, "PRIVATE KEY") {
		// A key pasted into ?ssh-key= would otherwise be echoed by every message below.
		p.errs = append(p.errs, &Error{File: file, Line: line, Key: builderFields[2],
			Msg: "the entry holds a private key (not shown); field 3 and ?ssh-key= take the path of a key file"})
		return
	}
	if len(fields) > len(builderFields) {
		p.errs = append(p.errs, &Error{File: file, Line: line,
			Msg: fmt.Sprintf("entry %q has %d fields, at most %d are allowed", entry, len(fields), len(builderFields))})
		return
	}
	get := func(i int) (string, bool) {
		if i < len(fields) && fields[i] != "-" {
			return fields[i], true
		}
		return "", false
	}
	m := Machine{
		ConnectTimeout: DefaultConnectTimeout,
		ParallelBuilds: DefaultParallelBuilds,
		Speed:          DefaultSpeed,
		Enabled:        true,
		Source:         file + ":" + strconv.Itoa(line),
	}
	errsBefore := len(p.errs)

	uri, _ := get(0)
	if uri == "" {
		bad(0, "missing; every entry starts with the machine's address")
		return
	}
	params, msg := parseStoreURI(uri, &m)
	if msg != "" {
		bad(0, "%s", msg)
	}
	for _, name := range slices.Sorted(maps.Keys(params)) {
		v := params.Get(name)
		switch {
		case name == "remote-store":
			m.RemoteStore = v
		case name == "remote-program":
			if strings.TrimSpace(v) == "" {
				bad(0, "setting remote-program is empty; give the path of nix-store (ssh://) or nix-daemon (ssh-ng://)")
			} else {
				m.RemoteProgram = v
			}
		case name == "ssh-key":
			if msg := checkKeyPath(v); msg != "" {
				bad(0, "setting ssh-key: %s", msg)
			} else if msg := checkAbsKeyPath(v); msg != "" {
				bad(0, "setting ssh-key: %s", msg)
			} else {
				m.SSHKey = v // field 3, if set, wins below
			}
		case name == "base64-ssh-public-host-key":
			if key, msg := decodeHostKey(v); msg != "" {
				bad(0, "setting base64-ssh-public-host-key: %s", msg)
			} else {
				m.HostKey = key
			}
		case ignoredStoreSettings[name]:
		default:
			bad(0, "store setting %q is not supported by nix-offload", name)
		}
	}

	if s, ok := get(1); ok {
		m.Systems = splitList(s)
		if len(m.Systems) == 0 {
			bad(1, "%q lists no system; give one or more, separated by commas", s)
		}
	} else if p.system != "" {
		m.Systems = []string{p.system}
	} else {
		bad(1, "no systems given, and no default system to use")
	}
	for _, s := range m.Systems {
		if msg := checkListItem(s); msg != "" {
			bad(1, "%s", msg)
		}
	}

	if s, ok := get(2); ok {
		if msg := checkKeyPath(s); msg != "" {
			bad(2, "%s", msg)
		} else if msg := checkAbsKeyPath(s); msg != "" {
			bad(2, "%s", msg)
		} else {
			m.SSHKey = s
		}
	}

	if s, ok := get(3); ok {
		n, err := strconv.ParseUint(s, 10, 64)
		switch {
		case err != nil:
			bad(3, "must be a whole number, got %q", s)
		case n == 0:
			m.Enabled = false // Nix accepts it but never has a free slot on such a machine
		case n > MaxParallelBuilds:
			bad(3, "must be at most %d, got %d", MaxParallelBuilds, n)
		default:
			m.ParallelBuilds = int(n)
		}
	}

	if s, ok := get(4); ok {
		f, err := strconv.ParseFloat(s, 64)
		switch {
		case err != nil && !errors.Is(err, strconv.ErrRange), math.IsNaN(f), math.IsInf(f, 0):
			bad(4, "must be a finite number, got %q", s)
		case f < 0:
			bad(4, "must not be negative, got %q", s)
		case f == 0:
			// Nix reads 0 as the default
		default:
			m.Speed = f
		}
	}

	if s, ok := get(5); ok {
		m.Features = splitList(s)
	}
	if s, ok := get(6); ok {
		m.MandatoryFeatures = splitList(s)
	}
	for i, list := range [][]string{m.Features, m.MandatoryFeatures} {
		for _, s := range list {
			if msg := checkListItem(s); msg != "" {
				bad(5+i, "%s", msg)
			} else if _, msg := decodeHostKey(s); msg == "" && len(s) > 40 {
				// A field left out before it: the machine would go unpinned.
				bad(5+i, "holds a public host key; it belongs in field 8 (write - for each empty field before it)")
			}
		}
	}

	if s, ok := get(7); ok {
		if key, msg := decodeHostKey(s); msg != "" {
			bad(7, "%s", msg)
		} else {
			m.HostKey = key
		}
	}

	if len(p.errs) == errsBefore {
		p.ms = append(p.ms, m)
	}
}

// checkAbsKeyPath refuses a relative key path in the machines format. Nix's own hook hands
// it to ssh, which looks it up from nix-daemon's working directory (/); no one means that,
// and the file holds no directory to resolve it against. (offload.toml's relative paths are
// taken against its directory: see [Load].) "~/…" is ssh's own expansion and stays.
func checkAbsKeyPath(s string) string {
	if filepath.IsAbs(s) || strings.HasPrefix(s, "~") {
		return ""
	}
	return fmt.Sprintf("%q is a relative path, which would be looked up from nix-daemon's working directory; give the absolute path", s)
}

// splitList splits a comma list, dropping empty items as Nix does ("a,,b" is a and b).
func splitList(s string) []string {
	var out []string
	for item := range strings.SplitSeq(s, ",") {
		if item != "" {
			out = append(out, item)
		}
	}
	return out
}

// parseStoreURI fills m's User, Host and Port from a machines-file store URI and returns its
// settings, or a message saying what is wrong with it.
func parseStoreURI(uri string, m *Machine) (url.Values, string) {
	rest, ok := strings.CutPrefix(uri, "ssh://")
	if !ok {
		if rest, ok = strings.CutPrefix(uri, "ssh-ng://"); ok {
			m.Protocol = ProtocolSSHNG
		}
	}
	if !ok {
		if scheme, _, found := strings.Cut(uri, "://"); found {
			return nil, fmt.Sprintf("%q uses scheme %q; nix-offload reaches machines over SSH only (ssh:// or ssh-ng://)", uri, scheme)
		}
		// As Nix: a bare word that is not a local store is an SSH host.
		word, _, _ := strings.Cut(uri, "?")
		if word == "" || word == "local" || word == "auto" || word == "daemon" || strings.Contains(word, "/") {
			return nil, fmt.Sprintf("%q is a local store; nix-offload only builds on machines it reaches over SSH", uri)
		}
		rest = uri
	}
	authority, query, _ := strings.Cut(rest, "?")
	authority, path, _ := strings.Cut(authority, "/")
	if path != "" {
		return nil, fmt.Sprintf("%q has a path %q; a remote store is set with ?remote-store=…", uri, "/"+path)
	}
	params, err := url.ParseQuery(query)
	if err != nil {
		return nil, fmt.Sprintf("%q has bad settings after '?': %v", uri, err)
	}
	hostport := authority
	if i := strings.LastIndexByte(authority, '@'); i >= 0 {
		user, err := url.PathUnescape(authority[:i])
		if err != nil || user == "" || strings.Contains(user, ":") {
			return nil, fmt.Sprintf("%q has a bad user %q", uri, authority[:i])
		}
		if msg := checkUser(user); msg != "" {
			return nil, fmt.Sprintf("%q: user %s", uri, msg)
		}
		m.User = user
		hostport = authority[i+1:]
	}
	host, port := hostport, ""
	switch {
	case strings.HasPrefix(hostport, "["):
		end := strings.IndexByte(hostport, ']')
		if end < 0 {
			return nil, fmt.Sprintf("%q has an unclosed '['", uri)
		}
		host = hostport[1:end]
		after := hostport[end+1:]
		if after != "" {
			var found bool
			if port, found = strings.CutPrefix(after, ":"); !found {
				return nil, fmt.Sprintf("%q has %q after the address", uri, after)
			}
		}
	case strings.Count(hostport, ":") == 1:
		host, port, _ = strings.Cut(hostport, ":")
	}
	host, err = url.PathUnescape(host)
	if err != nil {
		return nil, fmt.Sprintf("%q has a bad host: %v", uri, err)
	}
	if msg := checkHost(host); msg != "" {
		return nil, fmt.Sprintf("host %s", msg)
	}
	m.Host = host
	if port != "" || strings.HasSuffix(hostport, ":") {
		n, err := strconv.Atoi(port)
		if err != nil || checkPort(int64(n)) != "" {
			return nil, fmt.Sprintf("%q has a bad port %q; it must be between 1 and 65535", uri, port)
		}
		m.Port = n
	}
	return params, ""
}

// decodeHostKey decodes field 8: base64 of a public key line.
func decodeHostKey(b64 string) (string, string) {
	raw, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		var err2 error
		if raw, err2 = base64.RawStdEncoding.DecodeString(b64); err2 != nil {
			return "", fmt.Sprintf("is not valid base64: %v", err)
		}
	}
	key, msg := parseHostKey(string(raw))
	if msg != "" {
		return "", "decodes to something that is not a public key line; it must be the base64 of e.g. ssh_host_ed25519_key.pub: " + msg
	}
	return key, ""
}
