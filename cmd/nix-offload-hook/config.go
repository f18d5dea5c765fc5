package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/hookproto"
	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/service"
)

// defaultConfigPath is read when neither -config nor $NIX_OFFLOAD_CONFIG is set. The
// tests point it elsewhere (TestMain), so that the machine's own file never matters.
var defaultConfigPath = "/etc/nix/offload.toml"

// defaultBuilders is what `check` reads without a TOML file, as Nix does
// when `builders` is not set.
const defaultBuilders = "@/etc/nix/machines"

// brokerSocket is the broker's socket: flag if set, else the config's
// [daemon] socket, else the default.
func brokerSocket(flag string, cfg *machines.Config) string {
	switch {
	case flag != "":
		return flag
	case cfg != nil && cfg.Daemon.Socket != "":
		return cfg.Daemon.Socket
	}
	return brokerapi.DefaultSocket
}

// configError is a configuration that cannot be used (exit 2).
type configError struct{ err error }

func (e *configError) Error() string { return e.err.Error() }
func (e *configError) Unwrap() error { return e.err }

// configFile returns the TOML configuration to read: path if given, else
// $NIX_OFFLOAD_CONFIG, else /etc/nix/offload.toml if it exists; "" when
// there is none and Nix's machines format applies. from says which, for
// errors: "-config", "$NIX_OFFLOAD_CONFIG" or "the default".
func configFile(path string) (file, from string) {
	if path != "" {
		return path, "-config"
	}
	if p := os.Getenv("NIX_OFFLOAD_CONFIG"); p != "" {
		return p, "$NIX_OFFLOAD_CONFIG"
	}
	if _, err := os.Stat(defaultConfigPath); err == nil {
		return defaultConfigPath, "the default"
	}
	return "", ""
}

// loadConfig reads the TOML configuration when there is one (see
// configFile), else the machines in builders, Nix's machines format as in
// its `builders` setting ("" = no machines).
func loadConfig(path, builders, system string) (*machines.Config, error) {
	if f, from := configFile(path); f != "" {
		cfg, err := machines.Load(f)
		var inside *machines.Error
		switch {
		case errors.As(err, &inside):
			return nil, &configError{err} // names file, line and key already
		case err != nil:
			// Not read at all: say that this path was taken as the configuration.
			return nil, &configError{fmt.Errorf("configuration file (%s): %w", from, err)}
		}
		if err := service.CheckSocketPath(cfg.Daemon.Socket); err != nil {
			// Found here, by `check` too, not only when the broker starts.
			return nil, &configError{fmt.Errorf("%s: daemon.socket: %w", cfg.Path, err)}
		}
		return cfg, nil
	}
	ms, err := machines.ParseBuilders(builders, system, machines.ReadFile)
	if err != nil {
		return nil, &configError{err}
	}
	if err := machines.Validate(ms); err != nil {
		return nil, &configError{err}
	}
	return &machines.Config{Path: machines.BuildersName, Machines: ms}, nil
}

// buildersEmpty reports whether Nix sent `builders` with an empty value: Nix's way to ask for
// a local build (`--builders ""`), and the one value nix-daemon takes from an untrusted client
// (NixOS/nix 2.8 to 2.34 daemon, wopSetOptions). It holds even when offload.toml lists the
// machines, or an untrusted user could not opt out of offloading. Nix always sends the
// setting, and its default (@/etc/nix/machines) is not empty; a Nix that did not send it at
// all asks for nothing.
func buildersEmpty(s hookproto.Settings) bool {
	v, sent := s["builders"]
	return sent && v == ""
}

// keyWarnings names the private key files of ms that other users can read. ssh refuses such
// a key ("UNPROTECTED PRIVATE KEY FILE"), and whoever can read it can log in to the machine;
// nix-offload still uses it, so `check` and the broker say so. Paths with "~" (expanded by
// ssh_config's rules) and files that are not there are left alone.
func keyWarnings(ms []machines.Machine) []string {
	var out []string
	seen := map[string]bool{}
	for _, m := range ms {
		k := m.SSHKey
		if k == "" || seen[k] || !filepath.IsAbs(k) {
			continue
		}
		seen[k] = true
		fi, err := os.Stat(k)
		if err != nil || fi.Mode().Perm()&0o077 == 0 {
			continue
		}
		out = append(out, fmt.Sprintf("ssh-key %s (of %s) can be read by other users (mode %04o); whoever reads it can log in to the machine: chmod 600 %s",
			k, m.Name(), fi.Mode().Perm(), k))
	}
	return out
}
