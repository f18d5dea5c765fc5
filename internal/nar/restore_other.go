//go:build !unix

package nar

// oNoFollow: os.Root refuses to follow links out of the root on its own.
const oNoFollow = 0
