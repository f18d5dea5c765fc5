package main

import (
	"os"

	"github.com/nix-offload/nix-offload/internal/machines"
)

// defaultConfigPath is read when neither -config nor $NIX_OFFLOAD_CONFIG is set.
const defaultConfigPath = "/etc/nix/offload.toml"

// configError is a configuration that cannot be used (exit 2).
type configError struct{ err error }

func (e *configError) Error() string { return e.err.Error() }
func (e *configError) Unwrap() error { return e.err }

// loadConfig finds and parses the configuration: an explicit path, else
// $NIX_OFFLOAD_CONFIG, else /etc/nix/offload.toml, else Nix's machines
// format in builders (as the `builders` setting; "" means @/etc/nix/machines).
func loadConfig(path, builders, system string) (*machines.Config, error) {
	if path == "" {
		path = os.Getenv("NIX_OFFLOAD_CONFIG")
	}
	if path == "" {
		if _, err := os.Stat(defaultConfigPath); err == nil {
			path = defaultConfigPath
		}
	}
	if path != "" {
		cfg, err := machines.Load(path)
		if err != nil {
			return nil, &configError{err}
		}
		return cfg, nil
	}
	if builders == "" {
		builders = "@/etc/nix/machines"
	}
	ms, err := machines.ParseBuilders(builders, system, os.ReadFile)
	if err != nil {
		return nil, &configError{err}
	}
	if err := machines.Validate(ms); err != nil {
		return nil, &configError{err}
	}
	return &machines.Config{Path: "builders", Machines: ms}, nil
}
