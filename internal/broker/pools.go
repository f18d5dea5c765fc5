package broker

import (
	"context"
	"time"

	sshconfig "github.com/kevinburke/ssh_config"

	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/pool"
	"github.com/nix-offload/nix-offload/internal/probe"
)

// NewSSHPool is the pool of warm SSH connections and serve sessions of m
// (internal/pool), configured from the machine and ~/.ssh/config.
func NewSSHPool(m machines.Machine, onDial func(error)) Pool {
	return sshPool{pool.New(pool.Options{Machine: m, SSHConfig: sshconfig.DefaultUserSettings, OnDial: onDial})}
}

type sshPool struct{ p *pool.Pool }

func (s sshPool) Get(ctx context.Context) (Session, error) {
	sess, err := s.p.Get(ctx)
	if err != nil {
		return nil, err
	}
	return sess, nil
}

func (s sshPool) Put(sess Session, reusable bool) { s.p.Put(sess.(*pool.Session), reusable) }
func (s sshPool) Warm(ctx context.Context) error  { return s.p.Warm(ctx) }
func (s sshPool) Close()                          { s.p.Close() }

func (s sshPool) Probe(ctx context.Context, timeout time.Duration) (probe.State, error) {
	return s.p.Probe(ctx, timeout)
}

func (s sshPool) Stats() PoolStats {
	st := s.p.Stats()
	return PoolStats{Conns: st.Conns, Idle: st.Idle, InUse: st.InUse}
}
