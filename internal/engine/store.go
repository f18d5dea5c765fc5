package engine

import (
	"context"
	"io"

	"github.com/nix-offload/nix-offload/internal/daemonproto"
	"github.com/nix-offload/nix-offload/internal/nar"
	"github.com/nix-offload/nix-offload/internal/serveproto"
)

// MachineStore is a machine's store as read over a [Session], whichever
// protocol the machine speaks: the serve protocol's client, or on a
// [DaemonSession] the daemon protocol's. It is what a graph build needs of
// the machine that holds an input or an output: is it still there, its
// metadata, its NAR.
//
// Every call is bounded by ctx: when ctx ends the session is closed, which
// ends the call (the serve protocol has no other way; the daemon protocol's
// own abort would close the whole connection, and the builds on it).
type MachineStore struct {
	s      Session
	daemon *daemonproto.Conn // nil on a serve session
}

// StoreOf returns the store of s's machine.
func StoreOf(s Session) MachineStore {
	ms := MachineStore{s: s}
	if ds, ok := s.(DaemonSession); ok {
		ms.daemon = ds.DaemonConn()
	}
	return ms
}

// bound closes the session when ctx ends, until the returned stop is
// called; the daemon call gets a context that does not end.
func (m MachineStore) bound(ctx context.Context) (context.Context, func() bool) {
	return context.WithoutCancel(ctx), context.AfterFunc(ctx, m.s.Close)
}

// Valid returns those of paths that are valid on the machine. With lock,
// they stay valid for the session's life whatever a garbage collection
// there does: the serve protocol's QueryValidPaths with lock, the daemon's
// AddTempRoot of each path first.
func (m MachineStore) Valid(ctx context.Context, paths []string, lock bool) ([]string, error) {
	dctx, stop := m.bound(ctx)
	defer stop()
	if m.daemon == nil {
		return m.s.Conn().QueryValidPaths(paths, lock, false)
	}
	if lock {
		if err := m.daemon.AddTempRoots(dctx, paths); err != nil {
			return nil, err
		}
	}
	return m.daemon.QueryValidPaths(dctx, paths, false)
}

// PathInfos returns the metadata of those of paths that are valid on the
// machine.
func (m MachineStore) PathInfos(ctx context.Context, paths []string) ([]serveproto.PathInfo, error) {
	dctx, stop := m.bound(ctx)
	defer stop()
	if m.daemon == nil {
		return m.s.Conn().QueryPathInfos(paths)
	}
	return m.daemon.QueryPathInfos(dctx, paths)
}

// Dump writes the NAR of info.Path to w. The daemon protocol checks it
// against info's NarHash and NarSize as it streams; over the serve
// protocol, the receiving side does.
func (m MachineStore) Dump(ctx context.Context, info serveproto.PathInfo, w io.Writer) (nar.Stats, error) {
	dctx, stop := m.bound(ctx)
	defer stop()
	if m.daemon == nil {
		return m.s.Conn().DumpStorePath(info.Path, w)
	}
	return m.daemon.NarFromPath(dctx, info, w)
}

// Err is the error that broke the session's protocol client, or nil while
// it is usable.
func (m MachineStore) Err() error {
	if m.daemon == nil {
		return m.s.Conn().Err()
	}
	return m.daemon.Err()
}
