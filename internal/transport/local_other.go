//go:build !linux

package transport

import "syscall"

// dieWithParent does nothing where the kernel has no parent-death signal: a
// local `nix-store --serve` then exits when its stdin closes, which happens
// when the hook exits, however it exits.
func dieWithParent(*syscall.SysProcAttr) {}
