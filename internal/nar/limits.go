package nar

// Limits bounds what a NAR may contain. A field that is zero or negative
// takes its value from [DefaultLimits].
type Limits struct {
	MaxNameLen   int   // bytes in one entry name
	MaxTargetLen int   // bytes in one symlink target
	MaxDepth     int   // names in a node's path; the root has depth 0
	MaxEntries   int64 // nodes in one NAR, the root included
	MaxFileSize  int64 // bytes in one regular file
	MaxNARSize   int64 // bytes of the whole NAR, as on the wire
}

// DefaultLimits are sane for build outputs. Each value is far above what a
// real store path needs, and low enough that a hostile NAR cannot make the
// reader or [Restore] exhaust memory or file descriptors.
var DefaultLimits = Limits{
	// Linux NAME_MAX: no longer name can be created on disk, so Nix itself
	// could not have dumped one.
	MaxNameLen: 255,

	// Linux PATH_MAX (4096) counts the terminating NUL, so symlink(2)
	// accepts at most 4095 bytes; go-nix uses the same bound.
	MaxTargetLen: 4095,

	// Deeply nested node_modules trees stay well under 100 levels. The
	// reader keeps one frame and Restore one open directory per level, so
	// 256 levels stay under the usual soft limit of 1024 file descriptors.
	MaxDepth: 256,

	// The largest outputs (full TeX Live, kernel sources, big monorepos)
	// have a few hundred thousand files. Ten million bounds the inodes and
	// time a stream of tiny entries can cost.
	MaxEntries: 10_000_000,

	// One tebibyte: more than any real output, and far less than the 2^63
	// a u64 length could claim.
	MaxFileSize: 1 << 40,

	// As MaxFileSize. A caller that knows the narSize uses Verify, which
	// lowers this bound to exactly that size.
	MaxNARSize: 1 << 40,
}

// withDefaults returns l with every unset field taken from DefaultLimits.
func (l Limits) withDefaults() Limits {
	d := DefaultLimits
	if l.MaxNameLen <= 0 {
		l.MaxNameLen = d.MaxNameLen
	}
	if l.MaxTargetLen <= 0 {
		l.MaxTargetLen = d.MaxTargetLen
	}
	if l.MaxDepth <= 0 {
		l.MaxDepth = d.MaxDepth
	}
	if l.MaxEntries <= 0 {
		l.MaxEntries = d.MaxEntries
	}
	if l.MaxFileSize <= 0 {
		l.MaxFileSize = d.MaxFileSize
	}
	if l.MaxNARSize <= 0 {
		l.MaxNARSize = d.MaxNARSize
	}
	return l
}
