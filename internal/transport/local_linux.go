package transport

import "syscall"

// dieWithParent has the kernel kill the child when the thread that started
// it exits, so a crashed hook leaves no `nix-store --serve` behind.
func dieWithParent(a *syscall.SysProcAttr) { a.Pdeathsig = syscall.SIGKILL }
