package broker

import (
	"errors"
	"io"
	"sync"

	"github.com/nix-offload/nix-offload/internal/localstore"
	"github.com/nix-offload/nix-offload/internal/nar"
	"github.com/nix-offload/nix-offload/internal/serveproto"
)

// errLocalClosed is a local read after the broker closed.
var errLocalClosed = errors.New("the broker is closing")

// localPool shares a few warm read sessions on the local store among the
// builds that run at once. localstore.Store serves one call at a time, and
// a Dump of a large input holds its session for as long as the upload
// takes, so there are several.
type localPool struct {
	open func() (*localstore.Store, error)
	free chan *localstore.Store // idle stores
	sem  chan struct{}          // one token per store in existence or being made

	mu     sync.Mutex
	all    []*localstore.Store
	closed bool
}

func newLocalPool(n int, open func() (*localstore.Store, error)) *localPool {
	return &localPool{open: open, free: make(chan *localstore.Store, n), sem: make(chan struct{}, n)}
}

// with runs f on an idle store, opening one if fewer than the bound exist.
func (p *localPool) with(f func(*localstore.Store) error) error {
	var s *localstore.Store
	select {
	case s = <-p.free:
	default:
		select {
		case s = <-p.free:
		case p.sem <- struct{}{}:
			var err error
			if s, err = p.open(); err != nil {
				<-p.sem
				return err
			}
			p.mu.Lock()
			if p.closed {
				// Opened while the broker closed: nobody would close it.
				p.mu.Unlock()
				s.Close()
				<-p.sem
				return errLocalClosed
			}
			p.all = append(p.all, s)
			p.mu.Unlock()
		}
	}
	defer func() { p.free <- s }()
	return f(s)
}

// warm starts one read session now, so the first build does not wait for
// a local nix-store to start.
func (p *localPool) warm() error {
	return p.with(func(s *localstore.Store) error { return s.Warm() })
}

func (p *localPool) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	p.closed = true
	for _, s := range p.all {
		s.Close()
	}
}

// pathInfos asks for paths, starting a fresh session once if the current
// one says a path is missing: it may have cached that answer from before
// another process made the path valid.
func (p *localPool) pathInfos(paths []string) (infos []serveproto.PathInfo, err error) {
	err = p.with(func(s *localstore.Store) error {
		infos, err = s.PathInfos(paths)
		var nv *localstore.NotValidError
		if errors.As(err, &nv) {
			s.Refresh()
			infos, err = s.PathInfos(paths)
		}
		return err
	})
	return infos, err
}

func (p *localPool) dump(path string, w io.Writer) (st nar.Stats, err error) {
	err = p.with(func(s *localstore.Store) error {
		st, err = s.Dump(path, w)
		return err
	})
	return st, err
}

func (p *localPool) valid(paths []string) (valid []string, err error) {
	err = p.with(func(s *localstore.Store) error {
		valid, err = s.Valid(paths)
		return err
	})
	return valid, err
}

func (p *localPool) missingOutputs(infos []serveproto.PathInfo) (missing []serveproto.PathInfo, err error) {
	err = p.with(func(s *localstore.Store) error {
		missing, err = s.MissingOutputs(infos)
		return err
	})
	return missing, err
}

func (p *localPool) closure(paths []string) (closure []string, err error) {
	err = p.with(func(s *localstore.Store) error {
		closure, err = s.Closure(paths)
		return err
	})
	return closure, err
}
