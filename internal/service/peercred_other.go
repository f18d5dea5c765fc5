//go:build !linux

package service

import (
	"fmt"
	"net"
	"runtime"
	"syscall"
)

// PeerUID fails where this package cannot read peer credentials (the
// standard library has SO_PEERCRED only on Linux). The broker then refuses
// every client: the hook works without a broker, and a broker that cannot
// tell root from anyone else must not take builds.
func PeerUID(c net.Conn) (uint32, error) {
	return 0, fmt.Errorf("peer credentials: not supported on %s", runtime.GOOS)
}

// socketDomain returns the address family of the socket fd from its own
// address (SO_DOMAIN is Linux's).
func socketDomain(fd int) (int, error) {
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		return 0, err
	}
	switch sa.(type) {
	case *syscall.SockaddrUnix:
		return syscall.AF_UNIX, nil
	case *syscall.SockaddrInet4:
		return syscall.AF_INET, nil
	case *syscall.SockaddrInet6:
		return syscall.AF_INET6, nil
	}
	return -1, nil
}
