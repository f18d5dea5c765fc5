//go:build unix

package nar

import "syscall"

// oNoFollow is redundant with os.Root, which opens with O_NOFOLLOW itself,
// but states the intent.
const oNoFollow = syscall.O_NOFOLLOW
