package graph

import (
	"context"
	"fmt"
	"os"

	sshconfig "github.com/kevinburke/ssh_config"

	"github.com/nix-offload/nix-offload/internal/engine"
	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/offload"
	"github.com/nix-offload/nix-offload/internal/pool"
	"github.com/nix-offload/nix-offload/internal/uploads"
)

// NixLogDir is where Nix keeps build logs unless NIX_LOG_DIR says otherwise. The broker's
// unit and the NixOS module make it writable (ReadWritePaths) for the graphs' logs.
const NixLogDir = "/nix/var/log/nix"

// DefaultLogDir is Nix's log directory: NIX_LOG_DIR, else NixLogDir.
func DefaultLogDir() string {
	if d := os.Getenv("NIX_LOG_DIR"); d != "" {
		return d
	}
	return NixLogDir
}

// NewAlone makes the Builder of a graph built without a broker: the hook alone's placer over
// the host's slot files and health, shared with every hook of the host, and warm sessions,
// one pool per machine, shared by every derivation of the graph (a derivation costs no SSH
// handshake and no nix-store start), with one upload table per machine (what the graph's
// builds send or build there is not asked about again). warn hears what goes wrong on the way
// that does not stop the build. Shut closes the pools.
func NewAlone(cfg *machines.Config, local Store, warn func(string)) (*Remote, error) {
	sl, tracker, err := engine.OpenHostState(cfg, func(herr error) {
		warn(fmt.Sprintf("%v; machine health is kept in this process only", herr))
	})
	if err != nil {
		return nil, err
	}
	pools := map[string]*pool.Pool{}
	tables := map[string]*uploads.Table{}
	var names []string
	for _, m := range cfg.Machines {
		if m.Enabled {
			pools[m.Name()] = pool.New(pool.Options{Machine: m, SSHConfig: sshconfig.DefaultUserSettings})
			tables[m.Name()] = uploads.New(max(m.ParallelBuilds, 2))
			names = append(names, m.Name())
		}
	}
	get := func(ctx context.Context, name string) (engine.Session, func(), error) {
		p, ok := pools[name]
		if !ok {
			return nil, nil, fmt.Errorf("no machine '%s' in %s", name, cfg.Path)
		}
		s, err := p.Get(ctx)
		if err != nil {
			return nil, nil, err
		}
		return s, func() { p.Put(s, false) }, nil
	}
	return &Remote{
		Placer: func() engine.Placer {
			return &engine.Alone{
				Machines: cfg.Machines,
				Slots:    sl,
				Health:   tracker,
				GiveUp:   cfg.Daemon.MachineWait,
				Warn: func(machine string, err error) {
					warn(fmt.Sprintf("cannot use '%s': %v", machine, err))
				},
				Connect: func(ctx context.Context, m machines.Machine) (engine.Session, func(), error) {
					return get(ctx, m.Name())
				},
				Put: func(s engine.Session, reusable bool) {
					ps := s.(*pool.Session)
					pools[ps.Name()].Put(ps, reusable)
				},
			}
		},
		Transfers: func(l engine.Lease) offload.Transfers {
			s, ok := l.Session().(uploads.Session)
			if t := tables[l.Machine()]; ok && t != nil {
				return uploads.For(s, t)
			}
			return nil
		},
		Local: local,
		Open:  get,
		Close: func() {
			for _, p := range pools {
				p.Close()
			}
		},
		LogDir:   DefaultLogDir(),
		Machines: names,
		Down:     tracker.Down,
	}, nil
}

// TotalSlots is the number of builds the enabled machines take at once (at least 1): a
// graph's bound on the derivations it hands the Builder at once ([Options.MaxRunning]).
func TotalSlots(ms []machines.Machine) int {
	n := 0
	for _, m := range ms {
		if m.Enabled {
			n += max(m.ParallelBuilds, 1)
		}
	}
	return max(n, 1)
}
