package sshconn

import (
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/nix-offload/nix-offload/internal/machines"
)

// DefaultConnectTimeout bounds the TCP connect and the SSH handshake when
// neither the machine nor ssh_config says otherwise.
const DefaultConnectTimeout = 10 * time.Second

// Target is one machine's SSH endpoint with every setting decided.
type Target struct {
	Name           string        // machine name, for messages
	Addr           string        // host:port to dial
	User           string        // remote login
	KeyFiles       []string      // private keys to offer, in order
	KeyFilesStrict bool          // KeyFiles were configured: a missing one is an error
	HostKey        string        // pinned host key (authorized_keys form), or ""
	KnownHosts     []string      // known_hosts files consulted when HostKey is ""
	ConnectTimeout time.Duration // TCP connect plus SSH handshake
	KeepAlive      time.Duration // interval between keepalive requests; 0 = DefaultKeepAlive
}

// SSHConfig looks up OpenSSH client settings for a host alias, as
// *ssh_config.UserSettings does. Get returns "" when nothing is set.
type SSHConfig interface {
	Get(alias, key string) string
}

// Resolve decides the SSH settings of m. Values set on the machine win;
// then ssh_config (when cfg is non-nil); then OpenSSH's defaults.
func Resolve(m machines.Machine, cfg SSHConfig) Target {
	get := func(key string) string {
		if cfg == nil {
			return ""
		}
		return strings.TrimSpace(cfg.Get(m.Host, key))
	}
	home := homeDir()

	host := m.Host
	if h := get("HostName"); h != "" {
		host = strings.ReplaceAll(h, "%h", m.Host)
	}
	port := m.Port
	if port == 0 {
		port, _ = strconv.Atoi(get("Port"))
	}
	if port <= 0 || port > 65535 {
		port = 22
	}
	t := Target{
		Name:           m.Name(),
		Addr:           net.JoinHostPort(host, strconv.Itoa(port)),
		User:           m.User,
		HostKey:        m.HostKey,
		ConnectTimeout: m.ConnectTimeout,
	}
	if t.User == "" {
		t.User = get("User")
	}
	if t.User == "" {
		t.User = currentUser()
	}

	switch {
	case m.SSHKey != "":
		t.KeyFiles, t.KeyFilesStrict = []string{expandHome(m.SSHKey, home)}, true
	case get("IdentityFile") != "" && get("IdentityFile") != "~/.ssh/identity":
		// ssh_config's package reports its own default ("~/.ssh/identity")
		// when nothing is set; only a real setting counts.
		t.KeyFiles, t.KeyFilesStrict = []string{expandHome(get("IdentityFile"), home)}, true
	default:
		for _, name := range []string{"id_ed25519", "id_ecdsa", "id_rsa"} {
			t.KeyFiles = append(t.KeyFiles, filepath.Join(home, ".ssh", name))
		}
	}

	switch {
	case len(m.KnownHosts) > 0:
		for _, f := range m.KnownHosts {
			t.KnownHosts = append(t.KnownHosts, expandHome(f, home))
		}
	default:
		files := strings.Fields(get("UserKnownHostsFile"))
		if len(files) == 0 {
			files = []string{"~/.ssh/known_hosts", "~/.ssh/known_hosts2"}
		}
		files = append(files, strings.Fields(get("GlobalKnownHostsFile"))...)
		files = append(files, "/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
		seen := map[string]bool{}
		for _, f := range files {
			f = expandHome(f, home)
			if !seen[f] {
				seen[f] = true
				t.KnownHosts = append(t.KnownHosts, f)
			}
		}
	}

	if t.ConnectTimeout <= 0 {
		if s, err := strconv.Atoi(get("ConnectTimeout")); err == nil && s > 0 {
			t.ConnectTimeout = time.Duration(s) * time.Second
		}
	}
	if t.ConnectTimeout <= 0 {
		t.ConnectTimeout = DefaultConnectTimeout
	}

	// ssh_config's "ServerAliveInterval 0" means no keepalives to OpenSSH; we always send
	// them (a dead link must not hang a build), so only a positive value counts.
	t.KeepAlive = m.ServerAliveInterval
	if t.KeepAlive <= 0 {
		if s, err := strconv.Atoi(get("ServerAliveInterval")); err == nil && s > 0 {
			t.KeepAlive = time.Duration(s) * time.Second
		}
	}
	return t
}

func homeDir() string {
	if h := os.Getenv("HOME"); h != "" {
		return h
	}
	if u, err := user.Current(); err == nil {
		return u.HomeDir
	}
	return "/"
}

func currentUser() string {
	if u, err := user.Current(); err == nil {
		return u.Username
	}
	return "root"
}

func expandHome(p, home string) string {
	if p == "~" {
		return home
	}
	if strings.HasPrefix(p, "~/") {
		return filepath.Join(home, p[2:])
	}
	return p
}
