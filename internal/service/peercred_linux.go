package service

import (
	"fmt"
	"net"
	"syscall"
)

// PeerUID returns the user id of the process that connected c, as the kernel recorded it at
// connect(2) (SO_PEERCRED); it cannot be forged by the peer. c must be a unix-domain
// connection, such as those a listener from [Listen] accepts.
func PeerUID(c net.Conn) (uint32, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return 0, fmt.Errorf("peer credentials: %T is not a unix connection", c)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return 0, fmt.Errorf("peer credentials: %w", err)
	}
	var cred *syscall.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) {
		cred, serr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil {
		return 0, fmt.Errorf("peer credentials: %w", err)
	}
	if serr != nil {
		return 0, fmt.Errorf("peer credentials: SO_PEERCRED: %w", serr)
	}
	return cred.Uid, nil
}

// socketDomain returns the address family of the socket fd.
func socketDomain(fd int) (int, error) {
	return syscall.GetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_DOMAIN)
}
